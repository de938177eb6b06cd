"""Trust roots: the AWS Nitro Enclaves Root-G1 certificate, embedded and pinned.

    >>> from mock_kms.roots import aws_nitro_root
    >>> aws_nitro_root().subject.rfc4514_string()
    'CN=aws.nitro-enclaves,OU=AWS,O=Amazon,C=US'

The embedded PEM is checked against the SHA-256 fingerprint that AWS publishes every time it
is loaded, so a tampered package cannot swap the root. Other roots (the NSM simulator's, a
test CA) come only from :func:`load_pem_roots`, by explicit option.
"""

from __future__ import annotations

import functools
import hmac
from importlib import resources
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes

from mock_kms.errors import ErrorCode, InvalidError

# Published by AWS for the Nitro Enclaves Root-G1 certificate.
AWS_NITRO_ROOT_G1_SHA256 = "641A0321A3E244EFE456463195D606317ED7CDCC3C1756E09893F3C68F79BB5B"


class TrustRootError(InvalidError):
    """A trust root cannot be loaded or does not match its pinned fingerprint."""


def fingerprint_sha256(cert: x509.Certificate) -> str:
    return cert.fingerprint(hashes.SHA256()).hex().upper()


def check_fingerprint(cert: x509.Certificate, expected_sha256_hex: str) -> x509.Certificate:
    found = fingerprint_sha256(cert)
    if not hmac.compare_digest(found, expected_sha256_hex.upper()):
        raise TrustRootError(
            ErrorCode.TRUST_ROOT_INVALID,
            f"expected root certificate SHA-256 {expected_sha256_hex.upper()}; found {found}",
        )
    return cert


@functools.cache
def aws_nitro_root() -> x509.Certificate:
    """The embedded AWS Nitro Enclaves Root-G1 certificate, fingerprint-checked."""
    pem = resources.files("mock_kms").joinpath("data/aws-nitro-root-g1.pem").read_bytes()
    return check_fingerprint(x509.load_pem_x509_certificate(pem), AWS_NITRO_ROOT_G1_SHA256)


def load_pem_roots(source: Path | bytes) -> list[x509.Certificate]:
    """Every certificate in a PEM file (or bytes). Each must be a CA certificate."""
    where = "PEM data" if isinstance(source, bytes) else str(source)
    try:
        data = source if isinstance(source, bytes) else Path(source).read_bytes()
    except OSError as e:
        raise TrustRootError(
            ErrorCode.TRUST_ROOT_INVALID, f"cannot read root file {where}: {e.strerror}"
        ) from None
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError as e:
        raise TrustRootError(
            ErrorCode.TRUST_ROOT_INVALID, f"expected PEM certificates in {where}; {e}"
        ) from None
    for cert in certs:
        try:
            constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        except x509.ExtensionNotFound:
            constraints = None
        if constraints is None or not constraints.ca:
            raise TrustRootError(
                ErrorCode.TRUST_ROOT_INVALID,
                f"expected a CA certificate as trust root; found {cert.subject.rfc4514_string()}",
            )
    return certs
