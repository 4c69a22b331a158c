"""Block quantisation of pushed gradients (``compression: int8`` / ``int4``): the format both
ends agree on. The worker encodes (vectorised torch, on the gradient's own device, CPU or CUDA);
the server decodes to float32 before its store sees the gradient. Pulled parameters are never
quantised.

The flat gradient (every trainable tensor back to back, in the layout's order, ``n`` values) is
cut into blocks of ``block`` values (the last one shorter). Per block, symmetric absmax scaling:
``scale = max|x| / qmax`` (qmax 127 for int8, 7 for int4) and ``code = round(x / scale)`` in
``[-qmax, qmax]``; a block of zeros has scale 0 and codes 0. The payload is::

    scales   ceil(n / block) float32, little-endian
    codes    int8: n bytes, two's complement
             int4: ceil(n / 2) bytes, code + 8 in a nibble, element 2i in the low nibble and
                   2i + 1 in the high one (an odd n leaves the last high nibble 8, a zero)

Decoding gives ``code * scale``, within ``scale / 2 = max|x| / (2 qmax)`` of every value of the
block (round to nearest; a few float32 ulps on top). Nothing here knows a transport.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gradhub.proto.codec import QUANT_BITS, Layout, dtype_name
from gradhub.proto.contract.errors import ProtocolError, SpecError
from gradhub.proto.contract.spec import COMPRESSION_BLOCK_RANGE, DEFAULT_COMPRESSION_BLOCK

DEFAULT_BLOCK = DEFAULT_COMPRESSION_BLOCK
MIN_BLOCK, MAX_BLOCK = COMPRESSION_BLOCK_RANGE
_SCALE_BYTES = 4


@dataclass(frozen=True)
class BlockQuant:
    """One job's quantised push format: its wire dtype (QINT8 or QINT4) and block size."""

    wire_dtype: int
    block: int = DEFAULT_BLOCK

    def __post_init__(self) -> None:
        if self.wire_dtype not in QUANT_BITS:
            raise ValueError(f"dtype: {dtype_name(self.wire_dtype)} is not a quantised wire dtype")
        if not MIN_BLOCK <= self.block <= MAX_BLOCK:
            raise SpecError("compression_block", f"must be in [{MIN_BLOCK}, {MAX_BLOCK}], got {self.block}")

    @property
    def bits(self) -> int:
        return QUANT_BITS[self.wire_dtype]

    @property
    def qmax(self) -> int:
        """The largest code: 127 (int8) or 7 (int4)."""
        return (1 << (self.bits - 1)) - 1

    # ---------------------------------------------------------------- sizes
    def blocks(self, numel: int) -> int:
        return -(-numel // self.block)

    def code_bytes(self, numel: int) -> int:
        return numel if self.bits == 8 else -(-numel // 2)

    def nbytes(self, numel: int) -> int:
        """The payload's bytes for a gradient of ``numel`` values: scales, then codes."""
        return _SCALE_BYTES * self.blocks(numel) + self.code_bytes(numel)

    # ---------------------------------------------------------------- worker side
    def quantize(self, flat: torch.Tensor, layout: Layout | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scales, codes)`` of ``flat`` on its device: float32 per block, int8 per value.
        A NaN or Inf is refused (ProtocolError naming the tensor when ``layout`` is given), as
        the server refuses a non-finite gradient: no scale can carry it."""
        x = flat.detach().reshape(-1).to(torch.float32)
        n, nb = x.numel(), self.blocks(x.numel())
        if nb * self.block != n:
            x = torch.nn.functional.pad(x, (0, nb * self.block - n))
        xb = x.view(nb, self.block)
        absmax = xb.abs().amax(dim=1)  # NaN propagates; Inf is Inf
        if not bool(torch.isfinite(absmax).all()):
            raise _non_finite(x, layout)
        scales = absmax / self.qmax
        safe = torch.where(scales > 0, scales, torch.ones_like(scales))  # a zero block stays 0
        codes = torch.round(xb / safe[:, None]).clamp_(-self.qmax, self.qmax).to(torch.int8)
        return scales, codes.view(-1)[:n]

    def dequantize(self, scales: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """``code * scale`` as float32, on the codes' device."""
        n, nb = codes.numel(), scales.numel()
        out = torch.zeros(nb * self.block, dtype=torch.float32, device=codes.device)
        out[:n] = codes
        out.view(nb, self.block).mul_(scales[:, None])
        return out[:n]

    def pack(self, scales: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """The payload (uint8, contiguous, CPU): the scales' bytes, then the codes (int4: two
        to a byte), built on the device so that only the packed bytes cross to the host."""
        if self.bits == 4:
            nibbles = (codes + 8).to(torch.uint8)
            if nibbles.numel() % 2:
                nibbles = torch.cat([nibbles, nibbles.new_full((1,), 8)])
            pairs = nibbles.view(-1, 2)
            body = pairs[:, 0] | (pairs[:, 1] << 4)
        else:
            body = codes.view(torch.uint8)
        payload = torch.cat([scales.to(torch.float32).contiguous().view(torch.uint8), body])
        return payload.cpu().contiguous()

    def encode(self, flat: torch.Tensor, layout: Layout | None = None) -> torch.Tensor:
        """``pack(quantize(flat))``: the payload of one push."""
        return self.pack(*self.quantize(flat, layout))

    # ---------------------------------------------------------------- server side
    def unpack(self, payload: torch.Tensor, numel: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scales, codes)`` of a received payload (uint8 of ``nbytes(numel)``); ProtocolError
        when the byte count differs or a scale is negative, NaN or Inf."""
        expected = self.nbytes(numel)
        if payload.numel() != expected or payload.dtype != torch.uint8:
            raise ProtocolError(f"byte count: {payload.numel()} bytes, a {dtype_name(self.wire_dtype)} gradient of "
                                f"{numel} values in blocks of {self.block} has {expected}")
        split = _SCALE_BYTES * self.blocks(numel)
        scales = payload[:split].view(torch.float32)
        bad = ~torch.isfinite(scales) | (scales < 0)
        if bool(bad.any()):
            block = int(bad.nonzero()[0])
            raise ProtocolError(f"scales: block {block} has scale {float(scales[block])}; a scale is finite and >= 0")
        body = payload[split:]
        if self.bits == 4:
            codes = torch.stack((body & 0x0F, body >> 4), dim=1).view(-1)[:numel].to(torch.int8) - 8
        else:
            codes = body.view(torch.int8)
        return scales, codes

    def decode(self, payload: torch.Tensor, numel: int) -> torch.Tensor:
        """The float32 gradient a payload carries (a new tensor: it does not share the bytes)."""
        return self.dequantize(*self.unpack(payload, numel))

    def bound(self, scales: torch.Tensor) -> torch.Tensor:
        """Per block, the most a decoded value differs from the encoded one: ``scale / 2``."""
        return scales / 2


def _non_finite(x: torch.Tensor, layout: Layout | None) -> ProtocolError:
    element = int((~torch.isfinite(x)).nonzero()[0])
    where = f"tensor '{layout.name_at(element)}'" if layout is not None else f"element {element}"
    return ProtocolError(f"gradient values: non-finite value (NaN or Inf) in {where}; "
                         "a quantised push cannot carry it")
