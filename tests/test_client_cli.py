"""``keyutil get-key`` and ``keyutil health`` end to end: real sockets, the fake KMS, exit codes."""

from __future__ import annotations

import base64
import json
import os
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from test_client import FakeKms, TcpServer, UnixServer, serve  # noqa: F401 (fixture)

from keyutil.cli import cli
from keyutil.simulator import SimulatedNSM


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("KEYUTIL_"):
            monkeypatch.delenv(name)


@pytest.fixture(scope="module")
def nsm(tmp_path_factory: pytest.TempPathFactory) -> SimulatedNSM:
    return SimulatedNSM.init(tmp_path_factory.mktemp("cli") / "sim")


@pytest.fixture
def kms(nsm: SimulatedNSM) -> FakeKms:
    return FakeKms(nsm.directory)


@pytest.fixture
def url(kms: FakeKms, serve: Callable[[Any], str], tmp_path: Path) -> str:  # noqa: F811
    return serve(UnixServer(tmp_path / "kms.sock", kms.handle))



def keyutil(*args: str, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(
        cli, list(args), env=env, auto_envvar_prefix="KEYUTIL", prog_name="keyutil"
    )


def get_key(url: str, nsm: SimulatedNSM, *args: str, pubkey: str | None = None) -> Result:
    base = ["get-key", "--kms", url, "--nsm", "simulator", "--sim-dir", str(nsm.directory)]
    if pubkey is not None:
        base += ["--kms-pubkey", pubkey]
    return keyutil(*base, *args)


def assert_no_key_in(text: str, secret: bytes) -> None:
    for form in (secret.hex(), secret.hex().upper(), base64.b64encode(secret).decode()):
        assert form not in text
    assert secret.decode("latin-1") not in text


def test_get_key_to_stdout_hex(url: str, nsm: SimulatedNSM, kms: FakeKms) -> None:
    result = get_key(url, nsm, "--stdout", "--format", "hex", "-v", pubkey=kms.pubkey)
    assert result.exit_code == 0, result.stderr
    secret = kms.secret("default", 32)
    assert result.stdout == secret.hex() + "\n"
    assert "released" in result.stderr
    assert_no_key_in(result.stderr, secret)


@pytest.mark.parametrize("fmt", ["raw", "base64"])
def test_get_key_formats(url: str, nsm: SimulatedNSM, kms: FakeKms, fmt: str) -> None:
    result = get_key(url, nsm, "--stdout", "--format", fmt, pubkey=kms.pubkey)
    assert result.exit_code == 0, result.stderr
    secret = kms.secret("default", 32)
    expected = secret if fmt == "raw" else base64.b64encode(secret) + b"\n"
    assert result.stdout_bytes == expected
    assert_no_key_in(result.stderr, secret)


def test_get_key_to_a_tmpfs_file(url: str, nsm: SimulatedNSM, kms: FakeKms, shm: Path) -> None:
    out = shm / "app.key"
    result = get_key(url, nsm, "--out", str(out), "--log-format", "json", pubkey=kms.pubkey)
    assert result.exit_code == 0, result.stderr
    assert out.read_bytes() == kms.secret("default", 32)
    assert stat.S_IMODE(out.stat().st_mode) == 0o400
    events = [json.loads(line) for line in result.stderr.splitlines()]
    assert [e["event"] for e in events] == ["released", "written"]
    assert result.stdout == ""
    assert_no_key_in(result.stderr, kms.secret("default", 32))


def test_get_key_several_keys_to_a_directory(
    url: str, nsm: SimulatedNSM, kms: FakeKms, shm: Path
) -> None:
    args = ["--out-dir", str(shm), "--key", "disk", "--key", "weights", "--length", "48"]
    result = get_key(url, nsm, *args, pubkey=kms.pubkey)
    assert result.exit_code == 0, result.stderr
    assert (shm / "disk").read_bytes() == kms.secret("disk", 48)
    assert (shm / "weights").read_bytes() == kms.secret("weights", 48)


def test_get_key_from_the_environment_and_a_pubkey_file(
    url: str, nsm: SimulatedNSM, kms: FakeKms, tmp_path: Path
) -> None:
    (tmp_path / "kms.pub").write_text(kms.pubkey + "\n")
    env = {
        "KEYUTIL_KMS": url,
        "KEYUTIL_KMS_PUBKEY": f"@{tmp_path / 'kms.pub'}",
        "KEYUTIL_NSM": "simulator",
        "KEYUTIL_SIM_DIR": str(nsm.directory),
    }
    result = keyutil("get-key", "--stdout", "--format", "hex", "--suite", "p384", env=env)
    assert result.exit_code == 0, result.stderr
    assert result.stdout.strip() == kms.secret("default", 32).hex()


def test_get_key_over_tcp(
    kms: FakeKms,
    nsm: SimulatedNSM,
    serve: Callable[[Any], str],  # noqa: F811
) -> None:
    url = serve(TcpServer(kms.handle))
    result = get_key(url, nsm, "--stdout", "--format", "hex", pubkey=kms.pubkey)
    assert result.exit_code == 0, result.stderr


# -- Usage (2) ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        [],  # no pinned identity
        ["--kms-pubkey", "ed25519:short"],
        ["--kms-pubkey", "@/no/such/file"],
        ["--insecure-skip-kms-auth", "--kms-pubkey", "ed25519:" + "A" * 43 + "="],
        ["--insecure-skip-kms-auth", "--out", "/dev/shm/x", "--stdout"],
        ["--insecure-skip-kms-auth", "--format", "hex"],
        ["--insecure-skip-kms-auth", "--stdout", "--key", "../etc"],
        ["--insecure-skip-kms-auth", "--stdout", "--length", "8"],
        ["--insecure-skip-kms-auth", "--stdout", "--deadline", "0"],
    ],
)
def test_usage_errors(url: str, nsm: SimulatedNSM, kms: FakeKms, args: list[str]) -> None:
    if "--out" not in args and "--stdout" not in args and "--format" not in args:
        args = [*args, "--stdout"]
    result = get_key(url, nsm, *args)
    assert result.exit_code == 2, result.stderr
    assert sum(kms.calls.values()) == 0


def test_bad_kms_url_is_usage(nsm: SimulatedNSM) -> None:
    assert get_key("ftp://x:1", nsm, "--stdout", "--insecure-skip-kms-auth").exit_code == 2


def test_insecure_skip_warns_and_still_releases(url: str, nsm: SimulatedNSM, kms: FakeKms) -> None:
    result = get_key(url, nsm, "--stdout", "--format", "hex", "--insecure-skip-kms-auth")
    assert result.exit_code == 0, result.stderr
    assert "warning: kms_auth_skipped" in result.stderr


# -- KMS unreachable (3), denied (4), NSM (5), unauthenticated (6), output (7) -------------------


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_connection_refused_until_the_deadline(nsm: SimulatedNSM, kms: FakeKms) -> None:
    start = time.monotonic()
    result = get_key(
        f"http://127.0.0.1:{_closed_port()}",
        nsm,
        "--stdout",
        "--deadline",
        "1.5",
        pubkey=kms.pubkey,
    )
    elapsed = time.monotonic() - start
    assert result.exit_code == 3, result.stderr
    assert 1.0 < elapsed <= 1.5 * 1.1
    assert "kms_unavailable" in result.stderr


def test_a_kms_that_never_answers(nsm: SimulatedNSM, kms: FakeKms) -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)  # the kernel completes connections; nobody ever replies
        start = time.monotonic()
        result = get_key(
            f"http://127.0.0.1:{listener.getsockname()[1]}",
            nsm,
            "--stdout",
            "--deadline",
            "1.5",
            pubkey=kms.pubkey,
        )
        elapsed = time.monotonic() - start
    assert result.exit_code == 3, result.stderr
    # The deadline bounds the run; the slack is for a loaded machine's scheduling, not retries
    # (a client that ignored its deadline would wait for the listener forever).
    assert elapsed <= 1.5 + 1.0
    assert '"timeout"' in result.stderr


def test_denied_is_4_with_the_kms_code_and_not_retried(
    url: str, nsm: SimulatedNSM, kms: FakeKms
) -> None:
    kms.script["/v1/release"] = [(403, {"error": "image_not_allowed", "message": "revoked"})]
    result = get_key(url, nsm, "--stdout", "--log-format", "json", pubkey=kms.pubkey)
    assert result.exit_code == 4, result.stderr
    event = json.loads(result.stderr.splitlines()[-1])
    assert (event["event"], event["code"], event["exit"]) == ("denied", "image_not_allowed", 4)
    assert kms.calls["/v1/release"] == 1


def test_503_then_released(url: str, nsm: SimulatedNSM, kms: FakeKms) -> None:
    kms.script["/v1/release"] = [(503, {"error": "chain_unavailable", "message": "rpc"})]
    result = get_key(url, nsm, "--stdout", "--format", "hex", pubkey=kms.pubkey)
    assert result.exit_code == 0, result.stderr
    assert kms.calls["/v1/release"] == 2 and kms.calls["/v1/challenge"] == 2


def test_nsm_error_is_5(url: str, kms: FakeKms, tmp_path: Path) -> None:
    result = keyutil(
        "get-key",
        "--kms",
        url,
        "--kms-pubkey",
        kms.pubkey,
        "--stdout",
        "--nsm",
        "simulator",
        "--sim-dir",
        str(tmp_path / "nothing"),
    )
    assert result.exit_code == 5, result.stderr


def test_wrong_pinned_identity_is_6(url: str, nsm: SimulatedNSM, kms: FakeKms) -> None:
    other = FakeKms(nsm.directory).pubkey
    result = get_key(url, nsm, "--stdout", "--format", "hex", pubkey=other)
    assert result.exit_code == 6, result.stderr
    assert "answer_unauthenticated" in result.stderr
    assert result.stdout == ""
    assert_no_key_in(result.stderr, kms.secret("default", 32))


def test_host_substitution_is_6(url: str, nsm: SimulatedNSM, kms: FakeKms) -> None:
    from keyutil import protocol

    kms.recipient_override = protocol.recipient_public_bytes(
        protocol.generate_recipient(protocol.SUITE_X25519)
    )
    result = get_key(url, nsm, "--stdout", "--format", "hex", pubkey=kms.pubkey)
    assert result.exit_code == 6 and result.stdout == ""


@pytest.mark.parametrize("where", ["missing_parent", "under_a_file", "persistent"])
def test_unwritable_output_is_7_before_asking_the_kms(
    url: str, nsm: SimulatedNSM, kms: FakeKms, tmp_path: Path, where: str
) -> None:
    (tmp_path / "file").write_bytes(b"")
    target = {
        "missing_parent": tmp_path / "no" / "dir",
        "under_a_file": tmp_path / "file" / "dir",
        "persistent": tmp_path,
    }[where]
    result = get_key(url, nsm, "--out-dir", str(target), pubkey=kms.pubkey)
    assert result.exit_code == 7, result.stderr
    assert sum(kms.calls.values()) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "kms.sock"]


def test_allow_persistent(url: str, nsm: SimulatedNSM, kms: FakeKms, tmp_path: Path) -> None:
    out = tmp_path / "app.key"
    result = get_key(url, nsm, "--out", str(out), "--allow-persistent", pubkey=kms.pubkey)
    assert result.exit_code == 0, result.stderr
    assert out.read_bytes() == kms.secret("default", 32)


# -- health -------------------------------------------------------------------------------------


def test_health_ready(url: str) -> None:
    result = keyutil("health", "--kms", url)
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["status"] == "ready"


def test_health_not_ready_is_3(url: str, kms: FakeKms) -> None:
    kms.ready = False
    result = keyutil("health", "--kms", url, "--deadline", "2")
    assert result.exit_code == 3
    assert json.loads(result.stdout)["error"] == "chain_unavailable"


def test_health_unreachable_is_3() -> None:
    start = time.monotonic()
    result = keyutil("health", "--kms", f"http://127.0.0.1:{_closed_port()}", "--deadline", "0.5")
    assert result.exit_code == 3
    assert time.monotonic() - start < 0.5 * 1.1


# -- What importing the CLI pulls in ------------------------------------------------------------


def test_import_does_not_pull_web3_or_requests() -> None:
    code = (
        "import sys, keyutil.cli, keyutil.client, keyutil.transport, keyutil.output\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('web3', 'requests', 'eth_tester', 'mock_kms', 'urllib3'))\n"
        "print(bad)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"
