"""The KMS reviewed as an attacker: each test is one way in that is now closed."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner
from test_service import APP_A, Clock, Enclave, make_service, make_sim, refused

from keyutil import protocol as p
from keyutil.simulator import SimulatedNSM
from mock_kms import cli as kms_cli
from mock_kms.allowlist import EmbeddedAllowlist
from mock_kms.errors import ErrorCode
from mock_kms.service import ReleaseService


@pytest.fixture
def sim(tmp_path: Path) -> SimulatedNSM:
    return make_sim(tmp_path / "sim", Clock())


@pytest.fixture
def service(tmp_path: Path, sim: SimulatedNSM) -> ReleaseService:
    chain = EmbeddedAllowlist.create()
    chain.register_image(bytes.fromhex(sim.identity.os_image_hash[2:]), APP_A)
    return make_service(tmp_path, sim, chain, Clock())


def test_host_swapping_the_keys_does_not_burn_the_enclaves_nonce(
    service: ReleaseService, sim: SimulatedNSM
) -> None:
    """The host (or anyone on the path) that sees an enclave's document and sends it first
    with other keys is refused for the binding, and the enclave's own request still
    releases: a nonce is spent only by the request it authorizes."""
    enclave = Enclave(sim)
    genuine = enclave.request(service)
    swapped = {**genuine, "keys": [{"name": "disk", "length": 64}]}
    assert refused(service, swapped).code == ErrorCode.BINDING_MISMATCH
    enclave.open(service, service.release(genuine).answer)


def test_a_public_key_of_another_suite_does_not_burn_the_nonce(
    service: ReleaseService, sim: SimulatedNSM
) -> None:
    enclave = Enclave(sim)
    genuine = enclave.request(service)
    other_suite = {**genuine, "suite": p.SUITE_P384}
    assert refused(service, other_suite).code == ErrorCode.BINDING_MISMATCH
    enclave.open(service, service.release(genuine).answer)


def test_memory_replay_store_with_several_workers_is_a_usage_error(tmp_path: Path) -> None:
    """Each forked worker would hold its own copy of the memory store: a nonce would be
    accepted once per worker."""
    result = CliRunner().invoke(
        kms_cli.cli,
        ["serve", "--state-dir", str(tmp_path / "s"), "--port", "0",
         "--replay-store", "memory", "--workers", "2"],
    )
    assert result.exit_code == 2, result.output
    assert "memory" in result.output and "--workers" in result.output
    assert not (tmp_path / "s").exists()


def test_redis_password_on_the_command_line_is_refused_without_showing_it(
    tmp_path: Path,
) -> None:
    """argv is public (``ps``, /proc/PID/cmdline, and every forked worker's copy)."""
    result = CliRunner().invoke(
        kms_cli.cli,
        ["serve", "--state-dir", str(tmp_path / "s"), "--port", "0",
         "--replay-store", "redis://:hunter2-secret@127.0.0.1:1/0"],
    )
    assert result.exit_code == 2, result.output
    assert "MOCK_KMS_REPLAY_STORE" in result.output
    assert "hunter2" not in result.output
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize(
    ("one", "other"),
    [
        ("2001:db8:1:2::1", "2001:db8:1:2:ffff:ffff:ffff:fffe"),  # one host's /64
        ("::ffff:192.0.2.7", "192.0.2.7"),  # IPv4 seen through a dual-stack socket
        ("fe80::1%lo", "fe80::2"),
    ],
)
def test_one_host_is_one_peer_for_the_per_peer_cap(one: str, other: str) -> None:
    from mock_kms.server import peer_of

    assert peer_of(one) == peer_of(other)


def test_other_hosts_are_other_peers() -> None:
    from mock_kms.server import peer_of

    assert peer_of("2001:db8:1:2::1") != peer_of("2001:db8:1:3::1")
    assert peer_of("192.0.2.7") != peer_of("192.0.2.8")


def test_a_starting_kms_does_not_end_a_line_another_process_is_writing(tmp_path: Path) -> None:
    """A worker (re)starting while another holds the audit lock mid-record waits for it,
    instead of taking the unfinished tail for a crash and splitting the record in two."""
    import fcntl
    import os
    import threading
    import time

    from mock_kms.service import AuditLog

    path = tmp_path / "audit.log"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, b'{"outcome":')  # another writer, half-way through its batch
        starting = threading.Thread(target=AuditLog, args=(path,))
        starting.start()
        time.sleep(0.3)
        os.write(fd, b'"released"}\n')
        fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
    starting.join(10)
    assert path.read_bytes() == b'{"outcome":"released"}\n'


def test_an_audit_line_cut_for_length_keeps_its_time(
    tmp_path: Path, sim: SimulatedNSM, service: ReleaseService
) -> None:
    """Sixteen key names of 64 characters outside the BMP escape to 12 KiB of JSON: the
    line is cut to its bound, and what remains still says when the refusal happened."""
    import json

    from mock_kms.server import KmsApp
    from mock_kms.service import AuditLog

    service.audit = AuditLog(tmp_path / "audit.log")
    request = Enclave(sim).request(service)
    request["keys"] = [{"name": "\U0001f512" * 64 + str(i), "length": 32} for i in range(16)]
    environ = {
        "REQUEST_METHOD": "POST",
        "PATH_INFO": "/v1/release",
        "CONTENT_LENGTH": str(len(body := json.dumps(request).encode())),
        "wsgi.input": __import__("io").BytesIO(body),
    }
    KmsApp(service)(environ, lambda *a: None)
    (line,) = (tmp_path / "audit.log").read_bytes().splitlines()
    entry = json.loads(line)
    assert entry["truncated"] is True and entry["outcome"] == "denied"
    assert isinstance(entry["ts"], float) and "time" not in entry


def test_a_negative_content_length_is_refused_unread(service: ReleaseService) -> None:
    """mock-kms's server refuses it before the application; a WSGI server that passes it on would
    have had the application read(-1): the whole stream, past the body limit."""
    import io
    import json

    from mock_kms.server import KmsApp

    stream = io.BytesIO(b" " * (1 << 20) + b"{}")
    statuses: list[str] = []
    environ = {
        "REQUEST_METHOD": "POST",
        "PATH_INFO": "/v1/release",
        "CONTENT_LENGTH": "-1",
        "wsgi.input": stream,
    }
    body = b"".join(KmsApp(service)(environ, lambda status, headers: statuses.append(status)))
    assert statuses == ["400 Bad Request"]
    assert json.loads(body)["error"] == "bad_request"
    assert stream.tell() == 0


@pytest.mark.parametrize("answer", [b"OK", 1, None, b"\xff"])
def test_a_redis_answer_that_is_no_verdict_is_unavailable(answer: object) -> None:
    """Refused as 503 replay_store_unavailable (so audited like any store failure), not an
    exception the server turns into an unaudited 500."""
    from mock_kms.errors import UnavailableError
    from mock_kms.replay import RedisReplayStore

    store = RedisReplayStore("redis://127.0.0.1:1/0")
    store._script = lambda **kwargs: answer  # type: ignore[method-assign, assignment]
    with pytest.raises(UnavailableError) as err:
        store.claim(b"n" * 41, expires_ms=2, now_ms=1)
    assert err.value.code == ErrorCode.REPLAY_STORE_UNAVAILABLE


def test_a_unix_socket_a_running_kms_serves_on_is_not_taken(tmp_path: Path) -> None:
    """A second serve on the same --unix-socket used to unlink the first's socket and bind
    its own: the first kept running, unreachable. It is refused as in use; a stale socket
    (nobody listening) is still replaced."""
    import errno
    import socket

    from mock_kms.server import ServerSettings, listen

    path = str(tmp_path / "kms.sock")
    running = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    running.bind(path)
    running.listen(1)
    try:
        with pytest.raises(OSError) as err:
            listen(ServerSettings(unix_socket=path))
        assert err.value.errno == errno.EADDRINUSE
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.connect(path)  # still the running one's
    finally:
        running.close()
    listen(ServerSettings(unix_socket=path)).close()  # stale now: replaced


@pytest.mark.parametrize("handled_at_once", [False, True])
def test_a_stop_signal_right_after_a_fork_reaches_the_new_worker(
    monkeypatch: pytest.MonkeyPatch, handled_at_once: bool
) -> None:
    """SIGTERM landing between a worker's fork and its entry in the parent's table used to
    be forwarded to every worker but that one, which then ran until the SIGKILL after the
    stop grace. It stops the new worker like the others: held in the main thread until the
    table has the worker, or, when the handler ran at once anyway (another thread of the
    parent took the signal: a signal the main thread blocks goes to any thread that does
    not, and Python then runs the handler in the main thread), sent on once it has."""
    import os
    import signal
    import time

    from mock_kms import workers

    monkeypatch.setattr(workers, "STOP_GRACE_S", 20.0)
    real_fork = os.fork
    sent = []

    def fork_then_sigterm() -> int:
        pid = real_fork()
        if pid and not sent:
            sent.append(pid)
            if handled_at_once:  # as if another thread had taken it
                signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
            os.kill(os.getpid(), signal.SIGTERM)  # the operator's stop, in the window
            if handled_at_once:
                signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
        return pid

    monkeypatch.setattr(workers.os, "fork", fork_then_sigterm)
    started = time.monotonic()
    stopped_by = workers.run_workers(1, lambda index: time.sleep(60))
    elapsed = time.monotonic() - started
    assert stopped_by == signal.SIGTERM
    assert elapsed < 10, f"the worker ran {elapsed:.1f} s until SIGKILL"


def test_the_memory_replay_store_is_named_unsafe_when_chosen(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """It forgets at every restart: permissive, so logged as such (STYLE 5)."""
    import logging

    from mock_kms.replay import open_replay_store

    with caplog.at_level(logging.WARNING, logger="mock_kms.replay"):
        open_replay_store("memory", tmp_path)
    assert "UNSAFE" in caplog.text and "restart" in caplog.text


def test_public_health_checks_do_not_each_ask_the_chain(
    tmp_path: Path, sim: SimulatedNSM, monkeypatch: pytest.MonkeyPatch
) -> None:
    """/v1/health and /metrics are unauthenticated; each readiness check is RPC calls. A
    client polling them in a loop is answered from the last check (ready or not) for a
    second, and one caller at a time makes the check."""
    from mock_kms import service as service_module
    from mock_kms.errors import UnavailableError

    class Chain:
        checks = 0
        down = False

        def check_ready(self) -> None:
            self.checks += 1
            if self.down:
                raise UnavailableError(ErrorCode.CHAIN_UNAVAILABLE, "connection refused")

    chain = Chain()
    svc = make_service(tmp_path, sim, chain, Clock())
    monkeypatch.setattr(service_module, "READY_CACHE_S", 60.0, raising=False)
    for _ in range(50):
        svc.ready()
    assert chain.checks == 1
    chain.down = True
    monkeypatch.setattr(service_module, "READY_CACHE_S", 0.0, raising=False)  # the second is over
    with pytest.raises(UnavailableError):
        svc.ready()
    monkeypatch.setattr(service_module, "READY_CACHE_S", 60.0, raising=False)
    for _ in range(50):
        with pytest.raises(UnavailableError) as err:
            svc.ready()
        assert err.value.code == ErrorCode.CHAIN_UNAVAILABLE
    assert chain.checks == 2
