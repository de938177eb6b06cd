"""The log bridge's wire format: lines from the enclave to the host, framed.

    >>> from keyutil.logwire import HELLO, LogReader, encode_line, encode_dropped
    >>> reader = LogReader()
    >>> data = HELLO + encode_dropped(3) + encode_line("stderr", 1795309001.5, "boot failed")
    >>> [str(r) for r in reader.feed(data)]
    ['dropped 3', 'stderr 1795309001.500 boot failed']

Both ends use this module: the enclave's supervisor writes (:mod:`keyutil.enclave.logsend`),
the host's ``keyutil logs`` reads (:mod:`keyutil.host.logsink`). The host does not trust the
enclave's bytes any more than the enclave trusts the host's, so the reader is strict,
bounded and fuzzed (``fuzz/logwire.py``).

A connection starts with the 6 bytes ``KLOG1\\n`` (magic and version 1), then frames::

    kind u8 | stream u8 | reserved u16 = 0 | length u32 | payload (length bytes)

all integers big-endian, ``length`` at most :data:`MAX_PAYLOAD`.

- kind 1, ``line``: payload = time (u64, milliseconds since the epoch, at most
  :data:`MAX_TIME_MS`) + the line's text, UTF-8, without its newline. A line longer than
  :data:`MAX_LINE` bytes travels as several frames. Stream 0 is the supervisor's own log,
  1 the app's stdout, 2 its stderr.
- kind 2, ``dropped``: stream 0, payload = u64, the number of lines the sender dropped
  (its buffer was full while the host was not listening) since its last report.

Anything else (wrong magic, unknown kind or stream, non-zero reserved bits, an oversized or
malformed payload) is a :class:`WireError` with a stable code (carrying the whole records
that came before it), and the reader is done with that connection. Text that is not UTF-8
is decoded with replacement characters; escaping control characters for a terminal is the
printer's job (:func:`printable`).
"""

from __future__ import annotations

import dataclasses
import struct
import time

HELLO = b"KLOG1\n"
HEADER = struct.Struct(">BBHI")
MAX_LINE = 16 * 1024  # bytes of text in one frame
MAX_PAYLOAD = 8 + MAX_LINE
MAX_TIME_MS = 253402300799999  # 9999-12-31T23:59:59.999Z, the last time a printer can show
KIND_LINE = 1
KIND_DROPPED = 2
STREAMS = ("supervisor", "stdout", "stderr")
_U64 = struct.Struct(">Q")


class WireError(ValueError):
    """Bytes that are not this format. ``code`` is stable."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.records: list[Record] = []  # whole records that came before the bad bytes


@dataclasses.dataclass(frozen=True)
class LogLine:
    stream: str
    ts: float
    text: str

    def __str__(self) -> str:
        return f"{self.stream} {self.ts:.3f} {self.text}"


@dataclasses.dataclass(frozen=True)
class Dropped:
    count: int

    def __str__(self) -> str:
        return f"dropped {self.count}"


Record = LogLine | Dropped


def encode_line(stream: str, ts: float, text: str | bytes) -> bytes:
    """One line as one or more frames (split every :data:`MAX_LINE` bytes)."""
    index = STREAMS.index(stream)
    data = text.encode("utf-8", "replace") if isinstance(text, str) else bytes(text)
    stamp = _U64.pack(max(0, int(ts * 1000)))
    chunks = [data[i : i + MAX_LINE] for i in range(0, len(data), MAX_LINE)] or [b""]
    return b"".join(
        HEADER.pack(KIND_LINE, index, 0, 8 + len(chunk)) + stamp + chunk for chunk in chunks
    )


def encode_dropped(count: int) -> bytes:
    return HEADER.pack(KIND_DROPPED, 0, 0, 8) + _U64.pack(count)


class LogReader:
    """Incremental decoder: :meth:`feed` bytes as they come, get whole records back. Holds at
    most one frame's bytes; after a WireError it refuses everything (the connection is bad)."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._hello = False
        self._failed: WireError | None = None

    def feed(self, data: bytes) -> list[Record]:
        if self._failed is not None:
            raise self._failed
        self._buffer += data
        records: list[Record] = []
        try:
            self._records(records)
        except WireError as e:
            e.records = records
            self._failed = WireError(e.code, e.message)
            self._buffer.clear()
            raise
        return records

    def _records(self, records: list[Record]) -> None:
        buf = self._buffer
        if not self._hello:
            if buf[: len(HELLO)] != HELLO[: len(buf)]:
                raise WireError("bad_magic", "expected the log bridge's KLOG1 preamble")
            if len(buf) < len(HELLO):
                return
            del buf[: len(HELLO)]
            self._hello = True
        while len(buf) >= HEADER.size:
            kind, stream, reserved, length = HEADER.unpack_from(buf)
            if kind not in (KIND_LINE, KIND_DROPPED):
                raise WireError("bad_kind", f"unknown frame kind {kind}")
            if reserved != 0:
                raise WireError("bad_reserved", "reserved frame bits must be zero")
            if stream >= len(STREAMS) or (kind == KIND_DROPPED and stream != 0):
                raise WireError("bad_stream", f"stream {stream} is not valid for kind {kind}")
            if length > MAX_PAYLOAD:
                raise WireError("too_long", f"a frame of {length} bytes; at most {MAX_PAYLOAD}")
            if length < 8 or (kind == KIND_DROPPED and length != 8):
                raise WireError("bad_length", f"a kind {kind} frame cannot be {length} bytes")
            if len(buf) < HEADER.size + length:
                break
            payload = bytes(buf[HEADER.size : HEADER.size + length])
            del buf[: HEADER.size + length]
            (number,) = _U64.unpack_from(payload)
            if kind == KIND_LINE and number > MAX_TIME_MS:
                raise WireError("bad_time", f"a line stamped {number} ms, after the year 9999")
            if kind == KIND_DROPPED:
                records.append(Dropped(number))
            else:
                text = payload[8:].decode("utf-8", "replace")
                records.append(LogLine(STREAMS[stream], number / 1000, text))

    @property
    def pending(self) -> int:
        """Bytes of an incomplete frame held (a connection that ends here was cut short)."""
        return len(self._buffer)


_ESCAPES = {c: f"\\x{c:02x}" for c in (*range(0x20), 0x7F) if c != 0x09}
_ESCAPES.update({c: f"\\u{c:04x}" for c in range(0x80, 0xA0)})
_ESCAPES.update({0x2028: "\\u2028", 0x2029: "\\u2029"})


def printable(text: str) -> str:
    """``text`` with control characters escaped, so that an enclave's line cannot move the
    host's cursor, clear its screen or forge a second log line."""
    return text.translate(_ESCAPES)


def now() -> float:
    return time.time()
