"""The deployment examples, tested as far as this machine allows (issue 14, item 17): no
docker engine and no systemd as PID 1 here, so the Dockerfiles are linted (hadolint) and
parsed (the official Go parser, via the ``dockerfile`` package), the systemd unit is checked
with ``systemd-analyze verify`` and its command line is run for real, and the enclave
image's dependency pins and compiled modules are checked the way the image builds them."""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
import urllib.request
from pathlib import Path

import dockerfile
import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from mock_kms.cli import cli as kms_cli

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
BIN = Path(sys.executable).parent
UNIT = EXAMPLES / "kms" / "mock-kms.service"


def instructions(path: Path) -> list[dockerfile.Command]:
    return list(dockerfile.parse_file(str(path)))


@pytest.mark.parametrize("path", ["enclave/Dockerfile", "kms/Dockerfile"])
def test_dockerfiles_pass_hadolint(path: str) -> None:
    done = subprocess.run(
        [str(BIN / "hadolint"), "--no-color", str(EXAMPLES / path)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr


# -- The KMS image and unit: the command they run is one mock-kms accepts ---------------------


def serve_args_parse(args: list[str]) -> None:
    """Raise unless ``mock-kms`` (the CLI of this tree) accepts ``args``."""
    assert args[0] == "serve", args
    kms_cli.commands["serve"].make_context("serve", args[1:])


def test_the_kms_image_runs_a_serve_command_that_parses() -> None:
    cmds = instructions(EXAMPLES / "kms" / "Dockerfile")
    (entrypoint,) = [c for c in cmds if c.cmd == "ENTRYPOINT"]
    (command,) = [c for c in cmds if c.cmd == "CMD"]
    assert entrypoint.json and entrypoint.value == ("mock-kms",)
    serve_args_parse(list(command.value))
    env = dict(
        pair for c in cmds if c.cmd == "ENV" for pair in zip(c.value[::2], c.value[1::2], strict=True)
    )
    assert env["MOCK_KMS_STATE_DIR"] == "/var/lib/mock-kms" and env["MOCK_KMS_HOST"] == "0.0.0.0"
    users = [c.value[0] for c in cmds if c.cmd == "USER"]
    assert users and users[-1] != "0" and users[-1] != "root"  # never the KMS as root
    (health,) = [c for c in cmds if c.cmd == "HEALTHCHECK"]
    assert "/v1/live" in " ".join(health.value)  # liveness: a chain outage is no restart


def unit_settings() -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key, []).append(value)
    return settings


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd is not installed")
def test_the_systemd_unit_verifies(tmp_path: Path) -> None:
    # verify checks that ExecStart is executable: point it at this tree's mock-kms.
    unit = tmp_path / "mock-kms.service"
    unit.write_text(UNIT.read_text().replace("/usr/local/bin/mock-kms", str(BIN / "mock-kms")))
    done = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True)
    assert done.returncode == 0 and done.stderr == "", done.stderr
    broken = tmp_path / "broken.service"
    broken.write_text(unit.read_text().replace("Type=exec", "Type=forking-ish"))
    done = subprocess.run(["systemd-analyze", "verify", str(broken)], capture_output=True, text=True)
    assert "Failed to parse service type" in done.stderr  # the check can fail


def test_the_units_command_serves_and_stops_cleanly_on_its_kill_signal(tmp_path: Path) -> None:
    """ExecStart as systemd would run it: ${STATE_DIRECTORY} set, KillSignal to stop."""
    settings = unit_settings()
    assert settings["User"] == ["mock-kms"] and "DynamicUser" not in settings
    (exec_start,) = settings["ExecStart"]
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    argv = shlex.split(exec_start.replace("${STATE_DIRECTORY}", str(state)))
    assert argv[0] == "/usr/local/bin/mock-kms"
    serve_args_parse(argv[1:])
    with socket.socket() as probe:  # a free port (closed again for mock-kms to bind)
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MOCK_KMS_")}
    proc = subprocess.Popen(
        [str(BIN / "mock-kms"), *argv[1:], "--port", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        env={**env, "STATE_DIRECTORY": str(state)},
    )
    try:
        end = time.monotonic() + 60
        while True:
            assert proc.poll() is None and time.monotonic() < end, "mock-kms did not serve"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/live", timeout=2) as r:
                    assert r.status == 200
                    break
            except OSError:
                time.sleep(0.2)
        assert (state / "identity.pem").exists() or any(state.iterdir())
        (kill,) = settings["KillSignal"]
        proc.send_signal(getattr(signal, kill))
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err  # a clean stop, which Restart=on-failure leaves stopped
    assert settings["RestartPreventExitStatus"] == ["2"]


# -- The enclave image: pinned, hash-checked dependencies, compiled once ---------------------


def enclave_install_run() -> str:
    runs = [c.value[0] for c in instructions(EXAMPLES / "enclave" / "Dockerfile") if c.cmd == "RUN"]
    (install,) = [r for r in runs if "pip install" in r]
    return " ".join(install.split())


def test_the_enclave_image_installs_only_hash_checked_pins_then_the_wheel_alone() -> None:
    run = enclave_install_run()
    first, second = run.split("&&")[:2]
    assert "--require-hashes -r /tmp/keyutil-dist/requirements.txt" in first
    assert "--only-binary=:all:" in first and "--no-compile" in first
    assert "--no-deps --no-index" in second and "nitro_keyrelease-*.whl" in second
    copies = [c.value for c in instructions(EXAMPLES / "enclave" / "Dockerfile") if c.cmd == "COPY"]
    assert ("requirements.txt", "/tmp/keyutil-dist/requirements.txt") in copies


def requirements() -> dict[str, tuple[str, list[str]]]:
    """name -> (pinned version, hashes) from the example's requirements.txt."""
    text = (EXAMPLES / "enclave" / "requirements.txt").read_text().replace("\\\n", " ")
    pins: dict[str, tuple[str, list[str]]] = {}
    for line in text.splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        spec, *options = line.split()
        requirement = Requirement(spec)
        (specifier,) = requirement.specifier
        assert specifier.operator == "==", f"{spec}: not pinned to one version"
        hashes = [o.removeprefix("--hash=sha256:") for o in options]
        assert hashes and all(len(h) == 64 and int(h, 16) >= 0 for h in hashes), line
        assert all(o.startswith("--hash=sha256:") for o in options), line
        pins[canonicalize_name(requirement.name)] = (specifier.version, hashes)
    return pins


def test_every_dependency_of_keyutil_is_pinned_with_hashes_that_satisfy_pyproject() -> None:
    pins = requirements()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for text in project["dependencies"]:
        wanted = Requirement(text)
        name = canonicalize_name(wanted.name)
        assert name in pins, f"{name} is a dependency of keyutil but not pinned"
        assert wanted.specifier.contains(pins[name][0]), f"{name}=={pins[name][0]}: {wanted}"
    # cryptography's own dependencies on CPython: cffi, and cffi's pycparser.
    assert {"cffi", "pycparser"} <= pins.keys()
    extra = pins.keys() - {canonicalize_name(Requirement(t).name) for t in project["dependencies"]}
    assert extra == {"cffi", "pycparser"}, "pinned but nothing needs it"


def compiled(tree: Path) -> None:
    """The image's compileall step, on ``tree`` instead of site-packages."""
    run = enclave_install_run()
    step = next(s for s in run.split("&&") if "compileall" in s)
    args = shlex.split(step)
    args = args[: args.index("--invalidation-mode") + 2]  # the target is the image's path
    assert args[:3] == ["python3", "-m", "compileall"] and "-f" in args
    subprocess.run([sys.executable, *args[1:], str(tree)], check=True)


def pycs(tree: Path) -> dict[str, bytes]:
    return {str(p.relative_to(tree)): p.read_bytes() for p in sorted(tree.rglob("*.pyc"))}


def test_compiled_modules_are_hash_based_reproducible_and_never_recompiled(
    tmp_path: Path,
) -> None:
    # Two builds at the same path (the image's site-packages), the sources with other times.
    first = tmp_path / "site"
    builds = []
    for stamp in (1_000_000_000, 1_700_000_000):
        shutil.rmtree(first, ignore_errors=True)
        shutil.copytree(
            ROOT / "keyutil", first / "keyutil", ignore=shutil.ignore_patterns("__pycache__")
        )
        for path in (first / "keyutil").rglob("*.py"):
            os.utime(path, (stamp, stamp))
        compiled(first)
        builds.append(pycs(first))
    built = builds[0]
    assert built and built == builds[1]  # no time in them: the same bytes every build
    sources = list((first / "keyutil").rglob("*.py"))
    assert len(built) == len(sources)
    for name, data in built.items():
        flags = int.from_bytes(data[4:8], "little")
        assert flags == 0b01, f"{name}: expected an unchecked hash-based .pyc; flags {flags}"
    # A boot: the sources look newer than the .pyc files; Python loads them as they are.
    for path in sources:
        os.utime(path)
    done = subprocess.run(
        [sys.executable, "-c",
         "import keyutil.cli, keyutil.client, keyutil.transport; print(keyutil.cli.__file__)"],
        check=True, cwd=first, env={**os.environ, "PYTHONPATH": str(first)},
        capture_output=True, text=True,
    )
    assert done.stdout.strip() == str(first / "keyutil" / "cli.py")  # this copy was loaded
    assert pycs(first) == built  # and nothing was recompiled or written
