"""bench/bench_overhead.py runs end to end (a short run): every row is measured, from real
processes, and reported with its ratio to the floor."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

BENCH = Path(__file__).parents[1] / "bench" / "bench_overhead.py"


def test_a_short_run_reports_every_row() -> None:
    result = subprocess.run(
        [sys.executable, str(BENCH), "--releases", "60", "--rounds", "1",
         "--floor-seconds", "0.2", "--json"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    rows = report["rows"]
    assert list(rows) == [
        "app", "app, memory store", "app, TCP between", "app, idle between",
        "server", "server --quiet", "server --quiet, memory store",
    ]
    assert 0.1 < report["floor_ms"] < 20
    for name, row in rows.items():
        # At least the floor's crypto, measured in the app or the server process.
        assert row["cpu_ms_per_release"] > 0.5 * report["floor_ms"], name
        assert row["floor_over_cpu"] == pytest.approx(
            report["floor_ms"] / row["cpu_ms_per_release"]
        )
    assert rows["app"]["over_app"] == 1.0
