"""``python -m keyutil``: the same as the ``keyutil`` command (``keyutil run`` starts its
get-key this way, with the interpreter it runs on), exit status included."""

import sys

from keyutil.cli import main

sys.exit(main())
