"""A CBOR tree that keeps every encoding choice, its writer, and a strict reader of its own.

    >>> from fuzz.cbor import Int, Map, Text, decode, encode
    >>> tree = Map([(Text.of("a"), Int(1)), (Text.of("a"), Int(1, width=8))])
    >>> encode(tree).hex()      # a duplicate key and a non-minimal head: cbor2 writes neither
    'a261610161611b0000000000000001'
    >>> decode(encode(tree)) == tree
    True

The writer emits what cbor2 refuses to emit: duplicate map keys, indefinite lengths on any
container or string, non-minimal heads, length prefixes that lie, reserved simple values, raw
bytes anywhere. The reader is independent of cbor2 (the product's decoder) so that the two
can be compared: it checks well-formedness (RFC 8949, appendix F) and keeps how each item was
written (head width, indefinite length, string chunks), so ``encode(decode(b)) == b`` for
well-formed ``b`` (except NaN payloads, and chunks of one string written in mixed widths).
"""

from __future__ import annotations

import dataclasses
import math
import struct
from typing import Self

# Head width: None is the shortest form; 0 is the argument in the first byte (arguments < 24);
# 1, 2, 4, 8 are the argument in that many following bytes (additional information 24..27).
WIDTH_AI = {1: 24, 2: 25, 4: 26, 8: 27}
AI_WIDTH = {v: k for k, v in WIDTH_AI.items()}


class CborError(ValueError):
    """Not well-formed CBOR."""


def minimal_width(arg: int) -> int:
    if arg < 24:
        return 0
    if arg < 0x100:
        return 1
    if arg < 0x10000:
        return 2
    if arg < 0x100000000:
        return 4
    return 8


def head(major: int, arg: int, width: int | None = None) -> bytes:
    """The initial byte(s) of an item; ``width`` forces a longer form than needed."""
    if not 0 <= arg < 1 << 64:
        raise ValueError(f"CBOR argument out of range: {arg}")
    if width is None or (width == 0 and arg >= 24) or (width and arg >= 1 << (8 * width)):
        width = minimal_width(arg)
    if width == 0:
        return bytes([major << 5 | arg])
    return bytes([major << 5 | WIDTH_AI[width]]) + arg.to_bytes(width, "big")


@dataclasses.dataclass
class _Number:
    value: int
    width: int | None = None

    def clone(self) -> Self:
        return type(self)(self.value, self.width)


class Int(_Number):
    """Major type 0 (value >= 0) or 1 (value < 0), -2**64 <= value < 2**64."""


@dataclasses.dataclass
class _String:
    """``chunks``: indefinite length, the content split there. ``declared``: the length the
    head claims, when it lies."""

    value: bytes
    width: int | None = None
    chunks: list[int] | None = None
    declared: int | None = None

    def clone(self) -> Self:
        chunks = None if self.chunks is None else list(self.chunks)
        return type(self)(self.value, self.width, chunks, self.declared)


class Bytes(_String):
    """A byte string (major 2)."""


class Text(_String):
    """A text string (major 3), kept as its raw bytes so invalid UTF-8 can be written."""

    @classmethod
    def of(cls, text: str) -> Text:
        return cls(text.encode())


@dataclasses.dataclass
class Embedded:
    """A byte string whose content is itself an encoded item (COSE's ``bstr .cbor``), plus
    ``suffix`` bytes after that item inside the string. ``role`` names it ("payload")."""

    inner: Node
    width: int | None = None
    chunks: list[int] | None = None
    suffix: bytes = b""
    role: str = ""

    def clone(self) -> Embedded:
        return Embedded(self.inner.clone(), self.width,
                        None if self.chunks is None else list(self.chunks), self.suffix,
                        self.role)

    def content(self) -> bytes:
        return encode(self.inner) + self.suffix


@dataclasses.dataclass
class Array:
    items: list[Node]
    indefinite: bool = False
    width: int | None = None
    declared: int | None = None

    def clone(self) -> Array:
        return Array([i.clone() for i in self.items], self.indefinite, self.width, self.declared)


@dataclasses.dataclass
class Map:
    pairs: list[tuple[Node, Node]]
    indefinite: bool = False
    width: int | None = None
    declared: int | None = None

    def clone(self) -> Map:
        return Map([(k.clone(), v.clone()) for k, v in self.pairs], self.indefinite, self.width,
                   self.declared)


@dataclasses.dataclass
class Tag:
    tag: int
    inner: Node
    width: int | None = None

    def clone(self) -> Tag:
        return Tag(self.tag, self.inner.clone(), self.width)


class Simple(_Number):
    """Major 7 simple values: 20 false, 21 true, 22 null, 23 undefined; ``width`` 1 writes
    the two-byte form (not well-formed below 32)."""


@dataclasses.dataclass
class Float:
    value: float
    size: int = 8  # 2, 4 or 8 bytes

    def clone(self) -> Float:
        return Float(self.value, self.size)


@dataclasses.dataclass
class Raw:
    """Bytes written as they are: a stray break, a reserved head, garbage."""

    data: bytes

    def clone(self) -> Raw:
        return Raw(self.data)


Node = Int | Bytes | Text | Embedded | Array | Map | Tag | Simple | Float | Raw


# -- writer ---------------------------------------------------------------------------------


def _string(major: int, value: bytes, width: int | None, chunks: list[int] | None,
            declared: int | None) -> bytes:
    if chunks is None:
        n = len(value) if declared is None else declared
        return head(major, max(0, min(n, (1 << 64) - 1)), width) + value
    out = [bytes([major << 5 | 31])]
    start = 0
    for size in chunks:
        piece = value[start:start + size]
        start += size
        out.append(head(major, len(piece), width) + piece)
    if start < len(value):
        out.append(head(major, len(value) - start, width) + value[start:])
    out.append(b"\xff")
    return b"".join(out)


def _float(value: float, size: int) -> bytes:
    if size == 2:
        try:
            return b"\xf9" + struct.pack(">e", value)
        except (OverflowError, struct.error):
            size = 4
    if size == 4:
        try:
            packed = struct.pack(">f", value)
            if math.isnan(value) or math.isinf(value) or struct.unpack(">f", packed)[0] == value:
                return b"\xfa" + packed
        except (OverflowError, struct.error):
            pass
    return b"\xfb" + struct.pack(">d", value)


def encode(node: Node) -> bytes:
    """The bytes of ``node``, with every encoding choice it records."""
    out: list[bytes] = []
    _encode(node, out)
    return b"".join(out)


def _encode(node: Node, out: list[bytes]) -> None:
    if isinstance(node, Int):
        if node.value >= 0:
            out.append(head(0, min(node.value, (1 << 64) - 1), node.width))
        else:
            out.append(head(1, min(-1 - node.value, (1 << 64) - 1), node.width))
    elif isinstance(node, Bytes):
        out.append(_string(2, node.value, node.width, node.chunks, node.declared))
    elif isinstance(node, Text):
        out.append(_string(3, node.value, node.width, node.chunks, node.declared))
    elif isinstance(node, Embedded):
        out.append(_string(2, node.content(), node.width, node.chunks, None))
    elif isinstance(node, Array):
        if node.indefinite:
            out.append(b"\x9f")
        else:
            n = len(node.items) if node.declared is None else node.declared
            out.append(head(4, n, node.width))
        for item in node.items:
            _encode(item, out)
        if node.indefinite:
            out.append(b"\xff")
    elif isinstance(node, Map):
        if node.indefinite:
            out.append(b"\xbf")
        else:
            n = len(node.pairs) if node.declared is None else node.declared
            out.append(head(5, n, node.width))
        for key, value in node.pairs:
            _encode(key, out)
            _encode(value, out)
        if node.indefinite:
            out.append(b"\xff")
    elif isinstance(node, Tag):
        out.append(head(6, node.tag, node.width))
        _encode(node.inner, out)
    elif isinstance(node, Simple):
        if node.width == 1 or node.value >= 24:
            out.append(bytes([0xF8, node.value & 0xFF]))
        else:
            out.append(bytes([0xE0 | node.value]))
    elif isinstance(node, Float):
        out.append(_float(node.value, node.size))
    else:
        out.append(node.data)


# -- reader ---------------------------------------------------------------------------------


class _Reader:
    def __init__(self, data: bytes, max_depth: int) -> None:
        self.data = data
        self.pos = 0
        self.max_depth = max_depth

    def take(self, n: int) -> bytes:
        if n > len(self.data) - self.pos:
            raise CborError(f"truncated: {n} byte(s) needed at offset {self.pos}")
        piece = self.data[self.pos:self.pos + n]
        self.pos += n
        return piece

    def head(self) -> tuple[int, int, int | None, bool]:
        """(major, argument, width as written, indefinite)."""
        first = self.take(1)[0]
        major, ai = first >> 5, first & 0x1F
        if ai < 24:
            return major, ai, None, False
        if ai in AI_WIDTH:
            width = AI_WIDTH[ai]
            arg = int.from_bytes(self.take(width), "big")
            return major, arg, (None if minimal_width(arg) == width else width), False
        if ai == 31 and major in (2, 3, 4, 5, 7):
            return major, 0, None, True
        raise CborError(f"reserved or invalid head 0x{first:02x} at offset {self.pos - 1}")

    def item(self, depth: int) -> Node:
        if depth > self.max_depth:
            raise CborError("nesting too deep")
        start = self.pos
        major, arg, width, indefinite = self.head()
        if major == 0:
            return Int(arg, width)
        if major == 1:
            return Int(-1 - arg, width)
        if major in (2, 3):
            if indefinite:
                pieces: list[bytes] = []
                chunk_width: int | None = None
                while True:
                    if self.data[self.pos:self.pos + 1] == b"\xff":
                        self.pos += 1
                        break
                    cmajor, carg, cwidth, cindef = self.head()
                    if cmajor != major or cindef:
                        raise CborError("indefinite string with a chunk of another kind")
                    chunk_width = cwidth if cwidth is not None else chunk_width
                    pieces.append(self.take(carg))
                value = b"".join(pieces)
                chunks = [len(p) for p in pieces]
                return (Bytes(value, chunk_width, chunks) if major == 2
                        else Text(value, chunk_width, chunks))
            value = self.take(arg)
            return Bytes(value, width) if major == 2 else Text(value, width)
        if major == 4:
            items: list[Node] = []
            if indefinite:
                while not self.at_break():
                    items.append(self.item(depth + 1))
                self.pos += 1
                return Array(items, True)
            for _ in range(arg):
                items.append(self.item(depth + 1))
            return Array(items, False, width)
        if major == 5:
            pairs: list[tuple[Node, Node]] = []
            if indefinite:
                while not self.at_break():
                    key = self.item(depth + 1)
                    pairs.append((key, self.item(depth + 1)))
                self.pos += 1
                return Map(pairs, True)
            for _ in range(arg):
                key = self.item(depth + 1)
                pairs.append((key, self.item(depth + 1)))
            return Map(pairs, False, width)
        if major == 6:
            return Tag(arg, self.item(depth + 1), width)
        # major 7
        ai = self.data[start] & 0x1F
        if indefinite:
            raise CborError(f"break outside an indefinite item at offset {start}")
        if ai < 24:
            return Simple(arg)
        if ai == 24:
            if arg < 32:
                raise CborError(f"two-byte simple value {arg} below 32 at offset {start}")
            return Simple(arg, 1)
        raw = self.data[start + 1:self.pos]
        if ai == 25:
            return Float(struct.unpack(">e", raw)[0], 2)
        if ai == 26:
            return Float(struct.unpack(">f", raw)[0], 4)
        return Float(struct.unpack(">d", raw)[0], 8)

    def at_break(self) -> bool:
        if self.pos >= len(self.data):
            raise CborError("truncated: indefinite item without a break")
        return self.data[self.pos] == 0xFF


def decode(data: bytes, *, max_depth: int = 64, allow_trailing: bool = False) -> Node:
    """One well-formed item, as a tree that re-encodes to the same bytes.

    Floats are kept by value; a NaN with a payload other than the canonical one re-encodes
    differently, which nothing here relies on.
    """
    reader = _Reader(data, max_depth)
    node = reader.item(0)
    if not allow_trailing and reader.pos != len(data):
        raise CborError(f"{len(data) - reader.pos} trailing byte(s)")
    return node

