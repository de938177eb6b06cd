"""``mock-kms``: the KMS's command line.

    $ mock-kms verify-attestation tests/vectors/aws-nondebug-2022-10-13.cose \\
          --at 2022-10-13T08:58:03Z --json

Results go to stdout, logs and human errors to stderr. Exit codes are stable:
0 valid, 1 invalid (the error code says why), 2 usage error.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import datetime
import json
import logging
import os
import re
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from mock_kms.config import LIMITS
from mock_kms.errors import ErrorCode, InvalidError, KmsError

if TYPE_CHECKING:
    from mock_kms.verifier import AttestationVerifier

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
    when = at or datetime.datetime.now(datetime.UTC)
    try:
        raw = _read_input(file)
        verifier = _make_verifier(roots, "--root", no_aws_root, max_age, allow_debug)
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


def _default_state_dir() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "mock-kms"


state_dir_option = click.option(
    "--state-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=_default_state_dir,
    show_default="$XDG_STATE_HOME/mock-kms",
    envvar="MOCK_KMS_STATE_DIR",
    help="Root secret and identity key (created 0700/0600 on first start, then reused).",
)


@cli.command()
@state_dir_option
def identity(state_dir: Path) -> None:
    """Print the KMS identity public key, as 'keyutil get-key --kms-pubkey' takes it.

    Creates the state directory (root secret and identity key) if it is new, so the
    identity can be baked into an enclave image before the KMS first starts.
    """
    from mock_kms.state import KmsState

    try:
        click.echo(KmsState.load_or_create(state_dir).identity_text)
    except KmsError as e:
        click.echo(f"mock-kms: {e.code}: {e.message}", err=True)
        sys.exit(EXIT_INVALID)


@cli.command()
@click.option("--host", default="127.0.0.1", envvar="MOCK_KMS_HOST", help="Address to listen on.")
@click.option(
    "--port", type=click.IntRange(0, 65535), default=8420, envvar="MOCK_KMS_PORT", help="TCP port."
)
@click.option(
    "--unix-socket",
    type=click.Path(dir_okay=False),
    envvar="MOCK_KMS_UNIX_SOCKET",
    help="Listen on this unix socket (mode 0600) instead of TCP.",
)
@state_dir_option
@click.option(
    "--rpc-url",
    envvar="MOCK_KMS_RPC_URL",
    help="JSON-RPC node of an external chain. Default: the embedded in-process chain.",
)
@click.option("--contract", envvar="MOCK_KMS_CONTRACT", help="Allowlist contract address.")
@click.option(
    "--chain-id", type=int, envvar="MOCK_KMS_CHAIN_ID", help="Expected chain id (with --rpc-url)."
)
@click.option(
    "--confirmations",
    type=click.IntRange(min=0),
    default=0,
    envvar="MOCK_KMS_CONFIRMATIONS",
    help="Read the allowlist at latest minus this many blocks.",
)
@click.option(
    "--revocation-delay",
    type=click.FloatRange(0, 60),
    default=2.0,
    envvar="MOCK_KMS_REVOCATION_DELAY",
    help="Longest time an allowlist answer is cached (seconds).",
)
@click.option(
    "--rpc-timeout",
    type=click.FloatRange(0.1, 60),
    default=2.0,
    envvar="MOCK_KMS_RPC_TIMEOUT",
    help="Timeout of one RPC request (seconds).",
)
@click.option(
    "--allow-image",
    "allow_images",
    multiple=True,
    envvar="MOCK_KMS_ALLOW_IMAGE",
    help="HASH=APP: register an image on the embedded chain at start. Repeatable.",
)
@click.option(
    "--trust-root",
    "trust_roots",
    multiple=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    envvar="MOCK_KMS_TRUST_ROOT",
    help="Also trust the roots in this PEM (e.g. the simulator's root.pem). Repeatable.",
)
@click.option(
    "--no-aws-root", is_flag=True, envvar="MOCK_KMS_NO_AWS_ROOT", help="Do not trust the AWS root."
)
@click.option(
    "--allow-debug",
    is_flag=True,
    envvar="MOCK_KMS_ALLOW_DEBUG",
    help="UNSAFE: release keys to debug-mode enclaves (logged at start and on every use).",
)
@click.option(
    "--max-age",
    type=click.FloatRange(min=1),
    default=60.0,
    envvar="MOCK_KMS_MAX_AGE",
    help="Refuse attestation documents older than this (seconds).",
)
@click.option(
    "--nonce-lifetime",
    type=click.FloatRange(1, 600),
    default=30.0,
    envvar="MOCK_KMS_NONCE_LIFETIME",
    help="How long a challenge nonce stays valid (seconds).",
)
@click.option(
    "--audit-log",
    type=click.Path(dir_okay=False, path_type=Path),
    envvar="MOCK_KMS_AUDIT_LOG",
    help="Append one JSON line per decision here (never key material).",
)
@click.option(
    "--threads",
    type=click.IntRange(1, 256),
    default=8,
    envvar="MOCK_KMS_THREADS",
    help="Worker threads.",
)
@click.option(
    "--idle-timeout",
    type=click.IntRange(1, 3600),
    default=30,
    envvar="MOCK_KMS_IDLE_TIMEOUT",
    help="Close a connection after this many seconds without a byte either way.",
)
@click.option(
    "--request-timeout",
    type=click.FloatRange(0.1, 600),
    default=10.0,
    envvar="MOCK_KMS_REQUEST_TIMEOUT",
    help="Close a connection whose request is not whole this many seconds after its first byte.",
)
@click.option(
    "--workers",
    type=click.IntRange(1, 256),
    default=lambda: _usable_cpus(),
    show_default="usable CPUs",
    envvar="MOCK_KMS_WORKERS",
    help="Processes accepting on the one listening address, each with --threads threads.",
)
@click.option(
    "--replay-store",
    envvar="MOCK_KMS_REPLAY_STORE",
    help="Where used challenges are remembered: sqlite (STATE_DIR/replay.sqlite3, shared by "
    "workers and restarts), sqlite:///PATH, or redis://HOST:PORT/DB (shared by replicas).",
)
@click.option(
    "--header-timeout",
    type=click.FloatRange(0.1, 600),
    default=5.0,
    envvar="MOCK_KMS_HEADER_TIMEOUT",
    help="Close a connection whose request head is not whole this many seconds after its "
    "first byte.",
)
@click.option(
    "--keepalive-timeout",
    type=click.FloatRange(0.1, 3600),
    default=5.0,
    envvar="MOCK_KMS_KEEPALIVE_TIMEOUT",
    help="Close a connection that waits this many seconds between requests.",
)
@click.option(
    "--max-connections-per-peer",
    type=click.IntRange(1, 200),
    default=32,
    envvar="MOCK_KMS_MAX_CONNECTIONS_PER_PEER",
    help="Connections one TCP peer address may hold, per worker (the rest are closed).",
)
def serve(
    host: str,
    port: int,
    unix_socket: str | None,
    state_dir: Path,
    rpc_url: str | None,
    contract: str | None,
    chain_id: int | None,
    confirmations: int,
    revocation_delay: float,
    rpc_timeout: float,
    allow_images: Sequence[str],
    trust_roots: Sequence[Path],
    no_aws_root: bool,
    allow_debug: bool,
    max_age: float,
    nonce_lifetime: float,
    audit_log: Path | None,
    threads: int,
    idle_timeout: int,
    request_timeout: float,
    workers: int,
    replay_store: str | None,
    header_timeout: float,
    keepalive_timeout: float,
    max_connections_per_peer: int,
) -> None:
    """Serve attested key release over HTTP (loopback by default).

    \b
    With no --rpc-url the allowlist contract runs on an embedded in-process chain, which
    keeps nothing across restarts: register images with --allow-image HASH=APP at start.
    With --rpc-url (and --contract, --chain-id) governance registers images on that chain
    with kms-gov, and --allow-image is refused.

    \b
    Example (development, NSM simulator):
      keyutil sim init /tmp/sim
      mock-kms serve --trust-root /tmp/sim/root.pem \\
          --allow-image "$(jq -r .os_image_hash /tmp/sim/enclave.json)=my-app"
    """
    from mock_kms.replay import open_replay_store
    from mock_kms.server import ServerSettings, listen
    from mock_kms.service import AuditLog, ReleaseService, ReleaseSettings
    from mock_kms.state import KmsState

    try:
        state = KmsState.load_or_create(state_dir)
        allowlist = _make_allowlist(
            rpc_url, contract, chain_id, confirmations, revocation_delay, rpc_timeout, allow_images
        )
        verifier = _make_verifier(trust_roots, "--trust-root", no_aws_root, max_age, allow_debug)
        audit = AuditLog(audit_log)
        store = open_replay_store(replay_store, state_dir)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--replay-store") from None
    except OSError as e:
        click.echo(f"mock-kms: cannot open the audit log: {e.strerror}", err=True)
        sys.exit(EXIT_INVALID)
    except KmsError as e:
        click.echo(f"mock-kms: {e.code}: {e.message}", err=True)
        sys.exit(EXIT_INVALID)
    service = ReleaseService(
        verifier=verifier,
        allowlist=allowlist,
        state=state,
        settings=ReleaseSettings(nonce_lifetime=nonce_lifetime),
        audit=audit,
        replay_store=store,
    )
    settings = ServerSettings(
        host=host,
        port=port,
        unix_socket=unix_socket,
        threads=threads,
        channel_timeout=idle_timeout,
        request_timeout=request_timeout,
        header_timeout=header_timeout,
        keepalive_timeout=keepalive_timeout,
        max_connections_per_peer=max_connections_per_peer,
    )
    try:
        sock = listen(settings)
    except OSError as e:
        click.echo(f"mock-kms: cannot listen: {e.strerror}", err=True)
        sys.exit(EXIT_INVALID)
    name = sock.getsockname()
    where = f"unix:{unix_socket}" if unix_socket else f"http://{host}:{name[1]}"
    logger = logging.getLogger("mock_kms")
    logger.warning(
        "mock-kms serving on %s with %d worker(s), replay store %s, identity %s",
        where, workers, store.description, state.identity_text,
    )
    if allow_debug:
        logger.warning("UNSAFE: --allow-debug: keys will be released to debug-mode enclaves")
    _serve_workers(service, settings, sock, workers)
    logger.warning("mock-kms stopping")


def _serve_workers(service: Any, settings: Any, sock: Any, workers: int) -> None:
    """Serve on ``sock``: in this process, or in ``workers`` forked ones with metrics summed
    across them (prometheus_client's multiprocess files in a private directory)."""
    import shutil
    import tempfile

    from mock_kms.server import KmsApp, create_server
    from mock_kms.workers import run_workers

    def serve_one(index: int, metrics_dir: str | None = None) -> None:
        service.nonces.store.close()  # a forked worker opens its own connections
        server = create_server(
            KmsApp(service, max_body=settings.max_body, metrics_dir=metrics_dir), settings, sock
        )
        # SIGTERM stops the loop the way Ctrl-C does; closing the sockets from inside the
        # handler would pull them from under the select() that run() is blocked in.
        signal.signal(signal.SIGTERM, _interrupt)
        try:
            server.run()  # returns (waitress swallows the interrupt) or raises it
        except KeyboardInterrupt:
            pass
        finally:
            server.close()

    try:
        if workers == 1:
            serve_one(0)
            return
        metrics_dir = tempfile.mkdtemp(prefix="mock-kms-metrics-")
        try:
            run_workers(workers, lambda index: serve_one(index, metrics_dir))
        finally:
            shutil.rmtree(metrics_dir, ignore_errors=True)
    finally:
        sock.close()
        if settings.unix_socket:
            with contextlib.suppress(OSError):
                os.unlink(settings.unix_socket)


def _usable_cpus() -> int:
    from mock_kms.workers import usable_cpus

    return usable_cpus()


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _make_verifier(
    root_files: Sequence[Path],
    option: str,
    no_aws_root: bool,
    max_age: float,
    allow_debug: bool,
) -> AttestationVerifier:
    """The AWS root (unless --no-aws-root) and the roots of ``root_files``."""
    from mock_kms.roots import load_pem_roots
    from mock_kms.verifier import AttestationPolicy, AttestationVerifier

    extra = [cert for path in root_files for cert in load_pem_roots(path)]
    policy = AttestationPolicy(max_age=datetime.timedelta(seconds=max_age), allow_debug=allow_debug)
    if not no_aws_root:
        return AttestationVerifier.aws(policy=policy, extra_roots=extra)
    if not extra:
        raise click.UsageError(f"--no-aws-root needs at least one {option}")
    return AttestationVerifier(trusted_roots=extra, policy=policy)


def _make_allowlist(
    rpc_url: str | None,
    contract: str | None,
    chain_id: int | None,
    confirmations: int,
    revocation_delay: float,
    rpc_timeout: float,
    allow_images: Sequence[str],
) -> Any:
    from mock_kms.allowlist import (
        EmbeddedAllowlist,
        ReaderSettings,
        RpcAllowlist,
        parse_allow_image,
    )

    images = [parse_allow_image(text) for text in allow_images]
    if rpc_url is None:
        if contract is not None:
            raise click.UsageError("--contract goes with --rpc-url")
        allowlist = EmbeddedAllowlist.create(images)
        for image, app in images:
            logging.getLogger("mock_kms").warning(
                "embedded chain: image 0x%s registered for application 0x%s", image.hex(), app.hex()
            )
        return allowlist
    if images:
        raise click.UsageError(
            "--allow-image registers on the embedded chain only; with --rpc-url, register "
            "images with kms-gov add-image"
        )
    if contract is None or chain_id is None:
        raise click.UsageError("--rpc-url needs --contract and --chain-id")
    reader = RpcAllowlist.from_url(
        rpc_url,
        contract,
        expected_chain_id=chain_id,
        settings=ReaderSettings(
            confirmations=confirmations, rpc_timeout=rpc_timeout, max_staleness=revocation_delay
        ),
    )
    try:
        reader.check_ready()
    except KmsError as e:
        # Start anyway (fail closed: not ready, every release refused) so a KMS that starts
        # before its node becomes ready by itself; say why now.
        logging.getLogger("mock_kms").error("chain not ready at start: %s", e.message)
    return reader


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
