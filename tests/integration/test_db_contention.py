"""Another process holding the job database's write lock never stalls training: a ps-sync job's
workers keep pushing, pulling and reporting metrics (every half second) while the lock is held,
and what they reported reaches the database once it is free (the manager writes it behind).
Before, the first report under the lock held its worker, and so the whole synchronous job,
for the database's busy timeout (5 s) and then failed.
"""

from __future__ import annotations

import sqlite3
import time

import pytest

from gradhub.client.client import Client

from ..conftest import wait_for

HOLD_S = 4.0  # under the database's busy timeout: the server's own direct writes only wait
STEPS_UNDER_LOCK = 30


@pytest.mark.timeout(120)
def test_training_goes_on_while_another_process_holds_the_database_lock(server):
    spec = {"name": "contention", "workers": 2, "resources": {"cpus": 0.5}, "model": {"name": "mlp",
            "args": {"hidden": [16]}}, "dataset": "digits", "batch_size": 16, "steps": 100_000, "eval_every": 25}
    with Client(server.address) as client:
        job = client.submit(spec)
        wait_for(lambda: client.get_job(job.id).step >= 30, 60, "the job to train")
        store = server.manager.state(job.id)
        holder = sqlite3.connect(str(server.config.data_dir / "jobs.db"), isolation_level=None)
        try:
            holder.execute("BEGIN EXCLUSIVE")
            locked_at, start = time.monotonic(), store.version
            # reports arrive every 0.5 s: by 1.5 s each worker made some under the lock
            wait_for(lambda: store.version >= start + STEPS_UNDER_LOCK and time.monotonic() - locked_at >= 1.5,
                     HOLD_S, f"{STEPS_UNDER_LOCK} steps while the database is locked")
            assert client.get_job(job.id).state == "RUNNING"  # reads go on too (WAL)
        finally:
            holder.execute("COMMIT")
            holder.close()
        under_lock = store.version
        wait_for(lambda: server.manager.db.get(job.id).step >= under_lock, 30,
                 "what was reported under the lock to reach the database")
        client.cancel(job.id)
        wait_for(lambda: client.get_job(job.id).done, 60, "the job to end")
        info = client.get_job(job.id)
        assert info.state == "CANCELLED", info.reason
        assert "loss" in info.metrics
