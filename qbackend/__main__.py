"""``python -m qbackend``: the command line (see :mod:`qbackend.cli`)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
