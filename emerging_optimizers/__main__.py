"""``python -m emerging_optimizers`` runs the ``emopt`` command-line tool."""

import sys

from emerging_optimizers.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
