"""The ``provenance`` fuzz target: :func:`keyutil.provenance.verify_statement` on mutated
statements, the hostile bytes `keyutil verify-provenance` and enclaves read.

    >>> from fuzz.mutate import RandomChooser
    >>> from fuzz.provenance_target import ProvenanceTarget
    >>> target = ProvenanceTarget()
    >>> target.one(RandomChooser(1)).kind in ("refused", "accepted")
    True

Seeds are statements a KMS issued (secp256k1 with its EIP-712 part, ed25519, age). A mutant
changes a field's value (to another type, a near value, a value from another seed), drops or
adds a field, flips or cuts bytes of the JSON text, duplicates a key, or nests it thousands
of arrays deep; most mutants are then re-signed with the KMS identity, so that the checks
behind the Ed25519 signature (form, the EIP-712 signature, the address) are reached too.

Oracle: a refusal must be a :class:`~keyutil.provenance.ProvenanceError` (anything else is a
``crash``). An accepted mutant that was not re-signed must mean what its seed means: the same
application, name, type, public key, KMS identity, chain, contract and, for secp256k1, the
same account, signer and signer signature. A re-signed one carries a genuine KMS signature
over whatever it says, so any meaning is right for it, except that an accepted secp256k1
statement must still be one of the seeds' on everything the signer's EIP-712 signature and
the account cover: that signature and that address cannot be made for another key.
"""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ed25519
from eth_account import Account

from fuzz.mutate import Chooser, chance, pick
from fuzz.targets import Execution, _Inflight
from keyutil import protocol, provenance
from keyutil.protocol import KeyRequest
from mock_kms import signer
from mock_kms.provenance import ProvenanceIssuer, SignerChoice
from mock_kms.state import KmsState

STOCK_RECURSION_LIMIT = 1000  # CPython's default, what `keyutil verify-provenance` runs with
_VALUES: tuple[Any, ...] = (
    None, True, 0, 1, -1, 2**64, 1.5, "", "0x", "0x" + "00" * 20, "0x" + "ff" * 32,
    "0x04" + "00" * 64, "ed25519:", "secp256k1", "ed25519", "age", "raw", "x" * 5000, [], {},
    "\u0000", "\uff21\uff22", "0X" + "ab" * 20,
)


def _meaning(statement: provenance.ProvenanceStatement) -> tuple[Any, ...]:
    def low(value: str | None) -> str | None:
        return value.lower() if value is not None else None

    return (statement.application, statement.name, statement.key_type, statement.public_key,
            statement.kms_identity, statement.chain_id, statement.contract.lower(),
            low(statement.address), low(statement.signer), statement.signer_signature)


class ProvenanceTarget(_Inflight):
    name = "provenance"

    def __init__(self, corpus: Any = None, mutator: Any = None) -> None:
        state = KmsState(bytes(range(32)), ed25519.Ed25519PrivateKey.generate())
        account = Account.create()

        class _Ring(signer.SignerKeyring):
            def account(self, address: str) -> Any:
                return account

        choice = SignerChoice(signer.RegisteredSigner(read=lambda: account.address),
                              _Ring(Path("/nonexistent")))
        issuer = ProvenanceIssuer(state, 31337, "0x" + "5a" * 20, choice)
        self.state = state
        self.pin = state.identity.public_key()
        app = b"fuzz-app".ljust(32, b"\0")
        self.seeds = [
            issuer.issue(app, KeyRequest(name, 32, key_type))
            for name, key_type in (("wallet", "secp256k1"), ("signing", "ed25519"),
                                   ("weights", "age"), ("w2", "secp256k1"))
        ]
        self.meanings = {
            json.dumps(s, sort_keys=True): _meaning(provenance.parse_statement(s))
            for s in self.seeds
        }

    def _resign(self, obj: dict[str, Any]) -> dict[str, Any]:
        body = {k: v for k, v in obj.items() if k != "signature"}
        try:
            signed = self.state.identity.sign(provenance.signing_bytes(body))
        except (TypeError, ValueError):  # a value canonical JSON cannot write
            return obj
        return {**body, "signature": protocol.b64e(signed)}

    def mutate(self, c: Chooser, seed: dict[str, Any]) -> tuple[bytes, list[str]]:
        obj: Any = dict(seed)
        ops: list[str] = []
        for _ in range(1 + c.below(3)):
            op = pick(c, ("value", "other_seed", "drop", "add", "case", "hex_digit"))
            ops.append(op)
            field = pick(c, sorted(obj))
            if op == "value":
                obj[field] = pick(c, _VALUES)
            elif op == "other_seed":
                other = pick(c, self.seeds)
                if field in other:
                    obj[field] = other[field]
            elif op == "drop":
                obj.pop(field, None)
            elif op == "add":
                obj[pick(c, ("extra", "address", "signer", "signer_signature"))] = pick(c, _VALUES)
            elif op == "case" and isinstance(obj.get(field), str):
                obj[field] = obj[field].swapcase()
            elif op == "hex_digit" and isinstance(obj.get(field), str) and obj[field]:
                text = obj[field]
                i = c.below(len(text))
                obj[field] = text[:i] + pick(c, "0af9G ") + text[i + 1:]
        if chance(c, 70):
            ops.append("resign")
            obj = self._resign(obj)
        data = json.dumps(obj).encode()
        if chance(c, 15):
            op = pick(c, ("flip", "cut", "dup_key", "wrap", "nest"))
            ops.append(op)
            if op == "flip" and data:
                i = c.below(len(data))
                data = data[:i] + bytes([data[i] ^ (1 << c.below(8))]) + data[i + 1:]
            elif op == "cut":
                data = data[: c.below(len(data))]
            elif op == "dup_key":
                data = data[:-1] + b', "v": 1}'
            elif op == "nest":  # deeper than keyutil's stack allows, within the size limit
                depth = 900 + c.below(3000)
                data = b"[" * depth + data[: max(0, 4000 - depth)]
            else:
                data = b"[" + data + b"]"
        return data, ops

    def one(self, c: Chooser) -> Execution:
        try:
            seed = pick(c, self.seeds)
            data, ops = self.mutate(c, seed)
        except Exception as e:  # the fuzzer's own failure
            return Execution(self.name, "harness_error", type(e).__name__, [], b"",
                             detail=traceback.format_exc(limit=8))
        return self.check(data, ops, json.dumps(seed, sort_keys=True))

    def check(self, data: bytes, ops: list[str], seed: str = "") -> Execution:
        def result(kind: str, code: str, detail: str = "") -> Execution:
            return Execution(self.name, kind, code, ops, data, seed[:40], detail)

        self.before(data)
        # keyutil parses with the interpreter's default recursion limit; importing eth_account
        # (py_ecc) raised this process's to 100000, which would hide a RecursionError.
        limit = sys.getrecursionlimit()
        sys.setrecursionlimit(STOCK_RECURSION_LIMIT)
        try:
            verified = provenance.verify_statement(data, self.pin)
        except provenance.ProvenanceError as e:
            return result("refused", e.code)
        except Exception as e:
            return result("crash", type(e).__name__, traceback.format_exc(limit=8))
        finally:
            sys.setrecursionlimit(limit)
        meaning = _meaning(verified.statement)
        if "resign" not in ops and meaning != self.meanings.get(seed):
            return result("accepted_mutant", "accepted", "verified with another meaning")
        if (verified.statement.key_type in provenance.ONCHAIN_TYPES
                and meaning not in self.meanings.values()):
            return result("accepted_mutant", "accepted",
                          "a secp256k1 statement no signer signed verified")
        return result("accepted", "accepted")
