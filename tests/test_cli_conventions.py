"""What the three commands (keyutil, mock-kms, kms-gov) promise alike (issue 14, items 9-11,
13, 14, 17): no traceback on any failure path, one set of exit codes, Ctrl-C exits 130,
every option an environment variable shown in --help and listed in the README, unknown
variables warned about, --version.

Failure paths run the installed console scripts in subprocesses, as a user would."""

from __future__ import annotations

import importlib.metadata
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from keyutil import cliutil
from keyutil.cli import cli as keyutil_cli
from mock_kms import gov
from mock_kms.cli import cli as kms_cli

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
KEYUTIL, MOCK_KMS, KMS_GOV = (str(BIN / n) for n in ("keyutil", "mock-kms", "kms-gov"))
README = (ROOT / "README.md").read_text()
ADDRESS = "0x" + "12" * 20
IMAGE = "0x" + "ab" * 32


def clean_env(**extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("KEYUTIL_", "MOCK_KMS_", "KMS_GOV_"))
    }
    return {**env, **extra}


def run(*argv: str, timeout: float = 60, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv, capture_output=True, text=True, timeout=timeout, env=clean_env(**env)
    )


@pytest.fixture(scope="module")
def busy_port() -> Iterator[int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


@pytest.fixture(scope="module")
def sim_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("conventions") / "sim"
    subprocess.run([KEYUTIL, "sim", "init", str(path)], check=True, capture_output=True)
    return path


class SilentServer:
    """Accepts TCP connections and never answers: a hung KMS or RPC node."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.connected = threading.Event()
        self.held: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.held.append(conn)
            self.connected.set()

    def close(self) -> None:
        self.sock.close()
        for conn in self.held:
            conn.close()


class PlainHttpServer:
    """Answers every connection with a plain HTTP 400, as a KMS without TLS does."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.recv(4096)
                conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")

    def close(self) -> None:
        self.sock.close()


# -- Item 9 and 10: every failure path, one line, a documented exit code, no traceback --------


def failure_cases(tmp: Path, busy_port: int) -> list[tuple[list[str], int, str]]:
    bad_pem = tmp / "bad.pem"
    bad_pem.write_text("not a certificate")
    doc = tmp / "doc.txt"
    doc.write_text("00")
    sim = tmp / "sim"
    subprocess.run([KEYUTIL, "sim", "init", str(sim)], check=True, capture_output=True)
    key = sim / "ca" / "zonal.key.pem"
    key.unlink()
    key.mkdir()  # unreadable as a file, even for root
    state = ["--state-dir", str(tmp / "state")]
    plain = ["--insecure-skip-kms-auth", "--nsm", "simulator", "--sim-dir", str(sim)]
    return [
        # keyutil
        ([KEYUTIL, "health", "--kms", "127.0.0.1:8420"], 2, "did you mean http://127.0.0.1"),
        ([KEYUTIL, "health", "--kms", "ftp://x"], 2, "found the scheme 'ftp'"),
        ([KEYUTIL, "health", "--kms", "http://127.0.0.1"], 2, "expected host:port"),
        ([KEYUTIL, "get-key", "--kms", "http://127.0.0.1:1", *plain, "--out",
          str(tmp / "f"), "--key", "a", "--key", "b"], 2, "--out writes one key"),
        ([KEYUTIL, "sim", "init", str(tmp / "s1"), "--module-id", "m" * 65], 2,
         "expected 1 to 64 printable characters"),
        ([KEYUTIL, "sim", "init", str(tmp / "s2"), "--module-id", ""], 2, "found 0"),
        ([KEYUTIL, "attest", "--nsm", "simulator", "--sim-dir", str(sim)], 5,
         f"cannot read {key}: Is a directory"),
        ([KEYUTIL, "attest", "--nsm", "simulator", "--sim-dir", str(tmp / "none")], 5,
         "keyutil sim init"),
        ([KEYUTIL, "proxy", "--listen", "bogus", "--to", "127.0.0.1:1"], 2,
         "Invalid value for --listen"),
        ([KEYUTIL, "no-such-command"], 2, "No such command"),
        # mock-kms
        ([MOCK_KMS, "identity", "--state-dir", "/dev/null/state"], 1,
         "/dev/null/state"),  # the path named, in one line
        ([MOCK_KMS, "serve", *state, "--port", str(busy_port)], 3,
         "Address already in use; another process listens there"),
        ([MOCK_KMS, "serve", *state, "--host", "bad..host"], 2, "Invalid value for --host"),
        ([MOCK_KMS, "serve", *state, "--unix-socket", str(tmp / "no" / "kms.sock")], 3,
         "its directory does not exist"),
        ([MOCK_KMS, "serve", *state, "--allow-image", "0x1234=a"], 2,
         "Invalid value for --allow-image"),
        ([MOCK_KMS, "serve", *state, "--rpc-url", "http://127.0.0.1:1", "--contract",
          "0x1234", "--chain-id", "1"], 2, "Invalid value for --contract"),
        ([MOCK_KMS, "serve", *state, "--rpc-url", "127.0.0.1:8545", "--contract", ADDRESS,
          "--chain-id", "1"], 2, "Invalid value for --rpc-url"),
        ([MOCK_KMS, "verify-attestation", str(doc), "--at", "1e23"], 2,
         "expected a time between the years 1970 and 9999"),
        ([MOCK_KMS, "verify-attestation", str(doc), "--at", "1" * 24], 2,
         "expected a time between"),
        ([MOCK_KMS, "verify-attestation", str(doc), "--root", str(bad_pem)], 2,
         "Invalid value for --root"),
        ([MOCK_KMS, "verify-attestation", str(tmp / "missing")], 2, "No such file or directory"),
        # kms-gov
        ([KMS_GOV, "add-image", "--measurements", str(tmp / "none.json"), "--app", "a"], 2,
         "No such file or directory"),
        ([KMS_GOV, "check", "0x1234", "--rpc-url", "http://127.0.0.1:1", "--contract",
          ADDRESS], 2, "64 hex digits"),
        ([KMS_GOV, "check", IMAGE, "--rpc-url", "http://127.0.0.1:1", "--contract", ADDRESS,
          "--timeout", "1"], 3, "kms-gov: error"),
    ]


def test_failure_paths_say_what_is_wrong_without_a_traceback(
    tmp_path: Path, busy_port: int
) -> None:
    failures = []
    for argv, code, text in failure_cases(tmp_path, busy_port):
        done = run(*argv)
        output = done.stdout + done.stderr
        name = " ".join(Path(argv[0]).name if i == 0 else a for i, a in enumerate(argv[:3]))
        if done.returncode != code or text not in output or "Traceback" in output:
            failures.append(f"{name}: exit {done.returncode} (expected {code}):\n{output}")
    assert not failures, "\n\n".join(failures)


def test_serve_binds_before_it_starts_anything(tmp_path: Path, busy_port: int) -> None:
    """A port in use is told before the state is read or the chain starts."""
    state = tmp_path / "state"
    started = time.monotonic()
    done = run(MOCK_KMS, "serve", "--state-dir", str(state), "--port", str(busy_port))
    assert done.returncode == 3, done.stderr
    assert not state.exists()  # the state directory would have been created first
    assert done.stderr.count("\n") == 1  # one line
    assert time.monotonic() - started < 30


def test_https_against_a_plain_http_kms_fails_at_once_with_a_tls_error(sim_dir: Path) -> None:
    server = PlainHttpServer()
    try:
        started = time.monotonic()
        done = run(
            KEYUTIL, "get-key", "--kms", f"https://127.0.0.1:{server.port}",
            "--insecure-skip-kms-auth", "--nsm", "simulator", "--sim-dir", str(sim_dir),
            "--stdout", "--format", "hex", "--deadline", "60",
        )
        elapsed = time.monotonic() - started
    finally:
        server.close()
    assert done.returncode == 3, done.stderr
    assert 'code="tls_failed"' in done.stderr
    assert "is this KMS served over plain http?" in done.stderr
    assert "retry_in_s" not in done.stderr  # not retried
    assert elapsed < 20  # a timeout would take the whole 60 s deadline


def test_https_defaults_to_port_443() -> None:
    from keyutil.transport import parse_url

    assert parse_url("https://kms.example.com").address == ("kms.example.com", 443)
    assert parse_url("https://kms.example.com:8443").address == ("kms.example.com", 8443)


# -- Ctrl-C: exit 130, no traceback, in every command -------------------------------------


def interrupt_when_connected(argv: list[str], server: SilentServer) -> tuple[int, str]:
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=clean_env()
    )
    try:
        assert server.connected.wait(60), "the command never connected"
        time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, out + err


def test_ctrl_c_on_kms_gov_waiting_for_its_node_exits_130() -> None:
    server = SilentServer()
    try:
        code, output = interrupt_when_connected(
            [KMS_GOV, "check", IMAGE, "--rpc-url", f"http://127.0.0.1:{server.port}",
             "--contract", ADDRESS, "--timeout", "120"],
            server,
        )
    finally:
        server.close()
    assert code == 130, output
    assert "kms-gov: interrupted" in output and "Traceback" not in output


def test_ctrl_c_on_get_key_waiting_for_the_kms_exits_130(sim_dir: Path) -> None:
    server = SilentServer()
    try:
        code, output = interrupt_when_connected(
            [KEYUTIL, "get-key", "--kms", f"http://127.0.0.1:{server.port}",
             "--insecure-skip-kms-auth", "--nsm", "simulator", "--sim-dir", str(sim_dir),
             "--stdout", "--format", "hex"],
            server,
        )
    finally:
        server.close()
    assert code == 130, output
    assert "keyutil: interrupted" in output and "Traceback" not in output


def test_ctrl_c_on_serve_stops_cleanly_and_exits_130(tmp_path: Path) -> None:
    sock = tmp_path / "kms.sock"
    proc = subprocess.Popen(
        [MOCK_KMS, "serve", "--state-dir", str(tmp_path / "state"), "--unix-socket", str(sock)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=clean_env(),
    )
    try:
        end = time.monotonic() + 60
        err = ""
        while time.monotonic() < end and proc.poll() is None:
            time.sleep(0.2)
            if sock.exists():
                break
        # the start-up line comes once the service is built: wait for it
        assert proc.stderr is not None
        seen = []
        while not seen or ("serving on" not in seen[-1] and seen[-1]):
            seen.append(proc.stderr.readline())
        assert seen[-1].startswith("INFO mock_kms: mock-kms serving on"), seen
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    assert "INFO mock_kms: mock-kms stopping" in err and "Traceback" not in err


def test_an_interrupt_in_process_is_130_too() -> None:
    import click

    @click.command()
    def slow() -> None:
        raise KeyboardInterrupt

    assert cliutil.run(slow, [], prog_name="slow", prefix="SLOW") == 130


def test_an_unexpected_exception_is_one_line_and_exit_70(capsys: pytest.CaptureFixture[str]) -> None:
    import click

    @click.command()
    def buggy() -> None:
        raise RuntimeError("boom")

    assert cliutil.run(buggy, [], prog_name="buggy", prefix="BUGGY") == 70
    assert capsys.readouterr().err == "buggy: internal error: RuntimeError: boom (please report it)\n"


def test_an_exit_with_a_message_says_it(capsys: pytest.CaptureFixture[str]) -> None:
    import click

    @click.command()
    def quits() -> None:
        sys.exit("quits: cannot go on")

    assert cliutil.run(quits, [], prog_name="quits", prefix="QUITS") == 1
    assert capsys.readouterr().err == "quits: cannot go on\n"


# -- Item 10: one exit-code table for the three commands ------------------------------------


def readme_section(title: str) -> str:
    start = README.index(f"## {title}\n")
    end = README.find("\n## ", start + 1)
    return README[start : end if end != -1 else None]


def test_the_readme_exit_code_table_covers_every_command_and_code() -> None:
    import keyutil.cli as k
    import mock_kms.cli as m

    table = readme_section("Exit codes and environment variables")
    rows = {
        int(cells[0]): cells[1:]
        for cells in (
            [c.strip() for c in line.strip("|").split("|")]
            for line in table.splitlines()
            if re.match(r"\| \d+ \|", line)
        )
    }
    columns = {"keyutil": 0, "mock-kms": 1, "kms-gov": 2}
    for name, module in (("keyutil", k), ("mock-kms", m), ("kms-gov", gov)):
        codes = {v for n, v in vars(module).items() if n.startswith("EXIT_") and isinstance(v, int)}
        codes |= {cliutil.EXIT_INTERRUPTED, cliutil.EXIT_INTERNAL}
        for code in codes:
            assert code in rows, f"exit {code} of {name} is not in the README's table"
            assert rows[code][columns[name]] not in ("", "\u2013"), f"{name}: exit {code}"
    assert all(row[0] == "usage error" for code, row in rows.items() if code == 2)
    assert rows[130] == ["interrupted (Ctrl-C)"] * 3


# -- Item 11: environment variables -----------------------------------------------------------


def all_envvars() -> dict[str, dict[str, tuple[str, list[str]]]]:
    return {
        "keyutil": cliutil.option_envvars(keyutil_cli, "KEYUTIL"),
        "mock-kms": cliutil.option_envvars(kms_cli, "MOCK_KMS"),
        "kms-gov": cliutil.option_envvars(gov.cli, "KMS_GOV"),
    }


def envvar_table() -> str:
    """The README's table, as the code has it (printed by the test when they differ)."""
    lines = ["| variable | option | command |", "|---|---|---|"]
    for prog, found in all_envvars().items():
        for name, (option, commands) in found.items():
            where = ", ".join(f"{prog} {c}" if c != "(all)" else prog for c in commands)
            lines.append(f"| `{name}` | `{option}` | {where} |")
    return "\n".join(lines)


def test_the_readme_lists_every_environment_variable_the_code_reads() -> None:
    expected = envvar_table()
    assert expected in README, "README's table differs from the code; it should be:\n" + expected


def test_help_shows_each_options_variable() -> None:
    runner = CliRunner()
    help_text = runner.invoke(keyutil_cli, ["get-key", "--help"]).output
    assert "KEYUTIL_GET_KEY_FORMAT" in help_text and "KEYUTIL_KMS_PUBKEY" in help_text
    help_text = runner.invoke(kms_cli, ["serve", "--help"]).output
    assert "MOCK_KMS_SERVE_LOG_FORMAT" in help_text and "MOCK_KMS_PORT" in help_text


def test_the_documented_variable_of_a_renamed_option_works(tmp_path: Path) -> None:
    """--format's parameter is called fmt: its variable is still ..._FORMAT, as documented."""
    ctx = keyutil_cli.commands["get-key"].make_context(
        "get-key", ["--kms", "http://127.0.0.1:1"], auto_envvar_prefix="KEYUTIL_GET_KEY"
    )
    assert ctx.params["fmt"] == "raw"
    os.environ["KEYUTIL_GET_KEY_FORMAT"] = "hex"
    try:
        ctx = keyutil_cli.commands["get-key"].make_context(
            "get-key", ["--kms", "http://127.0.0.1:1"]
        )
    finally:
        del os.environ["KEYUTIL_GET_KEY_FORMAT"]
    assert ctx.params["fmt"] == "hex"


@pytest.mark.parametrize(
    ("prog", "variable", "hint"),
    [
        (KEYUTIL, "KEYUTIL_GET_KEY_FMT", "did you mean KEYUTIL_GET_KEY_FORMAT?"),
        (MOCK_KMS, "MOCK_KMS_STATEDIR", "did you mean MOCK_KMS_STATE_DIR?"),
        (KMS_GOV, "KMS_GOV_RPCURL", "did you mean KMS_GOV_RPC_URL?"),
    ],
)
def test_an_unknown_variable_gets_a_warning(prog: str, variable: str, hint: str) -> None:
    done = run(prog, "--version", **{variable: "x"})
    assert done.returncode == 0
    name = Path(prog).name
    assert f"{name}: warning: {variable} is not a {name} variable and is ignored ({hint})" in (
        done.stderr
    )


def test_known_variables_get_no_warning() -> None:
    done = run(
        KMS_GOV, "--version", KMS_GOV_PRIVATE_KEY="0x" + "11" * 32, KMS_GOV_RPC_URL="http://x"
    )
    assert done.stderr == ""


# -- Item 17: versions ------------------------------------------------------------------------


def test_version_everywhere_comes_from_the_package_metadata() -> None:
    import keyutil

    version = importlib.metadata.version("nitro-keyrelease")
    assert keyutil.__version__ == version
    for prog in (KEYUTIL, MOCK_KMS):
        done = run(prog, "--version")
        assert (done.returncode, done.stdout) == (0, f"{Path(prog).name} {version}\n")


def test_python_m_keyutil_exits_with_the_commands_status() -> None:
    """keyutil run starts get-key as ``python -m keyutil``: a refusal there must not read as
    success (the supervisor would start the app without its keys)."""
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "keyutil", "get-key", "--kms", "127.0.0.1:1",
         "--insecure-skip-kms-auth", "--stdout"],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2, result.stderr
    assert "did you mean http://127.0.0.1:1" in result.stderr
