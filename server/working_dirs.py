"""Jobs' working dirs as the server keeps them: a submitted zip is checked before it is kept (a zip,
relative entries only, no links, a bounded number of entries and bytes once unpacked: zip bombs
are refused at submit), written atomically, and deleted with its job. No gRPC in here."""

from __future__ import annotations

import contextlib
import io
import os
import stat
import zipfile
from pathlib import Path, PurePosixPath

from gradhub.proto.contract.errors import ResourceExhaustedError, SpecError
from gradhub.proto.contract.spec import WORKING_DIR_LIMIT

MAX_ENTRIES = 10_000
MAX_UNPACKED_BYTES = WORKING_DIR_LIMIT  # what a working dir may unpack to on a worker, as packed
_READ_BYTES = 1 << 20


def check_zip(data: bytes, max_entries: int = MAX_ENTRIES, max_unpacked: int = MAX_UNPACKED_BYTES) -> None:
    """SpecError("working_dir", ...) unless ``data`` is a zip that unpacks safely. Sizes are
    counted as the entries are actually inflated (a zip's stated sizes may lie), and inflating
    stops at the limit; every entry's CRC is checked on the way."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except (zipfile.BadZipFile, ValueError) as e:
        raise SpecError("working_dir", f"is not a zip archive ({e})") from None
    with archive:
        entries = archive.infolist()
        if len(entries) > max_entries:
            raise SpecError("working_dir", f"holds {len(entries)} entries; the limit is {max_entries}")
        total = 0
        for entry in entries:
            _check_name(entry)
            if entry.is_dir():
                continue
            try:
                with archive.open(entry) as f:
                    while chunk := f.read(_READ_BYTES):
                        total += len(chunk)
                        if total > max_unpacked:
                            raise SpecError("working_dir", f"unpacks to more than {max_unpacked >> 20} MiB "
                                                           f"(the limit; at entry {entry.filename!r})")
            except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, EOFError, OSError) as e:
                raise SpecError("working_dir", f"entry {entry.filename!r} cannot be unpacked ({e})") from None


def _check_name(entry: zipfile.ZipInfo) -> None:
    name = entry.filename
    path = PurePosixPath(name.replace("\\", "/"))
    if path.is_absolute() or (path.parts and ":" in path.parts[0]) or ".." in path.parts:
        raise SpecError("working_dir", f"entry {name!r} would unpack outside the working dir")
    if stat.S_ISLNK(entry.external_attr >> 16):
        raise SpecError("working_dir", f"entry {name!r} is a symbolic link")


class WorkingDirs:
    """The zips of submitted jobs, one file per job under ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, job_id: str) -> Path:
        return self.root / f"{job_id}.zip"

    def store(self, job_id: str, data: bytes) -> Path:
        """Check ``data`` and write it atomically (a partial file never stays behind); its path."""
        check_zip(data)
        self.root.mkdir(parents=True, exist_ok=True)
        target = self.path(job_id)
        partial = target.with_name(f".{target.name}.partial")
        try:
            with open(partial, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(partial, target)
        except OSError as e:
            partial.unlink(missing_ok=True)
            raise ResourceExhaustedError(f"disk: the working_dir could not be stored ({e.strerror or e}); "
                                         "nothing was submitted") from e
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        return target

    def delete(self, job_id: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path(job_id).unlink()

    def remove_partials(self) -> None:
        """What a server that died mid-write left behind (called at start)."""
        if self.root.is_dir():
            for partial in self.root.glob(".*.partial"):
                partial.unlink(missing_ok=True)
