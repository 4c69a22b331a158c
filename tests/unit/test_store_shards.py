"""A sharded parameter server's stores (``ps_shards: K``: the control store, which holds no
trainable value, and K shards, each over its slice; ``count`` here is K + 1 stores) take the
unsharded store's steps bit for bit; their checkpoints merge into the unsharded store's
checkpoint; a job resumes from that checkpoint with another K and ends where an undisturbed
run ends; and a job that clips its gradient takes the unsharded store's clipped steps, with
the norm over every shard that the workers relay; in ps-async and ps-ssp every shard takes a
checkpoint with the same pushes."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from gradhub.proto.codec import Layout
from gradhub.proto.contract.errors import ProtocolError, StateError
from gradhub.proto.model_state import ModelLayout, TensorSpec
from gradhub.proto.shards import shards_of
from gradhub.proto.v1 import tensor_pb2
from gradhub.server.shard_set import merge_states, resume_slices
from gradhub.server.store import CheckpointState, ParameterStore, StoreConfig

TRAINABLE = Layout(("w", "b", "v"), ((3, 4), (3,), (5,)))
MODEL = ModelLayout(TRAINABLE, frozen=Layout(("f",), ((4,),)),
                    buffers=(TensorSpec("mean", torch.float32, (3,)),), aliases={"w_tied": "w"})
STEPS, WORKERS, EVERY = 10, 2, 4
CONFIG = StoreConfig("job", "ps-sync", WORKERS, optimizer="adamw", lr=0.05, hyper={"weight_decay": 0.1},
                     checkpoint_every=EVERY, param_groups=({"params": ["b"], "lr": 0.01},),
                     schedule={"name": "cosine"})


def _grad(step: int, rank: int) -> torch.Tensor:
    return torch.randn(TRAINABLE.numel, generator=torch.Generator().manual_seed(100 * step + rank))


def _stores(count: int, kept: list[list[CheckpointState]], resume: CheckpointState | None = None,
            config: StoreConfig = CONFIG, sliced: bool = False) -> list[ParameterStore]:
    """``count`` shards' stores, initialized as worker 0 does (``resume``: from that checkpoint,
    which shards 1 to count - 1 get as their slices with ``sliced``, as the server sends them)."""
    stores = []
    init = torch.randn(TRAINABLE.numel, generator=torch.Generator().manual_seed(0))
    slices = resume_slices(resume, TRAINABLE, config.param_groups, count) if sliced and resume else []
    for k in range(count):
        kept.append([])
        store = ParameterStore(dataclasses.replace(config, shard=k, shards=count), on_checkpoint=kept[k].append)
        if resume is not None:
            store.resume_from(slices[k - 1] if k and slices else resume, STEPS)
        else:
            store.set_total_steps(STEPS)
        for rank in range(WORKERS):
            store.register(rank)
        shard = shards_of(TRAINABLE, count)[k] if count > 1 else None
        part = init if shard is None else init[shard.lo:shard.hi]
        frozen = torch.full((4,), 7.0) if k == 0 else None
        assert store.initialize(MODEL, part, frozen, {"mean": torch.zeros(3)})
        stores.append(store)
    return stores


def _train(stores: list[ParameterStore], start: int, end: int) -> None:
    count = len(stores)
    cuts = shards_of(TRAINABLE, count)
    for step in range(start, end):
        for rank in range(WORKERS):
            grad = _grad(step, rank)
            unused = [2] if step == 3 else []  # "v" got no gradient at step 3
            for k, store in enumerate(stores):
                s = cuts[k]
                buffers = {"mean": torch.full((3,), float(step))} if k == 0 else None
                store.push(rank, step, step, grad[s.lo:s.hi], buffers, s.unused(unused))
        if count > 1 and stores[0].config.clip_grad_norm is not None:
            _relay_norm(stores, step)


def _relay_norm(stores: list[ParameterStore], step: int) -> None:
    """What each worker of a job that clips over shards does after its push: add the shards'
    sums of squares in shard order and send the total with its pull (every worker, here two)."""
    parts = [store.clip_part(step) for store in stores]
    assert all(p is not None for p in parts)
    total = 0.0
    for p in parts:
        total += p  # type: ignore[operator]
    for _ in range(WORKERS):  # the second worker's total is the same step's: ignored
        for store in stores:
            store.clip_total(step, total)


def _whole(stores: list[ParameterStore]) -> CheckpointState:
    own = stores[0].checkpoint_state()
    return own if len(stores) == 1 else merge_states(stores[0], own, [s.checkpoint_state() for s in stores[1:]])


def _assert_same(a: CheckpointState, b: CheckpointState) -> None:
    assert (a.step, a.version, a.clocks) == (b.step, b.version, b.clocks)
    assert a.params.keys() == b.params.keys()
    for name in a.params:
        assert torch.equal(a.params[name], b.params[name]), name
    assert a.optimizer_state["param_groups"] == b.optimizer_state["param_groups"]
    assert a.optimizer_state["state"].keys() == b.optimizer_state["state"].keys()
    for i, st in a.optimizer_state["state"].items():
        for key, value in st.items():
            assert torch.equal(value, b.optimizer_state["state"][i][key]), (i, key)
    assert a.scheduler_state == b.scheduler_state


@pytest.mark.parametrize("count", [3, 5], ids=["2-shards", "4-shards"])  # stores: the control and K
def test_shards_take_the_unsharded_steps_bit_for_bit(count: int) -> None:
    one_kept: list[list[CheckpointState]] = []
    one = _stores(1, one_kept)
    _train(one, 0, STEPS)
    kept: list[list[CheckpointState]] = []
    sharded = _stores(count, kept)
    _train(sharded, 0, STEPS)
    _assert_same(_whole(sharded), _whole(one))
    assert sorted(_whole(sharded).params) == ["b", "f", "mean", "v", "w", "w_tied"]
    # every shard took the periodic checkpoints at the same steps, and they merge into the whole one
    assert [[c.step for c in k] for k in kept] == [[c.step for c in one_kept[0]]] * count == [[4, 8]] * count
    for i in range(2):
        merged = merge_states(sharded[0], kept[0][i], [k[i] for k in kept[1:]])
        _assert_same(merged, one_kept[0][i])


@pytest.mark.parametrize("sliced", [False, True], ids=["whole", "sliced"])
@pytest.mark.parametrize(("before", "after"), [(3, 5), (5, 1), (1, 4), (2, 3)])  # stores
def test_a_checkpoint_resumes_with_another_count_and_ends_as_an_undisturbed_run(before: int, after: int,
                                                                                sliced: bool) -> None:
    """Each shard installs its slice of the whole checkpoint, or (``sliced``) the slice the
    server cut for it (``resume_slices``): the same state either way."""
    undisturbed = _stores(1, [])
    _train(undisturbed, 0, STEPS)
    kept: list[list[CheckpointState]] = []
    first = _stores(before, kept)
    _train(first, 0, 6)  # past the checkpoint at step 4
    parts = [k[0] for k in kept]
    checkpoint = parts[0] if before == 1 else merge_states(first[0], parts[0], parts[1:])
    assert checkpoint.step == 4
    resumed = _stores(after, [], resume=checkpoint, sliced=sliced)
    _train(resumed, 4, STEPS)
    _assert_same(_whole(resumed), _whole(undisturbed))


def test_a_slice_cut_for_another_shard_is_refused() -> None:
    kept: list[list[CheckpointState]] = []
    first = _stores(2, kept)
    _train(first, 0, 6)
    checkpoint = merge_states(first[0], kept[0][0], [kept[1][0]])
    store = ParameterStore(dataclasses.replace(CONFIG, shard=1, shards=2))
    store.resume_from(resume_slices(checkpoint, TRAINABLE, CONFIG.param_groups, 3)[0], STEPS)  # shard 1 of 3
    store.register(0)
    part = shards_of(TRAINABLE, 2)[1]
    with pytest.raises(ProtocolError, match="state: the checkpoint's slice for shard 1 of 3, this is shard 1 of 2"):
        store.initialize(MODEL, torch.zeros(part.hi - part.lo), None, None)


def test_states_of_different_steps_do_not_merge() -> None:
    stores = _stores(2, [])
    _train(stores, 0, 2)
    early = stores[1].checkpoint_state()
    _train(stores, 2, 3)
    with pytest.raises(StateError, match="versions"):
        merge_states(stores[0], stores[0].checkpoint_state(), [early])


@pytest.mark.parametrize("count", [3, 5], ids=["2-shards", "4-shards"])  # stores: the control and K
@pytest.mark.parametrize("max_norm", [0.5, 100.0])  # every step clipped; none
def test_shards_clip_as_the_unsharded_store_with_the_norm_over_every_shard(count: int, max_norm: float) -> None:
    config = dataclasses.replace(CONFIG, clip_grad_norm=max_norm)
    one = _stores(1, [], config=config)  # torch.nn.utils.clip_grad_norm_ over the whole gradient
    _train(one, 0, STEPS)
    sharded = _stores(count, [], config=config)
    _train(sharded, 0, STEPS)
    a, b = _whole(sharded), _whole(one)
    assert (a.step, a.version, a.clocks) == (b.step, b.version, b.clocks)
    for name, value in b.params.items():  # the norm is summed otherwise: equal to float32 rounding
        torch.testing.assert_close(a.params[name], value, rtol=1e-6, atol=1e-6, msg=name)
    unclipped = _stores(1, [])
    _train(unclipped, 0, STEPS)
    moved = (_whole(unclipped).params["w"] - b.params["w"]).abs().max()
    assert (moved > 1e-3) if max_norm < 1 else (moved == 0)  # the clipped case is a different run


def test_a_step_that_clips_over_shards_waits_for_its_norm() -> None:
    config = dataclasses.replace(CONFIG, clip_grad_norm=0.5)
    stores = _stores(3, [], config=config)  # the control store and two shards
    cuts = shards_of(TRAINABLE, 3)
    grads = [_grad(0, rank) for rank in range(WORKERS)]
    for k, store in enumerate(stores):
        store.push(0, 0, 0, grads[0][cuts[k].lo:cuts[k].hi], {"mean": torch.zeros(3)} if k == 0 else None)
        assert store.clip_part(0) is None  # worker 1's gradient is not in yet
    with pytest.raises(ProtocolError, match="clip_total_sq: step 0 is not held"):
        stores[1].clip_total(0, 1.0)
    for k, store in enumerate(stores):
        store.push(1, 0, 0, grads[1][cuts[k].lo:cuts[k].hi], {"mean": torch.zeros(3)} if k == 0 else None)
    parts = [store.clip_part(0) for store in stores]
    assert parts[0] == 0.0 and all(p is not None and p > 0 for p in parts[1:])  # the control holds no value
    total = parts[0] + parts[1] + parts[2]  # type: ignore[operator]
    mean = (grads[0] + grads[1]) / 2
    assert total == pytest.approx(float(mean.double().square().sum()), rel=1e-12)
    assert stores[1].version == 0 and stores[1].try_pull(0, 1, 1) is None  # held: no new parameters yet
    with pytest.raises(ProtocolError, match="clip_total_sq: .* not a sum over the shards"):
        stores[1].clip_total(0, parts[2] / 2)  # type: ignore[operator]
    stores[1].clip_total(0, total)
    assert stores[1].version == 1 and stores[2].version == 0  # each shard takes the step at its total
    stores[1].clip_total(0, total)  # a second worker's: ignored
    assert stores[1].version == 1 and stores[1].clip_part(0) == parts[1]  # asked again: the same part
    stores[0].clip_total(0, total)
    assert stores[0].version == 1  # the control store steps too (its schedule, its buffers)


def test_an_unsharded_job_takes_no_clip_total() -> None:
    store = _stores(1, [], config=dataclasses.replace(CONFIG, clip_grad_norm=1.0))[0]
    with pytest.raises(ProtocolError, match="does not clip its gradient over shards"):
        store.clip_total(0, 1.0)


def test_a_worker_that_died_between_its_pushes_to_two_shards_does_that_step_again_exactly() -> None:
    """Worker 0's push of step 5 reached shard 0 and not shard 1: shard 0 took the step, shard 1
    waits for it. Registered again, the worker is told the earlier step, pulls that step's
    parameters from both (shard 0's from before the step it took) and pushes it again."""
    undisturbed = _stores(2, [])
    _train(undisturbed, 0, 5)
    before = [s.try_pull(0, 5, tensor_pb2.FLOAT32) for s in undisturbed]
    values = [b.data.clone() for b in before if b is not None]  # a ps-sync pull reads the live parameters
    _train(undisturbed, 5, STEPS)
    stores = _stores(2, [])
    _train(stores, 0, 5)
    cuts = shards_of(TRAINABLE, 2)
    grads = [_grad(5, rank) for rank in range(WORKERS)]
    mean = {"mean": torch.full((3,), 5.0)}
    for k in (0, 1):
        stores[k].push(1, 5, 5, grads[1][cuts[k].lo:cuts[k].hi], mean if k == 0 else None)
    stores[0].push(0, 5, 5, grads[0][cuts[0].lo:cuts[0].hi], mean)  # and then worker 0 died
    assert (stores[0].version, stores[1].version) == (6, 5)
    assert [s.register(0)[1] for s in stores] == [6, 5]  # the control plane tells it the least: 5
    pulled = [s.try_pull(0, 5, tensor_pb2.FLOAT32) for s in stores]
    for got, want, value in zip(pulled, before, values, strict=True):
        assert got is not None and want is not None
        assert got.version == want.version == 5 and torch.equal(got.data, value)
        assert got.buffers == want.buffers  # shard 0's buffers of before the step too
    assert stores[0].push(0, 5, 5, grads[0][cuts[0].lo:cuts[0].hi], mean) == (False, 6)  # taken there
    assert stores[1].push(0, 5, 5, grads[0][cuts[1].lo:cuts[1].hi]) == (True, 6)
    _train(stores, 6, STEPS)
    _assert_same(_whole(stores), _whole(undisturbed))


def test_the_parameters_kept_before_a_step_hold_the_old_values_of_buckets_applied_early() -> None:
    """Shard 1 applies a bucket as soon as both workers' copies are in; worker 0 then dies after
    its pushes to shard 1 and before its push to the control store (store 0). The parameters shard 1 kept from
    before the step are the step's old ones, early bucket included."""
    config = dataclasses.replace(CONFIG, apply_buckets=True)
    undisturbed = _stores(2, [], config=config)
    _train(undisturbed, 0, 5)
    before = undisturbed[1].try_pull(0, 5, tensor_pb2.FLOAT32)
    assert before is not None
    value = before.data.clone()
    _train(undisturbed, 5, STEPS)
    stores = _stores(2, [], config=config)
    _train(stores, 0, 5)
    cut = shards_of(TRAINABLE, 2)[1]  # the one shard: w, b, v; store 0 is the control (no value)
    grads = [_grad(5, rank)[cut.lo:cut.hi] for rank in range(WORKERS)]
    nothing = torch.empty(0)
    stores[0].push(1, 5, 5, nothing, {"mean": torch.full((3,), 5.0)})
    for rank in (1, 0):
        assert stores[1].push(rank, 5, 5, grads[rank][12:], first=1, count=2)[0]  # b and v: applied once both are in
    for rank in (1, 0):
        assert stores[1].push(rank, 5, 5, grads[rank][:12], first=0, count=1)[0]  # w: the step is taken
    assert (stores[0].version, stores[1].version) == (5, 6)  # worker 0 died before its push to the control
    kept = stores[1].try_pull(0, 5, tensor_pb2.FLOAT32)
    assert kept is not None and kept.version == 5 and torch.equal(kept.data, value)
    assert [s.register(0)[1] for s in stores] == [5, 6]
    assert stores[0].push(0, 5, 5, nothing, {"mean": torch.full((3,), 5.0)}) == (True, 6)
    assert stores[1].push(0, 5, 5, grads[0]) == (False, 6)  # taken there
    _train(stores, 6, STEPS)
    _assert_same(_whole(stores), _whole(undisturbed))


@pytest.mark.parametrize("mode", ["ps-async", "ps-ssp"])
def test_async_shards_clip_each_push_by_its_whole_gradients_norm(mode: str) -> None:
    config = dataclasses.replace(CONFIG, mode=mode, clip_grad_norm=2.0, staleness=2)

    def run(count: int) -> list[ParameterStore]:
        stores = _stores(count, [], config=config)
        cuts = shards_of(TRAINABLE, count)
        for step in range(STEPS):
            for rank in range(WORKERS):
                grad = _grad(step, rank)
                norm_sq = float(grad.double().square().sum()) if count > 1 else None
                for k, store in enumerate(stores):
                    buffers = {"mean": torch.full((3,), float(step))} if k == 0 else None
                    assert store.push(rank, step, store.version, grad[cuts[k].lo:cuts[k].hi], buffers,
                                      norm_sq=norm_sq)[0]
        return stores

    one, sharded = _whole(run(1)), _whole(run(3))  # one: clip_grad_norm_ over each whole push
    assert one.version == sharded.version == STEPS * WORKERS
    for name, value in one.params.items():
        torch.testing.assert_close(sharded.params[name], value, rtol=1e-6, atol=1e-6, msg=name)
    store = _stores(3, [], config=config)[2]
    grad = _grad(0, 0)[shards_of(TRAINABLE, 3)[2].lo:]
    with pytest.raises(ProtocolError, match="clip_norm_sq: a push of a job that clips"):
        store.push(0, 0, 0, grad)
    with pytest.raises(ProtocolError, match="clip_norm_sq: .* is less than this shard's slice alone"):
        store.push(0, 0, 0, grad, norm_sq=float(grad.double().square().sum()) / 2)
    assert store.version == 0


@pytest.mark.parametrize("mode", ["ps-async", "ps-ssp"])
def test_async_shards_take_each_checkpoint_with_the_same_pushes(mode: str) -> None:
    """ps-async / ps-ssp over two shards, a checkpoint every 4 steps: a worker ahead does not get
    a shard's parameters for step 4 until every worker's pushes before it are in on that shard,
    so both shards take the checkpoint with the same pushes (every clock at 4), which merge
    into the unsharded store's checkpoint after the same pushes."""
    config = dataclasses.replace(CONFIG, mode=mode, staleness=3)
    kept: list[list[CheckpointState]] = []
    stores = _stores(2, kept, config=config)
    one_kept: list[list[CheckpointState]] = []
    one = _stores(1, one_kept, config=config)[0]
    cuts = shards_of(TRAINABLE, 2)
    f32 = tensor_pb2.FLOAT32

    def push(rank: int, step: int, shards: tuple[int, ...] = (0, 1)) -> None:
        grad, buffers = _grad(step, rank), {"mean": torch.full((3,), float(10 * rank + step))}
        for k in shards:
            store = stores[k]
            assert store.push(rank, step, store.version, grad[cuts[k].lo:cuts[k].hi], buffers if k == 0 else None)[0]
        if shards[-1] == 1:  # the unsharded store takes it in the order shard 1 does (shard 0's is the same)
            assert one.push(rank, step, one.version, grad, buffers)[0]

    for step in range(EVERY):  # worker 0 runs ahead to the checkpoint
        assert all(s.try_pull(0, step, f32) is not None for s in stores)
        push(0, step)
    for step in range(2):
        push(1, step)
    assert all(s.try_pull(0, EVERY, f32) is None for s in stores)  # past the checkpoint: it waits
    assert "workers [1] to reach the checkpoint at step 4" in stores[1].waiting_for(EVERY)
    assert all(s.try_pull(1, 2, f32) is not None for s in stores)  # behind it: no wait
    push(1, 2)
    push(1, 3, shards=(0,))  # worker 1's last push before the checkpoint, in flight to shard 1
    assert stores[0].try_pull(0, EVERY, f32) is not None and stores[1].try_pull(0, EVERY, f32) is None
    assert [len(k) for k in kept] == [1, 0]
    with pytest.raises(StateError, match="not one checkpoint"):  # shard 0 has a push that shard 1 has not
        merge_states(stores[0], stores[0].checkpoint_state(), [stores[1].checkpoint_state()])
    push(1, 3, shards=(1,))
    assert stores[1].try_pull(0, EVERY, f32) is not None
    assert [[(c.step, c.clocks) for c in k] for k in kept] == [[(EVERY, (EVERY, EVERY))]] * 2
    _assert_same(merge_states(stores[0], kept[0][0], [kept[1][0]]), one_kept[0][0])
