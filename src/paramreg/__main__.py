"""``python -m paramreg``: see :mod:`paramreg.cli`."""

import sys

from .cli import main

sys.exit(main())
