"""A seeded smoke run of the ``http`` fuzz target (fuzz/http.py): hostile byte streams never
make the KMS's HTTP server crash, log an exception, answer a request the RFC 9112 reference
refuses, answer another request than the one sent, or answer past a refusal; and the run
reached every refusal status, pipelined answers and 100 Continue. The reference and the
judge are checked on their own, so that the smoke run's silence means something."""

from __future__ import annotations

import collections
import re
from pathlib import Path

import pytest
from test_fuzz_smoke import assert_clean

from fuzz.http import (
    INSERTS,
    MAX_BODY,
    METHODS,
    Answer,
    Expected,
    HttpTarget,
    Step,
    judge,
    read_answers,
    reference,
)
from fuzz.mutate import RandomChooser
from fuzz.record import Recorder
from fuzz.targets import make_target
from mock_kms import httpd
from mock_kms.httpd import MAX_HEAD, MAX_HEADERS

SEED = 20261201
RUNS = 3000
OPS = ("flip", "cut", "dup_line", "bare_lf", "bare_cr", "obs_fold", "space_colon",
       "giant_length", "repeat", "leading", "case", "split", "eof_later", "transfer_encoding",
       "wrong_length", "pad_fields", "big_field", "dup_field", "tcp", "trickle",
       *INSERTS)
# Every method, HEAD included (answers to HEAD carried content until it was fixed:
# tests/test_httpd_fuzz_findings.py).
SMOKE_METHODS = METHODS


def test_http_smoke_run_is_clean_and_reaches_every_outcome(tmp_path: Path) -> None:
    target = HttpTarget(methods=SMOKE_METHODS)
    recorder = Recorder(tmp_path / "findings")
    chooser = RandomChooser(SEED)
    answered: collections.Counter[int] = collections.Counter()
    continues = either_answered = 0
    try:
        for _ in range(RUNS):
            ex = target.one(chooser)
            recorder.add(ex)
            answered[ex.extra.get("answered", 0)] += 1
            continues += ex.extra.get("continues", 0)
            steps = ex.extra.get("steps", [])
            either_answered += "either" in steps[: ex.extra.get("answered", 0)]
    finally:
        target.close()
    assert_clean(recorder)
    for status in (400, 411, 413, 431, 505):
        assert recorder.codes[f"refused:{status}"] > 0, recorder.codes
    assert recorder.codes["accepted:answered"] > RUNS // 5, recorder.codes
    assert answered[3] + answered[4] > 0, answered  # pipelined requests answered in order
    assert continues > 0 and either_answered > 0
    assert {op: recorder.ops[op] for op in OPS if recorder.ops[op] == 0} == {}


def test_the_smoke_run_would_see_a_server_that_ignores_transfer_encoding(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The run above is silent because the server is right: the same run against a server
    that drops Transfer-Encoding (and so frames a chunked body by Content-Length) is not."""
    parse_head = httpd.parse_head

    def lenient(head: bytes) -> httpd.Request:
        return parse_head(re.sub(rb"(?i)\r\ntransfer-encoding:[^\r]*", b"", head))

    monkeypatch.setattr(httpd, "parse_head", lenient)
    target = HttpTarget(methods=SMOKE_METHODS)
    recorder = Recorder(None)
    chooser = RandomChooser(SEED)
    try:
        for _ in range(RUNS // 3):
            recorder.add(target.one(chooser))
    finally:
        target.close()
    assert recorder.codes["accepted_mutant:answered_refuse"] > 0, recorder.codes


def _get(target: bytes = b"/a", extra: bytes = b"", body: bytes = b"") -> bytes:
    return b"GET %s HTTP/1.1\r\nHost: k\r\n%s\r\n%s" % (target, extra, body)


def test_the_reference_frames_pipelined_requests_and_refuses_smuggling_shapes() -> None:
    two = _get(b"/a%2Fb?x=%41", b"Content-Length: 3\r\n", b"abc") + b"\r\n" + _get(b"/b")
    steps = reference(two)
    assert [s.kind for s in steps] == ["answer", "answer", "open"]
    assert steps[0].request == Expected(b"GET", b"/a/b", b"x=%41", b"abc", False)
    for smuggle in (b"Content-Length: 3\r\nTransfer-Encoding: chunked\r\n",
                    b"Content-Length: 3\r\nContent-Length: 4\r\n", b"Content-Length : 3\r\n",
                    b"X: a\r\n b\r\n", b"Content-Length: +3\r\n", b"X: a\x00b\r\n",
                    b"Host: j\r\n"):
        assert reference(_get(extra=smuggle, body=b"abc"))[0].kind == "refuse", smuggle
    assert reference(_get(extra=b"Transfer-Encoding: chunked\r\n"))[0].statuses == {
        400, 411, 501}
    # A bare LF never ends a head: the stream is still open, or refused once whole.
    assert reference(b"GET / HTTP/1.1\nHost: k\n\n")[0].kind == "open"
    assert reference(b"GET / HTTP/1.1\nHost: k\r\n\r\n")[0].kind == "refuse"
    # Lenient-or-strict: either refuse (400) or answer exactly this request.
    lenient = reference(b"GET /%zz{x} HTTP/1.1\r\n\r\n")[0]
    assert lenient.kind == "either" and lenient.statuses == {400}
    assert lenient.request is not None and lenient.request.path == b"/%zz{x}"
    assert reference(_get(extra=b"Content-Length: 2, 2\r\n", body=b"ab"))[0].kind == "either"
    assert reference(b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n")[0].kind == "either"


def test_the_reference_knows_the_limits_and_the_connection_rules() -> None:
    big = reference(_get(extra=b"Content-Length: %d\r\n" % (MAX_BODY + 1)))
    assert big[0].kind == "refuse" and big[0].statuses == {413}
    assert reference(_get(extra=b"Content-Length: 0000000000000000000000005\r\n",
                          body=b"12345"))[0].statuses == {400}
    pads = b"".join(b"X-%d: p\r\n" % i for i in range(MAX_HEADERS))
    assert reference(_get(extra=pads[: -len(b"X-63: p\r\n")]))[0].kind == "answer"
    assert reference(_get(extra=pads))[0].statuses == {431}
    assert reference(b"GET /" + b"a" * (MAX_HEAD + 100))[0].kind == "refuse"
    assert reference(b"GET /" + b"a" * (MAX_HEAD - 100))[0].kind == "open"
    assert reference(b"GET / HTTP/2.0\r\nHost: k\r\n\r\n")[0].statuses == {505}
    assert reference(b"GET / HTTP/1.2\r\nHost: k\r\n\r\n")[0].statuses == {505}
    http10 = reference(b"GET / HTTP/1.0\r\n\r\n" + _get())
    assert [s.kind for s in http10] == ["answer"]  # HTTP/1.0 closes: the rest is not read
    assert [s.kind for s in reference(_get(b"/close") + _get())] == ["answer"]
    expects = reference(_get(extra=b"Expect: 100-continue\r\nContent-Length: 5\r\n", body=b"ab"))
    assert expects[0].kind == "open" and expects[0].expects


def _answer(status: int, request: Expected | None = None, close: bool = False) -> bytes:
    if request is None:
        body = b'{"error":"bad_request","message":"no"}'
        fields = b"Content-Type: application/json\r\n"
    else:
        import hashlib

        body = b"{}"
        fields = b"X-Method: %s\r\nX-Path: %s\r\nX-Query: %s\r\nX-Length: %d\r\n" % (
            request.method, request.path.hex().encode(), request.query.hex().encode(),
            len(request.body))
        fields += b"X-Read: %d\r\nX-Sha256: %s\r\n" % (
            len(request.body), hashlib.sha256(request.body).hexdigest().encode())
    fields += b"Connection: close\r\n" if close else b""
    return b"HTTP/1.1 %d X\r\n%sContent-Length: %d\r\n\r\n%s" % (status, fields, len(body),
                                                                 body)


def test_the_judge_finds_smuggling_refusals_of_valid_requests_and_wrong_statuses() -> None:
    stream = _get(b"/a", b"Content-Length: 1\r\n", b"x") + _get(b"/b")
    steps = reference(stream)
    a, b = (s.request for s in steps[:2])
    assert a is not None and b is not None

    def verdict(data: bytes) -> tuple[str, str]:
        return judge(steps, read_answers(data, steps))[:2]

    assert verdict(_answer(200, a) + _answer(200, b)) == ("accepted", "answered")
    smuggled = Expected(b"GET", b"/b", b"", b"x", False)  # the body read as another request
    assert verdict(_answer(200, a) + _answer(200, smuggled))[0] == "accepted_mutant"
    assert verdict(_answer(200, a) + _answer(200, b) + _answer(200, b)) == (
        "accepted_mutant", "answered_open")
    assert verdict(_answer(200, a, close=True) + _answer(200, b)) == (
        "accepted_mutant", "after_close")
    assert verdict(_answer(200, a) + _answer(400))[0] == "refused_valid"
    assert verdict(_answer(200, a))[0] == "refused_valid"  # closed without answering /b
    refused = reference(_get(extra=b"Transfer-Encoding: chunked\r\n") + _get())
    assert judge(refused, read_answers(_answer(431), refused))[:2] == ("crash", "status")
    after = read_answers(_answer(400) + _answer(200, b), refused)
    assert judge(refused, after)[:2] == ("accepted_mutant", "after_refusal")
    head = [Step("answer", frozenset(), a, b"HEAD")]
    assert judge(head, read_answers(_answer(200, a), head))[:2] == ("crash", "head_body")
    no_body = _answer(200, a).split(b"\r\n\r\n")[0] + b"\r\n\r\n"
    assert judge(head, read_answers(no_body, head))[:2] == ("accepted", "answered")
    interim = b"HTTP/1.1 100 Continue\r\n\r\n" + _answer(200, a) + _answer(200, b)
    assert verdict(interim)[:2] == ("crash", "interim")
    assert isinstance(Answer(200, {}, None).field(b"x"), type(None))
    assert isinstance(make_target("http"), HttpTarget)
