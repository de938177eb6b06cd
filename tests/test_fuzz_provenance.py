"""A seeded smoke run of the ``provenance`` fuzz target (fuzz/provenance_target.py): no crash,
no accepted mutant, and proof that it reached the checks behind each signature."""

from __future__ import annotations

import collections

from fuzz.mutate import RandomChooser
from fuzz.provenance_target import ProvenanceTarget

SEED = 20261201
RUNS = 3000


def test_provenance_target_smoke_run_is_clean_and_deep() -> None:
    target = ProvenanceTarget()
    chooser = RandomChooser(SEED)
    kinds: collections.Counter[str] = collections.Counter()
    codes: collections.Counter[str] = collections.Counter()
    bad = []
    for _ in range(RUNS):
        execution = target.one(chooser)
        kinds[execution.kind] += 1
        codes[execution.code] += 1
        if execution.kind not in ("refused", "accepted"):
            bad.append((execution.kind, execution.code, execution.ops, execution.data[:300],
                        execution.detail))
    assert not bad, bad[:3]
    # Deep: refusals came from the form, the Ed25519 signature and the EIP-712 part, and some
    # mutants (a changed case of an address, a re-signed identical body) were accepted.
    for code in ("statement_malformed", "statement_unauthenticated",
                 "signer_signature_invalid"):
        assert codes[code] > 0, codes
    assert kinds["accepted"] > 0, kinds


def test_a_seed_itself_is_accepted() -> None:
    import json

    target = ProvenanceTarget()
    seed = target.seeds[0]
    execution = target.check(json.dumps(seed).encode(), [], json.dumps(seed, sort_keys=True))
    assert execution.kind == "accepted"


def test_the_target_is_registered_for_fuzz_run() -> None:
    from fuzz.targets import make_target

    assert make_target("provenance").name == "provenance"
