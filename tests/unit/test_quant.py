"""Block-quantised pushes (compression int8 / int4, gradhub.proto.quant) and the worker's
encoder with error feedback (gradhub.worker.push_codec): the payload's layout and size, the
round trip within half a step per block, int4's packing, odd sizes, zeros, and non-finite
input refused with an error that names the tensor."""

from __future__ import annotations

import pytest
import torch

from gradhub.proto.codec import Layout
from gradhub.proto.contract.errors import ProtocolError, SpecError
from gradhub.proto.contract.spec import JobSpec
from gradhub.proto.quant import BlockQuant
from gradhub.proto.v1.tensor_pb2 import QINT4, QINT8
from gradhub.server.store import StoreConfig
from gradhub.worker.push_codec import PushEncoder

FORMATS = [BlockQuant(QINT8, 256), BlockQuant(QINT4, 256), BlockQuant(QINT8, 8), BlockQuant(QINT4, 33)]
IDS = ["int8-256", "int4-256", "int8-8", "int4-33"]


def _roundtrip(q: BlockQuant, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    payload = q.encode(x)
    assert payload.dtype == torch.uint8 and payload.device.type == "cpu" and payload.numel() == q.nbytes(x.numel())
    scales, _ = q.unpack(payload, x.numel())
    return payload, scales, q.decode(payload, x.numel())


@pytest.mark.parametrize("q", FORMATS, ids=IDS)
@pytest.mark.parametrize("n", [1, 7, 8, 255, 256, 257, 1001, 4096])
def test_round_trip_is_within_half_a_step_of_each_block(q, n):
    torch.manual_seed(n)
    x = torch.randn(n) * torch.logspace(-6, 2, n)  # blocks of very different magnitudes
    _, scales, y = _roundtrip(q, x)
    assert y.dtype == torch.float32 and y.shape == x.shape
    blocks = torch.arange(n) // q.block
    absmax = torch.zeros(q.blocks(n)).scatter_reduce(0, blocks, x.abs(), "amax")
    assert torch.equal(scales, absmax / q.qmax)  # absmax scaling, per block
    bound = q.bound(scales)[blocks] * (1 + 1e-5) + 1e-30
    assert bool(((x - y).abs() <= bound).all()), float(((x - y).abs() - bound).max())
    # the largest value of a block is exact up to float rounding: its code is +-qmax
    assert torch.allclose(y.abs().max(), x.abs().max(), rtol=1e-6)


@pytest.mark.parametrize("q", FORMATS[:2], ids=IDS[:2])
def test_zeros_and_values_on_the_grid_are_exact(q):
    x = torch.zeros(1000)
    x[300:400] = torch.arange(-50, 50) % (2 * q.qmax + 1) - q.qmax  # integers in [-qmax, qmax]
    x[300] = q.qmax  # a block whose absmax is qmax: scale 1
    _, scales, y = _roundtrip(q, x)
    assert torch.equal(y, x)
    assert scales[0] == 0 and scales[3] == 0  # a block of zeros has scale 0


def test_sizes_per_format():
    n = 1_000_003
    assert BlockQuant(QINT8, 256).nbytes(n) == 4 * 3907 + n
    assert BlockQuant(QINT4, 256).nbytes(n) == 4 * 3907 + 500_002
    assert BlockQuant(QINT8, 256).nbytes(256) == 4 + 256
    # int8 with blocks of 256 is 1/4 of float32 and 1/64 more
    assert BlockQuant(QINT8).nbytes(1 << 20) / (4 << 20) == pytest.approx(0.25 + 1 / 256)
    assert BlockQuant(QINT4).nbytes(1 << 20) / (4 << 20) == pytest.approx(0.125 + 1 / 256)


def test_int4_packs_two_codes_per_byte_low_nibble_first():
    q = BlockQuant(QINT4, 8)
    x = torch.tensor([7.0, -7.0, 1.0, 0.0, -3.0])  # one block, absmax 7: scale 1, codes are x
    payload = q.encode(x)
    assert payload[:4].view(torch.float32).item() == 1.0
    # codes + 8: 15, 1, 9, 8, 5 (and 8 pads the odd count)
    assert payload[4:].tolist() == [15 | 1 << 4, 9 | 8 << 4, 5 | 8 << 4]
    assert torch.equal(q.decode(payload, 5), x)
    i8 = BlockQuant(QINT8, 8).encode(torch.tensor([127.0, -127.0, -1.0]))
    assert i8[4:].view(torch.int8).tolist() == [127, -127, -1]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_input_is_refused_naming_the_tensor(bad):
    layout = Layout(("w", "b"), ((2, 300), (4,)))
    x = torch.ones(layout.numel)
    x[601] = bad
    with pytest.raises(ProtocolError, match=r"non-finite value \(NaN or Inf\) in tensor 'b'"):
        BlockQuant(QINT8).encode(x, layout)
    with pytest.raises(ProtocolError, match="element 601"):
        BlockQuant(QINT4).encode(x)


def test_the_decoder_checks_the_byte_count_and_the_scales():
    q = BlockQuant(QINT8, 8)
    payload = q.encode(torch.arange(20.0))
    with pytest.raises(ProtocolError, match="byte count: 31 bytes, a QINT8 gradient of 20 values in blocks of 8 has 32"):
        q.decode(payload[:-1], 20)
    for scale in (float("nan"), float("inf"), -1.0):
        bad = payload.clone()
        bad[4:8] = torch.tensor([scale]).view(torch.uint8)
        with pytest.raises(ProtocolError, match="scales: block 1 has scale"):
            q.decode(bad, 20)


def test_block_sizes_are_checked():
    with pytest.raises(SpecError, match="compression_block: must be in"):
        BlockQuant(QINT8, 4)
    with pytest.raises(SpecError, match="compression_block"):
        StoreConfig("j", "ps-sync", 1, compression="int4", compression_block=1 << 30)
    assert StoreConfig("j", "ps-sync", 1, compression="int4").quant == BlockQuant(QINT4, 256)
    assert StoreConfig("j", "ps-sync", 1, compression="fp16").quant is None


def test_spec_fields():
    base = {"model": "mlp", "dataset": "digits", "mode": "local-sgd"}
    spec = JobSpec.from_dict({**base, "compression": "int8"})
    assert (spec.compression_block, spec.error_feedback) == (256, False)
    spec = JobSpec.from_dict({**base, "compression": "int4", "compression_block": 64, "error_feedback": True})
    assert JobSpec.from_json(spec.to_json()) == spec
    assert JobSpec.from_dict({**base, "mode": "ps-sync", "compression": "int8"}).compression_block == 256
    assert "compression_block" not in JobSpec.from_dict(base).to_dict()
    for bad, message in (
        ({"compression": "fp16", "error_feedback": True}, "error_feedback: only applies to compression int8 or int4"),
        ({"compression_block": 128}, "compression_block: only applies to compression int8 or int4"),
        ({"compression": "int8", "compression_block": 4}, "compression_block: must be"),
        ({"compression": "int8", "error_feedback": "yes"}, "error_feedback: must be true or false"),
        ({"compression": "int4", "mode": "allreduce"}, "compression: int4 quantises what workers push"),
    ):
        with pytest.raises(SpecError, match=message):
            JobSpec.from_dict({**base, **bad})


# ----------------------------------------------------------------------- the worker's encoder


def test_the_encoder_passes_float_compressions_through():
    g = torch.randn(10)
    enc = PushEncoder("bf16")
    assert enc.encode(g) is g and enc.quant_block == 0 and enc.push_bytes(10) == 20
    assert PushEncoder("none").push_bytes(10) == 40
    with pytest.raises(ValueError, match="error_feedback"):
        PushEncoder("fp16", error_feedback=True)


def test_error_feedback_carries_the_residual_into_the_next_push():
    torch.manual_seed(0)
    q = BlockQuant(QINT4, 16)
    enc = PushEncoder("int4", 16, error_feedback=True)
    plain = PushEncoder("int4", 16)
    grads = [torch.randn(100) * 0.01 for _ in range(50)]
    before = [g.clone() for g in grads]
    sent = sum(q.decode(enc.encode(g), 100) for g in grads)
    sent_plain = sum(q.decode(plain.encode(g), 100) for g in grads)
    assert all(torch.equal(a, b) for a, b in zip(grads, before, strict=True)), "the caller's gradient changed"
    total = sum(grads)
    # with feedback, what arrived differs from what was meant by the last residual alone
    residual = enc.residual()
    assert residual is not None and torch.allclose(sent + residual, total, atol=1e-5)
    assert (sent - total).abs().max() < (sent_plain - total).abs().max()
    # a new registration starts from zero
    enc.reset()
    assert enc.residual() is None
    assert torch.equal(enc.encode(grads[0]), plain.encode(grads[0]))


def test_error_feedback_keeps_its_residual_when_a_push_is_refused():
    enc = PushEncoder("int8", 8, error_feedback=True)
    enc.encode(torch.tensor([1.0, 0.3, 0.001] + [0.0] * 5))
    kept = enc.residual().clone()
    with pytest.raises(ProtocolError, match="non-finite"):
        enc.encode(torch.tensor([float("nan")] + [0.0] * 7))
    assert torch.equal(enc.residual(), kept)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("q", FORMATS, ids=IDS)
def test_cuda_tensors_encode_on_the_device_to_the_same_bytes(q):
    torch.manual_seed(1)
    x = torch.randn(100_003)
    cpu = q.encode(x)
    gpu = q.encode(x.cuda())
    assert gpu.device.type == "cpu" and torch.equal(cpu, gpu)
    enc = PushEncoder("int8" if q.bits == 8 else "int4", q.block, error_feedback=True)
    enc.encode(x.cuda())
    residual = enc.residual()
    assert residual is not None and residual.device.type == "cuda"
