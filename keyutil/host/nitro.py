"""An enclave's CID by its name, from ``nitro-cli describe-enclaves``.

    >>> from keyutil.host.nitro import pick_cid
    >>> pick_cid('[{"EnclaveName": "app", "EnclaveID": "i-0-enc1", "EnclaveCID": 16, '
    ...          '"State": "RUNNING"}]', "app")
    16

``nitro-cli run-enclave`` gives an enclave a new CID at every start (unless pinned with
``--enclave-cid``), so whatever connects into it by CID has to be restarted with it. A
destination named ``vsock://enclave:NAME:PORT`` is looked up here instead, at every
connection. describe-enclaves prints a JSON array of objects with ``EnclaveName``,
``EnclaveID``, ``ProcessID``, ``EnclaveCID``, ``NumberOfCPUs``, ``CPUIDs``, ``MemoryMiB``,
``State`` (``RUNNING``, ``TERMINATING``) and ``Flags``; only RUNNING ones count. The
nitro-cli path is injectable (``KEYUTIL_NITRO_CLI``) so that tests use a stand-in printing
that format.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess

MAX_DESCRIBE_BYTES = 1 << 20
MIN_ENCLAVE_CID = 4  # 0..2 are reserved, 3 is the parent instance


class EnclaveNotFound(LookupError):
    """No usable RUNNING enclave by that name (the message says what was found instead)."""


def pick_cid(describe_output: str | bytes, name: str) -> int:
    """Parse describe-enclaves' JSON and return the CID of the one RUNNING enclave ``name``
    (its EnclaveName or its EnclaveID)."""
    try:
        enclaves = json.loads(describe_output)
    except (ValueError, UnicodeDecodeError):
        raise EnclaveNotFound("nitro-cli describe-enclaves did not print JSON") from None
    if not isinstance(enclaves, list):
        raise EnclaveNotFound("nitro-cli describe-enclaves: expected a JSON array")
    named = [
        e
        for e in enclaves
        if isinstance(e, dict) and name in (e.get("EnclaveName"), e.get("EnclaveID"))
    ]
    running = [e for e in named if str(e.get("State", "")).upper() == "RUNNING"]
    if not running:
        states = ", ".join(str(e.get("State")) for e in named) or "none listed"
        raise EnclaveNotFound(f"no running enclave named {name!r} (found: {states})")
    if len(running) > 1:
        raise EnclaveNotFound(f"{len(running)} running enclaves named {name!r}")
    cid = running[0].get("EnclaveCID")
    if type(cid) is not int or not MIN_ENCLAVE_CID <= cid < 2**32:
        raise EnclaveNotFound(f"enclave {name!r}: EnclaveCID {cid!r} is not an enclave's CID")
    return cid


@dataclasses.dataclass(frozen=True)
class NitroCli:
    """The nitro-cli program to ask."""

    path: str = "nitro-cli"

    @classmethod
    def from_env(cls) -> NitroCli:
        return cls(os.environ.get("KEYUTIL_NITRO_CLI") or "nitro-cli")

    def find_cid(self, name: str, timeout: float) -> int:
        """Run ``describe-enclaves`` (bounded by ``timeout``) and pick ``name``'s CID."""
        try:
            done = subprocess.run(
                [self.path, "describe-enclaves"],
                capture_output=True,
                timeout=max(timeout, 0.1),
                check=False,
                stdin=subprocess.DEVNULL,
            )
        except subprocess.TimeoutExpired:
            raise EnclaveNotFound(f"{self.path} describe-enclaves took over {timeout:g}s") from None
        except OSError as e:
            raise EnclaveNotFound(f"cannot run {self.path}: {e.strerror}") from None
        if done.returncode != 0:
            raise EnclaveNotFound(f"{self.path} describe-enclaves exited {done.returncode}")
        return pick_cid(done.stdout[:MAX_DESCRIBE_BYTES], name)
