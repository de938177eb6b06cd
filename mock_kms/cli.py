"""``mock-kms``: the KMS's command line.

    $ mock-kms verify-attestation tests/vectors/aws-nondebug-2022-10-13.cose \\
          --at 2022-10-13T08:58:03Z --json

Results go to stdout, logs and human errors to stderr. Exit codes are stable:
0 valid (serve: stopped by SIGTERM), 1 invalid (the error code says why; serve: cannot
start), 2 usage error, 3 serve cannot listen, 130 interrupted (Ctrl-C).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import datetime
import errno
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

from keyutil.cliutil import EXIT_INTERRUPTED, option_envvars, run, version_option
from mock_kms.config import LIMITS
from mock_kms.errors import ErrorCode, InvalidError, KmsError

if TYPE_CHECKING:
    from mock_kms.verifier import AttestationVerifier

EXIT_OK = 0
EXIT_INVALID = 1
EXIT_USAGE = 2
EXIT_LISTEN = 3

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
    if re.fullmatch(r"\d+(\.\d+)?([eE][+-]?\d+)?", text):
        number = float(text)
        if text.isdigit() and len(text) >= 13:
            number /= 1000
        try:
            return datetime.datetime.fromtimestamp(number, datetime.UTC)
        except (OverflowError, OSError, ValueError):
            raise click.BadParameter(
                f"expected a time between the years 1970 and 9999; found {value[:40]!r}"
            ) from None
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


# The loggers that write a line per request at INFO, silenced by ``serve --quiet``.
PER_REQUEST_LOGGERS = ("mock_kms.server", "mock_kms.httpd")


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line, with the field names of keyutil's logs (``ts``, ``level``)."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        return json.dumps(entry)


def _setup_logging(verbose: int, fmt: str = "text", base: int = logging.WARNING) -> None:
    level = max(logging.DEBUG, base - 10 * verbose)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", force=True)
    if fmt == "json":
        for handler in logging.getLogger().handlers:
            handler.setFormatter(JsonLogFormatter())


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("-v", "--verbose", count=True, help="More logs on stderr (-v info, -vv debug).")
@version_option("mock-kms")
def cli(verbose: int) -> None:
    """The attestation-verifying KMS for AWS Nitro Enclaves (development and CI).

    \b
    Exit codes: 0 valid (serve: stopped by SIGTERM), 1 invalid (serve: cannot start),
    2 usage error, 3 serve cannot listen, 130 interrupted (Ctrl-C).
    Every option is also an environment variable: its name is shown in each --help.
    """
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
    help="UNSAFE: report debug-mode enclaves (all-zero PCR0..2, memory readable by the host) "
    "as valid, with debug true, instead of refusing them (debug_enclave).",
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


def _state_dir(ctx: click.Context, param: click.Parameter, value: Any) -> Path:
    if not str(value):  # Path("") would be the working directory
        raise click.BadParameter("expected a directory; found an empty value")
    return Path(value)


state_dir_option = click.option(
    "--state-dir",
    type=click.Path(file_okay=False),
    callback=_state_dir,
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
@state_dir_option
@click.option("--app", required=True, envvar="MOCK_KMS_RECIPIENT_APP",
              help="The application: its name (as in --allow-image HASH=APP) or 0x + 64 hex.")
@click.option("--key", "key_name", required=True, envvar="MOCK_KMS_RECIPIENT_KEY",
              help="The key's name.")
@click.option("--type", "key_type", default="age", show_default=True,
              envvar="MOCK_KMS_RECIPIENT_TYPE", help="The key's type.")
@click.option("--json", "as_json", is_flag=True,
              help="Print the signed statement (as GET /v1/recipient answers) instead.")
def recipient(state_dir: Path, app: str, key_name: str, key_type: str, as_json: bool) -> None:
    """Print an application's age recipient (age1...), offline, from the state directory.

    The same value GET /v1/recipient serves and 'keyutil recipient' checks; no chain and no
    attestation needed: seal data to an application before its first image is registered.
    The state directory must exist (it is never created here).
    Exit codes: 0 printed, 1 invalid application, key name or type, or no usable state.
    """
    from mock_kms.recipients import recipient_statement
    from mock_kms.state import ROOT_SECRET_FILE, KmsState

    if not (state_dir / ROOT_SECRET_FILE).is_file():
        # Unlike 'identity', never create a state here: a recipient of a root secret that no
        # KMS holds (a mistyped directory) would seal data nobody can open.
        click.echo(f"mock-kms: state_invalid: no KMS state in {state_dir} (no "
                   f"{ROOT_SECRET_FILE}); give the KMS's --state-dir", err=True)
        sys.exit(EXIT_INVALID)
    try:
        statement = recipient_statement(
            KmsState.load_or_create(state_dir), app=app, name=key_name, key_type=key_type
        )
    except KmsError as e:
        click.echo(f"mock-kms: {e.code}: {e.message}", err=True)
        sys.exit(EXIT_INVALID)
    click.echo(json.dumps(statement) if as_json else statement["recipient"])


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
    help="UNSAFE, development only: release keys to debug-mode enclaves (any image: their PCRs "
    "are all zero, and the host can read their memory). They get --debug-app's keys from a "
    "separate debug derivation domain, never equal to a production enclave's keys; every such "
    "release is logged, audited and signed as debug.",
)
@click.option(
    "--debug-app",
    default="debug",
    envvar="MOCK_KMS_DEBUG_APP",
    help="With --allow-debug: the application (NAME or 0x + 64 hex) whose debug-domain keys "
    "debug-mode enclaves get.",
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
    default=1,
    envvar="MOCK_KMS_THREADS",
    help="Requests one worker runs at once. 1 runs each in the worker's own event loop, the "
    "cheapest; more hands whole requests to that many threads, for a chain node or replay "
    "store slow to answer.",
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
    help="Processes accepting on the one listening address (with --threads 1, one core each).",
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
@click.option(
    "-v", "--verbose", count=True, help="Debug logs too (start, stop and releases are INFO)."
)
@click.option(
    "-q",
    "--quiet",
    is_flag=True,
    envvar="MOCK_KMS_QUIET",
    help="No INFO line per request (releases, refusals, closed connections): warnings and "
    "errors only, besides the start and stop lines. The audit log, if on, still records "
    "every decision. The line costs a busy KMS 3-4 % of its CPU per release.",
)
@click.option(
    "--log-format",
    type=click.Choice(["text", "json"]),
    default="text",
    help="Logs on stderr as text lines or JSON lines (fields ts, level, logger, message).",
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
    debug_app: str,
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
    verbose: int,
    quiet: bool,
    log_format: str,
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
    from mock_kms.server import ServerSettings

    group_verbose = click.get_current_context().find_root().params.get("verbose", 0)
    if quiet and group_verbose + verbose:
        raise click.UsageError("--quiet and --verbose ask for opposite things: choose one")
    _setup_logging(group_verbose + verbose, log_format, base=logging.INFO)
    if quiet:
        for name in PER_REQUEST_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)
    logger = logging.getLogger("mock_kms")
    images = _allow_images(allow_images)
    _check_chain_options(rpc_url, contract, chain_id, images)
    if no_aws_root and not trust_roots:
        raise click.UsageError("--no-aws-root needs at least one --trust-root")
    debug_application = _debug_application(debug_app) if allow_debug else None
    _refuse_password_in_argv(replay_store)
    if replay_store == "memory" and workers > 1:
        # Each forked worker would hold its own copy: a nonce accepted once per worker.
        raise click.UsageError(
            "--replay-store memory is one process's memory: with --workers above 1 each "
            "worker would accept a challenge once; use sqlite (the default) or --workers 1"
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
    # Bind first: a port in use or a missing directory is told at once, not after the
    # seconds the chain takes to start. Nothing is served before the workers start.
    sock = _bind(settings)
    try:
        service = _start_service(
            state_dir, images, rpc_url, contract, chain_id, confirmations, revocation_delay,
            rpc_timeout, trust_roots, no_aws_root, max_age, debug_application, audit_log,
            nonce_lifetime, replay_store,
        )
    except BaseException:  # a one-line exit (SystemExit) or Ctrl-C while the chain starts
        _close_listener(sock, settings)
        raise
    where = f"unix:{unix_socket}" if unix_socket else f"http://{host}:{sock.getsockname()[1]}"
    # From the start-up line on, SIGTERM and SIGINT stop the KMS cleanly, even one that
    # arrives before the workers (or the one server loop) have taken the signals over.
    stopped: list[int] = []

    def interrupt(signum: int, frame: object) -> None:
        stopped.append(signum)
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
    signal.signal(signal.SIGINT, interrupt)
    try:
        logger.info(
            "mock-kms serving on %s, identity %s, %d worker(s), replay store %s",
            where, service.state.identity_text, workers, service.nonces.store.description,
        )
        if allow_debug:
            logger.warning(
                "UNSAFE: --allow-debug: debug-mode enclaves get the debug-domain keys of "
                "application %s",
                debug_app,
            )
        stopped_by = _serve_workers(service, settings, sock, workers)
    except KeyboardInterrupt:
        stopped_by = stopped[0] if stopped else signal.SIGINT
    logger.info("mock-kms stopping")
    code = EXIT_INTERRUPTED if stopped_by == signal.SIGINT else 0
    if _request_threads_left():
        # Requests stuck in the application past the stop's grace (the server said how
        # many): the interpreter would join their threads at exit, for as long as their
        # calls take. Workers (--workers > 1) exit so already.
        logging.shutdown()
        os._exit(code)
    if code:
        sys.exit(code)


def _request_threads_left() -> bool:
    import threading

    from mock_kms.httpd import REQUEST_THREAD_PREFIX

    return any(
        t.is_alive() and t.name.startswith(REQUEST_THREAD_PREFIX) for t in threading.enumerate()
    )


def _refuse_password_in_argv(replay_store: str | None) -> None:
    """A Redis URL with a password is read from MOCK_KMS_REPLAY_STORE, never from the command
    line: every user of the machine reads the KMS's (and its workers') argv in ``ps``."""
    import urllib.parse

    source = click.get_current_context().get_parameter_source("replay_store")
    if replay_store is None or source != click.core.ParameterSource.COMMANDLINE:
        return
    try:
        password = urllib.parse.urlsplit(replay_store).password
    except ValueError:
        return  # open_replay_store says what is wrong with it
    if password:
        raise click.UsageError(
            "--replay-store carries a password, which every user reads in ps: set the URL "
            "in MOCK_KMS_REPLAY_STORE instead (the service's environment file, mode 0600)"
        )


def _start_service(
    state_dir: Path,
    images: Sequence[tuple[bytes, bytes]],
    rpc_url: str | None,
    contract: str | None,
    chain_id: int | None,
    confirmations: int,
    revocation_delay: float,
    rpc_timeout: float,
    trust_roots: Sequence[Path],
    no_aws_root: bool,
    max_age: float,
    debug_application: bytes | None,
    audit_log: Path | None,
    nonce_lifetime: float,
    replay_store: str | None,
) -> Any:
    """The release service, or one line and exit 1 (state, chain, roots, audit log, signer,
    replay store)."""
    from mock_kms.replay import open_replay_store
    from mock_kms.service import AuditLog, ReleaseService, ReleaseSettings
    from mock_kms.state import KmsState

    allow_debug = debug_application is not None
    try:
        state = KmsState.load_or_create(state_dir)
        allowlist = _make_allowlist(
            rpc_url, contract, chain_id, confirmations, revocation_delay, rpc_timeout, images
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
    try:
        issuer = _make_issuer(state_dir, state, allowlist, rpc_url, contract, chain_id,
                              rpc_timeout, revocation_delay)
    except OSError as e:
        click.echo(f"mock-kms: cannot use the signer keys in {state_dir}: {e.strerror}", err=True)
        sys.exit(EXIT_INVALID)
    except KmsError as e:
        click.echo(f"mock-kms: {e.code}: {e.message}", err=True)
        sys.exit(EXIT_INVALID)
    return ReleaseService(
        verifier=verifier,
        allowlist=allowlist,
        state=state,
        settings=ReleaseSettings(nonce_lifetime=nonce_lifetime),
        audit=audit,
        debug_application=debug_application,
        replay_store=store,
        provenance=issuer,
    )


def _serve_workers(service: Any, settings: Any, sock: Any, workers: int) -> int | None:
    """Serve on ``sock`` until SIGTERM or SIGINT (returned): in this process, or in
    ``workers`` forked ones with metrics summed across them (prometheus_client's
    multiprocess files in a private directory)."""
    import shutil
    import tempfile

    from mock_kms.server import KmsApp, create_server
    from mock_kms.workers import run_workers

    stopped_by: list[int] = []

    def serve_one(index: int, metrics_dir: str | None = None) -> None:
        service.nonces.store.close()  # a forked worker opens its own connections
        server = create_server(
            KmsApp(service, max_body=settings.max_body, metrics_dir=metrics_dir),
            settings,
            sock,
            multiprocess=metrics_dir is not None,
        )

        def stop(signum: int, frame: object) -> None:
            # The loop finishes the requests in progress, then run() returns.
            stopped_by.append(signum)
            server.stop()

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        try:
            server.run()
        finally:
            server.close()

    try:
        if workers == 1:
            serve_one(0)
            return stopped_by[0] if stopped_by else None
        metrics_dir = tempfile.mkdtemp(prefix="mock-kms-metrics-")
        try:
            return run_workers(workers, lambda index: serve_one(index, metrics_dir))
        finally:
            shutil.rmtree(metrics_dir, ignore_errors=True)
    finally:
        _close_listener(sock, settings)


def _close_listener(sock: Any, settings: Any) -> None:
    sock.close()
    if settings.unix_socket:
        with contextlib.suppress(OSError):
            os.unlink(settings.unix_socket)


def _usable_cpus() -> int:
    from mock_kms.workers import usable_cpus

    return usable_cpus()


def _bind(settings: Any) -> Any:
    """The listening socket for ``settings``' address, or exit 2 (bad address) or 3."""
    import socket

    from mock_kms.server import listen

    where = settings.unix_socket or f"{settings.host}:{settings.port}"
    try:
        return listen(settings)
    except (ValueError, socket.gaierror):  # not an address this machine can listen on
        raise click.BadParameter(
            f"cannot listen on {settings.host!r}: expected an IP address or a host name "
            "of this machine (127.0.0.1, ::1, 0.0.0.0)",
            param_hint="--host",
        ) from None
    except OSError as e:
        hint = {
            errno.EADDRINUSE: "another process listens there: stop it or choose another "
            + ("--unix-socket" if settings.unix_socket else "--port"),
            errno.ENOENT: "its directory does not exist: create it first",
            errno.EACCES: "permission denied: choose a path or port this user may use",
            errno.EADDRNOTAVAIL: "no interface of this machine has that address",
        }.get(e.errno or 0, "check the address")
        click.echo(f"mock-kms: cannot listen on {where}: {e.strerror}; {hint}", err=True)
        sys.exit(EXIT_LISTEN)


def _allow_images(texts: Sequence[str]) -> list[tuple[bytes, bytes]]:
    from mock_kms.allowlist import parse_allow_image

    try:
        return [parse_allow_image(text) for text in texts]
    except KmsError as e:
        raise click.BadParameter(e.message, param_hint="--allow-image") from None


def _check_chain_options(
    rpc_url: str | None, contract: str | None, chain_id: int | None, images: Sequence[object]
) -> None:
    """Options that do not go together, a malformed --rpc-url or --contract: usage errors
    at start, before anything is bound or started (an unreachable node is not one: the KMS
    starts not ready)."""
    import urllib.parse

    if rpc_url is None and contract is not None:
        raise click.UsageError("--contract goes with --rpc-url")
    if rpc_url is not None and images:
        raise click.UsageError(
            "--allow-image registers on the embedded chain only; with --rpc-url, register "
            "images with kms-gov add-image"
        )
    if rpc_url is not None and (contract is None or chain_id is None):
        raise click.UsageError("--rpc-url needs --contract and --chain-id")
    if rpc_url is not None:
        parts = urllib.parse.urlsplit(rpc_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise click.BadParameter(
                f"expected http://HOST:PORT or https://HOST[:PORT]; found {rpc_url[:80]!r}",
                param_hint="--rpc-url",
            )
    if contract is not None:
        from mock_kms.chain import parse_address

        try:
            parse_address(contract)
        except KmsError as e:
            raise click.BadParameter(e.message, param_hint="--contract") from None


def _debug_application(text: str) -> bytes:
    from mock_kms.chain import parse_application

    try:
        return parse_application(text)
    except InvalidError as e:
        raise click.BadParameter(e.message, param_hint="--debug-app") from None


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

    try:
        extra = [cert for path in root_files for cert in load_pem_roots(path)]
    except KmsError as e:
        raise click.BadParameter(e.message, param_hint=option) from None
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
    images: Sequence[tuple[bytes, bytes]],
) -> Any:
    from mock_kms.allowlist import EmbeddedAllowlist, ReaderSettings, RpcAllowlist
    from mock_kms.chain import format_application

    if rpc_url is None:
        allowlist = EmbeddedAllowlist.create(images)
        for image, app in images:
            logging.getLogger("mock_kms").info(
                "embedded chain: image 0x%s registered for application %s",
                image.hex(),
                format_application(app),
            )
        return allowlist
    assert contract is not None and chain_id is not None  # _check_chain_options
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
        logging.getLogger("mock_kms").warning(
            "starting not ready (fail closed: every release is refused with 503 until the "
            "chain answers): %s",
            e.message,
        )
    return reader


# -- provenance statements and the secp256k1 signer (issue 12) -------------------------------


def _make_issuer(state_dir: Path, state: Any, allowlist: Any, rpc_url: str | None,
                 contract: str | None, chain_id: int | None, rpc_timeout: float,
                 revocation_delay: float) -> Any:
    """The provenance issuer: the signer keys of ``state_dir``, and which one is registered.

    Embedded chain: this KMS owns the contract, so it registers its newest signer key at
    start (nothing else can change it later). RPC: governance registers one with kms-gov
    set-signer; the KMS reads it (cached for the revocation delay) and signs with that key."""
    from mock_kms import chain, signer
    from mock_kms.provenance import ProvenanceIssuer, SignerChoice

    ring = signer.SignerKeyring(state_dir)
    newest = ring.newest(create=True)
    assert newest is not None
    log = logging.getLogger("mock_kms")
    if rpc_url is None:
        tx = signer.set_signer_request(allowlist.contract_address, newest)
        chain.send(allowlist.w3, tx, sender=allowlist.owner)
        log.warning("embedded chain: signer %s registered", newest)
        registered = signer.RegisteredSigner(read=lambda: newest, max_staleness=float("inf"))
        return ProvenanceIssuer(state, allowlist.chain_id, allowlist.contract_address,
                                SignerChoice(registered, ring))
    from web3 import Web3
    from web3.providers.rpc import HTTPProvider

    assert contract is not None and chain_id is not None
    w3 = Web3(HTTPProvider(rpc_url, request_kwargs={"timeout": rpc_timeout},
                           exception_retry_configuration=None), middleware=[])
    address = chain.parse_address(contract)
    registered = signer.RegisteredSigner(read=lambda: signer.read_signer(w3, address),
                                         max_staleness=revocation_delay)
    log.warning("secp256k1 signer keys: %s (register one with kms-gov set-signer)",
                ", ".join(ring.addresses()))
    return ProvenanceIssuer(state, chain_id, address, SignerChoice(registered, ring))


@cli.group("signer")
def signer_group() -> None:
    """The KMS's secp256k1 signer keys (they sign secp256k1 provenance statements).

    \b
    Rotation:
      mock-kms signer new --state-dir DIR       # prints the new address
      kms-gov set-signer ADDRESS                # the KMS signs with it from then on
    """


@signer_group.command("show")
@state_dir_option
@click.option("--json", "as_json", is_flag=True, help="One JSON object on stdout.")
def signer_show(state_dir: Path, as_json: bool) -> None:
    """Print the newest signer's address (made on first use), to register with kms-gov."""
    from mock_kms.signer import SignerKeyring

    ring = SignerKeyring(state_dir)
    try:
        newest = ring.newest(create=True)
    except OSError as e:
        click.echo(f"mock-kms: cannot use {ring.directory}: {e.strerror}", err=True)
        sys.exit(EXIT_INVALID)
    if as_json:
        click.echo(json.dumps({"signer": newest, "signers": ring.addresses()}))
    else:
        click.echo(newest)


@signer_group.command("new")
@state_dir_option
def signer_new(state_dir: Path) -> None:
    """Make another signer key (rotation) and print its address; the old keys stay, so the
    KMS keeps signing with the registered one until governance registers the new one."""
    from mock_kms.signer import SignerKeyring

    try:
        click.echo(SignerKeyring(state_dir).new())
    except OSError as e:
        click.echo(f"mock-kms: cannot write the signer key: {e.strerror}", err=True)
        sys.exit(EXIT_INVALID)


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


# Every option's variable, set on the option so that --help shows it (also under CliRunner).
ENVVARS = option_envvars(cli, "MOCK_KMS")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code. ``argv`` lets tests call the CLI in-process."""
    return run(cli, argv, prog_name="mock-kms", prefix="MOCK_KMS")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
