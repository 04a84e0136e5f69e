"""``python -m autoresearch``: the same command line as the ``autoresearch`` console script."""

import sys

from .cli import main

sys.exit(main())
