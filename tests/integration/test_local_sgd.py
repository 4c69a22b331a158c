"""local-sgd (DiLoCo) through the real server and real Ray workers:

- in sync mode, a job equals a plain single-process DiLoCo (N model copies trained in turn,
  each with its own inner AdamW that keeps its state across rounds, pseudo-gradients
  ``global - local`` averaged, an outer SGD step with Nesterov momentum) to <= 1e-5;
- ``local_steps: 1`` with an inner SGD and an outer SGD of lr 1 without momentum is ps-sync;
- status shows rounds, each worker's local step and the bytes a round moves.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gradhub.client.client import Client
from gradhub.worker.data import digits, get_batch, global_batch_indices
from gradhub.worker.models import mlp

from ..conftest import final_params

BATCH, SEED, HIDDEN = 16, 11, [32]
INNER = {"name": "adamw", "lr": 0.003, "weight_decay": 0.01}
OUTER = {"name": "sgd", "lr": 0.7, "momentum": 0.9, "nesterov": True}


def spec(workers: int, steps: int, local_steps: int, inner: dict, outer: dict | None = None,
         mode: str = "local-sgd") -> dict:
    out = {"name": f"local-sgd-{workers}-{local_steps}", "mode": mode, "workers": workers,
           "resources": {"cpus": 0.5}, "model": {"name": "mlp", "args": {"hidden": HIDDEN}}, "dataset": "digits",
           "optimizer": inner, "batch_size": BATCH, "steps": steps, "seed": SEED}
    if mode == "local-sgd":
        out["local_steps"] = local_steps
        if outer is not None:
            out["outer_optimizer"] = outer
    return out


def _optimizer(params, spec: dict) -> torch.optim.Optimizer:
    hyper = {k: v for k, v in spec.items() if k not in ("name", "lr")}
    cls = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[spec["name"]]
    return cls(params, lr=spec["lr"], **hyper)


def diloco(workers: int, steps: int, local_steps: int, inner: dict, outer: dict) -> dict[str, torch.Tensor]:
    """Plain single-process DiLoCo: the reference."""
    torch.manual_seed(SEED)
    model = mlp(hidden=HIDDEN)
    copies = []
    for _ in range(workers):
        torch.manual_seed(SEED)
        copy = mlp(hidden=HIDDEN)
        copies.append((copy, _optimizer(copy.parameters(), inner)))
    outer_opt = _optimizer(model.parameters(), outer)
    train, _ = digits()
    loss_fn = nn.CrossEntropyLoss()
    for start in range(0, steps, local_steps):
        deltas = []
        for rank, (copy, opt) in enumerate(copies):
            copy.load_state_dict(model.state_dict())
            for step in range(start, min(start + local_steps, steps)):
                mine = global_batch_indices(len(train), workers * BATCH, SEED, step)[rank * BATCH:(rank + 1) * BATCH]
                x, y = get_batch(train, mine)
                opt.zero_grad()
                loss_fn(copy(x), y).backward()
                opt.step()
            deltas.append([g.detach() - c.detach() for g, c in zip(model.parameters(), copy.parameters(), strict=True)])
        outer_opt.zero_grad()
        for i, p in enumerate(model.parameters()):
            p.grad = sum(d[i] for d in deltas) / workers
        outer_opt.step()
    return {k: v.detach() for k, v in model.state_dict().items()}


def worst(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.mark.timeout(300)
def test_sync_local_sgd_equals_plain_diloco(server, tmp_path):
    steps, h = 40, 10  # four rounds
    with Client(server.address) as client:
        jobs = {n: client.submit(spec(n, steps, h, INNER)) for n in (1, 2)}  # the default outer optimizer
        for n, job in jobs.items():
            info = job.wait(timeout=240)
            assert info.state == "SUCCEEDED", info.reason
            assert info.step == info.total_steps == steps // h  # the job's steps are rounds
            assert info.metrics["bytes_per_round"] > 0
            got = final_params(client, info, tmp_path / str(n))
            expected = diloco(n, steps, h, INNER, OUTER)
            assert worst(got, expected) <= 1e-5, f"{n} workers: differs from plain DiLoCo by {worst(got, expected):.3g}"
            torch.manual_seed(SEED)
            assert worst(got, {k: v.detach() for k, v in mlp(hidden=HIDDEN).state_dict().items()}) > 1e-3


@pytest.mark.timeout(300)
def test_one_local_step_with_a_plain_outer_sgd_is_ps_sync(server, tmp_path):
    inner = {"name": "sgd", "lr": 0.05}
    with Client(server.address) as client:
        local = client.submit(spec(2, 30, 1, inner, {"name": "sgd", "lr": 1.0})).wait(timeout=240)
        plain = client.submit(spec(2, 30, 1, inner, mode="ps-sync")).wait(timeout=240)
        assert local.state == plain.state == "SUCCEEDED", (local.reason, plain.reason)
        a = final_params(client, local, tmp_path / "local")
        b = final_params(client, plain, tmp_path / "plain")
    assert worst(a, b) <= 1e-5


def test_local_sgd_fields_are_checked():
    from gradhub.proto.contract.errors import SpecError
    from gradhub.proto.contract.spec import JobSpec

    base = spec(2, 10, 5, INNER)
    parsed = JobSpec.from_dict(base)
    assert parsed.is_ps and parsed.store_mode == "ps-sync" and parsed.rounds(11) == 3
    assert parsed.outer_optimizer is not None and parsed.outer_optimizer.hyper == {"momentum": 0.9, "nesterov": True}
    assert JobSpec.from_dict({**base, "outer_sync": False}).store_mode == "ps-async"
    for bad, field in (({"local_steps": 0}, "local_steps"), ({"outer_optimizer": {"name": "nope"}}, "outer_optimizer"),
                       ({"outer_sync": "yes"}, "outer_sync")):
        with pytest.raises(SpecError, match=field):
            JobSpec.from_dict({**base, **bad})
    with pytest.raises(SpecError, match="local_steps: only applies to mode local-sgd"):
        JobSpec.from_dict({**spec(2, 10, 5, INNER, mode="ps-sync"), "local_steps": 5})


@pytest.mark.timeout(300)
def test_async_local_sgd_applies_each_workers_round_on_arrival(server):
    with Client(server.address) as client:
        info = client.submit({**spec(2, 40, 10, INNER), "outer_sync": False, "eval_every": 20}).wait(timeout=240)
        assert info.state == "SUCCEEDED", info.reason
        assert info.step == 4 and info.version == 8  # each worker's four rounds, each its own outer step
        assert "max_staleness" in info.metrics and "val_accuracy" in info.metrics
        assert [w.local_step for w in client.get_job(info.id).workers] in ([], [40, 40])


def first_read_at(workers: int, rank: int, step: int) -> int:
    """A sample that worker ``rank`` reads at ``step`` and nobody read before (its reader dies)."""
    train = len(digits()[0])
    earlier = {int(i) for s in range(step) for i in global_batch_indices(train, workers * BATCH, SEED, s)}
    mine = global_batch_indices(train, workers * BATCH, SEED, step)[rank * BATCH:(rank + 1) * BATCH]
    return next(int(i) for i in mine if int(i) not in earlier)


# (kill at inner step, checkpoint_every in rounds): with rounds of 10 steps, the kill at step 35
# replays round 2 from the inner state kept at round 2; without kept states, rounds 0 to 2
KILLS = [(35, 2), pytest.param(35, 0, marks=pytest.mark.slow)]


@pytest.mark.timeout(300)
@pytest.mark.parametrize(("kill_step", "every"), KILLS, ids=["kept-state-at-round-2", "no-kept-state"])
def test_a_killed_worker_replays_its_rounds_and_changes_nothing(server, tmp_path, kill_step, every):
    """Sync local-sgd: a worker killed mid-round comes back with the inner optimizer state it
    had (its kept state, then the rounds since replayed from the global parameters the server
    kept), recomputes the round, and the job ends with the parameters of an undisturbed run."""
    from pathlib import Path

    steps, h, workers, rank = 60, 10, 2, 1
    base = {**spec(workers, steps, h, INNER), "checkpoint_every": every, "max_restarts": 1,
            "working_dir": str(Path(__file__).parent / "user_code")}
    marker = tmp_path / "fired"
    dataset = {"factory": "gh_zoo:kill_on_sample_digits",
               "args": {"at": first_read_at(workers, rank, kill_step), "marker": str(marker)}}
    with Client(server.address) as client:
        killed = client.submit({**base, "name": "killed", "dataset": dataset}).wait(timeout=240)
        logs = "\n".join(client.logs(killed.id))
        assert killed.state == "SUCCEEDED", (killed.reason, logs)
        assert marker.exists() and logs.count(" died ") == 1, logs
        got = final_params(client, killed, tmp_path / "killed")
    expected = diloco(workers, steps, h, INNER, OUTER)
    assert worst(got, expected) <= 1e-5, f"the killed run differs from plain DiLoCo by {worst(got, expected):.3g}"


@pytest.mark.slow  # about a minute: a server in its own process, killed and started again
@pytest.mark.timeout(420)
def test_a_server_kill_resumes_every_worker_exactly(tmp_path):
    """The server (in a process of its own, with its own Ray) is SIGKILLed mid-job and a new one
    resumes from the latest checkpoint, which waited for every worker's inner state of its
    round: the job ends with the parameters of the same job undisturbed."""
    from ..conftest import wait_for
    from ..server_process import ServerProcess

    steps, h, every = 3000, 5, 20
    job_spec = {**spec(2, steps, h, INNER), "checkpoint_every": every}
    first = ServerProcess(tmp_path / "data", tmp_path, "first")
    second = ServerProcess(tmp_path / "data", tmp_path, "second")
    try:
        first.start()
        with Client(first.address) as client:
            job_id = client.submit(job_spec).id

            def past_a_checkpoint() -> bool:
                info = client.get_job(job_id)
                assert info.state in ("QUEUED", "RUNNING"), info.reason
                ckpts = client.list_checkpoints(job_id)
                return bool(ckpts) and info.step > ckpts[-1].step

            wait_for(past_a_checkpoint, 180, "a checkpoint, and the job past it", interval=0.01)
        first.kill()
        second.start(port=first.port)
        with Client(second.address) as client:
            info = client.get_job(job_id)
            assert info.step < steps // h, "the kill landed before the end"
            final = None
            for final in client.watch(job_id, timeout=300):
                pass
            assert final is not None and final.state == "SUCCEEDED", final
            logs = "\n".join(client.logs(job_id))
            assert "resuming from the checkpoint at step" in logs, logs
            got = final_params(client, final, tmp_path / "pulled")
            # the reference: the same job undisturbed (over 600 rounds, float rounding alone would
            # part gradhub from the plain DiLoCo above, which holds over the first rounds)
            undisturbed = client.submit({**job_spec, "name": "undisturbed"}).wait(timeout=300)
            expected = final_params(client, undisturbed, tmp_path / "undisturbed")
    finally:
        first.kill()
        second.kill()
    assert worst(got, expected) <= 1e-6, f"differs from the undisturbed run by {worst(got, expected):.3g}"
