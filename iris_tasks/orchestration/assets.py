"""Assets shared between the IRIS DAGs, defined once (imported at parse time: Airflow SDK only).

``iris/landing`` stays in ``dags/iris_realtime.py``: only that DAG uses it, and its watcher is
built from the deployment's settings. The two below are partitioned by observing night: every
event carries the night as its ``partition_key`` (:mod:`iris_tasks.orchestration.nights`).
"""

from __future__ import annotations

from airflow.sdk import Asset

#: A new operational CRDS context from a night's masters: ``iris_nightly_calibrations.publish``
#: emits it with ``partition_key`` = the night and extra ``{"context", "previous", "night",
#: "references"}``; it schedules ``iris_reprocess`` for that night (PartitionedAssetTimetable).
CRDS_CONTEXT = Asset("iris/crds-context")

#: Reduced products of a night: ``partition_key`` = the night, extra ``{"context", "frames"}``
#: (the CRDS context they were reduced under, the frame ids). Emitted by the real-time ``frame``
#: task (one frame) and by ``iris_reprocess``/``iris_reprocess_nights`` (the frames a run
#: re-reduced, and ``stale`` left in the night afterwards). Nothing is scheduled on it: it is
#: the night's history in the UI's asset view and the REST API (``/api/v2/assets/events``).
PRODUCTS = Asset("iris/products")
