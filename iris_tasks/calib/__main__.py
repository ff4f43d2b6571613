"""``python -m iris_tasks.calib ...`` (same commands as ``iris-drs calib ...``)."""

import sys

from .cli import main

sys.exit(main())
