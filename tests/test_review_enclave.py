"""The enclave side, reviewed as an attacker and as an integrator: paths where an error exit
was read as success, a host that sends hostile settings, a stop signal that arrives while the
app is being started. Each test failed before its fix."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from e2e_support import LoopbackServer
from plumbing_support import sockdir

from keyutil import keytypes
from keyutil.enclave.config import parse_config
from keyutil.enclave.supervisor import Supervisor

__all__ = ["sockdir"]

KEYS = """
[supervisor]
log_format = "json"
[kms]
urls = ["vsock://3:8000"]
pubkey = "@/etc/keyutil/kms.pub"
deadline = 30
[[keys]]
names = ["app"]
dir = "{d}/keys"
[app]
command = ["{d}/app.sh", "{d}/started"]
"""


@pytest.fixture(autouse=True)
def restore_signals() -> Iterator[None]:
    kinds = (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD)
    saved = {s: signal.getsignal(s) for s in kinds}
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)


@pytest.fixture
def stock_recursion_limit() -> Iterator[None]:
    """The limit keyutil runs with (importing py_ecc raises it for the test process)."""
    old = sys.getrecursionlimit()
    sys.setrecursionlimit(1000)
    yield
    sys.setrecursionlimit(old)


def _supervisor(text: str, d: Path, **kw: Any) -> tuple[Supervisor, list[str]]:
    lines: list[str] = []
    sup = Supervisor(
        parse_config(text.replace("{d}", str(d))),
        net_up=lambda: {"interface": "lo"},
        mount=lambda path, size: None,
        volatile=lambda path: True,
        features=lambda: (True, True),
        **kw,
    )
    sup.line = lines.append  # type: ignore[method-assign]
    return sup, lines


def _events(lines: list[str]) -> list[dict[str, Any]]:
    return [json.loads(x) for x in lines if x.startswith("{")]


def _app(d: Path, body: str = 'echo started > "$1"') -> None:
    app = d / "app.sh"
    app.write_text(f"#!/bin/sh\n{body}\n")
    app.chmod(0o755)


def test_a_refused_get_key_stops_the_boot_even_when_sigchld_was_ignored(tmp_path: Path) -> None:
    """An ignored SIGCHLD survives exec: the kernel then reaps children itself, and
    Popen.wait reads every exit status as 0. A get-key refused with 4 looked released and
    the app started without its keys."""
    _app(tmp_path)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    sup, lines = _supervisor(KEYS, tmp_path, keyutil=["sh", "-c", "exit 4", "get-key"])
    assert sup.run() == 4
    assert not (tmp_path / "started").exists()
    (failed,) = [e for e in _events(lines) if e["event"] == "step_failed"]
    assert (failed["step"], failed["exit"]) == ("keys", 4)


def test_the_apps_failure_is_its_status_even_when_sigchld_was_ignored(tmp_path: Path) -> None:
    """Under an inherited SIG_IGN, waitpid found no child and the app's exit 3 became 0."""
    _app(tmp_path, "exit 3")
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    sup, _ = _supervisor(KEYS, tmp_path, keyutil=["true"])
    assert sup.run() == 3


SETTINGS = """
[supervisor]
log_format = "json"
[host_settings]
from = "unix://{d}/settings.sock"
allow = ["LOG_LEVEL"]
[app]
command = ["{d}/app.sh", "{d}/started"]
"""


@pytest.mark.parametrize(
    "body",
    [
        b"[" * 60_000,
        b'{"LOG_LEVEL": ' + b"[" * 30_000,
        b'{"LOG_LEVEL": "\\ud800"}',
        b'{"LOG_LEVEL": "\\udc80"}',
    ],
)
def test_hostile_host_settings_are_refused_and_the_boot_goes_on(
    sockdir: Path, body: bytes, stock_recursion_limit: None
) -> None:
    """Deep nesting made json.loads raise RecursionError (not a ValueError): a traceback,
    and PID 1 died before the app. A lone surrogate cannot go into an environment."""
    _app(sockdir)
    server = LoopbackServer(lambda conn: conn.sendall(body), unix=sockdir / "settings.sock")
    try:
        sup, lines = _supervisor(SETTINGS, sockdir, environ={})
        assert sup.run() == 0
    finally:
        server.close()
    assert (sockdir / "started").exists()
    assert sup.settings == {}
    assert {e["event"] for e in _events(lines)} & {
        "host_settings_invalid", "host_setting_refused"
    }


def test_a_sigterm_while_the_app_is_being_started_reaches_the_app(tmp_path: Path) -> None:
    """The signal came after the last between-steps check and before ``self.app`` was set:
    it was recorded for a boot that was over, and the app ran on as if never asked to stop."""
    import time

    _app(tmp_path, "exec sleep 20")
    sup, _ = _supervisor('[app]\ncommand = ["{d}/app.sh"]\n', tmp_path)
    start_app = sup.step_app

    def step_app() -> None:
        signal.raise_signal(signal.SIGTERM)
        start_app()

    sup.step_app = step_app  # type: ignore[method-assign]
    started = time.monotonic()
    assert sup.run() == 128 + signal.SIGTERM
    assert time.monotonic() - started < 15


SEED = bytes(range(32))
TMPFS = Path(os.environ.get("KEYUTIL_TEST_TMPFS", "/dev/shm"))


@pytest.fixture
def shm(tmp_path: Path) -> Iterator[Path]:
    directory = TMPFS / f"review-enclave-{os.getpid()}-{tmp_path.name}"
    directory.mkdir()
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


def test_a_stopped_unseal_leaves_no_partial_plaintext(tmp_path: Path, shm: Path) -> None:
    """SIGTERM (what keyutil run passes to a get-key --unseal in progress) ended the
    process without unwinding: the temporary file holding the chunks opened so far stayed
    beside the destination."""
    import time

    from keyutil.sealing.age import Identity, seal

    identity = tmp_path / "id.key"
    identity.write_bytes(keytypes.get("age").private_file(SEED, "age"))
    sealed = io.BytesIO()
    seal(io.BytesIO(b"w" * (4 << 20)), sealed, [Identity(SEED).recipient])
    keyutil = Path(sys.executable).parent / "keyutil"
    with subprocess.Popen(
        [str(keyutil), "unseal", "--identity", str(identity), "-", str(shm / "weights")],
        stdin=subprocess.PIPE, stderr=subprocess.PIPE,
    ) as child:
        assert child.stdin is not None
        child.stdin.write(sealed.getvalue()[: 1 << 20])  # some chunks, then the input stalls
        child.stdin.flush()
        end = time.monotonic() + 20
        while not any(p.stat().st_size for p in shm.iterdir()) and time.monotonic() < end:
            time.sleep(0.05)
        assert list(shm.iterdir()), "the temporary file never appeared"
        child.terminate()
        assert child.wait(20) == 128 + signal.SIGTERM
    assert list(shm.iterdir()) == []


@pytest.mark.parametrize(
    "name",
    ["LD_PRELOAD", "LD_LIBRARY_PATH", "PATH", "PYTHONPATH", "PYTHONSTARTUP", "NODE_OPTIONS",
     "BASH_ENV", "JAVA_TOOL_OPTIONS", "PERL5OPT", "RUBYOPT", "GCONV_PATH", "ld_preload"],
)
def test_the_image_cannot_let_the_host_choose_the_code_the_app_loads(name: str) -> None:
    """An allow list naming LD_PRELOAD or PYTHONPATH handed the host the choice of the code
    that runs with the released keys: refused when the image is built, like KEYUTIL_*."""
    from keyutil.enclave.config import ConfigError

    text = f'[host_settings]\nfrom = "vsock://3:9001"\nallow = ["LOG_LEVEL", "{name}"]\n'
    with pytest.raises(ConfigError, match=f"{name}.*code"):
        parse_config(text + '[app]\ncommand = ["/app"]\n')
    assert parse_config(text.replace(f', "{name}"', "") + '[app]\ncommand = ["/app"]\n')


SEALED = """
[supervisor]
log_format = "json"
[kms]
urls = ["vsock://3:8000"]
pubkey = "@/etc/keyutil/kms.pub"
[[sealed]]
key = "env"
source = "{d}/secrets.env.age"
format = "dotenv"
expect_sha256 = "{digest}"
[[sealed]]
key = "weights"
source = "{d}/weights.age"
dest = "{d}/out/weights.bin"
expect_sha256 = "{digest}"
[app]
command = ["{d}/app.sh", "{d}/started"]
"""


@pytest.mark.parametrize("substituted", [False, True])
def test_sealed_inputs_of_keyutil_run_can_be_pinned_to_their_plaintext(
    tmp_path: Path, substituted: bool
) -> None:
    """The recipient is public: whoever can put a file where the enclave fetches it (the
    operator's own bucket) seals a dotenv of their own (LD_PRELOAD=...) to it and it opens.
    get-key, unseal and exec take --expect-sha256; [[sealed]] had no way to pin it."""
    import hashlib

    from keyutil.sealing.age import Identity, seal

    _app(tmp_path)
    author = b"API_TOKEN=t0k3n\n"
    served = b"LD_PRELOAD=/tmp/x.so\n" if substituted else author
    sealed = io.BytesIO()
    seal(io.BytesIO(served), sealed, [Identity(SEED).recipient])
    (tmp_path / "secrets.env.age").write_bytes(sealed.getvalue())
    digest = hashlib.sha256(author).hexdigest()
    calls: list[list[str]] = []

    def get_key(argv: Any, line: Any) -> int:
        calls.append(list(argv))
        return 0

    sup, lines = _supervisor(SEALED.replace("{digest}", digest), tmp_path, run=get_key,
                             keyutil=["keyutil"])
    sup._release_age_identity = lambda name: Identity(SEED)  # type: ignore[method-assign]
    if substituted:
        assert sup.run() == 9
        assert not (tmp_path / "started").exists()
        (failed,) = [e for e in _events(lines) if e["event"] == "step_failed"]
        assert "sealed_digest_mismatch" in failed["message"]
        assert calls == []
        return
    assert sup.run() == 0
    assert sup.sealed_env == {"API_TOKEN": "t0k3n"}
    (call,) = calls
    assert call[call.index("--expect-sha256") + 1] == digest


def test_a_malformed_pin_is_a_config_error() -> None:
    from keyutil.enclave.config import ConfigError

    text = SEALED.replace("{d}", "/srv").replace("{digest}", "abc")
    with pytest.raises(ConfigError, match=r"sealed\[0\].expect_sha256: expected a SHA-256"):
        parse_config(text)


def test_a_sigterm_just_before_get_key_starts_stops_it_at_once(tmp_path: Path) -> None:
    """The signal came after the between-steps check and before the get-key was known to
    the handler: the get-key ran to its deadline (here a 20 s sleep) before the boot
    stopped."""
    import time

    _app(tmp_path)

    def features() -> tuple[bool, bool]:  # called as the keys step begins
        signal.raise_signal(signal.SIGTERM)
        return True, True

    sup, _ = _supervisor(KEYS, tmp_path, keyutil=["sh", "-c", "exec sleep 20", "get-key"])
    sup.features = features
    started = time.monotonic()
    assert sup.run() == 128 + signal.SIGTERM
    assert time.monotonic() - started < 10
    assert not (tmp_path / "started").exists()


def test_a_bad_kms_ca_for_a_sealed_dotenv_is_a_usage_error_of_the_step(tmp_path: Path) -> None:
    """The in-process release of a dotenv's identity let the CA file's OSError through:
    PID 1 died with "internal error", no step_failed, the log bridge never flushed."""
    _app(tmp_path)
    text = SEALED.split("[[sealed]]\nkey = \"weights\"")[0] + '[app]\ncommand = ["/app"]\n'
    text = text.replace('urls = ["vsock://3:8000"]', 'urls = ["https://127.0.0.1:1"]')
    text = text.replace('"@/etc/keyutil/kms.pub"', f'"ed25519:{"A" * 43}="\nca = "{{d}}/no-ca.pem"')
    sup, lines = _supervisor(text.replace("{digest}", "0" * 64), tmp_path)
    assert sup.run() == 2
    (failed,) = [e for e in _events(lines) if e["event"] == "step_failed"]
    assert failed["step"] == "sealed"
    assert "no-ca.pem" in failed["message"]


def test_an_unexpected_error_in_a_step_is_still_a_logged_step_failure(tmp_path: Path) -> None:
    """Anything a step did not expect ended PID 1 without step_failed or app_not_started,
    and without giving the log bridge its flush time: the host never learnt why."""
    _app(tmp_path)

    def mount(path: str, size: str) -> None:
        raise RuntimeError("the kernel said something new")

    text = '[supervisor]\nlog_format = "json"\n[tmpfs]\npaths = ["{d}/keys"]\n'
    text += '[app]\ncommand = ["{d}/app.sh", "{d}/started"]\n'
    sup, lines = _supervisor(text, tmp_path)
    sup.volatile = lambda path: False
    sup.mount = mount
    assert sup.run() == 1
    assert not (tmp_path / "started").exists()
    events = _events(lines)
    (failed,) = [e for e in events if e["event"] == "step_failed"]
    assert (failed["step"], failed["exit"]) == ("tmpfs", 1)
    assert "RuntimeError" in failed["message"]
    assert [e["step"] for e in events if e["event"] == "app_not_started"] == ["tmpfs"]
