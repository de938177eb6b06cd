"""Console-script entry points that must answer Ctrl-C even while their module imports.

``kms-gov`` imports web3, which takes a second or more: a Ctrl-C then would print the
import's traceback. This module imports nothing heavy, so the interrupt is caught here.
"""

from __future__ import annotations

import sys


def kms_gov() -> int:
    try:
        from mock_kms.gov import main
    except KeyboardInterrupt:
        sys.stderr.write("\nkms-gov: interrupted\n")
        return 130
    return main()
