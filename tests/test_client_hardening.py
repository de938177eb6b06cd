"""The client against a hostile or re-assigned KMS answer (issue 14, items 7 and 19).

- any malformed answer (deeply nested JSON, not JSON, the wrong shapes) is ``bad_response``
  (retried, then exit 3) or an authentication failure (exit 6): never a traceback;
- ``--expect-app NAME|0xID``: keys released for another application (governance re-assigned
  the image) are refused with exit 6, and nothing is written.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from test_client import FakeKms, InProcess, UnixServer, serve  # noqa: F401 (fixture)

from keyutil import protocol
from keyutil.cli import cli
from keyutil.client import AnswerRejected, KmsUnavailable, ReleaseRequest, release_keys
from keyutil.simulator import SimulatedNSM
from keyutil.transport import MAX_JSON_DEPTH, TransportError, decode_json

APP_NAME = "demo-app"
APP_ID = "0x" + APP_NAME.encode().ljust(32, b"\0").hex()


@pytest.fixture(scope="module")
def nsm(tmp_path_factory: pytest.TempPathFactory) -> SimulatedNSM:
    return SimulatedNSM.init(tmp_path_factory.mktemp("hostile") / "sim")


@pytest.fixture
def kms(nsm: SimulatedNSM) -> FakeKms:
    kms = FakeKms(nsm.directory)
    reassigned(kms, APP_ID)  # the image belongs to demo-app
    return kms


@pytest.fixture
def url(kms: FakeKms, serve: Callable[[Any], str], tmp_path: Path) -> str:  # noqa: F811
    return serve(UnixServer(tmp_path / "kms.sock", kms.handle))



def get_key(url: str, nsm: SimulatedNSM, kms: FakeKms, *args: str) -> Result:
    base = ["get-key", "--kms", url, "--nsm", "simulator", "--sim-dir", str(nsm.directory)]
    return CliRunner().invoke(cli, [*base, "--kms-pubkey", kms.pubkey, *args])


# -- 7. hostile answers -----------------------------------------------------------------------

NESTED = b"[" * 100_000 + b"]" * 100_000


@pytest.mark.parametrize("path", ["/v1/health", "/v1/challenge", "/v1/release"])
def test_deeply_nested_json_is_bad_response_retried_then_exit_3(
    url: str, nsm: SimulatedNSM, kms: FakeKms, path: str
) -> None:
    kms.script[path] = [(200, NESTED)] * 50
    result = get_key(url, nsm, kms, "--stdout", "--format", "hex", "--deadline", "0.8")
    assert result.exit_code == 3, result.output
    assert '"bad_response"' in result.stderr and "Traceback" not in result.output
    assert kms.calls[path] >= 2  # retried
    assert result.stdout == ""


def test_decode_json_bounds_depth_before_parsing() -> None:
    ok = b"[" * MAX_JSON_DEPTH + b"]" * MAX_JSON_DEPTH
    assert decode_json(ok, "x") is not None
    with pytest.raises(TransportError) as err:
        decode_json(b"[" + ok + b"]", "x")
    assert err.value.code == "bad_response"
    assert decode_json(b'{"a": "[[[[[[' + b"[" * 100 + b'"}', "x") == {"a": "[" * 106}
    assert decode_json(b"\xff\xfe{", "x") is None and decode_json(b"", "x") is None


@pytest.mark.parametrize(
    "answer",
    [
        {"version": 1, "binding": "\ud800"},  # a lone surrogate where hex is expected
        {"keys": [[[]]], "signature": 7},
        [],
        "text",
        {"version": 10**40},
    ],
)
def test_malformed_answers_are_auth_failures_not_crashes(
    nsm: SimulatedNSM, kms: FakeKms, answer: Any
) -> None:
    kms.tamper = lambda signed, body: answer
    for identity in (kms.pubkey, None):  # signed or not checked: never a crash
        request = ReleaseRequest.build(["default"], identity=identity)
        with pytest.raises(AnswerRejected):
            release_keys(InProcess(kms), nsm, request, deadline_s=5)


# -- 19. which application ----------------------------------------------------------------------


def reassigned(kms: FakeKms, application: str) -> None:
    """Governance mapped the image to another application: the KMS (honestly) signs that."""

    def tamper(answer: dict[str, Any], body: Any) -> dict[str, Any]:
        unsigned = {k: v for k, v in answer.items() if k != "signature"}
        return kms.sign({**unsigned, "application": application})

    kms.tamper = tamper


@pytest.mark.parametrize("expect", [APP_NAME, APP_ID, "0x" + APP_ID[2:].upper()])
def test_expect_app_matching_by_name_or_id_writes_the_key(
    url: str, nsm: SimulatedNSM, kms: FakeKms, shm: Path, expect: str
) -> None:
    out = shm / "app.key"
    result = get_key(url, nsm, kms, "--expect-app", expect, "--out", str(out))
    assert result.exit_code == 0, result.output
    assert out.read_bytes() == kms.secret("default", 32)


def test_another_application_is_exit_6_and_nothing_is_written(
    url: str, nsm: SimulatedNSM, kms: FakeKms, shm: Path
) -> None:
    reassigned(kms, "0x" + b"billing".ljust(32, b"\0").hex())
    out = shm / "keys" / "app.key"
    result = get_key(url, nsm, kms, "--expect-app", APP_NAME, "--out", str(out))
    assert result.exit_code == 6, result.output
    assert '"answer_application_mismatch"' in result.stderr
    assert f"expected keys of application {APP_NAME}; the KMS released keys of billing" in (
        result.stderr
    )
    assert not out.exists() and list((shm / "keys").iterdir()) == []
    assert kms.calls["/v1/release"] == 1  # not retried


def test_without_expect_app_a_reassigned_image_still_gets_keys(
    url: str, nsm: SimulatedNSM, kms: FakeKms
) -> None:
    """The old behaviour, kept for images that do not pin their application."""
    reassigned(kms, "0x" + b"billing".ljust(32, b"\0").hex())
    assert get_key(url, nsm, kms, "--stdout", "--format", "hex").exit_code == 0


def test_a_malformed_expect_app_is_a_usage_error(url: str, nsm: SimulatedNSM, kms: FakeKms) -> None:
    for bad in ("0x1234", "", "x" * 33, "0x" + "00" * 32):
        result = get_key(url, nsm, kms, "--expect-app", bad, "--stdout", "--format", "hex")
        assert result.exit_code == 2, (bad, result.output)
    assert sum(kms.calls.values()) == 0


def test_the_python_api_checks_the_application(nsm: SimulatedNSM, kms: FakeKms) -> None:
    reassigned(kms, "0x" + b"billing".ljust(32, b"\0").hex())
    request = ReleaseRequest.build(["default"], identity=kms.pubkey, expect_app=APP_NAME)
    assert request.expect_app == protocol.parse_application(APP_NAME)
    with pytest.raises(AnswerRejected) as err:
        release_keys(InProcess(kms), nsm, request, deadline_s=5)
    assert err.value.code == "answer_application_mismatch"


def test_unavailable_is_still_retried_with_expect_app(nsm: SimulatedNSM, kms: FakeKms) -> None:
    kms.script["/v1/challenge"] = [(200, {"nonce": 1})]
    request = ReleaseRequest.build(["default"], identity=kms.pubkey, expect_app=APP_ID)
    release = release_keys(InProcess(kms), nsm, request, deadline_s=10, sleep=lambda s: None)
    assert release.attempts == 2 and release.application == APP_ID
    kms.script["/v1/challenge"] = [(200, {"nonce": 1})] * 100
    with pytest.raises(KmsUnavailable) as err:
        release_keys(InProcess(kms), nsm, request, deadline_s=0.3)
    assert err.value.code == "bad_response"


def test_expect_app_from_the_environment_as_the_example_image_sets_it(
    url: str, nsm: SimulatedNSM, kms: FakeKms
) -> None:
    reassigned(kms, "0x" + b"billing".ljust(32, b"\0").hex())
    base = ["get-key", "--kms", url, "--nsm", "simulator", "--sim-dir", str(nsm.directory)]
    result = CliRunner().invoke(
        cli,
        [*base, "--kms-pubkey", kms.pubkey, "--stdout", "--format", "hex"],
        env={"KEYUTIL_GET_KEY_EXPECT_APP": APP_NAME},
        auto_envvar_prefix="KEYUTIL",
    )
    assert result.exit_code == 6 and result.stdout == ""
    # The example image pins its application in the configuration keyutil run reads.
    run_toml = (Path(__file__).parent.parent / "examples/enclave/run.toml").read_text()
    assert '\nexpect_app = "demo-app"' in run_toml


def test_a_debug_answer_is_reported_and_logged_as_debug(nsm: SimulatedNSM, kms: FakeKms) -> None:
    def debug(answer: dict[str, Any], body: Any) -> dict[str, Any]:
        unsigned = {k: v for k, v in answer.items() if k != "signature"}
        return kms.sign({**unsigned, "application": APP_ID, "debug": True})

    kms.tamper = debug
    events: list[tuple[str, str]] = []
    request = ReleaseRequest.build(["default"], identity=kms.pubkey, expect_app=APP_NAME)
    release = release_keys(
        InProcess(kms), nsm, request, deadline_s=5, log=lambda lvl, ev, f: events.append((lvl, ev))
    )
    assert release.debug is True
    assert ("warning", "debug_keys") in events
