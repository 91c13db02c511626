"""``python -m paramreg``: see :mod:`paramreg.cli`."""

import sys

from .tools.cli import main

sys.exit(main())
