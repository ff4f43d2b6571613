"""Task defaults shared by the IRIS DAG files (imported at DAG parse time: Airflow SDK only).

Retry rule of the DRS: only a fault that can go away by itself is retried, i.e. the object
store (network, S3 throttling, a restarting server). Bad data is quarantined, a failing
algorithm or missing reference fails the task at once - retrying would only delay the
operator seeing it.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from airflow.sdk import RetryAction, RetryRule
from airflow.sdk.definitions.retry_policy import ExceptionRetryPolicy

from iris_tasks.errors import NON_RETRIABLE, THIRD_PARTY_TRANSIENT, TransientError, dotted

OWNER = "iris-drs"

DEFAULT_ARGS: dict[str, Any] = {
    "owner": OWNER,
    "retries": 0,
    # Later stages outrank earlier ones, so a frame already in flight finishes (reduce,
    # quicklook, ingest) before the next frame's readout starts: depth-first per frame, which
    # is what a landing-to-ingested deadline needs. The default ("downstream") runs every
    # frame's readout first and delays every product to the end of the batch.
    "weight_rule": "upstream",
    "execution_timeout": dt.timedelta(minutes=10),
}

# Storage tasks: retry what can come back by itself, fail at once on anything else. The rules
# key on the categories of iris_tasks.errors (matched with isinstance, first rule wins), so a
# new project exception is handled by the category it derives from. The non-retriable
# categories come first: a class that is both (ObjectConflictError: a StorageError, hence
# transient, and a ConflictError - other bytes under an immutable key) is not retried.
# (iris_tasks.errors.is_retried says the same of an exception, for code that must know
# whether its task will be retried: both are built from the same lists.)
STORAGE_RETRY_POLICY = ExceptionRetryPolicy(
    rules=[
        RetryRule(exception=[dotted(c) for c in NON_RETRIABLE],
                  action=RetryAction.FAIL,
                  reason="not retriable: bad input, configuration, processing or conflict"),
        RetryRule(exception=[dotted(TransientError), *THIRD_PARTY_TRANSIENT],
                  action=RetryAction.RETRY, reason="service unavailable; backing off"),
    ],
    default=RetryAction.FAIL,
)


def storage_task_args(*, timeout: dt.timedelta = dt.timedelta(minutes=5), retries: int = 4,
                      first_delay: float = 4.0, max_delay: float = 60.0) -> dict[str, Any]:
    """``@task(**storage_task_args())``: exponential backoff 4 s, 8 s, 16 s, ... (capped).

    Four retries from 4 s ride out about a minute of store outage: a SeaweedFS restarted by
    the supervisor while the machine is loaded took longer than the ~30 s that backoff from 2 s
    covers (fault suite, S3 server SIGKILL). Longer delays rather than more retries: with 5-6
    retries the cluster's host-kill and broker-restart tests did not finish (2026-12-07).
    """
    return {
        "retries": retries,
        "retry_delay": dt.timedelta(seconds=first_delay),
        "retry_exponential_backoff": 2.0,
        "max_retry_delay": dt.timedelta(seconds=max_delay),
        "retry_policy": STORAGE_RETRY_POLICY,
        "execution_timeout": timeout,
    }


def as_list(values: Any) -> list:
    """The results of a mapped task (group) as a list.

    A downstream task normally receives a lazy sequence, but when the mapped group ran exactly
    once Airflow 3.3 hands over that one result itself (a dict); a skipped upstream gives None.
    """
    if values is None:
        return []
    if isinstance(values, dict):
        return [values]
    return [v for v in values if v is not None]
