"""A seeded smoke run of the ``host_settings`` fuzz target (fuzz/host_settings.py): the
settings a hostile host offers `keyutil run` never crash it, never differ from the
reference, and the run reached both outcomes."""

from __future__ import annotations

from pathlib import Path

from test_fuzz_smoke import assert_clean, run

from fuzz.host_settings import HostSettingsTarget, reference
from fuzz.targets import make_target


def test_host_settings_smoke_run_is_clean_and_reaches_both_outcomes(tmp_path: Path) -> None:
    recorder = run(make_target("host_settings"), 1500, tmp_path)
    assert_clean(recorder)
    assert recorder.kinds["accepted"] > 0 and recorder.kinds["refused"] > 0
    assert recorder.ops["nest"] > 0


def test_the_reference_reads_the_last_duplicate_and_refuses_an_array() -> None:
    assert reference(b'{"LOG_LEVEL": "a", "LOG_LEVEL": "b", "PATH": "/x"}') == {
        "LOG_LEVEL": "b"
    }
    assert reference(b'{"LOG_LEVEL": "a", "LOG_LEVEL": 3}') == {}
    assert reference(b'[["LOG_LEVEL", "a"]]') is None
    assert reference(b"[" * 5000) is None
    assert reference(b"[]") is None
    assert reference(b"{}") == {}
    assert isinstance(make_target("host_settings"), HostSettingsTarget)
