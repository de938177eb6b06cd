"""Shared fixtures: the real AWS vectors, and simulators at an injected time."""

from __future__ import annotations

import datetime
import shutil
import tempfile
from collections.abc import Iterator
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
def shm() -> Iterator[Path]:
    """A fresh directory on tmpfs (/dev/shm), removed afterwards; skipped where /dev/shm is
    not a tmpfs."""
    from keyutil.output import TMPFS_MAGIC, filesystem_magic

    if not Path("/dev/shm").is_dir() or filesystem_magic("/dev/shm") != TMPFS_MAGIC:
        pytest.skip("/dev/shm is not a tmpfs here")
    directory = Path(tempfile.mkdtemp(prefix="keyutil-test-", dir="/dev/shm"))
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def sim_dir(tmp_path: Path) -> Path:
    return tmp_path / "sim"


@pytest.fixture(scope="session")
def age_cli() -> None:
    """The stock age CLI (and age-keygen), a real peer of the sealing tests: missing is a
    failure, not a skip, since scripts/test.sh installs it."""
    import shutil

    if shutil.which("age") is None or shutil.which("age-keygen") is None:
        pytest.fail("the age CLI is not installed: scripts/test.sh installs it (apt-get install age)")
