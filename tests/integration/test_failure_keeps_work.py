"""A job that fails after some training keeps its latest consistent state as a checkpoint, and its
failure says where it happened (phase and step) with the worker's traceback in the job's log.

User code from ``user_code/gh_zoo`` (shipped as ``working_dir``): a model whose evaluation-mode
forward raises, and a dataset with one corrupt sample that a chosen step reads. Both modes.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from gradhub.client.client import Client
from gradhub.worker.data import global_batch_indices

USER_CODE = Path(__file__).parent / "user_code"
MODES = ("ps-sync", "allreduce")
STEPS, BATCH, SEED, BAD_STEP = 12, 16, 5, 7
TRAIN = 1437  # digits' training samples


def _spec(name: str, mode: str, **fields: Any) -> dict[str, Any]:
    return {"name": name, "mode": mode, "workers": 2, "resources": {"cpus": 0.5}, "batch_size": BATCH,
            "steps": STEPS, "seed": SEED, "working_dir": str(USER_CODE), "max_restarts": 0,
            "optimizer": {"name": "adam", "lr": 0.01}, **fields}


def _bad_index() -> int:
    """A sample that worker 1 reads first at step BAD_STEP (its slice of the global batch)."""
    for i in global_batch_indices(TRAIN, 2 * BATCH, SEED, BAD_STEP)[BATCH:].tolist():
        if all(i not in global_batch_indices(TRAIN, 2 * BATCH, SEED, s).tolist() for s in range(BAD_STEP)):
            return i
    raise AssertionError("no sample of step 7 is new")


@pytest.fixture(scope="module")
def failed(server, tmp_path_factory) -> dict[tuple[str, str], tuple[Any, list[str], Any, Path | None]]:
    tmp = tmp_path_factory.mktemp("kept")
    specs = {}
    for mode in MODES:
        specs[("eval", mode)] = _spec(f"breaks-in-eval-{mode}", mode, model="gh_zoo:breaks_in_eval",
                                      dataset="digits")
        specs[("data", mode)] = _spec(f"bad-sample-{mode}", mode, model={"name": "mlp", "args": {"hidden": [16]}},
                                      dataset={"factory": "gh_zoo:bad_sample_digits", "args": {"bad": _bad_index()}})
    with Client(server.address) as client:
        jobs = {key: client.submit(spec) for key, spec in specs.items()}
        out = {}
        for key, job in jobs.items():
            for _ in client.watch(job.id, timeout=240):
                pass
            info = client.get_job(job.id)
            ckpts = client.list_checkpoints(job.id)
            path = None
            if ckpts:
                path = tmp / f"{job.id}.safetensors"
                client.pull_checkpoint(job.id, path)
            out[key] = (info, list(client.logs(job.id)), ckpts, path)
        return out


@pytest.mark.parametrize("mode", MODES)
def test_a_failure_in_the_final_evaluation_keeps_the_trained_parameters(failed, mode):
    info, logs, ckpts, path = failed[("eval", mode)]
    assert info.state == "FAILED"
    assert info.reason.startswith(f"worker 0 failed in evaluation after step {STEPS}: ValueError: "
                                  "this model cannot evaluate"), info.reason
    assert "\n" not in info.reason
    assert ckpts and ckpts[-1].step == STEPS, "the final parameters are kept"
    sys.path.insert(0, str(USER_CODE))
    try:
        import gh_zoo

        model = gh_zoo.breaks_in_eval()
    finally:
        sys.path.remove(str(USER_CODE))
    model.load_state_dict(load_file(path))  # strict
    # the traceback, user frames included, is in the job's log
    text = "\n".join(logs)
    assert "worker 0 traceback (most recent call last):" in text
    assert "gh_zoo/__init__.py" in text and "in forward" in text and 'raise ValueError("this model' in text


@pytest.mark.parametrize("mode", MODES)
def test_a_failure_mid_training_names_the_step_and_keeps_the_state_before_it(failed, mode):
    info, logs, ckpts, _ = failed[("data", mode)]
    assert info.state == "FAILED"
    assert info.reason.startswith(f"worker 1 failed at training step {BAD_STEP}: "), info.reason
    assert "corrupt" in info.reason
    assert ckpts and ckpts[-1].step == BAD_STEP, [c.step for c in ckpts]
    assert any("in __getitem__" in line for line in logs), logs[-20:]


def test_both_modes_keep_the_same_state(failed):
    a, b = (load_file(failed[("data", mode)][3]) for mode in MODES)
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst <= 1e-5
    assert all(torch.isfinite(t).all() for t in a.values())
