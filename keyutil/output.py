"""Where released keys go: a file or a directory on tmpfs/ramfs, or stdout.

    >>> from keyutil.output import FileSink
    >>> sink = FileSink("/run/keys/app.key")                      # doctest: +SKIP
    >>> sink.check(["default"])         # before asking the KMS   # doctest: +SKIP
    >>> sink.write(release.keys)        # atomic, mode 0400      # doctest: +SKIP

Files are written atomically: a temporary file created mode 0400 in the target's directory,
written in full, fsync'd, renamed over the target, and the directory fsync'd. Files are
refused unless the directory is on tmpfs or ramfs (``statfs`` magic numbers; the enclave's
initramfs root is one of these), because a key must not reach a persistent disk;
``allow_persistent=True`` lifts that, for development. Checks run in :meth:`check`, before
the release, so a bad destination never costs a key release; :meth:`write` repeats them.

Stdout takes ``raw`` bytes (refused when stdout is a terminal), or ``hex`` / ``base64`` text
with a newline. Several keys on stdout are written one per line as ``NAME VALUE`` (raw
refused). Nothing here logs or puts key material into exception messages.
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import os
import secrets
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import BinaryIO, Literal, Protocol

from keyutil.client import ReleasedKey

TMPFS_MAGIC = 0x01021994
RAMFS_MAGIC = 0x858458F6
VOLATILE_FILESYSTEMS = {TMPFS_MAGIC: "tmpfs", RAMFS_MAGIC: "ramfs"}
KEY_FILE_MODE = 0o400
STATFS_BUFFER = 256  # struct statfs is 120 bytes on 64-bit Linux; f_type comes first

Format = Literal["raw", "hex", "base64"]


class OutputError(Exception):
    """The key cannot be written where asked. ``code`` is stable."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class Sink(Protocol):
    def check(self, key_names: Sequence[str]) -> None:
        """Raise OutputError if ``write`` of these keys would be refused."""

    def write(self, keys: Sequence[ReleasedKey]) -> None:
        """Write the keys, all or none (as far as the file system allows)."""


def filesystem_magic(path: str | os.PathLike[str]) -> int:
    """``f_type`` of ``statfs(path)``: the file system's magic number (Linux)."""
    libc = ctypes.CDLL(None, use_errno=True)
    buffer = ctypes.create_string_buffer(STATFS_BUFFER)
    if libc.statfs(os.fsencode(path), buffer) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(path))
    # f_type is a long (__fsword_t) at offset 0 on x86_64 and aarch64; magic numbers fit 32 bits.
    return ctypes.c_ulong.from_buffer(buffer).value & 0xFFFFFFFF


def check_volatile(directory: Path, *, allow_persistent: bool) -> None:
    """OutputError unless ``directory`` exists, is a directory, and is on tmpfs/ramfs."""
    if not directory.is_dir():
        raise OutputError("output_dir_missing", f"{directory} does not exist or is not a directory")
    if allow_persistent:
        return
    try:
        magic = filesystem_magic(directory)
    except OSError as e:
        raise OutputError(
            "output_unwritable", f"cannot inspect {directory}: {e.strerror}"
        ) from None
    if magic not in VOLATILE_FILESYSTEMS:
        raise OutputError(
            "output_persistent",
            f"{directory} is not on tmpfs or ramfs (file system magic {magic:#x}); a key "
            "must not reach a persistent disk. Use a tmpfs (e.g. /run, /dev/shm) or "
            "--allow-persistent",
        )


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _stage(target: Path, data: bytes | bytearray) -> Path:
    """A fsync'd temporary file next to ``target`` holding ``data``, mode 0400."""
    tmp = target.with_name(f".{target.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(
        tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, KEY_FILE_MODE
    )
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fchmod(fd, KEY_FILE_MODE)  # whatever the umask did
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    return tmp


def write_files(files: Sequence[tuple[Path, bytes | bytearray]]) -> None:
    """Write every file atomically; if any cannot be staged, none is written."""
    staged: list[tuple[Path, Path]] = []
    try:
        for target, data in files:
            staged.append((_stage(target, data), target))
        for tmp, target in staged:
            os.replace(tmp, target)
        for directory in {target.parent for _, target in staged}:
            _fsync_dir(directory)
    except OSError as e:
        for tmp, _ in staged:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
        where = e.filename if e.filename else "the output"
        raise OutputError("output_unwritable", f"cannot write {where}: {e.strerror}") from None


class FileSink:
    """One key to one file."""

    def __init__(self, path: str | os.PathLike[str], *, allow_persistent: bool = False) -> None:
        self.path = Path(path)
        self.allow_persistent = allow_persistent

    def check(self, key_names: Sequence[str]) -> None:
        if len(key_names) != 1:
            raise OutputError(
                "output_usage", f"--out takes one key; {len(key_names)} asked (use --out-dir)"
            )
        if self.path.is_dir():
            raise OutputError("output_usage", f"{self.path} is a directory (use --out-dir)")
        check_volatile(self.path.parent, allow_persistent=self.allow_persistent)
        if not os.access(self.path.parent, os.W_OK):
            raise OutputError("output_unwritable", f"{self.path.parent} is not writable")

    def write(self, keys: Sequence[ReleasedKey]) -> None:
        self.check([k.name for k in keys])
        write_files([(self.path, keys[0].value)])


class DirSink:
    """One file per key, named after the key (names are [A-Za-z0-9][A-Za-z0-9._-]*)."""

    def __init__(
        self, directory: str | os.PathLike[str], *, allow_persistent: bool = False
    ) -> None:
        self.directory = Path(directory)
        self.allow_persistent = allow_persistent

    def check(self, key_names: Sequence[str]) -> None:
        check_volatile(self.directory, allow_persistent=self.allow_persistent)
        if not os.access(self.directory, os.W_OK):
            raise OutputError("output_unwritable", f"{self.directory} is not writable")
        for name in key_names:
            if Path(name).name != name or name.startswith("."):
                raise OutputError("output_usage", f"key name {name!r} is not a file name")
            if (self.directory / name).is_dir():
                raise OutputError("output_usage", f"{self.directory / name} is a directory")

    def write(self, keys: Sequence[ReleasedKey]) -> None:
        self.check([k.name for k in keys])
        write_files([(self.directory / k.name, k.value) for k in keys])


def encode(value: bytes | bytearray, fmt: Format) -> bytes:
    if fmt == "hex":
        return value.hex().encode()
    if fmt == "base64":
        return base64.b64encode(value)
    return bytes(value)


class StdoutSink:
    """Keys to a binary stream (stdout): raw bytes, or hex / base64 lines."""

    def __init__(self, stream: BinaryIO, *, fmt: Format = "raw") -> None:
        self.stream = stream
        self.fmt = fmt

    def check(self, key_names: Sequence[str]) -> None:
        if self.fmt == "raw" and len(key_names) != 1:
            raise OutputError(
                "output_usage", "raw output takes one key; use --format hex or base64"
            )
        if self.fmt == "raw" and self.stream.isatty():
            raise OutputError(
                "output_terminal",
                "refusing to write raw key bytes to a terminal; redirect stdout, "
                "or use --format hex or base64",
            )

    def write(self, keys: Sequence[ReleasedKey]) -> None:
        self.check([k.name for k in keys])
        chunks: Iterable[bytes]
        if self.fmt == "raw":
            chunks = [encode(keys[0].value, "raw")]
        elif len(keys) == 1:
            chunks = [encode(keys[0].value, self.fmt), b"\n"]
        else:
            chunks = (
                part
                for k in keys
                for part in (k.name.encode(), b" ", encode(k.value, self.fmt), b"\n")
            )
        try:
            for chunk in chunks:
                self.stream.write(chunk)
            self.stream.flush()
        except (OSError, ValueError) as e:
            reason = getattr(e, "strerror", None) or type(e).__name__
            raise OutputError("output_unwritable", f"cannot write to stdout: {reason}") from None
