"""Any model that trains in plain PyTorch trains in gradhub, with the same numbers.

User model code (``user_code/gh_zoo``, shipped as the jobs' ``working_dir``) with BatchNorm and
dropout, tied weights, a frozen backbone, an unused parameter, dict inputs and an output object
that carries its own loss; and the options parameter groups, gradient accumulation, clipping and
bf16 autocast. Each runs in ps-sync and in allreduce with 2 workers through the real server and
real Ray, and must equal plain PyTorch (max |difference| <= 1e-5) computing each worker's shard
of every step, which is DDP's semantics: gradients averaged over workers, the job's buffers are
rank 0's (BatchNorm normalises each worker's batch with its own statistics), randomness seeded
per (seed, rank, step). Every checkpoint is loaded strictly into a fresh model and evaluated in
plain PyTorch, which must give the metrics the job reported. The default suite runs every case
in ps-sync and the cases that take another path in the other modes (``DEFAULT_JOBS``); the rest
of the matrix is marked ``matrix``, which CI runs.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, load_model
from torch import nn
from torch.utils.data.dataloader import default_collate

from gradhub.client.client import Client
from gradhub.worker.data import get_batch, step_seed, worker_batch_indices

from ..conftest import selected, tiered

USER_CODE = Path(__file__).parent / "user_code"
STEPS, BATCH, SEED, WORKERS = 25, 16, 3, 2
MODES = ("ps-sync", "allreduce")
ASYNC_MODES = ("ps-async", "ps-ssp")  # frozen and unused parameters are checked there too
# ps-sync with the parameter server in two shard processes, whose control store on the server
# keeps the buffers and the frozen parameters: for the cases whose state is more than parameters
SHARDED, SHARDED_CASES = "ps-sync-sharded", ("frozen", "tied", "param_groups")


@dataclass(frozen=True)
class Case:
    model: str
    optimizer: dict[str, Any]
    dataset: str = "digits"
    extra: dict[str, Any] = field(default_factory=dict)  # more spec fields
    # plain PyTorch's optimizer for the case, from the model (None: the optimizer over trainable params)
    groups: Callable[[nn.Module], list[dict[str, Any]]] | None = None


def _param_groups(model: nn.Module) -> list[dict[str, Any]]:
    """By hand, what the spec's param_groups say: no decay for biases and the BatchNorm,
    another learning rate for the head's weight, the optimizer's own for the rest."""
    named = dict(model.named_parameters())
    no_decay = [named[n] for n in named if n.endswith(".bias") or n.startswith("1.")]
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": [named["4.weight"]], "lr": 0.003},
            {"params": [named["0.weight"]]}]


CASES = {
    "batchnorm": Case("gh_zoo:bn_net", {"name": "sgd", "lr": 0.1, "momentum": 0.9}),
    "tied": Case("gh_zoo:tied_lm", {"name": "adam", "lr": 0.01}),
    "frozen": Case("gh_zoo:frozen_backbone", {"name": "adamw", "lr": 0.01, "weight_decay": 0.1}),
    "unused": Case("gh_zoo:with_pooler", {"name": "adamw", "lr": 0.01, "weight_decay": 0.1}),
    "dict_inputs": Case("gh_zoo:dict_model", {"name": "adam", "lr": 0.01}, dataset="gh_zoo:dict_digits",
                        extra={"loss": "model", "metrics": {"factory": "gh_zoo:top_k", "args": {"k": 2}}}),
    "param_groups": Case("gh_zoo:bn_net", {"name": "adamw", "lr": 0.01, "weight_decay": 0.1, "param_groups": [
        {"params": ["*.bias", "1.*"], "weight_decay": 0}, {"params": ["4.*"], "lr": 0.003}]},
        groups=_param_groups),
    "accumulate": Case("gh_zoo:bn_net", {"name": "sgd", "lr": 0.1, "momentum": 0.9}, extra={"accumulate": 2}),
    "clipping": Case("gh_zoo:tied_lm", {"name": "sgd", "lr": 0.5}, extra={"clip_grad_norm": 0.05}),
    "bf16": Case("gh_zoo:bn_net", {"name": "adam", "lr": 0.01}, extra={"precision": "bf16"}),
    "buffers_average": Case("gh_zoo:bn_net", {"name": "sgd", "lr": 0.1, "momentum": 0.9},
                            extra={"buffers": "average"}),
    "buffers_local": Case("gh_zoo:bn_net", {"name": "sgd", "lr": 0.1, "momentum": 0.9}, extra={"buffers": "local"}),
}


def spec(name: str, mode: str) -> dict[str, Any]:
    case = CASES[name]
    sharded = {"mode": "ps-sync", "ps_shards": 2} if mode == SHARDED else {"mode": mode}
    return {
        "name": f"any-{name}-{mode}", **sharded, "workers": WORKERS, "resources": {"cpus": 0.5},
        "model": case.model, "dataset": case.dataset, "optimizer": case.optimizer, "batch_size": BATCH,
        "steps": STEPS, "seed": SEED, "working_dir": str(USER_CODE), "max_restarts": 0, **case.extra,
    }


@pytest.fixture(scope="module")
def zoo() -> Iterator[Any]:
    """The user's package, imported here too (for the reference runs)."""
    sys.path.insert(0, str(USER_CODE))
    import gh_zoo

    yield gh_zoo
    sys.path.remove(str(USER_CODE))
    sys.modules.pop("gh_zoo", None)


# The default suite runs every case in ps-sync and the cases that take another path in each
# other mode (buffers, frozen, unused and tied parameters, accumulation); CI runs the rest of
# the matrix (marked ``matrix``).
DEFAULT_JOBS = ({(name, "ps-sync") for name in CASES}
                | {(name, "allreduce") for name in ("batchnorm", "frozen", "unused", "tied", "accumulate")}
                | {("frozen", "ps-async"), ("unused", "ps-ssp"), ("frozen", SHARDED), ("tied", SHARDED)})


def jobs(keys: list[tuple[str, str]]) -> list[Any]:
    """``keys`` as parameters of a test's ``job``, the ones outside DEFAULT_JOBS marked ``matrix``."""
    return tiered(keys, DEFAULT_JOBS, id=lambda k: f"{k[0]}-{k[1]}")


@pytest.fixture(scope="module")
def finished(request, server, tmp_path_factory) -> dict[tuple[str, str], tuple[Any, Path]]:
    """The jobs the selected tests read (``job``, and both modes of a ``pair``), at once."""
    wanted = selected(request, "job") | {(name, mode) for name in selected(request, "pair") for mode in MODES}
    tmp = tmp_path_factory.mktemp("any-model")
    with Client(server.address) as client:
        # in the order of the whole matrix, so that a job's name and queue place do not depend on the selection
        everything = [(n, m) for n in CASES for m in MODES] + [(n, m) for n in ("frozen", "unused")
                                                               for m in ASYNC_MODES] + [(n, SHARDED) for n in SHARDED_CASES]
        jobs = {key: client.submit(spec(*key)) for key in everything if key in wanted}
        out = {}
        for key, job in jobs.items():
            info = job.wait(timeout=300)
            path = tmp / f"{job.id}.safetensors"
            client.pull_checkpoint(job.id, path)
            out[key] = (info, path)
        return out


# ------------------------------------------------------------------ plain PyTorch


def _build(zoo: Any, case: Case) -> nn.Module:
    torch.manual_seed(SEED)
    return getattr(zoo, case.model.split(":")[1])()


def _data(zoo: Any, case: Case) -> tuple[Any, Any]:
    if case.dataset == "digits":
        from gradhub.worker.data import digits

        return digits()
    return getattr(zoo, case.dataset.split(":")[1])()


def _forward_loss(model: nn.Module, case: Case, x: Any, y: Any) -> tuple[Any, torch.Tensor]:
    out = model(**x) if isinstance(x, dict) else model(x)
    if case.extra.get("loss") == "model":
        return out, out.loss
    return out, nn.functional.cross_entropy(out, y)


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Compute as the workers do: Ray runs a worker of 0.5 CPUs with one intra-op thread, and
    the thread count decides the summation order of reductions. With Adam, a gradient that is
    mathematically zero (a bias right before BatchNorm) is rounding noise that the update
    amplifies, so only the same order gives the same numbers."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@one_thread()
def reference(zoo: Any, name: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], bool]:
    """Plain PyTorch on each worker's shard of every step, as DDP computes it. Returns the final
    state_dict, the initial one, and whether clipping ever cut the gradient."""
    case = CASES[name]
    model = _build(zoo, case)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    hyper = {k: v for k, v in case.optimizer.items() if k not in ("name", "lr", "param_groups")}
    cls = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[case.optimizer["name"]]
    opt = cls(case.groups(model) if case.groups else trainable, lr=case.optimizer["lr"], **hyper)
    train, _ = _data(zoo, case)
    k = case.extra.get("accumulate", 1)
    bf16 = case.extra.get("precision") == "bf16"
    clipped = False
    buffer_mode = case.extra.get("buffers", "broadcast")
    own = [{n: b.clone() for n, b in model.named_buffers()} for _ in range(WORKERS)]  # "local"
    for step in range(STEPS):
        job_buffers = {n: b.clone() for n, b in model.named_buffers()}
        grads: list[list[torch.Tensor | None]] = []
        after: list[dict[str, torch.Tensor]] = []
        for rank in range(WORKERS):
            with torch.no_grad():  # a worker starts the step from the job's buffers, or its own
                for n, b in model.named_buffers():
                    b.copy_(own[rank][n] if buffer_mode == "local" else job_buffers[n])
            x, y = get_batch(train, worker_batch_indices(len(train), BATCH, WORKERS, rank, SEED, step))
            opt.zero_grad()
            torch.manual_seed(step_seed(SEED, rank, step))
            for i in range(k):
                part = slice(i * BATCH // k, (i + 1) * BATCH // k)
                xi = {key: v[part] for key, v in x.items()} if isinstance(x, dict) else x[part]
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    _, loss = _forward_loss(model, case, xi, y[part])
                (loss / k if k > 1 else loss).backward()
            grads.append([None if p.grad is None else p.grad.clone() for p in trainable])
            after.append({n: b.clone() for n, b in model.named_buffers()})
        for i, p in enumerate(trainable):
            per_rank = [g[i] for g in grads]
            if all(g is None for g in per_rank):
                p.grad = None  # no worker's gradient reached it: torch.optim leaves it alone
                continue
            total = torch.zeros_like(p)
            for g in per_rank:
                if g is not None:
                    total += g
            p.grad = total / WORKERS
        if "clip_grad_norm" in case.extra:
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), case.extra["clip_grad_norm"])
            clipped |= bool(norm > case.extra["clip_grad_norm"])
        opt.step()
        own = after
        with torch.no_grad():  # the job's buffers: rank 0's, or the mean of floating ones
            for n, b in model.named_buffers():
                if buffer_mode == "average" and b.dtype.is_floating_point:
                    b.copy_(sum((a[n].double() for a in after), torch.zeros((), dtype=torch.float64)) / WORKERS)
                else:
                    b.copy_(after[0][n])
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, init, clipped


def evaluate(zoo: Any, name: str, model: nn.Module) -> dict[str, float]:
    """The validation loss and accuracy of ``model`` in plain PyTorch (one batch: 360 samples)."""
    case = CASES[name]
    _, val = _data(zoo, case)
    x, y = get_batch(val, range(len(val))) if case.dataset == "digits" else \
        default_collate([val[i] for i in range(len(val))])
    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16,
                                         enabled=case.extra.get("precision") == "bf16"):
        out, loss = _forward_loss(model, case, x, y)
    logits = out.logits if hasattr(out, "logits") else out
    return {"val_loss": float(loss), "val_accuracy": int((logits.argmax(1) == y).sum()) / len(y)}


# ------------------------------------------------------------------ the tests


@pytest.mark.parametrize("job", jobs([(name, mode) for name in CASES for mode in MODES]))
def test_equals_plain_pytorch_and_the_checkpoint_loads_strictly(zoo, finished, job):
    _equals_plain_pytorch(zoo, finished, *job)


@pytest.mark.parametrize("job", jobs([(name, SHARDED) for name in SHARDED_CASES]))
def test_a_sharded_parameter_server_equals_plain_pytorch(zoo, finished, job):
    """Two shard processes and the server's control store: the checkpoint merged from them is
    the model's whole state (buffers, frozen and tied parameters included) and equals plain
    PyTorch's."""
    _equals_plain_pytorch(zoo, finished, *job)


def _equals_plain_pytorch(zoo: Any, finished: dict[tuple[str, str], tuple[Any, Path]], name: str,
                          mode: str) -> None:
    info, path = finished[(name, mode)]
    assert info.state == "SUCCEEDED", info.reason
    assert info.step == STEPS
    expected, init, clipped = reference(zoo, name)
    got = load_file(path)
    assert got.keys() == expected.keys(), "the checkpoint is the model's whole state_dict"
    for key, want in expected.items():
        assert got[key].dtype == want.dtype, key
    worst = max(float((got[k].double() - expected[k].double()).abs().max()) for k in expected)
    assert worst <= 1e-5, f"max |gradhub - pytorch| = {worst:.3g} for {name} in {mode}"
    moved = max(float((expected[k].double() - init[k].double()).abs().max()) for k in init)
    assert moved > 1e-2, "training moved the state: the comparison is not between two inits"
    if "clip_grad_norm" in CASES[name].extra:
        assert clipped, "the clipping bound was never reached: the case would not test clipping"

    # strictly into a fresh model, and it evaluates to what the job reported
    model = _build(zoo, CASES[name])
    model.load_state_dict(got)  # strict
    if CASES[name].model != "gh_zoo:tied_lm":  # (safetensors' own loader: strict where nothing is tied)
        load_model(_build(zoo, CASES[name]), path)
    metrics = evaluate(zoo, name, model)
    assert abs(metrics["val_loss"] - info.metrics["val_loss"]) <= 1e-5
    assert metrics["val_accuracy"] == pytest.approx(info.metrics["val_accuracy"], abs=1e-9)


@pytest.mark.parametrize("job", jobs([("frozen", mode) for mode in MODES + ASYNC_MODES + (SHARDED,)]))
def test_frozen_parameters_stay_bit_identical(zoo, finished, job):
    _, path = finished[job]
    got, init = load_file(path), _build(zoo, CASES["frozen"]).state_dict()
    for key in ("0.0.weight", "0.0.bias", "0.1.weight", "0.1.bias"):
        assert torch.equal(got[key], init[key]), key
    # the frozen backbone's BatchNorm statistics are buffers: they still follow rank 0's batches
    assert not torch.equal(got["0.1.running_mean"], init["0.1.running_mean"])
    assert int(got["0.1.num_batches_tracked"]) == STEPS


@pytest.mark.parametrize("job", jobs([("unused", mode) for mode in MODES + ASYNC_MODES]))
def test_an_unused_parameter_is_not_updated(zoo, finished, job):
    _, path = finished[job]
    got, init = load_file(path), _build(zoo, CASES["unused"]).state_dict()
    assert torch.equal(got["pooler.weight"], init["pooler.weight"])  # no weight decay either
    assert torch.equal(got["pooler.bias"], init["pooler.bias"])
    assert not torch.equal(got["classifier.weight"], init["classifier.weight"])


@pytest.mark.parametrize("job", jobs([("tied", mode) for mode in (*MODES, SHARDED)]))
def test_tied_weights_stay_tied_and_load_with_safetensors(zoo, finished, job):
    _, path = finished[job]
    got = load_file(path)
    assert torch.equal(got["head.weight"], got["embed.weight"])
    model = _build(zoo, CASES["tied"])
    # safetensors' own loader drops one name of a tied pair and so reports the other as
    # unexpected; the tensor itself loads
    missing, unexpected = load_model(model, path, strict=False)
    assert not missing and len(unexpected) == 1 and set(unexpected) <= {"head.weight", "embed.weight"}
    assert model.head.weight is model.embed.weight and torch.equal(model.embed.weight, got["embed.weight"])


@pytest.mark.parametrize("job", jobs([("dict_inputs", mode) for mode in MODES]))
def test_dict_inputs_report_the_user_metric(finished, job):
    info, _ = finished[job]
    assert 0.0 < info.metrics["val_top2"] <= 1.0 and info.metrics["val_top2"] >= info.metrics["val_accuracy"]


@pytest.mark.parametrize("pair", tiered(CASES, {name for name, mode in DEFAULT_JOBS if mode == "allreduce"}))
def test_ps_sync_and_allreduce_agree(finished, pair):
    a, b = load_file(finished[(pair, "ps-sync")][1]), load_file(finished[(pair, "allreduce")][1])
    worst = max(float((a[k].double() - b[k].double()).abs().max()) for k in a)
    assert worst <= 1e-5, f"{pair}: ps-sync and allreduce differ by {worst:.3g}"
