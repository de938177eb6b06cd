"""Governance on a real chain: kms-gov on anvil, mock-kms reading it, keyutil releasing."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from chain_fixtures import Anvil, start_anvil
from click.testing import CliRunner
from e2e_support import Kms, Setup

from mock_kms.cli import cli as kms_cli
from mock_kms.httpd import STOP_GRACE_S

pytestmark = pytest.mark.slow
KMS_GOV = str(Path(sys.executable).parent / "kms-gov")
REVOCATION_DELAY = 2.0


def gov(anvil: Anvil, key: str, *args: str) -> subprocess.CompletedProcess[bytes]:
    env = {
        **os.environ,
        "KMS_GOV_RPC_URL": anvil.url,
        "KMS_GOV_PRIVATE_KEY": key,
    }
    return subprocess.run([KMS_GOV, *args], env=env, capture_output=True, timeout=60)


def kms_on_chain(node: Anvil, setup: Setup, *extra: str) -> tuple[Kms, str, str]:
    """The allowlist contract deployed on ``node`` with ``setup``'s image registered for
    app-a, and a KMS reading it (with ``extra`` options), listening: (the KMS, the owner's
    private key, the contract's address)."""
    owner = node.new_account()
    key = "0x" + bytes(owner.key).hex()
    contract = node.deploy(owner)
    added = gov(node, key, "add-image", setup.image, "--app", "app-a", "--contract", contract)
    assert added.returncode == 0, added.stderr.decode()
    kms = setup.kms(
        "--rpc-url", node.url, "--contract", contract, "--chain-id", str(node.chain_id), *extra,
        images=(),
    )
    return kms.start().wait_listening(), key, contract


def test_revocation_on_chain_takes_effect_within_the_documented_delay(
    anvil: Anvil, tmp_path: Path
) -> None:
    setup = Setup(tmp_path)
    try:
        kms, key, contract = kms_on_chain(
            anvil, setup, "--revocation-delay", str(REVOCATION_DELAY)
        )
        released = setup.get_key(kms.url, "--stdout", "--format", "hex")
        assert released.returncode == 0, released.stderr.decode()

        removed = gov(anvil, key, "remove-image", setup.image, "--contract", contract)
        assert removed.returncode == 0, removed.stderr.decode()
        time.sleep(REVOCATION_DELAY)  # the receipt is in: wait out the documented delay
        refused = setup.get_key(kms.url, "--stdout")
        assert refused.returncode == 4
        assert b"image_not_allowed" in refused.stderr

        # Registered again (a new decision on chain): released again, with the same key.
        again = gov(anvil, key, "add-image", setup.image, "--app", "app-a", "--contract", contract)
        assert again.returncode == 0, again.stderr.decode()
        time.sleep(REVOCATION_DELAY)
        back = setup.get_key(kms.url, "--stdout", "--format", "hex")
        assert back.returncode == 0 and back.stdout == released.stdout
    finally:
        setup.close()


@pytest.mark.parametrize(
    "args, message",
    [
        (
            [
                "--rpc-url",
                "http://127.0.0.1:1",
                "--contract",
                "0x" + "11" * 20,
                "--chain-id",
                "1",
                "--allow-image",
                "0x" + "22" * 32 + "=app",
            ],
            "--allow-image registers on the embedded",
        ),
        (["--rpc-url", "http://127.0.0.1:1"], "--rpc-url needs --contract and --chain-id"),
        (["--contract", "0x" + "11" * 20], "--contract goes with --rpc-url"),
        (["--no-aws-root"], "--no-aws-root needs at least one --trust-root"),
    ],
    ids=[
        "allow-image-with-external-chain",
        "rpc-without-contract",
        "contract-without-rpc",
        "no-root",
    ],
)
def test_serve_usage_errors_exit_2(args: list[str], message: str, tmp_path: Path) -> None:
    result = CliRunner().invoke(kms_cli, ["serve", "--state-dir", str(tmp_path / "s"), *args])
    assert result.exit_code == 2
    assert message in result.output


def test_serve_bad_allow_image_value_is_a_usage_error(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        kms_cli, ["serve", "--state-dir", str(tmp_path / "s"), "--allow-image", "0x1234=app"]
    )
    assert result.exit_code == 2  # as every usage error (issue 14, item 10)
    assert "Invalid value for --allow-image: expected an image hash" in result.output


def test_identity_creates_state_and_is_stable(tmp_path: Path) -> None:
    first = CliRunner().invoke(kms_cli, ["identity", "--state-dir", str(tmp_path / "s")])
    second = CliRunner().invoke(kms_cli, ["identity", "--state-dir", str(tmp_path / "s")])
    assert first.exit_code == 0 and first.output.startswith("ed25519:")
    assert first.output == second.output
    assert oct((tmp_path / "s").stat().st_mode & 0o777) == "0o700"


@pytest.mark.parametrize("workers", [1, 2])
def test_a_stop_does_not_wait_for_a_request_stuck_on_the_chain(
    tmp_path: Path, workers: int
) -> None:
    """With --threads, a request whose chain call does not return (the node is stopped) is
    left behind once the stop's grace is over. Before, one worker waited for the call (here
    up to --rpc-timeout, 60 s), and a worker of several until its parent killed it (10 s)."""
    node = start_anvil()  # its own: it is stopped (SIGSTOP) below
    setup = Setup(tmp_path)
    held: socket.socket | None = None
    try:
        kms, _, _ = kms_on_chain(
            node, setup, "--rpc-timeout", "60", "--workers", str(workers), "--threads", "2"
        )
        node.process.send_signal(signal.SIGSTOP)
        time.sleep(1.2)  # past the readiness answer's 1 s cache: /v1/health asks the node
        port = int(kms.url.rsplit(":", 1)[1])
        held = socket.create_connection(("127.0.0.1", port))
        held.sendall(b"GET /v1/health HTTP/1.1\r\nHost: kms\r\n\r\n")
        time.sleep(0.5)
        assert kms.proc is not None
        started = time.monotonic()
        kms.proc.send_signal(signal.SIGTERM)
        assert kms.proc.wait(timeout=30) == 0
        assert time.monotonic() - started < STOP_GRACE_S + 3
        log = setup.kms_log.read_text()
        assert "stopping with 1 request(s) still running after the 5 s grace" in log, log
        assert "mock-kms stopping" in log
    finally:
        node.process.send_signal(signal.SIGCONT)
        if held is not None:
            held.close()
        setup.close()
        node.stop()
