"""The KMS trusts its state directory only when nobody else could have planted it (issue 14.1).

Whoever can write ``root-secret`` and ``identity.pem`` before the KMS reads them knows every
application's keys and can sign answers: a state directory or file reached through a symlink,
owned by another uid, or writable by others is refused with ``state_invalid``, naming the
path and the problem; so is a directory that holds one of the two files only.
"""

from __future__ import annotations

import errno
import logging
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from mock_kms.cli import cli
from mock_kms.errors import ErrorCode, UnavailableError
from mock_kms.service import AuditLog
from mock_kms.state import IDENTITY_FILE, ROOT_SECRET_FILE, KmsState

OTHER_UID = 54321
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="chown to another uid needs root")


def refused(directory: Path) -> str:
    with pytest.raises(UnavailableError) as err:
        KmsState.load_or_create(directory)
    assert err.value.code == ErrorCode.STATE_INVALID
    return err.value.message


@pytest.fixture
def state(tmp_path: Path) -> Path:
    KmsState.load_or_create(tmp_path / "s")
    return tmp_path / "s"


def test_state_directory_through_a_symlink_is_refused(state: Path, tmp_path: Path) -> None:
    (tmp_path / "link").symlink_to(state)
    message = refused(tmp_path / "link")
    assert message == f"{tmp_path / 'link'} is a symbolic link; give the real directory"


@pytest.mark.parametrize("name", [ROOT_SECRET_FILE, IDENTITY_FILE])
def test_a_state_file_that_is_a_symlink_is_refused(state: Path, tmp_path: Path, name: str) -> None:
    planted = tmp_path / "planted"
    (state / name).rename(planted)
    (state / name).symlink_to(planted)
    assert (
        refused(state)
        == f"{state / name} is a symbolic link; the state files must be regular files"
    )


@as_root
def test_a_state_directory_of_another_uid_is_refused(state: Path) -> None:
    os.chown(state, OTHER_UID, -1)
    assert refused(state) == f"{state} is owned by uid {OTHER_UID}, not by this KMS's uid 0"


@as_root
@pytest.mark.parametrize("name", [ROOT_SECRET_FILE, IDENTITY_FILE])
def test_a_state_file_of_another_uid_is_refused(state: Path, name: str) -> None:
    os.chown(state / name, OTHER_UID, -1)
    assert refused(state) == f"{state / name} is owned by uid {OTHER_UID}, not by this KMS's uid 0"


@pytest.mark.parametrize("mode", [0o770, 0o702, 0o777])
def test_a_state_directory_writable_by_others_is_refused(state: Path, mode: int) -> None:
    state.chmod(mode)
    assert refused(state) == (
        f"{state} is writable by group or others (mode {mode:o}); expected 0700"
    )


def test_a_planted_directory_created_group_writable_is_refused(tmp_path: Path) -> None:
    """Created by someone else before the KMS first starts: never filled, refused."""
    (tmp_path / "s").mkdir(mode=0o777)
    (tmp_path / "s").chmod(0o777)
    assert "writable by group or others" in refused(tmp_path / "s")
    assert not (tmp_path / "s" / ROOT_SECRET_FILE).exists()


@pytest.mark.parametrize(
    ("missing", "present"), [(ROOT_SECRET_FILE, IDENTITY_FILE), (IDENTITY_FILE, ROOT_SECRET_FILE)]
)
def test_one_state_file_missing_is_refused_not_replaced(
    state: Path, missing: str, present: str
) -> None:
    (state / missing).unlink()
    message = refused(state)
    assert message.startswith(f"{state / missing} is missing while {present} is there")
    assert not (state / missing).exists()


def test_a_new_state_is_logged_at_info_with_its_identity(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="mock_kms.state"):
        state = KmsState.load_or_create(tmp_path / "s")
        KmsState.load_or_create(tmp_path / "s")  # reused: not logged again
    created = [r for r in caplog.records if "new KMS state" in r.getMessage()]
    assert len(created) == 1 and created[0].levelno == logging.INFO
    assert state.identity_text in created[0].getMessage()
    assert str(tmp_path / "s") in created[0].getMessage()


def test_identity_refuses_a_symlinked_state_dir_in_one_line(state: Path, tmp_path: Path) -> None:
    (tmp_path / "link").symlink_to(state)
    result = CliRunner().invoke(cli, ["identity", "--state-dir", str(tmp_path / "link")])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        f"mock-kms: state_invalid: {tmp_path / 'link'} is a symbolic link; give the real directory"
    ]


@pytest.mark.parametrize("command", ["identity", "serve"])
def test_an_empty_state_dir_is_a_usage_error(command: str) -> None:
    result = CliRunner().invoke(cli, [command, "--state-dir", ""])
    assert result.exit_code == 2
    assert "--state-dir" in result.output and "empty" in result.output


def test_the_audit_log_is_never_opened_through_a_symlink(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere.log"
    target.write_bytes(b"")
    (tmp_path / "audit.log").symlink_to(target)
    with pytest.raises(OSError) as err:
        AuditLog(tmp_path / "audit.log")
    assert err.value.errno == errno.ELOOP
    assert "is a symbolic link" in str(err.value.strerror)
    assert target.read_bytes() == b""
