"""Signing keys with provenance, end to end with real processes: `mock-kms serve` (on anvil
and on its embedded chain), `keyutil get-key` in simulated enclaves, foundry's `cast`,
`openssl`, the example ProvenanceCheck contract on anvil, and signer rotation."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from chain_fixtures import Anvil, record_gas
from cryptography.hazmat.primitives.asymmetric import ed25519
from e2e_support import KEYUTIL, MOCK_KMS, Setup, sim_init

from keyutil import keytypes
from mock_kms import chain, signer

APP_A = chain.parse_application("app-a")
APP_B = chain.parse_application("app-b")


def _mock_kms(*args: str) -> str:
    done = subprocess.run([MOCK_KMS, *args], capture_output=True, check=True, timeout=60)
    return done.stdout.decode().strip()


def _fetch(url: str) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _struct(statement: dict[str, Any]) -> tuple[bytes, str, str, bytes, bytes]:
    from keyutil.provenance import parse_statement, statement_eip712

    m = statement_eip712(parse_statement(statement))["message"]
    return (bytes.fromhex(m["application"][2:]), m["keyName"], m["keyType"],
            bytes.fromhex(m["publicKey"][2:]), bytes.fromhex(m["kmsIdentity"][2:]))


def _signature(statement: dict[str, Any]) -> bytes:
    return bytes.fromhex(statement["signer_signature"][2:])


class OnAnvil:
    """An allowlist and a ProvenanceCheck on anvil, governed by a throwaway account."""

    def __init__(self, anvil: Anvil) -> None:
        self.anvil = anvil
        self.w3 = anvil.w3()
        self.owner = anvil.new_account()
        self.allowlist = anvil.deploy(self.owner)
        check = self.send(signer.provenance_check_deploy_request(self.allowlist))
        assert check.contract_address is not None
        self.check = signer.contract_object(self.w3, "ProvenanceCheck", check.contract_address)

    def send(self, tx: chain.TxRequest) -> chain.Receipt:
        return chain.send(self.w3, tx, sender=self.owner.address, sign=self.owner)

    def allow(self, image: str, app: bytes) -> None:
        self.send(chain.add_request(self.allowlist, chain.parse_image_hash(image), app))

    def set_signer(self, address: str) -> None:
        self.send(signer.set_signer_request(self.allowlist, address))

    def belongs(self, app: bytes, statement: dict[str, Any], **change: Any) -> bool:
        struct = list(_struct(statement))
        for i, field in enumerate(("application", "keyName", "keyType", "publicKey")):
            if field in change:
                struct[i] = change[field]
        return bool(self.check.functions.belongsTo(app, tuple(struct),
                                                   _signature(statement)).call())


def _get(s: Setup, url: str, name: str, key_type: str, out: Path, *extra: str,
         sim: Path | None = None, statement: Path | None = None) -> subprocess.CompletedProcess[bytes]:
    args = ["--key", name, "--type", key_type, "--out", str(out), *extra]
    if statement is not None:
        args += ["--provenance-out", str(statement)]
    return s.get_key(url, *args, sim=sim)


def test_secp256k1_account_with_provenance_on_anvil_and_signer_rotation(
    tmp_path: Path, anvil: Anvil, cast_bin: Path
) -> None:
    s = Setup(tmp_path)
    try:
        onchain = OnAnvil(anvil)
        sim_a2, sim_b = tmp_path / "sim-a2", tmp_path / "sim-b"
        onchain.allow(s.image, APP_A)
        onchain.allow(sim_init(sim_a2), APP_A)
        onchain.allow(sim_init(sim_b), APP_B)
        first = _mock_kms("signer", "show", "--state-dir", str(s.state))
        onchain.set_signer(first)
        kms = s.kms("--rpc-url", anvil.url, "--contract", onchain.allowlist,
                    "--chain-id", str(anvil.chain_id), "--revocation-delay", "0.5",
                    "--trust-root", str(sim_a2 / "root.pem"),
                    "--trust-root", str(sim_b / "root.pem"),
                    images=()).start().wait_listening()

        # The enclave's account, and the statement it receives with it.
        key, statement_file = s.keys / "wallet.key", tmp_path / "wallet.provenance.json"
        done = _get(s, kms.url, "wallet", "secp256k1", key, statement=statement_file)
        assert done.returncode == 0, done.stderr.decode()
        statement = json.loads(statement_file.read_text())
        address = subprocess.run(
            [str(cast_bin), "wallet", "address", "--private-key", key.read_text()],
            capture_output=True, check=True, text=True, timeout=60).stdout.strip()
        assert address == statement["address"]
        assert statement["signer"] == first
        assert (statement["chain_id"], statement["contract"]) == (anvil.chain_id,
                                                                  onchain.allowlist)
        verified = subprocess.run(
            [KEYUTIL, "verify-provenance", "--kms-pubkey", s.identity, str(statement_file),
             "--application", "app-a", "--chain-id", str(anvil.chain_id),
             "--contract", onchain.allowlist, "--json"],
            capture_output=True, timeout=60)
        assert verified.returncode == 0, verified.stderr.decode()
        assert json.loads(verified.stdout)["address"] == address

        # On chain: it belongs to app-a; not to app-b, not with another public key.
        assert onchain.belongs(APP_A, statement)
        assert not onchain.belongs(APP_B, statement)
        other_key = keytypes.get("secp256k1").public((5).to_bytes(32, "big"))
        assert other_key is not None
        assert not onchain.belongs(APP_A, statement, publicKey=bytes.fromhex(other_key[2:]))
        assert onchain.check.functions.isApplicationAccount(
            APP_A, address, _struct(statement), _signature(statement)).call()
        gas = onchain.check.functions.belongsTo(
            APP_A, _struct(statement), _signature(statement)).estimate_gas()
        record_gas("anvil", "belongsTo, a KMS statement (estimateGas)", gas)

        # Anyone fetches the same statement without attestation.
        query = f"{kms.url}/v1/provenance?application=app-a&name=wallet&type=secp256k1"
        assert _fetch(query) == (200, statement)

        # Another image of app-a gets the same account; app-b another, not app-a's.
        key2, key_b = s.keys / "wallet2.key", s.keys / "wallet-b.key"
        statement_b_file = tmp_path / "b.json"
        assert _get(s, kms.url, "wallet", "secp256k1", key2, sim=sim_a2).returncode == 0
        assert key2.read_bytes() == key.read_bytes()
        done = _get(s, kms.url, "wallet", "secp256k1", key_b, sim=sim_b,
                    statement=statement_b_file)
        assert done.returncode == 0, done.stderr.decode()
        assert key_b.read_bytes() != key.read_bytes()
        statement_b = json.loads(statement_b_file.read_text())
        assert onchain.belongs(APP_B, statement_b) and not onchain.belongs(APP_A, statement_b)

        # Rotation: a new signer key, registered; the old statements stop verifying at once,
        # and within the revocation delay the KMS signs with the new key.
        second = _mock_kms("signer", "new", "--state-dir", str(s.state))
        assert second != first
        onchain.set_signer(second)
        assert not onchain.belongs(APP_A, statement)
        time.sleep(0.6)
        status, fresh = _fetch(query)
        assert status == 200 and fresh["signer"] == second
        assert onchain.belongs(APP_A, fresh)
        done = _get(s, kms.url, "wallet", "secp256k1", key, statement=statement_file)
        assert done.returncode == 0
        assert json.loads(statement_file.read_text())["signer"] == second

        # A signer this KMS does not hold: it refuses to sign (503), and says why.
        onchain.set_signer(anvil.new_account().address)
        time.sleep(0.6)
        status, error = _fetch(query)
        assert (status, error["error"]) == (503, "signer_unavailable")

        # No secret in the KMS's log or audit log: not the signer keys, not the account's key.
        logs = s.kms_log.read_bytes() + s.audit.read_bytes()
        for key_file in (s.state / "signers").iterdir():
            assert key_file.read_text().strip()[2:].encode() not in logs
        assert key.read_text()[2:].encode() not in logs
        assert first.encode() in logs or second.encode() in logs  # addresses are fine
    finally:
        s.close()


def test_ed25519_key_signs_in_the_enclave_and_verifies_against_its_statement(
    tmp_path: Path,
) -> None:
    s = Setup(tmp_path)
    try:
        kms = s.kms().start().wait_listening()
        pem, statement_file = s.keys / "signing.pem", tmp_path / "signing.json"
        done = _get(s, kms.url, "signing", "ed25519", pem, statement=statement_file)
        assert done.returncode == 0, done.stderr.decode()
        assert pem.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
        statement = json.loads(statement_file.read_text())
        assert statement["type"] == "ed25519" and statement["application"] == "0x" + APP_A.hex()
        # The application signs with openssl, as it would in the enclave; cryptography, not
        # the project's code, checks the signature against the statement's public key.
        message = tmp_path / "message.txt"
        message.write_bytes(b"price=1234;ts=1795309001")
        signature = subprocess.run(
            ["openssl", "pkeyutl", "-sign", "-inkey", str(pem), "-rawin", "-in", str(message)],
            capture_output=True, check=True, timeout=60).stdout
        public = ed25519.Ed25519PublicKey.from_public_bytes(
            bytes.fromhex(statement["public_key"][2:]))
        public.verify(signature, message.read_bytes())
        # raw: the same key as 32 bytes.
        raw = s.keys / "signing.raw"
        done = _get(s, kms.url, "signing", "ed25519", raw, "--key-format", "raw")
        assert done.returncode == 0, done.stderr.decode()
        assert keytypes.get("ed25519").public(raw.read_bytes()) == statement["public_key"]
        verified = subprocess.run(
            [KEYUTIL, "verify-provenance", "--kms-pubkey", s.identity, str(statement_file)],
            capture_output=True, timeout=60)
        assert verified.returncode == 0 and b"valid: ed25519 key 'signing'" in verified.stdout
    finally:
        s.close()


def test_raw_age_ed25519_secp256k1_of_one_name_are_unrelated_keys(tmp_path: Path) -> None:
    s = Setup(tmp_path)
    try:
        kms = s.kms().start().wait_listening()
        seeds: dict[str, bytes] = {}
        for key_type, fmt in (("raw", None), ("age", None), ("ed25519", "raw"),
                              ("secp256k1", None)):
            out = s.keys / f"k.{key_type}"
            extra = ("--key-format", fmt) if fmt else ()
            done = _get(s, kms.url, "k", key_type, out, *extra)
            assert done.returncode == 0, done.stderr.decode()
            data = out.read_bytes()
            if key_type == "age":
                line = data.decode().splitlines()[-1]
                data = keytypes.bech32_decode(line, keytypes.AGE_IDENTITY_HRP)
            elif key_type == "secp256k1":
                data = bytes.fromhex(data.decode()[2:])
            assert len(data) == 32
            seeds[key_type] = data
        assert len(set(seeds.values())) == 4
    finally:
        s.close()


def test_provenance_endpoint_and_get_key_refusals(tmp_path: Path) -> None:
    s = Setup(tmp_path)
    try:
        kms = s.kms().start().wait_listening()
        base = f"{kms.url}/v1/provenance"
        assert _fetch(f"{base}?application=app-a&name=w&type=raw")[0] == 400
        assert _fetch(f"{base}?application=app-a&name=w")[0] == 400
        assert _fetch(f"{base}?application=app-a&name=w&name=v&type=ed25519")[0] == 400
        many = "&".join(f"x{i}=1" for i in range(20))
        assert _fetch(f"{base}?{many}")[0] == 400
        status, statement = _fetch(f"{base}?application=app-a&name=w&type=secp256k1")
        assert status == 200 and statement["signer"] == _mock_kms(
            "signer", "show", "--state-dir", str(s.state))
        # get-key: --provenance-out needs exactly one typed key; formats must fit the type.
        two = s.get_key(kms.url, "--key", "a", "--key", "b", "--type", "ed25519",
                        "--out-dir", str(s.keys), "--provenance-out", str(tmp_path / "x"))
        assert two.returncode == 2 and b"one typed key" in two.stderr
        bad = _get(s, kms.url, "w", "secp256k1", s.keys / "w", "--key-format", "pem")
        assert bad.returncode == 2 and b"hex" in bad.stderr
        unwritable = _get(s, kms.url, "w", "ed25519", s.keys / "w",
                          statement=tmp_path / "no-such-dir" / "w.json")
        assert unwritable.returncode == 7
        assert not (s.keys / "w").exists(), "no key is written when its statement is not"
    finally:
        s.close()


def test_mock_kms_signer_show_and_new(tmp_path: Path) -> None:
    shown = json.loads(_mock_kms("signer", "show", "--json", "--state-dir", str(tmp_path)))
    assert shown["signers"] == [shown["signer"]]
    key_file = next((tmp_path / "signers").iterdir())
    assert shown["signer"] in key_file.name and key_file.stat().st_mode & 0o077 == 0
    assert key_file.read_text().strip()[2:] not in json.dumps(shown)
    new = _mock_kms("signer", "new", "--state-dir", str(tmp_path))
    assert _mock_kms("signer", "show", "--state-dir", str(tmp_path)) == new != shown["signer"]
    blocked = tmp_path / "blocked"
    blocked.mkdir()
    (blocked / "signers").write_text("")  # where the key directory should be
    done = subprocess.run([MOCK_KMS, "signer", "new", "--state-dir", str(blocked)],
                          capture_output=True, timeout=60)
    assert done.returncode == 1 and b"cannot write the signer key" in done.stderr


def test_serve_with_an_unusable_signer_directory_exits_1(tmp_path: Path) -> None:
    s = Setup(tmp_path)
    try:
        (s.state / "signers").write_text("")  # where the key directory should be
        kms = s.kms().start()
        assert kms.proc is not None
        assert kms.proc.wait(60) == 1
        assert "cannot use the signer keys" in s.kms_log.read_text()
    finally:
        s.close()
