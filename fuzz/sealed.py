"""Fuzz targets for what parses sealed input: the age file opener, the dotenv parser, and
the recipient statement a host relays.

    >>> from fuzz.mutate import RandomChooser
    >>> from fuzz.sealed import SealedTarget
    >>> SealedTarget().one(RandomChooser(1)).kind in ("refused", "accepted")
    True

``sealed``: :func:`keyutil.sealing.age.unseal` on mutants of age files sealed to the
fuzzer's identity (several sizes around the 64 KiB chunk, extra recipients and unknown
"grease" stanzas, an empty file), mutated at the byte level (flips, cuts, insertions,
appended data) and by structure (header lines swapped, duplicated or dropped, base64
characters changed, chunks swapped, dropped or doubled, the final-chunk flag moved). The
oracle: a refusal must be a :class:`SealedError` with a code of :data:`CODES`; an input the
opener accepts must be byte for byte a seed (the header MAC and the chunk tags cover every
byte, and age's encodings are canonical), and what it opened must be that seed's plaintext.

``dotenv``: :func:`keyutil.sealing.dotenv.parse_dotenv` on mutants of dotenv files whose
values all contain the marker ``SECRET``: a refusal must be a :class:`DotenvError` whose
message holds no marker (it names a line number, never content), an acceptance a dict of
valid names to strings without NUL.

``recipient``: :func:`keyutil.sealing.recipient.verify_statement` on JSON-level mutants of a
genuine statement and of a genuinely signed one for another key (fields dropped,
swapped between the two, replaced by junk of every JSON type, edited): it must refuse with
one of its two codes, or return exactly the genuine statement.
"""

from __future__ import annotations

import hmac
import io
import json
import re
import traceback
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ed25519

from fuzz.mutate import Chooser, chance, pick
from fuzz.targets import Execution, _Inflight
from keyutil.protocol import ProtocolError, parse_application
from keyutil.sealing import age
from keyutil.sealing.age import CHUNK, CODES, SEALED_CHUNK, Identity, SealedError
from keyutil.sealing.dotenv import NAME, DotenvError, parse_dotenv
from keyutil.sealing.recipient import sign_statement, verify_statement

FUZZ_IDENTITY = Identity(bytes(range(7, 39)))
OTHER = Identity(bytes(range(9, 41)))
PLAINTEXTS = (b"", b"w", bytes(range(256)) * 4, b"\x5a" * CHUNK, b"\xa5" * (CHUNK + 100))


def _trace(e: BaseException) -> str:
    return "".join(traceback.format_exception(type(e), e, e.__traceback__)[-6:])


def _seal(data: bytes, *, grease: bool, others: int) -> bytes:
    recipients = [OTHER.recipient] * others + [FUZZ_IDENTITY.recipient]
    out = io.BytesIO()
    age.seal(io.BytesIO(data), out, recipients)
    blob = out.getvalue()
    if not grease:
        return blob
    # An unknown stanza, as age's "grease": re-MACing is not possible without the file key,
    # so build the header again around it.
    header = age.read_header(io.BytesIO(blob))
    file_key = age.unwrap(header, [FUZZ_IDENTITY])
    stanzas = (age.Stanza(b"x-grease", (b"a", b"b"), b"\x01" * 30), *header.stanzas)
    text = age.INTRO + b"\n" + b"".join(s.encode() for s in stanzas) + age.FOOTER_PREFIX
    mac = hmac.new(age._hkdf(file_key, b"", b"header"), text, "sha256").digest()
    payload = blob[blob.index(b"\n", blob.index(b"\n---") + 1) + 1 :]
    return text + b" " + age._b64encode(mac) + b"\n" + payload


class _Seed:
    def __init__(self, plaintext: bytes, sealed: bytes) -> None:
        self.plaintext = plaintext
        self.sealed = sealed
        self.payload = sealed.index(b"\n", sealed.index(b"\n---") + 1) + 1


def _lines_mutation(c: Chooser, blob: bytes, payload: int, ops: list[str]) -> bytes:
    header, rest = blob[:payload], blob[payload:]
    lines = header.split(b"\n")[:-1]
    if not lines:
        return _byte_mutation(c, blob, ops)
    i, j = c.below(len(lines)), c.below(len(lines))
    kind = c.below(4)
    if kind == 0:
        ops.append("line_swap")
        lines[i], lines[j] = lines[j], lines[i]
    elif kind == 1:
        ops.append("line_duplicate")
        lines.insert(i, lines[j])
    elif kind == 2 or not lines[i]:
        ops.append("line_drop")
        del lines[i]
    else:
        ops.append("base64_char")
        line = bytearray(lines[i])
        if line:
            line[c.below(len(line))] = pick(c, b"AQgw+/=_-9 \t")
        lines[i] = bytes(line)
    return b"\n".join(lines) + b"\n" + rest


def _chunk_mutation(c: Chooser, blob: bytes, payload: int, ops: list[str]) -> bytes:
    start = payload + age.NONCE_LENGTH
    chunks = [blob[k : k + SEALED_CHUNK] for k in range(start, len(blob), SEALED_CHUNK)]
    if len(chunks) < 2:
        ops.append("chunk_append")
        return blob + c.data(c.below(40))
    kind = c.below(3)
    if kind == 0:
        ops.append("chunk_swap")
        chunks[0], chunks[1] = chunks[1], chunks[0]
    elif kind == 1:
        ops.append("chunk_drop")
        del chunks[c.below(len(chunks))]
    else:
        ops.append("chunk_double")
        chunks.insert(c.below(len(chunks)), chunks[c.below(len(chunks))])
    return blob[:start] + b"".join(chunks)


def _byte_mutation(c: Chooser, blob: bytes, ops: list[str]) -> bytes:
    kind = c.below(4)
    at = c.below(len(blob) + 1)
    if kind == 0 and blob:
        ops.append("byte_flip")
        at = min(at, len(blob) - 1)
        return blob[:at] + bytes([blob[at] ^ (1 << c.below(8))]) + blob[at + 1 :]
    if kind == 1:
        ops.append("truncate")
        return blob[:at]
    if kind == 2:
        ops.append("insert")
        return blob[:at] + c.data(1 + c.below(8)) + blob[at:]
    ops.append("delete_range")
    return blob[:at] + blob[at + 1 + c.below(64) :]


class SealedTarget(_Inflight):
    name = "sealed"

    def __init__(self) -> None:
        self.seeds = [
            _Seed(p, _seal(p, grease=g, others=o))
            for p in PLAINTEXTS
            for g, o in ((False, 0), (True, 1))
        ]

    def one(self, c: Chooser) -> Execution:
        try:
            seed = pick(c, self.seeds)
            ops: list[str] = []
            data = seed.sealed
            for _ in range(1 + c.below(2)):
                where = c.below(3)
                payload = data.find(b"\n", data.find(b"\n---") + 1) + 1 or len(data)
                if where == 0:
                    data = _lines_mutation(c, data, min(payload, len(data)), ops)
                elif where == 1 and chance(c, 80):
                    data = _chunk_mutation(c, data, seed.payload, ops)
                else:
                    data = _byte_mutation(c, data, ops)
        except Exception as e:  # the fuzzer's own failure
            return Execution(self.name, "harness_error", type(e).__name__, [], b"",
                             detail=_trace(e))
        return self.check(data, ops, seed)

    def check(self, data: bytes, ops: list[str], seed: _Seed) -> Execution:
        def result(kind: str, code: str, detail: str = "") -> Execution:
            return Execution(self.name, kind, code, ops, data, f"{len(seed.plaintext)}B", detail)

        self.before(data)
        out = bytearray()
        try:
            age.unseal(io.BytesIO(data), out.extend, FUZZ_IDENTITY)
        except SealedError as e:
            if e.code not in CODES:
                return result("crash", e.code, f"undocumented code {e.code!r}")
            return result("refused", e.code)
        except Exception as e:
            return result("crash", type(e).__name__, _trace(e))
        if data not in {s.sealed for s in self.seeds}:
            return result("accepted_mutant", "accepted", "a changed file opened")
        if bytes(out) != seed.plaintext and data == seed.sealed:
            return result("accepted_mutant", "accepted", "opened to other plaintext")
        return result("accepted", "accepted")


DOTENV_SEEDS = (
    b"# secrets\nDB_USER=SECRETuser\nexport DB_PASS='SECRET pass'\n",
    b'TOKEN="SECRET\\n\\"x\\"" # comment\n\nEMPTY_SECRET=SECRET\r\n',
    b"A=SECRET1 # c\nB=SECRET2\n#C=SECRET3\n",
)
_MARKER = re.compile(rb"SECRET")


class DotenvTarget(_Inflight):
    name = "dotenv"


    def one(self, c: Chooser) -> Execution:
        ops: list[str] = []
        data = pick(c, DOTENV_SEEDS)
        for _ in range(1 + c.below(3)):
            if chance(c, 50):
                ops.append("char")
                at = c.below(len(data))
                data = data[:at] + bytes([pick(c, b"=\"'\\# \t\n\rx\x00\xff_9")]) + data[at + 1 :]
            else:
                data = _byte_mutation(c, data, ops)
        return self.check(data, ops)

    def check(self, data: bytes, ops: list[str]) -> Execution:
        def result(kind: str, code: str, detail: str = "") -> Execution:
            return Execution(self.name, kind, code, ops, data, "dotenv", detail)

        self.before(data)
        try:
            variables = parse_dotenv(data)
        except DotenvError as e:
            if _MARKER.search(e.message.encode()) or not e.message.startswith("dotenv line "):
                return result("crash", e.code, "the message shows content")
            return result("refused", e.code)
        except Exception as e:
            return result("crash", type(e).__name__, _trace(e))
        for name, value in variables.items():
            if not NAME.fullmatch(name) or "\0" in value:
                return result("accepted_mutant", "accepted", "a bad name or a NUL accepted")
        return result("accepted", "accepted")


_RECIPIENT_KMS = ed25519.Ed25519PrivateKey.from_private_bytes(bytes(range(40, 72)))
_APP = parse_application("fuzz-app")
_JUNK: tuple[Any, ...] = (None, True, 1, 1.0, "", "x", [], {}, "0x" + "00" * 32,
                          str(FUZZ_IDENTITY.recipient), "weights", "age", "raw")


class RecipientTarget(_Inflight):
    """:func:`verify_statement` on mutants of a genuine recipient statement (what a host
    relays from the KMS): accepted only if every signed field is the genuine one."""

    name = "recipient"

    def __init__(self) -> None:
        body = {"application": "0x" + _APP.hex(), "name": "weights", "type": "age",
                "recipient": str(FUZZ_IDENTITY.recipient)}
        self.genuine = sign_statement(_RECIPIENT_KMS, body)
        # Genuinely signed too, for another key of the application: what a host may replay.
        other = {**body, "name": "weights2", "recipient": str(OTHER.recipient)}
        self.other = sign_statement(_RECIPIENT_KMS, other)

    def one(self, c: Chooser) -> Execution:
        ops: list[str] = []
        value: dict[str, Any] = dict(pick(c, (self.genuine, self.genuine, self.other)))
        fields = [*value, "extra"]
        for _ in range(1 + c.below(3)):
            field = pick(c, fields)
            kind = c.below(4)
            if kind == 0:
                ops.append("field_drop")
                value.pop(field, None)
            elif kind == 1:
                ops.append("field_junk")
                value[field] = pick(c, _JUNK)
            elif kind == 2 and field in self.genuine:
                ops.append("field_from_other")
                value[field] = self.other[field]
            else:
                ops.append("field_text")
                text = str(value.get(field, ""))
                at = c.below(len(text) + 1)
                value[field] = text[:at] + pick(c, "aA0=+/ x") + text[at + 1 :]
        return self.check(value, ops)

    def check(self, value: Any, ops: list[str]) -> Execution:
        data = json.dumps(value, sort_keys=True, default=str).encode()

        def result(kind: str, code: str, detail: str = "") -> Execution:
            return Execution(self.name, kind, code, ops, data, "statement", detail)

        self.before(data)
        try:
            got = verify_statement(_RECIPIENT_KMS.public_key(), value, application=_APP,
                                   name="weights", key_type="age")
        except ProtocolError as e:
            if e.code not in ("recipient_unauthenticated", "recipient_mismatch"):
                return result("crash", e.code, "undocumented code")
            return result("refused", e.code)
        except Exception as e:
            return result("crash", type(e).__name__, _trace(e))
        signed = {k: self.genuine[k] for k in got}
        if got != signed or got["recipient"] != str(FUZZ_IDENTITY.recipient):
            return result("accepted_mutant", "accepted", "a changed statement verified")
        return result("accepted", "accepted")


SEALED_TARGETS: dict[str, type[SealedTarget] | type[DotenvTarget] | type[RecipientTarget]] = {
    "sealed": SealedTarget,
    "dotenv": DotenvTarget,
    "recipient": RecipientTarget,
}
