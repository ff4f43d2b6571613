"""``python -m iris_tasks.orchestration.compute``: run the compute server."""

from iris_tasks.orchestration.compute.server import main

raise SystemExit(main())
