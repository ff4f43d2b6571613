"""``python -m iris_devstack ...``: the same as the ``iris-devstack`` command."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
