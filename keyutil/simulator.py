"""An NSM simulator that writes attestation documents in exactly the real format.

    >>> from pathlib import Path
    >>> from keyutil.simulator import SimulatedNSM
    >>> nsm = SimulatedNSM.init(Path("/tmp/sim"))                # doctest: +SKIP
    >>> document = nsm.attestation(nonce=b"challenge")           # doctest: +SKIP

Documents are untagged COSE_Sign1, protected header ``{1: -35}``, 96-byte raw ES384
signature, payload map of all nine fields (absent optionals as null), 16 PCRs of 48 bytes,
``cabundle = [root, regional, zonal, instance]``, and a fresh 3-hour leaf certificate per
document without Authority Key Identifier, like AWS's. They are signed by a CA that the
simulator creates and keeps in a directory::

    DIR/root.pem                 the simulator's root certificate (trust it with --trust-root)
    DIR/enclave.json             module_id, the 16 PCRs, debug flag, OS_IMAGE_HASH
    DIR/ca/<level>.key.pem       CA private keys, mode 0600 (root, regional, zonal, instance)
    DIR/ca/<level>.pem           intermediate certificates, re-issued when they run out

Intermediate validity windows follow AWS: regional 20 days, zonal about 5 days, instance
1 day; the simulator re-issues an intermediate when it no longer covers a new leaf.
Documents from here verify only under the simulator's root, never under the AWS root.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import secrets
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import cbor2
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

from keyutil.measurements import os_image_hash
from keyutil.nsm import NsmError, check_fields

Clock = Callable[[], datetime.datetime]

ES384_PROTECTED_HEADER = bytes.fromhex("a1013822")  # {1: -35}
PCR_COUNT = 16
PCR_LENGTH = 48
MAX_MODULE_ID = 64  # the simulator's bound; the KMS's parser accepts up to 256
LEAF_LIFETIME = datetime.timedelta(hours=3)
LEAF_BACKDATE = datetime.timedelta(seconds=3)

# (level, lifetime, how long before "now" a freshly issued certificate starts, path length)
CA_LEVELS = (
    ("regional", datetime.timedelta(days=20), datetime.timedelta(days=2), 2),
    ("zonal", datetime.timedelta(days=5, hours=14), datetime.timedelta(hours=10), 1),
    ("instance", datetime.timedelta(days=1), datetime.timedelta(minutes=15), 0),
)
ROOT_LIFETIME = datetime.timedelta(days=30 * 365)


def utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


# -- COSE / CBOR building blocks (also used by tests to forge malformed documents) --------


def encode_map(items: Iterable[tuple[Any, Any]], *, indefinite: bool = False) -> bytes:
    """A CBOR map from key/value pairs, in order, duplicates kept as given."""
    pairs = list(items)
    body = b"".join(bytes(cbor2.dumps(k)) + bytes(cbor2.dumps(v)) for k, v in pairs)
    if indefinite:
        return b"\xbf" + body + b"\xff"
    n = len(pairs)
    if n < 24:
        head = bytes([0xA0 | n])
    elif n < 256:
        head = bytes([0xB8, n])
    else:
        head = b"\xb9" + n.to_bytes(2, "big")
    return head + body


def payload_fields(
    *,
    module_id: str,
    timestamp_ms: int,
    pcrs: Mapping[int, bytes],
    certificate: bytes,
    cabundle: Iterable[bytes],
    public_key: bytes | None,
    user_data: bytes | None,
    nonce: bytes | None,
    digest: str = "SHA384",
) -> list[tuple[str, Any]]:
    """The nine payload fields in the order the NSM writes them."""
    return [
        ("module_id", module_id),
        ("digest", digest),
        ("timestamp", timestamp_ms),
        ("pcrs", dict(pcrs)),
        ("certificate", certificate),
        ("cabundle", list(cabundle)),
        ("public_key", public_key),
        ("user_data", user_data),
        ("nonce", nonce),
    ]


def es384_sign(key: ec.EllipticCurvePrivateKey, message: bytes) -> bytes:
    """ECDSA P-384 / SHA-384 as a 96-byte raw r || s, the COSE form."""
    r, s = decode_dss_signature(key.sign(message, ec.ECDSA(hashes.SHA384())))
    return r.to_bytes(48, "big") + s.to_bytes(48, "big")


def sign1(
    payload: bytes,
    key: ec.EllipticCurvePrivateKey,
    *,
    protected: bytes = ES384_PROTECTED_HEADER,
    unprotected: Mapping[Any, Any] | None = None,
    tagged: bool = False,
) -> bytes:
    """An untagged (or tag 18) COSE_Sign1 over ``payload``, signed ES384 by ``key``."""
    sig_structure = bytes(cbor2.dumps(["Signature1", protected, b"", payload]))
    signature = es384_sign(key, sig_structure)
    message = [protected, dict(unprotected or {}), payload, signature]
    if tagged:
        return bytes(cbor2.dumps(cbor2.CBORTag(18, message)))
    return bytes(cbor2.dumps(message))


# -- Certificates -----------------------------------------------------------------------


def _name(common_name: str, *, with_locality: bool = False) -> x509.Name:
    attrs = [
        x509.NameAttribute(NameOID.COUNTRY_NAME, "US"),
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "keyutil NSM simulator"),
        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "simulated AWS"),
    ]
    if with_locality:
        attrs.insert(1, x509.NameAttribute(NameOID.STATE_OR_PROVINCE_NAME, "Washington"))
        attrs.insert(2, x509.NameAttribute(NameOID.LOCALITY_NAME, "Seattle"))
    attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, common_name))
    return x509.Name(attrs)


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP384R1())


def _ca_key_usage() -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=True,
        crl_sign=True,
        encipher_only=False,
        decipher_only=False,
    )


def make_root(key: ec.EllipticCurvePrivateKey, now: datetime.datetime) -> x509.Certificate:
    name = _name("aws.nitro-enclaves.keyutil-simulator")
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + ROOT_LIFETIME)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .add_extension(_ca_key_usage(), critical=True)
        .sign(key, hashes.SHA384())
    )


def make_intermediate(
    *,
    common_name: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Certificate,
    issuer_key: ec.EllipticCurvePrivateKey,
    not_before: datetime.datetime,
    not_after: datetime.datetime,
    path_length: int | None,
) -> x509.Certificate:
    return (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(issuer.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), False
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .add_extension(_ca_key_usage(), critical=True)
        .sign(issuer_key, hashes.SHA384())
    )


def _leaf_common_name(module_id: str) -> str:
    name = f"{module_id}.simulated.aws"
    return name if len(name) <= MAX_MODULE_ID else module_id


def make_leaf(
    *,
    module_id: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Certificate,
    issuer_key: ec.EllipticCurvePrivateKey,
    not_before: datetime.datetime,
    not_after: datetime.datetime,
) -> x509.Certificate:
    # Like AWS's leaf: no Authority Key Identifier, no Subject Alternative Name.
    return (
        x509.CertificateBuilder()
        # A common name holds 64 characters: a long module id goes without the suffix.
        .subject_name(_name(_leaf_common_name(module_id), with_locality=True))
        .issuer_name(issuer.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=True,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=False,
        )
        .sign(issuer_key, hashes.SHA384())
    )


def der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


# -- Persistence ------------------------------------------------------------------------


def _write_private(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _write_public(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    tmp.write_bytes(data)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _load_key(path: Path) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise NsmError("sim_invalid", f"{path}: expected an EC private key")
    return key


@dataclasses.dataclass(frozen=True)
class EnclaveIdentity:
    """What the simulated enclave reports: its module id and PCRs."""

    module_id: str
    pcrs: Mapping[int, bytes]
    debug: bool

    def __post_init__(self) -> None:
        if not 0 < len(self.module_id) <= MAX_MODULE_ID or not self.module_id.isprintable():
            raise NsmError(
                "sim_invalid",
                f"module id: expected 1 to {MAX_MODULE_ID} printable characters "
                f"(like i-0123456789abcdef0-enc0123456789abcdef); found {len(self.module_id)}",
            )

    @property
    def os_image_hash(self) -> str:
        return os_image_hash(self.pcrs[0], self.pcrs[1], self.pcrs[2])

    def to_json(self) -> dict[str, Any]:
        return {
            "module_id": self.module_id,
            "debug": self.debug,
            "os_image_hash": self.os_image_hash,
            "pcrs": {str(i): self.pcrs[i].hex() for i in sorted(self.pcrs)},
        }

    @classmethod
    def from_json(cls, value: Mapping[str, Any]) -> EnclaveIdentity:
        pcrs = {int(i): bytes.fromhex(h) for i, h in value["pcrs"].items()}
        return cls(module_id=str(value["module_id"]), pcrs=pcrs, debug=bool(value["debug"]))

    @classmethod
    def generate(
        cls,
        *,
        pcr0: bytes | None = None,
        pcr1: bytes | None = None,
        pcr2: bytes | None = None,
        debug: bool = False,
        module_id: str | None = None,
    ) -> EnclaveIdentity:
        if module_id is None:
            module_id = f"i-{secrets.token_hex(8)}-enc{secrets.token_hex(8)}"
        pcrs = {i: bytes(PCR_LENGTH) for i in range(PCR_COUNT)}
        pcrs[3] = secrets.token_bytes(PCR_LENGTH)  # IAM role of the parent
        pcrs[4] = secrets.token_bytes(PCR_LENGTH)  # parent instance id
        if debug:
            if any(p is not None for p in (pcr0, pcr1, pcr2)):
                raise NsmError("sim_invalid", "a debug enclave reports all-zero PCR0..PCR2")
        else:
            given = {0: pcr0, 1: pcr1, 2: pcr2}
            for i, value in given.items():
                if value is not None and len(value) != PCR_LENGTH:
                    raise NsmError(
                        "sim_invalid", f"PCR{i}: expected {PCR_LENGTH} bytes; got {len(value)}"
                    )
                pcrs[i] = value if value is not None else secrets.token_bytes(PCR_LENGTH)
        return cls(module_id=module_id, pcrs=pcrs, debug=debug)


class SimulatorCA:
    """The simulator's four-level CA: root, regional, zonal, instance."""

    def __init__(
        self,
        keys: Mapping[str, ec.EllipticCurvePrivateKey],
        root: x509.Certificate,
        intermediates: Mapping[str, x509.Certificate],
    ) -> None:
        self.keys = dict(keys)
        self.root = root
        self.intermediates = dict(intermediates)

    @classmethod
    def create(cls, now: datetime.datetime) -> SimulatorCA:
        keys = {level: new_key() for level in ("root", *(lvl[0] for lvl in CA_LEVELS))}
        ca = cls(keys, make_root(keys["root"], now), {})
        ca.refresh(now)
        return ca

    def refresh(self, now: datetime.datetime) -> bool:
        """Re-issue the intermediates that do not cover a leaf made now. True if any was."""
        changed = False
        issuer, issuer_key = self.root, self.keys["root"]
        for level, lifetime, backdate, path_length in CA_LEVELS:
            cert = self.intermediates.get(level)
            stale = (
                cert is None
                or changed  # its issuer was re-issued
                or cert.not_valid_before_utc > now - LEAF_BACKDATE
                or cert.not_valid_after_utc < now + LEAF_LIFETIME
            )
            if stale:
                start = now - backdate
                cert = make_intermediate(
                    common_name=f"{secrets.token_hex(8)}.{level}.simulated.nitro-enclaves",
                    key=self.keys[level],
                    issuer=issuer,
                    issuer_key=issuer_key,
                    not_before=start,
                    not_after=start + lifetime,
                    path_length=path_length,
                )
                self.intermediates[level] = cert
                changed = True
            assert cert is not None
            issuer, issuer_key = cert, self.keys[level]
        return changed

    @property
    def issuer(self) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        return self.intermediates["instance"], self.keys["instance"]

    def cabundle(self) -> list[bytes]:
        return [der(self.root)] + [der(self.intermediates[lvl[0]]) for lvl in CA_LEVELS]

    def save(self, directory: Path) -> None:
        ca_dir = directory / "ca"
        ca_dir.mkdir(mode=0o700, exist_ok=True)
        for level, key in self.keys.items():
            path = ca_dir / f"{level}.key.pem"
            if not path.exists():
                _write_private(path, _key_pem(key))
        _write_public(directory / "root.pem", self.root.public_bytes(serialization.Encoding.PEM))
        for level, cert in self.intermediates.items():
            _write_public(ca_dir / f"{level}.pem", cert.public_bytes(serialization.Encoding.PEM))

    @classmethod
    def load(cls, directory: Path) -> SimulatorCA:
        ca_dir = directory / "ca"
        keys = {
            level: _load_key(ca_dir / f"{level}.key.pem")
            for level in ("root", *(lvl[0] for lvl in CA_LEVELS))
        }
        root = x509.load_pem_x509_certificate((directory / "root.pem").read_bytes())
        intermediates = {}
        for level, *_ in CA_LEVELS:
            path = ca_dir / f"{level}.pem"
            if path.exists():
                intermediates[level] = x509.load_pem_x509_certificate(path.read_bytes())
        return cls(keys, root, intermediates)


class SimulatedNSM:
    """An NSM that signs documents with the simulator CA kept in ``directory``."""

    def __init__(
        self,
        directory: Path,
        ca: SimulatorCA,
        identity: EnclaveIdentity,
        *,
        clock: Clock = utcnow,
    ) -> None:
        self.directory = directory
        self.ca = ca
        self.identity = identity
        self.clock = clock

    @classmethod
    def init(
        cls,
        directory: Path,
        *,
        pcr0: bytes | None = None,
        pcr1: bytes | None = None,
        pcr2: bytes | None = None,
        debug: bool = False,
        module_id: str | None = None,
        clock: Clock = utcnow,
    ) -> SimulatedNSM:
        """Create ``directory`` with a new CA and enclave identity; refuse to overwrite one."""
        if (directory / "enclave.json").exists():
            raise NsmError(
                "sim_exists", f"{directory} already holds a simulator; choose a new directory"
            )
        identity = EnclaveIdentity.generate(
            pcr0=pcr0, pcr1=pcr1, pcr2=pcr2, debug=debug, module_id=module_id
        )
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(directory, 0o700)
        ca = SimulatorCA.create(clock())
        ca.save(directory)
        _write_public(
            directory / "enclave.json",
            (json.dumps(identity.to_json(), indent=2) + "\n").encode(),
        )
        return cls(directory, ca, identity, clock=clock)

    @classmethod
    def load(cls, directory: Path, *, clock: Clock = utcnow) -> SimulatedNSM:
        try:
            identity = EnclaveIdentity.from_json(
                json.loads((directory / "enclave.json").read_text())
            )
            ca = SimulatorCA.load(directory)
        except FileNotFoundError as e:
            raise NsmError(
                "nsm_unavailable",
                f"{directory} is not a simulator directory ({Path(e.filename).name} missing); "
                f"create one with: keyutil sim init {directory}",
            ) from None
        except (ValueError, KeyError, TypeError) as e:
            raise NsmError("sim_invalid", f"{directory}: damaged simulator files: {e}") from None
        except OSError as e:  # unreadable: permissions, a directory in a file's place
            raise NsmError(
                "sim_invalid",
                f"cannot read {e.filename}: {e.strerror}; the simulator's files must be "
                "readable by this user (or create a new one: keyutil sim init DIR)",
            ) from None
        return cls(directory, ca, identity, clock=clock)

    def attestation(
        self,
        *,
        user_data: bytes | None = None,
        nonce: bytes | None = None,
        public_key: bytes | None = None,
    ) -> bytes:
        check_fields(user_data, nonce, public_key)
        now = self.clock()
        if self.ca.refresh(now):
            self.ca.save(self.directory)
        return self.document(now, user_data=user_data, nonce=nonce, public_key=public_key)

    def document(
        self,
        now: datetime.datetime,
        *,
        user_data: bytes | None = None,
        nonce: bytes | None = None,
        public_key: bytes | None = None,
        indefinite: bool = False,
    ) -> bytes:
        """A document made at ``now`` (the CA must cover it; see :meth:`SimulatorCA.refresh`)."""
        issuer, issuer_key = self.ca.issuer
        leaf_key = new_key()
        leaf = make_leaf(
            module_id=self.identity.module_id,
            key=leaf_key,
            issuer=issuer,
            issuer_key=issuer_key,
            not_before=now - LEAF_BACKDATE,
            not_after=now + LEAF_LIFETIME,
        )
        fields = payload_fields(
            module_id=self.identity.module_id,
            timestamp_ms=int(now.timestamp() * 1000),
            pcrs=self.identity.pcrs,
            certificate=der(leaf),
            cabundle=self.ca.cabundle(),
            public_key=public_key,
            user_data=user_data,
            nonce=nonce,
        )
        return sign1(encode_map(fields, indefinite=indefinite), leaf_key)
