"""examples/host: run.sh against a stand-in `nitro-cli`, proxy.sh's command lines, and the
examples' settings agreeing with each other (image, run.toml, proxy, allowlist, units).

This machine has no nitro-cli, vsock-proxy or socat: stand-ins on PATH print what the real
ones print (describe-enclaves JSON in nitro-cli's format) and record how they were called.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

EXAMPLES = Path(__file__).parent.parent / "examples"
RUN_SH = EXAMPLES / "host" / "run.sh"
PROXY_SH = EXAMPLES / "host" / "proxy.sh"

APP_ID = "i-0c722f352c0cea22f-enc19275235ea37693"
MEASUREMENTS = {
    "HashAlgorithm": "Sha384 { ... }",
    "PCR0": "e8" * 48,
    "PCR1": "4b" * 48,
    "PCR2": "f4" * 48,
}


def enclave(name: str, enclave_id: str, cid: int, state: str = "RUNNING") -> dict[str, Any]:
    """One element of `nitro-cli describe-enclaves`."""
    return {
        "EnclaveName": name,
        "EnclaveID": enclave_id,
        "ProcessID": 848707,
        "EnclaveCID": cid,
        "NumberOfCPUs": 2,
        "CPUIDs": [1, 3],
        "MemoryMiB": 1024,
        "State": state,
        "Flags": "NONE",
        "Measurements": MEASUREMENTS,
    }


DESCRIBED = [
    enclave("app", "i-0c722f352c0cea22f-enc0000000000000001", 16, "TERMINATING"),
    enclave("other", "i-0c722f352c0cea22f-enc0000000000000002", 23),
    enclave("app", APP_ID, 17),
]

# The stand-in: records argv, prints FAKE_DIR/<command>.out (or fails with FAKE_DIR/<command>.rc).
FAKE = """\
#!{python}
import json, os, sys
base = os.environ["FAKE_DIR"]
with open(os.path.join(base, "calls.jsonl"), "a") as f:
    f.write(json.dumps([os.path.basename(sys.argv[0]), *sys.argv[1:]]) + "\\n")
command = sys.argv[1] if len(sys.argv) > 1 else ""
out = os.path.join(base, command + ".out")
if os.path.exists(out):
    sys.stdout.write(open(out).read())
rc = os.path.join(base, command + ".rc")
sys.exit(int(open(rc).read()) if os.path.exists(rc) else 0)
"""


class Host:
    """A directory of stand-in programs and their canned answers."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.bin = root / "bin"
        self.bin.mkdir()
        for name in ("nitro-cli", "vsock-proxy", "socat", "keyutil"):
            path = self.bin / name
            path.write_text(FAKE.format(python=sys.executable))
            path.chmod(0o755)
        self.eif = root / "app.eif"
        self.eif.write_bytes(b"EIF stand-in")

    def answer(self, command: str, output: Any, rc: int = 0) -> None:
        text = output if isinstance(output, str) else json.dumps(output, indent=2)
        (self.root / f"{command}.out").write_text(text)
        if rc:
            (self.root / f"{command}.rc").write_text(str(rc))

    def calls(self) -> list[list[str]]:
        log = self.root / "calls.jsonl"
        return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []

    def run(self, script: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(script), *args],
            env={
                "PATH": f"{self.bin}:/usr/bin:/bin",
                "FAKE_DIR": str(self.root),
                "EIF_PATH": str(self.eif),
                **env,
            },
            capture_output=True,
            text=True,
            timeout=60,
            cwd=self.root,
        )


@pytest.fixture
def host(tmp_path: Path) -> Host:
    h = Host(tmp_path)
    h.answer("describe-enclaves", DESCRIBED)
    return h


# -- run.sh cid: the CID from describe-enclaves ---------------------------------------------


def test_cid_of_the_running_enclave_by_name_skips_terminating_and_others(host: Host) -> None:
    result = host.run(RUN_SH, "cid")  # ENCLAVE_NAME defaults to "app"
    assert (result.returncode, result.stdout) == (0, "17\n"), result.stderr
    assert host.run(RUN_SH, "cid", "other").stdout == "23\n"
    assert host.calls() == [["nitro-cli", "describe-enclaves"]] * 2


def test_cid_by_enclave_id(host: Host) -> None:
    assert host.run(RUN_SH, "cid", APP_ID).stdout == "17\n"


@pytest.mark.parametrize(
    ("described", "reason"),
    [
        (
            [enclave("app", APP_ID, 17, "TERMINATING")],
            "no running enclave named 'app' (found: TERMINATING)",
        ),
        ([], "no running enclave named 'app' (found: none listed)"),
        (
            [enclave("app", APP_ID, 17), enclave("app", APP_ID + "0", 18)],
            "2 running enclaves named 'app'",
        ),
        ([enclave("app", APP_ID, 3)], "EnclaveCID 3 is not a CID an enclave can have"),
        ([{**enclave("app", APP_ID, 17), "EnclaveCID": "17"}], "EnclaveCID '17' is not a CID"),
        ("Failed to connect to the enclave process", "describe-enclaves did not print JSON"),
        ({"EnclaveCID": 17}, "expected a JSON array of enclaves"),
    ],
    ids=["terminating", "none", "ambiguous", "parent-cid", "cid-as-text", "not-json", "not-array"],
)
def test_cid_refuses_what_is_not_one_running_enclave(
    host: Host, described: Any, reason: str
) -> None:
    host.answer("describe-enclaves", described)
    result = host.run(RUN_SH, "cid")
    assert result.returncode == 1 and result.stdout == ""
    assert reason in result.stderr
    assert "run.sh: cannot find enclave 'app'" in result.stderr


def test_cid_when_nitro_cli_fails(host: Host) -> None:
    host.answer("describe-enclaves", "", rc=1)
    result = host.run(RUN_SH, "cid")
    assert result.returncode == 1
    assert "nitro-cli describe-enclaves failed" in result.stderr


# -- run.sh start, console, stop -----------------------------------------------------------


def run_answer(enclave_id: str = APP_ID, cid: int = 17) -> dict[str, Any]:
    """What `nitro-cli run-enclave` prints: describe-enclaves' fields up to MemoryMiB."""
    described = enclave("app", enclave_id, cid)
    return {k: v for k, v in described.items() if k not in ("State", "Flags", "Measurements")}


def test_start_runs_the_enclave_and_reports_its_cid_without_console(host: Host) -> None:
    host.answer("run-enclave", run_answer())
    cid_file = host.root / "app.cid"

    result = host.run(RUN_SH, "start", CID_FILE=str(cid_file), MEMORY_MIB="2048")

    assert result.returncode == 0, result.stderr
    assert result.stdout == "17\n" and cid_file.read_text() == "17\n"
    assert f"enclave app ({APP_ID}) is running with CID 17" in result.stderr
    assert "no console: the enclave runs in production mode" in result.stderr
    assert host.calls() == [
        ["nitro-cli", "run-enclave", "--eif-path", str(host.eif), "--enclave-name", "app",
         "--cpu-count", "2", "--memory", "2048"],
        ["nitro-cli", "describe-enclaves"],
        ["keyutil", "wait-ready", "--target", "vsock://enclave:app:5001", "--deadline", "120",
         "--nitro-cli", "nitro-cli", "--http", "/healthz"],
    ]  # fmt: skip


def test_start_fails_with_3_when_the_app_does_not_answer(host: Host) -> None:
    host.answer("run-enclave", run_answer())
    host.answer("wait-ready", '{"status": "not_ready"}\n', rc=3)
    result = host.run(RUN_SH, "start", READY_PATH="", READY_DEADLINE="5")
    assert result.returncode == 3
    assert result.stdout == "17\n"  # the CID; wait-ready's JSON goes to stderr
    assert "did not answer within 5s" in result.stderr
    assert host.calls()[-1] == [
        "keyutil", "wait-ready", "--target", "vsock://enclave:app:5001", "--deadline", "5",
        "--nitro-cli", "nitro-cli",
    ]


@pytest.mark.parametrize(
    ("command", "env", "argv"),
    [
        ("inbound", {}, ["keyutil", "proxy", "--listen", "tcp://0.0.0.0:8080",
                         "--to", "vsock://enclave:app:5001", "--nitro-cli", "nitro-cli"]),
        ("logs", {"LOG_FILE": "/var/log/e.log"},
         ["keyutil", "logs", "--listen", "vsock://:9000", "--append", "/var/log/e.log"]),
        ("logs", {}, ["keyutil", "logs", "--listen", "vsock://:9000"]),
        ("egress", {"EGRESS_TO": "api.example.com:443"},
         ["keyutil", "proxy", "--listen", "vsock://:8443", "--to", "api.example.com:443",
          "--allowlist", "/etc/keyrelease/egress.yaml"]),
        ("ready", {"READY_PATH": "/h"},
         ["keyutil", "wait-ready", "--target", "vsock://enclave:app:5001", "--deadline", "120",
          "--nitro-cli", "nitro-cli", "--http", "/h"]),
    ],
)
def test_forwarders_sink_and_readiness_command_lines(
    host: Host, command: str, env: dict[str, str], argv: list[str]
) -> None:
    result = host.run(RUN_SH, command, **env)
    assert result.returncode == 0, result.stderr
    assert host.calls() == [argv]


def test_egress_without_a_destination_is_a_usage_error(host: Host) -> None:
    result = host.run(RUN_SH, "egress")
    assert result.returncode == 2 and "EGRESS_TO" in result.stderr
    assert host.calls() == []


def test_start_in_debug_mode_with_a_fixed_cid_attaches_the_console(host: Host) -> None:
    host.answer("run-enclave", run_answer())
    host.answer("console", 'keyutil: info: net_up interface="lo" ...\n')

    result = host.run(RUN_SH, DEBUG_MODE="1", ENCLAVE_CID="17")

    assert result.returncode == 0, result.stderr
    assert result.stdout == '17\nkeyutil: info: net_up interface="lo" ...\n'
    run, describe, console = host.calls()
    assert run[:2] == ["nitro-cli", "run-enclave"]
    assert run[-3:] == ["--enclave-cid", "17", "--debug-mode"]
    assert describe == ["nitro-cli", "describe-enclaves"]
    assert console == ["nitro-cli", "console", "--enclave-id", APP_ID]


def test_start_fails_when_the_enclave_is_not_running_after_run_enclave(host: Host) -> None:
    host.answer("run-enclave", run_answer("i-0c722f352c0cea22f-enc00000000000000ff"))
    result = host.run(RUN_SH)
    assert result.returncode == 1 and result.stdout == ""
    assert "no running enclave named 'i-0c722f352c0cea22f-enc00000000000000ff'" in result.stderr


def test_start_fails_when_run_enclave_fails(host: Host) -> None:
    host.answer("run-enclave", "", rc=1)
    result = host.run(RUN_SH)
    assert result.returncode == 1
    assert "nitro-cli run-enclave failed" in result.stderr
    assert [c[1] for c in host.calls()] == ["run-enclave"]


@pytest.mark.parametrize(
    ("command", "nitro"), [("console", "console"), ("stop", "terminate-enclave")]
)
def test_console_and_stop_resolve_the_name_to_the_running_enclave_id(
    host: Host, command: str, nitro: str
) -> None:
    result = host.run(RUN_SH, command)
    assert result.returncode == 0, result.stderr
    assert host.calls()[-1] == ["nitro-cli", nitro, "--enclave-id", APP_ID]


# -- proxy.sh ------------------------------------------------------------------------------


def proxy_env() -> dict[str, str]:
    """The settings in examples/host/proxy.env."""
    pairs = [
        line.split("=", 1)
        for line in (EXAMPLES / "host" / "proxy.env").read_text().splitlines()
        if line and not line.startswith("#")
    ]
    return {k: v for k, v in pairs}


@pytest.mark.parametrize(
    ("program", "argv"),
    [
        (
            "vsock-proxy",
            ["vsock-proxy", "--config", "/etc/keyrelease/vsock-proxy.yaml", "--num_workers", "16",
             "8000", "127.0.0.1", "8420"],
        ),
        (
            "socat",
            ["socat", "-T", "60", "VSOCK-LISTEN:8000,fork,reuseaddr,max-children=16",
             "TCP:127.0.0.1:8420,connect-timeout=5"],
        ),
        (
            "keyutil",
            ["keyutil", "proxy", "--listen", "vsock://:8000", "--to", "127.0.0.1:8420",
             "--allowlist", "/etc/keyrelease/vsock-proxy.yaml", "--max-connections", "16",
             "--idle-timeout", "60"],
        ),
    ],
)  # fmt: skip
def test_proxy_command_lines(host: Host, program: str, argv: list[str]) -> None:
    result = host.run(PROXY_SH, program, **proxy_env())
    assert result.returncode == 0, result.stderr
    assert host.calls() == [argv]


def test_proxy_settings_reach_every_program(host: Host) -> None:
    env = {"VSOCK_PORT": "9100", "KMS_HOST": "kms.internal", "KMS_PORT": "443"}
    for program in ("vsock-proxy", "socat", "keyutil"):
        assert host.run(PROXY_SH, program, **env).returncode == 0
    vsock_proxy, socat, keyutil = host.calls()
    assert vsock_proxy[-3:] == ["9100", "kms.internal", "443"]
    assert socat[3:] == ["VSOCK-LISTEN:9100,fork,reuseaddr,max-children=16",
                         "TCP:kms.internal:443,connect-timeout=5"]  # fmt: skip
    assert keyutil[2:6] == ["--listen", "vsock://:9100", "--to", "kms.internal:443"]


@pytest.mark.parametrize(
    ("script", "args", "env", "message"),
    [
        (RUN_SH, (), {"EIF_PATH": "/nonexistent.eif"}, "cannot read the enclave image"),
        (RUN_SH, (), {"DEBUG_MODE": "yes"}, "DEBUG_MODE must be 0 or 1"),
        (RUN_SH, ("launch",), {}, "unknown command 'launch'"),
        (RUN_SH, ("start", "extra"), {}, "too many arguments"),
        (PROXY_SH, ("nginx",), {}, "unknown proxy program 'nginx'"),
        (PROXY_SH, (), {}, "expected one argument"),
        (PROXY_SH, ("socat",), {"VSOCK_PORT": "80x"}, "VSOCK_PORT must be a positive integer"),
        (PROXY_SH, ("socat",), {"IDLE_TIMEOUT": "0"}, "IDLE_TIMEOUT must be a positive integer"),
    ],
)
def test_usage_errors_exit_2_and_run_nothing(
    host: Host, script: Path, args: tuple[str, ...], env: dict[str, str], message: str
) -> None:
    result = host.run(script, *args, **env)
    assert result.returncode == 2
    assert message in result.stderr
    assert host.calls() == []


# -- The examples agree with each other ----------------------------------------------------


def dockerfile() -> str:
    return (EXAMPLES / "enclave" / "Dockerfile").read_text()


def test_allowlist_lists_the_proxy_target_and_nothing_else() -> None:
    text = (EXAMPLES / "host" / "vsock-proxy.yaml").read_text()
    entries = re.findall(r"^- \{address: ([^,\s]+), port: (\d+)\}$", text, re.M)
    env = proxy_env()
    assert entries == [(env["KMS_HOST"], env["KMS_PORT"])]
    assert env["ALLOWLIST"].endswith("/vsock-proxy.yaml")


def run_toml() -> Any:
    import tomllib

    return tomllib.loads((EXAMPLES / "enclave" / "run.toml").read_text())


def enclave_env() -> dict[str, str]:
    text = (EXAMPLES / "host" / "enclave.env").read_text()
    return dict(line.split("=", 1) for line in text.splitlines() if line and line[0] != "#")


def test_image_runs_keyutil_run_with_the_config_and_identity_it_copies() -> None:
    text = dockerfile()
    config = run_toml()
    assert "COPY run.toml /etc/keyutil/run.toml" in text
    assert "COPY kms.pub /etc/keyutil/kms.pub" in text
    assert config["kms"]["pubkey"] == "@/etc/keyutil/kms.pub"
    assert config["kms"]["urls"] == [f"vsock://3:{proxy_env()['VSOCK_PORT']}"]
    assert 'ENTRYPOINT ["/usr/local/bin/keyutil", "run", "--config", "/etc/keyutil/run.toml"]' in text
    assert "COPY app.py /srv/app/app.py" in text
    assert config["app"]["command"][-1] == "/srv/app/app.py"
    assert config["app"]["workdir"] == "/srv/app"
    assert "entrypoint.sh" not in text


def test_run_toml_ports_are_the_hosts() -> None:
    config, env = run_toml(), enclave_env()
    listens = {f["listen"]: f["to"] for f in config["forward"]}
    assert listens[f"vsock://:{env['APP_VSOCK_PORT']}"] == "tcp://127.0.0.1:4000"
    assert config["app"]["env"]["PORT"] == "4000"
    assert listens["tcp://127.0.0.1:8443"] == f"vsock://3:{env['EGRESS_VSOCK_PORT']}"
    assert config["log"]["to"] == f"vsock://3:{env['LOG_VSOCK_PORT']}"
    keys = config["keys"][0]
    assert config["app"]["env"]["KEY_FILE"] == f"{keys['dir']}/{keys['names'][0]}"
    assert keys["dir"] in config["tmpfs"]["paths"]
    egress = (EXAMPLES / "host" / "egress.yaml").read_text()
    host, port = env["EGRESS_TO"].rsplit(":", 1)
    assert f"- {{address: {host}, port: {port}}}" in egress


def test_units_run_commands_run_sh_has() -> None:
    for unit in sorted((EXAMPLES / "host").glob("enclave*.service")):
        text = unit.read_text()
        assert "EnvironmentFile=/etc/keyrelease/enclave.env" in text
        commands = re.findall(r"^Exec\w+=\S+/run\.sh (\w+)$", text, re.M)
        assert commands, unit
        for command in commands:
            assert command in ("start", "stop", "inbound", "egress", "logs"), (unit, command)


def test_scripts_are_executable() -> None:
    for script in (RUN_SH, PROXY_SH):
        assert os.access(script, os.X_OK), script


# -- proxy.sh with the real `keyutil proxy` and the example allowlist ------------------------

REAL_KEYUTIL_BIN = Path(sys.executable).parent


def real_proxy(port: int, **env: str) -> subprocess.Popen[str]:
    settings = {**proxy_env(), "VSOCK_PORT": str(port), **env}
    settings["ALLOWLIST"] = str(EXAMPLES / "host" / "vsock-proxy.yaml")
    return subprocess.Popen(
        [str(PROXY_SH), "keyutil"],
        env={"PATH": f"{REAL_KEYUTIL_BIN}:/usr/bin:/bin", **settings},
        stderr=subprocess.PIPE,
        text=True,
    )


def test_real_keyutil_proxy_takes_proxy_sh_options_and_the_example_allowlist() -> None:
    port = 20000 + os.getpid() % 20000
    proc = real_proxy(port)
    assert proc.stderr is not None
    first = proc.stderr.readline()
    if "AF_VSOCK" in first:  # no vsock driver: the options were still accepted (not exit 2)
        assert proc.wait(30) == 3, first
        return
    assert "listening" in first and f"vsock://:{port}" in first, first
    proc.send_signal(15)  # SIGTERM: exit 0 (SIGINT, Ctrl-C, exits 130)
    assert proc.wait(30) == 0


def test_real_keyutil_proxy_refuses_a_kms_port_the_example_allowlist_does_not_list() -> None:
    proc = real_proxy(20000 + os.getpid() % 20000, KMS_PORT="8421")
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 2
    assert "refused" in err and "127.0.0.1:8421" in err
