"""Seed documents: the three real AWS documents and documents from a simulator CA.

    >>> from fuzz.seeds import Corpus
    >>> corpus = Corpus.create()
    >>> [s.name for s in corpus.real]
    ['aws-nondebug-2022-10-13', 'aws-debug-2023-09-18', 'aws-nondebug-pubkey-2024-11-30']

Real documents verify under the AWS root at their own timestamp (tests/vectors/README.md);
they cannot be re-signed. Simulator documents are made at :data:`T0` by a CA created for the
run (``keyutil.simulator``), whose root the verifier of the fuzz targets trusts, and whose leaf
key the corpus keeps: a mutated payload can be signed again, so that the mutant reaches the
payload checks behind the signature.
"""

from __future__ import annotations

import dataclasses
import datetime
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from fuzz.cbor import Array, Bytes, CborError, Embedded, Node, Tag, decode
from keyutil.simulator import (
    EnclaveIdentity,
    SimulatorCA,
    der,
    encode_map,
    make_leaf,
    new_key,
    payload_fields,
    sign1,
)

VECTORS = Path(__file__).resolve().parent.parent / "tests" / "vectors"
# file stem -> the document's own timestamp in ms (tests/vectors/README.md)
REAL_VECTORS = {
    "aws-nondebug-2022-10-13": 1665651482136,
    "aws-debug-2023-09-18": 1695049410860,
    "aws-nondebug-pubkey-2024-11-30": 1732983768387,
}
T0 = datetime.datetime(2026, 3, 1, 12, 0, 0, tzinfo=datetime.UTC)
LEAF_BACKDATE = datetime.timedelta(seconds=3)
LEAF_LIFETIME = datetime.timedelta(hours=3)
# Simulator documents are verified this long after they were made.
VERIFY_DELAY = datetime.timedelta(seconds=5)


def ms(timestamp_ms: int) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(timestamp_ms / 1000, datetime.UTC)


def envelope_tree(data: bytes) -> Node:
    """``data`` as a tree whose protected header and payload are opened (``bstr .cbor``)."""
    top = decode(data)
    array = top.inner if isinstance(top, Tag) else top
    if isinstance(array, Array) and len(array.items) == 4:
        for index, role in ((0, "protected"), (2, "payload")):
            item = array.items[index]
            if isinstance(item, Bytes) and item.chunks is None:
                try:
                    inner = decode(item.value)
                except CborError:
                    continue
                array.items[index] = Embedded(inner, item.width, role=role)
    return top


@dataclasses.dataclass(frozen=True)
class Seed:
    name: str
    data: bytes
    tree: Node
    # The verification time at which the unmodified seed is valid.
    at: datetime.datetime
    # The leaf key that signed it (simulator seeds): mutants can be re-signed with it.
    signer: ec.EllipticCurvePrivateKey | None
    debug: bool = False

    @property
    def real(self) -> bool:
        return self.signer is None


@dataclasses.dataclass
class SimLeaf:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @property
    def der(self) -> bytes:
        return der(self.cert)


class SimSigner:
    """A simulator CA made at ``now``, and leaf certificates under it, like the NSM's."""

    def __init__(self, now: datetime.datetime = T0) -> None:
        self.ca = SimulatorCA.create(now)
        self.root = self.ca.root

    def leaf(self, module_id: str, now: datetime.datetime) -> SimLeaf:
        """A leaf valid from ``now`` - 3 s for 3 hours (the CA must cover ``now``)."""
        self.ca.refresh(now)
        issuer, issuer_key = self.ca.issuer
        key = new_key()
        cert = make_leaf(
            module_id=module_id,
            key=key,
            issuer=issuer,
            issuer_key=issuer_key,
            not_before=now - LEAF_BACKDATE,
            not_after=now + LEAF_LIFETIME,
        )
        return SimLeaf(cert, key)

    def document(
        self,
        identity: EnclaveIdentity,
        leaf: SimLeaf,
        now: datetime.datetime,
        *,
        nonce: bytes | None = None,
        user_data: bytes | None = None,
        public_key: bytes | None = None,
        indefinite: bool = False,
        tagged: bool = False,
        digest: str = "SHA384",
    ) -> bytes:
        fields = payload_fields(
            module_id=identity.module_id,
            timestamp_ms=int(now.timestamp() * 1000),
            pcrs=identity.pcrs,
            certificate=leaf.der,
            cabundle=self.ca.cabundle(),
            public_key=public_key,
            user_data=user_data,
            nonce=nonce,
            digest=digest,
        )
        return sign1(encode_map(fields, indefinite=indefinite), leaf.key, tagged=tagged)


def _sha256_identity(module_id: str) -> EnclaveIdentity:
    """An enclave reporting SHA-256 PCRs (32 bytes), which the format allows."""
    base = EnclaveIdentity.generate(module_id=module_id)
    return EnclaveIdentity(
        module_id=module_id, pcrs={i: p[:32] for i, p in base.pcrs.items()}, debug=False
    )


@dataclasses.dataclass
class Corpus:
    real: list[Seed]
    sim: list[Seed]
    signer: SimSigner

    @property
    def all(self) -> list[Seed]:
        return self.real + self.sim

    @property
    def sim_root(self) -> x509.Certificate:
        return self.signer.root

    @classmethod
    def create(cls, now: datetime.datetime = T0) -> Corpus:
        real = []
        for stem, timestamp in REAL_VECTORS.items():
            data = (VECTORS / f"{stem}.cose").read_bytes()
            real.append(Seed(stem, data, envelope_tree(data), ms(timestamp), None,
                             debug="debug" in stem))
        signer = SimSigner(now)
        module_id = "i-0123456789abcdef0-enc0123456789abcdef"
        enclave = EnclaveIdentity.generate(module_id=module_id)
        debug = EnclaveIdentity.generate(module_id=module_id, debug=True)
        leaf = signer.leaf(module_id, now)
        at = now + VERIFY_DELAY
        variants: list[tuple[str, EnclaveIdentity, dict[str, object]]] = [
            ("sim-release", enclave,
             {"nonce": b"\x01" + bytes(40), "user_data": bytes(range(32)),
              "public_key": bytes(range(32, 64))}),
            ("sim-indefinite", enclave, {"indefinite": True}),
            ("sim-tagged-max-nonce", enclave, {"tagged": True, "nonce": b"n" * 1024}),
            ("sim-debug", debug, {"user_data": b"debug"}),
            ("sim-sha256", _sha256_identity(module_id),
             {"public_key": b"\x04" + bytes(96), "digest": "SHA256"}),
        ]
        sim = []
        for name, identity, options in variants:
            data = signer.document(identity, leaf, now, **options)  # type: ignore[arg-type]
            sim.append(Seed(name, data, envelope_tree(data), at, leaf.key,
                            debug=identity.debug))
        return cls(real, sim, signer)
