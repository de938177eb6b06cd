"""A short, seeded run of the sealed-input fuzz targets (fuzz/sealed.py): no crash, no
accepted mutant, and proof that the mutations reached every refusal behind the parser."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_fuzz_smoke import assert_clean, run

from fuzz.sealed import DotenvTarget, RecipientTarget, SealedTarget
from fuzz.targets import make_target
from keyutil.sealing import age


def test_sealed_smoke(tmp_path: Path) -> None:
    recorder = run(SealedTarget(), 4000, tmp_path)
    assert_clean(recorder)
    refused = {key.split(":", 1)[1] for key in recorder.codes if key.startswith("refused:")}
    assert {"sealed_header_invalid", "sealed_header_altered", "sealed_not_for_key",
            "sealed_truncated", "sealed_altered", "sealed_trailing_data"} <= refused
    for op in ("line_swap", "line_drop", "base64_char", "chunk_swap", "chunk_drop",
               "chunk_double", "byte_flip", "truncate", "insert"):
        assert recorder.ops[op] > 0, op
    assert recorder.kinds["accepted"] > 0  # no-op mutants: the acceptance oracle ran


def test_dotenv_smoke(tmp_path: Path) -> None:
    recorder = run(DotenvTarget(), 4000, tmp_path)
    assert_clean(recorder)
    assert recorder.kinds["refused"] > 500 and recorder.kinds["accepted"] > 500


def test_recipient_statement_smoke(tmp_path: Path) -> None:
    recorder = run(RecipientTarget(), 4000, tmp_path)
    assert_clean(recorder)
    assert recorder.codes["refused:recipient_unauthenticated"] > 1000
    assert recorder.codes["refused:recipient_mismatch"] > 50  # the replayed statement
    assert recorder.kinds["accepted"] > 100  # unsigned extras only


def test_the_oracle_catches_a_statement_check_that_skips_the_name(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    target = RecipientTarget()
    assert target.check(dict(target.other), ["replay"]).code == "recipient_mismatch"
    import fuzz.sealed

    lenient = fuzz.sealed.verify_statement

    def skip_name(*args: object, **kw: object) -> object:
        return lenient(*args, **{**kw, "name": "weights2"})  # type: ignore[arg-type]

    monkeypatch.setattr(fuzz.sealed, "verify_statement", skip_name)
    assert target.check(dict(target.other), ["replay"]).kind == "accepted_mutant"


def test_the_oracle_catches_an_opener_that_skips_the_header_mac() -> None:
    target = SealedTarget()
    seed = target.seeds[2]
    def mac_line(blob: bytes) -> bytes:
        start = blob.index(b"\n---") + 1
        return blob[start : blob.index(b"\n", start)]

    # Another file's MAC: well-formed, wrong.
    tampered = seed.sealed.replace(mac_line(seed.sealed), mac_line(target.seeds[0].sealed))
    assert target.check(tampered, ["by_hand"], seed).code == "sealed_header_altered"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(age.Header, "check_mac", lambda self, key: None)
        found = target.check(tampered, ["by_hand"], seed)
    assert found.kind == "accepted_mutant"


def test_run_knows_the_sealed_targets() -> None:
    assert isinstance(make_target("sealed"), SealedTarget)
    assert isinstance(make_target("dotenv"), DotenvTarget)
    assert isinstance(make_target("recipient"), RecipientTarget)
