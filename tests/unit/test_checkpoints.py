"""Unit tests of CheckpointStore: round trips against plain PyTorch, atomicity, pruning, errors."""

from __future__ import annotations

import hashlib
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import safetensors
import torch
from safetensors.torch import load_file
from torch import nn

from gradhub.proto.contract.errors import GradhubError, NotFoundError
from gradhub.server.checkpoints import CheckpointInfo, CheckpointStore, LoadedCheckpoint


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))


def _params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in model.state_dict().items()}


def _flat_views(model: nn.Module) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The parameters as views into one flat buffer, the way a parameter server holds them."""
    sd = model.state_dict()
    flat = torch.cat([v.reshape(-1) for v in sd.values()])
    views, offset = {}, 0
    for k, v in sd.items():
        views[k] = flat[offset : offset + v.numel()].view(v.shape)
        offset += v.numel()
    return flat, views


@pytest.fixture
def store(tmp_path: Path) -> CheckpointStore:
    return CheckpointStore(tmp_path / "ckpts")


def test_round_trip_of_shared_buffer_views_into_a_fresh_module(store: CheckpointStore) -> None:
    model = _model(0)
    _, views = _flat_views(model)
    info = store.save("job-1", step=5, version=7, params=views)

    assert isinstance(info, CheckpointInfo)
    assert (info.job_id, info.step, info.version) == ("job-1", 5, 7)
    assert info.path == store.root / "job-1" / "ckpt-0000000005.safetensors"
    assert store.model_path(info) == info.path
    assert info.size_bytes == info.path.stat().st_size
    assert info.sha256 == hashlib.sha256(info.path.read_bytes()).hexdigest()

    fresh = _model(1)
    fresh.load_state_dict(load_file(info.path), strict=True)  # plain PyTorch + safetensors
    for k, v in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k

    loaded = store.load("job-1", 5)
    assert isinstance(loaded, LoadedCheckpoint)
    assert loaded.info == info
    assert loaded.optimizer_state is None and loaded.scheduler_state is None
    assert loaded.params.keys() == model.state_dict().keys()
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.params[k], v), k


def test_safetensors_metadata_and_manifest(store: CheckpointStore) -> None:
    info = store.save("j", step=12, version=3, params=_params(_model()))
    with safetensors.safe_open(str(info.path), framework="pt") as f:
        assert f.metadata() == {"job_id": "j", "step": "12", "version": "3"}
    manifest = json.loads(info.path.with_name("ckpt-0000000012.json").read_text())
    assert manifest["job_id"] == "j" and manifest["step"] == 12 and manifest["version"] == 3
    assert manifest["sha256"] == info.sha256 and manifest["size_bytes"] == info.size_bytes
    assert manifest["created_at"] == info.created_at
    assert manifest["optimizer"] is None and manifest["scheduler"] is None


def test_odd_dtypes_and_shapes_round_trip(store: CheckpointStore) -> None:
    params = {
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4),
        "count": torch.tensor(17, dtype=torch.int64),
        "mask": torch.tensor([True, False, True]),
        "half": torch.randn(3, 2, dtype=torch.bfloat16),
        "strided": torch.arange(12.0).view(3, 4).t(),  # not contiguous
    }
    store.save("j", 1, 1, params)
    loaded = store.load("j").params
    for k, v in params.items():
        assert loaded[k].dtype == v.dtype and torch.equal(loaded[k], v), k


def _train(model: nn.Module, opt: torch.optim.Optimizer, sched, steps: int, seed: int) -> list:
    gen = torch.Generator().manual_seed(seed)
    lrs = []
    for _ in range(steps):
        x, y = torch.randn(4, 6, generator=gen), torch.randn(4, 3, generator=gen)
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        if sched is not None:
            sched.step()
            lrs.append(sched.get_last_lr())
    return lrs


def _sched_factories():
    lr_sched = torch.optim.lr_scheduler
    return {
        "none": None,
        "step": lambda o: lr_sched.StepLR(o, step_size=3, gamma=0.5),
        "cosine": lambda o: lr_sched.CosineAnnealingLR(o, T_max=7, eta_min=1e-4),
        "linear": lambda o: lr_sched.LinearLR(o, start_factor=0.2, total_iters=5),
        "sequential": lambda o: lr_sched.SequentialLR(
            o,
            [lr_sched.LinearLR(o, start_factor=0.1, total_iters=3),
             lr_sched.CosineAnnealingLR(o, T_max=8)],
            milestones=[3],
        ),
    }  # fmt: skip


_OPTIMIZERS = {
    "adam": lambda p: torch.optim.Adam(p, lr=1e-2, betas=(0.8, 0.95), weight_decay=1e-3),
    "adamw-amsgrad": lambda p: torch.optim.AdamW(p, lr=1e-2, amsgrad=True),
    "sgd-momentum": lambda p: torch.optim.SGD(p, lr=5e-2, momentum=0.9, nesterov=True),
    "sgd-plain": lambda p: torch.optim.SGD(p, lr=5e-2),  # momentum_buffer None -> JSON
}


@pytest.mark.parametrize("opt_name", sorted(_OPTIMIZERS))
@pytest.mark.parametrize("sched_name", sorted(_sched_factories()))
def test_exact_resume_of_optimizer_and_scheduler(
    store: CheckpointStore, opt_name: str, sched_name: str
) -> None:
    make_opt, make_sched = _OPTIMIZERS[opt_name], _sched_factories()[sched_name]
    model = _model(0)
    opt = make_opt(model.parameters())
    sched = make_sched(opt) if make_sched else None
    _train(model, opt, sched, steps=4, seed=1)
    store.save(
        "job", step=4, version=4, params=_params(model),
        optimizer_state=opt.state_dict(),
        scheduler_state=None if sched is None else sched.state_dict(),
    )  # fmt: skip

    loaded = store.load("job")
    model2 = _model(99)
    model2.load_state_dict(loaded.params, strict=True)
    opt2 = make_opt(model2.parameters())
    sched2 = make_sched(opt2) if make_sched else None
    opt2.load_state_dict(loaded.optimizer_state)
    if sched2 is not None:
        sched2.load_state_dict(loaded.scheduler_state)
        assert sched2.state_dict() == sched.state_dict()
    assert repr(opt2.state_dict()["param_groups"]) == repr(opt.state_dict()["param_groups"])

    lrs1 = _train(model, opt, sched, steps=9, seed=2)
    lrs2 = _train(model2, opt2, sched2, steps=9, seed=2)
    assert lrs1 == lrs2
    for (k, a), b in zip(model.state_dict().items(), model2.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


def test_optimizer_tensors_live_in_optim_file_under_state_keys(store: CheckpointStore) -> None:
    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    _train(model, opt, None, steps=1, seed=0)
    info = store.save("j", 1, 1, _params(model), optimizer_state=opt.state_dict())
    optim = load_file(info.path.with_name("ckpt-0000000001.optim.safetensors"))
    assert {"state.0.exp_avg", "state.0.exp_avg_sq", "state.0.step", "state.3.exp_avg"} <= set(
        optim
    )
    manifest = json.loads(info.path.with_name("ckpt-0000000001.json").read_text())
    assert manifest["optimizer"]["param_groups"][0]["lr"] == 1e-3
    assert isinstance(store.load("j").optimizer_state["param_groups"][0]["betas"], tuple)


def test_scheduler_state_with_infinity_round_trips(store: CheckpointStore) -> None:
    opt = torch.optim.SGD(_model().parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt)  # best = inf
    store.save("j", 1, 1, {}, scheduler_state=sched.state_dict())
    json.loads(  # strict JSON, no bare Infinity
        store.root.joinpath("j", "ckpt-0000000001.json").read_text(),
        parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"),
    )
    assert store.load("j").scheduler_state == sched.state_dict()


def test_list_latest_get_and_keep(store: CheckpointStore) -> None:
    assert store.list("job") == [] and store.latest("job") is None
    params = _params(_model())
    for step in (30, 10, 20):
        store.save("job", step, step // 10, params)
    assert [i.step for i in store.list("job")] == [10, 20, 30]
    assert store.latest("job").step == 30
    assert store.get("job").step == 30 and store.get("job", 20).version == 2

    store.save("job", 40, 4, params, keep=2)
    assert [i.step for i in store.list("job")] == [30, 40]
    assert sorted(p.name for p in (store.root / "job").iterdir()) == [
        "ckpt-0000000030.json", "ckpt-0000000030.safetensors",
        "ckpt-0000000040.json", "ckpt-0000000040.safetensors",
    ]  # fmt: skip
    store.prune("job", keep=1)
    assert [i.step for i in store.list("job")] == [40]
    store.prune("job", keep=0)
    assert store.list("job") == []


def test_resaving_a_step_replaces_it(store: CheckpointStore) -> None:
    store.save("j", 5, 1, {"w": torch.zeros(3)})
    info = store.save("j", 5, 2, {"w": torch.ones(3)})
    assert [i.version for i in store.list("j")] == [2]
    assert torch.equal(store.load("j", 5).params["w"], torch.ones(3)) and info.version == 2
    assert {p.name for p in (store.root / "j").iterdir()} == {"ckpt-0000000005.json", info.path.name}


def test_a_resave_that_fails_midway_keeps_the_old_checkpoint(store: CheckpointStore, monkeypatch) -> None:
    """Saving a step again never leaves it without a checkpoint: the new files are written
    beside the old ones and the manifest is replaced in one rename."""
    from gradhub.server import checkpoints

    store.save("j", 5, 1, {"w": torch.zeros(3)}, optimizer_state={"state": {}, "param_groups": []})

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoints, "_write_safetensors", full_disk)
    with pytest.raises(OSError):
        store.save("j", 5, 2, {"w": torch.ones(3)})
    monkeypatch.undo()
    assert [i.version for i in store.list("j")] == [1]
    assert torch.equal(store.load("j", 5).params["w"], torch.zeros(3))


def test_leftovers_of_a_crashed_save_are_ignored_then_cleaned(store: CheckpointStore) -> None:
    params = _params(_model())
    store.save("job", 1, 1, params)
    job_dir = store.root / "job"
    # A crash after the model file but before the manifest, and one mid-write of a temp file.
    orphan = job_dir / "ckpt-0000000002.safetensors"
    orphan.write_bytes((job_dir / "ckpt-0000000001.safetensors").read_bytes())
    (job_dir / "ckpt-0000000002.optim.safetensors").write_bytes(b"partial")
    tmp = job_dir / ".ckpt-0000000002.json.abc123.tmp"
    tmp.write_bytes(b'{"truncated')

    assert [i.step for i in store.list("job")] == [1]
    assert store.latest("job").step == 1
    with pytest.raises(NotFoundError):
        store.get("job", 2)

    store.save("job", 3, 3, params)
    names = sorted(p.name for p in job_dir.iterdir())
    assert names == [
        "ckpt-0000000001.json", "ckpt-0000000001.safetensors",
        "ckpt-0000000003.json", "ckpt-0000000003.safetensors",
    ]  # fmt: skip

    orphan.write_bytes(b"x")
    store.prune("job", keep=5)
    assert not orphan.exists()


def test_failed_save_leaves_no_files(store: CheckpointStore, monkeypatch) -> None:
    store.save("job", 1, 1, {"w": torch.zeros(2)})
    import gradhub.server.checkpoints as mod

    def boom(path, produce):
        raise OSError("disk full")

    monkeypatch.setattr(mod, "_atomic_write", boom)
    with pytest.raises(OSError):
        store.save("job", 2, 2, {"w": torch.zeros(2)})
    monkeypatch.undo()
    assert [i.step for i in store.list("job")] == [1]


def test_unsupported_state_fails_before_touching_disk(store: CheckpointStore) -> None:
    with pytest.raises(TypeError, match="param_groups.0.fn"):
        store.save(
            "job", 1, 1, {}, optimizer_state={"state": {}, "param_groups": [{"fn": object()}]}
        )
    assert not (store.root / "job").exists()


def test_not_found_errors_name_job_and_available_steps(store: CheckpointStore) -> None:
    with pytest.raises(NotFoundError, match="job 'ghost' has no checkpoints"):
        store.get("ghost")
    with pytest.raises(NotFoundError, match="ghost"):
        store.load("ghost")
    store.save("job", 10, 1, {"w": torch.zeros(1)})
    store.save("job", 20, 1, {"w": torch.zeros(1)})
    with pytest.raises(NotFoundError) as err:
        store.get("job", 15)
    assert str(err.value) == "job 'job' has no checkpoint at step 15; available steps: [10, 20]"
    assert isinstance(err.value, GradhubError)


@pytest.mark.parametrize("bad", ["", "..", ".", "../etc", "a/b", ".hidden", "a b", "x" * 129])
def test_invalid_job_ids_are_rejected(store: CheckpointStore, bad: str) -> None:
    with pytest.raises(ValueError, match="job_id"):
        store.save(bad, 1, 1, {"w": torch.zeros(1)})
    with pytest.raises(GradhubError):
        store.list(bad)
    with pytest.raises(GradhubError):
        store.delete_job(bad)


def test_invalid_arguments(store: CheckpointStore) -> None:
    with pytest.raises(ValueError, match="step"):
        store.save("j", -1, 0, {})
    with pytest.raises(ValueError, match="keep"):
        store.save("j", 1, 0, {}, keep=0)
    with pytest.raises(ValueError, match="keep"):
        store.prune("j", keep=-1)


def test_iter_bytes_streams_the_model_file(store: CheckpointStore) -> None:
    info = store.save("j", 1, 1, _params(_model()))
    chunks = list(store.iter_bytes(info, chunk_size=100))
    assert all(len(c) == 100 for c in chunks[:-1]) and 0 < len(chunks[-1]) <= 100
    assert b"".join(chunks) == info.path.read_bytes()
    store.delete_job("j")
    with pytest.raises(NotFoundError):
        store.iter_bytes(info)


def test_delete_job(store: CheckpointStore) -> None:
    store.save("a", 1, 1, {"w": torch.zeros(1)})
    store.save("b", 1, 1, {"w": torch.zeros(1)})
    store.delete_job("a")
    store.delete_job("a")  # idempotent
    assert store.list("a") == [] and not (store.root / "a").exists()
    assert [i.step for i in store.list("b")] == [1]


def test_concurrent_saves_with_keep(store: CheckpointStore) -> None:
    params = _params(_model())

    def worker(offset: int) -> None:
        for i in range(10):
            store.save("job", offset + i * 4, 1, params, keep=3)
            store.list("job")

    with ThreadPoolExecutor(4) as pool:
        for future in [pool.submit(worker, k) for k in range(4)]:
            future.result()  # re-raises a worker's error
    assert [i.step for i in store.list("job")] == [37, 38, 39]
    assert len(list((store.root / "job").iterdir())) == 6
