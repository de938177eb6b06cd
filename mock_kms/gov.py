"""``kms-gov``: governance of the on-chain image allowlist (deploy, add, remove, list, check).

    $ export KMS_GOV_RPC_URL=http://127.0.0.1:8545 KMS_GOV_CHAIN_ID=31337
    $ export KMS_GOV_PRIVATE_KEY=0x...          # or --keystore FILE (+ KMS_GOV_KEYSTORE_PASSWORD)
    $ export KMS_GOV_CONTRACT=$(kms-gov deploy --json | jq -r .address)
    $ nitro-cli describe-eif --eif-path app.eif | kms-gov add-image --measurements - --app billing
    $ kms-gov check 0x81c6...   # exit 0 allowed, 1 not allowed

In-process (tests): ``main(["check", HASH, "--json"])`` returns the exit code.

Signing keys never come from the command line: ``KMS_GOV_PRIVATE_KEY`` or an encrypted JSON
keystore (``--keystore``; password from ``KMS_GOV_KEYSTORE_PASSWORD`` or a prompt). With
``--calldata`` nothing is signed: the transaction is printed for a multisig to propose, after
it has been simulated as the contract's owner.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import click
from eth_account import Account
from eth_account.signers.local import LocalAccount
from web3 import Web3
from web3.providers.rpc import HTTPProvider

from keyutil.measurements import MeasurementError, os_image_hash, pcrs_from_nitro_cli
from mock_kms import chain
from mock_kms.errors import ErrorCode, InvalidError, KmsError

log = logging.getLogger("kms-gov")

# Stable exit codes (documented in --help; never renumbered).
EXIT_OK = 0
EXIT_NOT_ALLOWED = 1
EXIT_USAGE = 2
EXIT_UNAVAILABLE = 3
EXIT_MISCONFIGURED = 4
EXIT_NOT_OWNER = 5
EXIT_REVERTED = 6
EXIT_SIGNING_KEY = 7

_EXIT_BY_CODE = {
    ErrorCode.CHAIN_UNAVAILABLE: EXIT_UNAVAILABLE,
    ErrorCode.CHAIN_MISCONFIGURED: EXIT_MISCONFIGURED,
    ErrorCode.NOT_OWNER: EXIT_NOT_OWNER,
    ErrorCode.TRANSACTION_REVERTED: EXIT_REVERTED,
    ErrorCode.SIGNING_KEY_UNAVAILABLE: EXIT_SIGNING_KEY,
}

EXIT_CODES_HELP = """\b
Exit codes:
  0  success (check: the image is allowed)
  1  check: the image is not allowed
  2  bad input or usage (hash, application, address, measurements, debug or zero hash);
     nothing was sent
  3  the RPC endpoint did not answer or failed (chain_unavailable)
  4  wrong chain id, or no contract code at the address (chain_misconfigured)
  5  the signer is not the owner (or not the pending owner) (not_owner)
  6  the contract refused or reverted the transaction (transaction_reverted)
  7  no usable signing key: missing, malformed, or wrong keystore password
  130  interrupted (Ctrl-C)
"""

F = TypeVar("F", bound=Callable[..., Any])


@dataclasses.dataclass(frozen=True)
class Output:
    """Where results go: stdout, as text or as one JSON object."""

    as_json: bool

    def result(self, obj: dict[str, Any], text: str) -> None:
        click.echo(json.dumps(obj, sort_keys=True) if self.as_json else text)

    def error(self, err: KmsError) -> int:
        click.echo(f"kms-gov: error: {err.message}", err=True)
        if self.as_json:
            click.echo(json.dumps(err.to_json(), sort_keys=True))
        return _EXIT_BY_CODE.get(err.code, EXIT_USAGE)


def _connection_options(f: F) -> F:
    options = [
        click.option("--rpc-url", envvar="KMS_GOV_RPC_URL", metavar="URL",
                     help="JSON-RPC endpoint, http(s). [env KMS_GOV_RPC_URL]"),
        click.option("--chain-id", "chain_id", envvar="KMS_GOV_CHAIN_ID", type=int,
                     metavar="N",
                     help="Refuse to act unless the endpoint serves this chain. "
                     "[env KMS_GOV_CHAIN_ID]"),
        click.option("--timeout", envvar="KMS_GOV_TIMEOUT", type=click.FloatRange(0.1, 600),
                     default=10.0, show_default=True,
                     help="Seconds for each RPC request. [env KMS_GOV_TIMEOUT]"),
        click.option("--json", "as_json", envvar="KMS_GOV_JSON", is_flag=True,
                     help="Print one JSON object on stdout. [env KMS_GOV_JSON]"),
        click.option("-v", "--verbose", envvar="KMS_GOV_VERBOSE", is_flag=True,
                     help="Log progress on stderr. [env KMS_GOV_VERBOSE]"),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _contract_option(f: F) -> F:
    return click.option("--contract", envvar="KMS_GOV_CONTRACT", metavar="ADDRESS",
                        help="The ImageAllowlist contract. [env KMS_GOV_CONTRACT]")(f)


def _signing_options(f: F) -> F:
    f = click.option("--calldata", envvar="KMS_GOV_CALLDATA", is_flag=True,
                     help="Print the transaction (to, data, value) as JSON for a multisig "
                     "instead of signing and sending it. [env KMS_GOV_CALLDATA]")(f)
    f = click.option("--keystore", envvar="KMS_GOV_KEYSTORE",
                     type=click.Path(dir_okay=False),
                     help="Encrypted JSON keystore of the signer; password from "
                     "KMS_GOV_KEYSTORE_PASSWORD or a prompt. Without it the key comes from "
                     "KMS_GOV_PRIVATE_KEY. [env KMS_GOV_KEYSTORE]")(f)
    f = click.option("--receipt-timeout", envvar="KMS_GOV_RECEIPT_TIMEOUT",
                     type=click.FloatRange(1, 3600), default=120.0, show_default=True,
                     help="Seconds to wait for the transaction to be mined. "
                     "[env KMS_GOV_RECEIPT_TIMEOUT]")(f)
    return f


# --- steps (each raises KmsError; the command wrapper maps it to an exit code) -------------


def _connect(rpc_url: str | None, timeout: float) -> Web3:
    if not rpc_url:
        raise click.UsageError("--rpc-url (or KMS_GOV_RPC_URL) is required")
    if not rpc_url.startswith(("http://", "https://")):
        raise click.UsageError("--rpc-url must be an http:// or https:// URL")
    provider = HTTPProvider(
        rpc_url, request_kwargs={"timeout": timeout}, exception_retry_configuration=None
    )
    return Web3(provider, middleware=[])


def _require_contract(contract: str | None) -> str:
    if not contract:
        raise click.UsageError("--contract (or KMS_GOV_CONTRACT) is required")
    return chain.parse_address(contract)


def _load_signer(keystore: str | None, *, stdin_busy: bool = False) -> LocalAccount:
    """The signing account, from a keystore file or KMS_GOV_PRIVATE_KEY. Never echoes key
    material or passwords, not even in a chained exception."""
    if keystore:
        try:
            with open(keystore, encoding="utf-8") as fh:
                encrypted = json.load(fh)
        except (OSError, json.JSONDecodeError) as e:
            raise InvalidError(
                ErrorCode.SIGNING_KEY_UNAVAILABLE,
                f"cannot read the keystore {keystore}: {type(e).__name__}",
            ) from None
        password = os.environ.get("KMS_GOV_KEYSTORE_PASSWORD")
        if password is None:
            if stdin_busy or not sys.stdin.isatty():
                raise InvalidError(
                    ErrorCode.SIGNING_KEY_UNAVAILABLE,
                    "the keystore needs a password: set KMS_GOV_KEYSTORE_PASSWORD "
                    "(stdin is not a terminal to prompt on)",
                )
            password = click.prompt("Keystore password", hide_input=True, err=True)
        try:
            key = Account.decrypt(encrypted, password)
        except Exception:  # never chain: a message could echo key material
            raise InvalidError(
                ErrorCode.SIGNING_KEY_UNAVAILABLE,
                f"cannot decrypt the keystore {keystore}: wrong password or not a keystore",
            ) from None
        account: LocalAccount = Account.from_key(key)
        return account
    raw = os.environ.get("KMS_GOV_PRIVATE_KEY")
    if not raw:
        raise InvalidError(
            ErrorCode.SIGNING_KEY_UNAVAILABLE,
            "no signing key: set KMS_GOV_PRIVATE_KEY or pass --keystore FILE "
            "(or use --calldata to print the transaction instead)",
        )
    try:
        account = Account.from_key(raw.strip())
        return account
    except Exception:  # never chain: a message could echo key material
        raise InvalidError(
            ErrorCode.SIGNING_KEY_UNAVAILABLE,
            "KMS_GOV_PRIVATE_KEY is not a private key (expected 0x + 64 hex digits)",
        ) from None


def _check_owner(w3: Web3, contract: str, sender: str, *, pending: bool = False) -> None:
    expected = chain.call(chain.contract(w3, contract), "pendingOwner" if pending else "owner")
    if expected.lower() != sender.lower():
        role = "pending owner" if pending else "owner"
        raise InvalidError(
            ErrorCode.NOT_OWNER,
            f"the signer {sender} is not the {role} ({expected}) of the allowlist "
            f"contract {contract}; nothing was sent",
        )


@dataclasses.dataclass(frozen=True)
class _Write:
    """One write command's settings, gathered from its options."""

    rpc_url: str | None
    chain_id: int | None
    timeout: float
    keystore: str | None
    calldata: bool
    receipt_timeout: float
    stdin_busy: bool = False


def _execute(out: Output, opts: _Write, tx: chain.TxRequest, *, owner_role: str = "owner",
             describe: str, extra: dict[str, Any] | None = None,
             signer: LocalAccount | None = None) -> None:
    """Act: simulate and send ``tx`` (or print it as calldata), then report the receipt."""
    if signer is None and not opts.calldata:
        signer = _load_signer(opts.keystore, stdin_busy=opts.stdin_busy)
    w3 = _connect(opts.rpc_url, opts.timeout)
    chain_id = chain.check_chain(w3, tx.to, opts.chain_id)
    log.info("chain %d answers%s", chain_id, f"; contract {tx.to} has code" if tx.to else "")
    if opts.calldata:
        if tx.to is not None:
            # Simulate as the party that will send it, so a multisig is not handed a
            # transaction that reverts.
            role = "pendingOwner" if owner_role == "pending" else "owner"
            sender = chain.call(chain.contract(w3, tx.to), role)
            chain.eth_call(w3, tx.to, tx.data, sender=sender)
        out.result(tx.to_json(chain_id), json.dumps(tx.to_json(chain_id), sort_keys=True))
        return
    assert signer is not None
    if tx.to is not None:
        _check_owner(w3, tx.to, signer.address, pending=owner_role == "pending")
    log.info("sending %s from %s", describe, signer.address)
    receipt = chain.send(w3, tx, sender=signer.address, sign=signer,
                         receipt_timeout=opts.receipt_timeout)
    result: dict[str, Any] = {
        "tx_hash": receipt.tx_hash, "block": receipt.block, "gas_used": receipt.gas_used,
        "chain_id": chain_id, "from": signer.address, **(extra or {}),
    }
    if receipt.contract_address:
        result["address"] = receipt.contract_address
    text = (f"{describe}: mined in block {receipt.block} "
            f"(tx {receipt.tx_hash}, gas {receipt.gas_used})")
    if receipt.contract_address:
        text = f"{receipt.contract_address}\n{text}"
    out.result(result, text)


def _run(as_json: bool, verbose: bool, body: Callable[[Output], int | None]) -> None:
    """Run one command body; KmsError -> one sentence on stderr and a stable exit code."""
    if verbose:
        logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                            format="kms-gov: %(message)s")
    out = Output(as_json)
    try:
        code = body(out) or EXIT_OK
    except KmsError as err:
        code = out.error(err)
    ctx = click.get_current_context()
    ctx.exit(code)


def _image_hash_arg(text: str) -> bytes:
    image_hash = chain.parse_image_hash(text)
    chain.refuse_unregistrable(image_hash)
    return image_hash


# --- commands ---------------------------------------------------------------------------


@click.group(epilog=EXIT_CODES_HELP, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="nitro-keyrelease", prog_name="kms-gov")
def cli() -> None:
    """Govern the ImageAllowlist contract: which enclave images may obtain keys, and for
    which application. Results on stdout, logs and errors on stderr."""


@cli.command(epilog=EXIT_CODES_HELP)
@click.option("--owner", envvar="KMS_GOV_OWNER", metavar="ADDRESS",
              help="Initial owner (e.g. a multisig); default: the signer. [env KMS_GOV_OWNER]")
@_signing_options
@_connection_options
def deploy(owner: str | None, rpc_url: str | None, chain_id: int | None, timeout: float,
           as_json: bool, verbose: bool, keystore: str | None, calldata: bool,
           receipt_timeout: float) -> None:
    """Deploy a new ImageAllowlist contract; prints its address."""
    def body(out: Output) -> None:
        opts = _Write(rpc_url, chain_id, timeout, keystore, calldata, receipt_timeout)
        if calldata and owner is None:
            raise click.UsageError("deploy --calldata needs --owner")
        signer = None if calldata else _load_signer(keystore)
        initial = chain.parse_address(owner) if owner is not None else None
        if initial is None:
            assert signer is not None
            initial = signer.address
        _execute(out, opts, chain.deploy_request(initial), describe="deploy",
                 extra={"owner": initial}, signer=signer)
    _run(as_json, verbose, body)


@cli.command("add-image", epilog=EXIT_CODES_HELP)
@click.argument("image_hash", metavar="[HASH]", required=False)
@click.option("--app", "app", envvar="KMS_GOV_APP", required=True, metavar="APP",
              help="Application id: 0x + 64 hex digits, or a name of 1..32 printable ASCII "
              "characters (stored left-aligned, zero-padded). [env KMS_GOV_APP]")
@click.option("--measurements", type=click.File("r"), metavar="FILE|-",
              help="nitro-cli build-enclave / describe-eif JSON (stdout only, not 2>&1); "
              "the hash is sha256(PCR0||PCR1||PCR2) of 48-byte SHA-384 PCRs. '-' reads stdin.")
@_contract_option
@_signing_options
@_connection_options
def add_image(image_hash: str | None, app: str, measurements: Any, contract: str | None,
              rpc_url: str | None, chain_id: int | None, timeout: float, as_json: bool,
              verbose: bool, keystore: str | None, calldata: bool,
              receipt_timeout: float) -> None:
    """Allow an image (by HASH or --measurements) for application APP.

    Already allowed for the same application: reported, nothing sent, exit 0."""
    def body(out: Output) -> None:
        if (image_hash is None) == (measurements is None):
            raise click.UsageError("give exactly one of HASH or --measurements")
        if measurements is not None:
            try:
                pcrs = pcrs_from_nitro_cli(measurements.read())
            except MeasurementError as e:
                raise InvalidError(ErrorCode.MEASUREMENTS_INVALID, str(e)) from None
            digest = _image_hash_arg(os_image_hash(*pcrs))
        else:
            assert image_hash is not None
            digest = _image_hash_arg(image_hash)
        application = chain.parse_application(app)
        address = _require_contract(contract)
        stdin_busy = measurements is not None and measurements.name == "<stdin>"
        opts = _Write(rpc_url, chain_id, timeout, keystore, calldata, receipt_timeout,
                      stdin_busy)
        extra = {"image_hash": "0x" + digest.hex(),
                 "application": chain.format_application(application)}
        if not calldata:
            # Idempotent for release pipelines: re-running the same registration is a no-op.
            w3 = _connect(rpc_url, timeout)
            chain.check_chain(w3, address, chain_id)
            allowed, current = chain.read_image_status(chain.contract(w3, address), digest)
            if allowed and current == application:
                out.result({**extra, "already_allowed": True},
                           f"0x{digest.hex()} is already allowed for "
                           f"{chain.format_application(current)}; nothing sent")
                return
        _execute(out, opts, chain.add_request(address, digest, application),
                 describe=f"add-image 0x{digest.hex()}", extra=extra)
    _run(as_json, verbose, body)


@cli.command("remove-image", epilog=EXIT_CODES_HELP)
@click.argument("image_hash", metavar="HASH")
@_contract_option
@_signing_options
@_connection_options
def remove_image(image_hash: str, contract: str | None, rpc_url: str | None,
                 chain_id: int | None, timeout: float, as_json: bool, verbose: bool,
                 keystore: str | None, calldata: bool, receipt_timeout: float) -> None:
    """Revoke an image. The KMS stops releasing keys to it within its revocation delay."""
    def body(out: Output) -> None:
        digest = chain.parse_image_hash(image_hash)
        address = _require_contract(contract)
        opts = _Write(rpc_url, chain_id, timeout, keystore, calldata, receipt_timeout)
        _execute(out, opts, chain.remove_request(address, digest),
                 describe=f"remove-image 0x{digest.hex()}",
                 extra={"image_hash": "0x" + digest.hex()})
    _run(as_json, verbose, body)


@cli.command("transfer-ownership", epilog=EXIT_CODES_HELP)
@click.argument("new_owner", metavar="NEW_OWNER")
@_contract_option
@_signing_options
@_connection_options
def transfer_ownership(new_owner: str, contract: str | None, rpc_url: str | None,
                       chain_id: int | None, timeout: float, as_json: bool, verbose: bool,
                       keystore: str | None, calldata: bool, receipt_timeout: float) -> None:
    """Step 1 of 2: name NEW_OWNER as pending owner (the zero address cancels)."""
    def body(out: Output) -> None:
        target = chain.parse_address(new_owner)
        address = _require_contract(contract)
        opts = _Write(rpc_url, chain_id, timeout, keystore, calldata, receipt_timeout)
        _execute(out, opts, chain.transfer_request(address, target),
                 describe=f"transfer-ownership to {target}", extra={"pending_owner": target})
    _run(as_json, verbose, body)


@cli.command("accept-ownership", epilog=EXIT_CODES_HELP)
@_contract_option
@_signing_options
@_connection_options
def accept_ownership(contract: str | None, rpc_url: str | None, chain_id: int | None,
                     timeout: float, as_json: bool, verbose: bool, keystore: str | None,
                     calldata: bool, receipt_timeout: float) -> None:
    """Step 2 of 2: the pending owner (the signer) takes over."""
    def body(out: Output) -> None:
        address = _require_contract(contract)
        opts = _Write(rpc_url, chain_id, timeout, keystore, calldata, receipt_timeout)
        _execute(out, opts, chain.accept_request(address), owner_role="pending",
                 describe="accept-ownership")
    _run(as_json, verbose, body)


@cli.command(epilog=EXIT_CODES_HELP)
@click.argument("image_hash", metavar="HASH")
@_contract_option
@_connection_options
def check(image_hash: str, contract: str | None, rpc_url: str | None, chain_id: int | None,
          timeout: float, as_json: bool, verbose: bool) -> None:
    """Exit 0 and print the application when HASH is allowed; exit 1 when it is not."""
    def body(out: Output) -> int:
        digest = chain.parse_image_hash(image_hash)
        address = _require_contract(contract)
        w3 = _connect(rpc_url, timeout)
        chain.check_chain(w3, address, chain_id)
        allowed, app = chain.read_image_status(chain.contract(w3, address), digest)
        result = {
            "image_hash": "0x" + digest.hex(), "allowed": allowed,
            "application": chain.format_application(app) if allowed else None,
            "application_hex": "0x" + app.hex() if allowed else None,
        }
        text = (f"allowed: application {chain.format_application(app)}" if allowed
                else f"not allowed: 0x{digest.hex()}")
        out.result(result, text)
        return EXIT_OK if allowed else EXIT_NOT_ALLOWED
    _run(as_json, verbose, body)


@cli.command("list", epilog=EXIT_CODES_HELP)
@click.option("--from-block", type=click.IntRange(0), default=None,
              help="First block to scan; default: the contract's deployment block.")
@click.option("--chunk", type=click.IntRange(1), default=10_000, show_default=True,
              help="Blocks per eth_getLogs request.")
@_contract_option
@_connection_options
def list_images(from_block: int | None, chunk: int, contract: str | None, rpc_url: str | None,
                chain_id: int | None, timeout: float, as_json: bool, verbose: bool) -> None:
    """Every image ever registered (from the contract's events): hash, application, block
    of the last registration, block of a later removal, and whether it is allowed now."""
    def body(out: Output) -> None:
        address = _require_contract(contract)
        w3 = _connect(rpc_url, timeout)
        cid = chain.check_chain(w3, address, chain_id)
        allowlist = chain.contract(w3, address)
        start = from_block if from_block is not None else chain.call(allowlist, "deploymentBlock")
        with chain.chain_errors("reading the block number"):
            head = int(w3.eth.block_number)
        rows: dict[bytes, dict[str, Any]] = {}
        for event in chain.read_events(allowlist, start, head, chunk):
            if event.added and event.application is not None:
                rows[event.image_hash] = {
                    "image_hash": "0x" + event.image_hash.hex(),
                    "application": chain.format_application(event.application),
                    "application_hex": "0x" + event.application.hex(),
                    "added_block": event.block, "removed_block": None,
                }
            elif event.image_hash in rows:
                rows[event.image_hash]["removed_block"] = event.block
        for digest, row in rows.items():
            row["allowed"] = chain.read_image_status(allowlist, digest, head)[0]
        images = list(rows.values())
        lines = [
            f"{r['image_hash']}  {r['application']}  added@{r['added_block']}  "
            + ("allowed" if r["allowed"] else f"removed@{r['removed_block']}")
            for r in images
        ]
        out.result({"contract": address, "chain_id": cid, "block": head, "images": images},
                   "\n".join(lines) if lines else "no images registered")
    _run(as_json, verbose, body)


@cli.command(epilog=EXIT_CODES_HELP)
@_contract_option
@_connection_options
def info(contract: str | None, rpc_url: str | None, chain_id: int | None, timeout: float,
         as_json: bool, verbose: bool) -> None:
    """The contract's owner, pending owner, chain and deployment block."""
    def body(out: Output) -> None:
        address = _require_contract(contract)
        w3 = _connect(rpc_url, timeout)
        cid = chain.check_chain(w3, address, chain_id)
        allowlist = chain.contract(w3, address)
        owner, pending, block = (chain.call(allowlist, f)
                                 for f in ("owner", "pendingOwner", "deploymentBlock"))
        pending_out = None if int(pending, 16) == 0 else pending
        out.result(
            {"contract": address, "chain_id": cid, "owner": owner,
             "pending_owner": pending_out, "deployment_block": block},
            f"contract {address} on chain {cid}\nowner {owner}\n"
            f"pending owner {pending_out or '-'}\ndeployed in block {block}",
        )
    _run(as_json, verbose, body)


# --- the KMS's secp256k1 signer (provenance statements, issue 12) -----------------------


@cli.command("set-signer", epilog=EXIT_CODES_HELP)
@click.argument("signer_address", metavar="ADDRESS")
@_contract_option
@_signing_options
@_connection_options
def set_signer(signer_address: str, contract: str | None, rpc_url: str | None,
               chain_id: int | None, timeout: float, as_json: bool, verbose: bool,
               keystore: str | None, calldata: bool, receipt_timeout: float) -> None:
    """Register ADDRESS as the KMS's secp256k1 signer (`mock-kms signer show` prints it).

    Contracts that check provenance statements (ProvenanceCheck.sol) accept only statements
    signed by the registered signer: registering a new one (rotation) makes the old one's
    statements stop verifying at once, and the KMS signs with the new one within its
    revocation delay. The zero address unregisters. Emits SignerChanged."""
    from mock_kms import signer

    def body(out: Output) -> None:
        target = chain.parse_address(signer_address)
        address = _require_contract(contract)
        opts = _Write(rpc_url, chain_id, timeout, keystore, calldata, receipt_timeout)
        _execute(out, opts, signer.set_signer_request(address, target),
                 describe=f"set-signer {target}", extra={"signer": target})
    _run(as_json, verbose, body)


@cli.command("signer", epilog=EXIT_CODES_HELP)
@_contract_option
@_connection_options
def show_signer(contract: str | None, rpc_url: str | None, chain_id: int | None,
                timeout: float, as_json: bool, verbose: bool) -> None:
    """Print the registered KMS signer (the zero address: none)."""
    from mock_kms import signer

    def body(out: Output) -> None:
        address = _require_contract(contract)
        w3 = _connect(rpc_url, timeout)
        cid = chain.check_chain(w3, address, chain_id)
        current = signer.read_signer(w3, address)
        out.result({"contract": address, "chain_id": cid, "signer": current}, current)
    _run(as_json, verbose, body)


def main(argv: Sequence[str] | None = None) -> int:
    """The console script; returns the exit code (callable in-process by tests)."""
    from keyutil.cliutil import run

    return run(
        cli,
        argv,
        prog_name="kms-gov",
        prefix="KMS_GOV",
        other_envvars=("KMS_GOV_KEYSTORE_PASSWORD", "KMS_GOV_PRIVATE_KEY"),
    )
