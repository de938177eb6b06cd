"""The replay store: a nonce is claimed once per store, whatever the clocks do, and a store
that cannot answer refuses (503 ``replay_store_unavailable``) until it answers again.

SQLite is exercised with several processes on one file; Redis is a real `redis-server`.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import sqlite3
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
from redis_support import RedisServer, redis_server  # noqa: F401 - a fixture

from mock_kms import replay
from mock_kms.errors import ErrorCode, InvalidError, UnavailableError
from mock_kms.replay import (
    SQLITE_PRUNE_EVERY_MS,
    MemoryReplayStore,
    RedisReplayStore,
    ReplayStore,
    SqliteReplayStore,
    Verdict,
    open_replay_store,
)
from mock_kms.service import NonceBook, ReleaseSettings

T0_MS = 1_800_000_000_000


@pytest.fixture(params=["memory", "sqlite", "redis"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ReplayStore]:
    if request.param == "memory":
        yield MemoryReplayStore()
    elif request.param == "sqlite":
        yield SqliteReplayStore(tmp_path / "replay.sqlite3")
    else:
        server: RedisServer = request.getfixturevalue("redis_server")
        redis_store = RedisReplayStore(server.url)
        yield redis_store
        redis_store.close()


def nonce(n: int) -> bytes:
    return struct.pack(">Q", n) + os.urandom(8)


def test_a_nonce_is_accepted_once(store: ReplayStore) -> None:
    first = nonce(1)
    assert store.claim(first, expires_ms=T0_MS + 30_000, now_ms=T0_MS) is Verdict.ACCEPTED
    assert store.claim(first, expires_ms=T0_MS + 30_000, now_ms=T0_MS + 1) is Verdict.REPLAYED
    assert store.claim(nonce(2), expires_ms=T0_MS + 30_000, now_ms=T0_MS) is Verdict.ACCEPTED


def test_a_clock_step_back_does_not_revive_a_used_nonce(store: ReplayStore) -> None:
    used = nonce(1)
    assert store.claim(used, expires_ms=T0_MS + 30_000, now_ms=T0_MS) is Verdict.ACCEPTED
    # An hour later (the store forgets what has expired) ...
    later = T0_MS + 3_600_000
    assert store.claim(nonce(2), expires_ms=later + 30_000, now_ms=later) is Verdict.ACCEPTED
    # ... the clock steps back to the nonce's lifetime: it is not accepted again.
    assert store.claim(used, expires_ms=T0_MS + 30_000, now_ms=T0_MS + 5) is Verdict.EXPIRED
    # Nor is an unused nonce from that time: the store's time does not go back.
    assert store.claim(nonce(3), expires_ms=T0_MS + 30_000, now_ms=T0_MS) is Verdict.EXPIRED


def test_nonce_book_refuses_a_replay_after_the_clock_went_forward_and_back(
    tmp_path: Path,
) -> None:
    now = [T0_MS / 1000]
    book = NonceBook(
        b"k" * 32, ReleaseSettings(), lambda: now[0], SqliteReplayStore(tmp_path / "r.db")
    )
    used = book.issue()[0]
    book.accept(used)
    now[0] += 3600  # NTP steps the clock forward; a release then passes the store's time on
    book.accept(book.issue()[0])
    now[0] -= 3600  # and back
    with pytest.raises(InvalidError) as err:
        book.accept(used)
    assert err.value.code == ErrorCode.NONCE_EXPIRED


def _claim_all(path: str, nonces: list[bytes], out: multiprocessing.Queue[int]) -> None:
    store = SqliteReplayStore(Path(path))
    accepted = sum(
        store.claim(n, expires_ms=T0_MS + 30_000, now_ms=T0_MS) is Verdict.ACCEPTED
        for n in nonces
    )
    out.put(accepted)


def test_sqlite_processes_sharing_the_file_accept_each_nonce_once(tmp_path: Path) -> None:
    path = str(tmp_path / "replay.sqlite3")
    SqliteReplayStore(Path(path))
    nonces = [nonce(i) for i in range(300)]
    ctx = multiprocessing.get_context("fork")
    out: multiprocessing.Queue[int] = ctx.Queue()
    procs = [ctx.Process(target=_claim_all, args=(path, nonces, out)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert sum(out.get(timeout=5) for _ in procs) == len(nonces)


def test_sqlite_store_survives_a_restart(tmp_path: Path) -> None:
    used = nonce(1)
    first = SqliteReplayStore(tmp_path / "replay.sqlite3")
    assert first.claim(used, expires_ms=T0_MS + 30_000, now_ms=T0_MS) is Verdict.ACCEPTED
    first.close()
    again = SqliteReplayStore(tmp_path / "replay.sqlite3")
    assert again.claim(used, expires_ms=T0_MS + 30_000, now_ms=T0_MS + 1) is Verdict.REPLAYED


def test_sqlite_store_file_has_small_pages_and_an_older_file_keeps_its_own(
    tmp_path: Path,
) -> None:
    def page_size(path: Path) -> int:
        with contextlib.closing(sqlite3.connect(path)) as conn:
            (size,) = conn.execute("PRAGMA page_size").fetchone()
        return int(size)

    new = tmp_path / "new.sqlite3"
    SqliteReplayStore(new).claim(nonce(1), expires_ms=T0_MS + 30_000, now_ms=T0_MS)
    assert page_size(new) == replay.SQLITE_PAGE_SIZE == 1024
    # A store file made with SQLite's default 4 KiB pages (before SQLITE_PAGE_SIZE) opens
    # as it is, and what it remembers still counts.
    old = tmp_path / "old.sqlite3"
    with contextlib.closing(sqlite3.connect(old)) as conn:
        conn.execute("PRAGMA journal_mode=WAL")
    used = nonce(2)
    store = SqliteReplayStore(old)
    assert store.claim(used, expires_ms=T0_MS + 30_000, now_ms=T0_MS) is Verdict.ACCEPTED
    store.close()
    assert page_size(old) == 4096
    reopened = SqliteReplayStore(old)
    assert reopened.claim(used, expires_ms=T0_MS + 30_000, now_ms=T0_MS) is Verdict.REPLAYED


def test_sqlite_store_prunes_expired_entries_once_a_second(tmp_path: Path) -> None:
    """Expired entries are dropped once a second of high-water time, not on every claim; kept
    or dropped, an expired nonce is refused as expired, even by a clock stepped back."""
    path = tmp_path / "replay.sqlite3"
    store = SqliteReplayStore(path)

    def rows() -> int:
        with contextlib.closing(sqlite3.connect(path)) as db:
            return int(db.execute("SELECT count(*) FROM nonces").fetchone()[0])

    short = [nonce(i) for i in range(5)]
    for n in short:  # the first claim prunes (nothing yet), the next prune is due at T0 + 1 s
        assert store.claim(n, expires_ms=T0_MS + 500, now_ms=T0_MS) is Verdict.ACCEPTED
    late = T0_MS + 999
    assert store.claim(nonce(10), expires_ms=late + 30_000, now_ms=late) is Verdict.ACCEPTED
    assert rows() == 6  # expired, not dropped yet
    assert store.claim(short[0], expires_ms=T0_MS + 500, now_ms=late) is Verdict.EXPIRED
    due = T0_MS + SQLITE_PRUNE_EVERY_MS
    assert store.claim(nonce(11), expires_ms=due + 30_000, now_ms=due) is Verdict.ACCEPTED
    assert rows() == 2  # dropped
    for n in short:
        assert store.claim(n, expires_ms=T0_MS + 500, now_ms=T0_MS + 1) is Verdict.EXPIRED
    assert rows() == 2


def test_sqlite_store_locked_too_long_is_unavailable_then_resumes(tmp_path: Path) -> None:
    path = tmp_path / "replay.sqlite3"
    store = SqliteReplayStore(path, busy_ms=200)
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")  # another process holding the database
    with pytest.raises(UnavailableError) as err:
        store.claim(nonce(1), expires_ms=T0_MS + 30_000, now_ms=T0_MS)
    assert err.value.code == ErrorCode.REPLAY_STORE_UNAVAILABLE
    blocker.execute("ROLLBACK")
    blocker.close()
    assert store.claim(nonce(1), expires_ms=T0_MS + 30_000, now_ms=T0_MS) is Verdict.ACCEPTED
    store.check_ready()


@pytest.mark.parametrize("name", ["SQLITE_BUSY", "SQLITE_BUSY_RECOVERY", "SQLITE_LOCKED"])
def test_sqlite_store_waits_out_every_kind_of_busy(tmp_path: Path, name: str) -> None:
    """sqlite3 reports extended codes: another process rebuilding the WAL index is
    SQLITE_BUSY_RECOVERY, which is waited out like SQLITE_BUSY rather than refused (503)."""
    store = SqliteReplayStore(tmp_path / "replay.sqlite3")
    busy = sqlite3.OperationalError("database is locked")
    busy.sqlite_errorcode = getattr(sqlite3, name)
    calls: list[str] = []

    class Conn:
        def execute(self, statement: str) -> None:
            calls.append(statement)
            if len(calls) == 1:
                raise busy

    store._begin(Conn())  # type: ignore[arg-type]
    assert calls == ["BEGIN IMMEDIATE", "BEGIN IMMEDIATE"]
    other = sqlite3.OperationalError("disk I/O error")
    other.sqlite_errorcode = sqlite3.SQLITE_IOERR_WRITE
    calls.clear()

    class Failing:
        def execute(self, statement: str) -> None:
            calls.append(statement)
            raise other

    with pytest.raises(sqlite3.OperationalError):
        store._begin(Failing())  # type: ignore[arg-type]
    assert calls == ["BEGIN IMMEDIATE"]  # not retried


def test_sqlite_store_in_a_missing_directory_is_unavailable(tmp_path: Path) -> None:
    with pytest.raises(UnavailableError) as err:
        SqliteReplayStore(tmp_path / "missing" / "replay.sqlite3")
    assert err.value.code == ErrorCode.REPLAY_STORE_UNAVAILABLE


def test_redis_down_is_unavailable_and_resumes_with_what_it_kept(
    redis_server: RedisServer,  # noqa: F811
    caplog: pytest.LogCaptureFixture,
) -> None:
    store = RedisReplayStore(redis_server.url, timeout=0.5)
    used = nonce(1)
    assert store.claim(used, expires_ms=T0_MS + 10**9, now_ms=T0_MS) is Verdict.ACCEPTED
    redis_server.stop()  # appendonly: what it acknowledged is on its disk
    replay._last_warning[0] = 0.0
    with (
        caplog.at_level(logging.WARNING, logger="mock_kms.replay"),
        pytest.raises(UnavailableError) as err,
    ):
        store.claim(nonce(2), expires_ms=T0_MS + 10**9, now_ms=T0_MS)
    assert err.value.code == ErrorCode.REPLAY_STORE_UNAVAILABLE
    # Where the store is, is the operator's to know (the log), not every client's (the 503).
    port = redis_server.url.rsplit(":", 1)[1].split("/")[0]
    assert port not in err.value.message and "127.0.0.1" not in err.value.message
    assert f"127.0.0.1:{port}" in caplog.text
    with pytest.raises(UnavailableError):
        store.check_ready()
    redis_server.start()
    store.check_ready()
    assert store.claim(used, expires_ms=T0_MS + 10**9, now_ms=T0_MS) is Verdict.REPLAYED
    assert store.claim(nonce(2), expires_ms=T0_MS + 10**9, now_ms=T0_MS) is Verdict.ACCEPTED


def test_redis_entries_expire_at_the_nonces_own_expiry(
    redis_server: RedisServer,  # noqa: F811
) -> None:
    import time

    import redis

    store = RedisReplayStore(redis_server.url)
    now_ms = int(time.time() * 1000)
    store.claim(b"n1", expires_ms=now_ms + 60_000, now_ms=now_ms)
    ttl = redis.Redis.from_url(redis_server.url).pttl(b"mock-kms:nonce:n1")
    assert 55_000 < ttl <= 60_001


def test_redis_password_is_not_in_the_description() -> None:
    store = RedisReplayStore("redis://:hunter2@127.0.0.1:1/3")
    assert "hunter2" not in store.description
    assert store.description == "redis 127.0.0.1:1/3"


@pytest.mark.parametrize("spec", ["postgres://x", "sqlite://relative", "nonsense"])
def test_unknown_replay_store_is_refused(spec: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="expected sqlite"):
        open_replay_store(spec, tmp_path)


def test_default_replay_store_is_sqlite_in_the_state_dir(tmp_path: Path) -> None:
    store = open_replay_store(None, tmp_path)
    assert isinstance(store, SqliteReplayStore)
    assert store.path == tmp_path / "replay.sqlite3"
    assert isinstance(open_replay_store("memory", tmp_path), MemoryReplayStore)
