"""A seeded smoke run of the ``logwire`` fuzz target (fuzz/logwire.py): hostile bytes from
an enclave never crash ``keyutil logs``, never disagree with the reference reader, never
reach the terminal as control characters; and the run reached every refusal."""

from __future__ import annotations

import collections
from pathlib import Path

from fuzz.logwire import LogWireTarget, reference
from fuzz.mutate import RandomChooser
from fuzz.record import Recorder
from keyutil.logwire import HELLO, encode_line

SEED = 20261201
RUNS = 4000


def test_logwire_smoke_run_is_clean_and_reaches_every_refusal(tmp_path: Path) -> None:
    recorder = Recorder(tmp_path / "findings")
    chooser = RandomChooser(SEED)
    target = LogWireTarget()
    for _ in range(RUNS):
        recorder.add(target.one(chooser))
    report = recorder.report()
    bad = {k: report[k] for k in ("crashes", "accepted_mutants", "refused_valid",
                                  "harness_errors")}
    assert bad == dict.fromkeys(bad, 0), (report["finding_signatures"], report["saved"])
    codes = collections.Counter(recorder.codes)
    assert codes["accepted:accepted"] > 0, codes
    for code in ("bad_magic", "bad_kind", "bad_stream", "bad_reserved", "too_long",
                 "bad_length", "bad_time"):
        assert codes[f"refused:{code}"] > 0, codes


def test_the_reference_itself_reads_a_valid_stream() -> None:
    data = HELLO + encode_line("stderr", 2.5, "x")
    assert reference(data) == ([("line", "stderr", 2500, "x")], None)
    assert reference(data[:-1]) == ([], None)
    assert reference(b"KLOG") == ([], None)
    assert reference(b"XLOG") == ([], "bad_magic")
