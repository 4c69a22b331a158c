"""A worker's connections to a sharded parameter server (``ps_shards: K``): one ``DataLink``
per shard, used in parallel, behind the same calls as one ``DataLink``.

Each call is the whole model's (its header lists every tensor); here it is cut as
``gradhub.proto.shards`` cuts the flat vector: ``links[0]`` is the server's control store,
which holds no value and gets a push of none with the buffers, and shard k (1 to K) gets the
slice [lo_k, hi_k) of the gradient, with the pieces' names and shapes and the parameters that
got no gradient among its pieces; its parameters land straight in the same slice of the
model's flat parameters. The control store answers for the whole (its version, the buffers);
each shard's own version is the base of the next push to it (a shard counts its own updates).

A bucket (a run of the model's tensors, pushed while backward runs) goes to each shard as the
pieces of it that the shard holds, a bucket of that shard's slice; the step's last bucket goes
to the control store too and brings every shard's parameters back. A quantised push has each
shard's slice quantised on its own (``encode``).

A ps-sync job that clips its gradient (``clip``: ``RegisterResponse.clip_across_shards``)
takes two round trips a step: each shard answers the push with its slice's sum of squares of
the step's mean gradient, and the pull of the next step brings every shard the sum of them
(in shard order, as every worker adds them), with which each scales its slice and takes the
step (``gradhub.server.shard_clip``). In ps-async and ps-ssp the push header names the whole
gradient's sum of squares instead (``ServerLink`` computes it; of the values the shards decode
when the push is quantised, ``decoded_sum_of_squares``), which every shard's copy of the
header carries.

A job that clips pushes in buckets too: in ps-sync the push that completes a shard's slice of
the step is answered with its part (the others at once), and the pull after the last bucket
brings the total; in the async modes the push that completes a shard's slice waits here for
the step's last bucket, when the whole gradient's norm is known, and goes with it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeVar

import torch

from gradhub.proto.codec import QUANT_BITS, Layout, as_wire
from gradhub.proto.contract.errors import ProtocolError
from gradhub.proto.quant import BlockQuant
from gradhub.proto.shards import Shard, shards_of, sum_of_squares, total_of_parts
from gradhub.proto.v1 import data_pb2, ps_pb2
from gradhub.worker.data_link import DataLink, ServerWaitTimeout
from gradhub.worker.push_codec import PushEncoder

T = TypeVar("T")


class ShardedLink:
    """Shard k's data plane is ``links[k]``; ``connect()`` opens every one."""

    def __init__(self, links: Sequence[DataLink], clip: bool = False, push_norm: bool = False,
                 control_first: bool = False) -> None:
        """``clip``: ps-sync clipping over the shards (``RegisterResponse.clip_across_shards``);
        ``push_norm``: async clipping, each push naming its gradient's norm (``clip_push_norm``);
        ``control_first``: a push reaches the shards once the control store took it (an
        elastic async job, ``RegisterResponse.control_first``)."""
        if len(links) < 2:
            raise ValueError("a sharded link needs two links or more")
        self.links, self.clip, self.push_norm, self.control_first = list(links), clip, push_norm, control_first
        self._stepping: _BucketedStep | None = None  # a job that clips: its step's buckets so far
        self._pool = ThreadPoolExecutor(len(links) - 1, thread_name_prefix="gradhub-shard-link")
        self._cut: tuple[tuple[tuple[str, ...], tuple[tuple[int, ...], ...]], tuple[Shard, ...]] | None = None
        self._bases = [0] * len(links)  # each shard's version at this worker's latest pull from it

    @property
    def kind(self) -> str:
        kinds = sorted({link.kind for link in self.links})
        return f"{'+'.join(kinds)} ({len(self.links) - 1} shards)"  # and the server's control store

    @property
    def where(self) -> str:
        return ", ".join(link.where for link in self.links)

    @property
    def connected(self) -> bool:
        return all(link.connected for link in self.links)

    def connect(self) -> None:
        self._each(lambda k, link: None if link.connected else link.connect())

    def close(self) -> None:
        for link in self.links:
            link.close()
        self._pool.shutdown(wait=False)

    # ------------------------------------------------------------------ requests
    def encode(self, encoder: PushEncoder, grads: torch.Tensor, layout: Layout, first: int = 0) -> torch.Tensor:
        """A quantised push's payload: each shard's slice quantised on its own (its blocks start
        at the slice's start, so each shard decodes its own bytes), the payloads one after the
        other in shard order; a bucket (``layout``, from the model's tensor ``first`` on) each
        shard's pieces of it on their own. Error feedback keeps a residual per slice (and per
        bucket's pieces)."""
        if self._is_bucket_of(first, len(layout.names)):
            return torch.cat([encoder.encode(grads[a:b], piece, key=(k, piece)) for k, _, _, piece, a, b in
                              self._bucket_pieces(first, len(layout.names))])
        return torch.cat([encoder.encode(grads[s.lo:s.hi], s.layout, key=(k, s.layout))
                          for k, s in enumerate(self._shards(layout.metas(0)))])

    def decoded_sum_of_squares(self, quant: BlockQuant, payload: torch.Tensor, layout: Layout,
                               first: int = 0) -> float:
        """The sum of squares of what the shards decode from ``payload`` (``encode``'s), each its
        slice's bytes (a bucket's: its pieces'), added in shard order: the norm an async shard
        clips its slice by (of a bucket: its part of it)."""
        if self._is_bucket_of(first, len(layout.names)):
            counts = [b - a for *_, a, b in self._bucket_pieces(first, len(layout.names))]
        else:
            counts = [s.hi - s.lo for s in self._shards(layout.metas(0))]
        return sum_of_squares(quant.decode(payload[where].clone(), n)  # its own bytes, aligned
                              for where, n in zip(_byte_slices(quant, counts), counts, strict=True))

    def init(self, header: ps_pb2.PushHeader, flat: torch.Tensor) -> data_pb2.DataReply:
        """``flat``: the trainable parameters, then the frozen ones (the control store takes those)."""
        shards = self._shards(header.tensors)
        n = shards[-1].hi

        def one(k: int, link: DataLink) -> data_pb2.DataReply:
            s = shards[k]
            part = flat[s.lo:s.hi] if k else torch.cat([flat[s.lo:s.hi], flat[n:]])
            return link.init(header, part.contiguous())
        return self._each(one)[0]

    def push(self, header: ps_pb2.PushHeader, grads: torch.Tensor, wire_dtype: int,
             then_pull: tuple[Layout, torch.Tensor] | None = None, params_dtype: int | None = None,
             ) -> data_pb2.DataReply:
        if self._is_bucket(header):
            return self._push_bucket(header, grads, wire_dtype, then_pull, params_dtype)
        shards = self._shards(header.tensors)
        slices = self._slices(header, shards)
        if self.clip:
            return self._push_clipped(header, shards, grads, slices, wire_dtype, then_pull, params_dtype)

        def one(k: int, link: DataLink) -> data_pb2.DataReply:
            s = shards[k]
            return self._push_to(k, link, s, self._header(header, s, s.unused(header.unused)), grads[slices[k]],
                                 wire_dtype, then_pull, params_dtype)
        return self._each(one, self.control_first)[0]

    def pull(self, request: ps_pb2.PullRequest, layout: Layout, params: torch.Tensor) -> data_pb2.DataReply:
        if request.tensor_count:
            raise ProtocolError("tensor_count: a sharded job pulls the whole model at once")
        shards = self._shards(layout.metas(0))
        return self._each(lambda k, link: self._pull_one(k, link, request, shards[k], params))[0]

    # ------------------------------------------------------------------ buckets
    def _is_bucket(self, header: ps_pb2.PushHeader) -> bool:
        """A push of a run of the model's tensors (a bucket), not of the whole model."""
        return self._is_bucket_of(header.first_tensor, len(header.tensors))

    def _is_bucket_of(self, first: int, count: int) -> bool:
        return bool(first) or (self._cut is not None and count != len(self._cut[0][0]))

    def _bucket_pieces(self, first: int, count: int) -> list[tuple[int, int, int, Layout, int, int]]:
        """Where the bucket of the model's tensors ``first`` to ``first + count - 1`` lies on the
        shards, in shard order, for each shard that holds pieces of it: (shard, its first piece
        j, how many n, their layout, where their values start and end in the bucket's). The
        bucket of the model's first tensor, the step's last, goes to the control store too (no
        piece: its push of the step)."""
        if self._cut is None:
            raise ProtocolError("first_tensor: a bucket before the model's tensors are known (pull first)")
        (names, shapes), shards = self._cut
        if first + count > len(names):
            raise ProtocolError(f"first_tensor: tensors {first} to {first + count - 1} of a model of {len(names)}")
        start = Layout(names, shapes).offset(first)  # where the bucket's values start in the flat gradient
        out: list[tuple[int, int, int, Layout, int, int]] = []
        if first == 0:  # the step's last bucket: the control store's push (no value; the buffers) with it
            out.append((0, 0, 0, shards[0].layout, 0, 0))
        for k, s in enumerate(shards[1:], start=1):
            lo, hi = max(first, s.first), min(first + count, s.first + len(s.layout.names))
            if lo < hi:
                j, n = lo - s.first, hi - lo  # its pieces j to j + n - 1
                at = s.lo + sum(s.layout.numels[:j]) - start
                out.append((k, j, n, s.layout.part(j, n), at, at + sum(s.layout.numels[j:j + n])))
        return out

    def _push_bucket(self, header: ps_pb2.PushHeader, grads: torch.Tensor, wire_dtype: int,
                     then_pull: tuple[Layout, torch.Tensor] | None, params_dtype: int | None,
                     ) -> data_pb2.DataReply:
        """A bucket of a step (``gradhub.worker.buckets``): each shard gets the pieces of it
        that it holds, as a bucket of its own slice (a shard that holds none gets nothing;
        quantised: the bytes ``encode`` made of those pieces). With ``then_pull`` (the step's
        last bucket, after backward) every shard's slice of the next step's parameters comes
        back: with the push where it has pieces of it, else on a pull of its own."""
        first = header.first_tensor
        found = self._bucket_pieces(first, len(header.tensors))
        pieces = {k: (j, n) for k, j, n, _, _, _ in found}
        wheres = [slice(a, b) for *_, a, b in found]
        if header.quant_block:  # the pieces' bytes, one shard's after the other's (``encode``)
            wheres = _byte_slices(BlockQuant(header.tensors[0].dtype, header.quant_block),
                                  [b - a for *_, a, b in found])
        payloads = {k: grads[where] for (k, *_), where in zip(found, wheres, strict=True)}
        assert self._cut is not None
        shards = self._cut[1]
        if self.clip or self.push_norm:
            mine = {k: self._header(header, shards[k], self._unused_in(header, shards[k], j, n), j, n)
                    for k, (j, n) in pieces.items()}
            if self.clip:
                return self._push_bucket_clipped(header, mine, payloads, wire_dtype, then_pull, params_dtype)
            return self._push_bucket_normed(header, mine, payloads, wire_dtype, then_pull, params_dtype)

        def one(k: int, link: DataLink) -> data_pb2.DataReply | None:
            s = shards[k]
            if k not in pieces:  # none of the bucket's tensors here
                return None if then_pull is None else self._pull_next(k, link, s, header, wire_dtype, then_pull,
                                                                      params_dtype)
            j, n = pieces[k]
            return self._push_to(k, link, s, self._header(header, s, self._unused_in(header, s, j, n), j, n),
                                 payloads[k], wire_dtype, then_pull, params_dtype)
        replies = [r for r in self._each(one, self.control_first) if r is not None]
        return replies[0]  # the control store's with the step's last bucket (the model's first tensor)

    @staticmethod
    def _unused_in(header: ps_pb2.PushHeader, s: Shard, j: int, n: int) -> list[int]:
        """The bucket's parameters without gradient (``header.unused``) that are among shard
        ``s``'s pieces ``j`` to ``j + n - 1``, as indexes among those pieces."""
        first = header.first_tensor
        return [t - s.first - j for u in header.unused if s.first + j <= (t := first + u) < s.first + j + n]

    def _step_of(self, step: int) -> _BucketedStep:
        if self._stepping is None or self._stepping.step != step:
            self._stepping = _BucketedStep(step, len(self.links))
        return self._stepping

    def _push_bucket_clipped(self, header: ps_pb2.PushHeader, mine: dict[int, ps_pb2.PushHeader],
                             payloads: dict[int, torch.Tensor], wire_dtype: int,
                             then_pull: tuple[Layout, torch.Tensor] | None, params_dtype: int | None,
                             ) -> data_pb2.DataReply:
        """A bucket of a ps-sync job that clips over shards (``mine``: each shard's header of
        its pieces). The push that completes a shard's slice of the step is answered with its
        part of the norm, once every worker's slice is in (the others at once); once every
        shard's part is here (after the step's last bucket) the pull of the next step brings
        them the total, as after a whole push (``_push_clipped``)."""
        state = self._step_of(header.step)

        def one(k: int, link: DataLink) -> data_pb2.DataReply | None:
            return None if k not in mine else self._push_waiting(link, mine[k], payloads[k], wire_dtype)
        replies = self._each(one)
        for k, reply in enumerate(replies):
            if reply is not None and reply.HasField("clip_part_sq"):
                state.parts[k] = reply.clip_part_sq
        pushed = [r for r in replies if r is not None]
        if len(state.parts) < len(self.links):
            if then_pull is not None:
                missing = sorted(set(range(len(self.links))) - set(state.parts))
                raise ProtocolError(f"first_tensor: the step's last bucket left shards {missing} without their "
                                    "part of the norm (every bucket of a step comes before the last)")
            return pushed[0]
        reply = self._pull_with_total(header, [state.parts[k] for k in range(len(self.links))], wire_dtype,
                                      then_pull, params_dtype)
        reply.accepted = pushed[0].accepted
        return reply

    def _push_bucket_normed(self, header: ps_pb2.PushHeader, mine: dict[int, ps_pb2.PushHeader],
                            payloads: dict[int, torch.Tensor], wire_dtype: int,
                            then_pull: tuple[Layout, torch.Tensor] | None, params_dtype: int | None,
                            ) -> data_pb2.DataReply:
        """A bucket of an async job that clips over shards: a shard clips its slice by the norm
        of the worker's whole gradient (``header.clip_norm_sq`` is this bucket's part of it),
        known once the step's last bucket is. So the push that completes a shard's slice waits
        here until then and goes with the norm (the buckets' parts added in tensor order); the
        shard applies the step on it. The others go at once."""
        state = self._step_of(header.step)
        state.norms[header.first_tensor] = header.clip_norm_sq
        shards = self._shards_now()
        now: dict[int, tuple[ps_pb2.PushHeader, torch.Tensor]] = {}
        for k, head in mine.items():
            state.pieces[k].update(range(head.first_tensor, head.first_tensor + len(head.tensors)))
            if len(state.pieces[k]) == len(shards[k].layout.names):
                state.deferred[k] = (head, payloads[k].clone())  # the grads' buffer is the next step's
            else:
                head.ClearField("clip_norm_sq")  # a shard reads the norm with the slice's last piece
                now[k] = (head, payloads[k])
        last = len(state.deferred) == len(self.links)  # every shard's slice is complete
        if then_pull is not None and not last:
            raise ProtocolError("first_tensor: a step's last bucket comes after every other bucket of it")
        if last:
            total = total_of_parts(state.norms[f] for f in sorted(state.norms))
            for head, _ in state.deferred.values():
                head.clip_norm_sq = total
            now = state.deferred
        if not now:
            return data_pb2.DataReply(accepted=True)  # held: its pushes go with the step's last bucket

        def one(k: int, link: DataLink) -> data_pb2.DataReply | None:
            if k not in now:
                return None
            head, payload = now[k]
            return self._push_to(k, link, shards[k], head, payload, wire_dtype, then_pull, params_dtype)
        return next(r for r in self._each(one, self.control_first) if r is not None)

    # ------------------------------------------------------------------ plumbing
    def _slices(self, header: ps_pb2.PushHeader, shards: Sequence[Shard]) -> list[slice]:
        """Where each shard's part of a push's payload is: its slice of the gradient, or of a
        quantised payload (``encode``) its bytes."""
        if not header.quant_block:
            return [slice(s.lo, s.hi) for s in shards]
        wire = header.tensors[0].dtype
        if wire not in QUANT_BITS:
            raise ProtocolError(f"quant_block: {header.quant_block} with a gradient of dtype {wire}")
        return _byte_slices(BlockQuant(wire, header.quant_block), [s.hi - s.lo for s in shards])

    def _push_clipped(self, header: ps_pb2.PushHeader, shards: Sequence[Shard], grads: torch.Tensor,
                      slices: Sequence[slice], wire_dtype: int, then_pull: tuple[Layout, torch.Tensor] | None,
                      params_dtype: int | None) -> data_pb2.DataReply:
        """A step of a job that clips over shards: push every slice, add the shards' sums of
        squares and pull the next step's parameters with the total. Without ``then_pull`` the
        parameters land in a scratch tensor: the shards need the total all the same."""
        def push(k: int, link: DataLink) -> data_pb2.DataReply:
            s = shards[k]
            return self._push_waiting(link, self._header(header, s, s.unused(header.unused)), grads[slices[k]],
                                      wire_dtype)
        pushed = self._each(push)
        for k, reply in enumerate(pushed):
            if not reply.HasField("clip_part_sq"):
                raise ProtocolError(f"clip_part_sq: shard {k} answered a push of a job that clips over shards "
                                    "without its part of the norm")
        reply = self._pull_with_total(header, [r.clip_part_sq for r in pushed], wire_dtype, then_pull, params_dtype)
        reply.accepted = pushed[0].accepted
        return reply

    def _push_waiting(self, link: DataLink, mine: ps_pb2.PushHeader, payload: torch.Tensor,
                      wire_dtype: int) -> data_pb2.DataReply:
        while True:  # each shard answers within a minute; a slow worker is waited for
            try:
                return link.push(mine, payload, wire_dtype)
            except ServerWaitTimeout:
                continue  # pushed again: a copy the shard has is not applied twice

    def _pull_with_total(self, header: ps_pb2.PushHeader, parts: Sequence[float], wire_dtype: int,
                         then_pull: tuple[Layout, torch.Tensor] | None, params_dtype: int | None,
                         ) -> data_pb2.DataReply:
        """The pull of the step after ``header``'s from every shard, bringing each the sum of
        the shards' ``parts`` of the norm (in shard order). Without ``then_pull`` (a worker's
        last step) the parameters land in a scratch tensor: the shards need the total all the
        same."""
        shards = self._shards_now()
        request = ps_pb2.PullRequest(job_id=header.job_id, rank=header.rank, step=header.step + 1,
                                     dtype=as_wire(wire_dtype if params_dtype is None else params_dtype),
                                     clip_total_sq=total_of_parts(parts))
        params = then_pull[1] if then_pull is not None else torch.empty(shards[-1].hi)
        return self._each(lambda k, link: self._pull_one(k, link, request, shards[k], params))[0]

    def _pull_one(self, k: int, link: DataLink, request: ps_pb2.PullRequest, shard: Shard,
                  params: torch.Tensor) -> data_pb2.DataReply:
        while True:  # each shard answers within a minute; a slow worker is waited for
            try:
                reply = link.pull(request, shard.layout, params[shard.lo:shard.hi])
            except ServerWaitTimeout:
                continue
            self._bases[k] = reply.params.version
            return reply

    def _push_to(self, k: int, link: DataLink, s: Shard, mine: ps_pb2.PushHeader, payload: torch.Tensor,
                 wire_dtype: int, then_pull: tuple[Layout, torch.Tensor] | None, params_dtype: int | None,
                 ) -> data_pb2.DataReply:
        """Shard ``k``'s (``s``'s) push (``mine``, ``payload``); with ``then_pull`` its slice of the
        next parameters comes back (pulled again when the server's wait for the others ran out)."""
        into = None if then_pull is None else (s.layout, then_pull[1][s.lo:s.hi])
        try:
            reply = link.push(mine, payload, wire_dtype, into, params_dtype)
        except ServerWaitTimeout:
            if then_pull is None:
                raise
            return self._pull_next(k, link, s, mine, wire_dtype, then_pull, params_dtype)
        if then_pull is not None:
            self._bases[k] = reply.params.version
        return reply

    def _pull_next(self, k: int, link: DataLink, s: Shard, header: ps_pb2.PushHeader, wire_dtype: int,
                   then_pull: tuple[Layout, torch.Tensor], params_dtype: int | None) -> data_pb2.DataReply:
        """Shard ``k``'s (``s``'s) slice of the parameters of the step after ``header``'s."""
        request = ps_pb2.PullRequest(job_id=header.job_id, rank=header.rank, step=header.step + 1,
                                     dtype=as_wire(wire_dtype if params_dtype is None else params_dtype))
        return self._pull_one(k, link, request, s, then_pull[1])

    def _header(self, header: ps_pb2.PushHeader, shard: Shard, unused: Sequence[int], first: int = 0,
                count: int | None = None) -> ps_pb2.PushHeader:
        """The push ``header`` as shard ``shard``'s: of its pieces ``first`` to ``first + count
        - 1`` (all of them by default; a bucket's otherwise), ``unused`` as indexes among those."""
        wire = header.tensors[0].dtype
        pieces = shard.layout if count is None else shard.layout.part(first, count)
        out = ps_pb2.PushHeader(job_id=header.job_id, rank=header.rank, step=header.step,
                                base_version=header.base_version if shard.index == 0 else self._bases[shard.index],
                                tensors=pieces.metas(wire), unused=unused, first_tensor=first,
                                quant_block=header.quant_block, world_size=header.world_size)
        if header.HasField("clip_norm_sq"):  # async clipping: the whole gradient's, for every shard
            out.clip_norm_sq = header.clip_norm_sq
        if shard.index == 0:
            out.buffers.extend(header.buffers)
        return out

    def _shards_now(self) -> tuple[Shard, ...]:
        """The shards of the model this link pushed or pulled last."""
        if self._cut is None:
            raise ProtocolError("tensors: a push before the model's tensors are known (pull first)")
        return self._cut[1]

    def _shards(self, metas: Sequence[object]) -> tuple[Shard, ...]:
        key = (tuple(m.name for m in metas), tuple(tuple(m.shape) for m in metas))  # type: ignore[attr-defined]
        if self._cut is None or self._cut[0] != key:
            self._cut = (key, shards_of(Layout(*key), len(self.links)))
        return self._cut[1]

    def _each(self, call: Callable[[int, DataLink], T], control_first: bool = False) -> list[T]:
        """``call(k, links[k])`` for every store at once (the control in this thread); every call
        ends before the first error is raised. ``control_first``: the control store's call ends
        before the shards' start, and its error is raised with nothing sent to them."""
        out: list[T] = [call(0, self.links[0])] if control_first else []
        futures: list[Future[T]] = [self._pool.submit(call, k, link) for k, link in enumerate(self.links) if k]
        first: BaseException | None = None
        try:
            if not control_first:
                out.append(call(0, self.links[0]))
        except BaseException as e:  # noqa: BLE001 - raised once the other shards' calls are done
            first = e
        for f in futures:
            try:
                out.append(f.result())
            except BaseException as e:  # noqa: BLE001 - the first error is raised
                first = first or e
        if first is not None:
            raise first
        return out


@dataclass
class _BucketedStep:
    """What a worker of a job that clips over shards has pushed of a step's buckets so far."""

    step: int
    shards: int
    parts: dict[int, float] = field(default_factory=dict)  # ps-sync: each shard's part of the norm, by shard
    pieces: list[set[int]] = field(default_factory=list)  # async: each shard's pieces pushed
    norms: dict[int, float] = field(default_factory=dict)  # async: each bucket's part, by its first tensor
    # async: each shard's push that completes its slice, sent with the step's last bucket
    deferred: dict[int, tuple[ps_pb2.PushHeader, torch.Tensor]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.pieces = [set() for _ in range(self.shards)]


def _byte_slices(quant: BlockQuant, counts: Sequence[int]) -> list[slice]:
    """Where the payloads of runs of ``counts`` values, each quantised on its own and sent one
    after the other (``ShardedLink.encode``), lie in the bytes sent."""
    out, at = [], 0
    for n in counts:
        out.append(slice(at, at + quant.nbytes(n)))
        at = out[-1].stop
    return out
