"""Output sinks: atomic 0400 files on tmpfs only, all-or-nothing directories, careful stdout."""

from __future__ import annotations

import io
import os
import stat
from pathlib import Path

import pytest

from keyutil.client import ReleasedKey
from keyutil.output import (
    RAMFS_MAGIC,
    TMPFS_MAGIC,
    DirSink,
    FileSink,
    OpenDirectory,
    OutputError,
    StdoutSink,
    filesystem_magic,
    write_files,
)

SECRET = bytes(range(32))


def keys(*names: str) -> list[ReleasedKey]:
    return [ReleasedKey(n, bytearray(SECRET[::-1] if i else SECRET)) for i, n in enumerate(names)]



def test_statfs_magic() -> None:
    assert TMPFS_MAGIC == 0x01021994 and RAMFS_MAGIC == 0x858458F6
    if Path("/dev/shm").is_dir():
        assert filesystem_magic("/dev/shm") == TMPFS_MAGIC
    with pytest.raises(OSError):
        filesystem_magic("/no/such/dir")


def test_file_on_tmpfs_is_atomic_and_0400(shm: Path) -> None:
    target = shm / "app.key"
    sink = FileSink(target)
    sink.check(["default"])
    sink.write(keys("default"))
    assert target.read_bytes() == SECRET
    assert stat.S_IMODE(target.stat().st_mode) == 0o400
    assert [p.name for p in shm.iterdir()] == ["app.key"]  # no temporary left behind


def test_file_replaces_an_existing_key(shm: Path) -> None:
    target = shm / "app.key"
    target.write_bytes(b"old")
    target.chmod(0o400)
    FileSink(target).write(keys("default"))
    assert target.read_bytes() == SECRET


def test_file_created_0400_whatever_the_umask(shm: Path) -> None:
    old = os.umask(0)
    try:
        FileSink(shm / "k").write(keys("default"))
    finally:
        os.umask(old)
    assert stat.S_IMODE((shm / "k").stat().st_mode) == 0o400


def test_persistent_disk_is_refused(tmp_path: Path) -> None:
    if filesystem_magic(tmp_path) in (TMPFS_MAGIC, RAMFS_MAGIC):
        pytest.skip("tmp_path is on tmpfs here")
    with pytest.raises(OutputError) as info:
        FileSink(tmp_path / "app.key").check(["default"])
    assert info.value.code == "output_persistent"
    with pytest.raises(OutputError):
        DirSink(tmp_path).check(["default"])
    assert list(tmp_path.iterdir()) == []


def test_allow_persistent(tmp_path: Path) -> None:
    FileSink(tmp_path / "app.key", allow_persistent=True).write(keys("default"))
    assert (tmp_path / "app.key").read_bytes() == SECRET
    assert stat.S_IMODE((tmp_path / "app.key").stat().st_mode) == 0o400


def test_out_dir_one_file_per_key(shm: Path) -> None:
    DirSink(shm).write(keys("disk", "weights"))
    assert (shm / "disk").read_bytes() == SECRET
    assert (shm / "weights").read_bytes() == SECRET[::-1]
    assert sorted(p.name for p in shm.iterdir()) == ["disk", "weights"]


def test_out_dir_under_a_file_is_refused(shm: Path) -> None:
    (shm / "file").write_bytes(b"")
    directory = shm / "file" / "dir"
    with pytest.raises(OutputError) as info:
        DirSink(directory).check(["default"])
    assert info.value.code == "output_dir_missing"
    with pytest.raises(OutputError):
        DirSink(directory).write(keys("default"))
    assert sorted(p.name for p in shm.iterdir()) == ["file"]


def test_all_or_nothing_when_one_file_fails(shm: Path) -> None:
    directory = OpenDirectory(shm)
    with pytest.raises(OutputError) as info:
        write_files(directory, [("a", SECRET), ("nodir/b", SECRET)])
    assert info.value.code == "output_unwritable"
    assert list(shm.iterdir()) == []
    assert SECRET.hex() not in str(info.value)


def test_out_refuses_several_keys_and_directories(shm: Path) -> None:
    with pytest.raises(OutputError):
        FileSink(shm / "k").check(["a", "b"])
    with pytest.raises(OutputError):
        FileSink(shm).check(["a"])


class Terminal(io.BytesIO):
    def isatty(self) -> bool:
        return True


def test_raw_to_a_terminal_is_refused() -> None:
    stream = Terminal()
    with pytest.raises(OutputError) as info:
        StdoutSink(stream, fmt="raw").check(["default"])
    assert info.value.code == "output_terminal"
    with pytest.raises(OutputError):
        StdoutSink(stream, fmt="raw").write(keys("default"))
    assert stream.getvalue() == b""


def test_text_formats_to_a_terminal_are_fine() -> None:
    stream = Terminal()
    StdoutSink(stream, fmt="hex").write(keys("default"))
    assert stream.getvalue() == SECRET.hex().encode() + b"\n"


@pytest.mark.parametrize(
    ("fmt", "expected"),
    [
        ("raw", SECRET),
        ("hex", SECRET.hex().encode() + b"\n"),
        ("base64", b"AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=\n"),
    ],
)
def test_stdout_formats(fmt: str, expected: bytes) -> None:
    stream = io.BytesIO()
    StdoutSink(stream, fmt=fmt).write(keys("default"))  # type: ignore[arg-type]
    assert stream.getvalue() == expected


def test_stdout_several_keys_as_lines() -> None:
    stream = io.BytesIO()
    StdoutSink(stream, fmt="hex").write(keys("a", "b"))
    assert stream.getvalue() == f"a {SECRET.hex()}\nb {SECRET[::-1].hex()}\n".encode()
    with pytest.raises(OutputError):
        StdoutSink(io.BytesIO(), fmt="raw").check(["a", "b"])


def test_closed_stdout_is_an_output_error() -> None:
    stream = io.BytesIO()
    stream.close()
    with pytest.raises(OutputError) as info:
        StdoutSink(stream, fmt="hex").write(keys("default"))
    assert info.value.code == "output_unwritable"
