"""`keyutil run`'s configuration (strict TOML) and the supervisor's decisions, in process:
the key-release arguments and failover, expect_app, host-supplied settings, the app's
environment. The real namespaces and processes are in test_run.py."""

from __future__ import annotations

import json
import signal
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from e2e_support import LoopbackServer
from plumbing_support import sockdir

from keyutil.enclave.config import ConfigError, load_config, parse_config
from keyutil.enclave.supervisor import StepFailed, Supervisor
from keyutil.proxy import EnclaveDest, HostPort, UnixDest, VsockDest

__all__ = ["sockdir"]

EXAMPLE = Path(__file__).parent.parent / "examples" / "enclave" / "run.toml"

APP = '[app]\ncommand = ["/app"]\n'


def test_the_example_image_config_parses() -> None:
    config = load_config(EXAMPLE)
    assert config.app.command
    assert config.kms is not None and config.kms.urls
    assert [str(f.to) for f in config.forwards]
    assert isinstance(config.log.to, VsockDest) and config.log.to.cid == 3


def test_a_full_config() -> None:
    config = parse_config(
        """
[supervisor]
log_format = "json"
[tmpfs]
paths = ["/run/keys/"]
size = "4m"
[kms]
urls = ["vsock://3:8000", "vsock://3:8001"]
pubkey = "@/etc/keyutil/kms.pub"
deadline = 30
[[keys]]
names = ["app", "db"]
dir = "/run/keys"
expect_app = "my-app"
[[forward]]
listen = "vsock://:5001"
to = "tcp://127.0.0.1:4000"
[[forward]]
listen = "tcp://127.0.0.1:8443"
to = "vsock://3:8443"
[log]
to = "vsock://3:9000"
buffer_lines = 500
[host_settings]
from = "vsock://3:9001"
allow = ["LOG_LEVEL"]
[app]
command = ["/usr/bin/app", "--port", "4000"]
workdir = "/srv/app"
env = { MODE = "prod" }
"""
    )
    assert config.tmpfs.paths == ("/run/keys",)
    assert config.kms is not None and config.kms.urls == ("vsock://3:8000", "vsock://3:8001")
    assert config.keys[0].expect_app == "my-app"
    assert [f.to for f in config.forwards] == [HostPort("127.0.0.1", 4000), VsockDest(3, 8443)]
    assert config.log.buffer_lines == 500
    assert config.host_settings is not None and config.host_settings.allow == ("LOG_LEVEL",)
    assert config.app.env == {"MODE": "prod"}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "app: required"),
        ("[app]\ncomand = ['/x']\n", "app.command: required"),
        (APP + "[app2]\n", "unknown key 'app2'"),
        ('[app]\ncommand = ["/app"]\ncwd = "/"\n', "app: unknown key 'cwd'"),
        ("[app]\ncommand = []\n", "app.command: expected the program"),
        ('[app]\ncommand = "/app"\n', "app.command: expected list; found str"),
        ('[app]\ncommand = ["/app"]\nworkdir = "srv"\n', "expected an absolute path"),
        ('[app]\ncommand = ["/app"]\nenv = { "A-B" = "x" }\n', "not an environment name"),
        ('[app]\ncommand = ["/app"]\nenv = { A = 1 }\n', "app.env.A: expected str"),
        (APP + "[network]\nloopback = 1\n", "network.loopback: expected bool"),
        (APP + '[tmpfs]\npaths = ["run"]\n', "tmpfs.paths: expected absolute"),
        (APP + '[tmpfs]\nsize = "lots"\n', "tmpfs.size"),
        (APP + '[[keys]]\nnames = ["a"]\ndir = "/k"\n', "needs a [kms] table"),
        (APP + '[kms]\nurls = []\npubkey = "x"\n', "at least one KMS"),
        (APP + '[kms]\nurls = ["vsock://3:1"]\n', "kms.pubkey: required"),
        (APP + '[kms]\nurls = ["u"]\npubkey="x"\n[[keys]]\nnames = ["a", "a"]\ndir = "/k"\n',
         "distinct key names"),
        (APP + '[kms]\nurls = ["u"]\npubkey="x"\n[[keys]]\nnames = ["../a"]\ndir = "/k"\n',
         "is not a key name"),
        (APP + '[kms]\nurls = ["u"]\npubkey="x"\n[[keys]]\nnames = ["a"]\ndir = "/k"\n'
         '[[keys]]\nnames = ["a"]\ndir = "/k/"\n', "written by two key sets"),
        (APP + '[[keys]]\nnames = ["a"]\n', "keys[0].dir: required"),
        (APP + '[kms]\nurls = ["u"]\npubkey="x"\n'
         '[[sealed]]\nkey = "w"\nsource = "/a"\ndest = "/b"\nformat = "zip"\n',
         "expected file or dotenv"),
        (APP + '[[sealed]]\nkey = "w"\nsource = "/a"\ndest = "/b"\n', "needs a [kms] table"),
        (APP + '[kms]\nurls = ["u"]\npubkey="x"\n[[sealed]]\nkey = "w"\nsource = "/a"\n',
         "a file needs dest"),
        (APP + '[kms]\nurls = ["u"]\npubkey="x"\n'
         '[[sealed]]\nkey = "w"\nsource = "/a"\nformat = "dotenv"\ndest = "/b"\n',
         "takes none"),
        (APP + '[kms]\nurls = ["u"]\npubkey="x"\n[[sealed]]\nkey = "w"\nsource = "http://x/a"\n'
         'dest = "/b"\n', "an absolute path or an https:// URL"),
        (APP + '[kms]\nurls = ["u"]\npubkey="x"\n[[sealed]]\nkey = "w"\nsource = "/a"\n'
         'dest = "/b"\nvia = "vsock://enclave:x:1"\n', "host-side address"),
        (APP + '[kms]\nurls = ["u"]\npubkey="x"\n[[sealed]]\nkey = "../w"\nsource = "/a"\n'
         'dest = "/b"\n', "is not a key name"),
        (APP + '[[forward]]\nlisten = "vsock://:1"\nto = "vsock://enclave:x:1"\n',
         "an enclave name is a host-side address"),
        (APP + '[[forward]]\nlisten = "udp://:1"\nto = "vsock://3:1"\n', "forward[0].listen"),
        (APP + '[log]\nto = "tcp://10.0.0.1:9000"\n', "not TCP"),
        (APP + '[host_settings]\nfrom = "vsock://3:1"\nallow = ["KEYUTIL_KMS"]\n',
         "never come from the host"),
        ('[app]\ncommand = ["/a"]\nenv = { MODE = "x" }\n'
         '[host_settings]\nfrom = "vsock://3:1"\nallow = ["MODE"]\n', "the image's value wins"),
        ("[app\n", "not valid TOML"),
    ],
)
def test_config_errors_name_where(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")):
        parse_config(text)


def test_config_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.toml")
    (tmp_path / "bin.toml").write_bytes(b"\xff\xfe")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(tmp_path / "bin.toml")


# -- the supervisor's decisions, with its actions injected ---------------------------------


@pytest.fixture(autouse=True)
def restore_signals() -> Iterator[None]:
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)


class Recorder:
    def __init__(self, codes: Sequence[int] = (0,)) -> None:
        self.codes = list(codes)
        self.calls: list[list[str]] = []

    def __call__(self, argv: Sequence[str], line: Callable[[str], None]) -> int:
        self.calls.append(list(argv))
        line('{"event": "from get-key"}')
        return self.codes.pop(0)


def supervisor(text: str, tmp_path: Path, *, features: tuple[bool, bool] = (False, False),
               run: Recorder | None = None, **kw: Any) -> tuple[Supervisor, list[str]]:
    lines: list[str] = []
    config = parse_config(text.replace("{d}", str(tmp_path)))
    sup = Supervisor(
        config,
        net_up=lambda: {"interface": "lo"},
        mount=lambda path, size: None,
        volatile=lambda path: True,
        run=run or Recorder(),
        keyutil=["keyutil"],
        features=lambda: features,
        **kw,
    )
    sup.line = lines.append  # type: ignore[method-assign]
    return sup, lines


KEYS = """
[supervisor]
log_format = "json"
[kms]
urls = ["vsock://3:8000", "vsock://3:8001", "vsock://3:8002"]
pubkey = "@/etc/keyutil/kms.pub"
deadline = 30
[[keys]]
names = ["app"]
dir = "{d}/keys"
length = 48
[app]
command = ["/nonexistent/app"]
"""


def _failed(lines: list[str]) -> dict[str, Any]:
    (failed,) = [json.loads(x) for x in lines if '"step_failed"' in x]
    return failed  # type: ignore[no-any-return]


def test_failover_tries_the_next_kms_on_unreachable_only(tmp_path: Path) -> None:
    run = Recorder([3, 0])
    sup, lines = supervisor(KEYS, tmp_path, run=run)
    assert sup.run() == 10  # keys released, then the app cannot start
    assert [c[c.index("--kms") + 1] for c in run.calls] == ["vsock://3:8000", "vsock://3:8001"]
    first = run.calls[0]
    assert first[:2] == ["keyutil", "get-key"]
    assert first[first.index("--kms-pubkey") + 1] == "@/etc/keyutil/kms.pub"
    assert first[first.index("--length") + 1] == "48"
    assert first[first.index("--out-dir") + 1] == f"{tmp_path}/keys"
    assert float(first[first.index("--deadline") + 1]) <= 10  # a third of the 30 s
    assert "--expect-app" not in first
    assert any("kms_failover" in x for x in lines)
    assert '{"event": "from get-key"}' in lines
    assert _failed(lines)["step"] == "app"


def test_a_denial_is_not_failed_over(tmp_path: Path) -> None:
    run = Recorder([4])
    sup, lines = supervisor(KEYS, tmp_path, run=run)
    assert sup.run() == 4
    assert len(run.calls) == 1
    assert _failed(lines) == {**_failed(lines), "step": "keys", "exit": 4}


def test_a_client_that_fails_over_itself_gets_every_kms_once(tmp_path: Path) -> None:
    run = Recorder([3])
    sup, _ = supervisor(KEYS, tmp_path, run=run, features=(True, True))
    assert sup.run() == 3
    (call,) = run.calls
    assert [call[i + 1] for i, a in enumerate(call) if a == "--kms"] == [
        "vsock://3:8000", "vsock://3:8001", "vsock://3:8002"
    ]


def test_expect_app_is_passed_when_get_key_has_it_and_refused_when_not(tmp_path: Path) -> None:
    text = KEYS.replace("length = 48", 'length = 48\nexpect_app = "my-app"')
    run = Recorder([0])
    sup, _ = supervisor(text, tmp_path, run=run, features=(False, True))
    sup.run()
    assert run.calls[0][run.calls[0].index("--expect-app") + 1] == "my-app"
    run = Recorder([0])
    sup, lines = supervisor(text, tmp_path, run=run, features=(False, False))
    assert sup.run() == 2
    assert run.calls == []
    assert "no --expect-app" in _failed(lines)["message"]


SETTINGS = """
[supervisor]
log_format = "json"
[host_settings]
from = "unix://{d}/settings.sock"
allow = ["LOG_LEVEL", "REGION"]
timeout = 2
[app]
command = ["/nonexistent/app"]
env = { MODE = "image" }
"""


def serve_settings(path: Path, body: bytes) -> LoopbackServer:
    return LoopbackServer(lambda conn: conn.sendall(body), unix=path)


def test_host_settings_only_for_allowed_names_each_logged(sockdir: Path) -> None:
    offered = {
        "LOG_LEVEL": "debug",
        "REGION": "\x1b[2Jeu-west-1",
        "MODE": "host",
        "KEYUTIL_KMS": "vsock://3:6666",
        "LD_PRELOAD": "/tmp/evil.so",
        "BIG": "x",
    }
    offered["REGION"] = "eu-west-1"
    server = serve_settings(sockdir / "settings.sock", json.dumps(offered).encode())
    try:
        sup, lines = supervisor(SETTINGS, sockdir, environ={"PATH": "/bin", "KEYUTIL_NSM": "x"})
        assert sup.run() == 10
    finally:
        server.close()
    env = sup.app_environment()
    assert env == {"PATH": "/bin", "LOG_LEVEL": "debug", "REGION": "eu-west-1", "MODE": "image"}
    logged = [json.loads(x) for x in lines if x.startswith("{")]
    accepted = {e["name"]: e["value"] for e in logged if e["event"] == "host_setting"}
    refused = {e["name"] for e in logged if e["event"] == "host_setting_refused"}
    assert accepted == {"LOG_LEVEL": "debug", "REGION": "eu-west-1"}
    assert refused == {"MODE", "KEYUTIL_KMS", "LD_PRELOAD", "BIG"}


@pytest.mark.parametrize(
    ("body", "event"),
    [
        (b"not json", "host_settings_invalid"),
        (b'["LOG_LEVEL"]', "host_settings_invalid"),
        (b"x" * (70 * 1024), "host_settings_invalid"),
        (None, "host_settings_absent"),
    ],
)
def test_host_settings_that_are_absent_or_garbage_change_nothing(
    sockdir: Path, body: bytes | None, event: str
) -> None:
    server = serve_settings(sockdir / "settings.sock", body) if body is not None else None
    try:
        sup, lines = supervisor(SETTINGS, sockdir, environ={})
        assert sup.run() == 10  # boot goes on: the settings are optional
    finally:
        if server is not None:
            server.close()
    assert sup.settings == {}
    assert any(f'"event": "{event}"' in x for x in lines)


def test_a_non_string_setting_is_refused(sockdir: Path) -> None:
    server = serve_settings(sockdir / "settings.sock", b'{"LOG_LEVEL": 3}')
    try:
        sup, lines = supervisor(SETTINGS, sockdir, environ={})
        sup.run()
    finally:
        server.close()
    assert sup.settings == {}
    assert any("not a short string" in x for x in lines)


def test_sigterm_during_boot_stops_before_the_app(tmp_path: Path) -> None:
    sup, lines = supervisor(KEYS, tmp_path)

    def net_up() -> dict[str, str]:
        signal.raise_signal(signal.SIGTERM)
        return {"interface": "lo"}

    sup._net_up = net_up
    assert sup.run() == 128 + signal.SIGTERM
    failed = _failed(lines)
    assert failed["step"] == "tmpfs" and "stopped by SIGTERM" in failed["message"]


def test_step_failed_carries_step_and_code() -> None:
    e = StepFailed("tmpfs", 7, "why")
    assert (e.step, e.code, e.message) == ("tmpfs", 7, "why")


def test_destinations_for_the_enclave_side() -> None:
    config = parse_config(APP + '[log]\nto = "unix:///run/log.sock"\n')
    assert config.log.to == UnixDest("/run/log.sock")
    assert not isinstance(config.log.to, EnclaveDest)


def test_sigterm_during_get_key_stops_it_at_once(tmp_path: Path) -> None:
    """A get-key waiting for its 60 s deadline (here: a command that sleeps) gets the
    SIGTERM too, and the boot ends with 128+15 right away."""
    import os
    import threading
    import time

    lines: list[str] = []
    config = parse_config(KEYS.replace("{d}", str(tmp_path)))
    sup = Supervisor(
        config,
        net_up=lambda: {"interface": "lo"},
        mount=lambda path, size: None,
        volatile=lambda path: True,
        keyutil=["sh", "-c", "exec sleep 30", "stand-in"],
        features=lambda: (False, False),
    )
    sup.line = lines.append  # type: ignore[method-assign]
    threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGTERM)).start()
    started = time.monotonic()
    assert sup.run() == 128 + signal.SIGTERM
    assert time.monotonic() - started < 10
    failed = _failed(lines)
    assert failed["step"] == "keys"
    assert failed["message"] == "stopped by SIGTERM during app"
