"""Shared memory for the data plane's workers on the server's host (proto/v1/data.proto,
"Shared memory"): a ``Region`` is an anonymous ``memfd`` that the server creates, seals at its
size and passes to one worker over their Unix socket (``SCM_RIGHTS``); both map it, and
payloads are written and read in place instead of through the socket.

A region has no path (unlike a file in ``/dev/shm``): it reaches the peer it is sent to, and
otherwise only processes that may inspect either end (the same user's, through ``/proc``). It
is sealed against shrinking and growing before it leaves the server, so neither side can
truncate it under the other's mapping (a read past a file's end is a SIGBUS).
"""

from __future__ import annotations

import array
import fcntl
import mmap
import os
import socket
import stat
import weakref

import torch

ALIGN = 64  # a payload's offset in a region: a multiple of this (a cache line; every dtype's alignment)
_SEALS = ("F_ADD_SEALS", "F_GET_SEALS", "F_SEAL_SHRINK", "F_SEAL_GROW", "F_SEAL_SEAL")


def available() -> bool:
    """Whether this platform has sealed ``memfd`` regions (Linux) and fd passing."""
    return hasattr(os, "memfd_create") and all(hasattr(fcntl, name) for name in _SEALS) and \
        hasattr(socket, "SCM_RIGHTS")


def aligned(nbytes: int) -> int:
    return -(-nbytes // ALIGN) * ALIGN


class Region:
    """A mapped region of ``size`` bytes (``create`` on the server, ``attach`` on the worker).
    ``fd`` stays open until ``close_fd`` (the server's, once it is sent); the mapping lives as
    long as the region or any tensor over it."""

    def __init__(self, fd: int, size: int) -> None:
        self.fd, self.size = fd, size
        self._map = mmap.mmap(fd, size) if size else None
        self._view = memoryview(self._map) if self._map is not None else memoryview(b"")
        self._close = weakref.finalize(self, os.close, fd)  # the fd, when the region goes before close_fd

    @classmethod
    def create(cls, size: int) -> Region:
        """A new zeroed region, sealed at ``size`` bytes (its pages are allocated as they are touched)."""
        fd = os.memfd_create("gradhub-data", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, size)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
            return cls(fd, size)
        except BaseException:
            os.close(fd)
            raise

    @classmethod
    def attach(cls, fd: int, size: int) -> Region:
        """Map a region received from the server: a sealed ``memfd`` of ``size`` bytes, or
        ValueError (and ``fd`` closed: the region owns it either way)."""
        try:
            try:
                info = os.fstat(fd)
                seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
            except OSError as e:
                raise ValueError(f"region: the descriptor received is not a sealed memfd ({e})") from None
            if not stat.S_ISREG(info.st_mode) or info.st_size != size or not seals & fcntl.F_SEAL_SHRINK:
                raise ValueError(f"region: the descriptor received is not a region of {size} bytes sealed at its size")
            return cls(fd, size)
        except BaseException:
            os.close(fd)
            raise

    def close_fd(self) -> None:
        self._close()
        self.fd = -1

    def view(self, offset: int, nbytes: int) -> memoryview:
        """Bytes [offset, offset + nbytes) of the region (IndexError when they overrun it)."""
        if offset < 0 or nbytes < 0 or offset + nbytes > self.size:
            raise IndexError(f"bytes {offset} to {offset + nbytes} of a region of {self.size}")
        return self._view[offset:offset + nbytes]

    def tensor(self, offset: int, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """A flat tensor of ``dtype`` over the region from ``offset`` (no copy)."""
        view = self.view(offset, numel * dtype.itemsize)
        return torch.frombuffer(view, dtype=dtype) if numel else torch.empty(0, dtype=dtype)

    def close(self) -> None:
        """Drop this side's mapping (tensors over it keep it until they go) and its fd."""
        self.close_fd()
        self._view, self._map, self.size = memoryview(b""), None, 0  # unmapped once the last view over it goes


def fds_message(fds: list[int]) -> list[tuple[int, int, bytes]]:
    """The ancillary data that passes ``fds`` with a ``sendmsg``."""
    return [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]


FDS_SPACE = socket.CMSG_SPACE(4 * 4) if hasattr(socket, "CMSG_SPACE") else 0  # room for up to four fds


def received_fds(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    """The descriptors in a ``recvmsg``'s ancillary data (the caller owns and closes them)."""
    fds = array.array("i")
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[:len(data) - len(data) % fds.itemsize])
    return list(fds)
