"""The checkpoint store: model parameters, optimizer and scheduler state of each job on disk.

Safetensors for tensors, a JSON manifest written last (a checkpoint exists iff its manifest
does), every file written atomically; nothing is ever pickled.
"""

from __future__ import annotations

import builtins
import hashlib
import json
import logging
import os
import re
import shutil
import struct
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import torch
from safetensors.torch import load_file

from gradhub.proto.contract.errors import NotFoundError, SpecError
from gradhub.proto.state import decode_state, encode_state

__all__ = ["CheckpointInfo", "CheckpointStore", "LoadedCheckpoint"]

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
_JOB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
# data files: ckpt-<step>[.g<n>].safetensors / .optim.safetensors (g<n>: a step saved again,
# whose files sit beside the old ones until its new manifest is in place); manifests: ckpt-<step>.json
_FILE = re.compile(r"ckpt-(\d{10})(?:\.g\d+)?\.(safetensors|optim\.safetensors|json)")
_DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2", torch.uint16: "U16", torch.uint32: "U32", torch.uint64: "U64",
}  # fmt: skip


@dataclass(frozen=True)
class CheckpointInfo:
    """One finished checkpoint, as its manifest describes it; ``path`` is the model file."""

    job_id: str
    step: int
    version: int
    size_bytes: int
    sha256: str
    created_at: float
    path: Path


@dataclass(frozen=True)
class LoadedCheckpoint:
    """A checkpoint read back: states are ready for ``load_state_dict`` (or None if not saved)."""

    info: CheckpointInfo
    params: dict[str, torch.Tensor]
    optimizer_state: dict[str, Any] | None
    scheduler_state: dict[str, Any] | None
    resume_state: dict[str, Any] = field(default_factory=dict)


class CheckpointStore:
    """Checkpoints under ``root/<job_id>/ckpt-<step:010d>.{safetensors,optim.safetensors,json}``.

    Invalid job ids (not ``[A-Za-z0-9][A-Za-z0-9._-]{0,127}``) raise ``SpecError`` (a
    ``ValueError``); a valid id without checkpoints lists as empty and ``get``/``load`` raise
    ``NotFoundError``. Saving a step that already exists replaces it. Writers are serialised by
    a lock; one store per root is assumed (no cross-process locking).
    """

    def __init__(self, root: Path) -> None:
        self._root = Path(root)
        self._lock = threading.Lock()

    @property
    def root(self) -> Path:
        return self._root

    # ----------------------------------------------------------------- writing

    def save(
        self,
        job_id: str,
        step: int,
        version: int,
        params: Mapping[str, torch.Tensor],
        optimizer_state: Mapping[str, Any] | None = None,
        scheduler_state: Mapping[str, Any] | None = None,
        keep: int | None = None,
        resume_state: Mapping[str, Any] | None = None,
    ) -> CheckpointInfo:
        """Write a checkpoint atomically; with ``keep``, then keep only the ``keep`` highest steps.

        ``resume_state`` is small JSON data the server needs to resume (e.g. workers' clocks).
        """
        job_dir = self._job_dir(job_id)
        _check_int("step", step)
        _check_int("version", version)
        if keep is not None and (not isinstance(keep, int) or keep < 1):
            raise ValueError(f"keep must be a positive int or None, got {keep!r}")
        for name, tensor in params.items():
            if not isinstance(name, str) or not isinstance(tensor, torch.Tensor):
                raise TypeError(f"params must map str to Tensor; entry {name!r} is {type(tensor)}")
        # Encode before touching the disk, so unsupported values fail without side effects.
        extra: dict[str, torch.Tensor] = {}
        optim_json = None if optimizer_state is None else encode_state(optimizer_state, "", extra)
        sched_json = (
            None if scheduler_state is None else encode_state(scheduler_state, "scheduler.", extra)
        )
        meta = {"job_id": job_id, "step": str(step), "version": str(version)}
        with self._lock:
            if not job_dir.is_dir():
                job_dir.mkdir(parents=True, exist_ok=True)
                _fsync_dir(job_dir.parent)
            manifest_path = job_dir / f"ckpt-{step:010d}.json"
            self._clean_orphans(job_dir)
            # saving a step again writes new files beside the old ones and then replaces the
            # manifest in one rename: a crash at any point leaves the old checkpoint or the new
            old = self._read_manifest(job_dir, step) if manifest_path.exists() else None
            stem = f"ckpt-{step:010d}" if old is None else f"ckpt-{step:010d}.g{time.time_ns()}"
            written: builtins.list[Path] = []  # removed again if a later write fails (a full disk)
            try:
                size, sha = _atomic_write(
                    job_dir / f"{stem}.safetensors", lambda f: _write_safetensors(f, params, meta)
                )
                written.append(job_dir / f"{stem}.safetensors")
                optim_file = None
                if extra:
                    optim_file = f"{stem}.optim.safetensors"
                    _atomic_write(job_dir / optim_file, lambda f: _write_safetensors(f, extra, meta))
                    written.append(job_dir / optim_file)
                manifest = self._manifest_of(job_id, step, version, size, sha, stem, optim_file, optim_json,
                                             sched_json, resume_state)
                data = json.dumps(manifest, indent=1, allow_nan=False).encode()
                _atomic_write(manifest_path, lambda f: f.write(data))
            except BaseException:
                for path in written:
                    path.unlink(missing_ok=True)
                raise
            if old is not None:  # the replaced checkpoint's files
                self._clean_orphans(job_dir)
            if keep is not None:
                self._prune_locked(job_dir, keep)
            return _info(manifest, job_dir)

    @staticmethod
    def _manifest_of(job_id: str, step: int, version: int, size: int, sha: str, stem: str,
                     optim_file: str | None, optim_json: Any, sched_json: Any,
                     resume_state: Mapping[str, Any] | None) -> dict[str, Any]:
        return {
            "format": FORMAT_VERSION, "job_id": job_id, "step": step, "version": version,
            "size_bytes": size, "sha256": sha, "created_at": time.time(),
            "model_file": f"{stem}.safetensors", "optim_file": optim_file,
            "optimizer": optim_json, "scheduler": sched_json,
            "resume": dict(resume_state or {}),
        }  # fmt: skip

    def prune(self, job_id: str, keep: int) -> None:
        """Delete all but the newest ``keep`` checkpoints of a job, and any crash leftovers."""
        if not isinstance(keep, int) or keep < 0:
            raise ValueError(f"keep must be an int >= 0, got {keep!r}")
        job_dir = self._job_dir(job_id)
        with self._lock:
            if job_dir.is_dir():
                self._prune_locked(job_dir, keep)

    def delete_job(self, job_id: str) -> None:
        """Remove every checkpoint of a job; a job without checkpoints is a no-op."""
        job_dir = self._job_dir(job_id)
        with self._lock:
            if not job_dir.is_dir():
                return
            for manifest in job_dir.glob("ckpt-*.json"):  # checkpoints vanish first
                manifest.unlink(missing_ok=True)
            _fsync_dir(job_dir)
            shutil.rmtree(job_dir)
            _fsync_dir(job_dir.parent)

    # ----------------------------------------------------------------- reading

    def list(self, job_id: str) -> list[CheckpointInfo]:
        """Finished checkpoints of a job in ascending step order; [] for an unknown job."""
        job_dir = self._job_dir(job_id)
        infos = []
        for step in self._manifest_steps(job_dir):
            try:
                infos.append(_info(self._read_manifest(job_dir, step), job_dir))
            except FileNotFoundError:  # pruned while we listed
                continue
            except (ValueError, KeyError, TypeError) as e:
                log.warning(
                    "skipping unreadable checkpoint manifest of job %r step %d: %s", job_id, step, e
                )
        return infos

    def latest(self, job_id: str) -> CheckpointInfo | None:
        """The checkpoint with the highest step, or None when the job has none."""
        infos = self.list(job_id)
        return infos[-1] if infos else None

    def get(self, job_id: str, step: int | None = None) -> CheckpointInfo:
        """The checkpoint at ``step`` (the latest when None); NotFoundError if there is none."""
        return _info(self._manifest(job_id, step), self._job_dir(job_id))

    def load(self, job_id: str, step: int | None = None) -> LoadedCheckpoint:
        """Read a checkpoint's parameters and training state (the latest when ``step`` is None)."""
        job_dir = self._job_dir(job_id)
        manifest = self._manifest(job_id, step)
        info = _info(manifest, job_dir)
        try:
            params = load_file(info.path)
            extra = (
                {} if not manifest["optim_file"] else load_file(job_dir / manifest["optim_file"])
            )
        except FileNotFoundError as e:
            raise NotFoundError(
                f"checkpoint of job {job_id!r} at step {info.step} was removed while loading"
            ) from e
        optim = manifest["optimizer"]
        sched = manifest["scheduler"]
        return LoadedCheckpoint(
            info=info,
            params=params,
            optimizer_state=None if optim is None else decode_state(optim, extra),
            scheduler_state=None if sched is None else decode_state(sched, extra),
            resume_state=dict(manifest.get("resume") or {}),
        )

    def model_path(self, info: CheckpointInfo) -> Path:
        """Path of the checkpoint's model file (loadable with ``safetensors.torch.load_file``)."""
        return info.path

    def iter_bytes(self, info: CheckpointInfo, chunk_size: int = 1 << 20) -> Iterator[bytes]:
        """Stream the model file in chunks; NotFoundError at once if it is gone."""
        if chunk_size <= 0:
            raise ValueError(f"chunk_size must be positive, got {chunk_size}")
        if not info.path.is_file():
            raise NotFoundError(
                f"checkpoint of job {info.job_id!r} at step {info.step} "
                f"no longer exists ({info.path})"
            )
        return _chunks(info.path, chunk_size)

    # ----------------------------------------------------------------- internals

    def _job_dir(self, job_id: str) -> Path:
        if not isinstance(job_id, str) or not _JOB_ID.fullmatch(job_id):
            raise SpecError(
                "job_id",
                f"{job_id!r} is not a valid job id "
                "(1-128 of [A-Za-z0-9._-], starting with a letter or digit)",
            )
        return self._root / job_id

    def _manifest_steps(self, job_dir: Path) -> builtins.list[int]:
        try:
            names = os.listdir(job_dir)
        except FileNotFoundError:
            return []
        return sorted(int(m[1]) for m in map(_FILE.fullmatch, names) if m and m[2] == "json")

    def _read_manifest(self, job_dir: Path, step: int) -> dict[str, Any]:
        manifest = json.loads((job_dir / f"ckpt-{step:010d}.json").read_text())
        if manifest.get("format") != FORMAT_VERSION:
            raise ValueError(f"unsupported manifest format {manifest.get('format')!r}")
        return manifest

    def _manifest(self, job_id: str, step: int | None) -> dict[str, Any]:
        job_dir = self._job_dir(job_id)
        if step is None:
            latest = self.latest(job_id)
            if latest is None:
                raise NotFoundError(f"job {job_id!r} has no checkpoints")
            step = latest.step
        try:
            return self._read_manifest(job_dir, step)
        except FileNotFoundError:
            available = self._manifest_steps(job_dir)
            raise NotFoundError(
                f"job {job_id!r} has no checkpoint at step {step}; "
                f"available steps: {available or 'none'}"
            ) from None

    def _prune_locked(self, job_dir: Path, keep: int) -> None:
        steps = self._manifest_steps(job_dir)
        doomed = steps[: max(len(steps) - keep, 0)]
        for step in doomed:
            (job_dir / f"ckpt-{step:010d}.json").unlink(missing_ok=True)
        if doomed:
            _fsync_dir(job_dir)
        self._clean_orphans(job_dir)

    def _clean_orphans(self, job_dir: Path) -> None:
        """Remove temporary files and data files that no manifest names."""
        named: set[str] = set()
        for step in self._manifest_steps(job_dir):
            try:
                manifest = self._read_manifest(job_dir, step)
            except (OSError, ValueError):
                continue
            named.update(n for n in (manifest.get("model_file"), manifest.get("optim_file")) if n)
        removed = False
        for name in os.listdir(job_dir):
            m = _FILE.fullmatch(name)
            if name.endswith(".tmp") or (m and m[2] != "json" and name not in named):
                (job_dir / name).unlink(missing_ok=True)
                removed = True
        if removed:
            _fsync_dir(job_dir)


# --------------------------------------------------------------------- files


def _check_int(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 10**10:
        raise ValueError(f"{name} must be an int in [0, 10**10), got {value!r}")


def _info(manifest: Mapping[str, Any], job_dir: Path) -> CheckpointInfo:
    return CheckpointInfo(
        job_id=manifest["job_id"], step=int(manifest["step"]), version=int(manifest["version"]),
        size_bytes=int(manifest["size_bytes"]), sha256=manifest["sha256"],
        created_at=float(manifest["created_at"]), path=job_dir / manifest["model_file"],
    )  # fmt: skip


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _HashingWriter:
    """A file wrapper that counts and hashes what is written through it."""

    def __init__(self, f: IO[bytes]) -> None:
        self._f, self.size, self.sha = f, 0, hashlib.sha256()

    def write(self, data: bytes | memoryview) -> int:
        self._f.write(data)
        self.sha.update(data)
        self.size += len(data)
        return len(data)


def _atomic_write(path: Path, produce: Callable[[_HashingWriter], object]) -> tuple[int, str]:
    """Write via ``produce(writer)`` to a temp file, fsync, rename over ``path``, fsync the dir."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            writer = _HashingWriter(f)
            produce(writer)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return writer.size, writer.sha.hexdigest()


def _write_safetensors(
    f: _HashingWriter, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]
) -> None:
    """Stream tensors in the safetensors format, one tensor copy at most at a time.

    Written by hand because ``safetensors.torch.save_file`` refuses tensors sharing storage
    (views of one flat buffer) and materialises every tensor as bytes before writing.
    """
    header: dict[str, Any] = {"__metadata__": dict(metadata)}
    offset = 0
    for name in sorted(tensors):
        t = tensors[name]
        if t.dtype not in _DTYPES:
            raise TypeError(f"tensor {name!r} has dtype {t.dtype}, which safetensors cannot store")
        nbytes = t.numel() * t.element_size()
        header[name] = {
            "dtype": _DTYPES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # safetensors aligns the data section to 8 bytes
    f.write(struct.pack("<Q", len(raw)))
    f.write(raw)
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        if t.numel():
            f.write(t.reshape(-1).view(torch.uint8).numpy().data)


def _chunks(path: Path, chunk_size: int) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            yield chunk
