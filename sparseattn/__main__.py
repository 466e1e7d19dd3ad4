"""``python -m sparseattn``: the same command line as the ``sparseattn`` script."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
