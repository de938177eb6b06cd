"""``keyutil proxy``: a forwarder between vsock, unix and TCP, in every direction.

    $ keyutil proxy --listen vsock://:8000 --to kms.example.com:443          # to the KMS
    $ keyutil proxy --listen tcp://0.0.0.0:8080 --to vsock://enclave:app:5001  # inbound

    >>> from keyutil.proxy import build_allowlist, parse_hostport, parse_listen
    >>> to = parse_hostport("KMS.example.com.:443")
    >>> str(parse_listen("vsock://:8000")), str(to)
    ('vsock://:8000', 'kms.example.com:443')
    >>> build_allowlist(to, allow=[], allowlist_file=None).source
    'destination'
    >>> build_allowlist(to, allow=["[::1]:443"], allowlist_file=None).permits(to)
    False

The enclave reaches the KMS only through this process, which the enclave does not trust: the
keys cross it sealed to the enclave's attested key and the KMS's answer is signed, so the proxy
moves bytes and nothing else. It never parses, stores or logs them.

One destination (:func:`parse_destination`: TCP, unix, vsock by CID, or an enclave by name,
whose CID is looked up at every connection). A TCP destination is checked against an
allowlist at start (refused: exit 2, nothing listens) and again for every connection, whose
name is resolved afresh each time. Per connection, two
pumps (one thread each way) copy through one reusable buffer each; an end of stream from one
side is passed on as ``shutdown(SHUT_WR)`` to the other, and the connection ends when both
directions have ended, when neither has moved a byte for ``idle_timeout`` seconds, or on an
error. One log line per connection says who, where, how many bytes each way, how long and how
it ended (:data:`END_REASONS`); the payload is never logged.

The listening socket is the only place where vsock, unix and TCP differ: the family and the
address given to ``bind()`` (and, for unix, the socket file: a stale one is replaced, ours is
removed at stop), and how the log names the peer. Everything after ``accept()`` is the same
code, which the tests drive through unix and TCP listeners (AF_VSOCK has no loopback on an
ordinary host).

Parse (:func:`parse_listen`, :func:`parse_hostport`, :func:`parse_allowlist_yaml`), decide
(:meth:`Allowlist.check`) and act (:class:`Proxy`) are apart; the clock and the name resolver
are passed in.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import ipaddress
import os
import re
import selectors
import socket
import stat
import struct
import threading
import time
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from keyutil.transport import _Deadline, _resolve

DEFAULT_MAX_CONNECTIONS = 64
DEFAULT_IDLE_TIMEOUT = 60.0
DEFAULT_CONNECT_TIMEOUT = 5.0
DEFAULT_GRACE = 5.0
BUFFER_SIZE = 256 * 1024  # per direction and connection: 64 connections use 32 MiB at most
LISTEN_BACKLOG = 128
MAX_ALLOWLIST_BYTES = 1 << 20
MAX_TICK = 1.0  # longest a pump waits before looking at the idle clock again
FORCED_CLOSE_WAIT = 2.0  # after the grace period, how long closed connections get to log

END_REASONS = (
    "client_closed",  # the client ended its stream first, then the destination did
    "dest_closed",  # the destination ended its stream first, then the client did
    "idle_timeout",
    "over_limit",
    "destination_unreachable",
    "refused",
    "shutdown",
    "error",
)

Log = Callable[[str, str, Mapping[str, Any]], None]
"""``log(level, event, fields)``, as in :mod:`keyutil.client`; keyutil's CLI passes EventLog."""

Resolver = Callable[[str, int, float], list[tuple[int, Any]]]
"""``resolve(host, port, timeout)``: (family, sockaddr) pairs to try, in order."""

EnclaveFinder = Callable[[str, float], int]
"""``find(name, timeout)``: the CID of the running enclave ``name``; LookupError if none."""


class ProxyConfigError(ValueError):
    """A listen address, destination or allowlist that cannot be used (exit 2)."""


class ListenError(Exception):
    """The listening socket could not be made (exit 3): in use, no vsock here, ..."""


class Refused(Exception):
    """The destination is not on the allowlist."""


# -- Parse --------------------------------------------------------------------------------


def _port(text: str, where: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ProxyConfigError(f"expected a port from 1 to 65535 in {where!r}")
    return int(text)


_HOSTNAME = re.compile(r"\A(?=.{1,253}\Z)([A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?\.?)+\Z")


def _normal_host(host: str) -> str:
    """An IP literal in its canonical form, or a DNS name lowercased without a final dot."""
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    if not _HOSTNAME.match(host) or ".." in host:
        raise ProxyConfigError(f"expected a host name or an IP address; found {host[:80]!r}")
    return host.lower().removesuffix(".")


@dataclasses.dataclass(frozen=True)
class HostPort:
    """A TCP destination: a DNS name or an IP literal (canonical form), and a port."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def is_ip(self) -> bool:
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            return False
        return True


def parse_hostport(text: str, *, what: str = "") -> HostPort:
    """``host:port``, ``1.2.3.4:port`` or ``[::1]:port``; ProxyConfigError saying why not
    (prefixed with ``what``, the option's name, when given)."""
    try:
        return _parse_hostport(text.strip())
    except ProxyConfigError as e:
        raise ProxyConfigError(f"{what}: {e}" if what else str(e)) from None


def _parse_hostport(text: str) -> HostPort:
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise ProxyConfigError(f"expected [IPV6]:PORT; found {text[:80]!r}")
        try:
            if ipaddress.ip_address(host).version != 6:
                raise ValueError
        except ValueError:
            raise ProxyConfigError(
                f"expected an IPv6 address in brackets; found {host[:60]!r}"
            ) from None
        return HostPort(str(ipaddress.ip_address(host)), _port(rest[1:], text))
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise ProxyConfigError(f"expected HOST:PORT; found {text[:80]!r}")
    if ":" in host:
        raise ProxyConfigError(f"write an IPv6 address in brackets, [{host}]:{port}")
    return HostPort(_normal_host(host), _port(port, text))


@dataclasses.dataclass(frozen=True)
class UnixDest:
    """A unix socket destination (the tests' stand-in for vsock, or a local server)."""

    path: str

    def __str__(self) -> str:
        return f"unix://{self.path}"


@dataclasses.dataclass(frozen=True)
class VsockDest:
    """An AF_VSOCK destination by CID: 3 is the parent instance, 4 and up an enclave."""

    cid: int
    port: int

    def __str__(self) -> str:
        return f"vsock://{self.cid}:{self.port}"


@dataclasses.dataclass(frozen=True)
class EnclaveDest:
    """An enclave by name: its CID is looked up (``nitro-cli describe-enclaves``) at every
    connection, so a forwarder follows an enclave restarted with a new CID."""

    name: str
    port: int

    def __str__(self) -> str:
        return f"vsock://enclave:{self.name}:{self.port}"


Destination = HostPort | UnixDest | VsockDest | EnclaveDest

_ENCLAVE_NAME = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9._-]{0,127}\Z")


def parse_destination(text: str, *, what: str = "") -> Destination:
    """``tcp://HOST:PORT`` (or a bare ``HOST:PORT``), ``unix:///PATH``, ``vsock://CID:PORT``
    or ``vsock://enclave:NAME:PORT``; ProxyConfigError saying why not."""
    try:
        return _parse_destination(text.strip())
    except ProxyConfigError as e:
        raise ProxyConfigError(f"{what}: {e}" if what else str(e)) from None


def _parse_destination(text: str) -> Destination:
    scheme, sep, rest = text.partition("://")
    if not sep:
        return _parse_hostport(text)
    scheme = scheme.lower()
    if scheme == "tcp":
        return _parse_hostport(rest.removesuffix("/"))
    if scheme == "unix":
        if not rest.startswith("/") or "?" in rest or "#" in rest:
            raise ProxyConfigError(f"expected unix:///absolute/path.sock; found {text[:80]!r}")
        if len(os.fsencode(rest)) > 107:
            raise ProxyConfigError(f"a unix socket path has at most 107 bytes: {rest[:80]!r}")
        return UnixDest(rest)
    if scheme == "vsock":
        host, sep, port_text = rest.removesuffix("/").rpartition(":")
        if not sep:
            raise ProxyConfigError(f"expected vsock://CID:PORT; found {text[:80]!r}")
        port = _port(port_text, text)
        if host.startswith("enclave:"):
            name = host.removeprefix("enclave:")
            if not _ENCLAVE_NAME.match(name):
                raise ProxyConfigError(
                    f"expected vsock://enclave:NAME:PORT with a name of letters, digits, '.', "
                    f"'_' and '-'; found {name[:60]!r}"
                )
            return EnclaveDest(name, port)
        if not host.isdigit() or int(host) > 0xFFFFFFFF:
            raise ProxyConfigError(
                f"expected vsock://CID:PORT (numeric CID) or vsock://enclave:NAME:PORT; "
                f"found {text[:80]!r}"
            )
        return VsockDest(int(host), port)
    raise ProxyConfigError(
        "expected tcp://HOST:PORT, HOST:PORT, unix:///PATH, vsock://CID:PORT or "
        f"vsock://enclave:NAME:PORT; found {text[:80]!r}"
    )


VMADDR_CID_ANY = 0xFFFFFFFF


@dataclasses.dataclass(frozen=True)
class ListenAddress:
    """Where to listen: the only part of the proxy that differs between vsock, unix and TCP."""

    scheme: str  # vsock, unix or tcp
    family: socket.AddressFamily
    address: Any  # (cid, port), a path, or (ip, port)

    def __str__(self) -> str:
        if self.scheme == "unix":
            return f"unix://{self.address}"
        host, port = self.address
        if self.scheme == "vsock":
            return f"vsock://{'' if host == VMADDR_CID_ANY else host}:{port}"
        return f"tcp://[{host}]:{port}" if ":" in host else f"tcp://{host}:{port}"


def parse_listen(text: str) -> ListenAddress:
    """``vsock://:PORT``, ``vsock://CID:PORT``, ``unix:///path`` or ``tcp://IP:PORT``."""
    parts = urllib.parse.urlsplit(text.strip())
    scheme = parts.scheme.lower()
    if parts.query or parts.fragment or "@" in parts.netloc:
        raise ProxyConfigError(f"a listen address has no query, fragment or user: {text[:80]!r}")
    if scheme == "unix":
        if parts.netloc or not parts.path.startswith("/"):
            raise ProxyConfigError(f"expected unix:///absolute/path.sock; found {text[:80]!r}")
        if len(os.fsencode(parts.path)) > 107:
            raise ProxyConfigError(f"a unix socket path has at most 107 bytes: {parts.path[:80]!r}")
        return ListenAddress("unix", socket.AF_UNIX, parts.path)
    if scheme not in ("vsock", "tcp"):
        raise ProxyConfigError(
            f"expected vsock://[CID]:PORT, unix:///PATH or tcp://IP:PORT; found {text[:80]!r}"
        )
    if parts.path not in ("", "/"):
        raise ProxyConfigError(f"expected nothing after the port; found {parts.path[:40]!r}")
    host, sep, port_text = parts.netloc.rpartition(":")
    if not sep:
        raise ProxyConfigError(f"expected {scheme}://...:PORT; found {text[:80]!r}")
    port = _port(port_text, text)
    if scheme == "vsock":
        if host == "":
            return ListenAddress("vsock", socket.AF_VSOCK, (VMADDR_CID_ANY, port))
        if not host.isdigit() or int(host) > 0xFFFFFFFF:
            raise ProxyConfigError(
                f"expected vsock://:PORT or vsock://CID:PORT (numeric CID); found {text[:80]!r}"
            )
        return ListenAddress("vsock", socket.AF_VSOCK, (int(host), port))
    literal = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        ip = ipaddress.ip_address(literal)
    except ValueError:
        raise ProxyConfigError(
            f"expected tcp://IPV4:PORT or tcp://[IPV6]:PORT (an address, not a name); "
            f"found {text[:80]!r}"
        ) from None
    if ip.version == 6 and not host.startswith("["):
        raise ProxyConfigError(f"write an IPv6 address in brackets: tcp://[{ip}]:{port}")
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    return ListenAddress("tcp", family, (str(ip), port))


def parse_allowlist_yaml(text: str, *, source: str = "allowlist") -> tuple[HostPort, ...]:
    """The AWS vsock-proxy configuration format::

        allowlist:
        - {address: kms.us-east-1.amazonaws.com, port: 443}

    Strict: unknown keys (a mistyped ``adress``), missing fields, a port that is not an
    integer, or an empty list are errors, so that a typo never widens or empties the list
    silently. Needs PyYAML (``pip install 'nitro-keyrelease[proxy]'``), imported only here.
    """
    try:
        import yaml
    except ImportError:
        raise ProxyConfigError(
            f"{source}: reading a YAML allowlist needs PyYAML "
            "(pip install 'nitro-keyrelease[proxy]'); or give --allow HOST:PORT"
        ) from None
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ProxyConfigError(f"{source}: not valid YAML{where}") from None
    if not isinstance(document, dict) or set(document) != {"allowlist"}:
        keys = sorted(map(str, document)) if isinstance(document, dict) else type(document).__name__
        raise ProxyConfigError(f"{source}: expected a map with one key, allowlist; found {keys}")
    entries = document["allowlist"]
    if not isinstance(entries, list) or not entries:
        raise ProxyConfigError(f"{source}: expected a non-empty list under allowlist")
    parsed = []
    for n, entry in enumerate(entries, 1):
        if not isinstance(entry, dict) or set(entry) != {"address", "port"}:
            found = sorted(map(str, entry)) if isinstance(entry, dict) else type(entry).__name__
            raise ProxyConfigError(
                f"{source}: entry {n}: expected {{address: HOST, port: PORT}}; found {found}"
            )
        address, port = entry["address"], entry["port"]
        if not isinstance(address, str):
            raise ProxyConfigError(f"{source}: entry {n}: address must be a string")
        if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
            raise ProxyConfigError(f"{source}: entry {n}: port must be an integer 1..65535")
        try:
            parsed.append(HostPort(_normal_host(address.strip()), port))
        except ProxyConfigError as e:
            raise ProxyConfigError(f"{source}: entry {n}: {e}") from None
    return tuple(parsed)


def read_bounded_text(path: str | Path, limit: int, error: type[Exception]) -> str:
    """A configuration file's text: at most ``limit`` bytes of UTF-8, else ``error`` naming
    the path and what is wrong (unreadable, too large, not text)."""
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except OSError as e:
        raise error(f"cannot read {path}: {e.strerror}") from None
    if len(data) > limit:
        raise error(f"{path}: larger than {limit} bytes")
    try:
        return data.decode()
    except UnicodeDecodeError:
        raise error(f"{path}: not UTF-8 text") from None


def load_allowlist_file(path: str | Path) -> tuple[HostPort, ...]:
    text = read_bounded_text(path, MAX_ALLOWLIST_BYTES, ProxyConfigError)
    return parse_allowlist_yaml(text, source=str(path))


# -- Decide -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Allowlist:
    """The destinations this proxy may connect to. ``source`` says where the list came from:
    ``destination`` (none given: only the destination itself, as the operator typed it),
    ``--allow``, a file name, or both."""

    entries: tuple[HostPort, ...]
    source: str

    def permits(self, destination: HostPort) -> bool:
        return destination in self.entries

    def check(self, destination: HostPort) -> None:
        """Refused unless an entry names the same host (name for name, or address for
        address, compared in canonical form) and the same port."""
        if not self.entries:
            raise Refused("the allowlist is empty")
        if destination in self.entries:
            return
        same_host = [e for e in self.entries if e.host == destination.host]
        if same_host:
            ports = ", ".join(str(e.port) for e in same_host)
            raise Refused(
                f"{destination} is not on the allowlist ({self.source}): "
                f"{destination.host} is allowed on port {ports} only"
            )
        raise Refused(
            f"{destination} is not on the allowlist ({self.source}, {len(self.entries)} "
            "entries); names and addresses are compared as written, not resolved"
        )


# -- Config -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ProxyConfig:
    """What ``keyutil proxy`` was asked to do; ``allowlist`` from :func:`build_allowlist`."""

    listen: ListenAddress
    to: Destination
    allowlist: Allowlist | None  # None: not a TCP destination (the allowlist is for those)
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    grace: float = DEFAULT_GRACE
    buffer_size: int = BUFFER_SIZE

    def __post_init__(self) -> None:
        if self.max_connections < 1:
            raise ProxyConfigError("max_connections must be at least 1")
        if self.idle_timeout <= 0 or self.connect_timeout <= 0 or self.grace < 0:
            raise ProxyConfigError("timeouts must be positive (the grace may be 0)")
        if isinstance(self.to, HostPort) and self.allowlist is None:
            raise ProxyConfigError("a TCP destination needs an allowlist")


def build_allowlist(
    to: HostPort, allow: Sequence[str], allowlist_file: str | Path | None
) -> Allowlist:
    """``--allow`` entries and the ``--allowlist`` file together; the destination alone if
    neither is given."""
    entries = [parse_hostport(a, what="--allow") for a in allow]
    sources = ["--allow"] if allow else []
    if allowlist_file is not None:
        entries += load_allowlist_file(allowlist_file)
        sources.append(str(allowlist_file))
    if not sources:
        return Allowlist((to,), "destination")
    return Allowlist(tuple(dict.fromkeys(entries)), " + ".join(sources))


# -- Act ----------------------------------------------------------------------------------


def resolve(host: str, port: int, timeout: float) -> list[tuple[int, Any]]:
    """getaddrinfo bounded by ``timeout`` (the transport's resolver)."""
    return _resolve(host, port, _Deadline(timeout))


def describe_peer(sock: socket.socket) -> str:
    """Who connected: ``IP:PORT``, ``vsock:CID:PORT`` or ``unix:pid=N,uid=N``."""
    try:
        if sock.family == socket.AF_UNIX:
            pid, uid, _ = struct.unpack(
                "3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            )
            return f"unix:pid={pid},uid={uid}"
        host, port = sock.getpeername()[:2]
    except OSError:
        return "unknown"
    if sock.family == socket.AF_VSOCK:
        return f"vsock:{host}:{port}"
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"


def _sockaddr_text(family: int, address: Any) -> str:
    if family == socket.AF_UNIX:
        return f"unix:{address}"
    host, port = address[:2]
    if family == socket.AF_VSOCK:
        return f"vsock:{host}:{port}"
    return f"[{host}]:{port}" if family == socket.AF_INET6 else f"{host}:{port}"


def find_enclave_cid(name: str, timeout: float) -> int:
    """The default :data:`EnclaveFinder`: ``nitro-cli describe-enclaves`` (see
    :mod:`keyutil.host.nitro`; its path from ``KEYUTIL_NITRO_CLI``)."""
    from keyutil.host.nitro import NitroCli

    return NitroCli.from_env().find_cid(name, timeout)


def destination_addresses(
    to: Destination, timeout: float, resolve: Resolver, find_enclave: EnclaveFinder
) -> list[tuple[int, Any]]:
    """(family, sockaddr) pairs to try for ``to``, looked up now: a name through
    ``resolve``, an enclave name through ``find_enclave``. OSError, TimeoutError or
    LookupError when there is none."""
    if isinstance(to, HostPort):
        return resolve(to.host, to.port, timeout)
    if isinstance(to, UnixDest):
        return [(socket.AF_UNIX, to.path)]
    if isinstance(to, VsockDest):
        return [(socket.AF_VSOCK, (to.cid, to.port))]
    return [(socket.AF_VSOCK, (find_enclave(to.name, timeout), to.port))]


def _reason(e: OSError) -> str:
    return e.strerror or (errno.errorcode.get(e.errno or 0) if e.errno else None) or str(e)


def clear_stale_unix(path: str) -> None:
    """Remove a socket file left by a process that died; refuse a live one or a non-socket."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise OSError(errno.EEXIST, f"{path} exists and is not a socket")
    with socket.socket(socket.AF_UNIX) as probe:
        try:
            probe.connect(path)
        except ConnectionRefusedError:
            os.unlink(path)
            return
        except OSError:
            return  # let bind() report it
    raise OSError(errno.EADDRINUSE, "another process is listening on it")


def connect_destination(
    to: Destination,
    timeout: float,
    *,
    resolve: Resolver = resolve,
    find_enclave: EnclaveFinder = find_enclave_cid,
) -> socket.socket:
    """A connected stream socket to ``to`` (looked up now), blocking, or OSError/LookupError
    naming the last failure. For the clients of a destination: wait-ready, the log sender."""
    deadline = time.monotonic() + timeout
    last: Exception = OSError(f"no address for {to}")
    for family, address in destination_addresses(to, timeout, resolve, find_enclave):
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"{to}: connect timed out")
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.settimeout(left)
            sock.connect(address)
        except OSError as e:
            sock.close()
            last = OSError(e.errno, f"{_sockaddr_text(family, address)}: {_reason(e)}")
            continue
        sock.settimeout(None)
        return sock
    raise last


class _Connection:
    """One client and its destination: two pumps, one log line."""

    def __init__(self, proxy: Proxy, number: int, client: socket.socket) -> None:
        self.proxy = proxy
        self.number = number
        self.client = client
        self.dest: socket.socket | None = None
        self.dest_address: str | None = None
        self.peer = describe_peer(client)
        self.started = proxy.clock()
        self.last_activity = self.started
        self.to_dest = 0
        self.to_client = 0
        self.first_eof: str | None = None
        self.abort_reason: str | None = None
        self.error: str | None = None
        self.directions_done = 0
        self.lock = threading.Lock()
        self.logged = False
        self.thread = threading.Thread(target=self.run, name=f"proxy-conn-{number}", daemon=True)

    # -- ending --
    def abort(self, reason: str, error: str | None = None) -> None:
        """End the connection now (idle, error, shutdown): the first reason wins."""
        with self.lock:
            if self.abort_reason is not None or self.directions_done == 2:
                return
            self.abort_reason, self.error = reason, error
        for sock in (self.client, self.dest):
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def _direction_done(self, eof_from: str | None) -> None:
        with self.lock:
            if eof_from is not None and self.first_eof is None:
                self.first_eof = eof_from
            self.directions_done += 1

    def finish_line(self) -> None:
        """Log this connection's line, once (the pump thread or, at shutdown, the proxy)."""
        with self.lock:
            if self.logged:
                return
            self.logged = True
            end = self.abort_reason or self.first_eof or "error"
            error = self.error
        fields: dict[str, Any] = {
            "conn": self.number,
            "peer": self.peer,
            "destination": str(self.proxy.config.to),
            "dest_address": self.dest_address,
            "bytes_to_dest": self.to_dest,
            "bytes_to_client": self.to_client,
            "duration_s": round(self.proxy.clock() - self.started, 3),
            "end": end,
        }
        if error is not None:
            fields["error"] = error
        level = {"client_closed": "info", "dest_closed": "info", "error": "error"}
        self.proxy.log(level.get(end, "warning"), "connection", fields)

    # -- doing --
    def run(self) -> None:
        try:
            self._run()
        except Exception as e:  # never lose the line, never kill the proxy
            self.abort("error", f"{type(e).__name__}: {e}")
        finally:
            for sock in (self.client, self.dest):
                if sock is not None:
                    sock.close()
            self.finish_line()
            self.proxy._forget(self)

    def _run(self) -> None:
        config = self.proxy.config
        if isinstance(config.to, HostPort):  # the allowlist is for internet destinations
            try:
                assert config.allowlist is not None
                config.allowlist.check(config.to)  # again, for every connection
            except Refused as e:
                self.abort("refused", str(e))
                return
        dest = self._connect(config.to, config.connect_timeout)
        if dest is None:
            return
        tick = max(0.01, min(MAX_TICK, config.idle_timeout / 4))
        self.client.settimeout(tick)
        dest.settimeout(tick)
        back = threading.Thread(
            target=self._pump,
            args=(dest, self.client, "dest"),
            name=f"proxy-conn-{self.number}-back",
            daemon=True,
        )
        back.start()
        self._pump(self.client, dest, "client")
        back.join()

    def _connect(self, to: Destination, timeout: float) -> socket.socket | None:
        deadline = self.proxy.clock() + timeout
        try:
            targets = destination_addresses(
                to, timeout, self.proxy.resolve, self.proxy.find_enclave
            )
        except (OSError, TimeoutError) as e:
            name = to.host if isinstance(to, HostPort) else str(to)
            self.abort("destination_unreachable", f"resolving {name}: {_reason(e)}")
            return None
        except LookupError as e:
            self.abort("destination_unreachable", f"finding {to}: {e}")
            return None
        last = "no address"
        for family, address in targets:
            left = deadline - self.proxy.clock()
            if left <= 0:
                last = "connect timed out"
                break
            sock = socket.socket(family, socket.SOCK_STREAM)
            with self.lock:  # so that a shutdown can interrupt the connect
                if self.abort_reason is not None:
                    sock.close()
                    return None
                self.dest = sock
            try:
                sock.settimeout(left)
                sock.connect(address)
            except TimeoutError:
                last = f"{_sockaddr_text(family, address)}: connect timed out"
            except OSError as e:
                last = f"{_sockaddr_text(family, address)}: {_reason(e)}"
            else:
                if family in (socket.AF_INET, socket.AF_INET6):
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                self.dest_address = _sockaddr_text(family, address)
                return sock
            with self.lock:
                self.dest = None
            sock.close()
        self.abort("destination_unreachable", last)
        return None

    def _idle(self) -> bool:
        """True (and the connection aborted) when no byte moved for idle_timeout."""
        if self.abort_reason is not None:
            return True
        idle = self.proxy.clock() - self.last_activity
        if idle < self.proxy.config.idle_timeout:
            return False
        self.abort("idle_timeout")
        return True

    def _pump(self, src: socket.socket, dst: socket.socket, source: str) -> None:
        """Copy ``src`` to ``dst`` until ``src`` ends; then end ``dst``'s writing side."""
        clock = self.proxy.clock
        buf = bytearray(self.proxy.config.buffer_size)
        view = memoryview(buf)
        recv_into, send = src.recv_into, dst.send
        to_dest = source == "client"
        target = "dest" if to_dest else "client"
        while True:
            try:
                n = recv_into(buf)
            except TimeoutError:
                if self._idle():
                    break
                continue
            except OSError as e:
                self.abort("error", f"reading from {source}: {_reason(e)}")
                break
            if n == 0:
                self._direction_done(f"{source}_closed")
                with contextlib.suppress(OSError):
                    dst.shutdown(socket.SHUT_WR)
                return
            self.last_activity = clock()
            sent = 0
            while sent < n:
                try:
                    k = send(view[sent:n])
                except TimeoutError:
                    if self._idle():
                        break
                    continue
                except OSError as e:
                    self.abort("error", f"writing to {target}: {_reason(e)}")
                    break
                sent += k
                self.last_activity = clock()
                if to_dest:
                    self.to_dest += k
                else:
                    self.to_client += k
            if sent < n:
                break
        self._direction_done(None)


class Proxy:
    """Listens on one address and forwards every connection to one destination (TCP, unix,
    vsock by CID or by enclave name).

    Construction does no I/O; :meth:`open` binds (ListenError), :meth:`serve` accepts until
    :meth:`stop` (safe from a signal handler or another thread), then winds down.
    """

    def __init__(
        self,
        config: ProxyConfig,
        log: Log,
        *,
        clock: Callable[[], float] = time.monotonic,
        resolve: Resolver = resolve,
        find_enclave: EnclaveFinder = find_enclave_cid,
    ) -> None:
        self.config = config
        self.clock = clock
        self.resolve = resolve
        self.find_enclave = find_enclave
        self._log = log
        self._log_lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._unix_inode: tuple[int, int] | None = None
        self._wake: tuple[socket.socket, socket.socket] | None = None  # made by serve()
        self._stopping = threading.Event()
        self._active: set[_Connection] = set()
        self._active_changed = threading.Condition()
        self._count = 0
        self.bound: str | None = None

    def log(self, level: str, event: str, fields: Mapping[str, Any]) -> None:
        with self._log_lock:
            self._log(level, event, fields)

    # -- listening: the only place where the socket family matters --
    def open(self) -> None:
        listen = self.config.listen
        try:
            sock = socket.socket(listen.family, socket.SOCK_STREAM)
        except OSError as e:
            raise ListenError(self._listen_failure(e, "cannot create the socket")) from None
        try:
            if listen.family in (socket.AF_INET, socket.AF_INET6):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if listen.family == socket.AF_UNIX:
                self._clear_stale_unix(listen.address)
            sock.bind(listen.address)
            if listen.family == socket.AF_UNIX:
                st = os.stat(listen.address)
                self._unix_inode = (st.st_dev, st.st_ino)
            sock.listen(LISTEN_BACKLOG)
            sock.setblocking(False)
        except OSError as e:
            sock.close()
            raise ListenError(self._listen_failure(e, "cannot listen")) from None
        self._listener = sock
        bound = sock.getsockname()
        self.bound = str(
            listen
            if listen.family == socket.AF_UNIX
            else ListenAddress(listen.scheme, listen.family, tuple(bound[:2]))
        )

    def _listen_failure(self, e: OSError, what: str) -> str:
        listen = self.config.listen
        text = f"{what} on {listen}: {_reason(e)}"
        if listen.family == socket.AF_VSOCK:
            text += " (AF_VSOCK: is this a Nitro-enabled instance with the vsock driver loaded?)"
        return text

    def _clear_stale_unix(self, path: str) -> None:
        clear_stale_unix(path)

    def _remove_unix(self) -> None:
        if self._unix_inode is None:
            return
        path = self.config.listen.address
        with contextlib.suppress(OSError):
            st = os.lstat(path)
            if (st.st_dev, st.st_ino) == self._unix_inode:  # only the file we created
                os.unlink(path)
        self._unix_inode = None

    # -- running --
    def stop(self) -> None:
        self._stopping.set()
        wake = self._wake
        if wake is not None:
            with contextlib.suppress(OSError):
                wake[1].send(b"x")

    def serve(self) -> None:
        """Accept until :meth:`stop`, then close the listener, wait up to ``grace`` for open
        connections, close the rest (``shutdown``) and log the stop line."""
        if self._listener is None:
            self.open()
        listener = self._listener
        assert listener is not None
        config = self.config
        self.log(
            "info",
            "listening",
            {
                "listen": self.bound,
                "to": str(config.to),
                "allowlist": [str(e) for e in config.allowlist.entries]
                if config.allowlist is not None
                else None,
                "allowlist_source": config.allowlist.source if config.allowlist else None,
                "max_connections": config.max_connections,
                "idle_timeout_s": config.idle_timeout,
                "connect_timeout_s": config.connect_timeout,
                "pid": os.getpid(),
            },
        )
        wake_r, wake_w = self._wake = socket.socketpair()
        wake_w.setblocking(False)
        selector = selectors.DefaultSelector()
        selector.register(listener, selectors.EVENT_READ)
        selector.register(wake_r, selectors.EVENT_READ)
        try:
            while not self._stopping.is_set():
                for key, _ in selector.select():
                    if key.fileobj is listener and not self._stopping.is_set():
                        self._accept_one(listener)
        finally:
            selector.close()
            self._wake = None
            wake_r.close()
            wake_w.close()
            listener.close()
            self._listener = None
            self._remove_unix()
            self._wind_down()

    def _accept(self, listener: socket.socket) -> tuple[socket.socket, Any]:
        return listener.accept()

    def _accept_one(self, listener: socket.socket) -> None:
        try:
            client, _ = self._accept(listener)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:  # out of file descriptors, ...: keep serving, do not spin
            self.log("error", "accept_failed", {"error": _reason(e)})
            time.sleep(0.1)
            return
        client.setblocking(True)
        if client.family in (socket.AF_INET, socket.AF_INET6):
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._count += 1
        conn = _Connection(self, self._count, client)
        with self._active_changed:
            over = len(self._active) >= self.config.max_connections
            if not over:
                self._active.add(conn)
        if over:
            conn.abort_reason = "over_limit"
            conn.error = f"{self.config.max_connections} connections open"
            client.close()
            conn.finish_line()
            return
        conn.thread.start()

    def _forget(self, conn: _Connection) -> None:
        with self._active_changed:
            self._active.discard(conn)
            self._active_changed.notify_all()

    def _wind_down(self) -> None:
        end = self.clock() + self.config.grace
        with self._active_changed:
            open_at_stop = len(self._active)
            while self._active and (left := end - self.clock()) > 0:
                self._active_changed.wait(left)
            remaining = list(self._active)
        for conn in remaining:
            conn.abort("shutdown")
        for conn in remaining:
            conn.thread.join(FORCED_CLOSE_WAIT / max(1, len(remaining)))
            conn.finish_line()  # no-op if its own thread logged it
        self.log(
            "info",
            "stopped",
            {
                "connections": self._count,
                "open_at_stop": open_at_stop,
                "closed_by_shutdown": len(remaining),
            },
        )
