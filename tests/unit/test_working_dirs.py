"""The server's check of a submitted working_dir zip, and how it keeps one."""

from __future__ import annotations

import io
import stat
import zipfile
from pathlib import Path

import pytest

from gradhub.proto.contract.errors import SpecError
from gradhub.server.working_dirs import MAX_UNPACKED_BYTES, WorkingDirs, check_zip


def _zip(entries: dict[str, bytes], method: int = zipfile.ZIP_DEFLATED, symlink: str | None = None) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", method) as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
        if symlink is not None:
            info = zipfile.ZipInfo(symlink)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, "/etc/passwd")
    return buf.getvalue()


def test_a_plain_working_dir_passes() -> None:
    check_zip(_zip({"pkg/__init__.py": b"", "pkg/model.py": b"def build(): ...\n", "data/x.csv": b"1,2\n"}))


@pytest.mark.parametrize(("data", "message"), [
    (b"this is not a zip", "is not a zip archive"),
    (_zip({"/etc/cron.d/job": b"x"}), "would unpack outside"),
    (_zip({"../../home/user/.bashrc": b"x"}), "would unpack outside"),
    (_zip({"a/..\\..\\evil": b"x"}), "would unpack outside"),
    (_zip({"C:/windows/x": b"x"}), "would unpack outside"),
    (_zip({"ok.py": b""}, symlink="link"), "is a symbolic link"),
])
def test_an_unsafe_zip_is_refused(data: bytes, message: str) -> None:
    with pytest.raises(SpecError, match=message) as err:
        check_zip(data)
    assert err.value.field == "working_dir"


def test_a_zip_bomb_is_refused_before_it_is_unpacked_whole() -> None:
    bomb = _zip({"zeros.bin": bytes(200 << 20)})  # about 200 KB that unpacks to 200 MiB
    assert len(bomb) < 300_000
    with pytest.raises(SpecError, match=f"unpacks to more than {MAX_UNPACKED_BYTES >> 20} MiB"):
        check_zip(bomb)


def test_too_many_entries_are_refused() -> None:
    with pytest.raises(SpecError, match="holds 11 entries; the limit is 10"):
        check_zip(_zip({f"f{i}": b"" for i in range(11)}), max_entries=10)


def test_a_corrupt_entry_is_refused() -> None:
    data = bytearray(_zip({"a.py": b"print('hello')\n" * 100}))
    data[40] ^= 0xFF  # inside the compressed bytes
    with pytest.raises(SpecError, match="cannot be unpacked|not a zip"):
        check_zip(bytes(data))


def test_store_is_atomic_and_leaves_nothing_on_refusal(tmp_path: Path) -> None:
    dirs = WorkingDirs(tmp_path / "wd")
    path = dirs.store("j-1", _zip({"a.py": b""}))
    assert path.read_bytes()[:2] == b"PK"
    with pytest.raises(SpecError):
        dirs.store("j-2", b"junk")
    assert sorted(p.name for p in (tmp_path / "wd").iterdir()) == ["j-1.zip"]
    (tmp_path / "wd" / ".j-3.zip.partial").write_bytes(b"half")  # a server died mid-write
    dirs.remove_partials()
    dirs.delete("j-1")
    dirs.delete("j-1")  # twice is fine
    assert list((tmp_path / "wd").iterdir()) == []
