"""A ps worker's gradient pushed in buckets while backward still runs (DDP's gradient buckets,
BytePS's partitions), so the bytes of the last layers are on the wire while the first ones are
computed.

Buckets are runs of whole tensors of at most ``bucket_mb`` (a larger tensor is a bucket of its
own), taken from the model's last tensor backwards, the order in which backward makes their
gradients ready. A bucket is pushed (on a thread of its own) once every gradient in it is
accumulated in the step's last micro-batch; the bucket that holds the model's first tensors,
ready last, is pushed after backward together with the step's pull (one round trip, as a whole
push is). A bucket whose parameters got no gradient goes after backward too, naming them
unused. The server takes the step once its buckets cover the model (``ParameterStore.push``),
so the result is the whole push's, bit for bit.

In ps-sync on the data plane (``pull_buckets``) the server applies each bucket as soon as every
worker's copy of it is in, and a pull thread, on a connection of its own (pushes go out while
parameters come in), asks for each bucket's new parameters once the bucket is ready here: the
server answers when it has applied it, while backward goes on. The round trip after backward
then carries the first layers' bucket alone, not the whole model, and the next forward goes on
at once: a module's forward pre-hook waits for its own bucket's parameters only and puts them
in the model (the weights are backward's until it ends). ``land()`` puts in what is still
coming (before an evaluation, and at the end). A model of one bucket (smaller than
``bucket_mb``), and fp16 loss scaling (whose gradients are final only after the overflow check),
push the whole gradient after backward.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Self

import torch

from gradhub.proto.codec import Layout
from gradhub.worker.flat import FlatModel
from gradhub.worker.server_link import Pulled, ServerLink


def bucket_runs(layout: Layout, cap_bytes: int) -> list[tuple[int, int]]:
    """(first tensor, count) of each bucket, in push order: the last tensors first."""
    runs: list[tuple[int, int]] = []
    end = start = len(layout.names)
    size = 0
    for i in reversed(range(len(layout.names))):
        nbytes = layout.numels[i] * 4
        if start < end and size + nbytes > cap_bytes:
            runs.append((start, end - start))
            end, size = start, 0
        start, size = i, size + nbytes
    runs.append((start, end - start))
    return runs


class BucketPusher:
    """Pushes one worker's steps: its buckets during backward, the last one with the pull."""

    def __init__(self, client: ServerLink, flat: FlatModel, cap_bytes: int, accumulate: int = 1,
                 enabled: bool = True, pull_buckets: bool = False) -> None:
        self.client, self.flat, self.accumulate = client, flat, accumulate
        layout = flat.layout
        self.runs = bucket_runs(layout, cap_bytes) if enabled else [(0, len(layout.names))]
        self._layouts = [layout if count == len(layout.names) else layout.part(first, count)
                         for first, count in self.runs]
        self._starts = [layout.offset(first) for first, _ in self.runs]  # in the flat gradient
        self._owner = [0] * len(layout.names)
        for b, (first, count) in enumerate(self.runs):
            self._owner[first:first + count] = [b] * count
        self._pool: ThreadPoolExecutor | None = None
        if len(self.runs) > 1:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="gradhub-push")
            for i, p in enumerate(flat.trainable.values()):
                p.register_post_accumulate_grad_hook(self._ready_hook(i))
        self._armed = False
        self._step = self._version = 0
        self._remaining: list[int] = []
        self._sent: list[Future[bool]] = []
        self._pushed: set[int] = set()
        # pull_buckets: each bucket but the last's parameters of the next step, pulled as it is applied
        self._pull_buckets = pull_buckets and self._pool is not None
        self._pull_next = False
        self._incoming = [torch.empty(lay.numel, dtype=flat.params.dtype, device=flat.params.device)
                          for lay in self._layouts[:-1]] if self._pull_buckets else []
        self._pulls: dict[int, Future[Pulled]] = {}
        self._puller = ThreadPoolExecutor(1, thread_name_prefix="gradhub-pull") if self._pull_buckets else None
        self._due: dict[int, Future[Pulled]] = {}  # pulled beside, not in the model yet
        if self._pull_buckets:
            index = {id(p): i for i, p in enumerate(flat.trainable.values())}
            for module in flat.model.modules():
                mine = sorted({self._owner[index[id(p)]] for p in module.parameters(recurse=False) if id(p) in index})
                if mine:
                    module.register_forward_pre_hook(self._landing_hook(mine))

    @property
    def bucketed(self) -> bool:
        return self._pool is not None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        for pool in (self._pool, self._puller):  # not waited for: after a failure a call may be retrying
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)

    def begin(self, step: int, version: int, pull_next: bool = True) -> None:
        """A step starts: its gradient was computed on parameters of ``version``; ``pull_next``:
        the next step's parameters follow it (not after a worker's last step)."""
        self._step, self._version = step, version
        self._remaining = [count for _, count in self.runs]
        self._sent, self._pushed, self._pulls = [], set(), {}
        self._armed = False
        self._pull_next = pull_next

    @contextlib.contextmanager
    def micro_batch(self, i: int) -> Iterator[None]:
        """Around micro-batch ``i``'s forward and backward: buckets go out during the last one's."""
        self._armed = i == self.accumulate - 1
        try:
            yield
        finally:
            self._armed = False

    def finish(self, buffers: Mapping[str, torch.Tensor] | None, unused: Sequence[int],
               params: torch.Tensor | None) -> Pulled | None:
        """After backward: the buckets not pushed yet, then the last one with this worker's
        buffers and, with ``params``, the pull of the next step's parameters into them."""
        for sent in self._sent:
            sent.result()  # raises a push's failure
        unused = sorted(unused)
        for b in range(len(self.runs) - 1):
            if b not in self._pushed:
                self._push(b, unused)
        last = len(self.runs) - 1
        layout, first, grads, mine = self._bucket(last, unused)
        if params is None:
            self.client.push(layout, self._step, self._version, grads, buffers, mine, first=first)
            return None
        if self._pull_buckets and set(self._pulls) == set(range(last)):  # the others' parameters come beside
            start = self._starts[last]
            pulled = self.client.push_pull(layout, self._step, self._version, grads, params[start:start + layout.numel],
                                           buffers, mine, first=first, pull_part_only=True)
            self._due = dict(self._pulls)  # each lands when its modules' forward needs it
            return pulled
        return self.client.push_pull(layout, self._step, self._version, grads, params, buffers, mine, first=first,
                                     pull_layout=self.flat.layout)

    def _ready_hook(self, i: int):  # type: ignore[no-untyped-def]
        def ready(_: torch.Tensor) -> None:
            if not self._armed:
                return
            self.flat.gather_grad(i)  # a hook may have replaced .grad: a bucket's bytes are the flat buffer's
            b = self._owner[i]
            self._remaining[b] -= 1
            if self._remaining[b] == 0 and b != len(self.runs) - 1:
                assert self._pool is not None
                self._pushed.add(b)
                self._sent.append(self._pool.submit(self._push, b, ()))
        return ready

    def _bucket(self, b: int, unused: Sequence[int]) -> tuple[Layout, int | None, torch.Tensor, list[int]]:
        first, count = self.runs[b]
        layout, start = self._layouts[b], self._starts[b]
        grads = self.flat.grads[start:start + layout.numel]
        mine = [i - first for i in unused if first <= i < first + count]
        return layout, (None if layout is self.flat.layout else first), grads, mine

    def land(self, buckets: Sequence[int] | None = None) -> None:
        """Put the parameters pulled beside (of ``buckets``; None: all) into the model, once in."""
        for b in sorted(self._due) if buckets is None else buckets:
            coming = self._due.pop(b, None)
            if coming is not None:
                coming.result()  # raises the pull's failure
                start = self._starts[b]
                self.flat.params.data[start:start + self._layouts[b].numel].copy_(self._incoming[b])

    def _landing_hook(self, buckets: list[int]):  # type: ignore[no-untyped-def]
        def landing(_module: torch.nn.Module, _args: object) -> None:
            if self._due:
                self.land(buckets)
        return landing

    def _push(self, b: int, unused: Sequence[int]) -> bool:
        layout, first, grads, mine = self._bucket(b, unused)
        self.land([b])  # a bucket no forward used last step: its incoming buffer is about to be reused
        if self._puller is not None and self._pull_next:  # its parameters of the next step, once applied
            self._pulls[b] = self._puller.submit(self.client.pull_beside, layout, self._step + 1, self._incoming[b],
                                                 first or 0)
        return self.client.push(layout, self._step, self._version, grads, None, mine, first=first)
