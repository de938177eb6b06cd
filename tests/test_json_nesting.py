"""keyutil.protocol.json_nesting, which guards the JSON parser on both sides of the protocol,
against the character-by-character scan it replaced (kept here as the reference): the same
depth for every text, valid JSON or not."""

from __future__ import annotations

import json
import random
import re

import pytest

from keyutil.protocol import json_nesting

_STRUCTURE = re.compile(r'[\\"\[\]{}]')


def reference(text: str) -> int:
    """The former implementation: every structural character in turn, with a string flag."""
    depth = deepest = 0
    in_string = False
    escaped = -1
    for match in _STRUCTURE.finditer(text):
        i = match.start()
        if i == escaped:
            continue
        char = text[i]
        if in_string:
            if char == "\\":
                escaped = i + 1
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
    return deepest


@pytest.mark.parametrize(
    "text, depth",
    [
        ("", 0),
        ("[]", 1),
        ('"[["', 0),
        ('"\\"[["', 0),  # an escaped quote does not end the string
        ('"\\\\"[[]]', 2),  # an escaped backslash does not escape the quote
        ('"\\\\\\"["', 0),  # three backslashes: the quote is escaped
        ("]][[", 0),  # closers first: the depth goes below zero and back
        ("\\[", 1),  # a backslash outside a string escapes nothing
        ('{"a": [1, {"b": "}}]]"}], "c": "\\u005b"}', 3),
        ('"unterminated [[[', 0),
    ],
)
def test_known_depths(text: str, depth: int) -> None:
    assert json_nesting(text) == reference(text) == depth


def test_same_depth_as_the_reference_on_random_texts() -> None:
    """Texts of the characters that matter (and two that do not), 60,000 of them."""
    rnd = random.Random(20261201)
    alphabet = '[]{}"\\\\ a,'
    for _ in range(60_000):
        text = "".join(rnd.choice(alphabet) for _ in range(rnd.randint(0, 40)))
        assert json_nesting(text) == reference(text), text


def test_same_depth_on_a_release_request_and_on_deep_bodies() -> None:
    request = json.dumps(
        {
            "version": 1,
            "suite": "x25519-hkdf-sha256-aes-256-gcm",
            "keys": [{"name": "disk", "length": 32}, {"name": 'a"[b\\', "length": 32}],
            "attestation": "QUJD" * 1500,
        }
    )
    for text in (request, "[" * 5000 + "]" * 5000, '["' * 3000, '{"a":' * 2000 + "1" + "}" * 2000):
        assert json_nesting(text) == reference(text)
