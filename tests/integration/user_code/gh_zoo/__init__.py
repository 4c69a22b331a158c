"""User model code of the kinds people bring (shipped to the workers as a job's working_dir):
BatchNorm and dropout, tied weights, a frozen backbone, an unused parameter, dict inputs with an
output object that carries its own loss; and data that fails on purpose (a corrupt sample, a
sample that kills its reader). Written for scikit-learn's digits (64 pixels, 10 classes).
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import Dataset


def bn_net(hidden: int = 32, p: float = 0.1) -> nn.Module:
    """BatchNorm (running statistics and a step counter as buffers) and dropout."""
    return nn.Sequential(nn.Linear(64, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Dropout(p),
                         nn.Linear(hidden, 10))


class TiedLM(nn.Module):
    """A language-model-style classifier: pixels as tokens, an embedding whose weight is also the
    output head (``head.weight`` is ``embed.weight``, as GPT-2's ``lm_head``)."""

    def __init__(self, vocab: int = 16, dim: int = 12) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.mix = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.embed.weight
        self.vocab = vocab

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = (x * (self.vocab - 1)).round().long().clamp(0, self.vocab - 1)
        h = torch.tanh(self.mix(self.embed(tokens).mean(dim=1)))
        return self.head(h)[:, :10]


def tied_lm(vocab: int = 16, dim: int = 12) -> nn.Module:
    return TiedLM(vocab, dim)


def frozen_backbone(hidden: int = 32) -> nn.Module:
    """Fine-tuning: a backbone (with BatchNorm) whose parameters are frozen, and a trained head."""
    backbone = nn.Sequential(nn.Linear(64, hidden), nn.BatchNorm1d(hidden), nn.ReLU())
    for p in backbone.parameters():
        p.requires_grad_(False)
    return nn.Sequential(backbone, nn.Linear(hidden, 10))


class WithPooler(nn.Module):
    """A BERT-style encoder whose pooler takes no part in the loss."""

    def __init__(self, hidden: int = 32) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(64, hidden), nn.GELU())
        self.pooler = nn.Linear(hidden, hidden)
        self.classifier = nn.Linear(hidden, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.encoder(x))


def with_pooler(hidden: int = 32) -> nn.Module:
    return WithPooler(hidden)


@dataclass
class Output:
    """Like a Hugging Face ``ModelOutput``: the loss when labels were given, and the logits."""

    loss: torch.Tensor | None
    logits: torch.Tensor


class DictModel(nn.Module):
    """Takes keyword inputs (``pixels``, ``scale``, optional ``labels``) and returns an Output."""

    def __init__(self, hidden: int = 32) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(64, hidden), nn.Tanh(), nn.Linear(hidden, 10))

    def forward(self, pixels: torch.Tensor, scale: torch.Tensor, labels: torch.Tensor | None = None) -> Output:
        logits = self.body(pixels * scale.unsqueeze(1))
        loss = None if labels is None else nn.functional.cross_entropy(logits, labels)
        return Output(loss, logits)


def dict_model(hidden: int = 32) -> nn.Module:
    return DictModel(hidden)


class DictDigits(Dataset):
    """Digits as tokenizer-style samples: ``({"pixels", "scale", "labels"}, label)``."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        return {"pixels": self.x[i], "scale": torch.tensor(0.5 + (i % 3) * 0.25), "labels": self.y[i]}, self.y[i]


def dict_digits() -> tuple[Dataset, Dataset]:
    from gradhub.worker.data import digits

    train, val = digits()
    return DictDigits(*train.tensors), DictDigits(*val.tensors)


def top_k(k: int = 2) -> Callable[[object, torch.Tensor], dict[str, float]]:
    """A user metric factory: top-k accuracy of a batch, reported as ``val_top<k>``."""
    def metric(output: object, target: torch.Tensor) -> dict[str, float]:
        logits = output.logits if isinstance(output, Output) else output
        best = logits.topk(k, dim=1).indices
        return {f"top{k}": float((best == target.unsqueeze(1)).any(dim=1).float().mean())}
    return metric


class BreaksInEval(nn.Module):
    """Trains like an MLP, but its evaluation-mode forward raises (a bug that shows only after
    training, like an output type the evaluation does not expect)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            raise ValueError("this model cannot evaluate")
        return self.body(x)


def breaks_in_eval() -> nn.Module:
    return BreaksInEval()


class BadSample(Dataset):
    """Digits whose sample ``bad`` cannot be read (a corrupt record)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, bad: int) -> None:
        self.x, self.y, self.bad = x, y, bad

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if i == self.bad:
            raise OSError(f"sample {i} is corrupt")
        return self.x[i], self.y[i]


def bad_sample_digits(bad: int) -> tuple[Dataset, Dataset]:
    from gradhub.worker.data import digits

    train, val = digits()
    return BadSample(*train.tensors, bad=bad), val


class _OnSample(Dataset):
    """Digits whose sample ``at`` makes ``act()`` run in the process that reads it."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, at: int) -> None:
        self.x, self.y, self.at = x, y, at

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if i == self.at:
            self.act()
        return self.x[i], self.y[i]

    def act(self) -> None:
        raise NotImplementedError


class KillOnSample(_OnSample):
    """Digits whose sample ``at`` kills the process that reads it (SIGKILL), once: a marker file
    remembers that it fired, so the worker that takes over reads it unharmed."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, at: int, marker: str) -> None:
        super().__init__(x, y, at)
        self.marker = marker

    def act(self) -> None:
        if not os.path.exists(self.marker):
            open(self.marker, "w").close()
            os.kill(os.getpid(), signal.SIGKILL)


def kill_on_sample_digits(at: int, marker: str) -> tuple[Dataset, Dataset]:
    from gradhub.worker.data import digits

    train, val = digits()
    return KillOnSample(*train.tensors, at=at, marker=marker), val


_armed: list[bool] = []  # one process's: set when it reads the sample that arms the kill below


class ArmOnSample(_OnSample):
    """Digits whose sample ``at`` arms ``bn_net_killed_in_backward`` in the process that reads it."""

    def act(self) -> None:
        _armed.append(True)


def arm_on_sample_digits(at: int) -> tuple[Dataset, Dataset]:
    from gradhub.worker.data import digits

    train, val = digits()
    return ArmOnSample(*train.tensors, at=at), val


def bn_net_killed_in_backward(marker: str, hidden: int = 32, p: float = 0.1) -> nn.Module:
    """``bn_net`` whose process is SIGKILLed, once (``marker``), when its first layer's weight
    gets its gradient in the step that read the arming sample: backward has then passed every
    later layer, whose gradients a bucketed push has handed to the wire."""
    model = bn_net(hidden, p)

    def kill(_: torch.Tensor) -> None:
        if _armed and not os.path.exists(marker):
            open(marker, "w").close()
            os.kill(os.getpid(), signal.SIGKILL)

    model[0].weight.register_post_accumulate_grad_hook(kill)
    return model


class WaitOnSample(Dataset):
    """Digits whose samples in ``gates`` (sample -> a file's path) wait, the first time each is
    read in a process, until that file exists (at most ``GATE_TIMEOUT_S``): a test holds a job
    at the step that reads one, changes something, then lets it go on."""

    GATE_TIMEOUT_S = 120.0

    def __init__(self, x: torch.Tensor, y: torch.Tensor, gates: dict[int, str]) -> None:
        self.x, self.y, self.gates = x, y, gates

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        gate = self.gates.get(i)
        if gate is not None:
            deadline = time.monotonic() + self.GATE_TIMEOUT_S
            while not os.path.exists(gate):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"sample {i}: its gate {gate} did not open in {self.GATE_TIMEOUT_S:.0f} s")
                time.sleep(0.01)
        return self.x[i], self.y[i]


def gated_digits(gates: dict[str, str]) -> tuple[Dataset, Dataset]:
    """Digits with ``WaitOnSample`` gates (sample numbers as strings: the spec is JSON)."""
    from gradhub.worker.data import digits

    train, val = digits()
    return WaitOnSample(*train.tensors, gates={int(k): v for k, v in gates.items()}), val
