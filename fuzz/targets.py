"""The three fuzz targets, and the oracle that judges each execution.

    >>> from fuzz.mutate import RandomChooser
    >>> from fuzz.targets import make_target
    >>> target = make_target("parser")
    >>> target.one(RandomChooser(1)).kind in ("refused", "accepted")
    True

Targets:

- ``parser``: :func:`mock_kms.attestation.parse_attestation` on mutants of every seed;
- ``verifier``: :meth:`mock_kms.verifier.AttestationVerifier.verify` at the seed's own time:
  real AWS documents mutated (never re-signed), simulator documents mutated and, mostly,
  re-signed by their leaf key under a simulator root the verifier trusts;
- ``release``: ``POST /v1/release`` through the WSGI app (:class:`mock_kms.server.KmsApp`)
  in-process, with the embedded allowlist allowing the simulated image, a real challenge
  nonce in every document, and mutations of the JSON body and of the document inside it.

Each execution ends in one of these kinds:

- ``refused`` / ``accepted``: the product refused with its own error (a :class:`KmsError`
  subclass; over HTTP a documented status and ``{"error", "message"}`` body), or accepted,
  and the oracle agrees;
- ``crash``: any other exception; over HTTP also a 5xx other than a documented 503 code, or
  a body that is not the documented JSON error shape;
- ``accepted_mutant``: accepted although the reference (:mod:`fuzz.spec`) finds the document
  or request invalid, or reads another meaning from it than the product did, or although the
  signed content (protected header, payload, signature) is not what a trusted key signed,
  or the certificates are not the seed's, or the time and debug policy should refuse it;
- ``refused_valid``: refused although the document (and request) is valid, signed, within
  the policy and means what the seed means (a differential finding: either side may be wrong);
- ``harness_error``: the fuzzer's own code failed (counted apart, never blamed on the product).

What is not a finding: a re-signed mutant that is still valid per the reference (another
PCR5, a longer nonce, a reordered map, an indefinite-length map); an encoding variant with
the same meaning (tag 18, non-minimal heads, chunked strings, a high-S signature).
"""

from __future__ import annotations

import base64
import concurrent.futures
import dataclasses
import datetime
import io
import json
import secrets
import threading
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, TypeVar

from cryptography.hazmat.primitives.asymmetric import ed25519

from fuzz.cbor import Raw
from fuzz.mutate import P384_ORDER, SEMANTIC, Chooser, Mutant, Mutator, chance, pick
from fuzz.seeds import Corpus, Seed, SimLeaf, envelope_tree, ms
from fuzz.spec import ATTESTATION_B64_MAX, Meaning, Verdict, reference, reference_request
from keyutil import protocol
from keyutil.simulator import EnclaveIdentity
from mock_kms.attestation import AttestationDocument, parse_attestation
from mock_kms.config import Limits
from mock_kms.errors import ErrorCode, KmsError
from mock_kms.verifier import AttestationPolicy, AttestationVerifier, VerifiedAttestation

T = TypeVar("T")
KINDS = ("refused", "accepted", "crash", "accepted_mutant", "refused_valid", "harness_error")
FINDINGS = ("crash", "accepted_mutant", "refused_valid")


@dataclasses.dataclass
class Execution:
    target: str
    kind: str
    code: str  # the product's error code, "accepted", or an exception's type
    ops: list[str]
    data: bytes  # the input: a document, or a request body
    seed: str = ""
    detail: str = ""
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)


class Target(Protocol):
    name: str
    inflight: Path | None

    def one(self, c: Chooser) -> Execution: ...


class _Inflight:
    """Each input is written to ``inflight`` (when set) before the product sees it, so that a
    crash that kills the process (a stack overflow in C) leaves its input behind."""

    inflight: Path | None = None

    def before(self, data: bytes) -> None:
        if self.inflight is not None:
            self.inflight.write_bytes(data)


def _trace(e: BaseException) -> str:
    return "".join(traceback.format_exception(type(e), e, e.__traceback__)[-6:])


def high_s_twin(signature: bytes) -> bytes:
    """(r, n - s): the other valid encoding of the same ECDSA signature."""
    s = int.from_bytes(signature[48:], "big")
    return signature[:48] + ((P384_ORDER - s) % P384_ORDER).to_bytes(48, "big")


def document_differences(doc: AttestationDocument, m: Meaning) -> list[str]:
    """Where the parsed document and the reference's reading disagree."""
    pairs: list[tuple[str, object, object]] = [
        ("protected", doc.protected, m.protected),
        ("payload", doc.payload, m.payload),
        ("signature", doc.signature, m.signature),
        ("module_id", doc.module_id, m.module_id),
        ("digest", doc.digest, m.digest),
        ("timestamp", doc.timestamp_ms, m.timestamp_ms),
        ("pcrs", dict(doc.pcrs), m.pcr_map),
        ("certificate", doc.certificate, m.certificate),
        ("cabundle", tuple(doc.cabundle), m.cabundle),
        ("public_key", doc.public_key, m.public_key),
        ("user_data", doc.user_data, m.user_data),
        ("nonce", doc.nonce, m.nonce),
        ("os_image_hash", doc.os_image_hash, m.os_image_hash),
        ("debug", doc.is_debug, m.debug),
    ]
    return [name for name, ours, theirs in pairs if ours != theirs or type(ours) is not type(
        theirs)]


def verified_differences(verified: VerifiedAttestation, m: Meaning) -> list[str]:
    diffs = document_differences(verified.document, m)
    if verified.os_image_hash != m.os_image_hash:
        diffs.append("verified.os_image_hash")
    if verified.debug != m.debug:
        diffs.append("verified.debug")
    return diffs


def policy_refuses(m: Meaning, policy: AttestationPolicy, at: datetime.datetime) -> str:
    """Why the time or debug policy refuses a document that means ``m`` ("" if it does not)."""
    made = ms(m.timestamp_ms)
    if made > at + policy.clock_skew:
        return "from the future"
    if at - made > policy.max_age:
        return "too old"
    if m.debug and not policy.allow_debug:
        return "debug enclave"
    return ""


class Signed:
    """The signed contents a trusted key really made: the seeds', and each re-signed one."""

    def __init__(self, seeds: list[Seed]) -> None:
        self.known: dict[tuple[bytes, bytes], set[bytes]] = {}
        for seed in seeds:
            m = reference(seed.data).meaning
            assert m is not None, seed.name
            twins = {m.signature, high_s_twin(m.signature)}
            self.known.setdefault((m.protected, m.payload), set()).update(twins)

    def problem(self, mutant: Mutant, m: Meaning, seed_m: Meaning) -> str:
        """Why ``m``'s signed content is not what a trusted key signed ("" if it is):
        ``mutant`` may have been re-signed by the leaf key of the seed that means ``seed_m``."""
        if mutant.signed is not None and (m.protected, m.payload, m.signature) == mutant.signed:
            if m.certificate != seed_m.certificate or m.cabundle != seed_m.cabundle:
                return "certificate or cabundle changed"
            return ""
        if m.signature in self.known.get((m.protected, m.payload), ()):
            return ""  # a seed's signed content (its certificates are inside its payload)
        if mutant.signed is not None:
            return "signed bytes differ from what was re-signed"
        return "protected header, payload or signature changed without a new signature"


# -- (a) the parser ---------------------------------------------------------------------------


class ParserTarget(_Inflight):
    name = "parser"

    def __init__(self, corpus: Corpus, mutator: Mutator) -> None:
        self.corpus = corpus
        self.mutator = mutator

    def one(self, c: Chooser) -> Execution:
        try:
            seed = pick(c, self.corpus.all)
            mutant = self.mutator.mutant(seed, c, resign=seed.signer is not None and chance(c, 20))
        except Exception as e:  # the fuzzer's own failure
            return Execution(self.name, "harness_error", type(e).__name__, [], b"",
                             detail=_trace(e))
        return self.check(mutant.data, mutant.ops, seed.name)

    def check(self, data: bytes, ops: list[str], seed: str = "") -> Execution:
        def result(kind: str, code: str, detail: str = "") -> Execution:
            return Execution(self.name, kind, code, ops, data, seed, detail)

        self.before(data)
        try:
            doc = parse_attestation(data)
        except KmsError as e:
            verdict = reference(data)
            if verdict.valid:
                return result("refused_valid", str(e.code), f"{e}; the reference finds it valid")
            return result("refused", str(e.code))
        except Exception as e:
            return result("crash", type(e).__name__, _trace(e))
        verdict = reference(data)
        if verdict.meaning is None:
            return result("accepted_mutant", "accepted", f"the reference refuses: {verdict.reason}")
        diffs = document_differences(doc, verdict.meaning)
        if diffs:
            return result("accepted_mutant", "accepted", f"meaning differs in {', '.join(diffs)}")
        return result("accepted", "accepted")


# -- (b) the verifier -------------------------------------------------------------------------


class VerifierTarget(_Inflight):
    name = "verifier"

    def __init__(self, corpus: Corpus, mutator: Mutator) -> None:
        self.corpus = corpus
        self.mutator = mutator
        self.signed = Signed(corpus.all)
        self.seed_meanings = {seed.name: reference(seed.data).meaning for seed in corpus.all}
        # Real documents: the AWS root, debug allowed so the debug vector's mutants reach the end.
        aws_policy = AttestationPolicy(allow_debug=True)
        # Simulator documents: the simulator root, the default policy (debug refused).
        sim_policy = AttestationPolicy()
        self.verifiers = {
            "aws": (AttestationVerifier.aws(policy=aws_policy),
                    AttestationVerifier.aws(policy=aws_policy,
                                            limits=Limits(chain_cache_size=0))),
            "sim": (AttestationVerifier(trusted_roots=[corpus.sim_root], policy=sim_policy),
                    AttestationVerifier(trusted_roots=[corpus.sim_root], policy=sim_policy,
                                        cache_size=0)),
        }

    def one(self, c: Chooser) -> Execution:
        try:
            seed = pick(c, self.corpus.all)
            resign = seed.signer is not None and chance(c, 85)
            if chance(c, 50):  # fewer, gentler changes: more mutants reach the deep checks
                mutant = self.mutator.mutant(seed, c, resign=resign, max_structural=2,
                                             operations=SEMANTIC)
            else:
                mutant = self.mutator.mutant(seed, c, resign=resign)
            cached, uncached = self.verifiers["aws" if seed.real else "sim"]
            verifier = uncached if chance(c, 20) else cached
        except Exception as e:
            return Execution(self.name, "harness_error", type(e).__name__, [], b"",
                             detail=_trace(e))
        return self.check(mutant, verifier, seed.at)

    def check(self, mutant: Mutant, verifier: AttestationVerifier,
              at: datetime.datetime) -> Execution:
        data, seed = mutant.data, mutant.seed

        def result(kind: str, code: str, detail: str = "") -> Execution:
            return Execution(self.name, kind, code, mutant.ops, data, seed.name, detail,
                             {"at": at.isoformat(), "resigned": mutant.resigned})

        self.before(data)
        try:
            verified = verifier.verify(data, at=at)
        except KmsError as e:
            verdict = reference(data)
            why = self.why_refused(mutant, verdict, verifier.policy, at)
            if not why:
                return result("refused_valid", str(e.code),
                              f"{e}; valid, signed, unchanged certificates, within policy")
            return result("refused", str(e.code))
        except Exception as e:
            return result("crash", type(e).__name__, _trace(e))
        verdict = reference(data)
        why = self.why_refused(mutant, verdict, verifier.policy, at)
        if why:
            return result("accepted_mutant", "accepted", why)
        assert verdict.meaning is not None
        diffs = verified_differences(verified, verdict.meaning)
        if diffs:
            return result("accepted_mutant", "accepted", f"meaning differs in {', '.join(diffs)}")
        return result("accepted", "accepted")

    def why_refused(self, mutant: Mutant, verdict: Verdict, policy: AttestationPolicy,
                    at: datetime.datetime) -> str:
        """Why the model expects a refusal ("" when it expects the document to verify)."""
        if verdict.meaning is None:
            return f"the reference refuses: {verdict.reason}"
        seed_m = self.seed_meanings[mutant.seed.name]
        assert seed_m is not None
        problem = self.signed.problem(mutant, verdict.meaning, seed_m)
        return problem or policy_refuses(verdict.meaning, policy, at)


# -- (c) the KMS release endpoint -------------------------------------------------------------


APPLICATION = b"fuzz-app".ljust(32, b"\0")
MODULE_ID = "i-0fedcba9876543210-enc0fedcba987654321"
# The 503 codes docs/protocol.md and the service document.
UNAVAILABLE_CODES = {"chain_unavailable", "chain_misconfigured", "audit_unavailable",
                     "overloaded"}
ROUTING_CODES = {"method_not_allowed": 405, "not_found": 404}
JSON_VALUES: tuple[Any, ...] = (None, True, False, 0, 1, -1, 1.0, 2**70, 1e308, "", "1",
                                "x" * 1000, [], {}, [1], {"a": 1})
BAD_NAMES: tuple[Any, ...] = (123, True, None, ["disk"], {"n": 1}, "", "-a", "a" * 65,
                              "d\u00efsk", "disk\n", " disk", "disk/../x", 0)
BAD_LENGTHS: tuple[Any, ...] = (15, 65, 0, -32, 32.0, "32", True, None, 2**64, [32])
DEPTHS = (50, 300, 900, 950, 980, 990, 995, 1000, 2000, 20_000)


class Clock:
    """The KMS's clock, moved forward by the fuzzer (nonces expire, the replay set drains)."""

    def __init__(self, start: datetime.datetime) -> None:
        self.now = start.timestamp()

    def __call__(self) -> float:
        return self.now

    def dt(self) -> datetime.datetime:
        return datetime.datetime.fromtimestamp(self.now, datetime.UTC)


def mutate_json(c: Chooser, body: dict[str, Any], ops: list[str]) -> Any:
    """One change to the request object (it may stop being an object)."""
    kind = c.below(8)
    member = pick(c, ("version", "suite", "keys", "attestation"))
    if kind == 0:
        body.pop(member, None)
        ops.append("json_missing")
    elif kind == 1:
        body[member] = pick(c, JSON_VALUES)
        ops.append("json_type")
    elif kind == 2:
        body["version"] = pick(c, (0, 2, "1", 1.0, True, None, -1, 2**64, [1]))
        ops.append("json_version")
    elif kind == 3:
        suite = body.get("suite")
        other = [s for s in protocol.SUITES if s != suite]
        body["suite"] = pick(c, (*other, str(suite).upper(), "", f"{suite} ", None))
        ops.append("json_suite")
    elif kind == 4:
        mutate_keys(c, body)
        ops.append("json_keys")
    elif kind in (5, 6):
        body[pick(c, ("extra", "Version", "nonce", "keys "))] = pick(c, JSON_VALUES)
        ops.append("json_extra")
    else:
        ops.append("json_not_object")
        return pick(c, ([body], "request", 1, None, list(body.items())))
    return body


def mutate_keys(c: Chooser, body: dict[str, Any]) -> None:
    keys = body.get("keys")
    if not isinstance(keys, list) or not keys:
        body["keys"] = pick(c, ([], {"name": "disk", "length": 32}, "disk"))
        return
    kind = c.below(7)
    base = pick(c, keys)
    base = base if isinstance(base, dict) else {"name": "disk", "length": 32}
    if kind == 0:
        body["keys"] = []
    elif kind == 1:
        body["keys"] = [{"name": f"k{i}", "length": 32} for i in range(17)]
    elif kind == 2:
        body["keys"] = [*keys, dict(base)]  # a name twice
    elif kind == 3:
        keys[c.below(len(keys))] = {**base, "name": pick(c, BAD_NAMES)}
    elif kind == 4:
        keys[c.below(len(keys))] = {**base, "length": pick(c, BAD_LENGTHS)}
    elif kind == 5:
        keys[c.below(len(keys))] = pick(c, ("disk", 32, None, [], [{"name": "disk"}]))
    else:
        keys[c.below(len(keys))] = {**base, pick(c, ("extra", "Name")): "x"}


def mutate_base64(c: Chooser, text: Any) -> Any:
    if not isinstance(text, str) or not text:
        return pick(c, ("", "AAAA", None, 1))
    kind = c.below(8)
    if kind == 0:
        return text.replace("+", "-").replace("/", "_")
    if kind == 1:
        return text.rstrip("=")
    if kind == 2:
        i = c.below(len(text))
        return text[:i] + pick(c, ("\n", " ", "\r\n", "*", "=", "\u00e9")) + text[i:]
    if kind == 3:
        return text[: -1 - c.below(3)]
    if kind == 4:
        return text + pick(c, ("=", "==", "AAAA", "A"))
    if kind == 5:
        return "A" * (ATTESTATION_B64_MAX + 4)
    try:
        document = base64.b64decode(text, validate=True)
    except ValueError:  # an earlier change already broke it
        return text + "A"
    if kind == 6:
        return base64.b64encode(document + b"\0").decode()
    return base64.urlsafe_b64encode(document).decode()


def mutate_body(c: Chooser, body: bytes, obj: Any, ops: list[str]) -> bytes:
    """Changes to the request's bytes: deep nesting, encodings, JSON syntax."""
    kind = c.below(6)
    if kind == 0:
        depth = pick(c, DEPTHS)
        if isinstance(obj, dict) and chance(c, 60):
            member = pick(c, ("version", "suite", "keys", "attestation", "extra"))
            text = json.dumps({**obj, member: "@@"}).replace('"@@"', "[" * depth + "]" * depth)
            body = text.encode()
        else:
            body = ("[" * depth + "]" * depth).encode()
        ops.append("body_deep_nesting")
    elif kind == 1:
        body = pick(c, (body.decode().encode("utf-16"), b"\xef\xbb\xbf" + body,
                        body.decode().encode("utf-32"), body + b"\xff", b"\xff" + body))
        ops.append("body_encoding")
    elif kind == 2:
        body = body[: c.below(len(body) + 1)]
        ops.append("body_truncate")
    elif kind == 3:
        body = body.replace(b'"version": 1', pick(c, (b'"version": NaN', b'"version": 1e0',
                                                      b'"version": 01', b'"version": 1.0e+0',
                                                      b'"version": Infinity')))
        ops.append("body_number_syntax")
    elif kind == 4:
        # a member twice: the last one counts, in the product and in the reference
        body = body[:-1] + b', "version": ' + pick(c, (b"1", b"2", b"true")) + b"}"
        ops.append("body_duplicate_member")
    else:
        body = body + pick(c, (b" ", b"x", b"\n{}", b"\x00", b",", b"]"))
        ops.append("body_trailing")
    return body


_PLACEHOLDER = "@attestation@"


def _as_sent(obj: Any, keys: tuple[protocol.KeyRequest, ...],
             suite: str) -> tuple[tuple[protocol.KeyRequest, ...], str]:
    """The keys and suite of a mutated request read leniently (names as text), when that can
    be done; otherwise the original ones."""
    try:
        sent = tuple(protocol.KeyRequest(str(k.get("name", "")), k.get("length"))
                     for k in obj["keys"])
    except (TypeError, KeyError, AttributeError, ValueError):
        sent = keys
    sent_suite = obj.get("suite") if isinstance(obj, dict) else None
    return sent or keys, sent_suite if sent_suite in protocol.SUITES else suite


class _SmallStackThread:
    """The one thread that runs the WSGI calls, with the stack a server thread may get under
    a tight ``ulimit -s`` (glibc sizes thread stacks by it): recursion that the main thread's
    8 MiB would absorb crashes here, as it would crash such a server."""

    def __init__(self, stack: int) -> None:
        previous = threading.stack_size(stack)
        try:
            self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
            self.pool.submit(lambda: None).result()  # the thread starts now, with that stack
        finally:
            threading.stack_size(previous)

    def run(self, fn: Callable[..., T], *args: Any) -> T:
        return self.pool.submit(fn, *args).result()


WORKER_STACK = 1 << 20


class ReleaseTarget(_Inflight):
    name = "release"

    def __init__(self, corpus: Corpus, mutator: Mutator) -> None:
        from mock_kms.allowlist import EmbeddedAllowlist
        from mock_kms.server import KmsApp
        from mock_kms.service import ReleaseService, ReleaseSettings
        from mock_kms.state import KmsState

        self.corpus = corpus
        self.mutator = mutator
        self.signer = corpus.signer
        self.clock = Clock(corpus.sim[0].at)
        self.identity = EnclaveIdentity.generate(module_id=MODULE_ID)
        self.image = bytes.fromhex(self.identity.os_image_hash[2:])
        self.allowlist = EmbeddedAllowlist.create([(self.image, APPLICATION)])
        self.policy = AttestationPolicy(max_age=datetime.timedelta(seconds=60))
        verifier = AttestationVerifier(trusted_roots=[corpus.sim_root], policy=self.policy)
        self.state = KmsState(secrets.token_bytes(32), ed25519.Ed25519PrivateKey.generate())
        self.service = ReleaseService(
            verifier=verifier,
            allowlist=self.allowlist,
            state=self.state,
            settings=ReleaseSettings(nonce_lifetime=30),
            clock=self.clock,
        )
        self.app = KmsApp(self.service)
        self.leaf: SimLeaf | None = None
        self.worker = _SmallStackThread(WORKER_STACK)

    # -- the HTTP exchange, in-process -------------------------------------------------------
    def call(self, method: str, path: str, body: bytes = b"",
             content_length: str | None = None) -> tuple[int, dict[str, str], bytes]:
        environ: dict[str, Any] = {
            "REQUEST_METHOD": method,
            "PATH_INFO": path,
            "wsgi.input": io.BytesIO(body),
            "SERVER_NAME": "127.0.0.1",
            "SERVER_PORT": "8420",
            "wsgi.url_scheme": "http",
        }
        if content_length is not None:
            environ["CONTENT_LENGTH"] = content_length
        captured: dict[str, Any] = {}

        def start_response(status: str, headers: list[tuple[str, str]], *_: Any) -> Any:
            captured["status"], captured["headers"] = status, dict(headers)
            return lambda _data: None

        out = b"".join(self.worker.run(self.app, environ, start_response))
        return int(captured["status"].split()[0]), captured["headers"], out

    def challenge(self) -> bytes:
        status, _, body = self.call("POST", "/v1/challenge")
        if status != 200:
            raise RuntimeError(f"challenge answered {status}: {body[:200]!r}")
        return base64.b64decode(json.loads(body)["nonce"])

    def current_leaf(self, now: datetime.datetime) -> SimLeaf:
        if self.leaf is None or self.leaf.cert.not_valid_after_utc < now + datetime.timedelta(
                minutes=10):
            self.leaf = self.signer.leaf(MODULE_ID, now)
        return self.leaf

    # -- one execution ------------------------------------------------------------------------
    def one(self, c: Chooser) -> Execution:
        try:
            case = self.make_case(c)
        except Exception as e:
            return Execution(self.name, "harness_error", type(e).__name__, [], b"",
                             detail=_trace(e))
        self.before(case.body)
        try:
            status, headers, out = self.call(case.method, case.path, case.body,
                                             case.content_length)
        except Exception as e:
            return case.result("crash", type(e).__name__, _trace(e))
        try:
            return self.judge(case, status, headers, out)
        except Exception as e:
            return Execution(self.name, "harness_error", type(e).__name__, case.ops,
                             case.body, detail=_trace(e))

    def make_case(self, c: Chooser) -> _Case:
        self.clock.now += 0.05
        now = self.clock.dt()
        nonce = self.challenge()
        suite = pick(c, protocol.SUITES)
        recipient = protocol.generate_recipient(suite)
        keys = tuple(protocol.KeyRequest(name, 16 + c.below(49))
                     for name in ("disk", "tls", "weights.v2", "a")[: 1 + c.below(3)])
        ops: list[str] = []
        # The request first; the document goes in last, where the placeholder is.
        obj: Any = {"version": 1, "suite": suite, "keys": [k.to_json() for k in keys],
                    "attestation": _PLACEHOLDER}
        if chance(c, 40):
            for _ in range(1 + c.below(2)):
                obj = mutate_json(c, obj, ops) if isinstance(obj, dict) else obj
        bound_keys, bound_suite = keys, suite
        if ops and chance(c, 50):
            # A client that binds what it sent, however odd: the binding then matches.
            bound_keys, bound_suite = _as_sent(obj, keys, suite)
        binding = protocol.request_binding(bound_keys, bound_suite, nonce)
        public = protocol.recipient_public_bytes(recipient)
        leaf = self.current_leaf(now)
        document = self.signer.document(self.identity, leaf, now, nonce=nonce,
                                        user_data=binding, public_key=public,
                                        indefinite=chance(c, 30))
        mutant = Mutant(Seed("release", document, Raw(document), now, leaf.key), document, [])
        if chance(c, 50):
            seed = dataclasses.replace(mutant.seed, tree=envelope_tree(document))
            gentle = chance(c, 50)
            mutant = self.mutator.mutant(seed, c, resign=chance(c, 85),
                                         max_structural=2 if gentle else 5,
                                         operations=SEMANTIC if gentle else None)
            ops.extend(mutant.ops)
        attestation: Any = base64.b64encode(mutant.data).decode()
        if chance(c, 8):
            attestation = mutate_base64(c, attestation)
            ops.append("json_attestation")
        body = json.dumps(obj).replace(json.dumps(_PLACEHOLDER), json.dumps(attestation)).encode()
        if chance(c, 12):
            body = mutate_body(c, body, obj, ops)
        content_length: str | None = str(len(body))
        if chance(c, 4):
            content_length = pick(c, (None, "abc", "-1", str(max(0, len(body) - 5)),
                                      str(len(body) + 100), "99999999", " 12", "1e3"))
            ops.append("content_length")
        method, path = "POST", "/v1/release"
        if chance(c, 2):
            method, path = pick(c, (("GET", "/v1/release"), ("POST", "/v1/releases"),
                                    ("PUT", "/v1/challenge"), ("POST", "/v1/health")))
            ops.append("http_route")
        return _Case(self, ops, body, content_length, method, path, mutant, nonce, recipient,
                     suite, keys)

    def judge(self, case: _Case, status: int, headers: dict[str, str],
              out: bytes) -> Execution:
        if headers.get("Content-Type") != "application/json":
            return case.result("crash", f"http_{status}", "answer is not application/json")
        if headers.get("Content-Length") != str(len(out)):
            return case.result("crash", f"http_{status}", "Content-Length does not match")
        try:
            answer = json.loads(out)
        except ValueError:
            return case.result("crash", f"http_{status}", "answer is not JSON")
        if status != 200:
            problem = error_shape_problem(status, answer)
            if problem:
                return case.result("crash", f"http_{status}", problem)
            code = answer["error"]
            framed = case.content_length == str(len(case.body))
            if framed and self.expected_release(case) is None:
                return case.result("refused_valid", code, f"{answer['message']}; the request "
                                   "is valid, its document valid, signed and fresh")
            return case.result("refused", code)
        return self.judge_release(case, answer)

    def expected_release(self, case: _Case) -> str | None:
        """None when the model expects a release; otherwise why not."""
        if case.method != "POST" or case.path != "/v1/release":
            return "another endpoint"
        # A changed Content-Length is framing: the body decides (a shortened read fails).
        request = reference_request(case.body)
        if not request.valid or request.attestation is None:
            return f"request: {request.reason}"
        return self.document_problem(case, request.attestation, request.suite, request.keys)

    def document_problem(self, case: _Case, document: bytes, suite: str | None,
                         keys: tuple[tuple[str, int], ...]) -> str | None:
        verdict = reference(document)
        m = verdict.meaning
        if m is None:
            return f"the reference refuses the document: {verdict.reason}"
        seed_m = reference(case.mutant.seed.data).meaning
        assert seed_m is not None
        problem = Signed([case.mutant.seed]).problem(case.mutant, m, seed_m)
        problem = problem or policy_refuses(m, self.policy, self.clock.dt())
        if problem:
            return problem
        if m.nonce != case.nonce:
            return "nonce is not the challenge"
        assert suite is not None
        requested = tuple(protocol.KeyRequest(n, length) for n, length in keys)
        if m.user_data != protocol.request_binding(requested, suite, case.nonce):
            return "binding mismatch"
        try:
            protocol.load_recipient_public(suite, m.public_key or b"")
        except protocol.ProtocolError:
            return "public key of another suite"
        if m.os_image_hash != self.identity.os_image_hash:
            return "image not allowed"
        return None

    def judge_release(self, case: _Case, answer: Any) -> Execution:
        why = self.expected_release(case)
        if why is not None:
            return case.result("accepted_mutant", "released", why)
        request = reference_request(case.body)
        assert request.attestation is not None and request.suite is not None
        m = reference(request.attestation).meaning
        assert m is not None and m.nonce is not None
        try:
            body = protocol.verify_answer(self.state.identity.public_key(), answer)
        except protocol.ProtocolError:
            return case.result("accepted_mutant", "released", "answer not signed by the KMS")
        wrong = [
            name for name, ours, theirs in (
                ("suite", body.get("suite"), request.suite),
                ("keys", [(k["name"], k["length"]) for k in body.get("keys", [])],
                 list(request.keys)),
                ("nonce", body.get("nonce"), base64.b64encode(m.nonce).decode()),
                ("binding", body.get("binding"), (m.user_data or b"").hex()),
                ("os_image_hash", body.get("os_image_hash"), m.os_image_hash),
                ("application", body.get("application"), "0x" + APPLICATION.hex()),
            ) if ours != theirs
        ]
        if wrong:
            return case.result("accepted_mutant", "released", f"answer differs in {wrong}")
        if m.public_key == protocol.recipient_public_bytes(case.recipient):
            for item in body["keys"]:
                key = protocol.KeyRequest(item["name"], item["length"])
                opened = protocol.open_sealed(request.suite, case.recipient, key, m.nonce,
                                              base64.b64decode(item["sealed"]))
                if opened != self.state.derive_key(APPLICATION, key):
                    return case.result("accepted_mutant", "released", "sealed key differs")
        return case.result("accepted", "released")


@dataclasses.dataclass
class _Case:
    target: ReleaseTarget
    ops: list[str]
    body: bytes
    content_length: str | None
    method: str
    path: str
    mutant: Mutant
    nonce: bytes
    recipient: protocol.RecipientPrivateKey
    suite: str
    keys: tuple[protocol.KeyRequest, ...]

    def result(self, kind: str, code: str, detail: str = "") -> Execution:
        extra = {"method": self.method, "path": self.path,
                 "content_length": self.content_length, "resigned": self.mutant.resigned}
        return Execution("release", kind, code, self.ops, self.body, "release", detail, extra)


def error_shape_problem(status: int, answer: Any) -> str:
    """What is wrong with an error answer ("" if it is the documented shape and status)."""
    if not isinstance(answer, dict) or set(answer) != {"error", "message"}:
        return f"error body is not {{error, message}}: {str(answer)[:200]}"
    code, message = answer["error"], answer["message"]
    if not isinstance(code, str) or not isinstance(message, str):
        return "error or message is not a string"
    if code in ROUTING_CODES:
        return "" if ROUTING_CODES[code] == status else f"{code} with status {status}"
    if code not in {c.value for c in ErrorCode}:
        return f"unknown error code {code!r}"
    if status >= 500:
        if status != 503 or code not in UNAVAILABLE_CODES:
            return f"status {status} with code {code}"
        return ""
    expected = (400 if code in ("bad_request", "input_encoding")
                else 413 if code == "body_too_large" else 403)
    return "" if status == expected else f"status {status} for code {code} (expected {expected})"


def _answer_target(corpus: Corpus, mutator: Mutator) -> Target:
    from fuzz.answer_target import AnswerTarget  # the client side; it imports this module

    return AnswerTarget(corpus, mutator)


TARGETS: dict[str, Callable[[Corpus, Mutator], Target]] = {
    "parser": ParserTarget,
    "verifier": VerifierTarget,
    "release": ReleaseTarget,
    "answer": _answer_target,
}


def _provenance_target(corpus: Corpus, mutator: Mutator) -> Target:
    from fuzz.provenance_target import ProvenanceTarget  # it imports this module

    return ProvenanceTarget(corpus, mutator)


TARGETS["provenance"] = _provenance_target


SEALED_TARGET_NAMES = ("sealed", "dotenv", "recipient")


def make_target(name: str, corpus: Corpus | None = None) -> Target:
    if name == "logwire":  # needs no attestation corpus
        from fuzz.logwire import LogWireTarget

        return LogWireTarget()
    if name == "host_settings":  # keyutil run's reading of the host's settings
        from fuzz.host_settings import HostSettingsTarget

        return HostSettingsTarget()
    if name == "http":  # the KMS's HTTP server, run in a thread of this process
        from fuzz.http import HttpTarget

        return HttpTarget()
    if name in SEALED_TARGET_NAMES:
        # fuzz/sealed.py imports this module; its targets need no corpus of documents.
        from fuzz.sealed import SEALED_TARGETS

        return SEALED_TARGETS[name]()
    corpus = corpus or Corpus.create()
    return TARGETS[name](corpus, Mutator(corpus))

