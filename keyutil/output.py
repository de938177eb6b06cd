"""Where released keys go: a file or a directory on tmpfs/ramfs, or stdout.

    >>> from keyutil.output import FileSink
    >>> sink = FileSink("/run/keys/app.key")                      # doctest: +SKIP
    >>> sink.check(["default"])         # before asking the KMS   # doctest: +SKIP
    >>> sink.write(release.keys)        # atomic, mode 0400      # doctest: +SKIP

The directory is opened once (:class:`OpenDirectory`: ``O_DIRECTORY | O_NOFOLLOW``, a
symlink refused) when the sink is checked, and everything after that is relative to that
descriptor: its file system is read with ``fstatfs`` on it, and each file is created (a
temporary with an unpredictable name, ``O_EXCL | O_NOFOLLOW``, mode 0400), written, fsync'd
and renamed into place there, then the directory fsync'd. A symlink swapped in between the
check and the write changes nothing. Files are refused unless the directory is on tmpfs or
ramfs (the enclave's initramfs root is one of these), because a key must not reach a
persistent disk; ``allow_persistent=True`` lifts that, for development. A missing directory
(``/run/keys``) is created, 0700 with its missing parents, only when its nearest existing
ancestor is on tmpfs or ramfs. Several keys are written all or nothing: if one cannot be,
none is left. Checks run in :meth:`Sink.check`, before the release, so a bad destination
never costs a key release.

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
import stat
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


def _magic(function: str, arg: bytes | int, shown: object) -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    buffer = ctypes.create_string_buffer(STATFS_BUFFER)
    if getattr(libc, function)(arg, buffer) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(shown))
    # f_type is a long (__fsword_t) at offset 0 on x86_64 and aarch64; magic numbers fit 32 bits.
    return ctypes.c_ulong.from_buffer(buffer).value & 0xFFFFFFFF


def filesystem_magic(path: str | os.PathLike[str]) -> int:
    """``f_type`` of ``statfs(path)``: the file system's magic number (Linux)."""
    return _magic("statfs", os.fsencode(path), path)


def _refuse_persistent(where: Path, magic: int, what: str, holds: str = "a key") -> OutputError:
    return OutputError(
        "output_persistent",
        f"{where} {what} not on tmpfs or ramfs (file system magic {magic:#x}); {holds} must not "
        "reach a persistent disk. Use a tmpfs (e.g. /run, /dev/shm) or --allow-persistent",
    )


_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


class OpenDirectory:
    """A directory opened once, by descriptor, checked with ``fstatfs``; every file of the
    sink is created, renamed and fsync'd relative to :attr:`fd`."""

    def __init__(
        self, path: Path, *, allow_persistent: bool = False, create: bool = False,
        holds: str = "a key",
    ) -> None:
        """``holds`` names what the directory is for, in the refusal of a persistent one."""
        self.path = path
        try:
            self.fd = os.open(path, _DIR_FLAGS | os.O_NOFOLLOW)
        except FileNotFoundError:
            if not create:
                raise OutputError("output_dir_missing", f"{path} does not exist") from None
            self.fd = self._create(path)
        except NotADirectoryError:
            if os.path.islink(path):
                raise OutputError(
                    "output_symlink", f"{path} is a symbolic link; give the real directory"
                ) from None
            raise OutputError(
                "output_dir_missing", f"{path} does not exist or is not a directory"
            ) from None
        except OSError as e:
            raise OutputError("output_unwritable", f"cannot open {path}: {e.strerror}") from None
        try:
            magic = _magic("fstatfs", self.fd, path)
            if not allow_persistent and magic not in VOLATILE_FILESYSTEMS:
                raise _refuse_persistent(path, magic, "is", holds)
            if not os.access(".", os.W_OK, dir_fd=self.fd):
                raise OutputError("output_unwritable", f"{path} is not writable")
        except BaseException:
            self.close()
            raise

    @staticmethod
    def _create(path: Path) -> int:
        """Create ``path`` and its missing parents (0700) below its nearest existing
        ancestor, if that is on tmpfs or ramfs; the new directory's descriptor."""
        missing: list[str] = []
        ancestor = path
        while True:
            try:
                fd = os.open(ancestor, _DIR_FLAGS)
                break
            except FileNotFoundError:
                if ancestor.name in ("", ".", "..") or ancestor.parent == ancestor:
                    raise OutputError("output_dir_missing", f"{path} does not exist") from None
                missing.append(ancestor.name)
                ancestor = ancestor.parent
            except OSError:
                raise OutputError(
                    "output_dir_missing", f"{path} does not exist or is not a directory"
                ) from None
        try:
            magic = _magic("fstatfs", fd, ancestor)
            if magic not in VOLATILE_FILESYSTEMS:
                raise OutputError(
                    "output_dir_missing",
                    f"{path} does not exist, and is created only on tmpfs or ramfs; {ancestor} "
                    f"is not (file system magic {magic:#x})",
                )
            for name in reversed(missing):
                with contextlib.suppress(FileExistsError):
                    os.mkdir(name, 0o700, dir_fd=fd)
                child = os.open(name, _DIR_FLAGS | os.O_NOFOLLOW, dir_fd=fd)
                os.close(fd)
                fd = child
        except OSError as e:
            os.close(fd)
            raise OutputError("output_unwritable", f"cannot create {path}: {e.strerror}") from None
        except BaseException:
            os.close(fd)
            raise
        return fd

    def is_dir(self, name: str) -> bool:
        try:
            return stat.S_ISDIR(os.stat(name, dir_fd=self.fd, follow_symlinks=False).st_mode)
        except OSError:
            return False

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _stage(directory: OpenDirectory, name: str, data: bytes | bytearray, mode: int) -> str:
    """A fsync'd temporary file (unpredictable name) in ``directory`` holding ``data``."""
    tmp = f".{name}.{secrets.token_hex(8)}.tmp"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(tmp, flags, mode, dir_fd=directory.fd)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fchmod(fd, mode)  # whatever the umask did
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(tmp, dir_fd=directory.fd)
        raise
    os.close(fd)
    return tmp


def write_files(
    directory: OpenDirectory,
    files: Sequence[tuple[str, bytes | bytearray]],
    *,
    mode: int = KEY_FILE_MODE,
) -> None:
    """Write every file of ``directory`` atomically, all or nothing: if one cannot be
    staged or renamed into place, every one renamed already is removed again."""
    staged: list[tuple[str, str]] = []
    placed: list[str] = []
    fd = directory.fd
    try:
        for name, data in files:
            staged.append((_stage(directory, name, data, mode), name))
        for tmp, name in staged:
            os.rename(tmp, name, src_dir_fd=fd, dst_dir_fd=fd)
            placed.append(name)
        os.fsync(fd)
    except OSError as e:
        for name in [tmp for tmp, name in staged if name not in placed] + placed:
            with contextlib.suppress(OSError):
                os.unlink(name, dir_fd=fd)
        with contextlib.suppress(OSError):
            os.fsync(fd)
        raise OutputError(
            "output_unwritable",
            f"cannot write in {directory.path}: {e.strerror}; no file of this write was left",
        ) from None


def write_file(
    path: str | os.PathLike[str], data: bytes, *, mode: int, allow_persistent: bool = False
) -> None:
    """One file written the safe way (for ``keyutil attest --out``); OutputError if not."""
    target = Path(path)
    directory = OpenDirectory(target.parent, allow_persistent=allow_persistent)
    try:
        if directory.is_dir(target.name):
            raise OutputError("output_usage", f"{target} is a directory")
        write_files(directory, [(target.name, data)], mode=mode)
    finally:
        directory.close()


class _DirectorySink:
    """What FileSink and DirSink share: the directory, opened by :meth:`check`."""

    def __init__(self, directory: Path, *, allow_persistent: bool) -> None:
        self._path = directory
        self.allow_persistent = allow_persistent
        self._open: OpenDirectory | None = None

    def _directory(self) -> OpenDirectory:
        if self._open is None:
            self._open = OpenDirectory(
                self._path, allow_persistent=self.allow_persistent, create=True
            )
        return self._open

    def _write(self, files: Sequence[tuple[str, bytes | bytearray]]) -> None:
        try:
            write_files(self._directory(), files)
        finally:
            self.close()

    def close(self) -> None:
        if self._open is not None:
            self._open.close()
            self._open = None


class FileSink(_DirectorySink):
    """One key to one file."""

    def __init__(self, path: str | os.PathLike[str], *, allow_persistent: bool = False) -> None:
        self.path = Path(path)
        super().__init__(self.path.parent, allow_persistent=allow_persistent)

    def check(self, key_names: Sequence[str]) -> None:
        if len(key_names) != 1:
            raise OutputError(
                "output_usage", f"--out takes one key; {len(key_names)} asked (use --out-dir)"
            )
        if self.path.is_dir() or self._directory().is_dir(self.path.name):
            self.close()
            raise OutputError("output_usage", f"{self.path} is a directory (use --out-dir)")

    def write(self, keys: Sequence[ReleasedKey]) -> None:
        self.check([k.name for k in keys])
        self._write([(self.path.name, keys[0].value)])


class DirSink(_DirectorySink):
    """One file per key, named after the key (names are [A-Za-z0-9][A-Za-z0-9._-]*)."""

    def __init__(
        self, directory: str | os.PathLike[str], *, allow_persistent: bool = False
    ) -> None:
        self.directory = Path(directory)
        super().__init__(self.directory, allow_persistent=allow_persistent)

    def check(self, key_names: Sequence[str]) -> None:
        directory = self._directory()
        for name in key_names:
            problem = (
                f"key name {name!r} is not a file name"
                if Path(name).name != name or name.startswith(".")
                else f"{self.directory / name} is a directory"
                if directory.is_dir(name)
                else None
            )
            if problem:
                self.close()
                raise OutputError("output_usage", problem)

    def write(self, keys: Sequence[ReleasedKey]) -> None:
        self.check([k.name for k in keys])
        self._write([(k.name, k.value) for k in keys])


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
