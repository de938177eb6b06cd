"""Where sealed input comes from and where its plaintext goes.

    >>> from keyutil.sealing.streams import PlaintextFile, open_source
    >>> source = open_source("https://host.example/weights.age", via="vsock://3:8001",
    ...                      ca_file=None, timeout=30)                     # doctest: +SKIP
    >>> with PlaintextFile("/run/weights.bin") as out:                   # doctest: +SKIP
    ...     unseal(source, out.write, identity)
    ...     out.publish()        # only now does /run/weights.bin appear

Input: a file, ``-`` for stdin, or an ``https://`` URL. In an enclave there is no network
but the vsock: ``via`` names the egress proxy on the parent instance (``vsock://CID:PORT``,
or ``unix:///PATH`` / ``http://HOST:PORT`` for a plain TCP forwarder such as ``keyutil proxy
--to weights-host:443``) and the TLS session runs end to end through it, checked against
the URL's host name, so the host only relays bytes it cannot read or alter unnoticed (the
age format authenticates them anyway).

Output: :class:`PlaintextFile` writes into a temporary file next to the target (mode 0400,
``O_EXCL``, on tmpfs/ramfs unless ``allow_persistent``: the rules of key files; the
directory is opened once, a symlink refused, and every operation is relative to it) and
renames it over the target only in
:meth:`PlaintextFile.publish`, which the caller calls once the whole input authenticated;
leaving the ``with`` block without publishing removes the temporary file. :class:`StdoutOutput`
streams to stdout (refused on a terminal): a reader of a pipe must check the exit status,
since a refusal there comes after the chunks that did authenticate.
"""

from __future__ import annotations

import contextlib
import http.client
import io
import os
import secrets
import ssl
import stat
import sys
import urllib.parse
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

from keyutil.output import KEY_FILE_MODE, OpenDirectory, OutputError

READ_BUFFER = 64 * 1024 + 16
DEFAULT_FETCH_TIMEOUT = 60.0


class SourceError(Exception):
    """The sealed input cannot be read. ``code``: source_missing, source_unreachable,
    source_http_status, source_usage."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


# -- Input -----------------------------------------------------------------------------------


class _GuardedReader(io.RawIOBase):
    """A byte stream whose read errors are SourceError (a network cut mid-body, an I/O
    error), so the caller sees one error family whatever the source."""

    def __init__(self, inner: BinaryIO, where: str, owner: object = None) -> None:
        self._inner = inner
        self._where = where
        self._owner = owner  # keeps a connection open while its response is read

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        try:
            return self._inner.readinto(buffer)  # type: ignore[attr-defined, no-any-return]
        except (OSError, http.client.HTTPException) as e:
            reason = getattr(e, "strerror", None) or type(e).__name__
            raise SourceError("source_unreachable", f"reading {self._where}: {reason}") from None

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._inner.close()
        close = getattr(self._owner, "close", None)
        if close is not None:
            close()
        super().close()


def open_source(
    spec: str, *, via: str | None = None, ca_file: str | None = None, timeout: float
) -> BinaryIO:
    """A buffered binary stream of the sealed input ``spec``: ``-``, a path or https URL."""
    if spec == "-":
        return io.BufferedReader(_GuardedReader(sys.stdin.buffer, "stdin"), READ_BUFFER)
    if spec.startswith("https://"):
        return fetch(spec, via=via, ca_file=ca_file, timeout=timeout)
    if "://" in spec:
        raise SourceError("source_usage", "expected a file, '-' or an https:// URL")
    if via is not None or ca_file is not None:
        raise SourceError("source_usage", "--via and --source-ca apply to https:// input only")
    try:
        raw = open(spec, "rb", buffering=0)  # noqa: SIM115 - returned, closed by the caller
    except OSError as e:
        raise SourceError("source_missing", f"cannot open {spec}: {e.strerror}") from None
    return io.BufferedReader(_GuardedReader(raw, spec), READ_BUFFER)


def fetch(url: str, *, via: str | None, ca_file: str | None, timeout: float) -> BinaryIO:
    """GET ``url`` over TLS (through ``via`` when given); the body as a stream, after a 200.

    ``timeout`` bounds the connection and the TLS handshake, and then each read: a large
    body may take as long as it takes while bytes keep coming.
    """
    from keyutil.transport import _connect, _Deadline, parse_url

    parts = urllib.parse.urlsplit(url)
    try:
        host, port = parts.hostname or "", parts.port or 443
    except ValueError:
        raise SourceError("source_usage", f"bad port in {url[:80]!r}") from None
    if not host or parts.username or parts.password:
        raise SourceError("source_usage", "expected https://HOST[:PORT]/PATH, no credentials")
    try:
        endpoint = parse_url(via if via is not None else f"https://{host}:{port}")
    except ValueError as e:
        raise SourceError("source_usage", f"--via: {e}") from None
    try:
        context = ssl.create_default_context(cafile=ca_file)
    except (OSError, ssl.SSLError) as e:
        raise SourceError("source_usage", f"cannot load CA file {ca_file}: {e}") from None
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    where = f"{parts.scheme}://{host}:{port}{parts.path[:60]}" + (f" via {via}" if via else "")
    try:
        sock = _connect(endpoint, _Deadline(timeout))
        sock.deadline = None
        sock.settimeout(timeout)
        tls = context.wrap_socket(sock, server_hostname=host)
        conn = http.client.HTTPSConnection(host, port, timeout=timeout, context=context)
        conn.sock = tls
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        conn.request("GET", target, headers={"User-Agent": "keyutil/1", "Connection": "close"})
        response = conn.getresponse()
    except TimeoutError:
        raise SourceError("source_unreachable", f"{where}: no answer in time") from None
    except ssl.SSLError as e:
        raise SourceError("source_unreachable", f"{where}: TLS failed: {e.reason}") from None
    except OSError as e:
        reason = e.strerror or type(e).__name__
        raise SourceError("source_unreachable", f"{where}: {reason}") from None
    except http.client.HTTPException as e:
        raise SourceError(
            "source_unreachable", f"{where}: not an HTTP response ({type(e).__name__})"
        ) from None
    if response.status != 200:
        conn.close()
        raise SourceError("source_http_status", f"{where}: HTTP {response.status}, not 200")
    return io.BufferedReader(
        _GuardedReader(response, where, owner=conn),
        READ_BUFFER,
    )


# -- Output ----------------------------------------------------------------------------------


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def open_volatile_directory(path: Path, *, allow_persistent: bool) -> int:
    """A descriptor of directory ``path`` (a symlink refused), checked to be on tmpfs or
    ramfs unless ``allow_persistent``, and writable; OutputError otherwise. The caller
    closes it.

    The rule of key files (:class:`keyutil.output.OpenDirectory`, which decides it), and
    every file operation after it is relative to the descriptor.
    """
    return OpenDirectory(path, allow_persistent=allow_persistent, holds="plaintext").fd


class PlaintextFile:
    """Plaintext to ``path``, published by rename only after :meth:`publish`."""

    def __init__(self, path: str | os.PathLike[str], *, allow_persistent: bool = False) -> None:
        self.path = Path(path)
        self.allow_persistent = allow_persistent
        self._dir = -1
        self._tmp: str | None = None
        self._fd = -1

    def _open_directory(self) -> int:
        fd = open_volatile_directory(self.path.parent, allow_persistent=self.allow_persistent)
        try:
            info = os.stat(self.path.name, dir_fd=fd, follow_symlinks=False)
        except FileNotFoundError:
            return fd
        except OSError as e:
            os.close(fd)
            raise OutputError("output_unwritable", f"cannot inspect {self.path}: {e.strerror}") \
                from None
        if stat.S_ISDIR(info.st_mode):
            os.close(fd)
            raise OutputError("output_usage", f"{self.path} is a directory")
        return fd

    def check(self) -> None:
        """OutputError if the target cannot be written (before any key is released)."""
        os.close(self._open_directory())

    def __enter__(self) -> PlaintextFile:
        self._dir = self._open_directory()
        self._tmp = f".{self.path.name}.{secrets.token_hex(8)}.tmp"
        try:
            self._fd = os.open(
                self._tmp,
                os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                KEY_FILE_MODE,
                dir_fd=self._dir,
            )
            os.fchmod(self._fd, KEY_FILE_MODE)  # whatever the umask did
        except OSError as e:
            self.__exit__(None, None, None)
            raise OutputError(
                "output_unwritable", f"cannot create in {self.path.parent}: {e.strerror}"
            ) from None
        return self

    def write(self, data: bytes) -> None:
        try:
            _write_all(self._fd, data)
        except OSError as e:
            raise OutputError("output_unwritable", f"cannot write {self.path}: {e.strerror}") \
                from None

    def publish(self) -> None:
        """fsync, rename over the target, fsync the directory: the file appears whole."""
        assert self._tmp is not None
        try:
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = -1
            os.rename(self._tmp, self.path.name, src_dir_fd=self._dir, dst_dir_fd=self._dir)
            self._tmp = None
            os.fsync(self._dir)
        except OSError as e:
            raise OutputError("output_unwritable", f"cannot publish {self.path}: {e.strerror}") \
                from None

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self._tmp is not None:  # not published: nothing of it stays
            with contextlib.suppress(OSError):
                os.unlink(self._tmp, dir_fd=self._dir)
            self._tmp = None
        if self._dir >= 0:
            os.close(self._dir)
            self._dir = -1


class StdoutOutput:
    """Plaintext to a file descriptor (stdout): a pipe or a file, never a terminal."""

    def __init__(self, fd: int = 1) -> None:
        self.fd = fd

    def check(self) -> None:
        if os.isatty(self.fd):
            raise OutputError(
                "output_terminal", "refusing to write plaintext to a terminal; redirect stdout"
            )

    def write(self, data: bytes) -> None:
        try:
            _write_all(self.fd, data)
        except OSError as e:
            raise OutputError("output_unwritable", f"cannot write to stdout: {e.strerror}") \
                from None
