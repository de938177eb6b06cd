"""The NSM simulator writes documents in exactly the real format, under its own CA."""

from __future__ import annotations

import datetime
import json
import stat
from pathlib import Path

import cbor2
import pytest
from cryptography import x509

from keyutil.nsm import NsmError
from keyutil.simulator import SimulatedNSM
from mock_kms.attestation import parse_attestation
from mock_kms.errors import AttestationError, ErrorCode
from mock_kms.roots import load_pem_roots
from mock_kms.verifier import AttestationVerifier

T0 = datetime.datetime(2026, 3, 1, 12, 0, 0, tzinfo=datetime.UTC)
PCR0, PCR1, PCR2 = b"\xa0" * 48, b"\xa1" * 48, b"\xa2" * 48


@pytest.fixture
def nsm(tmp_path: Path) -> SimulatedNSM:
    return SimulatedNSM.init(tmp_path / "sim", pcr0=PCR0, pcr1=PCR1, pcr2=PCR2, clock=lambda: T0)


def sim_verifier(directory: Path) -> AttestationVerifier:
    return AttestationVerifier(trusted_roots=load_pem_roots(directory / "root.pem"))


def test_document_has_the_real_wire_format(nsm: SimulatedNSM) -> None:
    raw = nsm.attestation(nonce=b"n" * 32)
    assert raw[:8].hex() == "8444a1013822a059"  # untagged, {1: -35}, {} , payload bstr
    outer = cbor2.loads(raw)
    assert outer[1] == {} and len(outer[3]) == 96
    payload = cbor2.loads(outer[2])
    assert list(payload) == [
        "module_id", "digest", "timestamp", "pcrs", "certificate", "cabundle",
        "public_key", "user_data", "nonce",
    ]  # fmt: skip
    assert payload["digest"] == "SHA384"
    assert payload["public_key"] is None and payload["user_data"] is None
    assert sorted(payload["pcrs"]) == list(range(16))
    assert {len(p) for p in payload["pcrs"].values()} == {48}
    assert len(payload["cabundle"]) == 4


def test_chain_mimics_aws_levels_and_windows(nsm: SimulatedNSM) -> None:
    doc = parse_attestation(nsm.attestation())
    root, regional, zonal, instance = (x509.load_der_x509_certificate(c) for c in doc.cabundle)
    leaf = x509.load_der_x509_certificate(doc.certificate)
    assert (nsm.directory / "root.pem").read_bytes() == root.public_bytes(_pem())

    def span(c: x509.Certificate) -> datetime.timedelta:
        return c.not_valid_after_utc - c.not_valid_before_utc

    assert span(regional) == datetime.timedelta(days=20)
    assert datetime.timedelta(days=5) < span(zonal) < datetime.timedelta(days=6)
    assert span(instance) == datetime.timedelta(days=1)
    assert span(leaf) == datetime.timedelta(hours=3, seconds=3)
    path_lengths = [
        c.extensions.get_extension_for_class(x509.BasicConstraints).value.path_length
        for c in (regional, zonal, instance)
    ]
    assert path_lengths == [2, 1, 0]
    leaf_ext = {e.oid for e in leaf.extensions}
    assert x509.AuthorityKeyIdentifier.oid not in leaf_ext  # like AWS: no AKI
    assert x509.SubjectAlternativeName.oid not in leaf_ext


def test_document_verifies_under_simulator_root_and_reports_its_pcrs(nsm: SimulatedNSM) -> None:
    verified = sim_verifier(nsm.directory).verify(nsm.attestation(user_data=b"u"), at=T0)
    assert verified.document.pcrs[0] == PCR0
    assert verified.os_image_hash == nsm.identity.os_image_hash
    assert verified.user_data == b"u"


def test_document_refused_under_aws_root(nsm: SimulatedNSM) -> None:
    with pytest.raises(AttestationError) as err:
        AttestationVerifier.aws().verify(nsm.attestation(), at=T0)
    assert err.value.code == ErrorCode.CHAIN_UNTRUSTED


def test_independent_cose_library_verifies_the_signature(nsm: SimulatedNSM) -> None:
    from pycose.keys import EC2Key
    from pycose.messages import Sign1Message

    raw = nsm.attestation(nonce=b"n")
    # pycose's own decode() wants tag 18, which AWS omits: hand it the decoded array.
    message = Sign1Message.from_cose_obj(list(cbor2.loads(raw)), True)
    leaf = x509.load_der_x509_certificate(parse_attestation(raw).certificate)
    numbers = leaf.public_key().public_numbers()  # type: ignore[union-attr]
    message.key = EC2Key(
        crv="P_384", x=numbers.x.to_bytes(48, "big"), y=numbers.y.to_bytes(48, "big")
    )
    assert message.verify_signature()


def test_indefinite_length_payload_verifies(nsm: SimulatedNSM) -> None:
    raw = nsm.document(T0, indefinite=True)
    assert b"\xbf" in raw[:16]
    assert sim_verifier(nsm.directory).verify(raw, at=T0).module_id == nsm.identity.module_id


def test_init_directory_modes(nsm: SimulatedNSM) -> None:
    directory = nsm.directory
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    for key in (directory / "ca").glob("*.key.pem"):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert len(list((directory / "ca").glob("*.key.pem"))) == 4
    enclave = json.loads((directory / "enclave.json").read_text())
    assert enclave["pcrs"]["0"] == PCR0.hex()
    assert enclave["os_image_hash"] == nsm.identity.os_image_hash


def test_debug_mode_zeroes_pcr0_to_2_and_8(tmp_path: Path) -> None:
    nsm = SimulatedNSM.init(tmp_path / "dbg", debug=True, clock=lambda: T0)
    doc = parse_attestation(nsm.attestation())
    assert all(doc.pcrs[i] == bytes(48) for i in (0, 1, 2, 8))
    assert doc.pcrs[3] != bytes(48) and doc.pcrs[4] != bytes(48)
    assert doc.is_debug


def test_reinit_of_existing_directory_is_refused(nsm: SimulatedNSM) -> None:
    with pytest.raises(NsmError) as err:
        SimulatedNSM.init(nsm.directory)
    assert err.value.code == "sim_exists"


def test_intermediates_are_reissued_when_they_run_out(nsm: SimulatedNSM) -> None:
    later = T0 + datetime.timedelta(days=30)
    old_instance = (nsm.directory / "ca" / "instance.pem").read_bytes()
    reloaded = SimulatedNSM.load(nsm.directory, clock=lambda: later)
    raw = reloaded.attestation()
    assert (nsm.directory / "ca" / "instance.pem").read_bytes() != old_instance
    assert sim_verifier(nsm.directory).verify(raw, at=later).module_id == nsm.identity.module_id


def test_damaged_simulator_directory_is_reported(nsm: SimulatedNSM) -> None:
    (nsm.directory / "enclave.json").write_text("{not json")
    with pytest.raises(NsmError) as err:
        SimulatedNSM.load(nsm.directory)
    assert err.value.code == "sim_invalid"


def test_oversize_fields_refused_like_the_device(nsm: SimulatedNSM) -> None:
    with pytest.raises(NsmError) as err:
        nsm.attestation(user_data=b"x" * 1025)
    assert err.value.code == "nsm_field_too_large"


def _pem():  # type: ignore[no-untyped-def]
    from cryptography.hazmat.primitives.serialization import Encoding

    return Encoding.PEM
