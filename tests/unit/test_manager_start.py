"""JobManager.start on a data dir that holds a job whose stored spec no longer validates (an older
server accepted it): that job fails with the reason, the others are queued, the server starts."""

from __future__ import annotations

import json
from pathlib import Path

from gradhub.proto.contract.spec import JobSpec
from gradhub.proto.contract.states import JobState
from gradhub.server.checkpoints import CheckpointStore
from gradhub.server.config import ServerConfig
from gradhub.server.job_db import JobDB, JobRecord
from gradhub.server.jobs import JobManager
from gradhub.server.launcher import ExternalLauncher


def test_a_stored_spec_that_no_longer_validates_fails_only_its_job(tmp_path: Path) -> None:
    good = JobSpec.from_dict({"model": "mlp", "dataset": "digits", "steps": 5, "workers": 1})
    bad = json.dumps({**good.to_dict(), "steps": 10**400})
    with JobDB(tmp_path / "jobs.db") as db:
        db.insert(JobRecord(id="j-bad", name="bad", mode="ps-sync", spec_json=bad, state=JobState.QUEUED,
                            created_at=1.0))
        db.insert(JobRecord(id="j-good", name="good", mode="ps-sync", spec_json=good.to_json(),
                            state=JobState.QUEUED, created_at=2.0))
        manager = JobManager(db, CheckpointStore(tmp_path / "ckpt"), ExternalLauncher(), tmp_path / "wd",
                             ServerConfig(poll_s=0.01))
        manager.start()
        try:
            failed = manager.get("j-bad").record
            assert failed.state == JobState.FAILED
            assert failed.reason.startswith("its stored spec is not valid any more: steps: must fit in 64 bits")
            assert manager.get("j-good").record.state in (JobState.QUEUED, JobState.RUNNING)
        finally:
            manager.stop(grace=5.0)
