"""Mixed precision on a worker: autocast for the forward pass, and loss scaling for fp16.

Parameters and optimizer state stay float32 (the master copy); only the forward pass and
the loss run under ``torch.autocast`` (``bf16`` works on CPU and GPU, ``fp16`` is meant for
CUDA). fp16 gradients can overflow, so the loss is scaled as ``torch.amp.GradScaler`` does
(start at 2**16, halve on overflow, double after 2,000 clean steps); but where GradScaler
skips an overflowing step, gradhub computes the step again at the lower scale, so every
step of every mode applies exactly one update and all modes take the same steps.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from gradhub.proto.contract.errors import GradhubError

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
INIT_SCALE, GROWTH_INTERVAL, MAX_RETRIES = 2.0**16, 2000, 40


class Precision:
    """The job's ``precision`` on one worker's device."""

    def __init__(self, precision: str, device: torch.device) -> None:
        self.dtype = DTYPES.get(precision)
        self.device_type = device.type
        self.scaled = precision == "fp16"
        self.scale = INIT_SCALE if self.scaled else 1.0
        self._clean = 0

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        """Autocast to the job's precision (nothing for fp32)."""
        if self.dtype is None:
            yield
        else:
            with torch.autocast(self.device_type, dtype=self.dtype):
                yield

    def run(self, compute: Callable[[float], torch.Tensor], grads: Callable[[], Sequence[torch.Tensor]],
            restart: Callable[[], None]) -> torch.Tensor:
        """One step's gradient: ``compute(scale)`` runs forward and backward with the loss
        multiplied by ``scale`` and returns the (unscaled) loss; ``grads()`` are the
        resulting gradients; ``restart()`` zeroes them and restores what a retry must not see
        twice (buffers). With fp16 the gradients are unscaled here, after an overflow the step
        is computed again at half the scale."""
        for _ in range(MAX_RETRIES):
            loss = compute(self.scale)
            if not self.scaled:
                return loss
            gs = grads()
            if all(bool(torch.isfinite(g).all()) for g in gs):
                for g in gs:
                    g.div_(self.scale)
                self._clean += 1
                if self._clean >= GROWTH_INTERVAL:
                    self.scale, self._clean = self.scale * 2, 0
                return loss
            self.scale, self._clean = self.scale / 2, 0
            restart()
        raise GradhubError(f"precision: fp16 gradients overflow even at loss scale {self.scale:g}; "
                           "the model diverged or needs bf16 or fp32")


def no_sync_except_last(ddp: Any, parts: int) -> Callable[[int], contextlib.AbstractContextManager[Any]]:
    """For gradient accumulation under DDP: ``no_sync()`` for every micro-batch but the last."""
    def context(i: int) -> contextlib.AbstractContextManager[Any]:
        return ddp.no_sync() if ddp is not None and i < parts - 1 else contextlib.nullcontext()
    return context
