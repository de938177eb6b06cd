"""Fuzz target ``host_settings``: ``keyutil run``'s reading of the settings the host offers.

    >>> from fuzz.mutate import RandomChooser
    >>> from fuzz.host_settings import HostSettingsTarget
    >>> HostSettingsTarget().one(RandomChooser(1)).kind in ("refused", "accepted")
    True

The host writes every byte of the settings (:func:`keyutil.enclave.supervisor.
decide_host_settings`). Each execution builds a JSON object of names (allowed, forbidden,
reserved) and values (short, at the size limit and past it, with NUL, lone surrogates, not
strings), mutates its bytes (flipped, inserted, cut, nested deep, repeated) and judges the
outcome against a reference written separately here. The oracle:

- ``refused``: a ValueError (not one JSON object), and the reference refuses too;
- ``accepted``: the accepted settings are exactly the reference's (allowed names only, each a
  string an environment can hold), and every refused name is printable;
- ``crash``: any other exception (RecursionError was one);
- ``accepted_mutant`` / ``refused_valid``: the product and the reference disagree.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from fuzz.mutate import Chooser, chance, pick
from fuzz.targets import Execution, _Inflight, _trace
from keyutil.enclave.supervisor import MAX_SETTING_BYTES, decide_host_settings

STOCK_RECURSION_LIMIT = 1000  # what `keyutil run` runs with (py_ecc raises the test process's)
ALLOW = ("LOG_LEVEL", "REGION")
NAMES = (*ALLOW, "LD_PRELOAD", "KEYUTIL_KMS", "PATH", "", "\x1b[2J", "log_level", "\u2028")
VALUES: tuple[Any, ...] = (
    "debug", "", "a\x00b", "\ud800", "\udc80", "\u00e9" * (MAX_SETTING_BYTES // 2),
    "\u00e9" * (MAX_SETTING_BYTES // 2 + 1), "x" * MAX_SETTING_BYTES,
    "x" * (MAX_SETTING_BYTES + 1), 3, None, True, [], {"a": "b"}, 1e400,
)


class _Object(list[tuple[str, Any]]):
    """A JSON object as the reference reads it: its pairs in order, duplicates kept."""


def reference(data: bytes) -> dict[str, str] | None:
    """The settings a careful reader accepts, or None when it refuses the whole input."""
    try:
        pairs = json.loads(data, object_pairs_hook=_Object)
    except (ValueError, RecursionError):
        return None
    if not isinstance(pairs, _Object):
        return None  # an array (or a scalar) at the top, not an object
    accepted: dict[str, str] = {}
    for name, value in pairs:
        accepted.pop(name, None)  # JSON's last duplicate wins, in Python as in the product
        if name not in ALLOW or not isinstance(value, str) or "\x00" in value:
            continue
        try:
            if len(value.encode("utf-8", "strict")) > MAX_SETTING_BYTES:
                continue
        except UnicodeEncodeError:
            continue
        accepted[name] = value
    return accepted


def build(c: Chooser) -> tuple[bytes, list[str]]:
    items = [(pick(c, NAMES), pick(c, VALUES)) for _ in range(c.below(5))]
    body = "{" + ",".join(f"{json.dumps(n)}: {json.dumps(v)}" for n, v in items) + "}"
    data = bytearray(body.encode("utf-8", "surrogatepass"))
    ops: list[str] = []
    for _ in range(c.below(3)):
        op = pick(c, ("flip", "insert", "cut", "nest", "repeat", "array"))
        ops.append(op)
        if op == "flip" and data:
            data[c.below(len(data))] ^= 1 << c.below(8)
        elif op == "insert":
            at = c.below(len(data) + 1)
            data[at:at] = c.data(1 + c.below(8))
        elif op == "cut" and data:
            del data[c.below(len(data)) :]
        elif op == "nest":
            depth = pick(c, (10, 999, 1001, 5000, 30000))
            inner = b'{"LOG_LEVEL": ' * depth if chance(c, 50) else b"[" * depth
            data = bytearray(b'{"REGION": ' + inner + bytes(data))
        elif op == "repeat":
            data += bytes(data)
        elif op == "array":
            data = bytearray(b"[" + bytes(data) + b"]")
    return bytes(data), ops


class HostSettingsTarget(_Inflight):
    name = "host_settings"

    def __init__(self, *_: Any) -> None:
        pass

    def one(self, c: Chooser) -> Execution:
        try:
            data, ops = build(c)
        except Exception as e:
            return Execution(self.name, "harness_error", type(e).__name__, [], b"",
                             detail=_trace(e))
        return self.check(data, ops)

    def check(self, data: bytes, ops: list[str]) -> Execution:
        def result(kind: str, code: str, detail: str = "") -> Execution:
            return Execution(self.name, kind, code, ops, data, "built", detail)

        self.before(data)
        limit = sys.getrecursionlimit()
        sys.setrecursionlimit(STOCK_RECURSION_LIMIT)
        try:
            try:
                accepted, refused = decide_host_settings(data, ALLOW)
            except ValueError:
                accepted, refused = None, []
            except Exception as e:
                return result("crash", type(e).__name__, _trace(e))
            expected = reference(data)
        finally:
            sys.setrecursionlimit(limit)
        if accepted is None:
            if expected is not None:
                return result("refused_valid", "invalid", "the reference reads an object")
            return result("refused", "invalid")
        if expected is None:
            return result("accepted_mutant", "accepted", "the reference refuses the input")
        if accepted != expected:
            return result("accepted_mutant", "accepted", "settings differ from the reference")
        for name, _ in refused:
            if any((ord(ch) < 0x20 and ch != "\t") or 0x7F <= ord(ch) < 0xA0 or ch in "\u2028\u2029"
                   for ch in name):
                return result("crash", "printable", f"a refused name is not printable: {name!r}")
        return result("accepted", "accepted")
