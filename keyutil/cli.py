"""``keyutil``: the in-enclave client's command line.

    $ keyutil sim init /tmp/sim --pcr0 $(printf 'aa%.0s' {1..48})
    $ keyutil attest --nsm simulator --sim-dir /tmp/sim --nonce 00ff --out doc.cose

Results on stdout, logs on stderr. Every option is also an environment variable,
``KEYUTIL_<COMMAND>_<OPTION>`` (``KEYUTIL_ATTEST_OUT``), and the NSM choice is ``KEYUTIL_NSM``
and ``KEYUTIL_SIM_DIR`` for every command.
Exit codes are stable: 0 success, 2 usage, 5 NSM error, 7 output error.
"""

from __future__ import annotations

import base64
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import click

from keyutil.nsm import NsmError, NsmKind, open_nsm

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_NSM = 5
EXIT_OUTPUT = 7


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
def cli() -> None:
    """Attested key release inside an AWS Nitro Enclave.

    \b
    Exit codes: 0 success, 2 usage, 5 NSM error, 7 output error.
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
    try:
        tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
        tmp.write_bytes(document)
        os.replace(tmp, out)
    except OSError as e:
        _fail(EXIT_OUTPUT, f"cannot write {out}: {e.strerror}")


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
        _fail(EXIT_USAGE if e.code == "sim_exists" else EXIT_NSM, f"{e.code}: {e.message}")
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


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point; ``argv`` lets tests call the CLI in-process."""
    cli.main(
        args=list(argv) if argv is not None else None,
        prog_name="keyutil",
        auto_envvar_prefix="KEYUTIL",
    )


if __name__ == "__main__":  # pragma: no cover
    main()
