"""``keyutil run``'s configuration: a TOML file baked into the image, so it is measured.

    >>> from keyutil.enclave.config import parse_config
    >>> config = parse_config('''
    ... [app]
    ... command = ["/usr/local/bin/app", "--port", "4000"]
    ... workdir = "/srv/app"
    ... ''')
    >>> config.app.command[0], config.network.loopback, config.keys
    ('/usr/local/bin/app', True, ())

The host cannot change this file without changing PCR0..2, and so the image hash the KMS
allows: it decides what the enclave does at boot. Parsing is strict: an unknown table or
key (a mistyped ``comand``), a wrong type, a relative path or an address that cannot be used
is a :class:`ConfigError` naming where, before anything is done. Every table but ``[app]``
is optional. The full reference, with every key, is in docs/deploy.md; in short::

    [supervisor]   log_format = "text" | "json"
    [network]      loopback = true
    [tmpfs]        paths = ["/run/keys"], size = "1m"
    [kms]          urls = ["vsock://3:8000", ...], pubkey = "@/etc/keyutil/kms.pub",
                   deadline = 60, ca = "/path.pem"
    [[keys]]       names = ["app"], length = 32, dir = "/run/keys", expect_app = "my-app"
    [[sealed]]     key = "weights", source = "/opt/model.age" or "https://...",
                   format = "file" (dest = "/run/keys/model") | "dotenv", via, source_ca,
                   expect_sha256 = "<sha256sum of the plaintext>"
    [[forward]]    listen = "vsock://:5001", to = "tcp://127.0.0.1:4000"  (inbound)
                   listen = "tcp://127.0.0.1:8443", to = "vsock://3:8443"  (egress)
    [log]          to = "vsock://3:9000", buffer_lines, buffer_bytes, console, flush_timeout
    [host_settings] from = "vsock://3:9001", allow = ["LOG_LEVEL"], timeout = 2
    [app]          command = [...], workdir = "/", env = {NAME = "value"}
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from keyutil.proxy import (
    Destination,
    EnclaveDest,
    HostPort,
    ListenAddress,
    ProxyConfigError,
    parse_destination,
    parse_listen,
    read_bounded_text,
)

MAX_CONFIG_BYTES = 1 << 20
_ENV_NAME = re.compile(r"\A[A-Za-z_][A-Za-z0-9_]*\Z")
_KEY_NAME = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")
_SIZE = re.compile(r"\A[1-9][0-9]{0,9}[kmg]?\Z")
RESERVED_ENV_PREFIX = "KEYUTIL_"
# Names through which an environment chooses the code a program loads or runs: the host may
# never supply them (the app would run the host's choice with the released keys).
CODE_ENV_PREFIXES = ("LD_", "PYTHON", "NODE_", "PERL5", "RUBY", "JAVA_", "_JAVA_", "DYLD_")
CODE_ENV_NAMES = frozenset(
    {"PATH", "BASH_ENV", "ENV", "SHELLOPTS", "GCONV_PATH", "MALLOC_CONF", "GLIBC_TUNABLES",
     "CLASSPATH", "GEM_PATH", "GEM_HOME", "LUA_PATH", "LUA_CPATH", "PHPRC", "GIT_EXEC_PATH"}
)


class ConfigError(ValueError):
    """The configuration cannot be used; the message names the table and key."""


@dataclasses.dataclass(frozen=True)
class Network:
    loopback: bool = True


@dataclasses.dataclass(frozen=True)
class Tmpfs:
    paths: tuple[str, ...] = ()
    size: str = "1m"


@dataclasses.dataclass(frozen=True)
class Kms:
    urls: tuple[str, ...]
    pubkey: str | None
    deadline: float = 60.0
    ca: str | None = None
    insecure_skip_kms_auth: bool = False


@dataclasses.dataclass(frozen=True)
class KeySet:
    names: tuple[str, ...]
    dir: str
    length: int = 32
    expect_app: str | None = None


@dataclasses.dataclass(frozen=True)
class Sealed:
    """A file sealed with age to the application's key ``key``: opened to ``dest`` (format
    ``file``) or into the app's environment (``dotenv``, never written anywhere)."""

    key: str
    source: str  # an absolute path or an https:// URL
    format: str = "file"
    dest: str | None = None
    via: str | None = None  # for https://: the egress proxy, vsock://3:PORT
    source_ca: str | None = None
    expect_sha256: str | None = None  # the plaintext's SHA-256, 64 hex digits: who sealed it


@dataclasses.dataclass(frozen=True)
class Forward:
    listen: ListenAddress
    to: Destination


@dataclasses.dataclass(frozen=True)
class LogBridge:
    to: Destination | None = None
    buffer_lines: int = 10_000
    buffer_bytes: int = 4 << 20
    console: bool = True
    flush_timeout: float = 2.0


@dataclasses.dataclass(frozen=True)
class HostSettings:
    source: Destination
    allow: tuple[str, ...]
    timeout: float = 2.0


@dataclasses.dataclass(frozen=True)
class App:
    command: tuple[str, ...]
    workdir: str = "/"
    env: Mapping[str, str] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class RunConfig:
    app: App
    log_format: str = "text"
    network: Network = Network()
    tmpfs: Tmpfs = Tmpfs()
    kms: Kms | None = None
    keys: tuple[KeySet, ...] = ()
    sealed: tuple[Sealed, ...] = ()
    forwards: tuple[Forward, ...] = ()
    log: LogBridge = LogBridge()
    host_settings: HostSettings | None = None


# -- strict readers -------------------------------------------------------------------------


class _Table:
    """One TOML table: typed getters that name ``where``; :meth:`done` refuses leftovers."""

    def __init__(self, raw: Any, where: str) -> None:
        if not isinstance(raw, dict):
            raise ConfigError(f"{where}: expected a table")
        self.raw, self.where, self.used = raw, where, set[str]()

    def _get(self, key: str, kind: type | tuple[type, ...], default: Any) -> Any:
        self.used.add(key)
        if key not in self.raw:
            if default is _REQUIRED:
                raise ConfigError(f"{self.where}.{key}: required")
            return default
        value = self.raw[key]
        if (isinstance(value, bool) and kind is not bool) or not isinstance(value, kind):
            name = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
            raise ConfigError(f"{self.where}.{key}: expected {name}; found {type(value).__name__}")
        return value

    def string(self, key: str, default: Any = None) -> Any:
        value = self._get(key, str, default)
        if isinstance(value, str) and ("\0" in value or not value):
            raise ConfigError(f"{self.where}.{key}: expected a non-empty string without NUL")
        return value

    def path(self, key: str, default: Any = None) -> Any:
        value = self.string(key, default)
        if isinstance(value, str) and not os.path.isabs(value):
            raise ConfigError(f"{self.where}.{key}: expected an absolute path; found {value!r}")
        return os.path.normpath(value) if isinstance(value, str) else value

    def boolean(self, key: str, default: bool) -> bool:
        return bool(self._get(key, bool, default))

    def integer(self, key: str, default: Any, low: int, high: int) -> Any:
        value = self._get(key, int, default)
        if isinstance(value, int) and not low <= value <= high:
            raise ConfigError(f"{self.where}.{key}: expected {low}..{high}; found {value}")
        return value

    def number(self, key: str, default: Any, low: float, high: float) -> float:
        value = self._get(key, (int, float), default)
        if not low < float(value) <= high:
            raise ConfigError(f"{self.where}.{key}: expected more than {low}, at most {high}")
        return float(value)

    def strings(self, key: str, default: Any = None) -> Any:
        value = self._get(key, list, default)
        if value is None or value is default:
            return value
        if not all(isinstance(v, str) and v and "\0" not in v for v in value):
            raise ConfigError(f"{self.where}.{key}: expected a list of non-empty strings")
        return tuple(value)

    def done(self) -> None:
        unknown = sorted(set(self.raw) - self.used)
        if unknown:
            raise ConfigError(f"{self.where}: unknown key {unknown[0]!r}")


_REQUIRED = object()


def _destination(table: _Table, key: str, *, required: bool = True) -> Destination | None:
    text = table.string(key, _REQUIRED if required else None)
    if text is None:
        return None
    try:
        return parse_destination(text)
    except ProxyConfigError as e:
        raise ConfigError(f"{table.where}.{key}: {e}") from None


def _enclave_side(dest: Destination | None, where: str) -> None:
    if isinstance(dest, EnclaveDest):
        raise ConfigError(f"{where}: an enclave name is a host-side address; use vsock://3:PORT")


# -- sections --------------------------------------------------------------------------------


def _kms(t: _Table) -> Kms:
    urls = t.strings("urls", _REQUIRED)
    if not urls:
        raise ConfigError("kms.urls: give at least one KMS address")
    kms = Kms(
        urls=urls,
        pubkey=t.string("pubkey"),
        deadline=t.number("deadline", 60.0, 0, 3600),
        ca=t.path("ca"),
        insecure_skip_kms_auth=t.boolean("insecure_skip_kms_auth", False),
    )
    if kms.pubkey is None and not kms.insecure_skip_kms_auth:
        raise ConfigError("kms.pubkey: required (the pinned KMS identity, or @FILE)")
    t.done()
    return kms


def _keyset(t: _Table) -> KeySet:
    names = t.strings("names", _REQUIRED)
    if not names or len(set(names)) != len(names):
        raise ConfigError(f"{t.where}.names: expected distinct key names")
    for name in names:
        if not _KEY_NAME.match(name):
            raise ConfigError(f"{t.where}.names: {name!r} is not a key name")
    keyset = KeySet(
        names=names,
        dir=t.path("dir", _REQUIRED),
        length=t.integer("length", 32, 16, 1024),
        expect_app=t.string("expect_app"),
    )
    t.done()
    return keyset


def _sealed(t: _Table) -> Sealed:
    key = t.string("key", _REQUIRED)
    if not _KEY_NAME.match(key):
        raise ConfigError(f"{t.where}.key: {key!r} is not a key name")
    source = t.string("source", _REQUIRED)
    if not (source.startswith("https://") or os.path.isabs(source)):
        raise ConfigError(f"{t.where}.source: expected an absolute path or an https:// URL")
    via = t.string("via")
    if via is not None:
        try:
            _enclave_side(parse_destination(via), f"{t.where}.via")
        except ProxyConfigError as e:
            raise ConfigError(f"{t.where}.via: {e}") from None
    sealed = Sealed(
        key=key,
        source=source,
        format=t.string("format", "file"),
        dest=t.path("dest"),
        via=via,
        source_ca=t.path("source_ca"),
        expect_sha256=t.string("expect_sha256"),
    )
    if sealed.expect_sha256 is not None:
        from keyutil.sealing import parse_sha256

        try:
            parse_sha256(sealed.expect_sha256)
        except ValueError as e:
            raise ConfigError(f"{t.where}.expect_sha256: {e}") from None
    if sealed.format not in ("file", "dotenv"):
        raise ConfigError(f"{t.where}.format: expected file or dotenv; found {sealed.format!r}")
    if (sealed.format == "file") != (sealed.dest is not None):
        raise ConfigError(
            f"{t.where}.dest: a file needs dest (on tmpfs); a dotenv goes to the app's "
            "environment and takes none"
        )
    t.done()
    return sealed


def _forward(t: _Table) -> Forward:
    try:
        listen = parse_listen(t.string("listen", _REQUIRED))
    except ProxyConfigError as e:
        raise ConfigError(f"{t.where}.listen: {e}") from None
    to = _destination(t, "to")
    assert to is not None
    _enclave_side(to, f"{t.where}.to")
    t.done()
    return Forward(listen, to)


def _log(t: _Table) -> LogBridge:
    to = _destination(t, "to", required=False)
    _enclave_side(to, "log.to")
    if isinstance(to, HostPort):
        raise ConfigError("log.to: expected vsock://3:PORT (or unix:///PATH); not TCP")
    log = LogBridge(
        to=to,
        buffer_lines=t.integer("buffer_lines", 10_000, 1, 1_000_000),
        buffer_bytes=t.integer("buffer_bytes", 4 << 20, 1024, 1 << 30),
        console=t.boolean("console", True),
        flush_timeout=t.number("flush_timeout", 2.0, -1, 60),
    )
    t.done()
    return log


def _host_settings(t: _Table, app_env: Mapping[str, str]) -> HostSettings:
    source = _destination(t, "from")
    assert source is not None
    _enclave_side(source, "host_settings.from")
    allow = t.strings("allow", _REQUIRED)
    for name in allow:
        if not _ENV_NAME.match(name):
            raise ConfigError(f"host_settings.allow: {name!r} is not an environment name")
        if name.upper().startswith(RESERVED_ENV_PREFIX):
            raise ConfigError(
                f"host_settings.allow: {name!r}: KEYUTIL_* settings never come from the host"
            )
        upper = name.upper()
        if upper in CODE_ENV_NAMES or upper.startswith(CODE_ENV_PREFIXES):
            raise ConfigError(
                f"host_settings.allow: {name!r} chooses the code the app loads or runs; "
                "the host may not supply it (set it in app.env)"
            )
        if name in app_env:
            raise ConfigError(
                f"host_settings.allow: {name!r} is set in app.env; the image's value wins, "
                "so the host may not supply it"
            )
    settings = HostSettings(source, allow, t.number("timeout", 2.0, 0, 60))
    t.done()
    return settings


def _app(t: _Table) -> App:
    command = t.strings("command", _REQUIRED)
    if not command:
        raise ConfigError("app.command: expected the program and its arguments")
    env_table = _Table(t._get("env", dict, {}), "app.env")
    env: dict[str, str] = {}
    for name in list(env_table.raw):
        if not _ENV_NAME.match(name):
            raise ConfigError(f"app.env: {name!r} is not an environment name")
        env[name] = env_table.string(name)
    app = App(command=command, workdir=t.path("workdir", "/"), env=env)
    t.done()
    return app


def parse_config(text: str, *, source: str = "config") -> RunConfig:
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{source}: not valid TOML: {e}") from None
    top = _Table(raw, source)
    app = _app(_Table(top._get("app", dict, _REQUIRED), "app"))
    supervisor = _Table(top._get("supervisor", dict, {}), "supervisor")
    log_format = supervisor.string("log_format", "text")
    if log_format not in ("text", "json"):
        raise ConfigError(f"supervisor.log_format: expected text or json; found {log_format!r}")
    supervisor.done()
    network = _Table(top._get("network", dict, {}), "network")
    net = Network(loopback=network.boolean("loopback", True))
    network.done()
    tmpfs_t = _Table(top._get("tmpfs", dict, {}), "tmpfs")
    paths = tmpfs_t.strings("paths", ())
    for p in paths:
        if not os.path.isabs(p):
            raise ConfigError(f"tmpfs.paths: expected absolute paths; found {p!r}")
    tmpfs = Tmpfs(tuple(os.path.normpath(p) for p in paths), tmpfs_t.string("size", "1m"))
    if not _SIZE.match(tmpfs.size):
        raise ConfigError(f"tmpfs.size: expected a size like 1m or 512k; found {tmpfs.size!r}")
    tmpfs_t.done()
    kms_raw = top._get("kms", dict, None)
    kms = _kms(_Table(kms_raw, "kms")) if kms_raw is not None else None
    keys = tuple(_keyset(_Table(k, f"keys[{n}]")) for n, k in enumerate(top._get("keys", list, [])))
    if keys and kms is None:
        raise ConfigError("keys: releasing keys needs a [kms] table")
    seen: set[str] = set()
    for keyset in keys:
        for name in keyset.names:
            target = os.path.join(keyset.dir, name)
            if target in seen:
                raise ConfigError(f"keys: {target} is written by two key sets")
            seen.add(target)
    sealed = tuple(
        _sealed(_Table(s, f"sealed[{n}]")) for n, s in enumerate(top._get("sealed", list, []))
    )
    if sealed and kms is None:
        raise ConfigError("sealed: opening sealed files needs a [kms] table")
    forwards = tuple(
        _forward(_Table(f, f"forward[{n}]")) for n, f in enumerate(top._get("forward", list, []))
    )
    log_raw = top._get("log", dict, None)
    log = _log(_Table(log_raw, "log")) if log_raw is not None else LogBridge()
    hs_raw = top._get("host_settings", dict, None)
    host_settings = _host_settings(_Table(hs_raw, "host_settings"), app.env) if hs_raw else None
    top.done()
    return RunConfig(
        app=app,
        log_format=log_format,
        network=net,
        tmpfs=tmpfs,
        kms=kms,
        keys=keys,
        sealed=sealed,
        forwards=forwards,
        log=log,
        host_settings=host_settings,
    )


def load_config(path: str | Path) -> RunConfig:
    text = read_bounded_text(path, MAX_CONFIG_BYTES, ConfigError)
    return parse_config(text, source=str(path))
