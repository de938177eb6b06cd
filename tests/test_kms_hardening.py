"""What the security review found in the KMS's messages, audit log and debug releases
(issue 14, items 2, 3 and 8), each as the attack that showed it.

- echoed input: a refusal quotes the request's values cut to 64 characters and escaped, and
  an audit line has a size bound, so unauthenticated requests cannot grow the log by more
  than a few kilobytes each;
- unverified fields: a document whose signature fails is described in the audit line under
  ``claimed`` only, escaped, and nothing of it reaches a log line;
- debug releases (``serve --allow-debug``): keys for debug-mode enclaves come from their own
  derivation domain, never equal to a production enclave's, and every such release is logged,
  audited and signed as debug.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import cbor2
import pytest
from test_service import APP_A, KEYS, Clock, Enclave, call, make_service, make_sim

from keyutil import protocol as p
from keyutil.simulator import SimulatedNSM
from mock_kms.allowlist import EmbeddedAllowlist
from mock_kms.config import LIMITS
from mock_kms.errors import ErrorCode
from mock_kms.server import KmsApp
from mock_kms.service import AuditLog, audit_line
from mock_kms.state import KmsState


@pytest.fixture(scope="module")
def chain() -> EmbeddedAllowlist:
    return EmbeddedAllowlist.create()


@pytest.fixture
def clock() -> Clock:
    return Clock()


def kms(
    tmp_path: Path,
    sim: SimulatedNSM,
    chain: EmbeddedAllowlist,
    clock: Clock,
    *,
    allow_debug: bool = False,
    debug_application: bytes | None = None,
) -> KmsApp:
    service = make_service(
        tmp_path, sim, chain, clock, allow_debug=allow_debug,
        audit=AuditLog(tmp_path / "audit.log"), debug_application=debug_application,
    )
    return KmsApp(service)


def audit(tmp_path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (tmp_path / "audit.log").read_text().splitlines()]


# -- 2. echoed input --------------------------------------------------------------------------


def test_a_huge_suite_or_key_length_is_echoed_cut_and_escaped(
    tmp_path: Path, clock: Clock, chain: EmbeddedAllowlist
) -> None:
    app = kms(tmp_path, make_sim(tmp_path / "sim", clock), chain, clock)
    base = {"version": 1, "suite": p.SUITE_X25519, "attestation": "hA=="}
    huge_suite = {**base, "suite": "\x1b[2J" + "S" * 60_000, "keys": [{"name": "a", "length": 32}]}
    huge_length = {**base, "keys": [{"name": "a", "length": "\n" + "L" * 60_000}]}
    huge_name = {**base, "keys": [{"name": "N\r" * 20_000, "length": 32}]}
    for body, field in (
        (huge_suite, "suite"),
        (huge_length, "key length"),
        (huge_name, "key name"),
    ):
        status, answer = call(app, "POST", "/v1/release", json.dumps(body).encode())
        assert status.startswith("400") and answer["error"] == "bad_request"
        assert answer["message"].startswith(field)
        assert len(answer["message"]) < 200, answer["message"]
        assert not any(c in answer["message"] for c in "\x1b\n\r")
    size = (tmp_path / "audit.log").stat().st_size
    assert size < 3 * 1024, size  # three unauthenticated requests, not 180 KB
    for entry in audit(tmp_path):
        assert all(len(k) <= p.MAX_ECHO for k in entry.get("keys", []))


def test_echo_cuts_to_64_characters_and_escapes_control_characters() -> None:
    assert p.echo("disk") == "'disk'"
    assert p.echo("a\nb\x1b[31m\u202e") == "'a\\nb\\x1b[31m\\u202e'"
    assert len(p.echo("x" * 10_000)) == 64 and p.echo("x" * 10_000).endswith("...")
    assert len(p.echo("\x00" * 64)) == 64  # escaping cannot push it past the limit
    assert p.echo(10**5000) == "a very large integer"
    assert p.echo("a\nb", quoted=False) == "a\\nb" and p.echo(b"x", quoted=False) == "x"
    assert p.echo([1] * 1000) == "a list"


def test_an_audit_line_has_a_size_bound() -> None:
    entry = {"time": "T", "outcome": "denied", "code": "bad_request", "message": "m" * 100_000}
    line = audit_line(entry)
    assert len(line) <= LIMITS.max_audit_line and line.endswith(b"\n")
    parsed = json.loads(line)
    assert parsed["truncated"] is True and parsed["code"] == "bad_request"
    crowded = {**entry, "message": "short", "keys": ["k" * 64] * 100}
    parsed = json.loads(audit_line(crowded))
    assert parsed == {"time": "T", "outcome": "denied", "code": "bad_request", "truncated": True}
    small = {"time": "T", "outcome": "released", "code": None}
    assert json.loads(audit_line(small)) == small


# -- 3. unverified fields -----------------------------------------------------------------


def test_a_forged_document_is_audited_as_claimed_and_never_reaches_a_log_line(
    tmp_path: Path, clock: Clock, chain: EmbeddedAllowlist, caplog: pytest.LogCaptureFixture
) -> None:
    forged_id = "i-evil\nINFO release ok: forged"
    sim = make_sim(tmp_path / "sim", clock)  # the simulator itself refuses such an id
    app = kms(tmp_path, sim, chain, clock)
    request = Enclave(sim).request(app.service)
    # The attacker's own document: the genuine one with its module_id replaced, so its
    # signature no longer verifies.
    cose = cbor2.loads(p.b64d(request["attestation"], "attestation"))
    payload = cbor2.loads(cose[2])
    payload["module_id"] = forged_id
    cose[2] = cbor2.dumps(payload)
    request["attestation"] = p.b64e(cbor2.dumps(cose))
    with caplog.at_level(logging.DEBUG):
        status, answer = call(app, "POST", "/v1/release", json.dumps(request).encode())
    assert status.startswith("403") and answer["error"] == ErrorCode.SIGNATURE_INVALID
    (entry,) = audit(tmp_path)
    assert "module_id" not in entry and "os_image_hash" not in entry
    assert entry["claimed"] == {
        "module_id": "i-evil\\nINFO release ok: forged",
        "os_image_hash": sim.identity.os_image_hash,
    }
    assert "\n" not in entry["claimed"]["module_id"]
    for record in caplog.records:
        assert "evil" not in record.getMessage() and "\n" not in record.getMessage()


def test_a_verified_document_refused_later_is_audited_as_verified(
    tmp_path: Path, clock: Clock, chain: EmbeddedAllowlist
) -> None:
    sim = make_sim(tmp_path / "sim", clock)  # verifies, but is not on the allowlist
    app = kms(tmp_path, sim, chain, clock)
    request = Enclave(sim).request(app.service)
    assert call(app, "POST", "/v1/release", json.dumps(request).encode())[1]["error"] == (
        "image_not_allowed"
    )
    (entry,) = audit(tmp_path)
    assert entry["module_id"] == sim.identity.module_id
    assert entry["os_image_hash"] == sim.identity.os_image_hash
    assert "claimed" not in entry


# -- 8. debug releases --------------------------------------------------------------------


def test_a_debug_enclave_gets_debug_domain_keys_logged_audited_and_signed_as_debug(
    tmp_path: Path, clock: Clock, chain: EmbeddedAllowlist, caplog: pytest.LogCaptureFixture
) -> None:
    debug = make_sim(tmp_path / "debug", clock, debug=True)
    app = kms(tmp_path, debug, chain, clock, allow_debug=True, debug_application=APP_A)
    enclave = Enclave(debug)
    with caplog.at_level(logging.WARNING):
        status, answer = call(
            app, "POST", "/v1/release", json.dumps(enclave.request(app.service)).encode()
        )
    assert status == "200 OK"
    (key,) = enclave.open(app.service, answer)
    state = app.service.state
    assert key == state.derive_key(APP_A, KEYS[0], domain="debug")
    assert key != state.derive_key(APP_A, KEYS[0])  # what a production enclave of APP_A gets
    assert answer["debug"] is True and answer["application"] == "0x" + APP_A.hex()
    (entry,) = audit(tmp_path)
    assert entry["outcome"] == "released" and entry["debug"] is True
    assert any("debug-domain keys" in r.getMessage() for r in caplog.records)


def test_a_production_answer_carries_no_debug_field(
    tmp_path: Path, clock: Clock, chain: EmbeddedAllowlist
) -> None:
    sim = make_sim(tmp_path / "sim", clock)
    chain.register_image(bytes.fromhex(sim.identity.os_image_hash[2:]), APP_A)
    app = kms(tmp_path, sim, chain, clock, allow_debug=True, debug_application=APP_A)
    enclave = Enclave(sim)
    status, answer = call(
        app, "POST", "/v1/release", json.dumps(enclave.request(app.service)).encode()
    )
    assert status == "200 OK" and "debug" not in answer
    assert enclave.open(app.service, answer) == [app.service.state.derive_key(APP_A, KEYS[0])]


def test_debug_enclaves_without_a_debug_application_are_refused(
    tmp_path: Path, clock: Clock, chain: EmbeddedAllowlist
) -> None:
    debug = make_sim(tmp_path / "debug", clock, debug=True)
    app = kms(tmp_path, debug, chain, clock, allow_debug=True)
    request = Enclave(debug).request(app.service)
    status, answer = call(app, "POST", "/v1/release", json.dumps(request).encode())
    assert status.startswith("403") and answer["error"] == "debug_enclave"


@pytest.mark.parametrize("key", [p.KeyRequest("disk", 32), p.KeyRequest("disk", 32, "age")])
def test_the_debug_domain_changes_every_type(tmp_path: Path, key: p.KeyRequest) -> None:
    state = KmsState.load_or_create(tmp_path / "s")
    assert state.derive_key(APP_A, key, domain="debug") != state.derive_key(APP_A, key)
    assert state.derive_key(APP_A, key, domain="production") == state.derive_key(APP_A, key)


def test_serve_refuses_a_bad_debug_app_as_a_usage_error(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from mock_kms.cli import cli

    args = ["serve", "--state-dir", str(tmp_path / "s"), "--allow-debug", "--debug-app", "x" * 33]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2 and "--debug-app" in result.output
    assert not (tmp_path / "s").exists()  # refused before anything was created


def test_the_help_says_what_allow_debug_does() -> None:
    from click.testing import CliRunner

    from mock_kms.cli import cli

    serve = " ".join(CliRunner().invoke(cli, ["serve", "--help"]).output.split())
    assert "separate debug derivation domain" in serve and "--debug-app" in serve
    verify = " ".join(CliRunner().invoke(cli, ["verify-attestation", "--help"]).output.split())
    assert "debug true, instead of refusing them" in verify
