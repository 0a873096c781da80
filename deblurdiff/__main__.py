"""``python -m deblurdiff INPUT... -o OUT_DIR``: see :mod:`deblurdiff.cli`."""

import sys

from .cli import main

sys.exit(main())
