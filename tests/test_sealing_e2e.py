"""Sealed data end to end, with real processes: mock-kms serve, keyutil, the stock age CLI,
keyutil proxy as the egress proxy, and a local TLS server holding the sealed file."""

from __future__ import annotations

import http.server
import json
import os
import ssl
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from e2e_support import KEYUTIL, MOCK_KMS, Kms, ProxyProcess, Setup, sim_init
from test_transport import _cert

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("age_cli")]

PLAINTEXT = os.urandom(3 * 64 * 1024 + 123)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Setup, Kms]]:
    s = Setup(tmp_path_factory.mktemp("sealed"))
    kms = s.kms().start().wait_listening()
    yield s, kms
    s.close()


def run(*args: str, **kw: Any) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(list(args), capture_output=True, timeout=120, **kw)


def recipient_of(s: Setup, kms: Kms, app: str = "app-a", key: str = "weights") -> str:
    result = run(
        KEYUTIL, "recipient", "--kms", kms.url, "--kms-pubkey", s.identity,
        "--app", app, "--key", key,
    )
    assert result.returncode == 0, result.stderr.decode()
    return result.stdout.decode().strip()


def seal_with_age(recipient: str, directory: Path, data: bytes = PLAINTEXT) -> Path:
    path = directory / "weights.age"
    run("age", "-r", recipient, "-o", str(path), input=data, check=True)
    return path


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def codes(stderr: bytes) -> list[str]:
    return [json.loads(line).get("code") for line in stderr.splitlines() if line.startswith(b"{")]


# -- The recipient --------------------------------------------------------------------------


def test_recipient_is_the_offline_one_and_apps_unknown_to_the_chain_get_one(
    env: tuple[Setup, Kms],
) -> None:
    s, kms = env
    for app in ("app-a", "app-not-registered", "0x" + "ab" * 32):
        online = recipient_of(s, kms, app)
        offline = run(MOCK_KMS, "recipient", "--state-dir", str(s.state), "--app", app,
                      "--key", "weights")
        assert offline.stdout.decode().strip() == online and online.startswith("age1")
    assert recipient_of(s, kms, "app-b") != recipient_of(s, kms, "app-a")
    assert recipient_of(s, kms, key="other") != recipient_of(s, kms)
    bad = run(MOCK_KMS, "recipient", "--state-dir", str(s.state), "--app", "x" * 33,
              "--key", "weights")
    assert bad.returncode == 1 and b"application_invalid" in bad.stderr


class Canned(http.server.BaseHTTPRequestHandler):
    """A host relaying the recipient: answers every GET with ``self.server.body``."""

    def do_GET(self) -> None:
        body = json.dumps(self.server.body).encode()  # type: ignore[attr-defined]
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def host() -> Iterator[http.server.ThreadingHTTPServer]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Canned)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


def test_a_host_swapping_the_recipient_is_caught(
    env: tuple[Setup, Kms], host: http.server.ThreadingHTTPServer
) -> None:
    s, _ = env
    genuine = json.loads(
        run(MOCK_KMS, "recipient", "--state-dir", str(s.state), "--app", "app-a",
            "--key", "weights", "--json").stdout
    )
    other_app = json.loads(
        run(MOCK_KMS, "recipient", "--state-dir", str(s.state), "--app", "app-b",
            "--key", "weights", "--json").stdout
    )
    attacker = run("age-keygen", check=True).stdout.decode()
    attacker_recipient = attacker.split("public key: ")[1].split()[0]
    url = f"http://127.0.0.1:{host.server_address[1]}"
    cases = {
        "recipient_unauthenticated": {**genuine, "recipient": attacker_recipient},
        "recipient_mismatch": other_app,  # genuinely signed, for another application
    }
    for code, body in cases.items():
        host.body = body  # type: ignore[attr-defined]
        result = run(KEYUTIL, "recipient", "--kms", url, "--kms-pubkey", s.identity,
                     "--app", "app-a", "--key", "weights", "--log-format", "json")
        assert result.returncode == 6, result.stderr
        assert codes(result.stderr) == [code]
        assert result.stdout == b""
    host.body = genuine  # type: ignore[attr-defined]
    ok = run(KEYUTIL, "recipient", "--kms", url, "--kms-pubkey", s.identity,
             "--app", "app-a", "--key", "weights")
    assert ok.stdout.decode().strip() == genuine["recipient"]
    other_pin = run(MOCK_KMS, "identity", "--state-dir", str(s.root / "other-kms")).stdout
    wrong = run(KEYUTIL, "recipient", "--kms", url, "--kms-pubkey", other_pin.decode().strip(),
                "--app", "app-a", "--key", "weights")
    assert wrong.returncode == 6 and wrong.stdout == b""


# -- Opening in the enclave -----------------------------------------------------------------


def test_sealed_by_age_opened_by_get_key_to_tmpfs_and_to_a_pipe(env: tuple[Setup, Kms]) -> None:
    s, kms = env
    sealed = seal_with_age(recipient_of(s, kms), s.root)
    out = s.keys / "weights.bin"
    result = s.get_key(kms.url, "--key", "weights", "--type", "age",
                       "--unseal", str(sealed), "--unseal-to", str(out))
    assert result.returncode == 0, result.stderr.decode()
    assert out.read_bytes() == PLAINTEXT
    assert oct(out.stat().st_mode & 0o777) == "0o400"
    piped = s.get_key(kms.url, "--key", "weights", "--type", "age",
                      "--unseal", str(sealed), "--unseal-to", "-")
    assert piped.returncode == 0 and piped.stdout == PLAINTEXT
    # The identity was never written: the key directory holds the plaintext only.
    assert leftovers(s.keys) == ["weights.bin"]
    out.unlink()


def test_keyutil_seal_opens_with_stock_age_and_the_released_identity(
    env: tuple[Setup, Kms],
) -> None:
    s, kms = env
    sealed = s.root / "by-keyutil.age"
    made = run(KEYUTIL, "seal", "-r", recipient_of(s, kms), "-", str(sealed), input=PLAINTEXT)
    assert made.returncode == 0, made.stderr.decode()
    identity = s.keys / "weights.key"
    got = s.get_key(kms.url, "--key", "weights", "--type", "age", "--out", str(identity))
    assert got.returncode == 0, got.stderr.decode()
    opened = run("age", "-d", "-i", str(identity), str(sealed))
    assert opened.returncode == 0, opened.stderr.decode()
    assert opened.stdout == PLAINTEXT
    # keyutil unseal with the identity file does the same, and to stdout.
    again = run(KEYUTIL, "unseal", "--identity", str(identity), str(sealed), "-")
    assert again.returncode == 0 and again.stdout == PLAINTEXT
    identity.unlink()


def test_others_cannot_open_it(env: tuple[Setup, Kms], tmp_path: Path) -> None:
    s, _ = env
    second, debug = tmp_path / "sim-b", tmp_path / "debug"
    image_b = sim_init(second)
    run(KEYUTIL, "sim", "init", str(debug), "--debug", check=True)
    kms = (
        s.kms(
            "--trust-root", str(second / "root.pem"), "--trust-root", str(debug / "root.pem"),
            images=(f"{s.image}=app-a", f"{image_b}=app-b"),
        )
        .start()
        .wait_listening()
    )
    sealed = seal_with_age(recipient_of(s, kms), tmp_path)
    out = s.keys / "weights.bin"
    args = ("--key", "weights", "--type", "age", "--unseal", str(sealed),
            "--unseal-to", str(out))
    other_app = s.get_key(kms.url, *args, sim=second)
    assert other_app.returncode == 9, other_app.stderr.decode()
    assert codes(other_app.stderr)[-1] == "sealed_not_for_key"
    debug_enclave = s.get_key(kms.url, *args, sim=debug)
    assert debug_enclave.returncode == 4
    assert codes(debug_enclave.stderr)[-1] == "debug_enclave"
    other_pin = run(MOCK_KMS, "identity", "--state-dir", str(tmp_path / "other")).stdout
    wrong_pin = s.get_key(kms.url, *args, identity=other_pin.decode().strip())
    assert wrong_pin.returncode == 6
    assert codes(wrong_pin.stderr)[-1] == "answer_unauthenticated"
    assert leftovers(s.keys) == []
    kms.stop()
    # A KMS that releases to debug enclaves, even as app-a, does so from the debug domain:
    # the identity it gets is not the one the file is sealed to.
    lenient = s.kms(
        "--trust-root", str(debug / "root.pem"), "--allow-debug", "--debug-app", "app-a",
    ).start().wait_listening()
    debug_released = s.get_key(lenient.url, *args, sim=debug)
    assert debug_released.returncode == 9, debug_released.stderr.decode()
    assert codes(debug_released.stderr)[-1] == "sealed_not_for_key"
    assert leftovers(s.keys) == []
    lenient.stop()


def test_damaged_files_leave_no_output(env: tuple[Setup, Kms], tmp_path: Path) -> None:
    s, kms = env
    sealed = seal_with_age(recipient_of(s, kms), tmp_path).read_bytes()
    identity = s.keys / "weights.key"
    assert s.get_key(kms.url, "--key", "weights", "--type", "age",
                     "--out", str(identity)).returncode == 0
    chunk = 64 * 1024 + 16
    nonce = sealed.index(b"\n", sealed.index(b"\n---") + 1) + 1
    first = nonce + 16
    starts = [first + i * chunk for i in range(4)]  # 3 full chunks and 123 bytes
    assert len(sealed) == starts[3] + 123 + 16

    def flip(at: int) -> bytes:
        return sealed[:at] + bytes([sealed[at] ^ 0x80]) + sealed[at + 1 :]

    damaged: dict[str, tuple[bytes, str]] = {
        "cut after the header": (sealed[:nonce], "sealed_truncated"),
        "cut after the nonce": (sealed[:first], "sealed_truncated"),
        **{f"cut after chunk {i}": (sealed[: starts[i + 1]], "sealed_truncated")
           for i in range(3)},
        **{f"flipped in chunk {i}": (flip(starts[i] + 50), "sealed_altered") for i in range(4)},
        "flipped in the nonce": (flip(nonce + 3), "sealed_altered"),
        "flipped in the header MAC": (flip(nonce - 10), "sealed_header_altered"),
        "chunks 0 and 1 swapped": (
            sealed[: starts[0]] + sealed[starts[1] : starts[2]] + sealed[starts[0] : starts[1]]
            + sealed[starts[2] :],
            "sealed_altered",
        ),
        "for another application": (
            seal_with_age(recipient_of(s, kms, "app-b"), tmp_path).read_bytes(),
            "sealed_not_for_key",
        ),
    }
    out = s.keys / "weights.bin"
    for what, (blob, code) in damaged.items():
        result = run(KEYUTIL, "unseal", "--identity", str(identity), "--log-format", "json",
                     "-", str(out), input=blob)
        assert result.returncode == 9, (what, result.stderr)
        expected = [code] if code != "sealed_header_altered" else [code, "sealed_header_invalid"]
        assert codes(result.stderr)[0] in expected, what
        assert leftovers(s.keys) == ["weights.key"], what
    # The one-step path too: a cut file from the enclave's own release.
    cut = tmp_path / "cut.age"
    cut.write_bytes(sealed[: starts[2]])
    result = s.get_key(kms.url, "--key", "weights", "--type", "age",
                       "--unseal", str(cut), "--unseal-to", str(out))
    assert result.returncode == 9 and codes(result.stderr)[-1] == "sealed_truncated"
    assert leftovers(s.keys) == ["weights.key"]
    identity.unlink()


def test_a_revoked_image_cannot_open(anvil: Any, tmp_path: Path) -> None:
    from test_e2e_anvil import REVOCATION_DELAY, gov

    s = Setup(tmp_path)
    try:
        owner = anvil.new_account()
        key = "0x" + bytes(owner.key).hex()
        contract = anvil.deploy(owner)
        assert gov(anvil, key, "add-image", s.image, "--app", "app-a",
                   "--contract", contract).returncode == 0
        kms = s.kms(
            "--rpc-url", anvil.url, "--contract", contract, "--chain-id", str(anvil.chain_id),
            "--revocation-delay", str(REVOCATION_DELAY), images=(),
        ).start().wait_listening()
        sealed = seal_with_age(recipient_of(s, kms), tmp_path)
        out = s.keys / "weights.bin"
        args = ("--key", "weights", "--type", "age", "--unseal", str(sealed),
                "--unseal-to", str(out))
        assert s.get_key(kms.url, *args).returncode == 0
        out.unlink()
        assert gov(anvil, key, "remove-image", s.image, "--contract", contract).returncode == 0
        time.sleep(REVOCATION_DELAY)
        revoked = s.get_key(kms.url, *args)
        assert revoked.returncode == 4
        assert codes(revoked.stderr)[-1] == "image_not_allowed"
        assert leftovers(s.keys) == []
    finally:
        s.close()


# -- Input over https, through the egress proxy -------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    directory = tmp_path_factory.mktemp("pki")
    ca_key, server_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(2))
    ca = _cert("sealed test CA", ca_key, None, ca_key)
    pem = serialization.Encoding.PEM
    (directory / "ca.pem").write_bytes(ca.public_bytes(pem))
    (directory / "server.pem").write_bytes(
        _cert("localhost", server_key, ca, ca_key).public_bytes(pem)
    )
    (directory / "server.key").write_bytes(
        server_key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())
    )
    other = ec.generate_private_key(ec.SECP256R1())
    (directory / "other-ca.pem").write_bytes(_cert("other", other, None, other).public_bytes(pem))
    return {p.stem: p for p in directory.iterdir()}


@pytest.fixture
def weights_host(pki: dict[str, Path], tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """An https file server on loopback serving tmp_path/www."""
    www = tmp_path / "www"
    www.mkdir()
    handler = type(
        "Files",
        (http.server.SimpleHTTPRequestHandler,),
        {"log_message": lambda *a: None},
    )
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), lambda *a: handler(*a, directory=str(www))
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pki["server"], pki["server"].with_suffix(".key"))
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1], www
    server.shutdown()
    server.server_close()


def test_https_input_through_the_egress_proxy(
    env: tuple[Setup, Kms], weights_host: tuple[int, Path], pki: dict[str, Path],
    tmp_path: Path,
) -> None:
    s, kms = env
    port, www = weights_host
    seal_with_age(recipient_of(s, kms), www)
    egress = tmp_path / "egress.sock"
    proxy = ProxyProcess("--listen", f"unix://{egress}", "--to", f"127.0.0.1:{port}")
    proxy.wait_listening(egress)
    try:
        out = s.keys / "weights.bin"
        url = f"https://localhost:{port}/weights.age"
        common = ("--key", "weights", "--type", "age", "--via", f"unix://{egress}")
        ok = s.get_key(kms.url, *common, "--source-ca", str(pki["ca"]),
                       "--unseal", url, "--unseal-to", str(out))
        assert ok.returncode == 0, ok.stderr.decode()
        assert out.read_bytes() == PLAINTEXT
        out.unlink()
        untrusted = s.get_key(kms.url, *common, "--source-ca", str(pki["other-ca"]),
                              "--unseal", url, "--unseal-to", str(out))
        assert untrusted.returncode == 3 and codes(untrusted.stderr)[-1] == "source_unreachable"
        missing = s.get_key(kms.url, *common, "--source-ca", str(pki["ca"]),
                            "--unseal", url + ".nope", "--unseal-to", str(out))
        assert missing.returncode == 3 and codes(missing.stderr)[-1] == "source_http_status"
        assert leftovers(s.keys) == []
    finally:
        _, log = proxy.stop()
    assert "connection" in log


# -- keyutil exec ---------------------------------------------------------------------------

def keyutil_exec(s: Setup, kms: Kms, sealed_env: str, *args: str, **kw: Any) -> Any:
    """``keyutil exec --sealed-env SEALED_ENV --key env`` in the simulated enclave."""
    return run(
        KEYUTIL, "exec", "--sealed-env", sealed_env, "--key", "env", "--kms", kms.url,
        "--kms-pubkey", s.identity, "--nsm", "simulator", "--sim-dir", str(s.sim),
        "--log-format", "json", *args, **kw,
    )


APP = """
import hashlib, json, os, sys
names = sys.argv[1:]
print(json.dumps({
    "values": {n: os.environ.get(n) for n in names},
    "cmdline": open("/proc/self/cmdline", "rb").read().decode(errors="replace"),
    "parent_cmdline": open(f"/proc/{os.getppid()}/cmdline", "rb").read().decode(errors="replace"),
}))
"""


def test_exec_gives_the_app_its_secrets_and_nothing_else_sees_them(
    env: tuple[Setup, Kms], tmp_path: Path
) -> None:
    s, kms = env
    secret_pass, secret_token = os.urandom(12).hex(), os.urandom(12).hex()
    dotenv = (
        f"# the app's secrets\nDB_USER=app\nexport DB_PASS='{secret_pass}'\n"
        f'API_TOKEN="{secret_token}" # rotated monthly\n'
    ).encode()
    sealed = tmp_path / "secrets.env.age"
    run("age", "-r", recipient_of(s, kms, key="env"), "-o", str(sealed), input=dotenv,
        check=True)
    app = tmp_path / "app.py"
    app.write_text(APP)
    started = time.time()
    result = keyutil_exec(
        s, kms, str(sealed), "-v", "--", sys.executable, str(app), "DB_USER", "DB_PASS",
        "API_TOKEN",
    )
    assert result.returncode == 0, result.stderr.decode()
    seen = json.loads(result.stdout)
    assert seen["values"] == {"DB_USER": "app", "DB_PASS": secret_pass, "API_TOKEN": secret_token}
    secrets_ = [secret_pass.encode(), secret_token.encode()]
    for blob in (seen["cmdline"].encode(), seen["parent_cmdline"].encode(), result.stderr,
                 s.kms_log.read_bytes(), s.audit.read_bytes()):
        assert not any(x in blob for x in secrets_)
    # Every file written during the run, where a process here writes files.
    # Other jobs create and delete files there meanwhile: os.walk skips what vanishes.
    for root in (tmp_path, s.root, s.keys, Path("/dev/shm"), Path("/tmp")):
        for directory, _, names in os.walk(root, onerror=lambda _: None):
            for name in names:
                path = Path(directory) / name
                try:
                    info = path.lstat()
                    if (not stat.S_ISREG(info.st_mode) or info.st_mtime < started - 1
                            or info.st_size > 1 << 24):
                        continue
                    data = path.read_bytes()
                except OSError:
                    continue
                assert not any(x in data for x in secrets_), path


@pytest.mark.parametrize(
    ("dotenv", "line"),
    [
        (b"A=1\nB=2\nthis line has the secret hunter2\n", 3),
        (b"A=1\nB='hunter2\n", 2),
        (b"A=hunter2\nA=again\n", 2),
        (b'A="hunter2\\q"\n', 1),
    ],
)
def test_exec_refuses_a_malformed_dotenv_by_line_number(
    env: tuple[Setup, Kms], tmp_path: Path, dotenv: bytes, line: int
) -> None:
    s, kms = env
    sealed = tmp_path / "bad.env.age"
    run("age", "-r", recipient_of(s, kms, key="env"), "-o", str(sealed), input=dotenv,
        check=True)
    result = keyutil_exec(s, kms, str(sealed), "--", "true")
    assert result.returncode == 9
    (record,) = [json.loads(x) for x in result.stderr.splitlines() if b'"error"' in x]
    assert record["code"] == "dotenv_invalid" and record["line"] == line
    assert b"hunter2" not in result.stderr and result.stdout == b""


def test_exec_of_a_missing_command_exits_127(env: tuple[Setup, Kms], tmp_path: Path) -> None:
    s, kms = env
    sealed = tmp_path / "ok.env.age"
    run("age", "-r", recipient_of(s, kms, key="env"), "-o", str(sealed), input=b"A=1\n",
        check=True)
    result = keyutil_exec(s, kms, str(sealed), "--", str(tmp_path / "no-such-app"))
    assert result.returncode == 127 and b"exec_failed" in result.stderr


def test_recipient_and_exec_error_exits(env: tuple[Setup, Kms], tmp_path: Path) -> None:
    s, kms = env
    base = [KEYUTIL, "recipient", "--kms-pubkey", s.identity, "--log-format", "json"]
    unreachable = run(*base, "--kms", "http://127.0.0.1:1", "--app", "a", "--key", "k",
                      "--deadline", "2")
    assert unreachable.returncode == 3
    refused = run(*base, "--kms", kms.url, "--app", "a", "--key", "bad name")
    assert refused.returncode == 4 and codes(refused.stderr) == ["bad_request"]
    assert run(*base, "--kms", kms.url, "--app", "x" * 33, "--key", "k").returncode == 2
    bad_pin = run(KEYUTIL, "recipient", "--kms-pubkey", "ed25519:AAAA", "--kms", kms.url,
                  "--app", "a", "--key", "k")
    assert bad_pin.returncode == 2
    missing = keyutil_exec(s, kms, str(tmp_path / "none.age"), "--", "true")
    assert missing.returncode == 2 and codes(missing.stderr)[-1] == "source_missing"
    other = run("age", "-r", recipient_of(s, kms, key="not-env"), input=b"A=1\n").stdout
    wrong_key = keyutil_exec(s, kms, "-", "--", "true", input=other)
    assert wrong_key.returncode == 9 and codes(wrong_key.stderr)[-1] == "sealed_not_for_key"


def test_a_file_substituted_by_the_host_is_caught_by_the_pinned_digest(
    env: tuple[Setup, Kms], tmp_path: Path
) -> None:
    """The recipient is public: a host can seal weights of its own to it. age authenticates
    the file, not its author; the digest pinned in the image does."""
    import hashlib

    s, kms = env
    recipient = recipient_of(s, kms)
    genuine = seal_with_age(recipient, tmp_path)
    forged = tmp_path / "forged.age"
    run("age", "-r", recipient, "-o", str(forged), input=b"the host's weights", check=True)
    pin = hashlib.sha256(PLAINTEXT).hexdigest()
    out = s.keys / "weights.bin"
    common = ("--key", "weights", "--type", "age", "--unseal-to", str(out))
    unpinned = s.get_key(kms.url, *common, "--unseal", str(forged))
    assert unpinned.returncode == 0 and out.read_bytes() == b"the host's weights"
    out.unlink()
    caught = s.get_key(kms.url, *common, "--unseal", str(forged), "--expect-sha256", pin)
    assert caught.returncode == 9 and codes(caught.stderr)[-1] == "sealed_digest_mismatch"
    assert leftovers(s.keys) == []
    ok = s.get_key(kms.url, *common, "--unseal", str(genuine), "--expect-sha256", pin.upper())
    assert ok.returncode == 0 and out.read_bytes() == PLAINTEXT
    out.unlink()
    bad = s.get_key(kms.url, *common, "--unseal", str(genuine), "--expect-sha256", "abc")
    assert bad.returncode == 2 and leftovers(s.keys) == []
    # exec and unseal take the same pin.
    env_file = tmp_path / "env.age"
    run("age", "-r", recipient_of(s, kms, key="env"), "-o", str(env_file), input=b"A=1\n",
        check=True)
    wrong = keyutil_exec(s, kms, str(env_file), "--expect-sha256", pin, "--", "true")
    assert wrong.returncode == 9 and codes(wrong.stderr)[-1] == "sealed_digest_mismatch"
    right = keyutil_exec(
        s, kms, str(env_file), "--expect-sha256", hashlib.sha256(b"A=1\n").hexdigest(), "--", "true"
    )
    assert right.returncode == 0, right.stderr
