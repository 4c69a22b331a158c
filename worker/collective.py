"""torch.distributed for the allreduce mode: the process group of one generation, sharing the
training state inside it, and the DDP communication hook that averages gradients (optionally
compressed) and times the all-reduce.

Rendezvous needs no fixed port and no shared file: the server hosts a TCPStore on a free port
and gives every group its own key prefix (``JoinGroup``). A group that loses a member is
destroyed and the survivors form the next one in the same processes.
"""

# no "from __future__ import annotations": DDP compares the hook's annotations with real types

import fcntl
import socket
import struct
import threading
import time
from datetime import timedelta
from typing import Any, Self

import torch
import torch.distributed as dist

from gradhub.proto.contract.errors import PeerLostError
from gradhub.proto.state import TrainingState, read_state, state_header
from gradhub.proto.v1 import ps_pb2

COMPRESSION = {"none": None, "fp16": torch.float16, "bf16": torch.bfloat16}
STORE_TIMEOUT_S = 120.0  # every rank must reach the rendezvous within this

_SIOCGIFADDR = 0x8915


def backend_for(device: torch.device, gpus_per_worker: float) -> str:
    """NCCL when every worker owns a GPU; Gloo on CPU, and for workers that share a GPU
    (fractional ``resources.gpus``: NCCL cannot put two ranks on one device; Gloo all-reduces
    CUDA tensors through the host)."""
    return "nccl" if device.type == "cuda" and gpus_per_worker >= 1 else "gloo"


def interface_of(ip: str) -> str | None:
    """The network interface that holds IPv4 address ``ip`` (Linux), or None."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            try:
                raw = fcntl.ioctl(s.fileno(), _SIOCGIFADDR, struct.pack("256s", name[:15].encode()))
            except OSError:
                continue  # no IPv4 address
            if socket.inet_ntoa(raw[20:24]) == ip:
                return name
    return None


class ProcessGroup:
    """One generation's default process group, for the lifetime of a ``with`` block: it meets in
    the server's store at ``(host, port)`` under ``prefix``. Collective failures while it forms
    are PeerLostErrors."""

    def __init__(self, store: tuple[str, int, str], rank: int, world_size: int, backend: str,
                 timeout_s: float) -> None:
        self.rank, self.world_size, self.backend = rank, world_size, backend
        self._timeout = timedelta(seconds=timeout_s)
        self._address = store

    def __enter__(self) -> Self:
        host, port, prefix = self._address
        try:
            store = dist.TCPStore(host, port, is_master=False, timeout=timedelta(seconds=STORE_TIMEOUT_S))
            dist.init_process_group(self.backend, store=dist.PrefixStore(prefix, store), rank=self.rank,
                                    world_size=self.world_size, timeout=self._timeout)
        except Exception as e:
            if is_collective_failure(e):  # a peer died or is unreachable while the group forms
                raise PeerLostError(f"worker {self.rank} could not form its group: {one_line(e)}") from None
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


def broadcast_state(state: TrainingState | None, source: int, device: torch.device) -> TrainingState:
    """Rank ``source`` sends ``state`` (the training state it holds) to every rank of the group;
    returns it on every rank. It travels as a checkpoint's header and bytes (no pickle)."""
    sizes = torch.zeros(2, dtype=torch.int64, device=device)
    header_bytes, payload = b"", torch.empty(0, dtype=torch.uint8)
    if dist.get_rank() == source:
        if state is None:
            raise ValueError("the source rank must hold the state it shares")
        header, tensors = state_header("", source, state)
        header_bytes = header.SerializeToString()
        payload = torch.cat([t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8) for t in tensors])
        sizes.copy_(torch.tensor([len(header_bytes), payload.numel()]))
    dist.broadcast(sizes, source)
    n_header, n_payload = (int(v) for v in sizes.tolist())
    header_t = (torch.frombuffer(bytearray(header_bytes), dtype=torch.uint8) if header_bytes
                else torch.empty(n_header, dtype=torch.uint8)).to(device)
    payload_t = (payload if payload.numel() else torch.empty(n_payload, dtype=torch.uint8)).to(device)
    dist.broadcast(header_t, source)
    if n_payload:
        dist.broadcast(payload_t, source)
    if dist.get_rank() == source:
        assert state is not None
        return state
    header = ps_pb2.CheckpointHeader.FromString(header_t.cpu().numpy().tobytes())
    return read_state(header, iter([memoryview(payload_t.cpu().numpy().tobytes())]))


def one_line(e: BaseException, limit: int = 300) -> str:
    return " ".join(str(e).split())[:limit]


def is_collective_failure(e: BaseException) -> bool:
    """Whether ``e`` came out of a collective or the rendezvous (a peer is gone, a timeout),
    rather than from the model, the data or the loss."""
    if isinstance(e, dist.DistError):
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and any(
        k in text for k in ("gloo", "Gloo", "NCCL", "Connection reset", "Connection closed", "Broken pipe")
    )


def ordered_all_reduce(tensor: torch.Tensor, group: Any = None) -> torch.futures.Future[Any]:
    """Sum ``tensor`` over the group in place, every element added in rank order (rank 0's + rank
    1's + ...) wherever it sits in the tensor, with the bytes of a ring all-reduce: an all-to-all
    hands each rank its chunk of everyone's tensor (waited for here: on NCCL that only orders the
    stream), the rank adds the copies in rank order, and an all-gather (returned as a future)
    brings every chunk back to everyone. A failure is the returned future's, never raised here:
    raised inside DDP's autograd hook it would leave the Reducer mid-step."""
    world = dist.get_world_size(group)
    flat = tensor.view(-1)
    n = flat.numel()
    chunk = -(-n // world)
    send = flat.new_zeros(chunk * world)
    send[:n].copy_(flat)
    parts = torch.empty_like(send)
    try:
        dist.all_to_all_single(parts, send, group=group)
    except Exception as e:  # noqa: BLE001 - a lost peer, surfaced where DDP waits (as a ring all-reduce's)
        return failed(e)
    rows = parts.view(world, chunk)
    mine = rows[0].clone()
    for r in range(1, world):
        mine.add_(rows[r])
    gathered = send  # no longer needed as input
    all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    fut = all_gather(gathered, mine, group=group, async_op=True).get_future()

    def unpack(f: torch.futures.Future[Any]) -> torch.Tensor:
        f.value()  # raises what the all-gather raised
        flat.copy_(gathered[:n])
        return tensor

    return fut.then(unpack)


def failed(e: BaseException) -> torch.futures.Future[Any]:
    fut: torch.futures.Future[Any] = torch.futures.Future()
    fut.set_exception(e)
    return fut


class AllReduceHook:
    """A DDP communication hook (register ``.hook``): each gradient bucket is averaged over the group, sent as
    ``dtype`` (fp16/bf16 compression, as DDP's ``fp16_compress_hook``) or as is.

    Groups of three or more sum in rank order (``ordered_all_reduce``) instead of the backend's ring,
    whose order for an element depends on where it sits in its bucket: DDP lays its buckets out
    again after a group's first step, so a group formed mid-job (a restart) would otherwise sum its
    first step in another order than the undisturbed run and drift from it by rounding.

    It also times the all-reduce: ``take_seconds()`` is the span from the first bucket's
    launch to the last bucket's completion since the previous call (one step's all-reduce;
    on the rank that starts first it includes waiting for the others to join).
    """

    def __init__(self, dtype: torch.dtype | None = None) -> None:
        self.dtype = dtype
        self._lock = threading.Lock()
        self._first: float | None = None
        self._last = 0.0
        self._failure: BaseException | None = None  # the group broke: every later bucket fails at once

    def hook(self, group: Any, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
        buffer = bucket.buffer()
        world = dist.get_world_size(group)
        tensor = buffer.div_(world) if self.dtype is None else buffer.to(self.dtype).div_(world)
        start = time.perf_counter()  # the all-reduce itself, not the division before it
        with self._lock:
            if self._first is None:
                self._first = start
        if self._failure is not None:
            return failed(self._failure)
        if world >= 3:
            fut = ordered_all_reduce(tensor, group)
        else:  # two addends sum the same in either order
            fut = dist.all_reduce(tensor, group=group, async_op=True).get_future()

        def done(f: torch.futures.Future[Any]) -> torch.Tensor:
            try:
                f.value()
            except BaseException as e:
                self._failure = e
                raise
            out = tensor
            with self._lock:
                self._last = max(self._last, time.perf_counter())
            if self.dtype is None:
                return out
            buffer.copy_(out)
            return buffer

        return fut.then(done)

    def take_seconds(self) -> float:
        with self._lock:
            first, last = self._first, self._last
            self._first, self._last = None, 0.0
        return 0.0 if first is None else max(last - first, 0.0)
