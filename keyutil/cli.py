"""``keyutil``: the in-enclave client's command line.

    $ keyutil sim init /tmp/sim --pcr0 $(printf 'aa%.0s' {1..48})
    $ keyutil attest --nsm simulator --sim-dir /tmp/sim --nonce 00ff --out doc.cose

    $ keyutil net-up
    $ keyutil get-key --kms vsock://3:8000 --kms-pubkey @/etc/kms.pub --out /run/keys/app.key

Results on stdout, logs on stderr. Every option is also an environment variable,
``KEYUTIL_<COMMAND>_<OPTION>`` (``KEYUTIL_ATTEST_OUT``), and the NSM choice is ``KEYUTIL_NSM``
and ``KEYUTIL_SIM_DIR`` for every command; the KMS is ``KEYUTIL_KMS`` and its identity
``KEYUTIL_KMS_PUBKEY``.
Exit codes are stable: 0 success, 2 usage, 3 KMS unreachable by the deadline, 4 denied by
the KMS, 5 NSM error, 6 the KMS answer failed authentication, 7 output error, 8 network
set-up error (net-up), 9 sealed input refused, 10 the app could not be started (run:
workdir, command).
"""

from __future__ import annotations

import base64
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import click

from keyutil.cliutil import EXIT_INTERRUPTED, option_envvars, run, version_option
from keyutil.events import LOG_LEVELS, format_event
from keyutil.exitcodes import (  # the README's table checks every EXIT_* seen here
    EXIT_DENIED,
    EXIT_NETWORK,
    EXIT_NSM,
    EXIT_OUTPUT,
    EXIT_UNAUTHENTICATED,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
)
from keyutil.nsm import NsmError, NsmKind, open_nsm


def _hex(length: int | None = None) -> Callable[[click.Context, click.Parameter, Any], Any]:
    """A click callback decoding hex bytes (optional 0x prefix), of ``length`` if given."""

    def convert(ctx: click.Context, param: click.Parameter, value: Any) -> bytes | None:
        if value is None:
            return None
        text = str(value).strip().removeprefix("0x")
        try:
            decoded = bytes.fromhex(text)
        except ValueError:
            raise click.BadParameter(f"expected hex digits; found {str(value)[:24]!r}") from None
        if length is not None and len(decoded) != length:
            raise click.BadParameter(f"expected {length} bytes; found {len(decoded)}")
        return decoded

    return convert


def _fail(code: int, message: str) -> None:
    click.echo(f"keyutil: {message}", err=True)
    sys.exit(code)


nsm_option = click.option(
    "--nsm",
    "nsm_kind",
    type=click.Choice(["device", "simulator", "auto"]),
    default="auto",
    show_default=True,
    envvar="KEYUTIL_NSM",
    help="Where attestation documents come from; auto picks /dev/nsm when it exists.",
)
sim_dir_option = click.option(
    "--sim-dir",
    type=click.Path(file_okay=False, path_type=Path),
    envvar="KEYUTIL_SIM_DIR",
    help="The NSM simulator's directory (see 'keyutil sim init').",
)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@version_option("keyutil")
def cli() -> None:
    """Attested key release inside an AWS Nitro Enclave.

    \b
    Exit codes: 0 success, 2 usage, 3 KMS unreachable by the deadline,
    4 denied by the KMS, 5 NSM error, 6 the KMS answer failed authentication,
    7 output error, 8 network set-up error (net-up), 9 sealed input refused,
    10 the app could not be started (run), 130 interrupted (Ctrl-C). 'keyutil run' exits
    with the app's own status once it ran.
    Every option is also an environment variable: its name is shown in each --help.
    """


@cli.command()
@nsm_option
@sim_dir_option
@click.option("--nonce", callback=_hex(), help="Nonce to embed (hex, at most 1024 bytes).")
@click.option("--user-data", callback=_hex(), help="User data to embed (hex, at most 1024 bytes).")
@click.option(
    "--public-key", callback=_hex(), help="Public key to embed (hex, at most 1024 bytes)."
)
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the raw document to FILE instead of base64 to stdout.",
)
def attest(
    nsm_kind: NsmKind,
    sim_dir: Path | None,
    nonce: bytes | None,
    user_data: bytes | None,
    public_key: bytes | None,
    out: Path | None,
) -> None:
    """Get an attestation document from the NSM (the device or the simulator).

    Writes raw COSE_Sign1 bytes to --out FILE, or base64 to stdout. Verify it with
    'mock-kms verify-attestation'.
    """
    try:
        document = open_nsm(nsm_kind, sim_dir=sim_dir).attestation(
            user_data=user_data, nonce=nonce, public_key=public_key
        )
    except NsmError as e:
        _fail(EXIT_NSM, f"{e.code}: {e.message}")
        return
    if out is None:
        click.echo(base64.b64encode(document).decode())
        return
    from keyutil.output import OutputError, write_file

    try:  # a document is not secret: any file system, mode 0644; never through a symlink
        write_file(out, document, mode=0o644, allow_persistent=True)
    except OutputError as e:
        _fail(EXIT_OUTPUT, f"{e.code}: {e.message}")


@cli.group()
def sim() -> None:
    """The NSM simulator, for development and CI without Nitro hardware."""


@sim.command("init")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option("--pcr0", callback=_hex(48), help="PCR0 (48 bytes hex). Default: random.")
@click.option("--pcr1", callback=_hex(48), help="PCR1 (48 bytes hex). Default: random.")
@click.option("--pcr2", callback=_hex(48), help="PCR2 (48 bytes hex). Default: random.")
@click.option("--module-id", help="The enclave's module id. Default: random i-...-enc....")
@click.option(
    "--debug", is_flag=True, help="Simulate a debug-mode enclave (PCR0..2 and PCR8 all zero)."
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON object.")
def sim_init(
    directory: Path,
    pcr0: bytes | None,
    pcr1: bytes | None,
    pcr2: bytes | None,
    module_id: str | None,
    debug: bool,
    as_json: bool,
) -> None:
    """Create a simulator in DIRECTORY: a 4-level CA, its root and the enclave's PCRs.

    \b
    DIRECTORY/root.pem       trust it in the KMS with --trust-root (or --root)
    DIRECTORY/enclave.json   module_id, PCRs and OS_IMAGE_HASH to register
    DIRECTORY/ca/*.key.pem   CA private keys (mode 0600)
    """
    from keyutil.simulator import SimulatedNSM

    if debug and any(p is not None for p in (pcr0, pcr1, pcr2)):
        raise click.UsageError("--debug reports all-zero PCR0..2; do not give --pcr0/1/2")
    try:
        nsm = SimulatedNSM.init(
            directory, pcr0=pcr0, pcr1=pcr1, pcr2=pcr2, debug=debug, module_id=module_id
        )
    except NsmError as e:
        usage = e.code in ("sim_exists", "sim_invalid")  # an existing directory, a bad id
        _fail(EXIT_USAGE if usage else EXIT_NSM, f"{e.code}: {e.message}")
        return
    except OSError as e:
        _fail(EXIT_OUTPUT, f"cannot create {directory}: {e.strerror}")
        return
    summary = {
        "directory": str(directory),
        "root": str(directory / "root.pem"),
        **nsm.identity.to_json(),
    }
    if as_json:
        click.echo(json.dumps(summary))
        return
    click.echo(f"simulator     {directory}")
    click.echo(f"root          {summary['root']}")
    click.echo(f"module_id     {summary['module_id']}")
    click.echo(f"os_image_hash {summary['os_image_hash']}")
    click.echo(f"debug         {str(debug).lower()}")


# -- get-key and health: the release flow ----------------------------------------------------
# The flow's modules (HPKE, http.client, ssl) are imported inside the commands, so that
# 'keyutil attest' and 'keyutil sim' do not pay for them.

SUITE_CHOICES = ("x25519", "p384")  # protocol.SUITE_X25519 and SUITE_P384


class EventLog:
    """Events on stderr, as text or JSON lines. Callers never pass key material."""

    def __init__(self, fmt: str, verbosity: int) -> None:
        self.fmt = fmt
        self.threshold = LOG_LEVELS["debug" if verbosity > 0 else "info"]

    def __call__(self, level: str, event: str, fields: Any) -> None:
        if LOG_LEVELS.get(level, 40) < self.threshold:
            return
        click.echo(format_event(self.fmt, level, event, fields), err=True)

    def fail(self, exit_code: int, event: str, **fields: Any) -> None:
        self("error", event, {"exit": exit_code, **fields})
        sys.exit(exit_code)


log_format_option = click.option(
    "--log-format",
    type=click.Choice(["text", "json"]),
    default="text",
    help="Logs on stderr as text lines or JSON lines.",
)
verbose_option = click.option("-v", "--verbose", count=True, help="Log each attempt.")
kms_option = click.option(
    "--kms",
    "kms_url",
    required=True,
    envvar="KEYUTIL_KMS",
    help="The KMS: http://HOST:PORT, https://HOST[:PORT] (443), unix:///PATH or "
    "vsock://CID:PORT.",
)
kms_replicas_option = click.option(
    "--kms",
    "kms_urls",
    required=True,
    multiple=True,
    envvar="KEYUTIL_KMS",
    help="The KMS: http://HOST:PORT, https://HOST[:PORT] (443), unix:///PATH or "
    "vsock://CID:PORT. Repeat it for replicas sharing one identity: tried in order, the next "
    "when one is unreachable or unavailable (KEYUTIL_KMS: separated by spaces).",
)
kms_ca_option = click.option(
    "--kms-ca",
    type=click.Path(exists=True, dir_okay=False),
    help="For https: trust only this CA file (PEM). Default: the system store.",
)


def deadline_option(default: float) -> Callable[[Any], Any]:
    return click.option(
        "--deadline",
        type=click.FloatRange(min=0, min_open=True),
        default=default,
        help="Give up after this many seconds overall (exit 3).",
    )


def _transport(kms_url: str, kms_ca: str | None) -> Any:
    import ssl

    from keyutil.transport import HttpTransport

    try:
        return HttpTransport.from_url(kms_url, ca_file=kms_ca)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--kms") from None
    except ssl.SSLError as e:
        raise click.BadParameter(
            f"cannot load CA file: {e.reason}", param_hint="--kms-ca"
        ) from None


@cli.command("get-key")
@kms_replicas_option
@click.option(
    "--kms-pubkey",
    envvar="KEYUTIL_KMS_PUBKEY",
    help="The pinned KMS identity, ed25519:BASE64, or @FILE holding it (bake it into the image).",
)
@click.option(
    "--insecure-skip-kms-auth",
    is_flag=True,
    help="UNSAFE: do not check the answer's signature (the nonce and binding still are).",
)
@kms_ca_option
@click.option(
    "--expect-app",
    metavar="NAME|0xID",
    help="The application whose keys this image must get (as registered on chain): an "
    "answer for any other application is refused (exit 6) and nothing is written.",
)
@click.option(
    "--key",
    "key_names",
    multiple=True,
    default=["default"],
    help="Key name to release; repeat for several. The name is the derivation context.",
)
@click.option(
    "--length",
    "lengths",
    type=int,
    multiple=True,
    default=[32],
    help="Key length in bytes: once for all keys, or once per --key in order.",
)
@click.option(
    "--type",
    "key_types",
    multiple=True,
    default=["raw"],
    help="Key type: raw (bytes), age (an AGE-SECRET-KEY-1 identity file, as 'age -d -i' "
    "reads it), ed25519 or secp256k1 (signing keys, see --key-format and --provenance-out); "
    "once for all keys, or once per --key in order.",
)
@click.option(
    "--suite",
    type=click.Choice(SUITE_CHOICES),
    default="x25519",
    help="HPKE suite the keys are sealed with.",
)
@click.option(
    "--out",
    type=click.Path(dir_okay=False),
    help="Write the one key to FILE, mode 0400; a missing directory (/run/keys) is created "
    "0700 when its nearest existing ancestor is tmpfs or ramfs.",
)
@click.option(
    "--out-dir",
    type=click.Path(file_okay=False),
    help="Write each key to DIR/NAME, all or none (DIR created as for --out).",
)
@click.option("--stdout", "to_stdout", is_flag=True, help="Write the key(s) to stdout.")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["raw", "hex", "base64"]),
    default="raw",
    help="With --stdout: raw bytes (refused on a terminal), hex or base64.",
)
@click.option(
    "--allow-persistent",
    is_flag=True,
    help="Allow --out/--out-dir on a file system other than tmpfs or ramfs.",
)
@click.option(
    "--unseal",
    "unseal_source",
    metavar="IN",
    help="With one --type age key: open the age file IN (a file, - or https://) with the "
    "released identity, which is never written anywhere (see 'keyutil unseal').",
)
@click.option(
    "--unseal-to",
    metavar="PATH|-",
    help="Where --unseal writes the plaintext: a file (tmpfs, published once the whole "
    "input authenticated) or - for stdout.",
)
@click.option("--via", envvar="KEYUTIL_VIA", help="For --unseal https://: the egress proxy.")
@click.option(
    "--source-ca",
    type=click.Path(exists=True, dir_okay=False),
    help="For --unseal https://: trust only this CA file.",
)
@click.option(
    "--expect-sha256",
    metavar="HEX",
    help="For --unseal: the plaintext's SHA-256, pinned in the image; a file sealed by "
    "anyone else is refused (see 'keyutil unseal --help').",
)
@click.option(
    "--key-format",
    help="File format of typed keys: ed25519 'pem' (PKCS#8, default) or 'raw' (32 bytes); "
    "secp256k1 is always 'hex' (0x + 64 hex digits, as cast and web3 read it), age 'age'.",
)
@click.option(
    "--provenance-out",
    type=click.Path(dir_okay=False),
    help="Write the KMS's provenance statement of the (one) typed key to FILE: public, "
    "check it with 'keyutil verify-provenance'.",
)
@deadline_option(60.0)
@nsm_option
@sim_dir_option
@log_format_option
@verbose_option
def get_key(
    kms_urls: tuple[str, ...],
    kms_pubkey: str | None,
    insecure_skip_kms_auth: bool,
    kms_ca: str | None,
    expect_app: str | None,
    key_names: tuple[str, ...],
    lengths: tuple[int, ...],
    key_types: tuple[str, ...],
    suite: str,
    out: str | None,
    out_dir: str | None,
    to_stdout: bool,
    fmt: Literal["raw", "hex", "base64"],
    allow_persistent: bool,
    key_format: str | None,
    provenance_out: str | None,
    unseal_source: str | None,
    unseal_to: str | None,
    via: str | None,
    source_ca: str | None,
    expect_sha256: str | None,
    deadline: float,
    nsm_kind: NsmKind,
    sim_dir: Path | None,
    log_format: str,
    verbose: int,
) -> None:
    """Release keys from the KMS to this attested enclave and write them out.

    \b
    With --unseal IN --unseal-to PATH|-: release one age key and open IN with it instead
    (exit 9 when IN is refused: not for this key, altered or truncated).

    \b
    Asks the KMS for a challenge, gets an attestation document from the NSM binding the
    challenge, a fresh HPKE public key and this request, and checks that the answer is
    signed by the pinned KMS identity and is for this very request before writing anything.
    Retries while the KMS is unavailable (503, no connection), up to --deadline, trying
    each --kms replica in order; never retries a denial, from any replica.
    The default key is one 32-byte key named "default".
    \b
    Exit codes: 0 released, 2 usage, 3 KMS unreachable by the deadline, 4 denied
    (the KMS's code is logged), 5 NSM error, 6 the answer failed authentication,
    7 output error.
    """
    started = time.monotonic()
    log = EventLog(log_format, verbose)

    from keyutil.api import pinned_identity
    from keyutil.client import (
        AnswerRejected,
        KmsDenied,
        KmsUnavailable,
        ReleaseRequest,
        release_keys,
    )
    from keyutil.output import DirSink, FileSink, OutputError, Sink, StdoutSink
    from keyutil.protocol import SUITE_P384, SUITE_X25519, ProtocolError

    if (unseal_source is None) != (unseal_to is None):
        raise click.UsageError("--unseal IN and --unseal-to PATH|- go together")
    if unseal_source is not None:
        to_stdout = True  # for the checks below: the key itself goes nowhere
        if out is not None or out_dir is not None or key_types != ("age",):
            raise click.UsageError("--unseal takes one --type age key and no --out/--out-dir")
    elif via is not None or source_ca is not None or expect_sha256 is not None:
        raise click.UsageError("--via, --source-ca and --expect-sha256 apply to --unseal only")
    if sum((out is not None, out_dir is not None, to_stdout)) != 1:
        raise click.UsageError("give exactly one of --out, --out-dir and --stdout")
    if out is not None and len(key_names) > 1:
        raise click.UsageError("--out writes one key; for several, give --out-dir DIR")
    if fmt != "raw" and not to_stdout:
        raise click.UsageError("--format applies to --stdout only")
    try:  # the same checks as the Python API, keyutil.get_key
        identity = pinned_identity(kms_pubkey, insecure_skip_kms_auth)
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    try:
        request = ReleaseRequest.build(
            key_names,
            lengths=lengths,
            types=key_types,
            suite={"x25519": SUITE_X25519, "p384": SUITE_P384}[suite],
            identity=identity,
            expect_app=expect_app,
        )
    except ProtocolError as e:
        raise click.UsageError(e.message) from None
    if fmt != "raw" and any(k.type != "raw" for k in request.keys):
        raise click.UsageError("--format hex/base64 applies to raw keys only")
    if out_dir is not None and len({k.name for k in request.keys}) != len(request.keys):
        raise click.UsageError("--out-dir writes DIR/NAME: one type per key name")
    _check_typed_options(request.keys, key_format, provenance_out)
    transports = [_transport(url, kms_ca) for url in kms_urls]
    sink: Sink
    if out is not None:
        sink = FileSink(out, allow_persistent=allow_persistent)
    elif out_dir is not None:
        sink = DirSink(out_dir, allow_persistent=allow_persistent)
    else:
        sink = StdoutSink(sys.stdout.buffer, fmt=fmt)
    unsealed: Any = None
    if unseal_to is not None:
        from keyutil.sealing import commands as sealing

        if len(request.keys) != 1:
            raise click.UsageError("--unseal takes one --type age key")
        unsealed = sealing.check_output(log, unseal_to, allow_persistent)
        digest = sealing.sha256_option_value(click.get_current_context(), None, expect_sha256)
    else:
        try:
            sink.check([k.name for k in request.keys])
        except OutputError as e:
            log.fail(EXIT_OUTPUT, "output_error", code=e.code, message=e.message)
    try:
        nsm = open_nsm(nsm_kind, sim_dir=sim_dir)
        release = release_keys(
            transports,
            nsm,
            request,
            deadline_s=deadline - (time.monotonic() - started),
            log=log,
        )
    except NsmError as e:
        log.fail(EXIT_NSM, "nsm_error", code=e.code, message=e.message)
        return
    except KmsUnavailable as e:
        log.fail(EXIT_UNAVAILABLE, "kms_unavailable", code=e.code, message=e.message)
        return
    except KmsDenied as e:
        log.fail(EXIT_DENIED, "denied", code=e.code, status=e.status, message=e.message)
        return
    except AnswerRejected as e:
        log.fail(EXIT_UNAUTHENTICATED, "answer_rejected", code=e.code, message=e.message)
        return
    if provenance_out is not None:
        _write_statement(log, release, provenance_out)
    if unseal_source is not None:
        from keyutil.sealing.age import Identity

        try:
            age_identity = Identity(bytes(release.keys[0].value))
        finally:
            release.wipe()
        sealing.unseal_to(
            log, [age_identity], unseal_source, unsealed, via=via, source_ca=source_ca,
            expect_sha256=digest,
        )
        return
    # Typed keys are written as their type's file (an age identity), raw keys as bytes.
    files = tuple(k if k.type == "raw" else k.private_file(key_format) for k in release.keys)
    try:
        sink.write(files)
    except OutputError as e:
        log.fail(EXIT_OUTPUT, "output_error", code=e.code, message=e.message)
    finally:
        release.wipe()
        for k in files:
            k.wipe()
    log(
        "info",
        "written",
        {"keys": [k.name for k in release.keys], "to": out or out_dir or "stdout"},
    )


@cli.command()
@kms_option
@kms_ca_option
@deadline_option(5.0)
@log_format_option
@verbose_option
def health(
    kms_url: str, kms_ca: str | None, deadline: float, log_format: str, verbose: int
) -> None:
    """Wait until the KMS says it is ready, up to --deadline; print its health JSON.

    \b
    Exit codes: 0 ready, 2 usage, 3 not ready or unreachable by the deadline
    (then stdout has {"status": "unavailable", "error": CODE, "message": TEXT}).
    """
    from keyutil.client import KmsDenied, KmsUnavailable, wait_ready

    log = EventLog(log_format, verbose)
    transport = _transport(kms_url, kms_ca)
    try:
        body = wait_ready(transport, deadline_s=deadline, log=log)
    except (KmsUnavailable, KmsDenied) as e:
        click.echo(json.dumps({"status": "unavailable", "error": e.code, "message": e.message}))
        log.fail(EXIT_UNAVAILABLE, "not_ready", code=e.code, message=e.message)
        return
    click.echo(json.dumps(body))


@cli.command()
@click.option(
    "--listen",
    required=True,
    metavar="URL",
    help="Where the enclave connects: vsock://:PORT (any CID), vsock://CID:PORT, "
    "unix:///PATH or tcp://IP:PORT (IPv6 as tcp://[::1]:PORT).",
)
@click.option(
    "--to",
    "destination",
    required=True,
    metavar="URL",
    envvar="KEYUTIL_PROXY_TO",
    help="The one destination: tcp://HOST:PORT or HOST:PORT (a name or an IP; IPv6 as "
    "[ADDR]:PORT), unix:///PATH, vsock://CID:PORT, or vsock://enclave:NAME:PORT (the "
    "enclave's CID from 'nitro-cli describe-enclaves'). Names are looked up afresh for "
    "every connection.",
)
@click.option(
    "--nitro-cli",
    envvar="KEYUTIL_NITRO_CLI",
    default="nitro-cli",
    help="The nitro-cli program that finds vsock://enclave:NAME:PORT destinations.",
)
@click.option(
    "--allow",
    multiple=True,
    metavar="HOST:PORT",
    help="An allowed destination; repeat for several.",
)
@click.option(
    "--allowlist",
    "allowlist_file",
    envvar="KEYUTIL_PROXY_ALLOWLIST",
    type=click.Path(dir_okay=False),
    help="Allowed destinations in the AWS vsock-proxy format (YAML: allowlist: "
    "[{address: HOST, port: PORT}, ...]); needs PyYAML (the [proxy] extra).",
)
@click.option(
    "--max-connections",
    type=click.IntRange(min=1),
    default=64,
    help="Open connections at most; one more is accepted and closed at once.",
)
@click.option(
    "--idle-timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=60.0,
    help="Close a connection after this many seconds without a byte either way.",
)
@click.option(
    "--connect-timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=5.0,
    help="Seconds to resolve and reach the destination; then the client is closed.",
)
@click.option(
    "--grace",
    type=click.FloatRange(min=0),
    default=5.0,
    help="On SIGTERM/SIGINT, seconds open connections get to finish before they are closed.",
)
@log_format_option
def proxy(
    listen: str,
    destination: str,
    allow: tuple[str, ...],
    allowlist_file: str | None,
    max_connections: int,
    idle_timeout: float,
    connect_timeout: float,
    grace: float,
    log_format: str,
    nitro_cli: str,
) -> None:
    """Forward connections between vsock, unix and TCP, in any direction.

    \b
    On the parent instance:  --listen vsock://:8000 --to kms.example.com:443  (to the KMS)
                             --listen tcp://0.0.0.0:8080 --to vsock://enclave:app:5001
    In the enclave ('keyutil run' starts these from its config):
                             --listen vsock://:5001 --to tcp://127.0.0.1:4000  (inbound)
                             --listen tcp://127.0.0.1:8443 --to vsock://3:8443  (egress)
    \b
    Bytes only: the keys cross this host sealed to the enclave and the KMS's answer is
    signed, so the proxy never needs, and never logs, what it carries.
    \b
    A TCP destination must be on the allowlist (--allow and --allowlist together); with
    neither, the allowlist is the destination itself, as typed. Names and addresses are
    compared as written, not resolved. A destination outside it is refused at start
    (exit 2, nothing listens), and checked again for every connection. unix and vsock
    destinations are local to the machine and take no allowlist.
    \b
    One log line per connection (event "connection"): peer, destination, dest_address,
    bytes_to_dest, bytes_to_client, duration_s and end: client_closed, dest_closed,
    idle_timeout, over_limit, destination_unreachable, refused, shutdown or error.
    \b
    Exit codes: 0 stopped by SIGTERM, 2 usage or configuration (refused
    destination, bad allowlist), 3 cannot listen (address in use, no vsock here),
    130 stopped by SIGINT (Ctrl-C), after the same clean shutdown.
    """
    from keyutil import proxy as p

    log = EventLog(log_format, 0)
    try:
        listen_at = p.parse_listen(listen)
    except p.ProxyConfigError as e:
        raise click.BadParameter(str(e), param_hint="--listen") from None
    try:
        to = p.parse_destination(destination)
    except p.ProxyConfigError as e:
        raise click.BadParameter(str(e), param_hint="--to") from None
    allowlist: p.Allowlist | None = None
    if isinstance(to, p.HostPort):
        try:
            allowlist = p.build_allowlist(to, allow, allowlist_file)
        except p.ProxyConfigError as e:
            log.fail(EXIT_USAGE, "allowlist_invalid", message=str(e))
            return
        try:
            allowlist.check(to)
        except p.Refused as e:
            log.fail(EXIT_USAGE, "refused", destination=str(to), reason=str(e))
            return
    elif allow or allowlist_file:
        raise click.UsageError("--allow and --allowlist apply to TCP destinations only")
    config = p.ProxyConfig(
        listen=listen_at,
        to=to,
        allowlist=allowlist,
        max_connections=max_connections,
        idle_timeout=idle_timeout,
        connect_timeout=connect_timeout,
        grace=grace,
    )
    from keyutil.host.nitro import NitroCli

    server = p.Proxy(config, log, find_enclave=NitroCli(nitro_cli).find_cid)
    try:
        server.open()
    except p.ListenError as e:
        log.fail(EXIT_UNAVAILABLE, "listen_failed", listen=str(listen_at), message=str(e))
        return
    import signal

    stopped_by: list[int] = []

    def stop(signum: int, frame: object) -> None:
        stopped_by.append(signum)
        server.stop()

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, stop)
    server.serve()
    if stopped_by[:1] == [signal.SIGINT]:
        sys.exit(EXIT_INTERRUPTED)


@cli.command("net-up")
@log_format_option
def net_up(log_format: str) -> None:
    """Give the enclave a working loopback: lo up, with 127.0.0.1/8 assigned.

    \b
    A Nitro Enclave starts with lo down and without 127.0.0.1. This sets both through the
    kernel's interface ioctls (no 'ip' or 'ifconfig' needed), checks that a TCP connection
    to 127.0.0.1 works, and logs what it found and did (interface, address, was_up, now_up,
    address_added). Running it again changes nothing. Needs CAP_NET_ADMIN (root in the
    enclave) when something has to change.
    \b
    Exit codes: 0 the loopback works, 8 network set-up error (the code is logged:
    permission_denied, no_such_interface, address_conflict, verify_failed, ...).
    """
    from keyutil.netup import NetUpError, loopback_up

    log = EventLog(log_format, 0)
    try:
        report = loopback_up()
    except NetUpError as e:
        log.fail(EXIT_NETWORK, "net_up_failed", code=e.code, message=e.message)
        return
    log("info", "net_up", report.to_json())


# -- typed keys' provenance (issue 12) --------------------------------------------------------


def _check_typed_options(keys: Sequence[Any], key_format: str | None,
                         provenance_out: str | None) -> None:
    from keyutil import keytypes

    typed = [k for k in keys if k.type != keytypes.DEFAULT_TYPE]
    if key_format is not None:
        for k in typed or keys:
            if key_format not in keytypes.get(k.type).formats:
                raise click.UsageError(
                    f"--key-format {key_format}: a {k.type} key is written as "
                    f"{' or '.join(keytypes.get(k.type).formats)}"
                )
    if provenance_out is not None and len(typed) != 1:
        raise click.UsageError(
            f"--provenance-out takes the statement of one typed key; {len(typed)} asked"
        )


def _write_statement(log: Any, release: Any, path: str) -> None:
    """The statement is public: a plain file (mode 0644), written atomically."""
    statement = next((s for s in release.statements if s is not None), None)
    if statement is None:
        release.wipe()
        log.fail(EXIT_UNAUTHENTICATED, "answer_rejected", code="answer_provenance_missing",
                 message="the KMS sent no provenance statement for the typed key")
        return
    from keyutil.output import OutputError, write_file

    try:  # the safe writer: no predictable temporary, never through a symlink
        write_file(path, statement.to_bytes(), mode=0o644, allow_persistent=True)
    except OutputError as e:
        release.wipe()
        log.fail(EXIT_OUTPUT, "output_error", code="provenance_write", message=e.message)


@cli.command("verify-provenance")
@click.argument("statement_file", metavar="STATEMENT_FILE",
                type=click.Path(dir_okay=False, allow_dash=True))
@click.option("--kms-pubkey", required=True,
              help="The KMS identity to trust, ed25519:BASE64 or @FILE (as get-key takes it).")
@click.option("--application", help="Also require this application (a name or 0x + 64 hex).")
@click.option("--name", "key_name", help="Also require this key name.")
@click.option("--type", "key_type", help="Also require this key type.")
@click.option("--public-key", help="Also require this public key (as the statement writes it).")
@click.option("--chain-id", type=int, help="Also require this chain id.")
@click.option("--contract", help="Also require this allowlist contract address.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object on stdout.")
def verify_provenance(statement_file: str, kms_pubkey: str, application: str | None,
                      key_name: str | None, key_type: str | None, public_key: str | None,
                      chain_id: int | None, contract: str | None, as_json: bool) -> None:
    """Check a provenance statement offline: signed by the KMS identity --kms-pubkey and, for
    secp256k1, by the signer it names (EIP-712; needs eth-account, the [provenance] extra),
    with the address that of its public key. Prints what it proves.

    \b
    Whether the signer is the one registered on chain now is the contract's to say
    (ProvenanceCheck.belongsTo); this command needs no network.
    \b
    Exit codes: 0 valid, 2 usage (unreadable file, bad option, eth-account missing),
    6 the statement is malformed or does not verify ({"error": CODE, ...} with --json).
    """
    from keyutil import protocol, provenance
    from keyutil.api import pinned_identity

    try:
        identity_text = pinned_identity(kms_pubkey, insecure_skip_kms_auth=False)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--kms-pubkey") from None
    assert identity_text is not None
    try:
        identity = protocol.parse_identity(identity_text)
    except protocol.ProtocolError as e:
        raise click.BadParameter(e.message, param_hint="--kms-pubkey") from None
    app = None
    if application is not None:
        try:
            app = provenance.parse_application(application)
        except ValueError as e:
            raise click.BadParameter(str(e), param_hint="--application") from None
    try:
        with click.open_file(statement_file, "rb") as fh:
            data = fh.read(provenance.MAX_STATEMENT_SIZE + 1)
    except OSError as e:
        raise click.BadParameter(f"cannot read it: {e.strerror}",
                                 param_hint="STATEMENT_FILE") from None
    try:
        verified = provenance.verify_statement(
            data, identity, application=app, name=key_name, key_type=key_type,
            public_key=public_key, chain_id=chain_id, contract=contract)
    except provenance.ProvenanceError as e:
        if as_json:
            click.echo(json.dumps({"error": e.code, "message": e.message}))
        _fail(EXIT_USAGE if e.code == "dependency_missing" else EXIT_UNAUTHENTICATED,
              f"{e.code}: {e.message}")
        return
    result = verified.to_json()
    if as_json:
        click.echo(json.dumps({"valid": True, **result}, sort_keys=True))
        return
    click.echo(f"valid: {result['type']} key {result['name']!r} of application "
               f"{result['application']}")
    for field in ("public_key", "address", "kms_identity", "signer", "chain_id", "contract"):
        if field in result:
            click.echo(f"{field:<13} {result[field]}")


# -- the enclave's plumbing: run (in the enclave), logs and wait-ready (on the host) --------


@cli.command("run")
@click.option(
    "--config",
    "config_path",
    required=True,
    type=click.Path(dir_okay=False),
    envvar="KEYUTIL_RUN_CONFIG",
    help="The TOML configuration, baked into the image (so it is measured).",
)
def run_enclave(config_path: str) -> None:
    """The enclave's entrypoint (PID 1): set up, release keys, start the app, supervise it.

    \b
    Steps, in order, each named in the log with its exit code on failure (the app then
    never starts): log (the bridge to the host), net_up 8, tmpfs 7, keys 3-7 (get-key's
    codes, failing over between [kms] urls), sealed 3-9, forward 3, host_settings (optional,
    never fails), workdir 10, app 10. Then it reaps every child, passes SIGTERM/SIGINT to the
    app and exits with the app's status (128+N after signal N).
    \b
    The app's stdout and stderr go to the console and, with [log] to, to the host: the
    host sees them. Reference: docs/deploy.md.
    \b
    Exit codes: the app's own status once it ran; 2 configuration; otherwise the failed
    step's code above (1: an unforeseen error in a step, logged as its step_failed).
    """
    from keyutil.enclave.config import ConfigError, load_config
    from keyutil.enclave.supervisor import Supervisor, become_subreaper

    try:
        config = load_config(config_path)
    except ConfigError as e:
        EventLog("text", 0).fail(EXIT_USAGE, "step_failed", step="config", message=str(e))
        return
    if os.getpid() != 1:
        become_subreaper()
    sys.exit(Supervisor(config).run())


@cli.command("logs")
@click.option(
    "--listen",
    required=True,
    metavar="URL",
    envvar="KEYUTIL_LOGS_LISTEN",
    help="Where enclaves send their logs: vsock://:PORT, unix:///PATH or tcp://IP:PORT.",
)
@click.option(
    "--append",
    "append_path",
    type=click.Path(dir_okay=False),
    envvar="KEYUTIL_LOGS_APPEND",
    help="Also append every line to FILE.",
)
@click.option(
    "--log-format",
    type=click.Choice(["text", "json"]),
    default="text",
    help="Each record on stdout as a text line, or as a JSON object with ts, cid, stream "
    "and line (events: event and its fields).",
)
def logs(listen: str, append_path: str | None, log_format: str) -> None:
    """Print what enclaves send over the log bridge ('keyutil run' with [log] to).

    \b
    One line per record on stdout, with the enclave's CID and the stream (supervisor,
    stdout, stderr); "dropped N lines" when the enclave's buffer overflowed while
    nothing listened; "connected"/"disconnected" (with the wire error, if any) per
    connection. Control characters from the enclave are escaped.
    \b
    Exit codes: 0 stopped by SIGTERM/SIGINT, 2 usage, 3 cannot listen, 7 cannot open
    the --append file.
    """
    import signal
    import threading

    from keyutil import proxy as p
    from keyutil.host.logsink import LogServer, Printer

    log = EventLog("text", 0)
    try:
        listen_at = p.parse_listen(listen)
    except p.ProxyConfigError as e:
        raise click.BadParameter(str(e), param_hint="--listen") from None
    try:
        append = open(append_path, "a", encoding="utf-8") if append_path else None  # noqa: SIM115
    except OSError as e:
        log.fail(EXIT_OUTPUT, "append_failed", path=append_path, message=e.strerror)
        return
    try:
        server = LogServer(listen_at, Printer(sys.stdout, log_format, append))
    except OSError as e:
        log.fail(EXIT_UNAVAILABLE, "listen_failed", listen=str(listen_at), message=str(e))
        return
    log("info", "listening", {"listen": str(listen_at), "append": append_path})

    def stop(*_: Any) -> None:
        threading.Thread(target=server.shutdown, daemon=True).start()

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, stop)
    with server:
        server.serve_forever(poll_interval=0.2)
    if append is not None:
        append.close()


@cli.command("wait-ready")
@click.option(
    "--target",
    required=True,
    metavar="URL",
    envvar="KEYUTIL_WAIT_READY_TARGET",
    help="vsock://CID:PORT, vsock://enclave:NAME:PORT, tcp://HOST:PORT or unix:///PATH.",
)
@click.option(
    "--http",
    "http_path",
    metavar="PATH",
    help="GET this path and wait for a 2xx; without it, a connection that stays open.",
)
@deadline_option(60.0)
@click.option(
    "--nitro-cli",
    envvar="KEYUTIL_NITRO_CLI",
    default="nitro-cli",
    help="The nitro-cli program that finds vsock://enclave:NAME:PORT targets.",
)
@log_format_option
@verbose_option
def wait_ready_command(
    target: str,
    http_path: str | None,
    deadline: float,
    nitro_cli: str,
    log_format: str,
    verbose: int,
) -> None:
    """Wait until the app inside the enclave answers, up to --deadline.

    \b
    A connected vsock is not a live app: a forwarder accepts whether or not the app
    behind it is up. Each attempt asks for an answer (--http PATH: a 2xx; otherwise a
    connection the peer keeps open), with backoff from 0.1 s to 2 s. The target is
    looked up again at every attempt (an enclave by name follows a restart).
    \b
    Exit codes: 0 ready (stdout: {"status": "ready", ...}), 2 usage, 3 not ready by the
    deadline (stdout: {"status": "not_ready", "error": LAST ERROR}).
    """
    from keyutil import proxy as p
    from keyutil.host.nitro import NitroCli
    from keyutil.host.ready import GaveUp, check_once, wait_ready

    log = EventLog(log_format, verbose)
    try:
        dest = p.parse_destination(target)
    except p.ProxyConfigError as e:
        raise click.BadParameter(str(e), param_hint="--target") from None
    if http_path is not None and not http_path.startswith("/"):
        raise click.BadParameter("expected a path starting with /", param_hint="--http")
    finder = NitroCli(nitro_cli).find_cid

    def attempt(n: int, error: str | None) -> None:
        log("debug", "attempt", {"attempt": n, "error": error})

    result = wait_ready(
        lambda timeout: check_once(dest, http_path, timeout, find_enclave=finder),
        deadline,
        on_attempt=attempt,
    )
    answer: dict[str, Any] = {"target": target, "attempts": result.attempts}
    if isinstance(result, GaveUp):
        click.echo(json.dumps({"status": "not_ready", **answer, "error": result.last_error}))
        log.fail(EXIT_UNAVAILABLE, "not_ready", attempts=result.attempts, error=result.last_error)
        return
    answer.update(elapsed_s=result.elapsed_s, detail=result.detail)
    click.echo(json.dumps({"status": "ready", **answer}))


# The sealing commands (seal, unseal, recipient, exec) live with the age code and reuse this
# module's options, so they are registered last. Hidden from mypy, which would otherwise see an
# import cycle and lose the types of those options.
if not TYPE_CHECKING:
    from keyutil.sealing.commands import register as _register_sealing

    _register_sealing(cli)


# Every option's variable, set on the option so that --help shows it (also under CliRunner).
ENVVARS = option_envvars(cli, "KEYUTIL")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code. ``argv`` lets tests call the CLI in-process."""
    return run(cli, argv, prog_name="keyutil", prefix="KEYUTIL")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
