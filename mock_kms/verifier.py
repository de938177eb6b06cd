"""Verify a parsed attestation document: signature, certificate chain, then policy.

    >>> import datetime
    >>> from mock_kms.verifier import AttestationVerifier, AttestationPolicy
    >>> data = open("tests/vectors/aws-nondebug-2022-10-13.cose", "rb").read()
    >>> at = datetime.datetime(2022, 10, 13, 8, 58, 3, tzinfo=datetime.UTC)
    >>> verified = AttestationVerifier.aws().verify(data, at=at)
    >>> verified.os_image_hash
    '0x959df09185f8ea3a073b2107a64feee2970b3251bb1770176c254fc4769fa48e'

The verification time is always an argument: the verifier never reads the clock, so real
documents verify at their own timestamp in tests, and expiry is testable to the second.

Steps, in order, each with its own error codes:

1. Parse (:func:`mock_kms.attestation.parse_attestation`), unless given a parsed document.
2. COSE signature: ES384 over the Sig_structure with the leaf certificate's P-384 key.
   High-S signatures are accepted: genuine AWS documents carry them.
3. Certificate chain: ``cabundle[0]`` must be byte-identical to a trusted root; each
   cabundle certificate must be issued and signed by the one before it, in order (one
   signature each, so a crafted pool costs no path search); then the chain
   ``[leaf, cabundle[-1], ..., cabundle[1]]`` is built by ``cryptography.x509.verification``
   at the verification time and must be exactly the cabundle order, every certificate used.
4. Policy (:class:`AttestationPolicy`): not from the future beyond the clock skew, not older
   than the maximum age, not a debug-mode enclave unless explicitly allowed.

Chain cache: the intermediates of one instance are the same on every document it makes, so
a successful chain validation is remembered, keyed by the SHA-256 of the exact cabundle bytes
(root included) within one verifier (so one set of trusted roots). What the cache saves is
the signature checks of cabundle certificates against each other. Still checked on every
document, cached or not: the COSE signature, the leaf certificate's signature by
``cabundle[-1]``, the leaf's validity period and extension policy, the validity period of
every cabundle certificate at the verification time (from the cached window), and the whole
policy step. A cached chain outside its window is validated again from scratch.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
import hashlib
import logging
import threading
from collections.abc import Iterable, Sequence
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509 import verification

from keyutil.protocol import echo
from mock_kms.attestation import AttestationDocument, parse_attestation
from mock_kms.config import LIMITS, Limits
from mock_kms.errors import AttestationError, ErrorCode
from mock_kms.roots import aws_nitro_root

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class AttestationPolicy:
    """What a cryptographically valid document must also satisfy.

    ``allow_debug`` admits debug-mode enclaves, whose memory the host can read: it is for
    development only, and every document it admits is logged as a warning.
    """

    max_age: datetime.timedelta = LIMITS.max_document_age
    clock_skew: datetime.timedelta = LIMITS.clock_skew
    allow_debug: bool = False


@dataclasses.dataclass(frozen=True)
class VerifiedAttestation:
    """A document whose signature, chain and policy have all been checked."""

    document: AttestationDocument
    verified_at: datetime.datetime
    os_image_hash: str
    debug: bool

    @property
    def module_id(self) -> str:
        return self.document.module_id

    @property
    def public_key(self) -> bytes | None:
        return self.document.public_key

    @property
    def user_data(self) -> bytes | None:
        return self.document.user_data

    @property
    def nonce(self) -> bytes | None:
        return self.document.nonce

    def to_json(self) -> dict[str, Any]:
        doc = self.document

        def hex_or_none(value: bytes | None) -> str | None:
            return None if value is None else value.hex()

        return {
            "module_id": doc.module_id,
            "timestamp": doc.timestamp_ms,
            "timestamp_iso": doc.timestamp.isoformat().replace("+00:00", "Z"),
            "digest": doc.digest,
            "pcrs": {str(i): doc.pcrs[i].hex() for i in sorted(doc.pcrs)},
            "os_image_hash": self.os_image_hash,
            "debug": self.debug,
            "public_key": hex_or_none(doc.public_key),
            "user_data": hex_or_none(doc.user_data),
            "nonce": hex_or_none(doc.nonce),
        }


@dataclasses.dataclass(frozen=True)
class _VerifiedChain:
    issuer: x509.Certificate  # cabundle[-1], the leaf's issuer
    # A store holding only the issuer, kept so that its key is loaded once (an immutable
    # object, safe to share between threads).
    anchor: verification.Store
    not_before: datetime.datetime  # latest notBefore over the cabundle
    not_after: datetime.datetime  # earliest notAfter over the cabundle


def _nitro_ee_policy() -> verification.ExtensionPolicy:
    # Nitro leaf certificates carry neither an Authority Key Identifier nor a Subject
    # Alternative Name; the WebPKI end-entity defaults require both. Those two rules are
    # relaxed and nothing else: basic constraints (not a CA), key usage and the rest stay.
    return (
        verification.ExtensionPolicy.webpki_defaults_ee()
        .may_be_present(x509.AuthorityKeyIdentifier, verification.Criticality.AGNOSTIC, None)
        .may_be_present(x509.SubjectAlternativeName, verification.Criticality.AGNOSTIC, None)
    )


_EE_POLICY = _nitro_ee_policy()
_ES384 = ec.ECDSA(hashes.SHA384())  # immutable: one for every document
_CA_POLICY = verification.ExtensionPolicy.webpki_defaults_ca()


def _fail(code: ErrorCode, message: str) -> AttestationError:
    return AttestationError(code, message)


def _name(cert: x509.Certificate) -> str:
    """The certificate's common name, for messages; its subject is parsed lazily and may be
    malformed, which must not turn a refusal into a crash."""
    try:
        attrs = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
        return str(attrs[0].value) if attrs else cert.subject.rfc4514_string()
    except ValueError:
        return "a certificate with an unreadable subject"


def _load_der(der: bytes, what: str) -> x509.Certificate:
    try:
        return x509.load_der_x509_certificate(der)
    except (ValueError, x509.InvalidVersion) as e:
        raise _fail(
            ErrorCode.CERTIFICATE_MALFORMED, f"{what}: expected a DER certificate; {e}"
        ) from None


def _check_validity(cert: x509.Certificate, what: str, at: datetime.datetime) -> None:
    if at < cert.not_valid_before_utc:
        raise _fail(
            ErrorCode.CERTIFICATE_NOT_YET_VALID,
            f"{what} ({_name(cert)}): valid from {cert.not_valid_before_utc.isoformat()}; "
            f"verification time is {at.isoformat()}",
        )
    if at > cert.not_valid_after_utc:
        raise _fail(
            ErrorCode.CERTIFICATE_EXPIRED,
            f"{what} ({_name(cert)}): valid until {cert.not_valid_after_utc.isoformat()}; "
            f"verification time is {at.isoformat()}",
        )


def _check_links(bundle: Sequence[x509.Certificate]) -> None:
    """Each cabundle certificate is issued and signed by the one before it, in order from the
    trusted root: one signature check per link, before the path builder runs.

    The builder searches every way its pool could chain: a trusted root followed by attacker
    CAs that cross-sign each other made it check signatures up to its own limit, about 20x a
    whole verification. Such a bundle fails here at its first link (the root signed none of
    it); a genuine one costs these checks once per chain-cache miss, and once its links are
    checked from the root, the pool has one way to chain.
    """
    for i in range(1, len(bundle)):
        try:
            bundle[i].verify_directly_issued_by(bundle[i - 1])
        except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
            raise _fail(
                ErrorCode.CHAIN_INVALID,
                f"cabundle[{i}] ({_name(bundle[i])}): expected a certificate issued and signed "
                f"by cabundle[{i - 1}] ({_name(bundle[i - 1])}); it is not",
            ) from None


def _check_time(at: datetime.datetime) -> datetime.datetime:
    if at.tzinfo is None:
        raise TypeError("the verification time must be timezone-aware")
    return at.astimezone(datetime.UTC)


def _der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(Encoding.DER)


def _cabundle_key(cabundle: Sequence[bytes]) -> bytes:
    h = hashlib.sha256()
    for der in cabundle:
        h.update(len(der).to_bytes(4, "big"))
        h.update(der)
    return h.digest()


class AttestationVerifier:
    """Verifies attestation documents against injected trust roots at an injected time.

    Construction does no I/O. Use :meth:`aws` for the AWS Nitro root.
    """

    def __init__(
        self,
        *,
        trusted_roots: Iterable[x509.Certificate],
        policy: AttestationPolicy | None = None,
        limits: Limits = LIMITS,
        cache_size: int | None = None,
    ) -> None:
        self._roots = {_der(root): root for root in trusted_roots}
        if not self._roots:
            raise ValueError("an AttestationVerifier needs at least one trusted root")
        self.policy = policy or AttestationPolicy()
        self._limits = limits
        self._cache_size = limits.chain_cache_size if cache_size is None else cache_size
        self._cache: collections.OrderedDict[bytes, _VerifiedChain] = collections.OrderedDict()
        self._lock = threading.Lock()
        if self.policy.allow_debug:
            logger.warning(
                "UNSAFE: debug-mode enclaves are accepted; their memory is readable by the host"
            )

    @classmethod
    def aws(
        cls,
        *,
        policy: AttestationPolicy | None = None,
        extra_roots: Iterable[x509.Certificate] = (),
        limits: Limits = LIMITS,
    ) -> AttestationVerifier:
        """A verifier trusting the embedded AWS Nitro Root-G1 (plus any ``extra_roots``)."""
        return cls(trusted_roots=[aws_nitro_root(), *extra_roots], policy=policy, limits=limits)

    @property
    def trusted_roots(self) -> list[x509.Certificate]:
        return list(self._roots.values())

    def verify(
        self, document: bytes | AttestationDocument, *, at: datetime.datetime
    ) -> VerifiedAttestation:
        """Verify ``document`` at time ``at``; raise :class:`AttestationError` if it fails."""
        at = _check_time(at)
        doc = (
            document
            if isinstance(document, AttestationDocument)
            else parse_attestation(document, limits=self._limits)
        )
        leaf = _load_der(doc.certificate, "certificate")
        self._verify_cose_signature(doc, leaf)
        self._verify_chain(doc, leaf, at)
        return self._apply_policy(doc, at)

    # Step 2 -------------------------------------------------------------------------------
    @staticmethod
    def _verify_cose_signature(doc: AttestationDocument, leaf: x509.Certificate) -> None:
        try:
            key = leaf.public_key()
        except (ValueError, UnsupportedAlgorithm) as e:
            raise _fail(
                ErrorCode.CERTIFICATE_MALFORMED,
                f"certificate: expected a P-384 public key; it does not load ({e})",
            ) from None
        if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp384r1":
            raise _fail(
                ErrorCode.CERTIFICATE_MALFORMED,
                f"certificate: expected a P-384 public key for ES384; found "
                f"{getattr(getattr(key, 'curve', None), 'name', type(key).__name__)}",
            )
        r = int.from_bytes(doc.signature[:48], "big")
        s = int.from_bytes(doc.signature[48:], "big")
        try:
            key.verify(encode_dss_signature(r, s), doc.sig_structure(), _ES384)
        except InvalidSignature:
            raise _fail(
                ErrorCode.SIGNATURE_INVALID,
                "COSE signature: expected a valid ES384 signature by the leaf certificate's key; "
                "it does not verify",
            ) from None

    # Step 3 -------------------------------------------------------------------------------
    def _verify_chain(
        self, doc: AttestationDocument, leaf: x509.Certificate, at: datetime.datetime
    ) -> None:
        root = self._roots.get(doc.cabundle[0])
        if root is None:
            raise _fail(
                ErrorCode.CHAIN_UNTRUSTED,
                "cabundle[0]: expected a trusted root certificate; found "
                f"{_name(_load_der(doc.cabundle[0], 'cabundle[0]'))}, which is not trusted",
            )
        _check_validity(leaf, "certificate", at)
        key = _cabundle_key(doc.cabundle)
        with self._lock:
            cached = self._cache.get(key)
            if cached is not None:
                self._cache.move_to_end(key)
        if cached is not None and cached.not_before <= at <= cached.not_after:
            # The cabundle was validated before; its window still holds. The leaf is
            # checked in full against its issuer, which serves as the anchor.
            self._build(leaf, [], store=cached.anchor, at=at)
            return
        self._cache_put(key, self._verify_full_chain(doc, leaf, root, at))

    def _verify_full_chain(
        self,
        doc: AttestationDocument,
        leaf: x509.Certificate,
        root: x509.Certificate,
        at: datetime.datetime,
    ) -> _VerifiedChain:
        bundle = [root] + [
            _load_der(der, f"cabundle[{i}]") for i, der in enumerate(doc.cabundle) if i > 0
        ]
        for i, cert in enumerate(bundle):
            _check_validity(cert, f"cabundle[{i}]", at)
        _check_links(bundle)
        intermediates = bundle[1:]
        chain = self._build(leaf, intermediates, store=verification.Store([root]), at=at)
        expected = [leaf, *reversed(intermediates), root]
        if [_der(c) for c in chain] != [_der(c) for c in expected]:
            raise _fail(
                ErrorCode.CHAIN_INVALID,
                f"cabundle: expected [root, ..., leaf issuer] with every certificate used; "
                f"the chain built is {len(chain)} long and differs from the cabundle order",
            )
        return _VerifiedChain(
            issuer=bundle[-1],
            anchor=verification.Store([bundle[-1]]),
            not_before=max(c.not_valid_before_utc for c in bundle),
            not_after=min(c.not_valid_after_utc for c in bundle),
        )

    def _build(
        self,
        leaf: x509.Certificate,
        intermediates: list[x509.Certificate],
        *,
        store: verification.Store,
        at: datetime.datetime,
    ) -> list[x509.Certificate]:
        verifier = (
            verification.PolicyBuilder()
            .store(store)
            .time(at)
            .max_chain_depth(self._limits.max_cabundle_length)
            .extension_policies(ca_policy=_CA_POLICY, ee_policy=_EE_POLICY)
            .build_client_verifier()
        )
        try:
            return list(verifier.verify(leaf, intermediates).chain)
        except verification.VerificationError as e:
            raise _fail(
                ErrorCode.CHAIN_INVALID,
                f"certificate chain: expected a valid path from the leaf to the root; {e}",
            ) from None

    def _cache_put(self, key: bytes, chain: _VerifiedChain) -> None:
        if self._cache_size <= 0:
            return
        with self._lock:
            self._cache[key] = chain
            self._cache.move_to_end(key)
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)

    # Step 4 -------------------------------------------------------------------------------
    def _apply_policy(self, doc: AttestationDocument, at: datetime.datetime) -> VerifiedAttestation:
        policy = self.policy
        made = doc.timestamp
        if made > at + policy.clock_skew:
            raise _fail(
                ErrorCode.DOCUMENT_FROM_FUTURE,
                f"timestamp: expected at most {policy.clock_skew.total_seconds():g} s after the "
                f"verification time {at.isoformat()}; found {made.isoformat()}",
            )
        if at - made > policy.max_age:
            raise _fail(
                ErrorCode.DOCUMENT_TOO_OLD,
                f"timestamp: expected a document at most {policy.max_age.total_seconds():g} s "
                f"old; found one {(at - made).total_seconds():.0f} s old",
            )
        debug = doc.is_debug
        if debug:
            if not policy.allow_debug:
                raise _fail(
                    ErrorCode.DEBUG_ENCLAVE,
                    "PCR0, PCR1 and PCR2: expected the measurements of a production enclave; "
                    "found all zeros (debug mode, readable by the host)",
                )
            logger.warning(
                "UNSAFE: accepting a debug-mode enclave document (module %s)", echo(doc.module_id)
            )
        return VerifiedAttestation(
            document=doc, verified_at=at, os_image_hash=doc.os_image_hash, debug=debug
        )
