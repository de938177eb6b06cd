"""Key release end to end, with real processes: `mock-kms serve` and `keyutil get-key`."""

from __future__ import annotations

import concurrent.futures
import json
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from e2e_support import (
    KEYUTIL,
    MOCK_KMS,
    Kms,
    LoopbackServer,
    Setup,
    assert_key_absent,
    free_port,
    identity_of,
    sim_init,
)

pytestmark = pytest.mark.slow


def test_release_over_tcp_to_tmpfs_file(shared: tuple[Setup, Kms]) -> None:
    s, kms = shared
    out = s.keys / "tcp.key"
    result = s.get_key(kms.url, "--key", "disk", "--out", str(out))
    assert result.returncode == 0, result.stderr.decode()
    key = out.read_bytes()
    assert len(key) == 32
    assert oct(out.stat().st_mode & 0o777) == "0o400"
    assert_key_absent(
        key, result.stdout, result.stderr, s.kms_log.read_bytes(), s.audit.read_bytes()
    )


def test_release_over_unix_socket(setup: Setup) -> None:
    sock = setup.root / "kms.sock"
    kms = setup.kms(unix=sock).start().wait_listening()
    result = setup.get_key(kms.url, "--key", "disk", "--stdout", "--format", "hex")
    assert result.returncode == 0, result.stderr.decode()
    assert len(bytes.fromhex(result.stdout.decode().strip())) == 32


def test_same_key_for_same_app_other_image_and_other_key_for_other_app(setup: Setup) -> None:
    second, third = setup.root / "sim2", setup.root / "sim3"
    image2, image3 = sim_init(second), sim_init(third)
    # Each simulator has its own CA: trust them all.
    kms = (
        setup.kms(
            "--trust-root",
            str(second / "root.pem"),
            "--trust-root",
            str(third / "root.pem"),
            images=(f"{setup.image}=app-a", f"{image2}=app-a", f"{image3}=app-b"),
        )
        .start()
        .wait_listening()
    )
    keys = []
    for sim in (setup.sim, second, third):
        result = setup.get_key(kms.url, "--stdout", "--format", "hex", sim=sim)
        assert result.returncode == 0, result.stderr.decode()
        keys.append(result.stdout.strip())
    assert keys[0] == keys[1]
    assert keys[2] != keys[0]


def test_kms_restart_releases_the_same_key(setup: Setup) -> None:
    port = free_port()
    kms = setup.kms(port=port).start().wait_listening()
    first = setup.get_key(kms.url, "--stdout", "--format", "hex")
    kms.stop()
    kms = setup.kms(port=port).start().wait_listening()
    second = setup.get_key(kms.url, "--stdout", "--format", "hex")
    assert first.returncode == second.returncode == 0
    assert first.stdout == second.stdout


def test_wrong_pinned_identity_gives_exit_6(shared: tuple[Setup, Kms], tmp_path: Path) -> None:
    s, kms = shared
    other = identity_of(tmp_path / "other-state")
    result = s.get_key(kms.url, "--stdout", "--format", "hex", identity=other)
    assert result.returncode == 6
    assert result.stdout == b""


def test_untrusted_root_gives_exit_4_with_the_code_logged(
    shared: tuple[Setup, Kms], tmp_path: Path
) -> None:
    s, kms = shared
    stranger = tmp_path / "stranger"
    sim_init(stranger)
    started = time.monotonic()
    result = s.get_key(kms.url, "--stdout", sim=stranger)
    assert result.returncode == 4
    assert b"chain_untrusted" in result.stderr
    assert time.monotonic() - started < 10  # a denial is never retried


def test_image_not_allowed_gives_exit_4(setup: Setup) -> None:
    unregistered = setup.root / "unregistered"
    sim_init(unregistered)
    kms = setup.kms("--trust-root", str(unregistered / "root.pem")).start().wait_listening()
    result = setup.get_key(kms.url, "--stdout", sim=unregistered)
    assert result.returncode == 4
    assert b"image_not_allowed" in result.stderr


def test_debug_enclave_refused(setup: Setup) -> None:
    debug = setup.root / "debug"
    subprocess.run([KEYUTIL, "sim", "init", str(debug), "--debug"], check=True, capture_output=True)
    kms = setup.kms("--trust-root", str(debug / "root.pem")).start().wait_listening()
    result = setup.get_key(kms.url, "--stdout", sim=debug)
    assert result.returncode == 4
    assert b"debug_enclave" in result.stderr


def test_kms_that_starts_late_is_waited_for(setup: Setup) -> None:
    port = free_port()
    kms = setup.kms(port=port)
    timer = threading.Timer(3.0, kms.start)
    timer.start()
    try:
        result = setup.get_key(kms.url, "--stdout", "--format", "hex", deadline=60)
    finally:
        timer.join()
    assert result.returncode == 0, result.stderr.decode()


def test_kms_that_never_starts_gives_exit_3_at_the_deadline(setup: Setup) -> None:
    started = time.monotonic()
    result = setup.get_key(f"http://127.0.0.1:{free_port()}", "--stdout", deadline=4)
    elapsed = time.monotonic() - started
    assert result.returncode == 3
    # Within 10% of the deadline (the process start itself is part of the budget here).
    assert 4 * 0.9 <= elapsed <= 4 * 1.1 + 0.5, elapsed


def test_chain_down_gives_503_then_exit_3(setup: Setup) -> None:
    dead_rpc = f"http://127.0.0.1:{free_port()}"
    kms = (
        setup.kms(
            "--rpc-url", dead_rpc, "--contract", "0x" + "11" * 20, "--chain-id", "31337", images=()
        )
        .start()
        .wait_listening()
    )
    try:
        urllib.request.urlopen(kms.url + "/v1/health", timeout=5)
        raise AssertionError("health should be 503 while the chain is down")
    except urllib.error.HTTPError as e:
        assert e.code == 503
        assert json.load(e)["error"] == "chain_unavailable"
    started = time.monotonic()
    result = setup.get_key(kms.url, "--stdout", deadline=4)
    assert result.returncode == 3
    assert time.monotonic() - started <= 4 * 1.1 + 0.5
    assert b"chain_unavailable" in result.stderr


def test_output_directory_not_writable_gives_exit_7_and_writes_nothing(
    shared: tuple[Setup, Kms],
) -> None:
    s, kms = shared
    blocker = s.keys / "a-file"
    blocker.write_bytes(b"")
    result = s.get_key(kms.url, "--out-dir", str(blocker / "keys"), "--key", "k1")
    assert result.returncode == 7
    assert list(s.keys.glob("**/k1*")) == []


def test_twenty_concurrent_clients_all_succeed(shared: tuple[Setup, Kms]) -> None:
    s, kms = shared
    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        results = list(
            pool.map(lambda _: s.get_key(kms.url, "--stdout", "--format", "hex"), range(20))
        )
    assert [r.returncode for r in results] == [0] * 20, [r.stderr[-300:] for r in results]
    assert len({r.stdout for r in results}) == 1  # one application, one key


class TamperingProxy:
    """The untrusted host: forwards TCP to the KMS and flips one byte of each release answer."""

    def __init__(self, target_port: int) -> None:
        self.target = target_port
        self.tampered = 0
        self.server = LoopbackServer(self._handle)
        self.port = self.server.port

    def _handle(self, client: socket.socket) -> None:
        with socket.create_connection(("127.0.0.1", self.target)) as upstream:
            request = self._read_message(client)
            upstream.sendall(request)
            response = self._read_message(upstream)
            marker = b'"sealed":"'
            at = response.find(marker)
            if request.startswith(b"POST /v1/release") and at >= 0:
                i = at + len(marker) + 5
                swapped = b"A" if response[i : i + 1] != b"A" else b"B"
                response = response[:i] + swapped + response[i + 1 :]
                self.tampered += 1
            client.sendall(response)

    @staticmethod
    def _read_message(sock: socket.socket) -> bytes:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                return data
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        while len(body) < length:
            body += sock.recv(65536)
        return head + b"\r\n\r\n" + body

    def close(self) -> None:
        self.server.close()


def test_answer_tampered_by_the_host_gives_exit_6(shared: tuple[Setup, Kms]) -> None:
    s, kms = shared
    proxy = TamperingProxy(int(kms.url.rsplit(":", 1)[1]))
    try:
        result = s.get_key(f"http://127.0.0.1:{proxy.port}", "--stdout", "--format", "hex")
    finally:
        proxy.close()
    assert proxy.tampered >= 1
    assert result.returncode == 6
    assert result.stdout == b""


def test_sigterm_stops_the_kms_cleanly(setup: Setup) -> None:
    kms = setup.kms().start().wait_listening()
    assert kms.proc is not None
    kms.proc.send_signal(signal.SIGTERM)
    assert kms.proc.wait(10) == 0
    log = setup.kms_log.read_text()
    assert "Traceback" not in log
    assert "mock-kms stopping" in log


@pytest.mark.parametrize("quiet", [False, True])
def test_quiet_drops_the_line_per_request_but_not_the_audit_record(
    setup: Setup, quiet: bool
) -> None:
    kms = setup.kms(*(["--quiet"] if quiet else [])).start().wait_listening()
    assert setup.get_key(kms.url, "--key", "disk", "--stdout").returncode == 0
    refused = urllib.request.Request(kms.url + "/v1/release", data=b"{}", method="POST")
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(refused, timeout=10)
    assert err.value.code == 400
    kms.stop()
    log = setup.kms_log.read_text()
    assert "mock-kms serving on" in log and "mock-kms stopping" in log
    assert ("release ok:" in log, "release denied:" in log) == (not quiet, not quiet), log
    audit = [json.loads(line) for line in setup.audit.read_text().splitlines()]
    assert [e["outcome"] for e in audit] == ["released", "denied"]


def test_quiet_and_verbose_together_are_a_usage_error(setup: Setup) -> None:
    result = subprocess.run(
        [MOCK_KMS, "serve", "--quiet", "-v", "--state-dir", str(setup.state)],
        capture_output=True, timeout=60,
    )
    assert result.returncode == 2
    assert b"--quiet and --verbose ask for opposite things" in result.stderr
