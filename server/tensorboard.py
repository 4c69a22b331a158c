"""Each job's TensorBoard event files (tensorboardX), one folder per job under the data dir's
``tensorboard/``, so that ``tensorboard --logdir <data dir>/tensorboard`` shows every job side by
side. Scalars: ``train/loss``, ``train/samples_per_s``, ``train/lr``, ``train/staleness`` and
``eval/<metric>``, against the step. Used from one thread (the manager's write-behind)."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class TensorBoardLogs:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._writers: dict[str, Any] = {}

    def path(self, job_id: str) -> Path:
        return self.root / job_id

    def write(self, job_id: str, step: int, kind: str, metrics: Mapping[str, float]) -> None:
        writer = self._writers.get(job_id)
        if writer is None:
            from tensorboardX import SummaryWriter

            writer = self._writers[job_id] = SummaryWriter(str(self.path(job_id)), flush_secs=5)
        for name, value in metrics.items():
            writer.add_scalar(f"{kind}/{name}", float(value), step)

    def close(self, job_id: str) -> None:
        """The job ended: its events on disk, its file closed."""
        writer = self._writers.pop(job_id, None)
        if writer is not None:
            writer.close()

    def delete(self, job_id: str) -> None:
        self.close(job_id)
        shutil.rmtree(self.path(job_id), ignore_errors=True)

    def close_all(self) -> None:
        for job_id in list(self._writers):
            self.close(job_id)
