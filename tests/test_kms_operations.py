"""What an operator of mock-kms sees (issue 14, items 13, 16, 17): liveness apart from
readiness, build_info and ready metrics, logs at INFO in text or JSON with one timestamp
field, applications by name, and a KMS whose chain is unreachable at start that starts
not ready, says so, and refuses releases (fail closed)."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest
from test_service import APP_A, Clock, DownChain, Enclave, call, make_service, make_sim

from keyutil import protocol
from mock_kms.allowlist import EmbeddedAllowlist
from mock_kms.server import KmsApp
from mock_kms.service import AuditLog

MOCK_KMS = str(Path(sys.executable).parent / "mock-kms")
ADDRESS = "0x" + "12" * 20


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return int(r.status), r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_liveness_is_not_readiness(tmp_path: Path) -> None:
    clock = Clock()
    sim = make_sim(tmp_path / "sim", clock)
    app = KmsApp(make_service(tmp_path, sim, DownChain(), clock))
    assert call(app, "GET", "/v1/live") == ("200 OK", {"status": "live"})
    assert call(app, "GET", "/v1/health")[0].startswith("503")
    metrics = call(app, "GET", "/metrics")[1]
    assert "kms_ready 0.0" in metrics
    assert f'kms_build_info{{version="{version("nitro-keyrelease")}"}} 1.0' in metrics


def test_ready_gauge_follows_the_chain(tmp_path: Path) -> None:
    clock = Clock()
    sim = make_sim(tmp_path / "sim", clock)
    chain = EmbeddedAllowlist.create()
    app = KmsApp(make_service(tmp_path, sim, chain, clock))
    assert "kms_ready 1.0" in call(app, "GET", "/metrics")[1]


def test_the_audit_log_names_the_application_and_uses_ts(tmp_path: Path) -> None:
    clock = Clock()
    sim = make_sim(tmp_path / "sim", clock)
    chain = EmbeddedAllowlist.create()
    chain.register_image(bytes.fromhex(sim.identity.os_image_hash[2:]), APP_A)
    audit = tmp_path / "audit.log"
    service = make_service(tmp_path, sim, chain, clock, audit=AuditLog(audit))
    request = Enclave(sim).request(service)
    assert call(KmsApp(service), "POST", "/v1/release", json.dumps(request).encode())[0] == (
        "200 OK"
    )
    (entry,) = [json.loads(line) for line in audit.read_text().splitlines()]
    assert entry["application"] == "app-a"  # not 0x6170702d61000000...
    assert "time" not in entry and entry["ts"] == round(clock(), 3)


def test_application_text_names_only_what_is_a_name() -> None:
    assert protocol.application_text("0x" + b"demo-app".ljust(32, b"\0").hex()) == "demo-app"
    for raw in (bytes(range(32)), b"0xabc".ljust(32, b"\0"), bytes(32)):
        assert protocol.application_text("0x" + raw.hex()) == "0x" + raw.hex()
    assert protocol.application_text("not hex") == "not hex"


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_an_unreachable_node_starts_not_ready_and_says_so(tmp_path: Path) -> None:
    """Fail closed: the KMS serves, answers /v1/live, and refuses readiness and releases."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MOCK_KMS_")}
    proc = subprocess.Popen(
        [MOCK_KMS, "serve", "--state-dir", str(tmp_path / "state"), "--port", "0",
         "--rpc-url", f"http://127.0.0.1:{closed_port()}", "--contract", ADDRESS,
         "--chain-id", "31337", "--rpc-timeout", "0.5", "--log-format", "json"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
    )
    lines: list[dict[str, Any]] = []
    try:
        assert proc.stderr is not None
        while not lines or "serving on" not in lines[-1]["message"]:
            line = proc.stderr.readline()
            assert line, f"mock-kms exited {proc.wait()}: {lines}"
            lines.append(json.loads(line))
        url = re.search(r"http://\S+?(?=,)", lines[-1]["message"])
        assert url is not None
        base = url.group(0)
        assert get(base + "/v1/live")[0] == 200
        status, body = get(base + "/v1/health")
        assert status == 503 and json.loads(body)["error"] == "chain_unavailable"
        metrics = get(base + "/metrics")[1].decode()
        assert "kms_ready 0.0" in metrics
        proc.send_signal(signal.SIGTERM)
        _, rest = proc.communicate(timeout=30)
        lines += [json.loads(line) for line in rest.splitlines()]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0
    not_ready = [x for x in lines if "starting not ready" in x["message"]]
    assert not_ready and not_ready[0]["level"] == "warning"
    assert "every release is refused with 503" in not_ready[0]["message"]
    assert [x["level"] for x in lines if "mock-kms s" in x["message"]] == ["info", "info"]
    for x in lines:
        assert set(x) == {"ts", "level", "logger", "message"}
        assert abs(x["ts"] - time.time()) < 120


@pytest.mark.parametrize(("args", "level"), [([], "INFO"), (["-v"], "DEBUG")])
def test_serve_logs_at_info_and_debug_with_v(tmp_path: Path, args: list[str], level: str) -> None:
    import logging

    from click.testing import CliRunner

    from mock_kms.cli import cli

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = str(busy.getsockname()[1])
        result = CliRunner().invoke(
            cli, ["serve", *args, "--state-dir", str(tmp_path / "s"), "--port", port]
        )
    assert result.exit_code == 3  # the port is in use: told after the logging is set up
    assert logging.getLevelName(logging.getLogger().level) == level
