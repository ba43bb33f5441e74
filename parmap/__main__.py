"""``python -m parmap``: the command line (see :mod:`parmap._cli`)."""

import sys

from ._cli import main

sys.exit(main())
