"""The structure-aware mutator: a seed document as a tree, changed the way parsers break.

    >>> from fuzz.mutate import Mutator, RandomChooser
    >>> from fuzz.seeds import Corpus
    >>> corpus = Corpus.create()
    >>> mutator = Mutator(corpus)
    >>> mutant = mutator.mutant(corpus.sim[0], RandomChooser(7), resign=True)
    >>> mutant.ops                                  # doctest: +SKIP
    ['duplicate_key', 'indefinite_length']

Every random decision goes through a :class:`Chooser`: :class:`RandomChooser` for seeded
runs (the test suite's smoke run, the plain driver), or atheris's FuzzedDataProvider, which
lets libFuzzer's coverage feedback steer which mutations are made where.

A mutant is made in three phases, each optional:

1. structural changes to the tree (:data:`STRUCTURAL`): CBOR major types swapped, definite
   and indefinite lengths, lying length prefixes, non-minimal heads, deep nesting, duplicate
   map keys (also equal keys written differently), tags (18, tags cbor2 interprets, unknown
   tags) put on and taken off, fields removed and added, null versus absent, empty and huge
   byte strings, boundary integers, floats, simple values, bad text, reordering, subtrees
   spliced from another seed, junk inside ``bstr .cbor``, stray raw bytes, damaged or swapped
   certificates, damaged signatures;
2. re-signing (simulator seeds, ``resign=True``): the changes of phase 1 are limited to the
   signed parts (protected header, payload), then the signature is made again with the
   seed's leaf key, so the mutant gets past the signature check; envelope changes that leave
   the signed bytes alone may follow;
3. byte changes to the encoding: flips, inserts, deletes, duplicated ranges, truncation, and
   splices with another seed's bytes.

Each change is recorded by its class name in :attr:`Mutant.ops`.
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Callable, Sequence
from typing import Protocol, TypeVar

from fuzz.cbor import (
    Array,
    Bytes,
    Embedded,
    Float,
    Int,
    Map,
    Node,
    Raw,
    Simple,
    Tag,
    Text,
    encode,
    minimal_width,
)
from fuzz.seeds import Corpus, Seed
from keyutil.simulator import es384_sign

T = TypeVar("T")

P384_ORDER = int(
    "ffffffffffffffffffffffffffffffffffffffffffffffffc7634d81f4372ddf"
    "581a0db248b0a77aecec196accc52973",
    16,
)
# Tags cbor2 decodes into values of its own (the rest stay CBORTag objects).
KNOWN_TAGS = (0, 1, 2, 3, 4, 5, 24, 25, 28, 29, 30, 35, 36, 37, 256, 258, 260, 261, 55799)
UNKNOWN_TAGS = (16, 17, 19, 21, 22, 23, 32, 61, 96, 97, 98, 259, 1004, 99_999, 2**32 + 5,
                2**64 - 1)
INTERESTING_INTS = (
    0, 1, -1, 2, 15, 16, 17, 23, 24, 31, 32, 33, 47, 48, 49, 255, 256, 65535, 65536,
    2**31 - 1, 2**32 - 1, 2**32, 2**53 + 1, 2**63 - 1, 2**63, 2**64 - 1, -(2**63), -(2**64),
    253_402_300_799_999, 253_402_300_800_000, 1_665_651_482_136, 1_772_366_400_000,
)
BYTE_SIZES = (0, 1, 31, 32, 33, 41, 47, 48, 49, 64, 65, 95, 96, 97, 1023, 1024, 1025, 4096,
              4097, 16_385, 70_000)
# Byte strings that mean something to a reader: zeros (a debug PCR, an X25519 point of small
# order), one, all ones, the point at infinity and an off-curve point for P-384.
SPECIAL_BYTES = (bytes(32), (1).to_bytes(32, "little"), b"\xff" * 32, bytes(48), b"\x00",
                 b"\x04" + bytes(96), b"\x04" + b"\x01" * 96, bytes(96), b"\x01" + bytes(40))
TEXTS: tuple[bytes, ...] = (
    b"", b"SHA384", b"SHA256", b"SHA512", b"sha384", b"SHA384\x00", b"MD5", b"A" * 256,
    b"A" * 257, "\u00e9t\u00e9".encode(), b"\xff\xfe", b"\xed\xa0\x80", b"\xc0\x80",
    b"module_id", b"digest", b"timestamp", b"pcrs", b"certificate", b"cabundle",
    b"public_key", b"user_data", b"nonce", b"Nonce", b"nonce ", b"i-0",
)
FIELD_NAMES = ("module_id", "digest", "timestamp", "pcrs", "certificate", "cabundle",
               "public_key", "user_data", "nonce")
RAW_ITEMS = (b"\xff", b"\x1c", b"\x1f", b"\x3e", b"\x5f\x41\x00\xff", b"\xf8\x10", b"\x9f",
             b"\xbf\x00", b"\x5f\x61\x61\xff", b"\xfc", b"\x18", b"\x7f\xff")
INTERESTING_BYTES = (0x00, 0xFF, 0x1F, 0x5F, 0x7F, 0x9F, 0xBF, 0xD2, 0xD9, 0xF6, 0xF7, 0x18,
                     0x1B, 0x58, 0x59, 0x80, 0xA0, 0xC0)


class Chooser(Protocol):
    """The source of every decision."""

    def below(self, n: int) -> int:
        """An integer in [0, n), or 0 when n <= 1."""
        ...

    def data(self, n: int) -> bytes:
        """``n`` bytes."""
        ...


class RandomChooser:
    """Decisions from a seeded ``random.Random``: reproducible runs."""

    def __init__(self, seed: int | random.Random) -> None:
        self.rng = seed if isinstance(seed, random.Random) else random.Random(seed)

    def below(self, n: int) -> int:
        # One draw per decision whatever n is, so that a run stays aligned with another run
        # of the same seed even where a size differs (the simulator CA is new every run).
        return min(n - 1, int(self.rng.random() * n)) if n > 1 else 0

    def data(self, n: int) -> bytes:
        return self.rng.randbytes(n)


def pick(c: Chooser, items: Sequence[T]) -> T:
    return items[c.below(len(items))]


def chance(c: Chooser, percent: int) -> bool:
    return c.below(100) < percent


# -- where a node sits --------------------------------------------------------------------


@dataclasses.dataclass
class Slot:
    node: Node
    path: tuple[str, ...]
    parent: Node | None
    index: int = 0
    side: int = 0  # in a map: 0 for the key, 1 for the value
    holds_embedded: bool = False  # an Embedded (protected header, payload) is at or below

    @property
    def region(self) -> str:
        """"payload" or "protected" inside those, "envelope" elsewhere."""
        return self.path[0] if self.path and self.path[0] in ("payload", "protected") else (
            "envelope")

    @property
    def field(self) -> str:
        return self.path[1] if len(self.path) > 1 and self.region == "payload" else ""


def _label(key: Node) -> str:
    if isinstance(key, Text):
        return key.value.decode("utf-8", "replace")
    if isinstance(key, Int):
        return str(key.value)
    return "?"


def walk(root: Node) -> list[Slot]:
    slots: list[Slot] = []

    def visit(node: Node, path: tuple[str, ...], parent: Node | None, index: int,
              side: int) -> bool:
        slot = Slot(node, path, parent, index, side)
        slots.append(slot)
        below = False
        if isinstance(node, Array):
            for i, item in enumerate(node.items):
                below |= visit(item, (*path, f"[{i}]"), node, i, 0)
        elif isinstance(node, Map):
            for i, (key, value) in enumerate(node.pairs):
                label = _label(key)
                below |= visit(key, (*path, label, "key"), node, i, 0)
                below |= visit(value, (*path, label), node, i, 1)
        elif isinstance(node, Tag):
            below = visit(node.inner, (*path, f"#{node.tag}"), node, 0, 0)
        elif isinstance(node, Embedded):
            visit(node.inner, (node.role,) if node.role else (*path, "cbor"), node, 0, 0)
            below = True
        slot.holds_embedded = below
        return below

    visit(root, (), None, 0, 0)
    return slots


class Holder:
    """The root of a tree being mutated (so that the root itself can be replaced)."""

    def __init__(self, root: Node) -> None:
        self.root = root

    def replace(self, slot: Slot, new: Node) -> None:
        parent = slot.parent
        if parent is None:
            self.root = new
        elif isinstance(parent, Array):
            parent.items[slot.index] = new
        elif isinstance(parent, Map):
            key, value = parent.pairs[slot.index]
            parent.pairs[slot.index] = (new, value) if slot.side == 0 else (key, new)
        elif isinstance(parent, Tag | Embedded):
            parent.inner = new


def envelope_items(root: Node) -> list[Node] | None:
    """The COSE_Sign1 array's items, under any tags."""
    node = root
    while isinstance(node, Tag):
        node = node.inner
    return node.items if isinstance(node, Array) else None


def content(node: Node) -> bytes | None:
    """What a byte string item holds, if it is one."""
    if isinstance(node, Embedded):
        return node.content()
    if isinstance(node, Bytes) and node.declared is None:
        return node.value
    return None


def sig_structure(protected: bytes, payload: bytes) -> bytes:
    """RFC 9052's Sig_structure for COSE_Sign1, written by this package's encoder."""
    return encode(Array([Text.of("Signature1"), Bytes(protected), Bytes(b""), Bytes(payload)]))


@dataclasses.dataclass
class Mutant:
    seed: Seed
    data: bytes
    ops: list[str]
    # (protected, payload, signature) as re-signed, when the mutant was.
    signed: tuple[bytes, bytes, bytes] | None = None

    @property
    def resigned(self) -> bool:
        return self.signed is not None


Op = Callable[["Mutator", Chooser, Holder, Slot], "str | None"]


class Mutator:
    def __init__(self, corpus: Corpus) -> None:
        self.corpus = corpus
        self.seeds = corpus.all
        # Donor subtrees for splicing, by path.
        self.donors: dict[tuple[str, ...], list[Node]] = {}
        self.donor_list: list[Node] = []
        for seed in self.seeds:
            for slot in walk(seed.tree):
                self.donors.setdefault(slot.path, []).append(slot.node)
                self.donor_list.append(slot.node)
        self.certificates = [
            slot.node.value
            for seed in self.seeds
            for slot in walk(seed.tree)
            if slot.field in ("certificate", "cabundle") and isinstance(slot.node, Bytes)
        ]

    # -- the three phases ----------------------------------------------------------------
    def mutant(self, seed: Seed, c: Chooser, *, resign: bool = False,
               max_structural: int = 5, byte_percent: int = 30,
               operations: Sequence[Op] | None = None) -> Mutant:
        """A mutant of ``seed``; ``operations`` defaults to all of :data:`STRUCTURAL`."""
        operations = operations or STRUCTURAL
        holder = Holder(seed.tree.clone())
        ops: list[str] = []
        signed = None
        if resign and seed.signer is not None:
            for _ in range(1 + c.below(max_structural)):
                self.structural(c, holder, ops, operations, signed_only=True)
            signed = self.resign(holder, seed, ops)
            if chance(c, 30):
                for _ in range(1 + c.below(2)):
                    self.structural(c, holder, ops, operations, envelope_only=True)
        else:
            for _ in range(c.below(max_structural + 1)):
                self.structural(c, holder, ops, operations)
        data = encode(holder.root)
        if not ops or chance(c, byte_percent if signed is None else byte_percent // 6):
            for _ in range(1 + c.below(3)):
                data = self.byte_op(c, data, ops)
        return Mutant(seed, data, ops, signed)

    def structural(self, c: Chooser, holder: Holder, ops: list[str],
                   operations: Sequence[Op] = (), *, signed_only: bool = False,
                   envelope_only: bool = False) -> None:
        operations = operations or STRUCTURAL
        slots = walk(holder.root)
        if signed_only:
            slots = [s for s in slots
                     if s.region != "envelope" or isinstance(s.node, Embedded)]
        elif envelope_only:
            # Around the signed parts, never over them: not the signature, not a node that
            # holds the protected header or the payload (splicing those would bring in
            # another seed's genuinely signed content).
            slots = [s for s in slots if s.region == "envelope" and s.path[-1:] != ("[3]",)
                     and not s.holds_embedded]
        if not slots:
            return
        for _ in range(8):
            if chance(c, 50):
                slot = pick(c, slots)
            else:  # one field (path prefix) first, so the 32 PCR slots do not dominate
                groups = sorted({s.path[:2] for s in slots})
                group = pick(c, groups)
                slot = pick(c, [s for s in slots if s.path[:2] == group])
            name = pick(c, operations)(self, c, holder, slot)
            if name is not None:
                ops.append(name)
                return

    def resign(self, holder: Holder, seed: Seed,
               ops: list[str]) -> tuple[bytes, bytes, bytes] | None:
        items = envelope_items(holder.root)
        if items is None or len(items) < 4 or seed.signer is None:
            ops.append("resign_impossible")
            return None
        protected, payload = content(items[0]), content(items[2])
        if protected is None or payload is None:
            ops.append("resign_impossible")
            return None
        signature = es384_sign(seed.signer, sig_structure(protected, payload))
        items[3] = Bytes(signature)
        return protected, payload, signature

    def byte_op(self, c: Chooser, data: bytes, ops: list[str]) -> bytes:
        b = bytearray(data)
        n = len(b)
        kind = c.below(7)
        i = c.below(n + 1)
        if kind == 0 and n:
            b[min(i, n - 1)] ^= 1 << c.below(8)
            ops.append("byte_flip")
        elif kind == 1 and n:
            b[min(i, n - 1)] = pick(c, INTERESTING_BYTES)
            ops.append("byte_set")
        elif kind == 2:
            b[i:i] = c.data(1 + c.below(8))
            ops.append("byte_insert")
        elif kind == 3 and n:
            del b[i:i + 1 + c.below(16)]
            ops.append("byte_delete")
        elif kind == 4:
            donor = pick(c, self.seeds).data
            j = c.below(len(donor))
            b = b[:i] + bytearray(donor[j:])
            ops.append("byte_splice")
        elif kind == 5 and n:
            j = i + 1 + c.below(64)
            b[i:i] = b[i:j] * (1 + c.below(4))
            ops.append("byte_duplicate")
        else:
            b = b[:i]
            ops.append("byte_truncate")
        return bytes(b)

    # -- making nodes ----------------------------------------------------------------------
    def gen(self, c: Chooser, depth: int = 0) -> Node:
        kind = c.below(9 if depth < 2 else 6)
        if kind == 0:
            return Int(pick(c, INTERESTING_INTS))
        if kind == 1:
            return Bytes(c.data(pick(c, BYTE_SIZES[:12])))
        if kind == 2:
            return Text(pick(c, TEXTS))
        if kind == 3:
            return Simple(pick(c, (20, 21, 22, 23)))
        if kind == 4:
            return Float(pick(c, (0.0, -0.0, 1.5, math.nan, math.inf)), pick(c, (2, 4, 8)))
        if kind == 5:
            return self.donor(c).clone()
        if kind == 6:
            return Array([self.gen(c, depth + 1) for _ in range(c.below(4))])
        if kind == 7:
            return Map([(self.gen(c, depth + 1), self.gen(c, depth + 1))
                        for _ in range(c.below(3))])
        return Tag(pick(c, KNOWN_TAGS + UNKNOWN_TAGS), self.gen(c, depth + 1))

    def donor(self, c: Chooser, path: tuple[str, ...] | None = None) -> Node:
        same = self.donors.get(path, []) if path is not None else []
        return pick(c, same) if same and chance(c, 70) else pick(c, self.donor_list)


# -- structural operations: each returns its class name, or None if it does not apply ------


def op_major_swap(m: Mutator, c: Chooser, h: Holder, slot: Slot) -> str | None:
    node = slot.node
    options: list[Node]
    if isinstance(node, Int):
        v = node.value
        options = [Bytes(abs(v).to_bytes(max(1, (abs(v).bit_length() + 7) // 8), "big")),
                   Text(str(v).encode()), Float(float(v)), Simple(21 if v else 20),
                   Int(-1 - v)]
    elif isinstance(node, Bytes):
        options = [Text(node.value), Array([Int(x) for x in node.value[:8]]),
                   Int(len(node.value)), Simple(22)]
    elif isinstance(node, Text):
        options = [Bytes(node.value), Int(len(node.value)), Array([node.clone()])]
    elif isinstance(node, Embedded):
        options = [node.inner.clone(), Text(node.content())]
    elif isinstance(node, Array):
        items = [i.clone() for i in node.items]
        options = [Map(list(zip(items[::2], items[1::2], strict=False))),
                   Bytes(encode(node)), Array([]) if items else Map([])]
    elif isinstance(node, Map):
        options = [Array([x.clone() for pair in node.pairs for x in pair]),
                   Bytes(encode(node)), Array([v.clone() for _, v in node.pairs])]
    elif isinstance(node, Simple):
        options = [Int(node.value), Bytes(b""), Text(b"null")]
    elif isinstance(node, Float):
        options = [Int(int(node.value)) if math.isfinite(node.value) else Int(0), Simple(22)]
    else:
        return None
    h.replace(slot, pick(c, options))
    return "major_swap"


def op_indefinite(m: Mutator, c: Chooser, h: Holder, slot: Slot) -> str | None:
    node = slot.node
    if isinstance(node, Array | Map):
        node.indefinite = not node.indefinite
        node.declared = None
    elif isinstance(node, Bytes | Text):
        if node.chunks is None:
            size = len(node.value)
            cuts = sorted(c.below(size + 1) for _ in range(c.below(4)))
            node.chunks = [b - a for a, b in zip([0, *cuts], [*cuts, size], strict=True)]
            node.declared = None
        else:
            node.chunks = None
    elif isinstance(node, Embedded):
        node.chunks = None if node.chunks is not None else [c.below(64) for _ in range(3)]
    else:
        return None
    return "indefinite_length"


def op_wrong_length(m: Mutator, c: Chooser, h: Holder, slot: Slot) -> str | None:
    node = slot.node
    delta = pick(c, (1, -1, 2, -2, 1 << 32, 1 << 20))
    if isinstance(node, Array | Map):
        n = len(node.items) if isinstance(node, Array) else len(node.pairs)
        node.indefinite = False
        node.declared = max(0, n + delta)
    elif isinstance(node, Bytes | Text):
        node.chunks = None
        node.declared = max(0, len(node.value) + delta)
    else:
        return None
    return "wrong_length"


def op_non_minimal(m: Mutator, c: Chooser, h: Holder, slot: Slot) -> str | None:
    node = slot.node
    if isinstance(node, Simple):
        node.width = 1  # the two-byte form of a one-byte simple value: not well-formed
        return "non_minimal_head"
    if isinstance(node, Float | Raw):
        return None
    if isinstance(node, Int):
        arg = node.value if node.value >= 0 else -1 - node.value
    elif isinstance(node, Bytes | Text):
        arg = len(node.value)
    elif isinstance(node, Array):
        arg = len(node.items)
    elif isinstance(node, Map):
        arg = len(node.pairs)
    elif isinstance(node, Tag):
        arg = node.tag
    else:
        arg = len(node.content())
    wider = [w for w in (1, 2, 4, 8) if w > minimal_width(arg)]
    if not wider:
        return None
    node.width = pick(c, wider)
    return "non_minimal_head"


def op_nest(m: Mutator, c: Chooser, h: Holder, slot: Slot) -> str | None:
    node: Node = slot.node
    for _ in range(1 + c.below(12)):
        kind = c.below(3)
        if kind == 0:
            node = Array([node])
        elif kind == 1:
            node = Map([(Int(0), node)])
        else:
            node = Tag(pick(c, UNKNOWN_TAGS), node)
    h.replace(slot, node)
    return "deep_nesting"


def op_duplicate_key(m: Mutator, c: Chooser, h: Holder, slot: Slot) -> str | None:
    target = slot.node if isinstance(slot.node, Map) else slot.parent
    if not isinstance(target, Map) or not target.pairs:
        return None
    key, value = pick(c, target.pairs)
    twin = key.clone()
    variant = c.below(3)
    if variant == 1 and isinstance(twin, Int | Text | Bytes):
        op_non_minimal(m, c, h, Slot(twin, (), None))  # equal value, other bytes
    elif variant == 2 and isinstance(twin, Text | Bytes):
        twin.chunks = [len(twin.value) // 2]
    new_value = value.clone() if chance(c, 40) else m.gen(c)
    target.pairs.insert(c.below(len(target.pairs) + 1), (twin, new_value))
    return "duplicate_key"


def op_tag(m: Mutator, c: Chooser, h: Holder, slot: Slot) -> str | None:
    group = c.below(3)
    if group == 0:
        h.replace(slot, Tag(18, slot.node, pick(c, (None, None, 1, 2))))
        return "tag_18"
    if group == 1:
        tag = pick(c, KNOWN_TAGS)
        h.replace(slot, Tag(29, Int(c.below(3))) if tag == 29 else Tag(tag, slot.node))
        return "tag_known"
    h.replace(slot, Tag(pick(c, UNKNOWN_TAGS), slot.node))
    return "tag_unknown"


def op_untag(m: Mutator, c: Chooser, h: Holder, slot: Slot) -> str | None:
    if not isinstance(slot.node, Tag):
        return None
    h.replace(slot, slot.node.inner)
    return "tag_unwrap"


def op_remove(m: Mutator, c: Chooser, h: Holder, slot: Slot) -> str | None:
    target = slot.node if isinstance(slot.node, Array | Map) else slot.parent
    if isinstance(target, Array) and target.items:
        del target.items[c.below(len(target.items))]
    elif isinstance(target, Map) and target.pairs:
        del target.pairs[c.below(len(target.pairs))]
    else:
        return None
    return "remove_field"


def op_add(m: Mutator, c: Chooser, h: Holder, slot: Slot) -> str | None:
    target = slot.node if isinstance(slot.node, Array | Map) else slot.parent
    if isinstance(target, Array):
        target.items.insert(c.below(len(target.items) + 1), m.gen(c))
    elif isinstance(target, Map):
        kind = c.below(3)
        key: Node = (Text.of(pick(c, (*FIELD_NAMES, "enclave_flags", "Nonce"))) if kind == 0
                     else Int(pick(c, INTERESTING_INTS)) if kind == 1 else m.gen(c))
        target.pairs.insert(c.below(len(target.pairs) + 1), (key, m.gen(c)))
    else:
        return None
    return "add_field"


def op_null_absent(m: Mutator, c: Chooser, h: Holder, slot: Slot) -> str | None:
    kind = c.below(3)
    if kind == 2 and isinstance(slot.parent, Map) and slot.side == 1:
        del slot.parent.pairs[slot.index]
    else:
        h.replace(slot, Simple(22 if kind == 0 else 23))
    return "null_vs_absent"


def op_bytes_size(m: Mutator, c: Chooser, h: Holder, slot: Slot) -> str | None:
    node = slot.node
    if not isinstance(node, Bytes):
        return None
    kind = c.below(5)
    if kind == 0:
        node.value = c.data(pick(c, BYTE_SIZES))
    elif kind == 1:
        node.value = node.value[:-1 - c.below(4)]
    elif kind == 2:
        node.value = node.value + bytes(1 + c.below(4))
    elif kind == 3:
        node.value = node.value * 2
    else:
        node.value = pick(c, SPECIAL_BYTES)
    node.declared = None
    return "bytes_size"


def op_int(m: Mutator, c: Chooser, h: Holder, slot: Slot) -> str | None:
    if not isinstance(slot.node, Int):
        return None
    v = slot.node.value
    new = pick(c, INTERESTING_INTS) if chance(c, 60) else v + pick(c, (-1, 1, -1000, 1000,
                                                                      -300_000, 60_001))
    slot.node.value = max(-(2**64), min(new, 2**64 - 1))
    return "int_value"


def op_float(m: Mutator, c: Chooser, h: Holder, slot: Slot) -> str | None:
    base = float(slot.node.value) if isinstance(slot.node, Int) else 0.5
    h.replace(slot, Float(pick(c, (base, -0.0, math.nan, math.inf, -math.inf, 1e300)),
                          pick(c, (2, 4, 8))))
    return "float"


def op_simple(m: Mutator, c: Chooser, h: Holder, slot: Slot) -> str | None:
    h.replace(slot, Simple(pick(c, (20, 21, 22, 23, 0, 16, 19, 24, 31, 32, 255))))
    return "simple_value"


def op_text(m: Mutator, c: Chooser, h: Holder, slot: Slot) -> str | None:
    if not isinstance(slot.node, Text):
        return None
    slot.node.value = pick(c, TEXTS)
    slot.node.declared = None
    slot.node.chunks = None
    return "text_value"


def op_reorder(m: Mutator, c: Chooser, h: Holder, slot: Slot) -> str | None:
    target = slot.node if isinstance(slot.node, Array | Map) else slot.parent
    seq: list[Node] | list[tuple[Node, Node]]
    if isinstance(target, Array):
        seq = target.items
    elif isinstance(target, Map):
        seq = target.pairs
    else:
        return None
    if len(seq) < 2:
        return None
    i, j = c.below(len(seq)), c.below(len(seq))
    seq[i], seq[j] = seq[j], seq[i]  # type: ignore[assignment]
    return "reorder"


def op_splice(m: Mutator, c: Chooser, h: Holder, slot: Slot) -> str | None:
    h.replace(slot, m.donor(c, slot.path).clone())
    return "splice_subtree"


def op_embedded(m: Mutator, c: Chooser, h: Holder, slot: Slot) -> str | None:
    node = slot.node
    if not isinstance(node, Embedded):
        return None
    kind = c.below(3)
    if kind == 0:
        node.suffix = pick(c, (b"\x00", b"\xff", b"\xf6", b"\xa0", encode(m.gen(c))))
    elif kind == 1:
        h.replace(slot, node.inner)  # the map itself where a bstr belongs
    else:
        node.inner = Tag(24, Bytes(encode(node.inner)))  # "embedded CBOR" twice over
    return "embedded_bstr"


def op_raw(m: Mutator, c: Chooser, h: Holder, slot: Slot) -> str | None:
    raw = Raw(pick(c, RAW_ITEMS))
    if isinstance(slot.node, Array):
        slot.node.items.insert(c.below(len(slot.node.items) + 1), raw)
    else:
        h.replace(slot, raw)
    return "raw_item"


def op_certificate(m: Mutator, c: Chooser, h: Holder, slot: Slot) -> str | None:
    node = slot.node
    if slot.field not in ("certificate", "cabundle") or not isinstance(node, Bytes):
        return None
    value = bytearray(node.value)
    kind = c.below(4)
    if kind == 0 and value:
        # DER headers sit in the first bytes of each element; flip there more often.
        i = c.below(min(len(value), 24)) if chance(c, 50) else c.below(len(value))
        value[i] ^= 1 << c.below(8)
    elif kind == 1:
        del value[c.below(len(value) + 1):]
    elif kind == 2:
        value += pick(c, (b"\x00", b"\x30\x00", c.data(8)))
    else:
        value = bytearray(pick(c, m.certificates))
    node.value = bytes(value)
    return "certificate"


def op_signature(m: Mutator, c: Chooser, h: Holder, slot: Slot) -> str | None:
    node = slot.node
    if slot.path[-1:] != ("[3]",) or not isinstance(node, Bytes) or len(node.value) != 96:
        return None
    kind = c.below(4)
    if kind == 0:
        r, s = node.value[:48], int.from_bytes(node.value[48:], "big")
        node.value = r + (P384_ORDER - s).to_bytes(48, "big")
        return "signature_high_s"
    if kind == 1:
        node.value = bytes(96)
    elif kind == 2:
        node.value = node.value[:95] if chance(c, 50) else node.value + b"\x00"
    else:
        value = bytearray(node.value)
        value[c.below(96)] ^= 1 << c.below(8)
        node.value = bytes(value)
    return "signature"


STRUCTURAL: tuple[Op, ...] = (
    op_major_swap, op_indefinite, op_wrong_length, op_non_minimal, op_nest,
    op_duplicate_key, op_duplicate_key, op_tag, op_tag, op_untag, op_remove, op_add,
    op_null_absent, op_bytes_size, op_int, op_float, op_simple, op_text, op_reorder,
    op_splice, op_embedded, op_raw, op_certificate, op_certificate, op_signature,
)
# Changes that often leave a valid document (another value of the right type, an encoding
# variant): re-signed, these get past the parser to the checks behind it.
SEMANTIC: tuple[Op, ...] = (
    op_int, op_bytes_size, op_text, op_null_absent, op_remove, op_add, op_reorder, op_splice,
    op_splice, op_indefinite, op_non_minimal, op_certificate, op_duplicate_key,
)
# Every class name a structural operation can record (for the smoke run's checks).
STRUCTURAL_CLASSES = (
    "major_swap", "indefinite_length", "wrong_length", "non_minimal_head", "deep_nesting",
    "duplicate_key", "tag_18", "tag_known", "tag_unknown", "tag_unwrap", "remove_field",
    "add_field", "null_vs_absent", "bytes_size", "int_value", "float", "simple_value",
    "text_value", "reorder", "splice_subtree", "embedded_bstr", "raw_item", "certificate",
    "signature", "signature_high_s",
)
BYTE_CLASSES = ("byte_flip", "byte_set", "byte_insert", "byte_delete", "byte_splice",
                "byte_duplicate", "byte_truncate")

