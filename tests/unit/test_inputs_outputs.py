"""Batches, model calls, losses and evaluation as users write them; mixed precision and loss
scaling; failures that name their phase."""

from __future__ import annotations

import pickle
from dataclasses import dataclass

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from gradhub.proto.contract.errors import FactoryError, GradhubError, SpecError, WorkerFailure
from gradhub.worker.data import (
    batch_len,
    build_loss,
    call_model,
    evaluate,
    get_batch,
    logits_of,
    split_batch,
    step_seed,
    to_device,
)
from gradhub.worker.precision import Precision
from gradhub.worker.workload import Phase


@dataclass
class Out:
    loss: torch.Tensor | None
    logits: torch.Tensor


class Tokens(Dataset):
    def __len__(self) -> int:
        return 6

    def __getitem__(self, i: int):
        return {"ids": torch.full((3,), i), "mask": torch.ones(3)}, (torch.tensor(i % 2), [torch.tensor(float(i))])


def test_nested_batches_collate_move_split_and_measure() -> None:
    x, y = get_batch(Tokens(), [0, 1, 2, 3])
    assert x["ids"].shape == (4, 3) and isinstance(y, list | tuple) and y[0].tolist() == [0, 1, 0, 1]
    moved = to_device(x, "cpu")
    assert moved.keys() == x.keys()
    assert batch_len(x) == 4 and batch_len((torch.zeros(5, 2),)) == 5 and batch_len(torch.tensor(1.0)) == 1
    halves = split_batch(x, 2)
    assert [h["ids"][:, 0].tolist() for h in halves] == [[0, 1], [2, 3]]
    assert split_batch(y, 2)[1][1][0].tolist() == [2.0, 3.0]
    with pytest.raises(SpecError, match="accumulate: cannot split a batch of 4 samples into 3"):
        split_batch(x, 3)


def test_call_model_passes_tuples_positionally_and_mappings_by_keyword() -> None:
    def f(a, b=0, *, c=0):
        return (a, b, c)

    assert call_model(f, 1) == (1, 0, 0)
    assert call_model(f, (1, 2)) == (1, 2, 0)
    assert call_model(f, [1, 2]) == (1, 2, 0)
    assert call_model(f, {"a": 1, "c": 3}) == (1, 0, 3)


def test_logits_are_found_in_any_output() -> None:
    t = torch.randn(2, 3)
    assert logits_of(t) is t
    assert logits_of((t, "aux")) is t
    assert logits_of({"logits": t, "loss": 1}) is t
    assert logits_of(Out(None, t)) is t
    assert logits_of({"hidden": t}) is None and logits_of("text") is None and logits_of(()) is None


def test_built_in_losses_take_the_logits_and_loss_model_takes_the_output_loss() -> None:
    t, y = torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
    ce = build_loss("cross_entropy", None, {})
    want = nn.functional.cross_entropy(t, y)
    for out in (t, (t, None), {"logits": t}, Out(None, t)):
        assert torch.equal(ce(out, y), want)
    with pytest.raises(FactoryError, match="no tensor of class scores"):
        ce({"hidden": t}, y)
    own = build_loss("model", None, {})
    assert torch.equal(own(Out(want, t), None), want) and torch.equal(own({"loss": want}, y), want)
    with pytest.raises(FactoryError, match="without a 'loss' tensor"):
        own(Out(None, t), y)


class Regressor(nn.Module):
    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"prediction": x.sum(1)}


class SeqModel(nn.Module):
    """(B, T) tokens -> (B, T, V) scores: accuracy over positions, targets < 0 ignored."""

    def forward(self, x: torch.Tensor) -> Out:
        return Out(None, nn.functional.one_hot(x, 4).float())


def test_evaluation_never_fails_on_the_output_type() -> None:
    data = torch.utils.data.TensorDataset(torch.randn(10, 3), torch.randn(10))
    metrics = evaluate(Regressor(), data, lambda out, y: ((out["prediction"] - y) ** 2).mean())
    assert set(metrics) == {"val_loss"}  # no class scores: no accuracy


def test_sequence_accuracy_ignores_negative_targets_and_user_metrics_are_averaged() -> None:
    x = torch.tensor([[0, 1, 2], [3, 3, 1]])
    y = torch.tensor([[0, 1, 3], [3, -100, 1]])  # 4 of 5 counted positions right
    data = torch.utils.data.TensorDataset(x, y)
    seen = []

    def batch_metric(out, target):
        seen.append(len(target))
        return {"size": float(len(target))}

    metrics = evaluate(SeqModel(), data, lambda out, t: out.logits.sum() * 0, batch_size=1, metrics=batch_metric)
    assert metrics["val_accuracy"] == 4 / 5
    assert metrics["val_size"] == 1.0 and seen == [1, 1]


def test_step_seeds_differ_by_rank_and_step_and_follow_the_formula() -> None:
    assert step_seed(3, 1, 7) == ((3 * 1_000_003 + 1) * 1_000_003 + 7) % 2**63
    assert len({step_seed(0, r, s) for r in range(4) for s in range(50)}) == 200


def test_bf16_autocast_on_cpu() -> None:
    p = Precision("bf16", torch.device("cpu"))
    with p.autocast():
        assert (torch.randn(2, 2) @ torch.randn(2, 2)).dtype == torch.bfloat16
    assert not p.scaled
    with Precision("fp32", torch.device("cpu")).autocast():
        assert (torch.randn(2, 2) @ torch.randn(2, 2)).dtype == torch.float32


def test_fp16_loss_scaling_recomputes_an_overflowing_step_at_half_the_scale() -> None:
    p = Precision("fp16", torch.device("cpu"))
    grad = torch.zeros(3)
    scales, restarts = [], []

    def compute(scale: float) -> torch.Tensor:
        scales.append(scale)
        grad.copy_(torch.full((3,), float("inf")) if len(scales) < 3 else torch.full((3,), 2.0 * scale))
        return torch.tensor(1.0)

    loss = p.run(compute, lambda: [grad], lambda: restarts.append(1))
    assert float(loss) == 1.0
    assert scales == [2.0**16, 2.0**15, 2.0**14] and len(restarts) == 2
    assert torch.equal(grad, torch.full((3,), 2.0))  # unscaled
    assert p.scale == 2.0**14

    def always_inf(scale: float) -> torch.Tensor:
        grad.fill_(float("inf"))
        return torch.tensor(1.0)

    with pytest.raises(GradhubError, match="precision: fp16 gradients overflow"):
        p.run(always_inf, lambda: [grad], lambda: None)


def test_a_failure_names_its_phase_and_step_and_pickles_with_its_traceback() -> None:
    phase = Phase()
    try:
        raise ValueError("bad\nsample")
    except ValueError as e:
        failure = phase.failure(e)
    assert str(failure) == "while building the model and data: ValueError: bad sample"
    phase.at("train", 12)
    failure = phase.failure(KeyError("x"))
    assert str(failure) == "at training step 12: KeyError: 'x'" and failure.phase == "train" and failure.step == 12
    phase.at("eval", 40)
    try:
        raise RuntimeError("boom")
    except RuntimeError as e:
        failure = phase.failure(e)
    back = pickle.loads(pickle.dumps(failure))
    assert isinstance(back, WorkerFailure) and str(back) == str(failure) == "in evaluation after step 40: RuntimeError: boom"
    assert back.step == 40 and "Traceback" in back.traceback and 'raise RuntimeError("boom")' in back.traceback
    phase.at("optimizer", 3)
    assert not phase.consistent


def test_sparklines_span_the_range_and_fit_the_width() -> None:
    from gradhub.client.progress import sparkline

    assert sparkline([], 10) == "" and sparkline([1.0, 2.0], 0) == ""
    assert sparkline([0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0], 8) == "▁▂▃▄▅▆▇█"
    assert sparkline([3.0, 3.0, 3.0], 10) == "▁▁▁"  # flat: no division by zero
    long = sparkline([float(i) for i in range(1000)], 40)
    assert len(long) == 40 and long[0] == "▁" and long[-1] == "█"
    assert list(long) == sorted(long)  # a rising curve stays rising
