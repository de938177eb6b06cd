"""A short, seeded run of each fuzz target (``fuzz/``): no crash, no accepted mutant.

The long runs are ``python -m fuzz.run`` (see fuzz/run.py). Here each target runs a few
thousand executions from a fixed seed, and the run also proves that it fuzzed something:
the mutator made each structural class it claims (duplicate keys, indefinite lengths, tags,
...), the targets reached refusals deep behind the parser (signatures, chains, policy,
binding, allowlist), and mutants were accepted too, so the acceptance oracle was exercised.
"""

from __future__ import annotations

import collections
import dataclasses
from pathlib import Path
from typing import Any

import cbor2
import pytest

from fuzz.answer_target import AnswerTarget
from fuzz.mutate import BYTE_CLASSES, STRUCTURAL_CLASSES, Mutator, RandomChooser
from fuzz.record import Recorder
from fuzz.seeds import Corpus
from fuzz.spec import reference, reference_request
from fuzz.targets import ParserTarget, ReleaseTarget, Target, VerifierTarget
from mock_kms.attestation import parse_attestation

SEED = 20260301
RUNS = {"parser": 4000, "verifier": 3000, "release": 1500, "answer": 1500}


@pytest.fixture(scope="module")
def corpus() -> Corpus:
    return Corpus.create()


def run(target: Target, runs: int, findings: Path) -> Recorder:
    recorder = Recorder(findings)
    chooser = RandomChooser(SEED)
    for _ in range(runs):
        recorder.add(target.one(chooser))
    return recorder


def assert_clean(recorder: Recorder) -> None:
    """No finding, and none of the fuzzer's own errors (their inputs are in the saved list)."""
    report = recorder.report()
    bad = {k: report[k] for k in ("crashes", "accepted_mutants", "refused_valid",
                                  "harness_errors")}
    assert bad == dict.fromkeys(bad, 0), (report["finding_signatures"], report["saved"])


def codes(recorder: Recorder, kind: str = "refused") -> set[str]:
    return {key.split(":", 1)[1] for key in recorder.codes if key.startswith(f"{kind}:")}


def test_parser_smoke(corpus: Corpus, tmp_path: Path) -> None:
    recorder = run(ParserTarget(corpus, Mutator(corpus)), RUNS["parser"], tmp_path)
    assert_clean(recorder)
    # Every structural and byte-level mutation class was made (some apply to one item only,
    # like the signature, so they are rarer).
    made = {name: recorder.ops[name] for name in (*STRUCTURAL_CLASSES, *BYTE_CLASSES)}
    assert min(made.values()) >= 1, made
    # The classes the strict parser exists for, in numbers.
    for name in ("duplicate_key", "indefinite_length", "tag_18", "tag_known", "tag_unknown",
                 "non_minimal_head", "wrong_length", "deep_nesting"):
        assert recorder.ops[name] >= 100, (name, recorder.ops[name])
    assert {"cbor_malformed", "cbor_duplicate_key", "cbor_trailing_bytes", "cose_structure",
            "cose_algorithm", "field_type", "field_unknown", "field_missing",
            "pcr_invalid"} <= codes(recorder)
    assert recorder.kinds["accepted"] >= 50  # encoding variants and re-signed valid mutants


def test_verifier_smoke(corpus: Corpus, tmp_path: Path) -> None:
    recorder = run(VerifierTarget(corpus, Mutator(corpus)), RUNS["verifier"], tmp_path)
    assert_clean(recorder)
    assert recorder.ops["resign_impossible"] < recorder.execs // 10
    # Past the parser: signature, certificates, chain and policy all refused something.
    assert {"signature_invalid", "certificate_malformed", "chain_invalid",
            "debug_enclave"} <= codes(recorder), codes(recorder)
    assert recorder.kinds["accepted"] >= 100


def test_release_smoke(corpus: Corpus, tmp_path: Path) -> None:
    recorder = run(ReleaseTarget(corpus, Mutator(corpus)), RUNS["release"], tmp_path)
    assert_clean(recorder)
    for name in ("json_missing", "json_type", "json_version", "json_keys", "json_attestation",
                 "body_deep_nesting", "body_encoding", "content_length", "duplicate_key",
                 "tag_known"):
        assert recorder.ops[name] > 0, name
    assert {"bad_request", "binding_mismatch", "cbor_malformed", "signature_invalid",
            "body_too_large"} <= codes(recorder), codes(recorder)
    assert recorder.kinds["accepted"] >= 300  # released, opened, the derived keys


def test_answer_smoke(tmp_path: Path) -> None:
    """The client's answer handling (issue 14.7): hostile answers are refused with a code
    (bad_response, an authentication failure, an HTTP status), never a crash."""
    recorder = run(AnswerTarget(), RUNS["answer"], tmp_path)
    assert_clean(recorder)
    for name in ("answer_missing", "answer_type", "answer_field", "answer_application",
                 "answer_keys", "answer_signature", "answer_not_object", "resigned",
                 "body_deep_nesting", "body_encoding", "body_truncate"):
        assert recorder.ops[name] > 0, name
    assert {"bad_response", "answer_unauthenticated", "answer_malformed",
            "answer_keys_mismatch", "answer_application_mismatch", "answer_open_failed",
            "kms_not_ready"} <= codes(recorder), codes(recorder)
    assert recorder.kinds["accepted"] >= 200


def test_answer_oracle_flags_a_client_that_ignores_the_expected_application(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fuzz import answer_target as client

    real = client.check_answer

    def lenient(answer: Any, *, request: Any, nonce: bytes, binding: bytes) -> Any:
        request = dataclasses.replace(request, expect_app=None)
        return real(answer, request=request, nonce=nonce, binding=binding)

    monkeypatch.setattr(client, "check_answer", lenient)
    recorder = run(AnswerTarget(), 600, tmp_path)
    assert recorder.kinds["accepted_mutant"] > 0
    assert any("application" in s for s in recorder.signatures), recorder.signatures


# -- the oracle itself ----------------------------------------------------------------------


def test_oracle_flags_a_parser_that_drops_tags(
    corpus: Corpus, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A parser that ignored tag 55799 (as cbor2 did) is caught as accepting a mutant."""
    seed = corpus.sim[0]
    tagged = cbor2.dumps(cbor2.CBORTag(55799, cbor2.loads(seed.data)))

    def lenient(data: bytes) -> Any:
        return parse_attestation(data[3:] if data.startswith(b"\xd9\xd9\xf7") else data)

    target = ParserTarget(corpus, Mutator(corpus))
    assert target.check(tagged, ["tag_known"]).kind == "refused"
    monkeypatch.setattr("fuzz.targets.parse_attestation", lenient)
    found = target.check(tagged, ["tag_known"])
    assert found.kind == "accepted_mutant"
    assert "tag 55799" in found.detail


def test_reference_reads_seeds_as_valid_and_requests_strictly(corpus: Corpus) -> None:
    """Every seed is valid to the reference; a request's JSON types are checked strictly."""
    for seed in corpus.all:
        assert reference(seed.data).valid, seed.name
    good = b'{"version": 1, "suite": "x25519-hkdf-sha256-aes-256-gcm", ' \
           b'"keys": [{"name": "disk", "length": 32}], "attestation": "hA=="}'
    assert reference_request(good).valid
    for bad in (good.replace(b'"version": 1', b'"version": true'),
                good.replace(b'"name": "disk"', b'"name": 123'),
                good.replace(b'"length": 32', b'"length": 32.0'),
                good.replace(b'"hA=="', b'"hA"')):
        assert not reference_request(bad).valid, bad


def test_mutation_classes_are_reproducible(corpus: Corpus) -> None:
    """One seed, the same decisions: the same classes in the same order."""
    mutator = Mutator(corpus)

    def classes(seed: int) -> list[list[str]]:
        chooser = RandomChooser(seed)
        return [mutator.mutant(corpus.sim[0], chooser, resign=True).ops for _ in range(50)]

    assert classes(7) == classes(7)
    assert collections.Counter(op for ops in classes(7) for op in ops)
