"""``python -m deblurdiff.space``: see :mod:`deblurdiff.space.deploy`."""

import sys

from .deploy import main

sys.exit(main())
