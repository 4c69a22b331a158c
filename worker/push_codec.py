"""What a worker's pushes carry, by the job's ``compression``: the gradient itself for none,
fp16 and bf16 (the links convert it as they send), or its block quantisation for int8 and int4
(gradhub.proto.quant), encoded on the gradient's device, with optional error feedback.

Error feedback keeps what quantisation left out of a push (``sent - decoded``, on the
gradient's device) and adds it to the next one, so nothing is lost for good, only delayed. The
residual belongs to one registration of the worker: a restarted worker (or a spare taking over
its rank, or any new registration) starts from zero, which drops at most one push's
quantisation error (half a step per value). A job that pushes fragments keeps one residual per
fragment (by its layout); a sharded job's pushes one per shard's slice or bucket piece (by a
key its link names: two shards' pieces of one tensor may have the same layout).
"""

from __future__ import annotations

from collections.abc import Hashable

import torch

from gradhub.proto.codec import COMPRESSION_DTYPES, QUANT_BITS, Layout, params_dtype, torch_dtype
from gradhub.proto.quant import DEFAULT_BLOCK, BlockQuant


class PushEncoder:
    """Turns one worker's gradients into push payloads; owns the error-feedback residual."""

    def __init__(self, compression: str = "none", block: int | None = None, error_feedback: bool = False) -> None:
        if compression not in COMPRESSION_DTYPES:
            raise ValueError(f"compression: must be one of {sorted(COMPRESSION_DTYPES)}, not {compression!r}")
        self.wire_dtype = COMPRESSION_DTYPES[compression]
        self.params_dtype = params_dtype(compression)
        self.quant = BlockQuant(self.wire_dtype, block or DEFAULT_BLOCK) if self.wire_dtype in QUANT_BITS else None
        if error_feedback and self.quant is None:
            raise ValueError("error_feedback: only applies to compression int8 or int4")
        self.error_feedback = error_feedback
        self._residual: dict[Hashable, torch.Tensor] = {}  # by what was pushed: the model, a fragment, a slice

    @property
    def quant_block(self) -> int:
        """The block a push header names (0: not quantised)."""
        return 0 if self.quant is None else self.quant.block

    def push_bytes(self, numel: int) -> int:
        """The payload bytes of one push of ``numel`` values."""
        if self.quant is not None:
            return self.quant.nbytes(numel)
        return numel * torch_dtype(self.wire_dtype).itemsize

    def encode(self, grads: torch.Tensor, layout: Layout | None = None, key: Hashable | None = None) -> torch.Tensor:
        """What to send for ``grads`` (flat, any device): ``grads`` as they are when not
        quantised, else the payload (uint8, CPU). Call it once per push: a retry resends the
        same payload (error feedback has counted it). A NaN or Inf is a ProtocolError naming
        the tensor, and leaves the residual as it was. The residual is ``key``'s (by default
        ``layout``'s: what was pushed)."""
        if self.quant is None:
            return grads
        key = layout if key is None else key
        x = grads.detach().reshape(-1).to(torch.float32)
        residual = self._residual.get(key)
        if residual is not None and residual.shape == x.shape and residual.device == x.device:
            x = x + residual  # a new tensor: the caller's gradient is not changed
        scales, codes = self.quant.quantize(x, layout)
        if self.error_feedback:  # x may share the caller's memory: a new tensor
            self._residual[key] = x - self.quant.dequantize(scales, codes)
        return self.quant.pack(scales, codes)

    def residual(self, key: Hashable | None = None) -> torch.Tensor | None:
        """What quantisation left out of the last push of ``key`` (``encode``'s; the model's
        pushes when the caller names none), still to be sent; None when nothing is kept."""
        return self._residual.get(key)

    def reset(self) -> None:
        """Forget the residual (a new registration: see the module's docstring)."""
        self._residual = {}
