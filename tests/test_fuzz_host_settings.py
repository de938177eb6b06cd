"""A seeded smoke run of the ``host_settings`` fuzz target (fuzz/host_settings.py): the
settings a hostile host offers `keyutil run` never crash it, never differ from the
reference, and the run reached both outcomes."""

from __future__ import annotations

import collections
from pathlib import Path

from fuzz.host_settings import HostSettingsTarget, reference
from fuzz.mutate import RandomChooser
from fuzz.record import Recorder

SEED = 20261201
RUNS = 1500


def test_host_settings_smoke_run_is_clean_and_reaches_both_outcomes(tmp_path: Path) -> None:
    recorder = Recorder(tmp_path / "findings")
    chooser = RandomChooser(SEED)
    target = HostSettingsTarget()
    for _ in range(RUNS):
        recorder.add(target.one(chooser))
    report = recorder.report()
    bad = {k: report[k] for k in ("crashes", "accepted_mutants", "refused_valid",
                                  "harness_errors")}
    assert bad == dict.fromkeys(bad, 0), (report["finding_signatures"], report["saved"])
    codes = collections.Counter(recorder.codes)
    assert codes["accepted:accepted"] > 0 and codes["refused:invalid"] > 0, codes


def test_the_reference_reads_the_last_duplicate_and_refuses_an_array() -> None:
    assert reference(b'{"LOG_LEVEL": "a", "LOG_LEVEL": "b", "PATH": "/x"}') == {
        "LOG_LEVEL": "b"
    }
    assert reference(b'{"LOG_LEVEL": "a", "LOG_LEVEL": 3}') == {}
    assert reference(b'[["LOG_LEVEL", "a"]]') is None
    assert reference(b"[" * 5000) is None
    assert reference(b"[]") is None
    assert reference(b"{}") == {}
