"""Shared fixtures: the real AWS vectors, and simulators at an injected time."""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest

# anvil, cast and the embedded chain; real `mock-kms serve` and `keyutil` processes
pytest_plugins = ["chain_fixtures", "e2e_support"]

VECTORS = Path(__file__).parent / "vectors"


def vector(name: str) -> bytes:
    return (VECTORS / name).read_bytes()


def ms(timestamp_ms: int) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(timestamp_ms / 1000, datetime.UTC)


@pytest.fixture
def sim_dir(tmp_path: Path) -> Path:
    return tmp_path / "sim"
