"""The Python API, ``keyutil.get_key`` (issue 14, item 17): the keys in memory, the same
checks and the same keys as ``keyutil get-key``, typed (``py.typed`` in the wheel)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from e2e_support import Kms, Setup

import keyutil
from keyutil.client import AnswerRejected, KmsDenied, KmsUnavailable

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent


def test_get_key_returns_the_same_keys_as_the_cli(shared: tuple[Setup, Kms]) -> None:
    s, kms = shared
    events: list[tuple[str, str]] = []
    keys = keyutil.get_key(
        kms.url,
        kms_pubkey=s.identity,
        keys=["disk", "weights"],
        lengths=[64, 32],
        nsm="simulator",
        sim_dir=s.sim,
        log=lambda level, event, fields: events.append((level, event)),
    )
    assert {k: len(v) for k, v in keys.items()} == {"disk": 64, "weights": 32}
    assert ("info", "released") in events
    cli = s.get_key(kms.url, "--key", "disk", "--length", "64", "--stdout", "--format", "hex")
    assert cli.returncode == 0, cli.stderr.decode()
    assert bytes.fromhex(cli.stdout.decode().strip()) == keys["disk"]


def test_get_key_reads_the_identity_from_a_file(shared: tuple[Setup, Kms], tmp_path: Path) -> None:
    s, kms = shared
    pinned = tmp_path / "kms.pub"
    pinned.write_text(s.identity + "\n")
    keys = keyutil.get_key(kms.url, kms_pubkey=f"@{pinned}", nsm="simulator", sim_dir=s.sim)
    assert list(keys) == ["default"] and len(keys["default"]) == 32


def test_expect_app_refuses_another_applications_keys(shared: tuple[Setup, Kms]) -> None:
    s, kms = shared
    keys = keyutil.get_key(
        kms.url, kms_pubkey=s.identity, nsm="simulator", sim_dir=s.sim, expect_app="app-a"
    )
    assert len(keys["default"]) == 32
    with pytest.raises(AnswerRejected) as rejected:
        keyutil.get_key(
            kms.url, kms_pubkey=s.identity, nsm="simulator", sim_dir=s.sim, expect_app="app-b"
        )
    assert rejected.value.code == "answer_application_mismatch"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "--kms-pubkey (or KEYUTIL_KMS_PUBKEY) is required"),
        ({"kms_pubkey": "ed25519:x", "insecure_skip_kms_auth": True}, "not both"),
        ({"kms_pubkey": "@/nonexistent/kms.pub"}, "cannot read /nonexistent/kms.pub"),
        ({"insecure_skip_kms_auth": True, "lengths": [32, 32]}, "one key length for all"),
        ({"insecure_skip_kms_auth": True, "deadline": 0}, "deadline: expected a positive"),
        ({"insecure_skip_kms_auth": True, "suite": "rsa"}, "suite: expected x25519 or p384"),
        ({"insecure_skip_kms_auth": True, "kms": "127.0.0.1:8420"}, "did you mean http://"),
        ({"insecure_skip_kms_auth": True, "expect_app": "0x12"}, "application"),
    ],
)
def test_usage_errors_are_value_errors_before_anything_is_sent(
    kwargs: dict[str, object], message: str
) -> None:
    kms = str(kwargs.pop("kms", "http://127.0.0.1:1"))
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        keyutil.get_key(kms, **kwargs)  # type: ignore[arg-type]


def test_denied_and_unreachable_raise_the_clis_exceptions(
    shared: tuple[Setup, Kms], tmp_path: Path
) -> None:
    s, kms = shared
    from e2e_support import sim_init

    other = tmp_path / "other"
    sim_init(other)  # its CA is not trusted by this KMS
    with pytest.raises(KmsDenied) as denied:
        keyutil.get_key(kms.url, kms_pubkey=s.identity, nsm="simulator", sim_dir=other)
    assert denied.value.code == "chain_untrusted" and denied.value.status == 403
    with pytest.raises(KmsUnavailable):
        keyutil.get_key(
            "http://127.0.0.1:1", kms_pubkey=s.identity, nsm="simulator", sim_dir=s.sim,
            deadline=0.5,
        )


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    dist = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(dist), str(ROOT)],
        check=True, capture_output=True,
    )
    (built,) = dist.glob("nitro_keyrelease-*.whl")
    return built


def test_the_wheel_ships_py_typed(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    assert "keyutil/py.typed" in names and "keyutil/api.py" in names


def test_mypy_sees_the_installed_api_typed(wheel: Path, tmp_path: Path) -> None:
    """Installed from the wheel (site-packages, where mypy needs py.typed to read a package)."""
    site = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site),
         str(wheel)],
        check=True, capture_output=True,
    )
    user = tmp_path / "user.py"
    user.write_text(
        "import keyutil\n"
        "keys = keyutil.get_key('http://127.0.0.1:1', kms_pubkey='@f')\n"
        "reveal_type(keys)\n"
        "keyutil.get_key('http://127.0.0.1:1', lengths='32')\n"
    )
    # mypy asks this interpreter for its site directories: PYTHONPATH adds the wheel's.
    done = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental",
         "--python-executable", sys.executable, str(user)],
        capture_output=True, text=True, cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(site)},
    )
    revealed = r'Revealed type is "(builtins\.)?dict\[(builtins\.)?str, (builtins\.)?bytearray\]"'
    assert re.search(revealed, done.stdout), done.stdout
    assert 'Argument "lengths" to "get_key" has incompatible type "str"' in done.stdout
