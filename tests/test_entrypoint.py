"""examples/enclave/entrypoint.sh, run for real: NSM simulator, `mock-kms serve` on a unix socket.

Each run happens in a fresh network namespace (`unshare -n`), so `keyutil net-up` acts on a
loopback of its own and the KMS is reachable only through the unix socket, as an enclave
reaches its KMS only through vsock. The application is a stand-in that records how it was
started and what it found in the keys directory (never the key itself, only its digest).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from e2e_support import BIN, Kms, Setup, assert_key_absent, identity_of, sim_init

from keyutil.output import VOLATILE_FILESYSTEMS, filesystem_magic

ENTRYPOINT = Path(__file__).parent.parent / "examples" / "enclave" / "entrypoint.sh"

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None,
    reason="needs root and util-linux unshare to give the entrypoint its own namespaces",
)

# The stand-in application: records its argv, pid and what it finds in the keys directory.
APP = """\
#!{python}
import hashlib, json, os, stat, sys
from keyutil.output import VOLATILE_FILESYSTEMS, filesystem_magic
keys_dir = os.environ["ENCLAVE_KEYS_DIR"]
keys = {{}}
for name in sorted(os.listdir(keys_dir)):
    path = os.path.join(keys_dir, name)
    data = open(path, "rb").read()
    keys[name] = {{
        "mode": stat.S_IMODE(os.stat(path).st_mode),
        "size": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
    }}
record = {{
    "argv": sys.argv[1:],
    "pid": os.getpid(),
    "keys_dir": keys_dir,
    "volatile": filesystem_magic(keys_dir) in VOLATILE_FILESYSTEMS,
    "keys": keys,
}}
with open({marker!r}, "w") as f:
    json.dump(record, f)
"""


class Enclave:
    """One run of the entrypoint, with the KMS, pinned identity and simulator of a test."""

    def __init__(self, setup: Setup, kms: Kms, root: Path) -> None:
        self.setup, self.kms = setup, kms
        self.marker = root / "app-started.json"
        self.app = root / "app"
        self.app.write_text(APP.format(python=sys.executable, marker=str(self.marker)))
        self.app.chmod(0o755)
        self.pubkey = root / "kms.pub"  # what the image bakes in at /etc/keyutil/kms.pub
        self.pubkey.write_text(setup.identity + "\n")
        self.keys_dir = Path(tempfile.mkdtemp(dir=setup.keys))
        self.env = {
            "PATH": f"{BIN}:{os.environ.get('PATH', '/usr/bin:/bin')}",
            "KEYUTIL_KMS": kms.url,
            "KEYUTIL_KMS_PUBKEY": f"@{self.pubkey}",
            "KEYUTIL_NSM": "simulator",
            "KEYUTIL_SIM_DIR": str(setup.sim),
            "ENCLAVE_KEYS_DIR": str(self.keys_dir),
            "ENCLAVE_LOG_FORMAT": "json",
        }

    def run(
        self,
        *args: str,
        prefix: tuple[str, ...] = ("unshare", "--net"),
        **env: str,
    ) -> tuple[int, int, str]:
        """Exit code, the pid the entrypoint ran as, and its stderr (the console)."""
        proc = subprocess.Popen(
            [*prefix, str(ENTRYPOINT), *args],
            env={**self.env, **env},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        _, stderr = proc.communicate(timeout=120)
        return proc.returncode, proc.pid, stderr.decode()

    def started(self) -> dict[str, Any] | None:
        if not self.marker.exists():
            return None
        return dict(json.loads(self.marker.read_text()))


def events(stderr: str) -> list[dict[str, Any]]:
    """keyutil's JSON log lines on the console (the entrypoint's own lines are text)."""
    return [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]


def released_key(setup: Setup, kms: Kms, name: str, length: int) -> bytes:
    """The key the KMS releases to this image, fetched directly (keys are derived)."""
    out = setup.get_key(
        kms.url, "--key", name, "--length", str(length), "--stdout", "--format", "hex"
    )
    assert out.returncode == 0, out.stderr
    return bytes.fromhex(out.stdout.decode().strip())


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Setup, Kms]]:
    root = tmp_path_factory.mktemp("entrypoint")
    setup = Setup(root)
    # A second enclave under a trusted root whose image is not registered.
    sim_init(root / "unregistered")
    trust = ("--trust-root", str(root / "unregistered" / "root.pem"))
    kms = setup.kms(*trust, unix=root / "kms.sock").start().wait_listening()
    yield setup, kms
    setup.close()


@pytest.fixture
def enclave(service: tuple[Setup, Kms], tmp_path: Path) -> Enclave:
    return Enclave(*service, tmp_path)


def assert_not_started(enclave: Enclave) -> None:
    assert enclave.started() is None, "the application started"
    assert os.listdir(enclave.keys_dir) == [], "a key file was left"


# -- The application starts with its key ---------------------------------------------------


def test_key_on_tmpfs_then_the_app_replaces_the_entrypoint(enclave: Enclave) -> None:
    code, pid, stderr = enclave.run(str(enclave.app), "--flag", "two words")

    assert code == 0, stderr
    started = enclave.started()
    assert started is not None
    assert started["argv"] == ["--flag", "two words"]
    assert started["pid"] == pid, "the application was not exec'd in place of the entrypoint"
    assert started["keys_dir"] == str(enclave.keys_dir) and started["volatile"] is True
    key = released_key(enclave.setup, enclave.kms, "app", 32)
    assert started["keys"] == {
        "app": {"mode": 0o400, "size": 32, "sha256": hashlib.sha256(key).hexdigest()}
    }
    logged = {e["event"]: e for e in events(stderr)}
    assert logged["net_up"]["address_added"] is True and logged["net_up"]["now_up"] is True
    assert logged["written"]["keys"] == ["app"]
    assert "entrypoint: keys ready" in stderr
    assert_key_absent(key, stderr.encode())


def test_app_from_env_with_several_keys_of_one_length(enclave: Enclave) -> None:
    code, _, stderr = enclave.run(
        ENCLAVE_APP=f"exec {enclave.app} from-env 'two words'",
        ENCLAVE_KEYS="disk tls",
        ENCLAVE_KEY_LENGTH="16",
    )

    assert code == 0, stderr
    started = enclave.started()
    assert started is not None
    assert started["argv"] == ["from-env", "two words"]
    assert {k: (v["mode"], v["size"]) for k, v in started["keys"].items()} == {
        "disk": (0o400, 16),
        "tls": (0o400, 16),
    }


def test_keys_dir_on_disk_gets_a_tmpfs_and_no_key_reaches_the_disk(
    enclave: Enclave, tmp_path: Path
) -> None:
    on_disk = tmp_path / "run-keys"
    if filesystem_magic(tmp_path) in VOLATILE_FILESYSTEMS:
        pytest.skip("the temporary directory is on tmpfs here: nothing to mount over")

    code, _, stderr = enclave.run(
        str(enclave.app),
        prefix=("unshare", "--net", "--mount"),  # the tmpfs goes with the namespace
        ENCLAVE_KEYS_DIR=str(on_disk),
    )

    assert code == 0, stderr
    assert f"entrypoint: mounted a tmpfs on {on_disk}" in stderr
    started = enclave.started()
    assert started is not None
    assert started["volatile"] is True and started["keys"]["app"]["size"] == 32
    assert os.listdir(on_disk) == [], "the key reached the disk under the tmpfs"


# -- Failures: a reason on the console, a non-zero exit, no application, no key -------------


@pytest.mark.parametrize(
    ("case", "exit_code", "reason"),
    [
        ("wrong KMS identity pinned", 6, "the KMS answer failed authentication"),
        ("image not registered", 4, "the KMS denied the release"),
        ("KMS absent", 3, "the KMS was unreachable or unavailable until the deadline"),
    ],
)
def test_get_key_failure_stops_the_boot(
    enclave: Enclave, tmp_path: Path, case: str, exit_code: int, reason: str
) -> None:
    env: dict[str, str] = {}
    if case == "wrong KMS identity pinned":
        other = tmp_path / "other-kms.pub"
        other.write_text(identity_of(tmp_path / "other-state") + "\n")
        env["KEYUTIL_KMS_PUBKEY"] = f"@{other}"
    elif case == "image not registered":
        env["KEYUTIL_SIM_DIR"] = str(enclave.setup.root / "unregistered")
    else:
        env["KEYUTIL_KMS"] = f"unix://{tmp_path / 'absent.sock'}"
        env["ENCLAVE_DEADLINE"] = "1.5"

    code, _, stderr = enclave.run(str(enclave.app), **env)

    assert code == exit_code, stderr
    assert (
        f"entrypoint: FATAL: keyutil get-key (KMS {env.get('KEYUTIL_KMS', enclave.kms.url)}) "
        f"failed with exit {exit_code}: {reason}"
    ) in stderr
    assert "entrypoint: the application is not started" in stderr
    if exit_code == 4:
        assert [e["code"] for e in events(stderr) if e["event"] == "denied"] == [
            "image_not_allowed"
        ]
    assert_not_started(enclave)


def test_net_up_refused_stops_before_the_kms_is_asked(enclave: Enclave) -> None:
    audit_before = enclave.setup.audit.read_bytes() if enclave.setup.audit.exists() else b""

    code, _, stderr = enclave.run(
        str(enclave.app),
        prefix=("unshare", "--net", "capsh", "--drop=cap_net_admin", "--", "-c", 'exec "$0" "$@"'),
    )

    assert code == 8, stderr
    assert "entrypoint: FATAL: keyutil net-up failed with exit 8: network set-up error" in stderr
    assert [e["code"] for e in events(stderr)] == ["permission_denied"]
    assert_not_started(enclave)
    audit_after = enclave.setup.audit.read_bytes() if enclave.setup.audit.exists() else b""
    assert audit_after == audit_before


def test_keys_dir_that_cannot_be_made_tmpfs_stops_the_boot(
    enclave: Enclave, tmp_path: Path
) -> None:
    if filesystem_magic(tmp_path) in VOLATILE_FILESYSTEMS:
        pytest.skip("the temporary directory is on tmpfs here: nothing to refuse")
    on_disk = tmp_path / "run-keys"

    code, _, stderr = enclave.run(
        str(enclave.app),
        prefix=(
            "unshare",
            "--net",
            "--mount",
            "capsh",
            "--drop=cap_sys_admin",
            "--",
            "-c",
            'exec "$0" "$@"',
        ),
        ENCLAVE_KEYS_DIR=str(on_disk),
    )

    assert code == 7, stderr
    assert f"cannot mount a tmpfs on {on_disk}" in stderr
    assert "FATAL: preparing the keys directory failed with exit 7" in stderr
    assert enclave.started() is None
    assert os.listdir(on_disk) == []
    assert not [e for e in events(stderr) if e["event"] in ("released", "written")]


@pytest.mark.parametrize(
    ("args", "env", "exit_code", "message"),
    [
        ((), {}, 2, "no application given"),
        (("/nonexistent/app",), {}, 127, "application '/nonexistent/app' not found"),
        (("true",), {"ENCLAVE_NET_UP": "yes"}, 2, "ENCLAVE_NET_UP must be 0 or 1"),
        (("true",), {"ENCLAVE_KEYS_DIR": "run/keys"}, 2, "ENCLAVE_KEYS_DIR must be an absolute path"),
        (("true",), {"ENCLAVE_KEYS": " "}, 2, "ENCLAVE_KEYS names no key"),
        (("true",), {"KEYUTIL": "/nonexistent/keyutil"}, 127, "keyutil not found"),
    ],
    ids=["no-app", "app-missing", "bad-net-up", "relative-dir", "no-keys", "no-keyutil"],
)
def test_bad_settings_stop_before_anything_is_done(
    enclave: Enclave, args: tuple[str, ...], env: dict[str, str], exit_code: int, message: str
) -> None:
    code, _, stderr = enclave.run(*args, **env)

    assert code == exit_code, stderr
    assert f"entrypoint: {message}" in stderr
    assert f"FATAL: reading the settings failed with exit {exit_code}" in stderr
    assert events(stderr) == [], "keyutil ran"
    assert_not_started(enclave)
