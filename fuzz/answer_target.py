"""The client's answer handling as a fuzz target: whatever a hostile KMS or host sends back.

    >>> from fuzz.mutate import RandomChooser
    >>> from fuzz.answer_target import AnswerTarget
    >>> AnswerTarget().one(RandomChooser(1)).kind in ("refused", "accepted")
    True

One execution takes the honest answer of one endpoint (``/v1/health``, ``/v1/challenge`` or
``/v1/release``: a real answer signed by the pinned KMS identity, keys sealed to a real HPKE
recipient for a real nonce and binding), changes its JSON (members dropped or retyped, another
nonce, binding, suite, application, key list, sealed key or signature; then re-signed by the
pinned identity, or not) and/or its bytes (deep nesting, other encodings, truncation, trailing
bytes, number syntax), picks an HTTP status, and runs what the client runs on a response:
:func:`keyutil.transport.decode_json`, :func:`keyutil.client.classify`, then
:func:`~keyutil.client.parse_health`, :func:`~keyutil.client.parse_challenge`, or
:func:`~keyutil.client.check_answer` and :func:`~keyutil.client.open_keys`.

Kinds: ``refused`` (a :class:`~keyutil.client.ReleaseError` or
:class:`~keyutil.transport.TransportError`, with its code), ``accepted``, ``crash`` (any other
exception), ``accepted_mutant``: keys accepted that are not the keys the KMS sealed; an answer
accepted although its content is not what the pinned identity signed; a re-signed answer
accepted for another request (version, suite, nonce, binding, key list) or, when the request
expects its application, for another application.
"""

from __future__ import annotations

import copy
import json
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ed25519

from fuzz.mutate import Chooser, Mutator, chance, pick
from fuzz.seeds import Corpus
from fuzz.targets import JSON_VALUES, Execution, _Inflight, _trace, mutate_body
from keyutil import protocol
from keyutil.client import (
    ReleaseError,
    ReleaseRequest,
    check_answer,
    classify,
    open_keys,
    parse_challenge,
    parse_health,
)
from keyutil.protocol import KeyRequest
from keyutil.transport import HttpResponse, TransportError, decode_json

APP = b"fuzz-app".ljust(32, b"\0")
OTHER_APP = b"other-app".ljust(32, b"\0")
KEY_CHOICES = (
    KeyRequest("disk", 32),
    KeyRequest("weights", 64),
    KeyRequest("tls", 16),
    KeyRequest("id", 32, "age"),
)
ENDPOINTS = ("/v1/health", "/v1/challenge", "/v1/release", "/v1/release", "/v1/release")
STATUSES = (200, 200, 200, 200, 200, 201, 204, 302, 400, 403, 404, 500, 503, 599)
MEMBERS = ("version", "suite", "application", "os_image_hash", "nonce", "binding", "keys",
           "signature", "debug")
REQUEST_FIELDS = ("version", "suite", "nonce", "binding")


def _flip_b64(c: Chooser, text: Any) -> Any:
    """One base64 character changed, so the bytes differ and the text stays base64."""
    if not isinstance(text, str) or not text.strip("="):
        return "AAAA"
    i = c.below(len(text.rstrip("=")))
    return text[:i] + ("B" if text[i] == "A" else "A") + text[i + 1 :]


class _Case:
    def __init__(self, target: AnswerTarget, c: Chooser) -> None:
        self.endpoint = pick(c, ENDPOINTS)
        keys = tuple(k for k in KEY_CHOICES if chance(c, 50)) or (KEY_CHOICES[0],)
        suite = pick(c, protocol.SUITES)
        self.request = ReleaseRequest(
            keys=keys, suite=suite, identity=target.identity.public_key(),
            expect_app=APP if chance(c, 70) else None,
        )
        self.recipient = protocol.generate_recipient(suite)
        self.nonce = c.data(41)
        self.binding = protocol.request_binding(keys, suite, self.nonce)
        self.secrets = [c.data(k.length) for k in keys]
        public = self.recipient.public_key()
        self.honest = {
            "version": 1,
            "suite": suite,
            "application": "0x" + APP.hex(),
            "os_image_hash": "0x" + c.data(32).hex(),
            "nonce": protocol.b64e(self.nonce),
            "binding": self.binding.hex(),
            "keys": [
                {**k.to_json(), "sealed": protocol.b64e(
                    protocol.seal(suite, public, k, self.nonce, secret))}
                for k, secret in zip(keys, self.secrets, strict=True)
            ],
        }
        self.ops: list[str] = []
        self.resigned = False
        self.status = 200
        self.data = b""

    def answer(self, target: AnswerTarget) -> Any:
        if self.endpoint == "/v1/health":
            return {"status": "ready", "identity": target.pinned}
        if self.endpoint == "/v1/challenge":
            return {"nonce": protocol.b64e(self.nonce), "expires_at_ms": 1_700_000_000_000}
        return protocol.sign_answer(target.identity, self.honest)


def mutate_answer(c: Chooser, case: _Case, answer: dict[str, Any], ops: list[str]) -> Any:
    """One change to an answer object (it may stop being an object)."""
    kind = c.below(9)
    member = pick(c, MEMBERS if case.endpoint == "/v1/release" else
                  ("status", "identity", "nonce", "expires_at_ms"))
    if kind == 0:
        answer.pop(member, None)
        ops.append("answer_missing")
    elif kind == 1:
        answer[member] = pick(c, JSON_VALUES)
        ops.append("answer_type")
    elif kind == 2:
        field = pick(c, ("version", "suite", "nonce", "binding", "os_image_hash", "debug"))
        answer[field] = pick(c, {
            "version": (2, "1", True, 1.0, 0),
            "suite": (*protocol.SUITES, "", "X25519"),
            "nonce": (_flip_b64(c, answer.get("nonce")), "", "====", "\u00e9"),
            "binding": (case.binding.hex().upper(), "00" * 32, "\ud800", case.binding.hex()[:-2]),
            "os_image_hash": ("0x" + "00" * 32, "0x12", "ab" * 32),
            "debug": (True, False, "yes"),
        }[field])
        ops.append("answer_field")
    elif kind == 3:
        answer["application"] = pick(c, (
            "0x" + OTHER_APP.hex(), "fuzz-app", "0x" + bytes(32).hex(),
            "0x" + APP.hex().upper()[2:], "0X" + APP.hex(), " 0x" + APP.hex()))
        ops.append("answer_application")
    elif kind == 4:
        _mutate_keys(c, answer)
        ops.append("answer_keys")
    elif kind == 5:
        answer["signature"] = pick(c, (
            "", "A" * 88, _flip_b64(c, answer.get("signature")), None,
            protocol.b64e(ed25519.Ed25519PrivateKey.generate().sign(b"x"))))
        ops.append("answer_signature")
    elif kind in (6, 7):
        answer[pick(c, ("extra", "Version", "keys ", "error"))] = pick(c, JSON_VALUES)
        ops.append("answer_extra")
    else:
        ops.append("answer_not_object")
        return pick(c, ([answer], "answer", 1, None, list(answer.items())))
    return answer


def _mutate_keys(c: Chooser, answer: dict[str, Any]) -> None:
    keys = answer.get("keys")
    if not isinstance(keys, list) or not keys:
        answer["keys"] = pick(c, ([], {"name": "disk"}, "disk"))
        return
    i = c.below(len(keys))
    entry = keys[i] if isinstance(keys[i], dict) else {}
    kind = c.below(7)
    if kind == 0:
        keys.pop(i)
    elif kind == 1:
        keys.append(copy.deepcopy(entry))
    elif kind == 2:
        keys.reverse()
    elif kind == 3:
        entry[pick(c, ("name", "length", "type"))] = pick(
            c, ("disk", "tls", 16, 32, 64, 65, "raw", "age", "ed25519", None, [32]))
    elif kind == 4:
        entry["sealed"] = _flip_b64(c, entry.get("sealed"))
    elif kind == 5:
        j = c.below(len(keys))
        if isinstance(keys[j], dict):  # another key's sealed value
            entry["sealed"], keys[j]["sealed"] = keys[j].get("sealed"), entry.get("sealed")
    else:
        keys[i] = pick(c, ("disk", 32, None, [], {"name": "disk", "length": 32}))


class AnswerTarget(_Inflight):
    name = "answer"

    def __init__(self, corpus: Corpus | None = None, mutator: Mutator | None = None) -> None:
        self.identity = ed25519.Ed25519PrivateKey.generate()
        self.pinned = protocol.format_identity(self.identity.public_key())

    def make_case(self, c: Chooser) -> _Case:
        case = _Case(self, c)
        answer: Any = case.answer(self)
        if chance(c, 75):
            for _ in range(1 + c.below(3)):
                if isinstance(answer, dict):
                    answer = mutate_answer(c, case, answer, case.ops)
            if isinstance(answer, dict) and case.endpoint == "/v1/release" and chance(c, 50):
                unsigned = {k: v for k, v in answer.items() if k != "signature"}
                answer = protocol.sign_answer(self.identity, unsigned)
                case.resigned = True
                case.ops.append("resigned")
        data = json.dumps(answer).encode()
        if chance(c, 25):
            data = mutate_body(c, data, answer, case.ops)
        case.status = pick(c, STATUSES) if chance(c, 15) else 200
        case.data = data
        return case

    def one(self, c: Chooser) -> Execution:
        try:
            case = self.make_case(c)
        except Exception as e:
            return Execution(self.name, "harness_error", type(e).__name__, [], b"",
                             detail=_trace(e))
        self.before(case.data)

        def result(kind: str, code: str, detail: str = "") -> Execution:
            extra = {"endpoint": case.endpoint, "status": case.status, "resigned": case.resigned}
            return Execution(self.name, kind, code, case.ops, case.data, case.endpoint,
                             detail, extra)

        request = case.request
        try:
            where = f"{case.endpoint} (fuzz)"
            body = classify(HttpResponse(case.status, decode_json(case.data, where)), where)
            if case.endpoint == "/v1/health":
                parse_health(body)
                return result("accepted", "accepted")
            if case.endpoint == "/v1/challenge":
                parse_challenge(body)
                return result("accepted", "accepted")
            sealed = check_answer(body, request=request, nonce=case.nonce, binding=case.binding)
            opened = open_keys(request, case.recipient, case.nonce, sealed)
        except (ReleaseError, TransportError) as e:
            return result("refused", e.code)
        except Exception as e:
            return result("crash", type(e).__name__, _trace(e))
        try:
            problem = self.judge(case, body, [bytes(k.value) for k in opened])
        except Exception as e:
            return result("harness_error", type(e).__name__, _trace(e))
        return result("accepted_mutant", "accepted", problem) if problem else result(
            "accepted", "accepted")

    @staticmethod
    def judge(case: _Case, body: Any, opened: list[bytes]) -> str:
        """Why an accepted release answer should not have been ("" if it is fine)."""
        if opened != case.secrets:
            return "opened keys that are not the keys the KMS sealed"
        content = {k: v for k, v in body.items() if k != "signature"}
        if not case.resigned:
            return "" if content == case.honest else "accepted content that was never signed"
        for field in REQUEST_FIELDS:
            same = (
                protocol.b64d(content.get(field), field) == case.nonce  # padding bits may vary
                if field == "nonce"
                else content.get(field) == case.honest[field]
            )
            if not same:
                return f"accepted a re-signed answer with another {field}"
        names = [(k.get("name"), k.get("length"), k.get("type", "raw")) for k in content["keys"]]
        if names != [(k.name, k.length, k.type) for k in case.request.keys]:
            return "accepted a re-signed answer with another key list"
        app = content.get("application")
        if case.request.expect_app is not None and (
            not isinstance(app, str) or bytes.fromhex(app[2:]) != case.request.expect_app
        ):
            return f"accepted keys of application {str(app)[:70]} while expecting fuzz-app"
        return ""

