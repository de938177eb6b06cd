"""``keyutil seal``, ``unseal``, ``recipient`` and ``exec``: the sealing commands.

Registered on the ``keyutil`` group by :mod:`keyutil.cli`; they reuse its options, event log
and exit codes. Heavy modules (the age format, HPKE, TLS) are imported inside the commands.
Exit code 9 (``EXIT_SEALED``) is theirs: sealed input refused (not for this key, altered,
truncated, another plaintext than pinned, or a malformed dotenv file); its code
(:data:`keyutil.sealing.age.CODES`) is logged. ``exec`` exits 127 when its command cannot be
executed.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import click

from keyutil.cli import (
    SUITE_CHOICES,
    EventLog,
    _transport,
    deadline_option,
    kms_ca_option,
    kms_option,
    log_format_option,
    nsm_option,
    sim_dir_option,
    verbose_option,
)
from keyutil.exitcodes import (
    EXIT_DENIED,
    EXIT_EXEC_FAILED,
    EXIT_NSM,
    EXIT_OUTPUT,
    EXIT_SEALED,
    EXIT_UNAUTHENTICATED,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
)
from keyutil.nsm import NsmError, NsmKind

if TYPE_CHECKING:  # the modules themselves load only when a command needs them
    from keyutil.sealing.age import Identity
    from keyutil.sealing.streams import PlaintextFile, StdoutOutput

    Output = PlaintextFile | StdoutOutput

DEFAULT_SOURCE_TIMEOUT = 60.0

via_option = click.option(
    "--via",
    envvar="KEYUTIL_VIA",
    help="For https:// input: the egress proxy to tunnel through (vsock://CID:PORT, "
    "unix:///PATH or http://HOST:PORT of a TCP forwarder such as 'keyutil proxy'); TLS runs "
    "end to end, checked against the URL's host.",
)
source_ca_option = click.option(
    "--source-ca",
    type=click.Path(exists=True, dir_okay=False),
    envvar="KEYUTIL_SOURCE_CA",
    help="For https:// input: trust only this CA file (PEM). Default: the system store.",
)
def sha256_option_value(
    ctx: click.Context, param: click.Parameter | None, value: Any
) -> bytes | None:
    """click callback: ``--expect-sha256 HEX`` as 32 bytes."""
    from keyutil.sealing import parse_sha256

    if value is None:
        return None
    try:
        return parse_sha256(str(value))
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--expect-sha256") from None


expect_sha256_option = click.option(
    "--expect-sha256",
    metavar="HEX",
    callback=sha256_option_value,
    help="The plaintext's SHA-256 (sha256sum of the file before sealing), baked into the "
    "image: refuse a file sealed by anyone else (the recipient is public). Exit 9, "
    "sealed_digest_mismatch, and no output file.",
)
allow_persistent_option = click.option(
    "--allow-persistent",
    is_flag=True,
    help="Allow plaintext output on a file system other than tmpfs or ramfs.",
)


def fail(log: EventLog, error: Exception) -> NoReturn:
    """Log ``error`` with its code and exit with the documented status for its kind.

    Every error these commands turn into an exit status carries ``code`` and ``message``
    (never secret material); the kind decides the status and the event's name.
    """
    from keyutil.client import AnswerRejected, KmsDenied, KmsUnavailable
    from keyutil.output import OutputError
    from keyutil.sealing.age import SealedError
    from keyutil.sealing.dotenv import DotenvError
    from keyutil.sealing.streams import SourceError
    from keyutil.transport import TransportError

    fields: dict[str, Any] = {"code": getattr(error, "code", type(error).__name__),
                              "message": getattr(error, "message", str(error))}
    if isinstance(error, SourceError):
        unreachable = error.code in ("source_unreachable", "source_http_status")
        status, event = (EXIT_UNAVAILABLE if unreachable else EXIT_USAGE), "source_error"
    elif isinstance(error, SealedError | DotenvError):
        status, event = EXIT_SEALED, "sealed_refused"
        if isinstance(error, DotenvError):
            fields["line"] = error.line
    elif isinstance(error, OutputError):
        status, event = EXIT_OUTPUT, "output_error"
    elif isinstance(error, NsmError):
        status, event = EXIT_NSM, "nsm_error"
    elif isinstance(error, KmsUnavailable | TransportError):
        status, event = EXIT_UNAVAILABLE, "kms_unavailable"
    elif isinstance(error, KmsDenied):
        status, event = EXIT_DENIED, "denied"
        fields["status"] = error.status
    elif isinstance(error, AnswerRejected):
        status, event = EXIT_UNAUTHENTICATED, "answer_rejected"
    else:
        raise error
    log.fail(status, event, **fields)
    raise SystemExit(status)  # log.fail exits; this tells the type checker so


def _output(target: str, allow_persistent: bool) -> Output:
    from keyutil.sealing.streams import PlaintextFile, StdoutOutput

    if target == "-":
        return StdoutOutput()
    return PlaintextFile(target, allow_persistent=allow_persistent)


def check_output(log: EventLog, target: str, allow_persistent: bool) -> Output:
    """The output for ``target`` (``-`` is stdout), checked before anything is released."""
    from keyutil.output import OutputError

    out = _output(target, allow_persistent)
    try:
        out.check()
    except OutputError as e:
        fail(log, e)
    return out


@contextlib.contextmanager
def _sigterm_unwinds() -> Iterator[None]:
    """SIGTERM (``keyutil run`` passes it on to a get-key in progress) exits 128+15 through
    the ``with`` blocks, so that the temporary file of partial plaintext is removed: the
    default action ended the process and left it beside the destination."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def unseal_to(
    log: EventLog,
    identities: Sequence[Identity],
    source_spec: str,
    out: Output,
    *,
    via: str | None,
    source_ca: str | None,
    expect_sha256: bytes | None = None,
    timeout: float = DEFAULT_SOURCE_TIMEOUT,
) -> None:
    """Open ``source_spec`` with ``identities`` into ``out``; a file appears only if the whole
    input authenticated (and has the expected digest, if given). Exits with the documented
    code on any refusal."""
    from keyutil.output import OutputError
    from keyutil.sealing.age import SealedError, unseal
    from keyutil.sealing.streams import PlaintextFile, SourceError, open_source

    started = time.monotonic()
    try:
        with open_source(source_spec, via=via, ca_file=source_ca, timeout=timeout) as source:
            if isinstance(out, PlaintextFile):
                with _sigterm_unwinds(), out:
                    size = unseal(source, out.write, identities, expect_sha256=expect_sha256)
                    out.publish()
            else:
                size = unseal(source, out.write, identities, expect_sha256=expect_sha256)
    except (SourceError, SealedError, OutputError) as e:
        fail(log, e)
    log(
        "info",
        "unsealed",
        {
            "to": str(getattr(out, "path", "stdout")),
            "bytes": size,
            "seconds": round(time.monotonic() - started, 3),
        },
    )


def release_age_identity(
    log: EventLog,
    *,
    kms_url: str,
    kms_pubkey: str | None,
    insecure_skip_kms_auth: bool,
    kms_ca: str | None,
    expect_app: str | None,
    key_name: str,
    suite: str,
    deadline: float,
    nsm_kind: NsmKind,
    sim_dir: Path | None,
) -> Identity:
    """The age Identity of key ``key_name``, released to this enclave (``keyutil.get_key``,
    the same checks as ``get-key``), held in memory only."""
    from keyutil.api import get_key
    from keyutil.client import AnswerRejected, KmsDenied, KmsUnavailable
    from keyutil.sealing.age import Identity

    _transport(kms_url, kms_ca)  # --kms and --kms-ca checked as get-key checks them (exit 2)
    try:
        keys = get_key(
            kms_url, kms_pubkey=kms_pubkey, keys=[key_name], types=["age"],
            suite=suite,  # type: ignore[arg-type]
            deadline=deadline, nsm=nsm_kind, sim_dir=sim_dir, kms_ca=kms_ca,
            insecure_skip_kms_auth=insecure_skip_kms_auth, expect_app=expect_app, log=log,
        )
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    except (NsmError, KmsUnavailable, KmsDenied, AnswerRejected) as e:
        fail(log, e)
    value = keys[key_name]
    try:
        return Identity(bytes(value))
    finally:
        value[:] = bytes(len(value))


def register(cli: click.Group) -> None:
    """Add the sealing commands to the ``keyutil`` group."""
    cli.add_command(seal_command)
    cli.add_command(unseal_command)
    cli.add_command(recipient_command)
    cli.add_command(exec_command)


@click.command("seal")
@click.option(
    "-r",
    "--recipient",
    "recipients",
    multiple=True,
    required=True,
    envvar="KEYUTIL_SEAL_RECIPIENT",
    help="An age1... recipient (from 'keyutil recipient'); repeat for several.",
)
@click.argument("source", type=click.Path(dir_okay=False, allow_dash=True))
@click.argument("destination", type=click.Path(dir_okay=False, allow_dash=True))
@log_format_option
def seal_command(
    recipients: tuple[str, ...], source: str, destination: str, log_format: str
) -> None:
    """Seal SOURCE (a file or -) to age recipients, writing DESTINATION (a file or -).

    \b
    The output is a standard age v1 file: 'age -d -i IDENTITY' opens it, and so does
    'keyutil unseal' in an enclave holding the identity. For hosts without the age tool;
    where it exists, 'age -r RECIPIENT -o OUT IN' does the same.
    \b
    Exit codes: 0 sealed, 2 usage (bad recipient, unreadable input), 7 output error.
    """
    from keyutil.sealing.age import Recipient, SealedError, seal

    log = EventLog(log_format, 0)
    try:
        parsed = [Recipient.parse(r) for r in recipients]
    except SealedError as e:
        raise click.BadParameter(e.message, param_hint="--recipient") from None
    try:
        reader = sys.stdin.buffer if source == "-" else open(source, "rb")  # noqa: SIM115
    except OSError as e:
        log.fail(EXIT_USAGE, "source_error", code="source_missing", message=str(e.strerror))
        return
    tmp = None
    try:
        if destination == "-":
            size = seal(reader, sys.stdout.buffer, parsed)
            sys.stdout.buffer.flush()
        else:
            target = Path(destination)
            tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
            with open(tmp, "wb") as writer:
                size = seal(reader, writer, parsed)
                writer.flush()
                os.fsync(writer.fileno())
            os.replace(tmp, target)
            tmp = None
    except OSError as e:
        log.fail(EXIT_OUTPUT, "output_error", code="output_unwritable", message=str(e.strerror))
        return
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        if reader is not sys.stdin.buffer:
            reader.close()
    log("info", "sealed", {"bytes": size, "recipients": len(parsed), "to": destination})


@click.command("unseal")
@click.option(
    "--identity",
    "identity_file",
    required=True,
    type=click.Path(exists=True, dir_okay=False),
    envvar="KEYUTIL_UNSEAL_IDENTITY",
    help="An age identity file (AGE-SECRET-KEY-1..., as 'get-key --type age' writes it).",
)
@via_option
@source_ca_option
@allow_persistent_option
@expect_sha256_option
@click.argument("source")
@click.argument("destination")
@log_format_option
def unseal_command(
    identity_file: str,
    via: str | None,
    source_ca: str | None,
    allow_persistent: bool,
    expect_sha256: bytes | None,
    source: str,
    destination: str,
    log_format: str,
) -> None:
    """Open the age file SOURCE into DESTINATION, streaming, in constant memory.

    \b
    SOURCE: a file, - (stdin), or an https:// URL (--via: through the egress proxy).
    DESTINATION: a file, written to a temporary file beside it and renamed into place only
    once the whole input authenticated (a truncated or altered input leaves no file), on
    tmpfs/ramfs unless --allow-persistent; or - for stdout (a pipe: check the exit status,
    a refusal comes after the chunks that authenticated).
    \b
    Exit codes: 0 opened, 2 usage (bad identity file, missing input), 3 input unreachable,
    7 output error, 9 sealed input refused (its code is logged: sealed_not_for_key,
    sealed_header_altered, sealed_truncated, sealed_altered, sealed_header_invalid, ...).
    """
    from keyutil.sealing.age import Identity, SealedError

    log = EventLog(log_format, 0)
    try:
        identities = Identity.from_file(Path(identity_file).read_bytes())
    except SealedError as e:
        raise click.BadParameter(e.message, param_hint="--identity") from None
    except OSError as e:
        raise click.BadParameter(str(e.strerror), param_hint="--identity") from None
    out = check_output(log, destination, allow_persistent)
    unseal_to(
        log, identities, source, out, via=via, source_ca=source_ca, expect_sha256=expect_sha256
    )


@click.command("recipient")
@kms_option
@click.option(
    "--kms-pubkey",
    required=True,
    envvar="KEYUTIL_KMS_PUBKEY",
    help="The KMS identity the statement must be signed by: ed25519:BASE64 or @FILE.",
)
@kms_ca_option
@click.option(
    "--app",
    required=True,
    envvar="KEYUTIL_RECIPIENT_APP",
    help="The application: its name (as registered, HASH=APP) or 0x + 64 hex digits.",
)
@click.option("--key", "key_name", required=True, envvar="KEYUTIL_RECIPIENT_KEY",
              help="The key's name.")
@click.option("--json", "as_json", is_flag=True, help="Print the whole signed statement.")
@deadline_option(10.0)
@log_format_option
def recipient_command(
    kms_url: str,
    kms_pubkey: str,
    kms_ca: str | None,
    app: str,
    key_name: str,
    as_json: bool,
    deadline: float,
    log_format: str,
) -> None:
    """Print the age recipient (age1...) of key --key of application --app, checked.

    \b
    Asks the KMS (GET /v1/recipient, no attestation needed) and prints the recipient only
    if the answer is signed by the pinned KMS identity and names this application, key and
    type: a host relaying the answer cannot swap in a recipient of its own. Seal with
    \b
      age -r "$(keyutil recipient --kms URL --kms-pubkey PIN --app APP --key NAME)" ...
    \b
    Exit codes: 0 printed, 2 usage, 3 KMS unreachable, 4 refused by the KMS,
    6 the statement failed authentication (recipient_unauthenticated, recipient_mismatch).
    """
    import json
    import urllib.parse

    from keyutil.api import pinned_identity
    from keyutil.client import KmsDenied, KmsUnavailable, classify
    from keyutil.protocol import ProtocolError, parse_application, parse_identity
    from keyutil.sealing.age import Recipient, SealedError
    from keyutil.sealing.recipient import verify_statement
    from keyutil.transport import TransportError

    log = EventLog(log_format, 0)
    try:
        pinned = parse_identity(pinned_identity(kms_pubkey, False) or "")
    except (ProtocolError, ValueError) as e:
        raise click.BadParameter(str(e), param_hint="--kms-pubkey") from None
    try:
        application = parse_application(app)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--app") from None
    transport = _transport(kms_url, kms_ca)
    query = urllib.parse.urlencode({"app": app, "key": key_name, "type": "age"})
    try:
        response = transport.request("GET", f"/v1/recipient?{query}", timeout=deadline)
        body = classify(response, "recipient")
    except (TransportError, KmsUnavailable, KmsDenied) as e:
        fail(log, e)
    try:
        statement = verify_statement(
            pinned, body, application=application, name=key_name, key_type="age"
        )
        Recipient.parse(statement["recipient"])
    except (ProtocolError, SealedError) as e:
        log.fail(EXIT_UNAUTHENTICATED, "recipient_rejected", code=e.code, message=e.message)
        return
    click.echo(json.dumps(statement) if as_json else statement["recipient"])


@click.command(
    "exec",
    context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False},
)
@click.option(
    "--sealed-env",
    required=True,
    envvar="KEYUTIL_EXEC_SEALED_ENV",
    help="A dotenv file sealed with age to the key: a file, - or an https:// URL.",
)
@click.option("--key", "key_name", required=True, envvar="KEYUTIL_EXEC_KEY",
              help="The age key (its name) the file is sealed to.")
@kms_option
@click.option(
    "--kms-pubkey",
    envvar="KEYUTIL_KMS_PUBKEY",
    help="The pinned KMS identity, ed25519:BASE64, or @FILE holding it.",
)
@click.option(
    "--insecure-skip-kms-auth",
    is_flag=True,
    help="UNSAFE: do not check the answer's signature.",
)
@kms_ca_option
@click.option(
    "--expect-app",
    metavar="NAME|0xID",
    help="The application whose identity this image must get, as for get-key: another "
    "application's is refused (exit 6) and nothing runs.",
)
@click.option("--suite", type=click.Choice(SUITE_CHOICES), default="x25519",
              help="HPKE suite the identity is sealed with.")
@via_option
@source_ca_option
@expect_sha256_option
@deadline_option(60.0)
@nsm_option
@sim_dir_option
@log_format_option
@verbose_option
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def exec_command(
    sealed_env: str,
    key_name: str,
    kms_url: str,
    kms_pubkey: str | None,
    insecure_skip_kms_auth: bool,
    kms_ca: str | None,
    expect_app: str | None,
    suite: str,
    via: str | None,
    source_ca: str | None,
    expect_sha256: bytes | None,
    deadline: float,
    nsm_kind: NsmKind,
    sim_dir: Path | None,
    log_format: str,
    verbose: int,
    command: tuple[str, ...],
) -> None:
    """Run COMMAND with the variables of a sealed dotenv file added to its environment.

    \b
      keyutil exec --sealed-env /app/secrets.env.age --key env --kms vsock://3:8000 \\
          --kms-pubkey @/etc/kms.pub -- /app/server --port 8080
    \b
    Releases the age identity of --key (as get-key --type age would, but in memory only),
    opens --sealed-env in memory, and replaces this process with COMMAND (exec): the
    plaintext is never written to a file, never in an argument, never logged (only the
    variables' names and count are). A malformed line is refused with its line number.
    \b
    Exit codes: as get-key (2, 3, 4, 5, 6), 9 the sealed file refused or malformed
    (sealed_*, dotenv_invalid), 127 COMMAND cannot be executed.
    """
    from keyutil.sealing.age import SealedError, unseal
    from keyutil.sealing.dotenv import DotenvError, parse_dotenv
    from keyutil.sealing.streams import SourceError, open_source

    log = EventLog(log_format, verbose)
    identity = release_age_identity(
        log,
        kms_url=kms_url,
        kms_pubkey=kms_pubkey,
        insecure_skip_kms_auth=insecure_skip_kms_auth,
        kms_ca=kms_ca,
        expect_app=expect_app,
        key_name=key_name,
        suite=suite,
        deadline=deadline,
        nsm_kind=nsm_kind,
        sim_dir=sim_dir,
    )
    plaintext = bytearray()
    try:
        with open_source(sealed_env, via=via, ca_file=source_ca, timeout=deadline) as source:
            unseal(source, plaintext.extend, identity, expect_sha256=expect_sha256)
        variables = parse_dotenv(plaintext)
    except (SourceError, SealedError, DotenvError) as e:
        fail(log, e)
    finally:
        plaintext[:] = bytes(len(plaintext))
    del identity
    log("info", "exec", {"command": command[0], "variables": sorted(variables)})
    sys.stderr.flush()
    try:
        # No shell: COMMAND runs as given, its variables passed in the environment only.
        os.execvpe(command[0], list(command), {**os.environ, **variables})  # noqa: S606
    except OSError as e:
        log.fail(EXIT_EXEC_FAILED, "exec_failed", command=command[0], message=str(e.strerror))
