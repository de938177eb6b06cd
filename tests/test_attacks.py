"""The negative corpus of the attestation verifier: one test per attack, exact error codes.

Every document here is forged with the NSM simulator's building blocks at a fixed time T0
(the simulator's clock is injected; nothing sleeps or patches time). :class:`Forge` makes a
good document and variations of it, and re-signs with the leaf key after tampering, so that
each attack document carries exactly one defect: the one under test. A 2 KiB ``user_data``
is correctly signed, so the refusal is FIELD_TOO_LARGE and not a signature error.

Unless an attack is about time, documents are made at T0 and verified at T0 + 5 s by a fresh
:class:`AttestationVerifier` that trusts only the simulator's root (fresh, so that the chain
cache of one test never answers for another; the cache has tests of its own at the end).
"""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import cbor2
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from hypothesis import example, given, settings
from hypothesis import strategies as st

from keyutil.simulator import (
    CA_LEVELS,
    ES384_PROTECTED_HEADER,
    SimulatedNSM,
    SimulatorCA,
    der,
    encode_map,
    make_intermediate,
    make_leaf,
    new_key,
    payload_fields,
    sign1,
)
from mock_kms.attestation import parse_attestation
from mock_kms.config import LIMITS
from mock_kms.errors import AttestationError, ErrorCode
from mock_kms.verifier import AttestationPolicy, AttestationVerifier, VerifiedAttestation

UTC = datetime.UTC
T0 = datetime.datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)
AT = T0 + datetime.timedelta(seconds=5)  # default verification time
SECOND = datetime.timedelta(seconds=1)
LEAF_BACKDATE = datetime.timedelta(seconds=3)
LEAF_LIFETIME = datetime.timedelta(hours=3)
P384_ORDER = int(
    "ffffffffffffffffffffffffffffffffffffffffffffffffc7634d81f4372ddf"
    "581a0db248b0a77aecec196accc52973",
    16,
)
VECTORS = Path(__file__).parent / "vectors"
AWS_VECTOR = "aws-nondebug-2022-10-13.cose"
AWS_VECTOR_MS = 1665651482136

Pairs = list[tuple[Any, Any]]
Edit = Callable[[Pairs], Pairs]


# -- the forge -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Leaf:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @property
    def der(self) -> bytes:
        return der(self.cert)


def with_field(pairs: Pairs, name: str, value: Any) -> Pairs:
    """``pairs`` with the value of ``name`` replaced, in place in the field order."""
    assert any(k == name for k, _ in pairs), name
    return [(k, value if k == name else v) for k, v in pairs]


def without_field(pairs: Pairs, name: str) -> Pairs:
    return [(k, v) for k, v in pairs if k != name]


def cose(data: bytes) -> list[Any]:
    """The four items of an (untagged) COSE_Sign1, decoded leniently for re-assembly."""
    items = cbor2.loads(data)
    assert isinstance(items, list) and len(items) == 4
    return items


def issue_cert(
    *,
    subject: x509.Name,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Name,
    issuer_key: ec.EllipticCurvePrivateKey,
    not_before: datetime.datetime,
    not_after: datetime.datetime,
    ca: bool,
    path_length: int | None = None,
) -> x509.Certificate:
    """A certificate with free choice of BasicConstraints (the simulator fixes them)."""
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=path_length), critical=True)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), False
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=ca,
                crl_sign=ca,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(issuer_key, hashes.SHA384())
    )


class Forge:
    """A simulator CA and enclave made at T0, and a factory of (mis)signed documents."""

    def __init__(self, directory: Path, *, debug: bool = False) -> None:
        self.nsm = SimulatedNSM.init(directory, debug=debug, clock=lambda: T0)
        self.ca: SimulatorCA = self.nsm.ca
        self.root = self.ca.root

    # certificates ---------------------------------------------------------------------
    def level(self, name: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        if name == "root":
            return self.ca.root, self.ca.keys["root"]
        return self.ca.intermediates[name], self.ca.keys[name]

    def leaf(
        self,
        *,
        when: datetime.datetime = T0,
        key: ec.EllipticCurvePrivateKey | None = None,
        issuer: x509.Certificate | None = None,
        issuer_key: ec.EllipticCurvePrivateKey | None = None,
        not_before: datetime.datetime | None = None,
        not_after: datetime.datetime | None = None,
    ) -> Leaf:
        """A leaf like the NSM's (valid from ``when`` - 3 s for 3 h), by default under the
        instance CA."""
        key = key or new_key()
        default_issuer, default_key = self.ca.issuer
        cert = make_leaf(
            module_id=self.nsm.identity.module_id,
            key=key,
            issuer=issuer or default_issuer,
            issuer_key=issuer_key or default_key,
            not_before=not_before or when - LEAF_BACKDATE,
            not_after=not_after or when + LEAF_LIFETIME,
        )
        return Leaf(cert, key)

    def reissue(
        self,
        name: str,
        *,
        not_before: datetime.datetime | None = None,
        not_after: datetime.datetime | None = None,
    ) -> x509.Certificate:
        """The intermediate ``name`` again (same key, same subject, same issuer), with
        another validity window: everything it signed still chains to it."""
        names = [lvl[0] for lvl in CA_LEVELS]
        index = names.index(name)
        old, key = self.level(name)
        issuer, issuer_key = self.level("root" if index == 0 else names[index - 1])
        common_name = old.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value
        return make_intermediate(
            common_name=str(common_name),
            key=key,
            issuer=issuer,
            issuer_key=issuer_key,
            not_before=not_before or old.not_valid_before_utc,
            not_after=not_after or old.not_valid_after_utc,
            path_length=CA_LEVELS[index][3],
        )

    def cabundle(self, **replace: x509.Certificate) -> list[bytes]:
        """[root, regional, zonal, instance], with any level swapped for another cert."""
        certs = [self.ca.root] + [self.ca.intermediates[lvl[0]] for lvl in CA_LEVELS]
        names = ["root"] + [lvl[0] for lvl in CA_LEVELS]
        return [der(replace.get(n, c)) for n, c in zip(names, certs, strict=True)]

    # documents ------------------------------------------------------------------------
    def fields(
        self,
        *,
        when: datetime.datetime = T0,
        leaf: Leaf | None = None,
        cabundle: Sequence[bytes] | None = None,
        pcrs: Mapping[int, bytes] | None = None,
        user_data: bytes | None = None,
        nonce: bytes | None = None,
        public_key: bytes | None = None,
        digest: str = "SHA384",
    ) -> Pairs:
        """The nine payload fields, in the NSM's order, of a good document made ``when``."""
        return payload_fields(
            module_id=self.nsm.identity.module_id,
            timestamp_ms=int(when.timestamp() * 1000),
            pcrs=self.nsm.identity.pcrs if pcrs is None else pcrs,
            certificate=(leaf or self.leaf(when=when)).der,
            cabundle=self.cabundle() if cabundle is None else cabundle,
            public_key=public_key,
            user_data=user_data,
            nonce=nonce,
            digest=digest,
        )

    def document(
        self,
        *,
        when: datetime.datetime = T0,
        leaf: Leaf | None = None,
        cabundle: Sequence[bytes] | None = None,
        edit: Edit | None = None,
        rewrite: Callable[[bytes], bytes] | None = None,
        indefinite: bool = False,
        protected: bytes = ES384_PROTECTED_HEADER,
        unprotected: Mapping[Any, Any] | None = None,
        tagged: bool = False,
        signer: ec.EllipticCurvePrivateKey | None = None,
        **field_values: Any,
    ) -> bytes:
        """A COSE_Sign1 document, signed by the leaf key (or ``signer``) after every change.

        ``edit`` rewrites the payload pairs (duplicates and all); ``rewrite`` then rewrites
        the encoded payload bytes.
        """
        leaf = leaf or self.leaf(when=when)
        pairs = self.fields(when=when, leaf=leaf, cabundle=cabundle, **field_values)
        if edit is not None:
            pairs = edit(pairs)
        payload = encode_map(pairs, indefinite=indefinite)
        if rewrite is not None:
            payload = rewrite(payload)
        return sign1(
            payload,
            signer or leaf.key,
            protected=protected,
            unprotected=unprotected,
            tagged=tagged,
        )

    def verifier(self, policy: AttestationPolicy | None = None) -> AttestationVerifier:
        return AttestationVerifier(trusted_roots=[self.root], policy=policy)

    def verify(
        self,
        data: bytes,
        *,
        at: datetime.datetime = AT,
        policy: AttestationPolicy | None = None,
    ) -> VerifiedAttestation:
        return self.verifier(policy).verify(data, at=at)


def refused(
    code: ErrorCode,
    data: bytes,
    verifier: AttestationVerifier,
    *,
    at: datetime.datetime = AT,
) -> AttestationError:
    """Assert that ``verifier`` refuses ``data`` at ``at`` with exactly ``code``."""
    with pytest.raises(AttestationError) as info:
        verifier.verify(data, at=at)
    assert info.value.code is code, str(info.value)
    return info.value


@pytest.fixture(scope="module")
def forge(tmp_path_factory: pytest.TempPathFactory) -> Forge:
    return Forge(tmp_path_factory.mktemp("attacks") / "sim")


@pytest.fixture(scope="module")
def other(tmp_path_factory: pytest.TempPathFactory) -> Forge:
    """A second, independent simulator CA (same certificate names, other keys)."""
    return Forge(tmp_path_factory.mktemp("attacks") / "other")


def expect(forge: Forge, code: ErrorCode, data: bytes, **kwargs: Any) -> AttestationError:
    return refused(code, data, forge.verifier(), **kwargs)


# -- the baseline: what the forge makes by default is good ---------------------------------


def test_forged_baseline_document_verifies(forge: Forge) -> None:
    """Every attack below is one change away from this document, which must verify."""
    verified = forge.verify(forge.document(nonce=b"n" * 32, user_data=b"u" * 16))
    assert verified.module_id == forge.nsm.identity.module_id
    assert verified.os_image_hash == forge.nsm.identity.os_image_hash
    assert verified.debug is False


def test_simulator_attestation_verifies_at_injected_time(forge: Forge) -> None:
    """The simulator's own output at its injected clock is good under its root."""
    assert forge.verify(forge.nsm.attestation(nonce=b"x")).nonce == b"x"


# -- trust anchors and certificate chain ---------------------------------------------------


def test_wrong_root(forge: Forge, other: Forge) -> None:
    """A verifier that trusts another CA's root must not accept this CA's documents."""
    refused(ErrorCode.CHAIN_UNTRUSTED, forge.document(), other.verifier())


def test_simulator_document_under_aws_root(forge: Forge) -> None:
    """Simulator documents are refused by a production verifier that trusts only AWS."""
    refused(ErrorCode.CHAIN_UNTRUSTED, forge.document(), AttestationVerifier.aws())
    forge.verify(forge.document())  # and the same kind of document is fine under its own root


def test_lookalike_root(forge: Forge, other: Forge) -> None:
    """A whole chain from an attacker CA whose certificates carry the very same names."""
    assert other.root.subject == forge.root.subject
    expect(forge, ErrorCode.CHAIN_UNTRUSTED, other.document())


def test_trusted_root_spliced_onto_foreign_chain(forge: Forge, other: Forge) -> None:
    """cabundle[0] is the trusted root, but the intermediates below it are the attacker's."""
    bundle = [der(forge.root), *other.cabundle()[1:]]
    expect(forge, ErrorCode.CHAIN_INVALID, other.document(cabundle=bundle))


def test_self_signed_leaf(forge: Forge) -> None:
    """A leaf that signs itself must not borrow trust from a genuine cabundle beside it."""
    key = new_key()
    first = forge.leaf(key=key)
    selfsigned = forge.leaf(key=key, issuer=first.cert, issuer_key=key)
    assert selfsigned.cert.issuer == selfsigned.cert.subject
    expect(forge, ErrorCode.CHAIN_INVALID, forge.document(leaf=selfsigned))


def test_leaf_signed_by_untrusted_key(forge: Forge) -> None:
    """A leaf naming the instance CA as issuer but signed by some other key."""
    issuer, _ = forge.level("instance")
    leaf = forge.leaf(issuer=issuer, issuer_key=new_key())
    expect(forge, ErrorCode.CHAIN_INVALID, forge.document(leaf=leaf))


def test_truncated_cabundle_without_instance(forge: Forge) -> None:
    """Dropping the leaf's issuer leaves no path from the leaf to the root."""
    expect(forge, ErrorCode.CHAIN_INVALID, forge.document(cabundle=forge.cabundle()[:3]))


def test_cabundle_of_root_only(forge: Forge) -> None:
    """A cabundle of just the root cannot vouch for a leaf issued three levels below it."""
    expect(forge, ErrorCode.CHAIN_INVALID, forge.document(cabundle=forge.cabundle()[:1]))


def test_reordered_cabundle(forge: Forge) -> None:
    """A pool in the wrong order would chain in the library; the cabundle must be the path."""
    # [root, zonal, regional, instance]: cryptography builds leaf > instance > zonal >
    # regional > root from this pool; our verifier insists on the cabundle's order.
    root, regional, zonal, instance = forge.cabundle()
    expect(
        forge, ErrorCode.CHAIN_INVALID, forge.document(cabundle=[root, zonal, regional, instance])
    )


def test_overlong_cabundle(forge: Forge) -> None:
    """One certificate over the cabundle limit: refused before any of them is looked at."""
    bundle = (forge.cabundle() * 2)[: LIMITS.max_cabundle_length + 1]
    assert len(bundle) == LIMITS.max_cabundle_length + 1
    expect(forge, ErrorCode.CABUNDLE_LENGTH, forge.document(cabundle=bundle))


def test_unused_valid_cert_appended_to_cabundle(forge: Forge) -> None:
    """A valid sibling CA appended within the limit is unused by the path: refused."""
    zonal, zonal_key = forge.level("zonal")
    sibling = make_intermediate(
        common_name="sibling.instance.simulated.nitro-enclaves",
        key=new_key(),
        issuer=zonal,
        issuer_key=zonal_key,
        not_before=T0 - datetime.timedelta(hours=1),
        not_after=T0 + datetime.timedelta(days=1),
        path_length=0,
    )
    bundle = [*forge.cabundle(), der(sibling)]
    expect(forge, ErrorCode.CHAIN_INVALID, forge.document(cabundle=bundle))


def test_duplicated_intermediate_in_cabundle(forge: Forge) -> None:
    """The instance certificate twice: every cabundle entry must be used exactly once."""
    bundle = [*forge.cabundle(), forge.cabundle()[3]]
    expect(forge, ErrorCode.CHAIN_INVALID, forge.document(cabundle=bundle))


def test_empty_cabundle(forge: Forge) -> None:
    """No root at all: refused at parse time, not by an index error later."""
    expect(forge, ErrorCode.CABUNDLE_LENGTH, forge.document(cabundle=[]))


def test_expired_intermediate(forge: Forge) -> None:
    """The zonal CA re-issued (same key) to end before T0: every level's window counts."""
    zonal = forge.reissue(
        "zonal", not_before=T0 - datetime.timedelta(days=3), not_after=T0 - SECOND
    )
    expect(
        forge, ErrorCode.CERTIFICATE_EXPIRED, forge.document(cabundle=forge.cabundle(zonal=zonal))
    )


def test_not_yet_valid_intermediate(forge: Forge) -> None:
    """The zonal CA re-issued (same key) to start after the verification time."""
    zonal = forge.reissue("zonal", not_before=AT + SECOND)
    bundle = forge.cabundle(zonal=zonal)
    expect(forge, ErrorCode.CERTIFICATE_NOT_YET_VALID, forge.document(cabundle=bundle))


def test_non_ca_intermediate(forge: Forge) -> None:
    """An instance certificate with BasicConstraints ca=False must not issue leaves."""
    old, key = forge.level("instance")
    zonal, zonal_key = forge.level("zonal")
    instance = issue_cert(
        subject=old.subject,
        key=key,
        issuer=zonal.subject,
        issuer_key=zonal_key,
        not_before=old.not_valid_before_utc,
        not_after=old.not_valid_after_utc,
        ca=False,
    )
    bundle = forge.cabundle(instance=instance)
    expect(forge, ErrorCode.CHAIN_INVALID, forge.document(cabundle=bundle))


def test_path_length_violation(forge: Forge) -> None:
    """An extra CA under the instance CA (pathlen 0) issuing the leaf."""
    instance, instance_key = forge.level("instance")
    extra_key = new_key()
    extra = make_intermediate(
        common_name="extra.level.simulated.nitro-enclaves",
        key=extra_key,
        issuer=instance,
        issuer_key=instance_key,
        not_before=T0 - datetime.timedelta(minutes=5),
        not_after=T0 + datetime.timedelta(hours=12),
        path_length=None,
    )
    leaf = forge.leaf(issuer=extra, issuer_key=extra_key)
    bundle = [*forge.cabundle(), der(extra)]
    expect(forge, ErrorCode.CHAIN_INVALID, forge.document(leaf=leaf, cabundle=bundle))


def test_leaf_issued_by_root_directly(forge: Forge) -> None:
    """A root-signed leaf must not pass as the end of a four-level cabundle it never used."""
    # The path built is [leaf, root], which is not [leaf, instance, zonal, regional, root].
    root, root_key = forge.level("root")
    leaf = forge.leaf(issuer=root, issuer_key=root_key)
    expect(forge, ErrorCode.CHAIN_INVALID, forge.document(leaf=leaf))


def test_leaf_issued_by_zonal_skipping_instance(forge: Forge) -> None:
    """The zonal CA signs the leaf: the instance certificate is then unused."""
    zonal, zonal_key = forge.level("zonal")
    leaf = forge.leaf(issuer=zonal, issuer_key=zonal_key)
    expect(forge, ErrorCode.CHAIN_INVALID, forge.document(leaf=leaf))


def test_leaf_is_a_ca(forge: Forge) -> None:
    """A leaf with ca=True fails the end-entity policy (only AKI and SAN are relaxed)."""
    instance, instance_key = forge.level("instance")
    key = new_key()
    cert = issue_cert(
        subject=x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "ca-leaf")]),
        key=key,
        issuer=instance.subject,
        issuer_key=instance_key,
        not_before=T0 - LEAF_BACKDATE,
        not_after=T0 + LEAF_LIFETIME,
        ca=True,
        path_length=0,
    )
    expect(forge, ErrorCode.CHAIN_INVALID, forge.document(leaf=Leaf(cert, key)))


def test_leaf_expired(forge: Forge) -> None:
    """Verified after the leaf's notAfter: a generous max_age must not stretch the leaf."""
    data = forge.document()
    policy = AttestationPolicy(max_age=datetime.timedelta(days=1))
    at = T0 + LEAF_LIFETIME + SECOND
    refused(ErrorCode.CERTIFICATE_EXPIRED, data, forge.verifier(policy), at=at)


def test_leaf_not_yet_valid(forge: Forge) -> None:
    """A leaf whose window starts after the verification time."""
    leaf = forge.leaf(not_before=AT + SECOND)
    expect(forge, ErrorCode.CERTIFICATE_NOT_YET_VALID, forge.document(leaf=leaf))


def test_leaf_with_p256_key(forge: Forge) -> None:
    """ES384 means P-384: a P-256 leaf (signing correctly with its key) is malformed."""
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = forge.leaf(key=key)
    expect(forge, ErrorCode.CERTIFICATE_MALFORMED, forge.document(leaf=leaf))


def test_garbage_certificate_bytes(forge: Forge) -> None:
    """A certificate field that is bytes but not DER."""
    data = forge.document(edit=lambda p: with_field(p, "certificate", b"\x30\x82garbage" * 8))
    expect(forge, ErrorCode.CERTIFICATE_MALFORMED, data)


def test_certificate_with_trailing_bytes(forge: Forge) -> None:
    """A valid leaf DER followed by junk is not one DER certificate."""
    leaf = forge.leaf()
    data = forge.document(leaf=leaf, edit=lambda p: with_field(p, "certificate", leaf.der + b"\0"))
    expect(forge, ErrorCode.CERTIFICATE_MALFORMED, data)


def test_garbage_intermediate(forge: Forge) -> None:
    """A cabundle entry that is not DER."""
    bundle = forge.cabundle()
    bundle[2] = b"not a certificate"
    expect(forge, ErrorCode.CERTIFICATE_MALFORMED, forge.document(cabundle=bundle))


# -- COSE signature ------------------------------------------------------------------------


def test_tampered_payload_byte(forge: Forge) -> None:
    """One PCR0 byte flipped after signing (no re-signing)."""
    data = bytearray(forge.document())
    pcr0 = forge.nsm.identity.pcrs[0]
    at = bytes(data).index(pcr0) + 17
    data[at] ^= 0x01
    tampered = parse_attestation(bytes(data))
    assert tampered.pcrs[0] != pcr0  # the meaning changed; the form did not
    expect(forge, ErrorCode.SIGNATURE_INVALID, bytes(data))


def test_tampered_signature(forge: Forge) -> None:
    """One bit of s flipped."""
    data = bytearray(forge.document())
    data[-1] ^= 0x01
    expect(forge, ErrorCode.SIGNATURE_INVALID, bytes(data))


def test_signature_by_another_key(forge: Forge) -> None:
    """Correct ES384 by a key that is not the leaf's."""
    expect(forge, ErrorCode.SIGNATURE_INVALID, forge.document(signer=new_key()))


def test_signature_all_zero(forge: Forge) -> None:
    """r = s = 0, the degenerate signature that broken ECDSA verifiers accept."""
    items = cose(forge.document())
    items[3] = bytes(96)
    expect(forge, ErrorCode.SIGNATURE_INVALID, cbor2.dumps(items))


def test_signature_spliced_from_another_document(forge: Forge) -> None:
    """A genuine signature over another payload by the same leaf key."""
    leaf = forge.leaf()
    first, second = cose(forge.document(leaf=leaf)), cose(forge.document(leaf=leaf, nonce=b"2"))
    first[3] = second[3]
    expect(forge, ErrorCode.SIGNATURE_INVALID, cbor2.dumps(first))


def test_high_s_signature_accepted(forge: Forge) -> None:
    """Positive: (r, n - s) is the same signature; genuine AWS documents are often high-S."""
    items = cose(forge.document())
    r, s = items[3][:48], int.from_bytes(items[3][48:], "big")
    items[3] = r + (P384_ORDER - s).to_bytes(48, "big")
    assert forge.verify(cbor2.dumps(items)).debug is False


def test_signature_95_bytes(forge: Forge) -> None:
    """A signature one byte short is refused before any cryptography."""
    items = cose(forge.document())
    items[3] = items[3][:95]
    expect(forge, ErrorCode.COSE_SIGNATURE_LENGTH, cbor2.dumps(items))


# -- COSE headers --------------------------------------------------------------------------


def test_es256_protected_header(forge: Forge) -> None:
    """{1: -7} (ES256) in the protected header: only ES384 exists here."""
    data = forge.document(protected=encode_map([(1, -7)]))
    expect(forge, ErrorCode.COSE_ALGORITHM, data)


def test_algorithm_only_in_unprotected_header(forge: Forge) -> None:
    """An algorithm outside the signature could be swapped: the unprotected map must be empty."""
    # Protected b"", unprotected {1: -35}: the parser looks at the unprotected header first,
    # so the code is COSE_UNPROTECTED_HEADER (not COSE_ALGORITHM).
    data = forge.document(protected=b"", unprotected={1: -35})
    expect(forge, ErrorCode.COSE_UNPROTECTED_HEADER, data)


def test_unprotected_header_kid(forge: Forge) -> None:
    """Anything in the unprotected header could steer a verifier and is not signed."""
    expect(forge, ErrorCode.COSE_UNPROTECTED_HEADER, forge.document(unprotected={4: b"kid"}))


def test_empty_protected_header(forge: Forge) -> None:
    """No algorithm anywhere."""
    expect(forge, ErrorCode.COSE_ALGORITHM, forge.document(protected=b""))


def test_extra_protected_header_field(forge: Forge) -> None:
    """{1: -35, 4: kid}: signed, but not the one header real documents carry."""
    data = forge.document(protected=encode_map([(1, -35), (4, b"kid")]))
    expect(forge, ErrorCode.COSE_ALGORITHM, data)


def test_non_minimal_protected_header_encoding(forge: Forge) -> None:
    """{1: -35} with the key in a non-minimal CBOR encoding: same meaning, other bytes."""
    expect(forge, ErrorCode.COSE_ALGORITHM, forge.document(protected=bytes.fromhex("a118013822")))


def test_duplicate_key_in_protected_header(forge: Forge) -> None:
    """{1: -35, 1: -7}: which algorithm wins depends on the decoder; refuse both."""
    data = forge.document(protected=encode_map([(1, -35), (1, -7)]))
    expect(forge, ErrorCode.CBOR_DUPLICATE_KEY, data)


# -- CBOR and COSE framing -----------------------------------------------------------------


def test_not_cbor_at_all(forge: Forge) -> None:
    """Bytes that are no CBOR item (reserved additional information 28)."""
    expect(forge, ErrorCode.CBOR_MALFORMED, b"\x1c" + forge.document())


def test_empty_input(forge: Forge) -> None:
    """Zero bytes."""
    expect(forge, ErrorCode.CBOR_MALFORMED, b"")


def test_truncated_document(forge: Forge) -> None:
    """A document cut short in the middle of the signature."""
    expect(forge, ErrorCode.CBOR_MALFORMED, forge.document()[:-10])


def test_deeply_nested_cbor(forge: Forge) -> None:
    """Ten thousand nested arrays must hit the depth limit, not the interpreter's stack."""
    expect(forge, ErrorCode.CBOR_MALFORMED, b"\x81" * 10_000 + b"\x00")


def test_deeply_nested_payload_field(forge: Forge) -> None:
    """Deep nesting inside the signed payload (user_data) is caught by the same limit."""
    nested: Any = 0
    for _ in range(LIMITS.max_cbor_depth):
        nested = [nested]
    data = forge.document(edit=lambda p: with_field(p, "user_data", nested))
    expect(forge, ErrorCode.CBOR_MALFORMED, data)


def test_oversize_input(forge: Forge) -> None:
    """More than max_document_size bytes (correctly signed) is refused before decoding."""
    data = forge.document(
        edit=lambda p: with_field(p, "user_data", b"u" * LIMITS.max_document_size)
    )
    assert len(data) > LIMITS.max_document_size
    expect(forge, ErrorCode.INPUT_TOO_LARGE, data)


def test_trailing_bytes_after_cose_array(forge: Forge) -> None:
    """A second item after the document: what else would a lenient decoder ignore?"""
    expect(forge, ErrorCode.CBOR_TRAILING_BYTES, forge.document() + b"\x00")


def test_trailing_bytes_inside_payload(forge: Forge) -> None:
    """Junk after the payload map inside the (re-signed) payload bstr."""
    data = forge.document(rewrite=lambda payload: payload + b"\xf6")
    expect(forge, ErrorCode.CBOR_TRAILING_BYTES, data)


def test_cose_map_instead_of_array(forge: Forge) -> None:
    """A CBOR map where the COSE_Sign1 array belongs."""
    items = cose(forge.document())
    expect(forge, ErrorCode.COSE_STRUCTURE, cbor2.dumps(dict(enumerate(items))))


def test_cose_array_of_three(forge: Forge) -> None:
    """The signature left out."""
    expect(forge, ErrorCode.COSE_STRUCTURE, cbor2.dumps(cose(forge.document())[:3]))


def test_payload_not_a_byte_string(forge: Forge) -> None:
    """The payload map embedded directly instead of wrapped in a bstr."""
    items = cose(forge.document())
    items[2] = cbor2.loads(items[2])
    expect(forge, ErrorCode.COSE_STRUCTURE, cbor2.dumps(items))


def test_tag_other_than_18(forge: Forge) -> None:
    """Tag 98 (COSE_Sign, multi-signer) around the array."""
    data = cbor2.dumps(cbor2.CBORTag(98, cose(forge.document())))
    expect(forge, ErrorCode.COSE_STRUCTURE, data)


def test_tag_18_accepted(forge: Forge) -> None:
    """Positive: tag 18 is optional, and allowed."""
    data = forge.document(tagged=True)
    assert data[0] == 0xD2
    assert forge.verify(data).module_id == forge.nsm.identity.module_id


def test_indefinite_length_payload_accepted(forge: Forge) -> None:
    """Positive: newer NSMs write the payload map with indefinite length."""
    data = forge.document(indefinite=True, nonce=b"n")
    assert cose(data)[2][0] == 0xBF
    assert forge.verify(data).nonce == b"n"


# -- payload fields ------------------------------------------------------------------------


def test_payload_not_a_map(forge: Forge) -> None:
    """The payload bstr holds an array (re-signed)."""
    data = forge.document(rewrite=lambda payload: cbor2.dumps(list(cbor2.loads(payload).values())))
    expect(forge, ErrorCode.FIELD_TYPE, data)


def test_duplicate_payload_key(forge: Forge) -> None:
    """Two "nonce" entries (re-signed): a lenient decoder keeps either one."""
    data = forge.document(nonce=b"first", edit=lambda p: [*p, ("nonce", b"second")])
    expect(forge, ErrorCode.CBOR_DUPLICATE_KEY, data)


def test_duplicate_pcr_index(forge: Forge) -> None:
    """PCR0 twice inside the pcrs map (re-signed): first and last win in different decoders."""
    pcrs = dict(forge.nsm.identity.pcrs)
    good = bytes(cbor2.dumps(pcrs))
    evil = encode_map([*pcrs.items(), (0, bytes(48))])

    def duplicate_pcr0(payload: bytes) -> bytes:
        assert payload.count(good) == 1
        return payload.replace(good, evil)

    data = forge.document(rewrite=duplicate_pcr0)
    expect(forge, ErrorCode.CBOR_DUPLICATE_KEY, data)


def test_unknown_payload_field(forge: Forge) -> None:
    """A tenth field nobody defined."""
    data = forge.document(edit=lambda p: [*p, ("enclave_flags", 0)])
    expect(forge, ErrorCode.FIELD_UNKNOWN, data)


def test_missing_certificate(forge: Forge) -> None:
    """No certificate field: nothing to verify the signature with."""
    data = forge.document(edit=lambda p: without_field(p, "certificate"))
    expect(forge, ErrorCode.FIELD_MISSING, data)


def test_missing_optional_field_key(forge: Forge) -> None:
    """Optional values are null, but their keys are always present."""
    data = forge.document(edit=lambda p: without_field(p, "public_key"))
    expect(forge, ErrorCode.FIELD_MISSING, data)


def test_empty_certificate(forge: Forge) -> None:
    """A zero-length certificate counts as missing."""
    data = forge.document(edit=lambda p: with_field(p, "certificate", b""))
    expect(forge, ErrorCode.FIELD_MISSING, data)


def test_certificate_as_text(forge: Forge) -> None:
    """A PEM-ish text string where DER bytes belong."""
    data = forge.document(
        edit=lambda p: with_field(p, "certificate", "-----BEGIN CERTIFICATE-----")
    )
    expect(forge, ErrorCode.FIELD_TYPE, data)


def test_oversize_certificate(forge: Forge) -> None:
    """A certificate field larger than any real Nitro certificate by far."""
    big = b"\x30" * (LIMITS.max_certificate_size + 1)
    expect(
        forge,
        ErrorCode.FIELD_TOO_LARGE,
        forge.document(edit=lambda p: with_field(p, "certificate", big)),
    )


def test_cabundle_entry_as_text(forge: Forge) -> None:
    """One cabundle entry that is text, not bytes."""
    bundle: list[Any] = forge.cabundle()
    bundle[1] = "regional"
    expect(forge, ErrorCode.FIELD_TYPE, forge.document(cabundle=bundle))


def test_cabundle_not_an_array(forge: Forge) -> None:
    """The cabundle as one byte string."""
    data = forge.document(edit=lambda p: with_field(p, "cabundle", b"".join(forge.cabundle())))
    expect(forge, ErrorCode.FIELD_TYPE, data)


def test_user_data_2kib(forge: Forge) -> None:
    """2 KiB user_data, correctly signed: the size limit, not the signature, refuses it."""
    expect(forge, ErrorCode.FIELD_TOO_LARGE, forge.document(user_data=b"u" * 2048))


def test_nonce_1025_bytes(forge: Forge) -> None:
    """One byte over the NSM's 1024-byte limit is refused; exactly 1024 is accepted."""
    limit = LIMITS.max_optional_field
    assert limit == 1024
    expect(forge, ErrorCode.FIELD_TOO_LARGE, forge.document(nonce=b"n" * (limit + 1)))
    assert forge.verify(forge.document(nonce=b"n" * limit)).nonce == b"n" * limit


def test_public_key_as_text(forge: Forge) -> None:
    """An optional field that is neither null nor bytes."""
    data = forge.document(edit=lambda p: with_field(p, "public_key", "04abcdef"))
    expect(forge, ErrorCode.FIELD_TYPE, data)


def test_module_id_as_bytes(forge: Forge) -> None:
    """module_id must be text."""
    data = forge.document(edit=lambda p: with_field(p, "module_id", b"i-0123"))
    expect(forge, ErrorCode.FIELD_TYPE, data)


def test_timestamp_as_text(forge: Forge) -> None:
    """An ISO string where milliseconds since the epoch belong."""
    data = forge.document(edit=lambda p: with_field(p, "timestamp", T0.isoformat()))
    expect(forge, ErrorCode.FIELD_TYPE, data)


def test_timestamp_as_float(forge: Forge) -> None:
    """A float timestamp (fractional milliseconds, NaN, inf are all possible)."""
    data = forge.document(edit=lambda p: with_field(p, "timestamp", T0.timestamp() * 1000.0))
    expect(forge, ErrorCode.FIELD_TYPE, data)


def test_timestamp_negative(forge: Forge) -> None:
    """A timestamp before 1970."""
    data = forge.document(edit=lambda p: with_field(p, "timestamp", -1))
    expect(forge, ErrorCode.FIELD_TYPE, data)


def test_timestamp_as_boolean(forge: Forge) -> None:
    """true is 1 to Python's int checks, but it is no timestamp."""
    data = forge.document(edit=lambda p: with_field(p, "timestamp", True))
    expect(forge, ErrorCode.FIELD_TYPE, data)


def test_unknown_digest_md5(forge: Forge) -> None:
    """An unknown digest name."""
    expect(forge, ErrorCode.DIGEST_UNKNOWN, forge.document(digest="MD5"))


def test_digest_sha256_with_48_byte_pcrs(forge: Forge) -> None:
    """The digest names SHA256 but the PCRs are SHA-384-sized."""
    expect(forge, ErrorCode.PCR_INVALID, forge.document(digest="SHA256"))


def test_pcr_of_wrong_length(forge: Forge) -> None:
    """PCR5 of 47 bytes."""
    pcrs = {**forge.nsm.identity.pcrs, 5: bytes(47)}
    expect(forge, ErrorCode.PCR_INVALID, forge.document(pcrs=pcrs))


def test_missing_pcr0(forge: Forge) -> None:
    """Without PCR0 there is no image identity (and no debug test)."""
    pcrs = {i: v for i, v in forge.nsm.identity.pcrs.items() if i != 0}
    expect(forge, ErrorCode.PCR_INVALID, forge.document(pcrs=pcrs))


def test_pcr_index_out_of_range(forge: Forge) -> None:
    """PCR32 does not exist."""
    pcrs = {**forge.nsm.identity.pcrs, 32: bytes(48)}
    expect(forge, ErrorCode.PCR_INVALID, forge.document(pcrs=pcrs))


def test_pcr_index_as_text(forge: Forge) -> None:
    """PCR indexes as text ("0") would shadow the integer ones in lenient lookups."""
    pcrs: dict[Any, bytes] = {str(i): v for i, v in forge.nsm.identity.pcrs.items()}
    expect(forge, ErrorCode.PCR_INVALID, forge.document(pcrs=pcrs))


def test_pcr_value_as_text(forge: Forge) -> None:
    """A PCR given as hex text."""
    pcrs: dict[int, Any] = {**forge.nsm.identity.pcrs, 0: forge.nsm.identity.pcrs[0].hex()}
    expect(forge, ErrorCode.FIELD_TYPE, forge.document(pcrs=pcrs))


def test_no_pcrs(forge: Forge) -> None:
    """An empty pcrs map."""
    expect(forge, ErrorCode.PCR_INVALID, forge.document(pcrs={}))


# -- time and policy -----------------------------------------------------------------------


def test_document_from_future(forge: Forge) -> None:
    """Made at T0 + 120 s, verified at T0 with 60 s of allowed skew (leaf valid at T0)."""
    leaf = forge.leaf(when=T0)
    data = forge.document(when=T0 + 120 * SECOND, leaf=leaf)
    refused(ErrorCode.DOCUMENT_FROM_FUTURE, data, forge.verifier(), at=T0)
    data = forge.document(when=T0 + 61 * SECOND, leaf=leaf)
    refused(ErrorCode.DOCUMENT_FROM_FUTURE, data, forge.verifier(), at=T0)


def test_document_from_future_within_skew_accepted(forge: Forge) -> None:
    """Positive boundary: 59 s and exactly 60 s ahead are within the clock skew."""
    leaf = forge.leaf(when=T0)
    for ahead in (59, 60):
        forge.verify(forge.document(when=T0 + ahead * SECOND, leaf=leaf), at=T0)


def test_document_too_old(forge: Forge) -> None:
    """One second past max_age is refused; exactly max_age is accepted."""
    data = forge.document()
    max_age = LIMITS.max_document_age
    refused(ErrorCode.DOCUMENT_TOO_OLD, data, forge.verifier(), at=T0 + max_age + SECOND)
    forge.verify(data, at=T0 + max_age)


def test_debug_enclave(tmp_path: Path) -> None:
    """All-zero PCR0..2 (debug mode: the host reads enclave memory) is refused by default."""
    debug = Forge(tmp_path / "debug", debug=True)
    data = debug.nsm.attestation(nonce=b"n")
    expect(debug, ErrorCode.DEBUG_ENCLAVE, data)
    verified = debug.verify(data, policy=AttestationPolicy(allow_debug=True))
    assert verified.debug is True
    assert verified.to_json()["debug"] is True


# -- the chain cache -----------------------------------------------------------------------


def test_chain_cache_still_checks_the_leaf_issuer(forge: Forge) -> None:
    """A cached cabundle must not vouch for a leaf that its instance CA never signed."""
    verifier = forge.verifier()
    verifier.verify(forge.document(), at=AT)  # fills the cache for this cabundle
    verifier.verify(forge.document(), at=AT)  # the cached path accepts good documents
    issuer, _ = forge.level("instance")
    leaf = forge.leaf(issuer=issuer, issuer_key=new_key())
    refused(ErrorCode.CHAIN_INVALID, forge.document(leaf=leaf), verifier)


def test_chain_cache_still_checks_intermediate_expiry(forge: Forge) -> None:
    """A cabundle cached while valid is refused once its zonal certificate has expired."""
    end = T0 + datetime.timedelta(hours=1)
    zonal = forge.reissue("zonal", not_after=end)
    bundle = forge.cabundle(zonal=zonal)
    verifier = forge.verifier()
    verifier.verify(forge.document(cabundle=bundle), at=AT)  # fills the cache
    later = end + 10 * SECOND
    data = forge.document(when=later, cabundle=bundle)  # a fresh leaf, valid at `later`
    refused(ErrorCode.CERTIFICATE_EXPIRED, data, verifier, at=later + 5 * SECOND)


# -- regressions: each of these once escaped verify() as a non-product exception ------------
#
# Every one of these is reachable without any trusted signature unless said otherwise: the
# leaf certificate is parsed, and its key extracted, before the COSE signature is checked.


def _with_unknown_key_algorithm(leaf_der: bytes) -> bytes:
    id_ec_public_key = bytes.fromhex("06072a8648ce3d0201")
    assert leaf_der.count(id_ec_public_key) == 1
    return leaf_der.replace(id_ec_public_key, bytes.fromhex("06072a8648ce3d0209"))


def test_leaf_with_unknown_key_algorithm(forge: Forge) -> None:
    """A leaf whose public key algorithm is unknown must be CERTIFICATE_MALFORMED."""
    leaf = forge.leaf()
    bad = _with_unknown_key_algorithm(leaf.der)
    data = forge.document(leaf=leaf, edit=lambda p: with_field(p, "certificate", bad))
    expect(forge, ErrorCode.CERTIFICATE_MALFORMED, data)


def test_leaf_with_invalid_ec_point(forge: Forge) -> None:
    """A leaf whose P-384 public point is off the curve must be CERTIFICATE_MALFORMED."""
    leaf = forge.leaf()
    point = leaf.key.public_key().public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)
    assert leaf.der.count(point) == 1
    bad = leaf.der.replace(point, point[:-1] + bytes([point[-1] ^ 1]))
    data = forge.document(leaf=leaf, edit=lambda p: with_field(p, "certificate", bad))
    expect(forge, ErrorCode.CERTIFICATE_MALFORMED, data)


def test_leaf_with_invalid_x509_version(forge: Forge) -> None:
    """A leaf with an undefined X.509 version must be CERTIFICATE_MALFORMED."""
    leaf = forge.leaf()
    v3 = bytes.fromhex("a003020102")  # [0] EXPLICIT INTEGER 2: the version of a v3 cert
    assert leaf.der.find(v3) == 8  # right after the two SEQUENCE headers
    bad = leaf.der.replace(v3, bytes.fromhex("a003020103"), 1)
    data = forge.document(leaf=leaf, edit=lambda p: with_field(p, "certificate", bad))
    expect(forge, ErrorCode.CERTIFICATE_MALFORMED, data)


def _with_malformed_common_name(cert_der: bytes, common_name: str) -> bytes:
    """Every occurrence of the CN value (issuer and subject) made invalid UTF-8."""
    encoded = common_name.encode()
    assert encoded in cert_der
    return cert_der.replace(encoded, b"\xff" + encoded[1:])


def test_untrusted_root_with_malformed_subject(forge: Forge, other: Forge) -> None:
    """An untrusted cabundle[0] is CHAIN_UNTRUSTED whatever its subject bytes are."""
    cn = other.root.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value
    bundle = [_with_malformed_common_name(der(other.root), str(cn)), *other.cabundle()[1:]]
    expect(forge, ErrorCode.CHAIN_UNTRUSTED, other.document(cabundle=bundle))


def test_expired_leaf_with_malformed_subject(forge: Forge) -> None:
    """An expired leaf is CERTIFICATE_EXPIRED whatever its subject bytes are."""
    leaf = forge.leaf(not_after=T0)
    bad = _with_malformed_common_name(leaf.der, f"{forge.nsm.identity.module_id}.simulated.aws")
    data = forge.document(leaf=leaf, edit=lambda p: with_field(p, "certificate", bad))
    expect(forge, ErrorCode.CERTIFICATE_EXPIRED, data)


def test_timestamp_beyond_year_9999(forge: Forge) -> None:
    """A signed timestamp no date can hold is malformed; the last ms of 9999 is the future."""
    data = forge.document(edit=lambda p: with_field(p, "timestamp", 2**62))
    expect(forge, ErrorCode.FIELD_TYPE, data)
    last_ms_of_9999 = 253_402_300_799_999
    data = forge.document(edit=lambda p: with_field(p, "timestamp", last_ms_of_9999))
    expect(forge, ErrorCode.DOCUMENT_FROM_FUTURE, data)


# -- random damage to a real document ------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RealVector:
    data: bytes
    verified: VerifiedAttestation
    verifier: AttestationVerifier
    leaf_span: range  # where the leaf certificate's DER lies in ``data``

    @staticmethod
    def at() -> datetime.datetime:
        return datetime.datetime.fromtimestamp(AWS_VECTOR_MS / 1000, UTC)

    def check(self, data: bytes) -> None:
        """The property: AttestationError, or a document that means what the original did."""
        assert data != self.data
        try:
            verified = self.verifier.verify(data, at=self.at())
        except AttestationError as e:
            assert isinstance(e.code, ErrorCode)
        else:
            assert verified.to_json() == self.verified.to_json()


@pytest.fixture(scope="module")
def real_vector() -> RealVector:
    data = (VECTORS / AWS_VECTOR).read_bytes()
    verifier = AttestationVerifier.aws()  # one verifier: damaged documents meet the cache
    verified = verifier.verify(data, at=RealVector.at())
    leaf = parse_attestation(data).certificate
    start = data.index(leaf)
    return RealVector(data, verified, verifier, range(start, start + len(leaf)))


def _damage(vector: RealVector, kind: str, position: int, delta: int) -> bytes:
    if kind == "cut":
        return vector.data[: position % len(vector.data)]
    mutated = bytearray(vector.data)
    mutated[position % len(vector.data)] ^= delta
    return bytes(mutated)


_damages = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 2**20), st.integers(1, 255)),
    st.tuples(st.just("cut"), st.integers(0, 2**20), st.just(0)),
)
# In aws-nondebug-2022-10-13.cose the leaf DER lies at 932..1570. Exhaustively, 27,659 of the
# 1,186,770 single-byte changes once escaped verify() as cryptography's exceptions, all in the
# leaf: its version byte (InvalidVersion), key algorithm OID (UnsupportedAlgorithm) and EC
# point (ValueError). One of each is pinned here as an explicit example.
_LEAF_VERSION_BYTE, _LEAF_SPKI_OID_BYTE, _LEAF_EC_POINT_BYTE = 944, 1310, 1400


@settings(max_examples=200, deadline=None)
@example(damage=("flip", _LEAF_VERSION_BYTE, 0x01))
@example(damage=("flip", _LEAF_SPKI_OID_BYTE, 0x08))
@example(damage=("flip", _LEAF_EC_POINT_BYTE, 0x01))
@given(damage=_damages)
def test_random_damage_to_real_vector(
    real_vector: RealVector, damage: tuple[str, int, int]
) -> None:
    """Any one-byte change or truncation of a real document: AttestationError, never a crash."""
    real_vector.check(_damage(real_vector, *damage))


@settings(max_examples=200, deadline=None)
@given(damage=_damages)
def test_random_damage_to_real_vector_outside_leaf(
    real_vector: RealVector, damage: tuple[str, int, int]
) -> None:
    """The same property, holding today, for damage anywhere outside the leaf certificate."""
    # COSE framing, headers, payload fields, cabundle and signature; and every truncation.
    kind, position, delta = damage
    if kind == "flip":
        outside = len(real_vector.data) - len(real_vector.leaf_span)
        position %= outside
        if position >= real_vector.leaf_span.start:
            position += len(real_vector.leaf_span)
    real_vector.check(_damage(real_vector, kind, position, delta))
