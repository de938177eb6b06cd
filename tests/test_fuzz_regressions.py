"""What the fuzzer (``fuzz/``) found, one named test per finding, each refused with its code.

Tags: cbor2 interprets the tags it knows (2 and 3 bignums, 55799 self-described CBOR, 28 and
29 value sharing, 256 and 25 string references, ...) into plain Python values, so a tagged
value passed the parser's type checks as if it were untagged. The format has no tags but the
optional tag 18 around the whole document; these documents are signed after tagging, so the
parser, not the signature, must refuse them. Around the envelope's items (outside the
signature) a tag changes nothing the signature covers, but the parser documents that it
accepts tag 18 and nothing else.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import cbor2
import pytest
from test_attacks import AT, Forge, cose, expect, with_field

from mock_kms.attestation import parse_attestation
from mock_kms.errors import ErrorCode, KmsError

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
