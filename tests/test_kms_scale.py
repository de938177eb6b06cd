"""The KMS beyond one process, with real processes: workers, replicas, the replay store
(SQLite and a real `redis-server`), client failover, one audit log with many writers, and a
slow-client flood. Released keys are compared, never printed.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import statistics
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from e2e_support import Kms, Setup
from redis_support import RedisServer, redis_server  # noqa: F401 - a fixture
from test_faults import audit_lines, fill, small_fs  # noqa: F401 - a fixture

from keyutil.client import ReleaseError, ReleaseRequest, exchange, release_keys
from keyutil.simulator import SimulatedNSM
from keyutil.transport import HttpResponse, HttpTransport

# The flood generator of bench/bench_flood.py.
sys.path.insert(0, str(Path(__file__).parents[1] / "bench"))
from benchlib import Flood

pytestmark = pytest.mark.slow


class Recorder:
    """An HttpTransport that keeps every ``/v1/release`` body it sent with the status it got."""

    def __init__(self, url: str) -> None:
        self.inner = HttpTransport.from_url(url)
        self.releases: list[tuple[dict[str, Any], int]] = []

    def request(
        self, method: str, path: str, body: Mapping[str, Any] | None = None, *, timeout: float
    ) -> HttpResponse:
        response = self.inner.request(method, path, body, timeout=timeout)
        if path == "/v1/release":
            assert body is not None
            self.releases.append((dict(body), response.status))
        return response


def post(url: str, path: str, body: Mapping[str, Any]) -> tuple[int, dict[str, Any]]:
    data = json.dumps(body).encode()
    request = urllib.request.Request(
        url + path, data, {"Content-Type": "application/json"}, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=15) as r:
            return int(r.status), json.loads(r.read())
    except urllib.error.HTTPError as e:
        return int(e.code), json.loads(e.read())


def released_body(setup: Setup, url: str) -> dict[str, Any]:
    """The body of one successful release at ``url`` (to be sent again)."""
    recorder = Recorder(url)
    release = exchange(
        recorder,
        SimulatedNSM.load(setup.sim),
        ReleaseRequest.build(["disk"], identity=setup.identity),
        time_left_s=20,
    )
    release.wipe()
    (body, status), = recorder.releases
    assert status == 200
    return body


def released_count(path: Path) -> int:
    return sum(1 for e in audit_lines(path) if e["outcome"] == "released")


# -- Single use everywhere ------------------------------------------------------------------


def assert_replay_refused_across_replicas_and_restart(setup: Setup, *extra: str) -> None:
    a = setup.kms(*extra).start()
    b = setup.kms(*extra).start()
    a.wait_listening()
    b.wait_listening()
    body = released_body(setup, a.url)
    for kms in (b, a):
        status, answer = post(kms.url, "/v1/release", body)
        assert (status, answer["error"]) == (403, "nonce_replayed")
    a.stop()
    again = Kms(a.args, a.log, a.url).start().wait_listening()
    setup.servers.append(again)
    status, answer = post(again.url, "/v1/release", body)
    assert (status, answer["error"]) == (403, "nonce_replayed")
    assert released_count(setup.audit) == 1  # one challenge, one release, across all of them


def test_nonce_used_at_one_replica_is_refused_at_another_and_after_restart_sqlite(
    setup: Setup,
) -> None:
    # The default: both replicas (2 workers each) on one machine share the state directory.
    assert_replay_refused_across_replicas_and_restart(setup)


def test_nonce_used_at_one_replica_is_refused_at_another_and_after_restart_redis(
    setup: Setup, redis_server: RedisServer  # noqa: F811
) -> None:
    assert_replay_refused_across_replicas_and_restart(
        setup, "--replay-store", redis_server.url
    )


def test_one_body_sent_many_times_at_once_is_released_once_across_workers(
    setup: Setup,
) -> None:
    kms = setup.kms("--workers", "2").start().wait_listening()
    body = released_body(setup, kms.url)
    # Send it again from many connections at once: spread over both workers, all refused.
    statuses: list[int] = []
    threads = [
        threading.Thread(target=lambda: statuses.append(post(kms.url, "/v1/release", body)[0]))
        for _ in range(16)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert statuses == [403] * 16
    assert released_count(setup.audit) == 1


def test_unknown_replay_store_is_a_usage_error(setup: Setup) -> None:
    kms = setup.kms("--replay-store", "postgres://db/1").start()
    assert kms.proc is not None
    assert kms.proc.wait(60) == 2
    assert "expected sqlite" in setup.kms_log.read_text()


# -- Redis killed under load ------------------------------------------------------------------


class Releases:
    """Enclaves in threads releasing in a loop through ``/v1/release`` (no health check)."""

    def __init__(self, setup: Setup, urls: list[str], clients: int = 3) -> None:
        self.setup, self.urls = setup, urls
        self.recorders: list[Recorder] = []
        self.results: list[tuple[float, float, ReleaseError | None]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run) for _ in range(clients)]

    def _run(self) -> None:
        recorder = Recorder(self.urls[0])
        with self._lock:
            self.recorders.append(recorder)
        nsm = SimulatedNSM.load(self.setup.sim)
        request = ReleaseRequest.build(["disk"], identity=self.setup.identity)
        while not self._stop.is_set():
            started = time.time()
            error: ReleaseError | None = None
            try:
                exchange(recorder, nsm, request, time_left_s=20, check_health=False).wipe()
            except ReleaseError as e:
                error = e
            with self._lock:
                self.results.append((started, time.time(), error))
            self._stop.wait(0.02)

    def start(self) -> Releases:
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join()

    def wait(self, predicate: Any, timeout: float) -> float:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            with self._lock:
                hits = [r[1] for r in self.results if predicate(r)]
            if hits:
                return min(hits)
            time.sleep(0.05)
        raise AssertionError("not seen in time")

    def sent(self) -> list[tuple[dict[str, Any], int]]:
        return [item for r in self.recorders for item in r.releases]


def test_redis_killed_under_load_refuses_then_resumes_and_releases_nothing_twice(
    setup: Setup, redis_server: RedisServer  # noqa: F811
) -> None:
    kms = setup.kms("--workers", "2", "--replay-store", redis_server.url).start()
    kms.wait_listening()
    load = Releases(setup, [kms.url]).start()
    try:
        load.wait(lambda r: r[2] is None, 30)
        killed = time.time()
        redis_server.kill()
        load.wait(lambda r: r[0] > killed and r[2] is not None, 30)
        time.sleep(2)  # releases keep coming, and keep being refused
        restarted = time.time()
        redis_server.start()  # same port, same append-only file
        load.wait(lambda r: r[0] > restarted and r[2] is None, 30)
        time.sleep(1)
    finally:
        load.stop()

    down = [r for r in load.results if r[0] > killed and r[1] < restarted]
    assert len(down) >= 3
    assert all(e is not None and e.code == "replay_store_unavailable" for _, _, e in down)
    sent = load.sent()
    ok = [body for body, status in sent if status == 200]
    assert ok and all(status in (200, 503) for _, status in sent)
    # Every decision is one whole line, and none is missing.
    entries = audit_lines(setup.audit)
    assert len(entries) == len(sent)
    assert sum(e["outcome"] == "released" for e in entries) == len(ok)
    assert {e["code"] for e in entries if e["outcome"] == "unavailable"} <= {
        "replay_store_unavailable"
    }
    # Nothing was released twice: every body that got a key is refused when sent again.
    for body in ok:
        status, answer = post(kms.url, "/v1/release", body)
        assert (status, answer["error"]) == (403, "nonce_replayed")


# -- Client failover --------------------------------------------------------------------------


def test_two_replicas_behind_failover_one_sigkilled_mid_load_no_release_fails(
    setup: Setup, redis_server: RedisServer  # noqa: F811
) -> None:
    extra = ("--workers", "1", "--replay-store", redis_server.url)
    a = setup.kms(*extra).start()
    b = setup.kms(*extra).start()
    a.wait_listening()
    b.wait_listening()
    results: list[tuple[float, bytes | None, str | None]] = []
    lock = threading.Lock()
    stop = threading.Event()

    def client() -> None:
        transports = [HttpTransport.from_url(a.url), HttpTransport.from_url(b.url)]
        nsm = SimulatedNSM.load(setup.sim)
        request = ReleaseRequest.build(["disk"], identity=setup.identity)
        while not stop.is_set():
            try:
                release = release_keys(transports, nsm, request, deadline_s=30)
                key, error = bytes(release.keys[0].value), None
                release.wipe()
            except ReleaseError as e:
                key, error = None, e.code
            with lock:
                results.append((time.time(), key, error))

    threads = [threading.Thread(target=client) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        time.sleep(3)
        assert a.proc is not None
        killed = time.time()
        a.proc.send_signal(signal.SIGKILL)
        a.proc.wait()
        time.sleep(4)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert [r for r in results if r[2] is not None] == []
    assert sum(1 for r in results if r[0] < killed) >= 3
    assert sum(1 for r in results if r[0] > killed + 1) >= 3
    assert len({r[1] for r in results}) == 1  # one identity, one root secret: one key


def test_denial_from_the_first_replica_is_final(setup: Setup) -> None:
    # The first replica does not allow the image; the second does. A denial ends it.
    a = setup.kms(images=()).start().wait_listening()
    b = setup.kms().start().wait_listening()
    result = setup.get_key(a.url, "--kms", b.url, "--stdout", "--format", "hex", deadline=20)
    assert result.returncode == 4, result.stderr.decode()
    assert "image_not_allowed" in result.stderr.decode()


def test_get_key_moves_past_an_unreachable_replica(setup: Setup) -> None:
    from e2e_support import free_port

    b = setup.kms().start().wait_listening()
    dead = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    result = setup.get_key(dead, "--kms", b.url, "--stdout", "--format", "hex", deadline=20)
    assert result.returncode == 0, result.stderr.decode()
    assert len(bytes.fromhex(result.stdout.decode().strip())) == 32
    assert time.monotonic() - started < 15
    assert b'"replica_unavailable"' in result.stderr


# -- One audit log, many writers, a disk that fills -------------------------------------------


def test_workers_of_two_kms_append_to_one_audit_log_while_the_disk_fills(
    setup: Setup, small_fs: Path  # noqa: F811
) -> None:
    audit = small_fs / "audit.log"
    a = setup.kms("--workers", "2", audit=audit).start()
    b = setup.kms("--workers", "2", audit=audit).start()
    a.wait_listening()
    b.wait_listening()
    load = Releases(setup, [a.url], clients=3).start()
    load_b = Releases(setup, [b.url], clients=3).start()
    try:
        load.wait(lambda r: r[2] is None, 30)
        filled = time.time()
        filler = fill(small_fs)
        load.wait(lambda r: r[0] > filled and r[2] is not None, 30)
        time.sleep(1)
        filler.unlink()
        freed = time.time()
        load.wait(lambda r: r[0] > freed and r[2] is None, 30)
        load_b.wait(lambda r: r[0] > freed and r[2] is None, 30)
    finally:
        load.stop()
        load_b.stop()
    sent = load.sent() + load_b.sent()
    ok = [body for body, status in sent if status == 200]
    refused = [body for body, status in sent if status == 503]
    assert ok and refused
    entries = audit_lines(audit)  # no torn line
    # Every release that went out has its line; a refused one has none (nor any sealed key).
    assert sum(e["outcome"] == "released" for e in entries) == len(ok)
    assert len(entries) <= len(sent)


# -- Slow clients cannot lock others out ----------------------------------------------------


def timed_get_keys(setup: Setup, url: str, n: int) -> list[float]:
    times = []
    for _ in range(n):
        started = time.monotonic()
        result = setup.get_key(url, "--stdout", "--format", "hex", deadline=60)
        times.append(time.monotonic() - started)
        assert result.returncode == 0, result.stderr.decode()
    return times


def test_slow_client_flood_does_not_lock_out_a_normal_get_key(setup: Setup) -> None:
    kms = setup.kms("--workers", "2").start().wait_listening()
    unloaded = statistics.median(timed_get_keys(setup, kms.url, 5))
    with Flood(kms.url, "127.0.0.2", connections=1000, dribblers=50) as flood:
        time.sleep(6)  # every connection opened, the first ones cut and reopened
        loaded = timed_get_keys(setup, kms.url, 5)
    # The flood kept trying to hold 1,000: most were closed at once (the per-peer cap).
    assert flood.reconnects >= 1000, flood.reconnects
    print(f"get-key unloaded {unloaded:.3f} s, flooded {statistics.median(loaded):.3f} s")
    assert statistics.median(loaded) < 3 * unloaded + 0.1, (loaded, unloaded)
    assert max(loaded) < 10 * unloaded + 2, (loaded, unloaded)
    assert "refusing connections from 127.0.0.2" in setup.kms_log.read_text()
    assert "Traceback" not in setup.kms_log.read_text()


def test_keepalive_connection_idle_between_requests_is_closed(setup: Setup) -> None:
    kms = setup.kms("--keepalive-timeout", "1", "--workers", "1").start().wait_listening()
    host, port = kms.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"GET /v1/identity HTTP/1.1\r\nHost: kms\r\n\r\n")
        response = http.client.HTTPResponse(sock)  # reads exactly one response
        response.begin()
        assert response.status == 200 and response.read()
        since = time.monotonic()
        assert sock.recv(1) == b""  # closed by the server
        assert 0.9 < time.monotonic() - since < 4


def test_request_head_not_whole_in_time_is_cut(setup: Setup) -> None:
    kms = setup.kms("--header-timeout", "1", "--workers", "1").start().wait_listening()
    host, port = kms.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        since = time.monotonic()
        sock.sendall(b"GET /v1/identity HTTP/1.1\r\n")
        while True:
            try:
                sock.sendall(b"X")
            except OSError:
                break
            time.sleep(0.2)
            sock.setblocking(False)
            try:
                if sock.recv(1) == b"":
                    break
            except BlockingIOError:
                pass
            finally:
                sock.setblocking(True)
        assert 0.9 < time.monotonic() - since < 4


def test_metrics_are_summed_across_workers(setup: Setup) -> None:
    kms = setup.kms("--workers", "2").start().wait_listening()
    for _ in range(6):
        released_body(setup, kms.url)
    with urllib.request.urlopen(kms.url + "/metrics", timeout=5) as r:
        text = r.read().decode()
    from prometheus_client.parser import text_string_to_metric_families

    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
    }
    assert samples[("kms_releases_total", (("code", "ok"), ("outcome", "released")))] == 6
    assert samples[("kms_challenges_total", ())] == 6


def test_a_worker_that_dies_is_replaced_and_sigterm_stops_them_all(setup: Setup) -> None:
    kms = setup.kms("--workers", "2").start().wait_listening()
    assert kms.proc is not None
    children = Path(f"/proc/{kms.proc.pid}/task/{kms.proc.pid}/children").read_text().split()
    assert len(children) == 2
    os.kill(int(children[0]), signal.SIGKILL)
    end = time.monotonic() + 20
    while time.monotonic() < end:
        now = Path(f"/proc/{kms.proc.pid}/task/{kms.proc.pid}/children").read_text().split()
        if len(now) == 2 and children[0] not in now:
            break
        time.sleep(0.1)
    else:
        raise AssertionError("the dead worker was not replaced")
    released_body(setup, kms.url)
    kms.proc.send_signal(signal.SIGTERM)
    assert kms.proc.wait(20) == 0
    for pid in now:
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text()
    assert "exited (signal SIGKILL); starting another" in setup.kms_log.read_text()


def test_redis_unreachable_at_start_fails_closed_and_never_shows_its_password(
    setup: Setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    from e2e_support import free_port

    password = "s3cret-redis-pw"
    monkeypatch.setenv("MOCK_KMS_REPLAY_STORE", f"redis://:{password}@127.0.0.1:{free_port()}/0")
    kms = setup.kms("--workers", "1").start().wait_listening()
    with pytest.raises(ReleaseError) as info:
        exchange(
            HttpTransport.from_url(kms.url),
            SimulatedNSM.load(setup.sim),
            ReleaseRequest.build(["disk"], identity=setup.identity),
            time_left_s=20,
            check_health=False,
        )
    assert info.value.code == "replay_store_unavailable"
    with pytest.raises(urllib.error.HTTPError) as health:
        urllib.request.urlopen(kms.url + "/v1/health", timeout=5)
    assert health.value.code == 503
    body = health.value.read()
    assert b"replay_store_unavailable" in body
    kms.stop()
    for text in (info.value.message.encode(), body, setup.kms_log.read_bytes(),
                 setup.audit.read_bytes()):
        assert password.encode() not in text


def test_a_worker_that_ignores_sigterm_is_killed_after_the_grace(
    setup: Setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mock_kms import workers

    monkeypatch.setattr(workers, "STOP_GRACE_S", 0.5)
    parent = os.getpid()

    def stubborn(index: int) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        time.sleep(30)

    def stop_soon() -> None:
        time.sleep(1)
        os.kill(parent, signal.SIGTERM)

    threading.Thread(target=stop_soon).start()
    started = time.monotonic()
    workers.run_workers(2, stubborn)
    assert time.monotonic() - started < 10


def test_the_connection_is_closed_after_a_release_and_kept_after_other_requests(
    setup: Setup,
) -> None:
    kms = setup.kms("--workers", "1").start().wait_listening()
    host, port = kms.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    conn.request("POST", "/v1/challenge", body=b"")
    first = conn.getresponse()
    first.read()
    assert first.status == 200 and first.getheader("Connection") is None
    assert conn.sock is not None  # kept alive
    conn.request("POST", "/v1/release", body=b"{}", headers={"Content-Type": "application/json"})
    second = conn.getresponse()
    second.read()
    assert second.status == 400 and second.getheader("Connection") == "close"
    conn.close()


def test_python_api_get_key_fails_over_to_the_next_replica(setup: Setup) -> None:
    from e2e_support import free_port

    import keyutil

    kms = setup.kms("--workers", "1").start().wait_listening()
    events: list[str] = []
    keys = keyutil.get_key(
        [f"http://127.0.0.1:{free_port()}", kms.url],
        kms_pubkey=setup.identity,
        nsm="simulator",
        sim_dir=setup.sim,
        deadline=20,
        log=lambda level, event, fields: events.append(event),
    )
    assert len(keys["default"]) == 32
    assert "replica_unavailable" in events
    with pytest.raises(ValueError, match="at least one URL"):
        keyutil.get_key([], kms_pubkey=setup.identity, nsm="simulator", sim_dir=setup.sim)
