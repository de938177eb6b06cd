"""The KMS's allowlist reader: decisions, the embedded chain, and the JSON-RPC reader with its
cache, its start-up checks and its failure modes (every one of which denies)."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from chain_fixtures import Anvil
from hypothesis import given
from hypothesis import strategies as st
from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

from mock_kms import chain
from mock_kms.allowlist import (
    EmbeddedAllowlist,
    ImageStatus,
    ReaderSettings,
    RpcAllowlist,
    decide,
    parse_allow_image,
    require_allowed,
)
from mock_kms.chain import DEBUG_IMAGE_HASH
from mock_kms.errors import ErrorCode, InvalidError, UnavailableError

IMAGE_1 = bytes.fromhex("11" * 32)
IMAGE_2 = bytes.fromhex("22" * 32)
IMAGE_3 = bytes.fromhex("33" * 32)
APP = chain.parse_application("billing")
OTHER_APP = chain.parse_application("search")


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# --- values ----------------------------------------------------------------------------


@pytest.mark.parametrize("text", [
    "", "0x", "0x" + "ab" * 31, "0x" + "ab" * 33, "ab" * 31 + "a", "0x" + "zz" * 32,
    "0x" + "ab" * 32 + "\n00", "0X" + "ab" * 32,
])
def test_hash_that_is_not_32_bytes_of_hex_is_refused(text: str) -> None:
    with pytest.raises(InvalidError) as info:
        chain.parse_image_hash(text)
    assert info.value.code == ErrorCode.HASH_INVALID


def test_hash_with_or_without_0x_parses() -> None:
    assert chain.parse_image_hash("0x" + "Ab" * 32) == bytes([0xAB]) * 32
    assert chain.parse_image_hash(" " + "ab" * 32 + "\n") == bytes([0xAB]) * 32


@pytest.mark.parametrize("image", [b"", bytes(31), bytes(33), "11" * 32])
def test_lookup_of_a_value_that_is_not_32_bytes_is_refused(
    embedded: EmbeddedAllowlist, image: Any
) -> None:
    with pytest.raises(InvalidError) as info:
        require_allowed(embedded, image)
    assert info.value.code == ErrorCode.HASH_INVALID


@pytest.mark.parametrize("text", [
    "", "x" * 33, "caf\u00e9", "tab\there", "0x1234", "0x" + "00" * 32, "0x" + "g0" * 32,
])
def test_bad_application_is_refused(text: str) -> None:
    with pytest.raises(InvalidError) as info:
        chain.parse_application(text)
    assert info.value.code == ErrorCode.APPLICATION_INVALID


def test_application_name_is_left_aligned_and_zero_padded() -> None:
    assert chain.parse_application("billing") == b"billing" + bytes(25)
    assert chain.parse_application("x" * 32) == b"x" * 32
    assert chain.format_application(b"billing" + bytes(25)) == "billing"
    hex_id = "0x" + "01" * 32
    assert chain.format_application(chain.parse_application(hex_id)) == hex_id
    # A hex id that happens to spell a name is shown as that name.
    assert chain.format_application(chain.parse_application("0x" + (b"api" + bytes(29)).hex())) \
        == "api"


@given(st.binary(min_size=32, max_size=32).filter(any))
def test_any_application_id_round_trips_through_its_display(app: bytes) -> None:
    assert chain.parse_application(chain.format_application(app)) == app


def test_image_status_invariants() -> None:
    with pytest.raises(ValueError):
        ImageStatus(allowed=True, application=None)
    with pytest.raises(ValueError):
        ImageStatus(allowed=False, application=APP)
    with pytest.raises(ValueError):
        ImageStatus(allowed=True, application=b"short")
    assert ImageStatus(True, APP).application_name == "billing"


@pytest.mark.parametrize("kwargs", [
    {"confirmations": -1}, {"rpc_timeout": 0}, {"rpc_timeout": 61}, {"max_staleness": -1},
    {"max_staleness": 61}, {"cache_size": -1},
])
def test_reader_settings_out_of_range_are_refused(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        ReaderSettings(**kwargs)


def test_default_revocation_delay_is_at_most_two_seconds() -> None:
    assert ReaderSettings().max_staleness <= 2.0
    assert ReaderSettings().confirmations == 0


# --- decisions (no I/O) ----------------------------------------------------------------


def test_decide_returns_the_application_of_an_allowed_image() -> None:
    assert decide(IMAGE_1, ImageStatus(True, APP)) == APP


def test_decide_refuses_an_image_not_allowed() -> None:
    with pytest.raises(InvalidError) as info:
        decide(IMAGE_1, ImageStatus(False, None))
    assert info.value.code == ErrorCode.IMAGE_NOT_ALLOWED
    assert IMAGE_1.hex() in info.value.message


def test_decide_refuses_the_debug_hash_even_if_a_chain_allows_it() -> None:
    with pytest.raises(InvalidError) as info:
        decide(DEBUG_IMAGE_HASH, ImageStatus(True, APP))
    assert info.value.code == ErrorCode.DEBUG_ENCLAVE


def test_parse_allow_image() -> None:
    assert parse_allow_image(f"0x{IMAGE_1.hex()}=billing") == (IMAGE_1, APP)
    for text, code in [
        (IMAGE_1.hex(), ErrorCode.HASH_INVALID),
        ("0x12=billing", ErrorCode.HASH_INVALID),
        (f"{DEBUG_IMAGE_HASH.hex()}=billing", ErrorCode.DEBUG_ENCLAVE),
        (f"{IMAGE_1.hex()}=", ErrorCode.APPLICATION_INVALID),
    ]:
        with pytest.raises(InvalidError) as info:
            parse_allow_image(text)
        assert info.value.code == code, text


# --- the embedded chain ----------------------------------------------------------------


def test_embedded_starts_empty_and_denies(embedded: EmbeddedAllowlist) -> None:
    embedded.check_ready()
    assert embedded.lookup(IMAGE_1) == ImageStatus(False, None)
    with pytest.raises(InvalidError) as info:
        require_allowed(embedded, IMAGE_1)
    assert info.value.code == ErrorCode.IMAGE_NOT_ALLOWED


def test_embedded_registers_through_the_contract_as_owner(embedded: EmbeddedAllowlist) -> None:
    receipt = embedded.register_image(IMAGE_1, APP)
    assert receipt.gas_used > 21_000
    assert require_allowed(embedded, IMAGE_1) == APP
    owner = chain.call(chain.contract(embedded.w3, embedded.contract_address), "owner")
    assert owner == embedded.owner


def test_embedded_several_images_per_app_and_immediate_revocation(
    embedded: EmbeddedAllowlist,
) -> None:
    embedded.register_image(IMAGE_1, APP)
    embedded.register_image(IMAGE_2, APP)
    embedded.register_image(IMAGE_3, OTHER_APP)
    embedded.remove_image(IMAGE_1)
    assert embedded.lookup(IMAGE_1) == ImageStatus(False, None)
    assert require_allowed(embedded, IMAGE_2) == APP
    assert require_allowed(embedded, IMAGE_3) == OTHER_APP


def test_embedded_applies_the_contract_checks(embedded: EmbeddedAllowlist) -> None:
    for image, app, code in [
        (DEBUG_IMAGE_HASH, APP, ErrorCode.DEBUG_ENCLAVE),
        (bytes(32), APP, ErrorCode.HASH_INVALID),
        (IMAGE_1, bytes(32), ErrorCode.APPLICATION_INVALID),
    ]:
        with pytest.raises(InvalidError) as info:
            embedded.register_image(image, app)
        assert info.value.code == code
    embedded.register_image(IMAGE_1, APP)
    with pytest.raises(InvalidError) as info:
        embedded.register_image(IMAGE_1, OTHER_APP)
    assert info.value.code == ErrorCode.TRANSACTION_REVERTED
    with pytest.raises(InvalidError) as info:
        embedded.remove_image(IMAGE_2)
    assert info.value.code == ErrorCode.TRANSACTION_REVERTED


def test_embedded_keeps_nothing_across_restarts() -> None:
    first = EmbeddedAllowlist.create([(IMAGE_1, APP)])
    assert require_allowed(first, IMAGE_1) == APP
    second = EmbeddedAllowlist.create()
    assert second.lookup(IMAGE_1) == ImageStatus(False, None)


# --- the JSON-RPC reader on the embedded chain's web3 (cache, confirmations) ------------


def _reader(embedded: EmbeddedAllowlist, clock: FakeClock, **settings: Any) -> RpcAllowlist:
    return RpcAllowlist(embedded.w3, embedded.contract_address,
                        expected_chain_id=embedded.chain_id,
                        settings=ReaderSettings(**settings), clock=clock)


def test_revocation_takes_effect_exactly_at_max_staleness(embedded: EmbeddedAllowlist) -> None:
    clock = FakeClock()
    reader = _reader(embedded, clock, max_staleness=2.0)
    embedded.register_image(IMAGE_1, APP)
    assert require_allowed(reader, IMAGE_1) == APP
    embedded.remove_image(IMAGE_1)
    clock.now += 1.999
    assert require_allowed(reader, IMAGE_1) == APP  # cached: within the revocation delay
    clock.now += 0.001
    with pytest.raises(InvalidError) as info:
        require_allowed(reader, IMAGE_1)
    assert info.value.code == ErrorCode.IMAGE_NOT_ALLOWED
    assert reader.stats().hits == 1 and reader.stats().misses == 2


def test_new_registration_is_seen_within_max_staleness(embedded: EmbeddedAllowlist) -> None:
    clock = FakeClock()
    reader = _reader(embedded, clock)
    assert not reader.lookup(IMAGE_1).allowed
    embedded.register_image(IMAGE_1, APP)
    clock.now += reader.settings.max_staleness
    assert reader.lookup(IMAGE_1) == ImageStatus(True, APP)


def test_zero_staleness_disables_the_cache(embedded: EmbeddedAllowlist) -> None:
    reader = _reader(embedded, FakeClock(), max_staleness=0)
    embedded.register_image(IMAGE_1, APP)
    assert reader.lookup(IMAGE_1).allowed
    embedded.remove_image(IMAGE_1)
    assert not reader.lookup(IMAGE_1).allowed
    assert reader.stats() == type(reader.stats())(hits=0, misses=2, size=0)


def test_cache_is_bounded_and_evicts_least_recently_used(embedded: EmbeddedAllowlist) -> None:
    reader = _reader(embedded, FakeClock(), cache_size=2)
    reader.lookup(IMAGE_1)
    reader.lookup(IMAGE_2)
    reader.lookup(IMAGE_1)  # hit: IMAGE_1 becomes most recent
    reader.lookup(IMAGE_3)  # evicts IMAGE_2
    assert reader.stats().size == 2
    misses = reader.stats().misses
    reader.lookup(IMAGE_1)
    assert reader.stats().misses == misses
    reader.lookup(IMAGE_2)
    assert reader.stats().misses == misses + 1


def test_contract_younger_than_confirmations_denies(embedded: EmbeddedAllowlist) -> None:
    reader = _reader(embedded, FakeClock(), confirmations=2, max_staleness=0)
    with pytest.raises(UnavailableError) as info:
        require_allowed(reader, IMAGE_1)
    assert info.value.code == ErrorCode.CHAIN_MISCONFIGURED


def test_reads_at_latest_minus_confirmations(embedded: EmbeddedAllowlist) -> None:
    reader = _reader(embedded, FakeClock(), confirmations=2, max_staleness=0)
    embedded.w3.provider.ethereum_tester.mine_blocks(2)  # type: ignore[attr-defined]
    embedded.register_image(IMAGE_1, APP)
    assert not reader.lookup(IMAGE_1).allowed  # mined, but not yet 2 blocks deep
    embedded.w3.provider.ethereum_tester.mine_blocks(1)  # type: ignore[attr-defined]
    assert not reader.lookup(IMAGE_1).allowed
    embedded.w3.provider.ethereum_tester.mine_blocks(1)  # type: ignore[attr-defined]
    assert reader.lookup(IMAGE_1).allowed


def test_wrong_chain_id_is_misconfigured_and_denies(embedded: EmbeddedAllowlist) -> None:
    embedded.register_image(IMAGE_1, APP)
    reader = RpcAllowlist(embedded.w3, embedded.contract_address, expected_chain_id=1)
    for attempt in (reader.check_ready, lambda: require_allowed(reader, IMAGE_1)):
        with pytest.raises(UnavailableError) as info:
            attempt()
        assert info.value.code == ErrorCode.CHAIN_MISCONFIGURED
        assert "expected chain id 1" in info.value.message


def test_address_without_code_is_misconfigured(embedded: EmbeddedAllowlist) -> None:
    reader = RpcAllowlist(embedded.w3, "0x" + "42" * 20, expected_chain_id=embedded.chain_id)
    with pytest.raises(UnavailableError) as info:
        require_allowed(reader, IMAGE_1)
    assert info.value.code == ErrorCode.CHAIN_MISCONFIGURED
    assert "no contract code" in info.value.message


def test_malformed_contract_address_is_refused(embedded: EmbeddedAllowlist) -> None:
    with pytest.raises(InvalidError) as info:
        RpcAllowlist(embedded.w3, "0x1234", expected_chain_id=embedded.chain_id)
    assert info.value.code == ErrorCode.ADDRESS_INVALID


# --- the JSON-RPC reader over HTTP: failures of the endpoint ----------------------------


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_rpc_url_that_does_not_answer_is_unavailable_and_denies() -> None:
    reader = RpcAllowlist.from_url(f"http://127.0.0.1:{_closed_port()}", "0x" + "42" * 20,
                                   expected_chain_id=31337)
    for attempt in (reader.check_ready, lambda: require_allowed(reader, IMAGE_1)):
        with pytest.raises(UnavailableError) as info:
            attempt()
        assert info.value.code == ErrorCode.CHAIN_UNAVAILABLE


@pytest.fixture
def silent_listener() -> Iterator[int]:
    """A port that accepts connections (kernel backlog) and never answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        yield int(s.getsockname()[1])


def test_rpc_that_hangs_is_cut_at_the_timeout(silent_listener: int) -> None:
    reader = RpcAllowlist.from_url(f"http://127.0.0.1:{silent_listener}", "0x" + "42" * 20,
                                   expected_chain_id=31337,
                                   settings=ReaderSettings(rpc_timeout=0.3))
    started = time.monotonic()
    with pytest.raises(UnavailableError) as info:
        reader.check_ready()
    assert info.value.code == ErrorCode.CHAIN_UNAVAILABLE
    assert time.monotonic() - started < 2.0


ScriptFn = Callable[[str, list[Any]], Any]


class ScriptedNode:
    """A JSON-RPC endpoint over real HTTP whose answers the test chooses."""

    CONTRACT = "0x" + "42" * 20

    def __init__(self, server: HTTPServer) -> None:
        self.server = server
        self.status: tuple[bool, bytes] = (True, APP)
        self.mode = "ok"
        self.calls: list[str] = []
        server.expect_request("/").respond_with_handler(self._handle)

    @property
    def url(self) -> str:
        return self.server.url_for("/")

    def _handle(self, request: Request) -> Response:
        body = json.loads(request.data)
        self.calls.append(body["method"])
        if self.mode == "http500":
            return Response("boom", status=500)
        if self.mode == "garbage":
            return Response("<html>not json</html>", status=200)
        if self.mode == "rpc-error":
            reply = {"jsonrpc": "2.0", "id": body["id"],
                     "error": {"code": -32000, "message": "header not found"}}
            return Response(json.dumps(reply), content_type="application/json")
        method = body["method"]
        result: Any
        if method == "eth_chainId":
            result = hex(31337)
        elif method == "eth_getCode":
            result = "0x6001"
        elif method == "eth_call":
            if self.mode == "short":
                result = "0x"
            else:
                allowed, app = self.status
                result = "0x" + int(allowed).to_bytes(32, "big").hex() + app.hex()
        else:
            result = None
        reply = {"jsonrpc": "2.0", "id": body["id"], "result": result}
        return Response(json.dumps(reply), content_type="application/json")


@pytest.fixture
def node(httpserver: HTTPServer) -> ScriptedNode:
    return ScriptedNode(httpserver)


def _http_reader(node: ScriptedNode, clock: FakeClock) -> RpcAllowlist:
    return RpcAllowlist.from_url(node.url, node.CONTRACT, expected_chain_id=31337, clock=clock,
                                 settings=ReaderSettings(rpc_timeout=2, max_staleness=2))


def test_one_eth_call_per_cache_miss(node: ScriptedNode) -> None:
    reader = _http_reader(node, FakeClock())
    reader.check_ready()
    node.calls.clear()
    assert require_allowed(reader, IMAGE_1) == APP
    assert require_allowed(reader, IMAGE_1) == APP
    assert node.calls == ["eth_call"]


@pytest.mark.parametrize("mode", ["http500", "garbage", "rpc-error"])
def test_failing_endpoint_denies_and_stale_answers_expire(node: ScriptedNode, mode: str) -> None:
    clock = FakeClock()
    reader = _http_reader(node, clock)
    assert require_allowed(reader, IMAGE_1) == APP
    node.mode = mode
    clock.now += 1.0
    assert require_allowed(reader, IMAGE_1) == APP  # within max_staleness: cached answer
    clock.now += 1.0
    with pytest.raises(UnavailableError) as info:
        require_allowed(reader, IMAGE_1)
    assert info.value.code == ErrorCode.CHAIN_UNAVAILABLE
    assert info.value.http_status == 503


def test_endpoint_failure_at_start_is_unavailable(node: ScriptedNode) -> None:
    node.mode = "rpc-error"
    with pytest.raises(UnavailableError) as info:
        _http_reader(node, FakeClock()).check_ready()
    assert info.value.code == ErrorCode.CHAIN_UNAVAILABLE


def test_contract_answering_in_the_wrong_shape_is_misconfigured(node: ScriptedNode) -> None:
    node.mode = "short"
    with pytest.raises(UnavailableError) as info:
        require_allowed(_http_reader(node, FakeClock()), IMAGE_1)
    assert info.value.code == ErrorCode.CHAIN_MISCONFIGURED


@pytest.mark.parametrize("flag", [2, 0x100], ids=["bool-2", "bool-padding"])
def test_contract_answering_a_bool_that_is_not_0_or_1_is_misconfigured(node: ScriptedNode,
                                                                        flag: int) -> None:
    node.status = (flag, APP)  # type: ignore[assignment]
    with pytest.raises(UnavailableError) as info:
        require_allowed(_http_reader(node, FakeClock()), IMAGE_1)
    assert info.value.code == ErrorCode.CHAIN_MISCONFIGURED


def test_allowed_with_zero_application_is_misconfigured(node: ScriptedNode) -> None:
    node.status = (True, bytes(32))
    with pytest.raises(UnavailableError) as info:
        require_allowed(_http_reader(node, FakeClock()), IMAGE_1)
    assert info.value.code == ErrorCode.CHAIN_MISCONFIGURED


def test_error_messages_do_not_leak_the_rpc_url(node: ScriptedNode) -> None:
    node.mode = "http500"
    with pytest.raises(UnavailableError) as info:
        _http_reader(node, FakeClock()).check_ready()
    assert node.url not in str(info.value)


# --- against anvil ---------------------------------------------------------------------


def test_reader_against_anvil_sees_registration_and_revocation(anvil: Anvil) -> None:
    owner = anvil.new_account()
    address = anvil.deploy(owner)
    w3 = anvil.w3()
    clock = FakeClock()
    reader = RpcAllowlist.from_url(anvil.url, address, expected_chain_id=anvil.chain_id,
                                   clock=clock)
    reader.check_ready()
    chain.send(w3, chain.add_request(address, IMAGE_1, APP), sender=owner.address, sign=owner)
    assert require_allowed(reader, IMAGE_1) == APP
    chain.send(w3, chain.remove_request(address, IMAGE_1), sender=owner.address, sign=owner)
    clock.now += reader.settings.max_staleness
    with pytest.raises(InvalidError) as info:
        require_allowed(reader, IMAGE_1)
    assert info.value.code == ErrorCode.IMAGE_NOT_ALLOWED


def test_reader_against_anvil_with_wrong_chain_id(anvil: Anvil) -> None:
    owner = anvil.new_account()
    address = anvil.deploy(owner)
    reader = RpcAllowlist.from_url(anvil.url, address, expected_chain_id=1)
    with pytest.raises(UnavailableError) as info:
        reader.check_ready()
    assert info.value.code == ErrorCode.CHAIN_MISCONFIGURED


# --- the module docstrings' examples run ---------------------------------------------


@pytest.mark.parametrize("module", ["mock_kms.allowlist", "mock_kms.chain"])
def test_docstring_examples_run(module: str) -> None:
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(module))
    assert result.attempted > 0 and result.failed == 0
