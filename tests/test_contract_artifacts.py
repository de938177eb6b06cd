"""The committed ABI and bytecode are exactly what the pinned solc-js makes of the source."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from eth_utils.crypto import keccak

from mock_kms import chain

ROOT = Path(__file__).resolve().parent.parent
ARTIFACT = ROOT / "contracts" / "artifacts" / "ImageAllowlist.json"
SHIPPED = ROOT / "mock_kms" / "data" / "ImageAllowlist.json"


@pytest.fixture(scope="module")
def fresh_compile() -> bytes:
    node = shutil.which("node")
    assert node is not None, "node is required (the test command installs solc with npm ci)"
    done = subprocess.run([node, "contracts/compile.js", "--stdout"], cwd=ROOT,
                          capture_output=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr.decode()
    return done.stdout


def test_recompiling_reproduces_the_committed_artifact_byte_for_byte(
    fresh_compile: bytes,
) -> None:
    assert fresh_compile == ARTIFACT.read_bytes()


def test_the_package_ships_the_same_artifact() -> None:
    assert SHIPPED.read_bytes() == ARTIFACT.read_bytes()


def test_compile_check_mode_passes() -> None:
    done = subprocess.run(["node", "contracts/compile.js", "--check"], cwd=ROOT,
                          capture_output=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr.decode()


def test_compiler_is_pinned_exactly_everywhere() -> None:
    package = json.loads((ROOT / "package.json").read_text())
    lock = json.loads((ROOT / "package-lock.json").read_text())
    artifact = json.loads(ARTIFACT.read_text())
    for name, version in package["devDependencies"].items():
        assert version[0].isdigit(), f"{name} must be pinned exactly, found {version}"
        assert lock["packages"][f"node_modules/{name}"]["version"] == version
    solc = package["devDependencies"]["solc"]
    assert artifact["compiler"]["version"].startswith(solc + "+")
    source = (ROOT / artifact["sourceName"]).read_text()
    assert f"pragma solidity {solc};" in source


def test_source_hash_in_artifact_matches_source() -> None:
    import hashlib

    artifact = json.loads(ARTIFACT.read_text())
    source = (ROOT / artifact["sourceName"]).read_bytes()
    assert artifact["sourceSha256"] == hashlib.sha256(source).hexdigest()


def test_abi_keeps_dstack_names_and_the_kms_view() -> None:
    abi = chain.load_artifact().abi
    functions = {
        f["name"]: ([i["type"] for i in f["inputs"]], [o["type"] for o in f["outputs"]])
        for f in abi if f["type"] == "function"
    }
    assert functions["allowedOsImages"] == (["bytes32"], ["bool"])
    assert functions["imageStatus"] == (["bytes32"], ["bool", "bytes32"])
    assert functions["addOsImageHash"] == (["bytes32", "bytes32"], [])
    assert functions["removeOsImageHash"] == (["bytes32"], [])
    assert functions["transferOwnership"] == (["address"], [])
    assert functions["acceptOwnership"] == ([], [])
    events = {e["name"]: [i["type"] for i in e["inputs"]] for e in abi if e["type"] == "event"}
    assert events["OsImageHashAdded"] == ["bytes32"]
    assert events["OsImageHashRemoved"] == ["bytes32"]
    # chain.py encodes from the ABI: the bytes are those of the signatures.
    image, app = bytes([0xA1]) * 32, bytes([0xB2]) * 32
    request = chain.add_request("0x" + "11" * 20, image, app)
    assert request.data == keccak(text="addOsImageHash(bytes32,bytes32)")[:4] + image + app
    errors = {e["name"] for e in abi if e["type"] == "error"}
    assert errors == set(chain._REVERT_SENTENCES), (
        "every custom error of the contract has a sentence in chain.py")
