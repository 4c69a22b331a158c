"""What local-sgd workers keep between rounds and the server keeps for them: each worker's inner
optimizer and schedule state at a round (and, when its model is not the global one there, as
with fragments, its parameters), one safetensors file per (rank, round) under the
job's folder, written atomically. A restarted worker takes its latest one and replays the
rounds since from the global parameters the store kept (``ParameterStore.global_at``), so it
goes on with exactly the state it lost."""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import threading
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from gradhub.proto.state import TrainingState, decode_state, encode_state

_FILE = re.compile(r"rank-(\d{4})-round-(\d{10})\.safetensors")


class WorkerStates:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._lock = threading.Lock()

    def save(self, job_id: str, rank: int, state: TrainingState) -> int:
        """Keep worker ``rank``'s state at round ``state.step``; returns its size in bytes."""
        tensors: dict[str, torch.Tensor] = {f"param.{k}": v.detach().cpu() for k, v in state.params.items()}
        meta = {"optimizer": json.dumps(encode_state(state.optimizer_state, "opt.", tensors)),
                "scheduler": json.dumps(encode_state(state.scheduler_state, "sched.", tensors))}
        folder = self.root / job_id
        with self._lock:
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"rank-{rank:04d}-round-{state.step:010d}.safetensors"
            fd, tmp = tempfile.mkstemp(dir=folder, prefix=".", suffix=".tmp")
            os.close(fd)
            try:
                save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=meta)
                os.replace(tmp, path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
            return path.stat().st_size

    def latest(self, job_id: str, rank: int, at_most: int) -> int | None:
        """The latest round (at most ``at_most``) at which worker ``rank``'s state is kept."""
        rounds = [r for k, r in self._files(job_id) if k == rank and r <= at_most]
        return max(rounds, default=None)

    def load(self, job_id: str, rank: int, round_: int) -> TrainingState:
        path = self.root / job_id / f"rank-{rank:04d}-round-{round_:010d}.safetensors"
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
        params = {k.removeprefix("param."): v for k, v in tensors.items() if k.startswith("param.")}
        return TrainingState(step=round_, params=params,
                             optimizer_state=decode_state(json.loads(meta["optimizer"]), tensors),
                             scheduler_state=decode_state(json.loads(meta["scheduler"]), tensors))

    def complete(self, job_id: str, round_: int, workers: int) -> bool:
        """Whether every worker's state at ``round_`` is kept."""
        return {k for k, r in self._files(job_id) if r == round_} == set(range(workers))

    def prune(self, job_id: str, before: int) -> None:
        """Drop the states of rounds before ``before`` (a later round has every worker's)."""
        with self._lock:
            for rank, r in self._files(job_id):
                if r < before:
                    (self.root / job_id / f"rank-{rank:04d}-round-{r:010d}.safetensors").unlink(missing_ok=True)

    def delete_job(self, job_id: str) -> None:
        shutil.rmtree(self.root / job_id, ignore_errors=True)

    def _files(self, job_id: str) -> list[tuple[int, int]]:
        try:
            names = os.listdir(self.root / job_id)
        except FileNotFoundError:
            return []
        return [(int(m[1]), int(m[2])) for n in names if (m := _FILE.fullmatch(n))]
