"""The replay store: a challenge nonce is accepted once across workers, replicas and restarts.

    >>> from mock_kms.replay import MemoryReplayStore, Verdict
    >>> store = MemoryReplayStore()
    >>> store.claim(b"nonce", expires_ms=2_000, now_ms=1_000)
    <Verdict.ACCEPTED: 'accepted'>
    >>> store.claim(b"nonce", expires_ms=2_000, now_ms=1_500)
    <Verdict.REPLAYED: 'replayed'>

Three implementations of one small interface, :class:`ReplayStore`:

- :class:`SqliteReplayStore`, the default: a SQLite database in WAL mode in the state
  directory. Every worker and every restart of one machine's KMS shares it; no server.
- :class:`RedisReplayStore` for replicas on several machines (``redis://HOST:PORT/DB``): one
  Lua script, atomic in Redis, that sets the nonce if absent (``SET NX``) with an expiry.
- :class:`MemoryReplayStore`, one process's memory: for tests and the in-process API.

Clocks. The nonce carries its issue time under its MAC, so its expiry is a fact of the nonce,
not of the clock that reads it. Each store keeps a *high-water time*: the latest time any
caller (or Redis's own clock) has reported. A claim is judged against that time, never
against a clock that went backwards, and an entry is forgotten only once the high-water time
has passed the nonce's own expiry: by then every later claim of it is refused as expired,
whatever the local clock says. A clock step back therefore cannot revive a nonce, and a
step forward only makes nonces expire early (refused: fail closed).

A store that cannot answer raises :class:`~mock_kms.errors.UnavailableError`
(``replay_store_unavailable``, HTTP 503): the KMS refuses rather than risk a second release.
The next claim tries again, so releases resume by themselves when the store is back.
"""

from __future__ import annotations

import abc
import contextlib
import enum
import logging
import os
import sqlite3
import threading
import time
import urllib.parse
from pathlib import Path
from typing import Any

from mock_kms.errors import ErrorCode, UnavailableError

logger = logging.getLogger(__name__)

SQLITE_FILE = "replay.sqlite3"
# A writer waits this long for another worker's transaction before the store is "unavailable".
SQLITE_BUSY_MS = 2000
# Each process drops the expired entries when the high-water time has moved this far since it
# last did: once a second rather than on every claim (the entries it drops are still refused
# as expired until then, by the high-water time; they only take room).
SQLITE_PRUNE_EVERY_MS = 1000
# The page size of a new store file (bytes).
SQLITE_PAGE_SIZE = 1024
REDIS_TIMEOUT_S = 1.0
REDIS_PREFIX = "mock-kms:nonce:"
REDIS_HIGH_WATER = "mock-kms:high-water-ms"


class Verdict(enum.StrEnum):
    ACCEPTED = "accepted"
    REPLAYED = "replayed"
    EXPIRED = "expired"


_last_warning = [0.0]  # time.monotonic() of this process's last "cannot answer" warning


def _unavailable(what: str, error: object) -> UnavailableError:
    """The error a client sees (it names neither the store nor its address, which are the
    operator's to know), after a warning in the log that names both, at most once a second."""
    now = time.monotonic()
    if now - _last_warning[0] >= 1.0:
        _last_warning[0] = now
        logger.warning("the replay store (%s) cannot answer: %s", what, error)
    return UnavailableError(
        ErrorCode.REPLAY_STORE_UNAVAILABLE,
        "the replay store cannot answer; releases are refused until it does",
    )


class ReplayStore(abc.ABC):
    """Remembers used nonces until their own expiry."""

    description = "replay store"

    @abc.abstractmethod
    def claim(self, nonce: bytes, *, expires_ms: int, now_ms: int) -> Verdict:
        """Mark ``nonce`` used. ACCEPTED the first time, REPLAYED after, EXPIRED if the store's
        high-water time is past ``expires_ms``. UnavailableError if the store cannot answer."""

    @abc.abstractmethod
    def check_ready(self) -> None:
        """Return if the store answers; UnavailableError otherwise (for /v1/health)."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections (after a fork, a worker opens its own)."""


class MemoryReplayStore(ReplayStore):
    """One process's memory: single use within one process only. At most ``max_entries``
    unexpired nonces (bounded memory); past that, claims are refused as ``overloaded``."""

    description = "memory"

    def __init__(self, max_entries: int = 100_000) -> None:
        self.max_entries = max_entries
        self._used: dict[bytes, int] = {}
        self._high_water = 0
        self._purge_at = 1024
        self._lock = threading.Lock()

    def claim(self, nonce: bytes, *, expires_ms: int, now_ms: int) -> Verdict:
        with self._lock:
            self._high_water = max(self._high_water, now_ms)
            if expires_ms < self._high_water:
                return Verdict.EXPIRED
            if len(self._used) >= min(self._purge_at, self.max_entries):  # amortized
                hw = self._high_water
                self._used = {n: e for n, e in self._used.items() if e >= hw}
                self._purge_at = max(1024, 2 * len(self._used))
            if nonce in self._used:
                return Verdict.REPLAYED
            if len(self._used) >= self.max_entries:
                raise UnavailableError(
                    ErrorCode.OVERLOADED, "too many releases in one nonce lifetime; retry"
                )
            self._used[nonce] = expires_ms
            return Verdict.ACCEPTED

    def check_ready(self) -> None:
        return None

    def __len__(self) -> int:
        return len(self._used)


class SqliteReplayStore(ReplayStore):
    """SQLite in WAL mode: shared by every process of one machine that opens the same file.

    One connection per process, used by one thread at a time (a lock: threads of one
    process gain nothing from queueing on the file lock instead), opened lazily so that a
    forked worker opens its own. Each claim is one ``BEGIN IMMEDIATE`` transaction of two
    statements: it raises the high-water time (and reads it back), and inserts the nonce if
    absent. Once a second of high-water time (``SQLITE_PRUNE_EVERY_MS``), the same
    transaction also drops the entries the high-water time has passed: an entry is dropped
    only once every claim of it is refused as expired, so pruning late changes no verdict.

    Another process's transaction makes ``BEGIN IMMEDIATE`` fail at once (busy timeout 0);
    the claim retries after a pause growing from 0.1 ms to 2 ms, for up to ``busy_ms``.
    SQLite's own busy handler would sleep 1, 2, 5, 10... ms, far longer than a transaction
    here lasts (tens of microseconds).
    """

    def __init__(self, path: Path, *, busy_ms: int = SQLITE_BUSY_MS) -> None:
        self.path = path
        self.busy_ms = busy_ms
        self.description = f"sqlite {path}"
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        self._pid = 0
        self._prune_at = 0  # the high-water time (ms) at which this process prunes next
        try:
            with self._lock:
                self._connection()
        except sqlite3.Error as e:
            raise _unavailable(self.description, e) from None
        finally:
            self.close()

    def _connection(self) -> sqlite3.Connection:
        if self._conn is not None and self._pid == os.getpid():
            return self._conn
        conn = sqlite3.connect(
            self.path, timeout=0, isolation_level=None, check_same_thread=False
        )
        self._conn, self._pid = conn, os.getpid()
        # Takes effect only when this creates the file (a file keeps its page size). Every
        # claim appends the pages it changed (the high-water row, the nonce and its index
        # entry) to the WAL, copied and checksummed whole: with 1 KiB pages rather than
        # SQLite's 4 KiB, a claim costs a busy server about 1 % less CPU per release.
        conn.execute(f"PRAGMA page_size={SQLITE_PAGE_SIZE}")
        self._retrying(conn, "PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode: a committed claim survives a crash of the process (what a
        # restart needs); a power cut may lose the last ones, and a reboot outlasts them.
        conn.execute("PRAGMA synchronous=NORMAL")
        self._retrying(
            conn,
            "CREATE TABLE IF NOT EXISTS nonces (nonce BLOB PRIMARY KEY, expires_ms INTEGER"
            " NOT NULL) WITHOUT ROWID",
            "CREATE INDEX IF NOT EXISTS nonces_expiry ON nonces (expires_ms)",
            "CREATE TABLE IF NOT EXISTS high_water (id INTEGER PRIMARY KEY CHECK (id = 0),"
            " ms INTEGER NOT NULL)",
            "INSERT OR IGNORE INTO high_water VALUES (0, 0)",
        )
        return conn

    def _retrying(self, conn: sqlite3.Connection, *statements: str) -> None:
        for statement in statements:
            self._begin(conn, statement)

    def _begin(self, conn: sqlite3.Connection, statement: str = "BEGIN IMMEDIATE") -> None:
        """Run ``statement``, retrying while another process holds the write lock."""
        end = time.monotonic() + self.busy_ms / 1000
        pause = 0.0001
        while True:
            try:
                conn.execute(statement)
                return
            except sqlite3.OperationalError as e:
                # The extended code's low byte is the primary one: SQLITE_BUSY_RECOVERY
                # (another process rebuilding the WAL index) is a SQLITE_BUSY too.
                primary = e.sqlite_errorcode & 0xFF
                if primary not in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
                    raise
                if time.monotonic() + pause > end:
                    raise
            time.sleep(pause)
            pause = min(pause * 2, 0.002)

    def claim(self, nonce: bytes, *, expires_ms: int, now_ms: int) -> Verdict:
        with self._lock:
            try:
                conn = self._connection()
                self._begin(conn)
                try:
                    (high_water,) = conn.execute(
                        "UPDATE high_water SET ms = max(ms, ?) WHERE id = 0 RETURNING ms",
                        (now_ms,),
                    ).fetchone()
                    if expires_ms < high_water:
                        verdict = Verdict.EXPIRED
                    else:
                        if high_water >= self._prune_at:
                            conn.execute("DELETE FROM nonces WHERE expires_ms < ?", (high_water,))
                            self._prune_at = high_water + SQLITE_PRUNE_EVERY_MS
                        inserted = conn.execute(
                            "INSERT OR IGNORE INTO nonces VALUES (?, ?)", (nonce, expires_ms)
                        ).rowcount
                        verdict = Verdict.ACCEPTED if inserted == 1 else Verdict.REPLAYED
                    conn.execute("COMMIT")
                except BaseException:
                    with contextlib.suppress(sqlite3.Error):
                        conn.execute("ROLLBACK")
                    raise
            except sqlite3.Error as e:
                self._close()
                raise _unavailable(self.description, e) from None
        return verdict

    def check_ready(self) -> None:
        with self._lock:
            try:
                self._connection().execute("SELECT ms FROM high_water").fetchone()
            except sqlite3.Error as e:
                self._close()
                raise _unavailable(self.description, e) from None

    def close(self) -> None:
        with self._lock:
            self._close()

    def _close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and self._pid == os.getpid():
            with contextlib.suppress(sqlite3.Error):
                conn.close()


# KEYS: nonce key, high-water key. ARGV: expires_ms, now_ms.
# Redis's own clock (TIME) counts as a reported time too: once Redis has forgotten a nonce
# (its key expired by Redis's clock), the high-water time is past the nonce's expiry.
_CLAIM_SCRIPT = """
local t = redis.call('TIME')
local redis_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local hw = tonumber(redis.call('GET', KEYS[2]) or '0')
local now = tonumber(ARGV[2])
if now > hw then hw = now end
if redis_ms > hw then hw = redis_ms end
redis.call('SET', KEYS[2], hw)
local expires = tonumber(ARGV[1])
if expires < hw then return 'expired' end
if redis.call('SET', KEYS[1], '1', 'NX', 'PXAT', expires + 1) then return 'accepted' end
return 'replayed'
"""


class RedisReplayStore(ReplayStore):
    """Redis, shared by replicas: ``redis://HOST:PORT/DB`` (redis-py, imported lazily)."""

    def __init__(self, url: str, *, timeout: float = REDIS_TIMEOUT_S) -> None:
        import redis

        parsed = urllib.parse.urlsplit(url)
        # The URL may carry a password: never log or show it.
        self.description = f"redis {parsed.hostname}:{parsed.port or 6379}{parsed.path or '/0'}"
        self._client: Any = redis.Redis.from_url(
            url,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry_on_timeout=False,
            health_check_interval=0,
        )
        self._script = self._client.register_script(_CLAIM_SCRIPT)
        self._errors: tuple[type[BaseException], ...] = (redis.RedisError, OSError)

    def claim(self, nonce: bytes, *, expires_ms: int, now_ms: int) -> Verdict:
        try:
            answer = self._script(
                keys=[REDIS_PREFIX.encode() + nonce, REDIS_HIGH_WATER], args=[expires_ms, now_ms]
            )
        except self._errors as e:
            raise _unavailable(self.description, type(e).__name__) from None
        try:
            return Verdict(answer.decode() if isinstance(answer, bytes) else str(answer))
        except (UnicodeDecodeError, ValueError):
            # Not our script's answer (a proxy, another program's script under its name):
            # refused and recorded as unavailable, like any store that cannot answer.
            raise _unavailable(self.description, "an answer that is no verdict") from None

    def check_ready(self) -> None:
        try:
            self._client.ping()
        except self._errors as e:
            raise _unavailable(self.description, type(e).__name__) from None

    def close(self) -> None:
        with contextlib.suppress(*self._errors):
            self._client.connection_pool.disconnect()


def open_replay_store(spec: str | None, state_dir: Path) -> ReplayStore:
    """``None`` or ``sqlite`` (the state directory's file), ``sqlite:///PATH``,
    ``redis://HOST:PORT/DB``, or ``memory`` (this process only)."""
    if spec is None or spec == "sqlite":
        return SqliteReplayStore(state_dir / SQLITE_FILE)
    if spec == "memory":
        logger.warning(
            "UNSAFE: replay store in memory: a challenge used before this process restarts "
            "can be used once more after it, within its lifetime; use sqlite or redis"
        )
        return MemoryReplayStore()
    scheme = urllib.parse.urlsplit(spec).scheme
    if scheme == "sqlite" and spec.startswith("sqlite:///"):
        return SqliteReplayStore(Path(spec[len("sqlite://") :]))
    if scheme in ("redis", "rediss", "unix"):
        return RedisReplayStore(spec)
    raise ValueError(
        "expected sqlite, sqlite:///PATH, redis://HOST:PORT/DB or memory; "
        f"found {spec.split('://')[0][:20]!r}"
    )
