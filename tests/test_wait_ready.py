"""`keyutil wait-ready`: polls with backoff until the app answers; otherwise exits 3 at its
deadline naming the last error. Real `keyutil` processes against servers on unix sockets."""

from __future__ import annotations

import json
import socket
import subprocess
import time
from pathlib import Path

import pytest
from e2e_support import KEYUTIL, LoopbackServer
from plumbing_support import NitroCliStandIn, enclave, sockdir

from keyutil.host.ready import GaveUp, NotReady, Ready, wait_ready

__all__ = ["sockdir"]


class FakeTime:
    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(round(seconds, 3))
        self.now += seconds


def test_backoff_until_the_deadline_then_the_last_error() -> None:
    t = FakeTime()
    errors = iter(f"error {n}" for n in range(100))

    def check(timeout: float) -> str:
        t.now += 0.05
        raise NotReady(next(errors))

    result = wait_ready(check, 5.0, clock=t.clock, sleep=t.sleep)
    assert isinstance(result, GaveUp)
    assert t.sleeps[:5] == [0.1, 0.2, 0.4, 0.8, 1.6]
    assert all(s <= 2.0 for s in t.sleeps)
    assert t.now == pytest.approx(5.0)
    assert result.last_error == f"error {result.attempts - 1}"


def test_ready_on_the_first_answer() -> None:
    t = FakeTime()
    answers = iter([NotReady("refused"), NotReady("closed"), "GET /health: 200"])

    def check(timeout: float) -> str:
        answer = next(answers)
        if isinstance(answer, NotReady):
            raise answer
        return answer

    result = wait_ready(check, 10, clock=t.clock, sleep=t.sleep)
    assert result == Ready(attempts=3, elapsed_s=0.3, detail="GET /health: 200")


def wait_ready_cli(*args: str, timeout: float = 60) -> tuple[int, dict[str, object], str]:
    done = subprocess.run(
        [KEYUTIL, "wait-ready", *args], capture_output=True, text=True, timeout=timeout
    )
    return done.returncode, json.loads(done.stdout or "{}"), done.stderr


def test_http_check_waits_for_a_2xx(sockdir: Path) -> None:
    answered = []

    def http(conn: socket.socket) -> None:
        request = conn.recv(4096)
        answered.append(request.split(b"\r\n")[0])
        status = b"503 Service Unavailable" if len(answered) < 3 else b"200 OK"
        conn.sendall(b"HTTP/1.1 " + status + b"\r\nContent-Length: 2\r\n\r\nok")

    server = LoopbackServer(http, unix=sockdir / "app.sock")
    try:
        code, answer, _ = wait_ready_cli(
            "--target", f"unix://{sockdir}/app.sock", "--http", "/healthz", "--deadline", "20"
        )
    finally:
        server.close()
    assert code == 0, answer
    assert answer["status"] == "ready"
    assert answer["detail"] == "GET /healthz: 200"
    assert answer["attempts"] == len(answered) == 3, (answer, answered)
    assert set(answered) == {b"GET /healthz HTTP/1.1"}


def test_http_status_that_never_turns_2xx_is_named(sockdir: Path) -> None:
    def http(conn: socket.socket) -> None:
        conn.recv(4096)
        conn.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n")

    server = LoopbackServer(http, unix=sockdir / "app.sock")
    try:
        code, answer, stderr = wait_ready_cli(
            "--target", f"unix://{sockdir}/app.sock", "--http", "/", "--deadline", "1"
        )
    finally:
        server.close()
    assert code == 3
    assert answer["error"] == f"GET / on unix://{sockdir}/app.sock: status 503"
    assert "not_ready" in stderr


def test_nothing_listening_exits_3_within_the_deadline(sockdir: Path) -> None:
    started = time.monotonic()
    code, answer, _ = wait_ready_cli("--target", f"unix://{sockdir}/none.sock", "--deadline", "1.5")
    assert code == 3
    assert time.monotonic() - started < 1.5 + 3
    assert answer["error"] == (
        f"cannot connect to unix://{sockdir}/none.sock: "
        f"unix:{sockdir}/none.sock: No such file or directory"
    )
    assert int(answer["attempts"]) >= 3  # type: ignore[call-overload]


def test_a_peer_that_closes_at_once_is_not_ready_one_that_stays_is(sockdir: Path) -> None:
    closer = LoopbackServer(lambda conn: None, unix=sockdir / "closer.sock")
    stayer = LoopbackServer(lambda conn: time.sleep(2), unix=sockdir / "stayer.sock")
    try:
        code, answer, _ = wait_ready_cli("--target", f"unix://{sockdir}/closer.sock",
                                         "--deadline", "1")
        assert code == 3 and "closed the connection at once" in str(answer["error"])
        code, answer, _ = wait_ready_cli("--target", f"unix://{sockdir}/stayer.sock",
                                         "--deadline", "5")
        assert code == 0 and answer["detail"] == "connected, and the connection stays open"
    finally:
        closer.close()
        stayer.close()


def test_an_enclave_by_name_is_looked_up_at_every_attempt(sockdir: Path) -> None:
    nitro = NitroCliStandIn(sockdir)
    code, answer, _ = wait_ready_cli(
        "--target", "vsock://enclave:app:5001", "--nitro-cli", str(nitro.path),
        "--deadline", "1",
    )
    assert code == 3
    assert answer["error"] == (
        "cannot find vsock://enclave:app:5001: no running enclave named 'app' "
        "(found: none listed)"
    )
    assert nitro.call_count() == answer["attempts"]
    nitro.set([enclave("app", 17)])
    code, answer, _ = wait_ready_cli(
        "--target", "vsock://enclave:app:5001", "--nitro-cli", str(nitro.path),
        "--deadline", "1",
    )
    assert code == 3
    assert str(answer["error"]).startswith("cannot connect to vsock://enclave:app:5001: vsock:17:5001")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--target", "http://x:1"], "expected tcp://HOST:PORT"),
        (["--target", "tcp://127.0.0.1:1", "--http", "health"], "starting with /"),
        (["--target", "tcp://127.0.0.1:1", "--deadline", "0"], "0"),
    ],
)
def test_usage_errors_exit_2(args: list[str], message: str) -> None:
    done = subprocess.run([KEYUTIL, "wait-ready", *args], capture_output=True, text=True,
                          timeout=30)
    assert done.returncode == 2
    assert message in done.stderr
