"""DataDirLock: one holder per data dir; the second is refused with a line naming the first, and
the lock is free again once the holder releases it (or its process ends)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from gradhub.proto.contract.errors import StateError
from gradhub.server.data_dir import DataDirLock


def test_a_second_holder_is_refused_naming_the_first(tmp_path: Path) -> None:
    first = DataDirLock(tmp_path / "data")
    first.acquire("127.0.0.1:50051")
    try:
        with pytest.raises(StateError, match=rf"data_dir: .*data is in use by the gradhub server pid "
                                             rf"{os.getpid()} on .* at 127.0.0.1:50051"):
            DataDirLock(tmp_path / "data").acquire()
    finally:
        first.release()
    again = DataDirLock(tmp_path / "data")
    again.acquire()  # released: free again
    again.release()


def test_the_lock_dies_with_its_process(tmp_path: Path) -> None:
    code = ("import sys; from gradhub.server.data_dir import DataDirLock; "
            f"DataDirLock({str(tmp_path)!r}).acquire('x:1'); print('held', flush=True); sys.stdin.read()")
    holder = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(StateError, match=f"pid {holder.pid} "):
            DataDirLock(tmp_path).acquire()
    finally:
        holder.kill()
        holder.wait(timeout=10)
    lock = DataDirLock(tmp_path)
    lock.acquire()  # the killed holder's lock went with its process
    lock.release()
