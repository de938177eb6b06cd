"""keyutil.protocol.format_application (in every release's audit entry) against the byte loop
it replaced, kept here as the reference."""

from __future__ import annotations

import random

import pytest

from keyutil.protocol import format_application


def reference(app: bytes) -> str:
    name = app.rstrip(b"\0")
    printable = name and all(0x20 <= b <= 0x7E for b in name)
    if printable and not name.startswith((b"0x", b"0X")):
        return name.decode("ascii")
    return "0x" + app.hex()


@pytest.mark.parametrize(
    "app, text",
    [
        (b"billing".ljust(32, b"\0"), "billing"),
        (b"~ !".ljust(32, b"\0"), "~ !"),
        (bytes(32), "0x" + bytes(32).hex()),
        (b"0xabc".ljust(32, b"\0"), "0x" + b"0xabc".ljust(32, b"\0").hex()),
        (b"tab\there".ljust(32, b"\0"), "0x" + b"tab\there".ljust(32, b"\0").hex()),
        (b"del\x7f".ljust(32, b"\0"), "0x" + b"del\x7f".ljust(32, b"\0").hex()),
        (b"a\0b".ljust(32, b"\0"), "0x" + b"a\0b".ljust(32, b"\0").hex()),
        (b"\xc3\xa9".ljust(32, b"\0"), "0x" + b"\xc3\xa9".ljust(32, b"\0").hex()),
    ],
)
def test_known(app: bytes, text: str) -> None:
    assert format_application(app) == reference(app) == text


def test_same_as_the_reference_on_random_ids() -> None:
    rnd = random.Random(7)
    edges = [0, 0x1F, 0x20, 0x30, 0x58, 0x78, 0x7E, 0x7F, 0x80, 0xFF]
    for _ in range(20_000):
        length = rnd.randint(0, 32)
        pool = [*edges, rnd.randrange(0x20, 0x7F), rnd.randrange(0x20, 0x7F), rnd.randrange(256)]
        body = bytes(rnd.choice(pool) for _ in range(length))
        app = body.ljust(32, b"\0")
        assert format_application(app) == reference(app), app.hex()
