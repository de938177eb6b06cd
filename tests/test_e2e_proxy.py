"""Key release through a proxy, with real processes: `keyutil get-key` -> unix socket (in
place of vsock) -> `keyutil proxy` or socat -> TCP -> `mock-kms serve`.

A recording relay that the test puts between the proxy and the KMS keeps every byte that
crossed the proxy, both ways: the exchange is in it, the released key is not.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from e2e_support import (
    Kms,
    LoopbackServer,
    ProxyProcess,
    Setup,
    assert_key_absent,
    free_port,
    json_lines,
    wait_unix_socket,
)

pytestmark = pytest.mark.slow


class RecordingRelay:
    """TCP on loopback to ``port``, keeping a copy of the bytes each way."""

    def __init__(self, port: int) -> None:
        self.port_to = port
        self.up = bytearray()  # towards the KMS
        self.down = bytearray()  # from the KMS
        self.lock = threading.Lock()
        self.server = LoopbackServer(self._relay)
        self.port = self.server.port

    def _relay(self, client: socket.socket) -> None:
        with socket.create_connection(("127.0.0.1", self.port_to)) as kms:
            back = threading.Thread(target=self._copy, args=(kms, client, self.down))
            back.start()
            self._copy(client, kms, self.up)
            back.join()

    def _copy(self, src: socket.socket, dst: socket.socket, record: bytearray) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                with self.lock:
                    record += data
                dst.sendall(data)
            dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self.server.close()


@pytest.fixture
def sockdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="kpe", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def kms_port(kms: Kms) -> int:
    return int(kms.url.rsplit(":", 1)[1])


def release_hex(s: Setup, url: str) -> tuple[bytes, bytes]:
    """The released key (learnt from --stdout --format hex) and get-key's stderr."""
    result = s.get_key(url, "--key", "disk", "--stdout", "--format", "hex")
    assert result.returncode == 0, result.stderr.decode()
    key = bytes.fromhex(result.stdout.decode().strip())
    assert len(key) == 32
    return key, result.stderr


def assert_real_exchange_without_the_key(relay: RecordingRelay, key: bytes, *logs: bytes) -> None:
    up, down = bytes(relay.up), bytes(relay.down)
    for request in (b"GET /v1/health ", b"POST /v1/challenge ", b"POST /v1/release "):
        assert request in up
    assert b'"attestation":"' in up and b'"name":"disk"' in up
    assert b"HTTP/1.1 200" in down and b'"sealed":"' in down and b'"signature":"' in down
    assert_key_absent(key, up, down, *logs)


def test_release_through_keyutil_proxy(shared: tuple[Setup, Kms], sockdir: Path) -> None:
    s, kms = shared
    relay = RecordingRelay(kms_port(kms))
    path = sockdir / "vsock.sock"
    proxy = ProxyProcess(
        *("--listen", f"unix://{path}", "--to", f"127.0.0.1:{relay.port}"),
        *("--log-format", "json"),
    ).wait_listening(path)
    key, client_log = release_hex(s, f"unix://{path}")
    code, proxy_log = proxy.stop()
    relay.close()
    assert code == 0, proxy_log
    assert_real_exchange_without_the_key(relay, key, client_log, proxy_log.encode())
    lines = [x for x in json_lines(proxy_log) if x["event"] == "connection"]
    # the readiness probe, then health, challenge and release: one connection each
    assert len(lines) >= 4
    assert {x["end"] for x in lines} <= {"client_closed", "dest_closed"}
    # what the proxy says it moved is what crossed it
    assert sum(x["bytes_to_dest"] for x in lines) == len(relay.up)
    assert sum(x["bytes_to_client"] for x in lines) == len(relay.down)


def test_release_through_socat(shared: tuple[Setup, Kms], sockdir: Path) -> None:
    socat = shutil.which("socat")
    if socat is None:
        pytest.fail("socat is not installed: scripts/test.sh installs it (apt-get install socat)")
    s, kms = shared
    relay = RecordingRelay(kms_port(kms))
    path = sockdir / "vsock.sock"
    proc = subprocess.Popen(
        [socat, f"UNIX-LISTEN:{path},fork", f"TCP:127.0.0.1:{relay.port}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        wait_unix_socket(path, proc)
        key, client_log = release_hex(s, f"unix://{path}")
    finally:
        proc.send_signal(signal.SIGTERM)
        _, socat_log = proc.communicate(timeout=20)
        relay.close()
    assert_real_exchange_without_the_key(relay, key, client_log, socat_log)


def test_destination_down_gives_unreachable_by_the_deadline(
    shared: tuple[Setup, Kms], sockdir: Path
) -> None:
    s, _ = shared
    path = sockdir / "vsock.sock"
    proxy = ProxyProcess(
        *("--listen", f"unix://{path}", "--to", f"127.0.0.1:{free_port()}"),
        *("--connect-timeout", "1", "--log-format", "json"),
    ).wait_listening(path)
    deadline = 4.0
    started = time.monotonic()
    result = s.get_key(f"unix://{path}", "--stdout", deadline=deadline)
    elapsed = time.monotonic() - started
    code, proxy_log = proxy.stop()
    assert result.returncode == 3, result.stderr.decode()
    assert b'"event": "kms_unavailable"' in result.stderr
    assert b'"exit": 3' in result.stderr
    assert result.stdout == b""
    # retried until the deadline, and no longer: within 10% (plus the process start, which
    # is part of the budget here, as in the release tests)
    assert deadline * 0.9 <= elapsed <= deadline * 1.1 + 0.5, elapsed
    assert code == 0
    lines = [x for x in json_lines(proxy_log) if x["event"] == "connection"]
    assert len(lines) >= 2  # the probe and at least one attempt
    assert all(x["end"] == "destination_unreachable" for x in lines)
    assert all("Connection refused" in x["error"] for x in lines)


def test_destination_outside_the_allowlist_is_refused(
    shared: tuple[Setup, Kms], sockdir: Path
) -> None:
    s, kms = shared
    allowlist = sockdir / "vsock-proxy.yaml"
    allowlist.write_text("allowlist:\n- {address: kms.us-east-1.amazonaws.com, port: 443}\n")
    path = sockdir / "vsock.sock"
    proxy = ProxyProcess(
        *("--listen", f"unix://{path}", "--to", f"127.0.0.1:{kms_port(kms)}"),
        *("--allowlist", str(allowlist), "--log-format", "json"),
    )
    proxy.proc.wait(20)  # refused at start: it exits by itself
    code, proxy_log = proxy.stop()
    assert code == 2
    (line,) = json_lines(proxy_log)
    assert (line["event"], line["destination"]) == ("refused", f"127.0.0.1:{kms_port(kms)}")
    assert str(allowlist) in line["reason"]
    assert not path.exists()
    # the enclave side then finds no proxy: unreachable, by its deadline
    result = s.get_key(f"unix://{path}", "--stdout", deadline=1.5)
    assert result.returncode == 3
