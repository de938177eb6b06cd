"""Where keys are written, against a local attacker (issue 14, items 5, 6 and 15).

- the directory is opened once and everything is relative to that descriptor: a symlink
  flipped between the check and the write never lands a key on a persistent disk;
- ``keyutil attest --out`` uses the same writer: no predictable temporary, no planted symlink
  followed;
- several keys are written all or nothing;
- ``get-key --out /run/keys/app.key`` creates a missing ``/run/keys`` (0700) when the nearest
  existing ancestor is tmpfs or ramfs, and refuses otherwise (exit 7).
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from test_client import FakeKms, UnixServer, serve  # noqa: F401 (fixture)

from keyutil import output
from keyutil.cli import cli
from keyutil.client import ReleasedKey
from keyutil.output import (
    RAMFS_MAGIC,
    TMPFS_MAGIC,
    DirSink,
    FileSink,
    OutputError,
    filesystem_magic,
)
from keyutil.simulator import SimulatedNSM

SECRET = bytes(range(32))


def keys(*names: str) -> list[ReleasedKey]:
    return [ReleasedKey(n, bytearray(SECRET)) for n in names]



@pytest.fixture
def disk(tmp_path: Path) -> Path:
    if filesystem_magic(tmp_path) in (TMPFS_MAGIC, RAMFS_MAGIC):
        pytest.skip("tmp_path is on tmpfs here")
    return tmp_path


# -- 5. one directory descriptor --------------------------------------------------------------

FLIPPER = """
import os, sys, time
link, targets, end = sys.argv[1], sys.argv[2:4], time.monotonic() + float(sys.argv[4])
i = 0
while time.monotonic() < end:
    tmp = f"{link}.{i % 2}"
    os.symlink(targets[i % 2], tmp)
    os.replace(tmp, link)
    i += 1
"""


def test_a_flipping_symlink_never_lands_a_key_on_a_persistent_disk(shm: Path, disk: Path) -> None:
    """The review's race: a local user flips a symlink on the key's path between the
    file-system check and the write. A second process flips it as fast as it can."""
    (shm / "real" / "keys").mkdir(parents=True)
    (disk / "persistent" / "keys").mkdir(parents=True)
    link = shm / "link"
    link.symlink_to(shm / "real")
    flipper = subprocess.Popen(
        [
            sys.executable,
            "-c",
            FLIPPER,
            str(link),
            str(shm / "real"),
            str(disk / "persistent"),
            "15",
        ]
    )
    written = refused = 0
    try:
        started = time.monotonic() + 10
        while os.readlink(link) == str(shm / "real") and time.monotonic() < started:
            time.sleep(0.01)  # until the flipper runs (a loaded machine starts it late)
        end = time.monotonic() + 2
        i = 0
        while time.monotonic() < end:
            sink = FileSink(link / "keys" / f"k{i}")
            try:
                sink.check(["default"])
                sink.write(keys("default"))
                written += 1
            except OutputError as e:
                assert e.code in ("output_persistent", "output_unwritable"), e.message
                refused += 1
            i += 1
    finally:
        flipper.kill()
        flipper.wait()
    assert list((disk / "persistent" / "keys").iterdir()) == []
    assert written > 0 and refused > 0, (written, refused)  # both sides of the race were hit
    assert len(list((shm / "real" / "keys").iterdir())) == written


def test_the_write_goes_where_the_check_looked(shm: Path, disk: Path) -> None:
    """Swapped after the check: the key goes to the directory that was checked."""
    (shm / "keys").mkdir()
    sink = FileSink(shm / "keys" / "app.key")
    sink.check(["default"])
    (shm / "keys").rename(shm / "checked")
    (shm / "keys").symlink_to(disk)
    sink.write(keys("default"))
    assert (shm / "checked" / "app.key").read_bytes() == SECRET
    assert list(disk.iterdir()) == []


def test_a_symlinked_key_directory_is_refused(shm: Path) -> None:
    (shm / "real").mkdir()
    (shm / "link").symlink_to(shm / "real")
    for sink in (FileSink(shm / "link" / "app.key"), DirSink(shm / "link")):
        with pytest.raises(OutputError) as err:
            sink.check(["default"])
        assert err.value.code == "output_symlink"
        assert err.value.message == f"{shm / 'link'} is a symbolic link; give the real directory"


def test_attest_out_follows_no_planted_symlink(tmp_path: Path) -> None:
    sim = SimulatedNSM.init(tmp_path / "sim")
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    out = tmp_path / "doc.cose"
    # Where the old writer put its temporary file (.NAME.tmpPID; in-process, our pid).
    (tmp_path / f".doc.cose.tmp{os.getpid()}").symlink_to(victim)
    args = ["attest", "--nsm", "simulator", "--sim-dir", str(sim.directory), "--out", str(out)]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert victim.read_bytes() == b"precious"
    assert not out.is_symlink() and out.read_bytes()[:1] in (b"\x84", b"\xd2")
    assert stat.S_IMODE(out.stat().st_mode) == 0o644
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")) == []


def test_attest_out_into_a_symlinked_directory_is_exit_7(tmp_path: Path) -> None:
    sim = SimulatedNSM.init(tmp_path / "sim")
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    out = tmp_path / "link" / "doc.cose"
    args = ["attest", "--nsm", "simulator", "--sim-dir", str(sim.directory), "--out", str(out)]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 7
    assert "output_symlink" in result.output and list((tmp_path / "real").iterdir()) == []


# -- 6. all or nothing ------------------------------------------------------------------------


def test_out_dir_leaves_no_key_when_the_second_cannot_be_written(
    shm: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stage = output._stage

    def racing_stage(directory: Any, name: str, data: Any, mode: int) -> str:
        tmp = stage(directory, name, data, mode)
        if name == "b":  # a directory "b" appears after the checks: renaming over it fails
            (shm / "b").mkdir()
            (shm / "b" / "x").write_bytes(b"")
        return tmp

    monkeypatch.setattr(output, "_stage", racing_stage)
    sink = DirSink(shm)
    sink.check(["a", "b"])
    with pytest.raises(OutputError) as err:
        sink.write(keys("a", "b"))
    assert err.value.code == "output_unwritable"
    assert sorted(p.name for p in shm.iterdir()) == ["b"]  # no "a", no temporary


# -- 15. the key's directory ------------------------------------------------------------------


def test_missing_key_directories_on_tmpfs_are_created_0700(shm: Path) -> None:
    target = shm / "run" / "keys" / "app.key"
    FileSink(target).write(keys("default"))
    assert target.read_bytes() == SECRET
    for directory in (shm / "run", shm / "run" / "keys"):
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    DirSink(shm / "a" / "b").write(keys("disk"))
    assert (shm / "a" / "b" / "disk").read_bytes() == SECRET


def test_missing_key_directories_on_a_persistent_disk_are_refused(disk: Path) -> None:
    for allow in (False, True):
        with pytest.raises(OutputError) as err:
            FileSink(disk / "run" / "keys" / "app.key", allow_persistent=allow).check(["default"])
        assert err.value.code == "output_dir_missing"
        assert "created only on tmpfs or ramfs" in err.value.message
    assert list(disk.iterdir()) == []


@pytest.fixture
def nsm(tmp_path: Path) -> SimulatedNSM:
    return SimulatedNSM.init(tmp_path / "sim")


def test_get_key_creates_run_keys_on_tmpfs_and_exits_7_elsewhere(
    nsm: SimulatedNSM,
    serve: Callable[[Any], str],  # noqa: F811
    tmp_path: Path,
    shm: Path,
) -> None:
    kms = FakeKms(nsm.directory)
    url = serve(UnixServer(tmp_path / "kms.sock", kms.handle))
    base = ["get-key", "--kms", url, "--nsm", "simulator", "--sim-dir", str(nsm.directory)]
    base += ["--kms-pubkey", kms.pubkey]
    out = shm / "run" / "keys" / "app.key"
    result = CliRunner().invoke(cli, [*base, "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert out.read_bytes() == kms.secret("default", 32)
    if filesystem_magic(tmp_path) not in (TMPFS_MAGIC, RAMFS_MAGIC):
        calls = sum(kms.calls.values())
        result = CliRunner().invoke(cli, [*base, "--out", str(tmp_path / "run" / "k")])
        assert result.exit_code == 7 and "output_dir_missing" in result.output
        assert sum(kms.calls.values()) == calls  # refused before asking the KMS
