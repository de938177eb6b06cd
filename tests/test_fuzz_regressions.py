"""What the fuzzer (``fuzz/``) found, one named test per finding, each refused with its code.

Tags: cbor2 interprets the tags it knows (2 and 3 bignums, 55799 self-described CBOR, 28 and
29 value sharing, 256 and 25 string references, ...) into plain Python values, so a tagged
value passed the parser's type checks as if it were untagged. The format has no tags but the
optional tag 18 around the whole document; these documents are signed after tagging, so the
parser, not the signature, must refuse them. Around the envelope's items (outside the
signature) a tag changes nothing the signature covers, but the parser documents that it
accepts tag 18 and nothing else.

Release requests: ``"version": true`` (and ``1.0``) passed for the integer 1, and a key name
given as a JSON number was turned into text and released under that name. A body of deeply
nested arrays crashed the KMS process when its threads had a small stack. An attested X25519
public key of small order made sealing fail with an exception (HTTP 500).
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cbor2
import pytest
from e2e_support import Setup
from test_attacks import AT, Forge, cose, expect, with_field
from test_service import Clock, Enclave, call, make_service, make_sim

from keyutil import protocol as p
from mock_kms.allowlist import EmbeddedAllowlist
from mock_kms.attestation import parse_attestation
from mock_kms.config import LIMITS
from mock_kms.errors import ErrorCode, KmsError
from mock_kms.server import KmsApp, json_nesting
from mock_kms.service import ReleaseRequest, ReleaseService

APP = b"fuzz-regressions".ljust(32, b"\0")
SELF_DESCRIBED = 55799  # RFC 8949, section 3.4.6
SHAREABLE = 28  # value sharing: the value, marked for later reference by tag 29
BIGNUM = 2


@pytest.fixture(scope="module")
def forge(tmp_path_factory: pytest.TempPathFactory) -> Forge:
    return Forge(tmp_path_factory.mktemp("fuzz-regressions") / "sim")


def tagged(tag: int, value: Any) -> cbor2.CBORTag:
    return cbor2.CBORTag(tag, value)


# -- tags around the envelope (unsigned) ----------------------------------------------------


def test_self_described_tag_around_document(forge: Forge) -> None:
    """55799 around the whole COSE_Sign1: cbor2 dropped it; only tag 18 may be there."""
    data = cbor2.dumps(tagged(SELF_DESCRIBED, cose(forge.document())))
    expect(forge, ErrorCode.COSE_STRUCTURE, data)


def test_tag_18_inside_tag_18(forge: Forge) -> None:
    """Tag 18 once is accepted; twice it is not the format."""
    data = cbor2.dumps(tagged(18, tagged(18, cose(forge.document()))))
    expect(forge, ErrorCode.COSE_STRUCTURE, data)


def test_non_minimal_tag_18_head_accepted(forge: Forge) -> None:
    """Positive: tag 18 written in two bytes (d8 12) is the same tag; it stays accepted."""
    data = b"\xd8\x12" + cbor2.dumps(cose(forge.document()))
    assert forge.verify(data, at=AT).module_id == forge.nsm.identity.module_id


@pytest.mark.parametrize(
    ("index", "tag"),
    [(0, SELF_DESCRIBED), (0, 256), (1, SELF_DESCRIBED), (2, SELF_DESCRIBED), (2, SHAREABLE),
     (3, SELF_DESCRIBED)],
    ids=["protected-55799", "protected-stringref-namespace", "unprotected-55799",
         "payload-55799", "payload-shareable", "signature-55799"],
)
def test_tag_around_cose_item(forge: Forge, index: int, tag: int) -> None:
    """A tag around one of the four items: the same bytes are signed, but not the format."""
    items: list[Any] = cose(forge.document())
    items[index] = tagged(tag, items[index])
    expect(forge, ErrorCode.COSE_STRUCTURE, cbor2.dumps(items))


def test_tag_inside_protected_header(forge: Forge) -> None:
    """{1: 2(h'22')}: not the one header real documents carry (and tagged)."""
    data = forge.document(protected=bytes.fromhex("a101c24122"))
    expect(forge, ErrorCode.COSE_ALGORITHM, data)


# -- tags inside the signed payload -----------------------------------------------------------


def test_bignum_timestamp(forge: Forge) -> None:
    """The timestamp as tag 2 (a bignum): cbor2 made it an int; the format has a uint."""
    def bignum(pairs: list[tuple[Any, Any]]) -> list[tuple[Any, Any]]:
        timestamp = dict(pairs)["timestamp"]
        return with_field(pairs, "timestamp", tagged(BIGNUM, timestamp.to_bytes(6, "big")))

    data = forge.document(edit=bignum)
    expect(forge, ErrorCode.FIELD_TYPE, data)


def _wrap_field(name: str, tag: int) -> Callable[[list[tuple[Any, Any]]], list[tuple[Any, Any]]]:
    def edit(pairs: list[tuple[Any, Any]]) -> list[tuple[Any, Any]]:
        return with_field(pairs, name, tagged(tag, dict(pairs)[name]))

    return edit


@pytest.mark.parametrize(
    ("field", "tag"),
    [("module_id", SELF_DESCRIBED), ("digest", SHAREABLE), ("certificate", SELF_DESCRIBED),
     ("nonce", SHAREABLE), ("cabundle", SHAREABLE), ("pcrs", SELF_DESCRIBED)],
)
def test_tagged_payload_field(forge: Forge, field: str, tag: int) -> None:
    """A field value under a tag cbor2 drops (55799) or resolves (28): refused as tagged."""
    data = forge.document(nonce=b"n" * 16, edit=_wrap_field(field, tag))
    expect(forge, ErrorCode.FIELD_TYPE, data)


def test_tagged_payload_key(forge: Forge) -> None:
    """The key "nonce" under tag 55799."""
    def edit(pairs: list[tuple[Any, Any]]) -> list[tuple[Any, Any]]:
        return [(tagged(SELF_DESCRIBED, k) if k == "nonce" else k, v) for k, v in pairs]

    expect(forge, ErrorCode.FIELD_TYPE, forge.document(edit=edit))


def test_tagged_pcr_index_and_value(forge: Forge) -> None:
    """PCR index 0 as a bignum, PCR3 under tag 28: both were accepted as plain values."""
    pcrs: dict[Any, Any] = dict(forge.nsm.identity.pcrs)
    pcr0 = pcrs.pop(0)
    expect(forge, ErrorCode.FIELD_TYPE,
           forge.document(pcrs={tagged(BIGNUM, b"\x00"): pcr0, **pcrs}))
    pcrs = dict(forge.nsm.identity.pcrs)
    pcrs[3] = tagged(SHAREABLE, pcrs[3])
    expect(forge, ErrorCode.FIELD_TYPE, forge.document(pcrs=pcrs))


def test_value_shared_between_fields(forge: Forge) -> None:
    """user_data marked shareable (28) and nonce a reference to it (29)."""
    def edit(pairs: list[tuple[Any, Any]]) -> list[tuple[Any, Any]]:
        pairs = with_field(pairs, "user_data", tagged(SHAREABLE, b"u" * 16))
        return with_field(pairs, "nonce", tagged(29, 0))

    expect(forge, ErrorCode.FIELD_TYPE, forge.document(edit=edit))


def test_payload_in_string_reference_namespace(forge: Forge) -> None:
    """The payload map under tag 256 (stringref namespace): cbor2 returned the map itself."""
    data = forge.document(rewrite=lambda payload: b"\xd9\x01\x00" + payload)
    expect(forge, ErrorCode.FIELD_TYPE, data)


def test_tags_refused_with_their_number_in_the_message(forge: Forge) -> None:
    """The refusal says which tag was found, and parse_attestation alone refuses too."""
    data = forge.document(edit=_wrap_field("module_id", SELF_DESCRIBED))
    err = expect(forge, ErrorCode.FIELD_TYPE, data)
    assert "tag 55799" in err.message
    with pytest.raises(KmsError) as info:
        parse_attestation(data)
    assert info.value.code is ErrorCode.FIELD_TYPE


# -- the release request ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def chain() -> EmbeddedAllowlist:
    return EmbeddedAllowlist.create()


@pytest.fixture
def release(tmp_path: Path, chain: EmbeddedAllowlist) -> tuple[ReleaseService, Enclave]:
    clock = Clock()
    nsm = make_sim(tmp_path / "sim", clock)
    chain.register_image(bytes.fromhex(nsm.identity.os_image_hash[2:]), APP)
    return make_service(tmp_path, nsm, chain, clock), Enclave(nsm)


@pytest.mark.parametrize("version", [True, 1.0], ids=["true", "float"])
def test_release_version_must_be_the_integer_1(
    release: tuple[ReleaseService, Enclave], version: Any
) -> None:
    """A request that is otherwise good, but says version true or 1.0, is refused."""
    service, enclave = release
    request = enclave.request(service)
    request["version"] = version
    with pytest.raises(KmsError) as err:
        service.release(request)
    assert err.value.code is ErrorCode.BAD_REQUEST
    assert "version" in err.value.message


def test_release_key_name_must_be_a_string(release: tuple[ReleaseService, Enclave]) -> None:
    """Key name 123 (a number), bound by the enclave as "123": refused, not released."""
    service, enclave = release
    keys = (p.KeyRequest("123", 32),)
    request = enclave.request(service, keys)
    request["keys"][0]["name"] = 123
    with pytest.raises(KmsError) as err:
        service.release(request)
    assert err.value.code is ErrorCode.BAD_REQUEST
    assert "key name" in err.value.message
    # The same request with the name as text is released.
    good = enclave.request(service, keys)
    (key,) = enclave.open(service, service.release(good).answer)
    assert key == service.state.derive_key(APP, keys[0])


# X25519 points of small order (u = 0 came from the fuzzer: a PCR of zeros spliced into
# public_key), and non-canonical encodings of them (u = p - 1, p, p + 1).
P25519 = 2**255 - 19
LOW_ORDER_X25519 = [
    0,
    1,
    325606250916557431795983626356110631294008115727848805560023387167927233504,
    39382357235489614581723060781553021112529911719440698176882885853963445705823,
    P25519 - 1,
    P25519,
    P25519 + 1,
]


@pytest.mark.parametrize("u", LOW_ORDER_X25519, ids=[f"u{i}" for i in range(7)])
def test_release_to_a_low_order_x25519_key(
    release: tuple[ReleaseService, Enclave], u: int
) -> None:
    """A signed document whose X25519 public_key has small order: HPKE gets no shared secret.
    Sealing raised ValueError out of the KMS (HTTP 500); the key is public_key_invalid."""
    service, enclave = release
    request = enclave.request(service, public_key=u.to_bytes(32, "little"))
    status, answer = call(KmsApp(service), "POST", "/v1/release", json.dumps(request).encode())
    assert (status, answer["error"]) == ("403 Forbidden", "public_key_invalid"), answer
    assert "low-order" in answer["message"]


@pytest.mark.parametrize("name", [None, ["disk"], {"disk": 1}, True])
def test_request_key_name_of_another_type(name: Any) -> None:
    """The request form alone, before any verification: names are JSON strings."""
    body = {"version": 1, "suite": p.SUITE_X25519, "keys": [{"name": name, "length": 32}],
            "attestation": "hA=="}
    with pytest.raises(KmsError) as err:
        ReleaseRequest.from_json(body)
    assert err.value.code is ErrorCode.BAD_REQUEST


# -- deeply nested JSON ------------------------------------------------------------------------


def test_deeply_nested_body_to_a_small_stack_server(setup: Setup) -> None:
    """64 KiB of nested arrays killed `mock-kms serve` with SIGSEGV when its threads had a
    1 MiB stack: web3's dependencies raise Python's recursion limit to 100000, so json's C
    parser recursed past the thread's stack instead of raising RecursionError."""
    kms = setup.kms().start(stack_limit=1 << 20).wait_listening()
    depth = 32_000
    status, answer = post(kms.url + "/v1/release", b"[" * depth + b"]" * depth)
    assert (status, answer["error"]) == (400, "bad_request"), answer
    assert "nested" in answer["message"]
    assert kms.proc is not None and kms.proc.poll() is None  # still serving
    with urllib.request.urlopen(kms.url + "/v1/identity", timeout=10) as r:
        assert r.status == 200


def post(url: str, body: bytes) -> tuple[int, Any]:
    request = urllib.request.Request(url, data=body, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _nested_extra(depth: int) -> Any:
    value: Any = []
    for _ in range(depth - 1):
        value = [value]
    return value


def test_request_nesting_limit(release: tuple[ReleaseService, Enclave]) -> None:
    """An unknown member nested to the limit is ignored and the key released; one level
    deeper and the body is refused before it is parsed."""
    service, enclave = release
    app = KmsApp(service)
    limit = LIMITS.max_json_depth
    for extra_depth, expected in ((limit - 1, "200 OK"), (limit, "400 Bad Request")):
        request = enclave.request(service)
        request["extension"] = _nested_extra(extra_depth)  # inside the request object
        status, answer = call(app, "POST", "/v1/release", json.dumps(request).encode())
        assert status == expected, answer
    assert answer["error"] == "bad_request"
    assert f"nested at most {limit} deep" in answer["message"]


def test_nesting_counts_brackets_outside_strings_only() -> None:
    """Brackets inside strings (escaped quotes included) do not count."""
    assert json_nesting('{"a": "[[[{{{", "b": [1, {"c": "\\"[["}]}') == 3
    assert json_nesting('"\\\\"[[]]') == 2
    assert json_nesting("") == 0
