"""``mock-kms``: the KMS's command line.

    $ mock-kms verify-attestation tests/vectors/aws-nondebug-2022-10-13.cose \\
          --at 2022-10-13T08:58:03Z --json

Results go to stdout, logs and human errors to stderr. Exit codes are stable:
0 valid, 1 invalid (the error code says why), 2 usage error.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import json
import logging
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click

from mock_kms.config import LIMITS
from mock_kms.errors import ErrorCode, InvalidError, KmsError

EXIT_OK = 0
EXIT_INVALID = 1
EXIT_USAGE = 2

_HEX_TEXT = re.compile(rb"\A(?:0x)?[0-9a-fA-F\s]+\Z")
_B64_TEXT = re.compile(rb"\A[A-Za-z0-9+/=_\-\s]+\Z")


def decode_document_input(data: bytes) -> bytes:
    """Raw COSE bytes, hex or base64 (detected) to raw bytes."""
    # A COSE_Sign1 starts with an array of 4 (0x84) or tag 18 (0xd2): neither is text.
    if data[:1] in (b"\x84", b"\xd2"):
        return data
    text = data.strip()
    if len(text) > 4 * LIMITS.max_document_size:
        raise InvalidError(
            ErrorCode.INPUT_TOO_LARGE,
            f"expected at most {LIMITS.max_document_size} bytes of document; "
            f"found {len(text)} characters",
        )
    if text and _HEX_TEXT.match(text):
        digits = re.sub(rb"\s+", b"", text.removeprefix(b"0x"))
        try:
            return bytes.fromhex(digits.decode())
        except ValueError:
            pass  # odd length: maybe base64 after all
    if text and _B64_TEXT.match(text):
        compact = re.sub(rb"\s+", b"", text)
        try:
            if b"-" in compact or b"_" in compact:
                return base64.urlsafe_b64decode(compact + b"=" * (-len(compact) % 4))
            return base64.b64decode(compact + b"=" * (-len(compact) % 4), validate=True)
        except (binascii.Error, ValueError):
            pass
    raise InvalidError(
        ErrorCode.INPUT_ENCODING,
        "expected raw COSE_Sign1 bytes, hex or base64; found none of these",
    )


def parse_time(value: str) -> datetime.datetime:
    """Epoch seconds, epoch milliseconds (13 digits or more) or ISO 8601, as aware UTC."""
    text = value.strip()
    if re.fullmatch(r"\d+(\.\d+)?", text):
        number = float(text)
        if "." not in text and len(text) >= 13:
            number /= 1000
        return datetime.datetime.fromtimestamp(number, datetime.UTC)
    try:
        parsed = datetime.datetime.fromisoformat(text)
    except ValueError:
        raise click.BadParameter(
            f"expected epoch seconds, epoch milliseconds or ISO 8601; found {value!r}"
        ) from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=datetime.UTC)
    return parsed.astimezone(datetime.UTC)


def _time_option(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    if value is None or isinstance(value, datetime.datetime):
        return value
    return parse_time(str(value))


def _setup_logging(verbose: int) -> None:
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", force=True)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("-v", "--verbose", count=True, help="More logs on stderr (-v info, -vv debug).")
def cli(verbose: int) -> None:
    """The attestation-verifying KMS for AWS Nitro Enclaves (development and CI)."""
    _setup_logging(verbose)


@cli.command("verify-attestation")
@click.argument("file", type=click.Path(dir_okay=False, allow_dash=True, path_type=str))
@click.option(
    "--at",
    "at",
    callback=_time_option,
    default=None,
    envvar="MOCK_KMS_VERIFY_AT",
    help="Verification time: epoch seconds, epoch ms or ISO 8601. Default: now.",
)
@click.option(
    "--root",
    "roots",
    multiple=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Also trust the roots in this PEM file (e.g. the simulator's root.pem). Repeatable.",
)
@click.option(
    "--no-aws-root",
    is_flag=True,
    help="Do not trust the embedded AWS Nitro Root-G1 (only the --root files).",
)
@click.option(
    "--allow-debug",
    is_flag=True,
    help="UNSAFE: accept debug-mode enclaves (all-zero PCR0..2), readable by the host.",
)
@click.option(
    "--max-age",
    type=click.FloatRange(min=0),
    default=LIMITS.max_document_age.total_seconds(),
    show_default=True,
    envvar="MOCK_KMS_MAX_AGE",
    help="Refuse documents older than this many seconds at the verification time.",
)
@click.option("--json", "as_json", is_flag=True, help="One JSON object on stdout.")
def verify_attestation(
    file: str,
    at: datetime.datetime | None,
    roots: Sequence[Path],
    no_aws_root: bool,
    allow_debug: bool,
    max_age: float,
    as_json: bool,
) -> None:
    """Verify an AWS Nitro attestation document offline.

    FILE holds the document as raw COSE bytes, hex or base64 (detected); '-' reads stdin.
    Checks the COSE ES384 signature, the certificate chain to the AWS Nitro root (or
    --root), the document's age and the debug flag, then prints the measurements and
    OS_IMAGE_HASH = sha256(PCR0 || PCR1 || PCR2).

    \b
    Example (a real document, verified at the time it was made):
      mock-kms verify-attestation tests/vectors/aws-nondebug-2022-10-13.cose \\
          --at 2022-10-13T08:58:03Z --json

    Exit codes: 0 valid, 1 invalid (JSON {"error": CODE, "message": ...} with --json),
    2 usage error.
    """
    from mock_kms.roots import load_pem_roots
    from mock_kms.verifier import AttestationPolicy, AttestationVerifier

    when = at or datetime.datetime.now(datetime.UTC)
    try:
        raw = _read_input(file)
        extra = [cert for path in roots for cert in load_pem_roots(path)]
        policy = AttestationPolicy(
            max_age=datetime.timedelta(seconds=max_age), allow_debug=allow_debug
        )
        if no_aws_root:
            if not extra:
                raise click.UsageError("--no-aws-root needs at least one --root")
            verifier = AttestationVerifier(trusted_roots=extra, policy=policy)
        else:
            verifier = AttestationVerifier.aws(policy=policy, extra_roots=extra)
        verified = verifier.verify(decode_document_input(raw), at=when)
    except KmsError as e:
        if as_json:
            click.echo(json.dumps(e.to_json()))
        else:
            click.echo(f"invalid: {e.code}: {e.message}", err=True)
        sys.exit(EXIT_INVALID)

    result = verified.to_json()
    if as_json:
        click.echo(json.dumps(result))
        return
    click.echo(f"valid: attestation document from {result['module_id']}")
    click.echo(f"timestamp      {result['timestamp_iso']}")
    click.echo(f"digest         {result['digest']}")
    for index in ("0", "1", "2", "8"):
        if index in result["pcrs"]:
            click.echo(f"PCR{index:<11} {result['pcrs'][index]}")
    click.echo(f"os_image_hash  {result['os_image_hash']}")
    click.echo(f"debug          {str(result['debug']).lower()}")
    for field in ("public_key", "user_data", "nonce"):
        value = result[field]
        shown = "null" if value is None else f"{len(value) // 2} bytes"
        click.echo(f"{field:<14} {shown}")


def _read_input(file: str) -> bytes:
    limit = 4 * LIMITS.max_document_size + 1
    if file == "-":
        data = sys.stdin.buffer.read(limit)
    else:
        try:
            with open(file, "rb") as f:
                data = f.read(limit)
        except OSError as e:
            raise click.UsageError(f"cannot read {file}: {e.strerror}") from None
    if len(data) >= limit:
        raise InvalidError(
            ErrorCode.INPUT_TOO_LARGE,
            f"expected a document of at most {LIMITS.max_document_size} bytes; the input is larger",
        )
    if not data:
        raise InvalidError(ErrorCode.INPUT_ENCODING, "expected a document; the input is empty")
    return data


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point; ``argv`` lets tests call the CLI in-process."""
    cli.main(
        args=list(argv) if argv is not None else None,
        prog_name="mock-kms",
        auto_envvar_prefix="MOCK_KMS",
    )


if __name__ == "__main__":  # pragma: no cover
    main()
