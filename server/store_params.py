"""What a parameter store holds of its job's model: the trainable parameters (one flat float32
tensor, which torch.optim steps whole or as its tensors' views: ``flat_optimizer``), the frozen
ones, the buffers, the optimizer and its schedule, and the versions they went through; a
shard's store, its slice of them. How they are installed (fresh from worker 0, or from a
checkpoint: the whole model's or the slice the server cut for this shard), stepped with a
gradient, and read. When an update happens is the mode's: ``gradhub.server.store.ParameterStore``
builds on this.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch

from gradhub.proto.codec import Layout
from gradhub.proto.contract.errors import NotFoundError, ProtocolError, StateError
from gradhub.proto.contract.optim import (
    build_optimizer,
    build_scheduler,
    clip_gradients,
    parameter_groups,
)
from gradhub.proto.model_state import ModelLayout
from gradhub.proto.shards import Shard, shards_of, split_optimizer_state
from gradhub.server.flat_optimizer import FlatOptimizer
from gradhub.server.store_config import CheckpointState, StoreConfig
from gradhub.server.workers import WorkerTable

log = logging.getLogger(__name__)

SMALL_TENSOR = 1 << 16  # elements
# a gradient up to this size keeps its views for the next step's (``_grad_views``)
KEPT_VIEWS_BYTES = 1 << 20


class StoreParams(WorkerTable):
    """The model's state in a store; every mutation happens under ``_cond`` (``WorkerTable``'s)."""

    def __init__(self, config: StoreConfig, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(config.job_id, config.world_size, clock)
        self.config = config
        self._layout: Layout | None = None
        self._model: ModelLayout | None = None  # what this store holds of the model
        self._whole: ModelLayout | None = None  # the whole model (a shard's is a slice of it)
        self._shard: Shard | None = None  # ps_shards > 1: this store's slice
        self._frozen: dict[str, torch.Tensor] = {}
        self._buffers: dict[str, torch.Tensor] = {}
        self._flat: torch.Tensor | None = None
        self._params: list[torch.nn.Parameter] = []
        self._optimizer: torch.optim.Optimizer | None = None
        self._stepper: FlatOptimizer | None = None  # steps ``_optimizer`` over ``_flat`` when it can
        self._scheduler: Any = None
        self._version: int = 0
        self._parts: tuple[tuple[int, int], ...] = ()  # the fragments, as (first tensor, count)
        self._last_ckpt_step: int = -1  # the step of the latest checkpoint taken (or resumed from)
        self._resume: CheckpointState | None = None
        self._history: dict[int, torch.Tensor] = {}  # version -> parameters (keep_history)
        self._views: tuple[tuple[int, int, tuple[int, int]], list[torch.Tensor]] | None = None

    @property
    def initialized(self) -> bool:
        return self._flat is not None

    @property
    def layout(self) -> Layout | None:
        return self._layout

    @property
    def version(self) -> int:
        return self._version

    @property
    def model(self) -> ModelLayout | None:
        """The whole model's layout (a shard holds a slice of it), once initialized."""
        return self._whole

    @property
    def shard(self) -> Shard | None:
        """This store's slice of the parameters when the job has several shards."""
        return self._shard

    @property
    def steps_flat(self) -> bool:
        """Whether the optimizer steps the flat vector now rather than the tensors
        (``gradhub.server.flat_optimizer``)."""
        return self._stepper is not None and self._stepper.flat

    def lr(self) -> float | None:
        """The learning rate of the first parameter group now (None before the parameters)."""
        with self._cond:
            return None if self._optimizer is None else float(self._optimizer.param_groups[0]["lr"])

    def initialize(self, layout: Layout | ModelLayout, flat: torch.Tensor, frozen: torch.Tensor | None = None,
                   buffers: Mapping[str, torch.Tensor] | None = None) -> bool:
        """Take the initial state: the trainable parameters ``flat`` (in ``layout``'s order), the
        frozen ones and the buffers; False (and nothing changes) when already initialized.
        A shard (``config.shards > 1``) is given the whole model's ``layout`` and its own slice
        of the parameters as ``flat``; shard 0 alone takes the frozen ones and the buffers."""
        whole = layout if isinstance(layout, ModelLayout) else ModelLayout(trainable=layout)
        shard, model = self._own(whole)
        buffers = dict(buffers or {}) if model.buffers or not shard else {}
        model.check_buffers(buffers, "buffers")
        frozen_numel = model.frozen.numel if model.frozen else 0
        if (0 if frozen is None else frozen.numel()) != frozen_numel:
            raise ProtocolError(f"frozen: {0 if frozen is None else frozen.numel()} values for "
                                f"{frozen_numel} frozen parameter values")
        with self._cond:
            if self._flat is not None:
                return False
            self._whole, self._shard = whole, shard
            if self._resume is not None:
                self._install_resume(model, self._resume)  # the frozen values and buffers resumed
                self._resume = None
            else:
                self._install(model.trainable, flat.to(torch.float32).clone())
                self._frozen = {} if model.frozen is None or frozen is None else \
                    {k: v.clone() for k, v in model.frozen.split(frozen.to(torch.float32)).items()}
                self._buffers = {k: v.clone() for k, v in buffers.items()}
            self._model = model
            self._changed()
            return True

    def _own(self, whole: ModelLayout) -> tuple[Shard | None, ModelLayout]:
        """What this store holds of the model ``whole``: all of it, or its shard's slice."""
        c = self.config
        if c.shards == 1:
            return None, whole
        shard = shards_of(whole.trainable, c.shards)[c.shard]
        if c.shard:
            return shard, ModelLayout(trainable=shard.layout)
        return shard, ModelLayout(trainable=shard.layout, frozen=whole.frozen, buffers=whole.buffers)

    def resume_from(self, state: CheckpointState, total_steps: int) -> None:
        """Resume from a checkpoint: version, clocks and schedule now; the parameters and
        optimizer state are installed when worker 0 sends its layout (``initialize``),
        so a model that no longer matches the checkpoint is caught by name and shape."""
        with self._cond:
            if self._flat is not None:
                raise StateError("parameters: cannot resume a store that already has parameters")
            if len(state.clocks) != len(self._workers):
                raise StateError(f"workers: checkpoint has {len(state.clocks)} workers, job has {len(self._workers)}")
            self._total_steps = total_steps
            self._resume = state
            self._version = state.version
            self._last_ckpt_step = state.step  # that checkpoint exists: not taken again
            for w, c in zip(self._workers, state.clocks, strict=True):
                w.clock = c
            self._changed()

    def _install_resume(self, model: ModelLayout, state: CheckpointState) -> None:
        """Install a checkpoint (``state``): the whole model's (all of it, or this shard's slice of
        it), or the slice the server cut for this shard (``slice_of``)."""
        assert self._whole is not None
        frozen: dict[str, torch.Tensor] = {}
        buffers: dict[str, torch.Tensor] = {}
        if state.slice_of is not None:
            trainable, optimizer_state = self._check_slice(state.slice_of, state.params), state.optimizer_state
        else:
            trainable, frozen, buffers = self._whole.split_state(state.params)
            optimizer_state = state.optimizer_state
            if self._shard is not None:
                optimizer_state = split_optimizer_state(self._whole.trainable, self.config.param_groups, self._shard,
                                                        optimizer_state)
                trainable = self._shard.pieces(trainable)
                if self._shard.index:
                    frozen, buffers = {}, {}
        # (torch.empty(0) first: the control store of a sharded job has no tensor to join)
        flat = torch.cat([torch.empty(0), *(trainable[n].reshape(-1).to(torch.float32) for n in model.trainable.names)])
        self._install(model.trainable, flat)
        self._frozen = {k: v.to(torch.float32).clone() for k, v in frozen.items()}
        self._buffers = {k: v.clone() for k, v in buffers.items()}
        assert self._stepper is not None
        self._stepper.load_state_dict(optimizer_state)  # (foreach, whatever the checkpoint's groups say)
        if self._scheduler is not None and state.scheduler_state is not None:
            self._scheduler.load_state_dict(state.scheduler_state)

    def _check_slice(self, slice_of: tuple[int, int], pieces: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The pieces of a checkpoint cut for shard ``slice_of`` (index, count), once they are
        this shard's of this model."""
        here = (self.config.shard, self.config.shards)
        if slice_of != here or self._shard is None:
            raise ProtocolError(f"state: the checkpoint's slice for shard {slice_of[0]} of {slice_of[1]}, this is "
                                f"shard {here[0]} of {here[1]}")
        expected = dict(zip(self._shard.layout.names, self._shard.layout.numels, strict=True))
        got = {n: t.numel() for n, t in pieces.items()}
        if got != expected:
            raise ProtocolError(f"state: shard {here[0]}'s slice of the checkpoint holds {got} values by tensor, "
                                f"its slice of the model {expected}: the checkpoint does not match the model")
        return pieces

    def _install(self, layout: Layout, flat: torch.Tensor) -> None:
        if flat.numel() != layout.numel:
            raise ProtocolError(f"byte count: {flat.numel()} values for a model of {layout.numel}")
        if self._total_steps is None:
            raise StateError("total_steps: unknown until a worker registers")
        flat = flat.contiguous()
        params = [torch.nn.Parameter(p, requires_grad=True) for p in layout.split(flat).values()]
        c = self.config
        # built before anything is kept: parameter groups that match nothing raise SpecError
        whole = None if self._shard is None or self._whole is None else self._whole.trainable.names
        named = list(zip(layout.names, params, strict=True))
        # the control store of a sharded job holds no trainable value: an optimizer of one empty
        # group all the same, whose schedule the job's learning rate is read from
        groups: list[Any] = parameter_groups(named, c.param_groups, shard_of=whole) or [{"params": []}]
        optimizer = build_optimizer(groups, c.optimizer, c.lr, c.hyper, foreach=True)
        updates = self._total_steps * (1 if c.mode == "ps-sync" else c.world_size)
        scheduler = build_scheduler(optimizer, c.schedule, max(updates, 1))
        self._parts = layout.partition(c.fragments)  # more fragments than tensors: a SpecError
        self._layout, self._flat, self._params = layout, flat, params
        self._optimizer, self._scheduler = optimizer, scheduler
        self._stepper = FlatOptimizer(optimizer, flat, params)
        self._views = None  # views cut for another layout are not this one's
        self._keep_version()

    def _check_buffer_values(self, buffers: Mapping[str, torch.Tensor] | None) -> None:
        for name, t in (buffers or {}).items():
            if t.dtype.is_floating_point and not bool(torch.isfinite(t).all()):
                raise ProtocolError(f"buffers: non-finite value (NaN or Inf) in buffer '{name}'; nothing was applied")

    def _check_finite(self, grad: torch.Tensor, layout: Layout) -> None:
        # One vectorized pass: NaN and Inf propagate through a sum. Only when the sum is not
        # finite (a bad value, or an overflow of huge finite ones) look element by element.
        # A small gradient is checked in numpy, where a call costs a few microseconds.
        if grad.numel() <= SMALL_TENSOR and bool(np.isfinite(grad.numpy()).all()):
            return
        if bool(torch.isfinite(grad.sum())):
            return
        finite = torch.isfinite(grad)
        if not bool(finite.all()):
            first = int((~finite).nonzero()[0, 0])
            raise ProtocolError(
                f"gradient values: non-finite value (NaN or Inf) in tensor "
                f"'{layout.name_at(first)}'; nothing was applied"
            )

    def _step_params(self, grad: torch.Tensor, unused: frozenset[int], part: tuple[int, int]) -> None:
        """The optimizer's step over the tensors ``part`` with ``grad``. A step of every tensor
        is taken over the flat vector (``FlatOptimizer``); otherwise the parameters' ``.grad``
        become views of ``grad``, so a received gradient is used where it landed, without a
        copy. Parameters in ``unused`` (model indexes) get ``grad = None``: torch.optim leaves
        them as they are."""
        assert self._optimizer is not None and self._stepper is not None
        clip = self.config.clip_grad_norm if self.config.shards == 1 else None  # over shards, it came scaled
        whole = part == (0, 0) or part == (0, len(self._params))
        if self._stepper.flat and whole and not unused:
            if clip is not None:  # torch's norm is the tensors' norms' norm: taken over the views
                self._set_grads(grad, unused, part)
                clip_gradients(self._params, clip)
                self._set_grads(None, unused, part)
            self._stepper.step(grad)
            return
        if self._stepper.flat:
            self._stepper.to_tensors(why="a step left tensors out" if unused else "a step of part of the model")
            log.info("job %s: the optimizer steps the parameters tensor by tensor from version %d on: %s",
                     self.config.job_id, self._version, self._stepper.why_not)
        self._set_grads(grad, unused, part)
        clip_gradients(self._params, clip)
        self._optimizer.step()
        self._set_grads(None, unused, part)  # the gradient's memory goes back to whoever received it

    def _set_grads(self, grad: torch.Tensor | None, unused: frozenset[int], part: tuple[int, int]) -> None:
        """The parameters' ``.grad``: ``grad``'s views for the tensors of ``part`` not in
        ``unused``, None for the others (and for all when ``grad`` is None)."""
        if grad is None:
            for param in self._params:
                param.grad = None
            return
        views = self._grad_views(grad, part)
        first, count = part[0], len(views)
        for i, param in enumerate(self._params):
            param.grad = views[i - first] if first <= i < first + count and i not in unused else None

    def _grad_views(self, grad: torch.Tensor, part: tuple[int, int]) -> list[torch.Tensor]:
        """``grad`` as views shaped as the tensors of ``part``. A small gradient's are kept: the
        next step's usually lands in the same buffer (the data plane reuses a connection's), and
        a buffer the views hold cannot be another's (the views keep it alive)."""
        assert self._layout is not None
        key = (grad.data_ptr(), grad.numel(), part)
        if self._views is not None and self._views[0] == key:
            return self._views[1]
        views = list(self._layout.part(*part).split(grad).values())
        self._views = (key, views) if grad.numel() * grad.element_size() <= KEPT_VIEWS_BYTES else None
        return views

    def _keep_version(self) -> None:
        if self.config.keep_history and self._flat is not None:
            self._history[self._version] = self._flat.clone()

    def global_at(self, version: int) -> torch.Tensor:
        """The parameters at ``version`` (kept with ``keep_history`` since ``trim_history``)."""
        with self._cond:
            kept = self._history.get(version)
        if kept is None:
            raise NotFoundError(f"version: the parameters of version {version} are not kept any more")
        return kept

    def trim_history(self, before: int) -> None:
        """Forget the parameters of versions before ``before``."""
        with self._cond:
            for version in [v for v in self._history if v < before]:
                del self._history[version]

    def parameters(self) -> dict[str, torch.Tensor]:
        """A copy of the current trainable parameters by name."""
        with self._cond:
            if self._flat is None or self._layout is None:
                raise StateError("parameters: the job has no parameters yet")
            return {k: v.clone() for k, v in self._layout.split(self._flat).items()}

    def state_dict(self) -> dict[str, torch.Tensor]:
        """A copy of the model's whole ``state_dict`` as the job holds it now."""
        with self._cond:
            return self._state_dict()

    def _state_dict(self) -> dict[str, torch.Tensor]:
        """The model's whole ``state_dict``; a shard's slice of the trainable parameters as its
        pieces (flat, by name), with the frozen ones and the buffers on shard 0
        (``gradhub.server.shard_set`` merges the shards' into the model's)."""
        if self._flat is None or self._layout is None or self._model is None:
            raise StateError("parameters: the job has no parameters yet")
        params = {k: v.clone() for k, v in self._layout.split(self._flat).items()}
        return self._model.state_dict(params, self._frozen, {k: v.clone() for k, v in self._buffers.items()})
