"""keyutil: attested key release inside an AWS Nitro Enclave.

    >>> import keyutil
    >>> keys = keyutil.get_key(                                        # doctest: +SKIP
    ...     "vsock://3:8000", kms_pubkey="@/etc/keyutil/kms.pub", keys=["app"]
    ... )
    >>> keys["app"]                                                   # doctest: +SKIP
    bytearray(b'...32 bytes...')

``get_key`` is :func:`keyutil.api.get_key`; the command line is ``keyutil get-key``.
Names are looked up on first use, so ``import keyutil`` stays as fast as the enclave's
boot needs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from keyutil.api import get_key as get_key

    __version__: str

__all__ = ["__version__", "get_key"]


def __getattr__(name: str) -> Any:
    if name == "__version__":
        from importlib.metadata import version

        return version("nitro-keyrelease")
    if name == "get_key":
        from keyutil.api import get_key

        return get_key
    raise AttributeError(f"module 'keyutil' has no attribute {name!r}")
