"""The /dev/nsm client: request and response framing, the ioctl contract, failures."""

from __future__ import annotations

import ctypes
import struct
from pathlib import Path

import cbor2
import pytest

import keyutil.nsm as nsm_module
from keyutil.nsm import (
    NSM_IOCTL_REQUEST,
    NSM_RESPONSE_MAX,
    DeviceNSM,
    NsmError,
    decode_attestation_response,
    encode_attestation_request,
    open_nsm,
)


class FakeKernel:
    """Plays the NSM driver's side of the ioctl: read the request iovec, fill the response."""

    def __init__(self, answer: bytes) -> None:
        self.answer = answer
        self.requests: list[bytes] = []
        self.numbers: list[int] = []

    def __call__(self, fd: int, number: int, message: bytearray, mutate: bool) -> int:
        assert mutate is True and len(message) == 32
        self.numbers.append(number)
        req_ptr, req_len, resp_ptr, resp_cap = struct.unpack("QQQQ", bytes(message))
        self.requests.append(ctypes.string_at(req_ptr, req_len))
        assert resp_cap == NSM_RESPONSE_MAX
        ctypes.memmove(resp_ptr, self.answer, len(self.answer))
        message[24:32] = struct.pack("Q", len(self.answer))
        return 0


@pytest.fixture
def fake_device(tmp_path: Path) -> Path:
    path = tmp_path / "nsm"
    path.write_bytes(b"")
    return path


def test_ioctl_number_is_iowr_0x0a_0_of_32_bytes() -> None:
    assert NSM_IOCTL_REQUEST == 0xC0200A00


def test_request_is_the_documented_cbor() -> None:
    request = encode_attestation_request(b"u", b"n", None)
    assert cbor2.loads(request) == {
        "Attestation": {"user_data": b"u", "nonce": b"n", "public_key": None}
    }


def test_device_exchange_round_trips_through_the_ioctl_buffers(fake_device: Path) -> None:
    kernel = FakeKernel(cbor2.dumps({"Attestation": {"document": b"\x84doc"}}))
    document = DeviceNSM(str(fake_device), ioctl=kernel).attestation(nonce=b"\x01" * 32)
    assert document == b"\x84doc"
    assert kernel.numbers == [0xC0200A00]
    assert cbor2.loads(kernel.requests[0])["Attestation"]["nonce"] == b"\x01" * 32


@pytest.mark.parametrize("field", ["user_data", "nonce", "public_key"])
def test_fields_of_1024_bytes_accepted_1025_refused(field: str) -> None:
    encode_attestation_request(
        **{"user_data": None, "nonce": None, "public_key": None, field: b"x" * 1024}
    )
    with pytest.raises(NsmError) as err:
        encode_attestation_request(
            **{"user_data": None, "nonce": None, "public_key": None, field: b"x" * 1025}
        )
    assert err.value.code == "nsm_field_too_large"


def test_device_error_answer_is_reported(fake_device: Path) -> None:
    kernel = FakeKernel(cbor2.dumps({"Error": "InvalidArgument"}))
    with pytest.raises(NsmError) as err:
        DeviceNSM(str(fake_device), ioctl=kernel).attestation()
    assert err.value.code == "nsm_refused"
    assert "InvalidArgument" in err.value.message


@pytest.mark.parametrize(
    "answer",
    [b"\xff\x00", cbor2.dumps({"Attestation": {}}), cbor2.dumps(["Attestation"]), b""],
    ids=["not-cbor", "no-document", "not-a-map", "empty"],
)
def test_malformed_device_answer_is_reported(answer: bytes) -> None:
    with pytest.raises(NsmError) as err:
        decode_attestation_response(answer)
    assert err.value.code == "nsm_bad_response"


def test_device_reporting_an_impossible_length_is_refused(fake_device: Path) -> None:
    def kernel(fd: int, number: int, message: bytearray, mutate: bool) -> int:
        message[24:32] = struct.pack("Q", NSM_RESPONSE_MAX + 1)
        return 0

    with pytest.raises(NsmError) as err:
        DeviceNSM(str(fake_device), ioctl=kernel).attestation()
    assert err.value.code == "nsm_bad_response"


def test_absent_device_gives_clear_error(tmp_path: Path) -> None:
    with pytest.raises(NsmError) as err:
        DeviceNSM(str(tmp_path / "missing")).attestation()
    assert err.value.code == "nsm_unavailable"
    assert "not inside a Nitro Enclave" in err.value.message


def test_real_ioctl_on_a_device_that_is_not_the_nsm_fails_cleanly() -> None:
    # /dev/null answers ENOTTY to the NSM request: the real fcntl.ioctl path runs.
    with pytest.raises(NsmError) as err:
        DeviceNSM("/dev/null").attestation(nonce=b"n")
    assert err.value.code == "nsm_ioctl_failed"
    assert "not an NSM device" in err.value.message


def test_auto_picks_the_device_when_it_exists(
    fake_device: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(nsm_module, "NSM_DEVICE", str(fake_device))
    assert isinstance(open_nsm("auto", sim_dir=Path("/unused")), DeviceNSM)


def test_auto_without_device_uses_the_simulator(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from keyutil.simulator import SimulatedNSM

    monkeypatch.setattr(nsm_module, "NSM_DEVICE", str(tmp_path / "absent"))
    SimulatedNSM.init(tmp_path / "sim")
    assert isinstance(open_nsm("auto", sim_dir=tmp_path / "sim"), SimulatedNSM)


def test_auto_without_device_or_simulator_says_both(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(nsm_module, "NSM_DEVICE", str(tmp_path / "absent"))
    with pytest.raises(NsmError) as err:
        open_nsm("auto")
    assert err.value.code == "nsm_unavailable"
    assert "--sim-dir" in err.value.message


def test_simulator_without_directory_is_refused() -> None:
    with pytest.raises(NsmError) as err:
        open_nsm("simulator")
    assert err.value.code == "nsm_unavailable"


def test_simulator_directory_that_was_never_initialised(tmp_path: Path) -> None:
    with pytest.raises(NsmError) as err:
        open_nsm("simulator", sim_dir=tmp_path)
    assert err.value.code == "nsm_unavailable"
    assert "keyutil sim init" in err.value.message
