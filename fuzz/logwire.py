"""Fuzz target ``logwire``: the host's reader of the log bridge (hostile bytes from an enclave).

    >>> from fuzz.mutate import RandomChooser
    >>> from fuzz.logwire import LogWireTarget
    >>> LogWireTarget().one(RandomChooser(1)).kind in ("refused", "accepted")
    True

A compromised enclave controls every byte that reaches ``keyutil logs``. Each execution builds
a valid stream (preamble, lines on each stream, dropped counts, long lines split in frames),
mutates it (bytes flipped, inserted or cut; header fields set to boundary values; frames
spliced or repeated), feeds it to :class:`keyutil.logwire.LogReader` in random chunks, and
judges the outcome against a reference decoder written separately here, which reads the whole
input at once. The oracle:

- ``refused``/``accepted``: the reader agrees with the reference (same records, same error
  code), held at most one frame of bytes, and every record prints as exactly one line with no
  control character (text) and round-trips through JSON;
- ``crash``: any exception other than WireError;
- ``accepted_mutant`` / ``refused_valid``: the reader and the reference disagree.
"""

from __future__ import annotations

import io
import json
import struct
from typing import Any

from fuzz.mutate import Chooser, chance, pick
from fuzz.targets import Execution, _Inflight, _trace
from keyutil.host.logsink import Printer
from keyutil.logwire import (
    HEADER,
    HELLO,
    MAX_PAYLOAD,
    STREAMS,
    Dropped,
    LogLine,
    LogReader,
    Record,
    WireError,
    encode_dropped,
    encode_line,
)

BOUNDARY_LENGTHS = (0, 1, 7, 8, 9, MAX_PAYLOAD - 1, MAX_PAYLOAD, MAX_PAYLOAD + 1, 0xFFFFFFFF)
TEXTS = ("", "ok", "h\u00e9llo", "\x1b[2J\r\nforged", "\u2028", "x" * 20000, "\x00\x7f\x9b")


def reference(data: bytes) -> tuple[list[tuple[Any, ...]], str | None]:
    """(records, error code or None): the format as docs/deploy.md states it, read at once."""
    if len(data) < 6:
        return [], ("bad_magic" if data != HELLO[: len(data)] else None)
    if data[:6] != b"KLOG1\n":
        return [], "bad_magic"
    records: list[tuple[Any, ...]] = []
    at = 6
    while len(data) - at >= 8:
        kind, stream, reserved, length = struct.unpack(">BBHI", data[at : at + 8])
        if kind not in (1, 2):
            return records, "bad_kind"
        if reserved:
            return records, "bad_reserved"
        if stream > 2 or (kind == 2 and stream != 0):
            return records, "bad_stream"
        if length > 8 + 16 * 1024:
            return records, "too_long"
        if length < 8 or (kind == 2 and length != 8):
            return records, "bad_length"
        if len(data) - at - 8 < length:
            break
        payload = data[at + 8 : at + 8 + length]
        number = int.from_bytes(payload[:8], "big")
        if kind == 1 and number > 253402300799999:  # after 9999-12-31T23:59:59.999Z
            return records, "bad_time"
        if kind == 2:
            records.append(("dropped", number))
        else:
            text = payload[8:].decode("utf-8", "replace")
            records.append(("line", ("supervisor", "stdout", "stderr")[stream], number, text))
        at += 8 + length
    return records, None


def _as_tuple(record: Record) -> tuple[Any, ...]:
    if isinstance(record, Dropped):
        return ("dropped", record.count)
    return ("line", record.stream, round(record.ts * 1000), record.text)


def build(c: Chooser) -> tuple[bytes, list[str]]:
    frames = [HELLO]
    for _ in range(c.below(6)):
        if chance(c, 20):
            frames.append(encode_dropped(c.below(1 << 20)))
        else:
            text = pick(c, TEXTS) if chance(c, 50) else c.data(c.below(64)).decode("latin-1")
            ts = c.below(1 << 31) if not chance(c, 12) else pick(c, (253402300799.999, 2.0**50))
            frames.append(encode_line(pick(c, STREAMS), ts, text))
    ops: list[str] = []
    for _ in range(c.below(4)):
        frames, op = mutate(c, frames)
        ops.append(op)
    return b"".join(frames), ops


def mutate(c: Chooser, frames: list[bytes]) -> tuple[list[bytes], str]:
    i = c.below(len(frames))
    target = bytearray(frames[i])
    op = pick(c, ("flip", "insert", "cut", "header", "splice", "repeat"))
    if op == "flip" and target:
        target[c.below(len(target))] ^= 1 << c.below(8)
    elif op == "insert":
        at = c.below(len(target) + 1)
        target[at:at] = c.data(1 + c.below(16))
    elif op == "cut" and target:
        del target[c.below(len(target)) :]
    elif op == "header" and i > 0 and len(target) >= HEADER.size:
        kind, stream, reserved, length = HEADER.unpack_from(target)
        field = c.below(4)
        if field == 0:
            kind = pick(c, (0, 1, 2, 3, 255))
        elif field == 1:
            stream = pick(c, (0, 1, 2, 3, 255))
        elif field == 2:
            reserved = pick(c, (0, 1, 0x8000))
        else:
            length = pick(c, BOUNDARY_LENGTHS)
        target[: HEADER.size] = HEADER.pack(kind, stream, reserved, length)
    elif op == "splice":
        frames = [*frames, frames[c.below(len(frames))]]
    elif op == "repeat":
        target += bytes(target)
    frames = [*frames[:i], bytes(target), *frames[i + 1 :]]
    return frames, op


class LogWireTarget(_Inflight):
    name = "logwire"

    def __init__(self, *_: Any) -> None:
        pass

    def one(self, c: Chooser) -> Execution:
        try:
            data, ops = build(c)
            cuts = sorted({c.below(len(data) + 1) for _ in range(c.below(5))})
        except Exception as e:
            return Execution(self.name, "harness_error", type(e).__name__, [], b"",
                             detail=_trace(e))
        return self.check(data, ops, cuts)

    def check(self, data: bytes, ops: list[str], cuts: list[int]) -> Execution:
        def result(kind: str, code: str, detail: str = "") -> Execution:
            return Execution(self.name, kind, code, ops, data, "built", detail)

        self.before(data)
        reader = LogReader()
        records: list[Record] = []
        error: str | None = None
        try:
            start = 0
            for end in [*cuts, len(data)]:
                try:
                    records += reader.feed(data[start:end])
                except WireError as e:
                    records += e.records
                    error = e.code
                    break
                if reader.pending > HEADER.size + MAX_PAYLOAD:
                    return result("crash", "unbounded", f"holds {reader.pending} bytes")
                start = end
            problem = print_problem(records)
        except Exception as e:
            return result("crash", type(e).__name__, _trace(e))
        if problem:
            return result("crash", "printer", problem)
        expected, expected_error = reference(data)
        got = [_as_tuple(r) for r in records]
        if got != expected:
            return result("accepted_mutant" if error is None else "refused_valid",
                          error or "accepted", "records differ from the reference")
        if error != expected_error:
            kind = "accepted_mutant" if error is None else "refused_valid"
            return result(kind, error or "accepted", f"reference says {expected_error}")
        return result("refused" if error else "accepted", error or "accepted")


def print_problem(records: list[Record]) -> str:
    text, js = io.StringIO(), io.StringIO()
    plain, as_json = Printer(text, "text"), Printer(js, "json")
    for record in records:
        plain.write(16, "vsock:16:1", record)
        as_json.write(16, "vsock:16:1", record)
    lines = text.getvalue().split("\n")[:-1]
    if len(lines) != len(records):
        return f"{len(records)} records printed as {len(lines)} lines"
    for line in lines:
        if any((ord(ch) < 0x20 and ch != "\t") or 0x7F <= ord(ch) < 0xA0 for ch in line):
            return f"a control character reached the terminal: {line[:80]!r}"
    for record, line in zip(records, js.getvalue().splitlines(), strict=True):
        back = json.loads(line)
        if isinstance(record, LogLine) and back["line"] != record.text:
            return "JSON did not round-trip the line"
    return ""
