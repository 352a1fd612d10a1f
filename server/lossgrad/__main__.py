"""``python -m lossgrad``: the same as the ``lossgrad`` console script."""

import sys

from .cli import main

sys.exit(main())
