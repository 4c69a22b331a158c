"""worker/collective.py: interface lookup, failure classification, the DDP all-reduce hook in a
real single-process Gloo group (compared with a plain copy of the model) and in a real
three-process one (summing in rank order whatever the bucket layout), and the state a group's
source rank shares with a fresh member, in a real two-process group."""

from __future__ import annotations

import copy
import gc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from gradhub.server.rendezvous import RendezvousStore
from gradhub.worker.collective import (
    AllReduceHook,
    ProcessGroup,
    broadcast_state,
    interface_of,
    is_collective_failure,
)


# ----------------------------------------------------------------- interfaces
def test_interface_of_loopback() -> None:
    name = interface_of("127.0.0.1")
    assert name is not None and name.startswith("lo")


def test_interface_of_an_address_not_on_this_machine() -> None:
    assert interface_of("192.0.2.1") is None  # TEST-NET-1, never assigned


# ------------------------------------------------------------- classification
@pytest.mark.parametrize(
    "error",
    [
        dist.DistError("store timed out"),
        dist.DistBackendError("NCCL communicator was aborted"),
        RuntimeError(
            "[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Read error "
            "[10.0.0.2]:1234: Connection reset by peer"
        ),
        RuntimeError("Connection closed by peer [127.0.0.1]:29500"),
    ],
)
def test_collective_failures(error: BaseException) -> None:
    assert is_collective_failure(error)


@pytest.mark.parametrize(
    "error",
    [
        ValueError("gloo"),  # not a RuntimeError: the model or data, whatever it says
        RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x3 and 4x2)"),
        KeyError("Connection reset"),
    ],
)
def test_not_collective_failures(error: BaseException) -> None:
    assert not is_collective_failure(error)


# ------------------------------------------------------- the all-reduce hook
@pytest.fixture
def group() -> Iterator[ProcessGroup]:
    """A real one-process Gloo group on a free port; destroyed even when the test fails."""
    assert not dist.is_initialized(), "a process group leaked from an earlier test"
    store = RendezvousStore()
    try:
        with ProcessGroup(("127.0.0.1", store.port(), store.prefix("j-test", 1)), 0, 1, "gloo", 30) as pg:
            assert dist.is_initialized() and dist.get_world_size() == 1
            yield pg
        assert not dist.is_initialized()
    finally:
        store.close()


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))


def _grads(
    dtype: torch.dtype | None,
) -> tuple[AllReduceHook, list[torch.Tensor], list[torch.Tensor]]:
    """(hook, DDP's gradients, a plain copy's gradients) after two identical steps' backward."""
    plain = _model()
    ddp = DistributedDataParallel(copy.deepcopy(plain))
    hook = AllReduceHook(dtype)
    ddp.register_comm_hook(None, hook.hook)
    torch.manual_seed(1)
    for _ in range(2):  # the second step runs on DDP's rebuilt buckets
        x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
        for m in (plain, ddp):
            m.zero_grad()
            nn.functional.cross_entropy(m(x), y).backward()
    return (hook, [p.grad for p in ddp.module.parameters()], [p.grad for p in plain.parameters()])


def test_hook_without_compression_gives_exactly_the_local_gradients(group: ProcessGroup) -> None:
    _, got, want = _grads(None)
    assert all(g is not None for g in got)
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g, w)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_hook_with_compression_sends_the_gradients_rounded(
    group: ProcessGroup, dtype: torch.dtype
) -> None:
    _, got, want = _grads(dtype)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, w, rtol=1e-2, atol=1e-3)
        # one rank, divided by 1: exactly the float32 gradient rounded to the wire dtype
        assert torch.equal(g, w.to(dtype).to(torch.float32))


def test_take_seconds_times_one_step_then_resets(group: ProcessGroup) -> None:
    hook, _, _ = _grads(None)
    assert hook.take_seconds() > 0.0
    assert hook.take_seconds() == 0.0


def test_take_seconds_before_any_step_is_zero() -> None:
    assert AllReduceHook().take_seconds() == 0.0


def _ordered(rank: int, port: int, out: str, device: str = "cpu") -> None:
    """Rank ``rank`` of 3: its DDP gradients with one bucket and with a bucket per parameter, and
    the rank-order sum of every rank's local gradient (each rank computes them all locally), on
    ``device`` (CUDA: three ranks sharing one GPU through Gloo, as fractional ``gpus`` do)."""
    def batch(r: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(100 + r)
        x, y = torch.randn(8, 6, generator=g) * 10 ** r, torch.randint(0, 3, (8,), generator=g)
        return x.to(device), y.to(device)

    def local(r: int) -> list[torch.Tensor]:
        m = _model().to(device)
        x, y = batch(r)
        nn.functional.cross_entropy(m(x), y).backward()
        return [p.grad / 3 for p in m.parameters()]

    want = [a + b + c for a, b, c in zip(local(0), local(1), local(2), strict=True)]
    got = {}
    with ProcessGroup(("127.0.0.1", port, "j-ordered/1/"), rank, 3, "gloo", 30):
        for name, cap in (("one", 25.0), ("many", 1e-6)):
            ddp = DistributedDataParallel(_model().to(device), bucket_cap_mb=cap)
            ddp.register_comm_hook(None, AllReduceHook().hook)
            x, y = batch(rank)
            nn.functional.cross_entropy(ddp(x), y).backward()
            got[name] = [p.grad.clone() for p in ddp.module.parameters()]
            del ddp  # its Reducer goes while the group lives (one outliving the group may abort the process)
            gc.collect()
    torch.save({"want": want, **got}, f"{out}/{rank}.pt")


def _spawn(fn: Any, ranks: int, out: Path, *args: Any) -> list[dict[str, Any]]:
    """Run ``fn(rank, store_port, out, *args)`` in ``ranks`` spawned processes; what each saved."""
    import torch.multiprocessing as mp

    store = RendezvousStore()
    try:
        mp.start_processes(fn, args=(store.port(), str(out), *args), nprocs=ranks, start_method="spawn")
    finally:
        store.close()
    return [torch.load(out / f"{r}.pt") for r in range(ranks)]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[
    pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")])])
def test_three_ranks_sum_in_rank_order_whatever_the_buckets(tmp_path, device: str) -> None:
    for rank, r in enumerate(_spawn(_ordered, 3, tmp_path, device)):
        for one, many, want in zip(r["one"], r["many"], r["want"], strict=True):
            assert torch.equal(one, want) and torch.equal(many, want), rank


# ------------------------------------------------------------ sharing state
def _trained() -> tuple[nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    model = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.Linear(16, 3))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 2)
    return model, optimizer, scheduler


def _share(rank: int, port: int, out: str) -> None:
    """Rank 0 trains 3 steps and shares its state; rank 1, fresh, takes it and saves what it got."""
    from gradhub.worker.allreduce import capture, restore

    torch.manual_seed(0)
    model, optimizer, scheduler = _trained()
    if rank == 0:
        for _ in range(3):
            optimizer.zero_grad()
            model(torch.randn(8, 6)).sum().backward()
            optimizer.step()
            scheduler.step()
    with ProcessGroup(("127.0.0.1", port, "j-share/1/"), rank, 2, "gloo", 30):
        state = broadcast_state(capture(3, model, optimizer, scheduler) if rank == 0 else None, 0,
                                torch.device("cpu"))
    restore(state, model, optimizer, scheduler)
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "step": state.step}, f"{out}/{rank}.pt")


def test_a_fresh_member_takes_the_whole_state_of_the_source(tmp_path) -> None:
    source, fresh = _spawn(_share, 2, tmp_path)
    assert fresh["step"] == 3
    for k, v in source["model"].items():
        assert torch.equal(v, fresh["model"][k]), k  # BatchNorm's running stats and counter too
    assert fresh["scheduler"] == source["scheduler"]
    for pid, st in source["optimizer"]["state"].items():
        for k, v in st.items():
            assert torch.equal(v, fresh["optimizer"]["state"][pid][k]), (pid, k)
    assert fresh["optimizer"]["param_groups"] == source["optimizer"]["param_groups"]


def test_the_rendezvous_store_listens_only_where_the_server_does() -> None:
    import socket

    store = RendezvousStore("127.0.0.1")
    try:
        port = store.port()
        with socket.socket() as s:  # another address of this machine (all of 127/8 is loopback)
            s.settimeout(2)
            assert s.connect_ex(("127.0.0.2", port)) != 0, "the store answers on 127.0.0.2"
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            pass
    finally:
        store.close()
    every = RendezvousStore("0.0.0.0")  # a server bound to every interface: the store too
    try:
        with socket.create_connection(("127.0.0.2", every.port()), timeout=2):
            pass
    finally:
        every.close()
