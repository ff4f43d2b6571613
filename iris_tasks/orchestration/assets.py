"""Assets shared between the IRIS DAGs, defined once (imported at parse time: Airflow SDK only).

``iris/landing`` stays in ``dags/iris_realtime.py``: only that DAG uses it, and its watcher is
built from the deployment's settings.
"""

from __future__ import annotations

from airflow.sdk import Asset

#: A new operational CRDS context: ``iris_nightly_calibrations.publish`` emits it with extra
#: ``{"context", "previous", "night", "references"}``; it schedules ``iris_reprocess``.
CRDS_CONTEXT = Asset("iris/crds-context")
