"""Run one DAG of this repository once, in this process, with ``dag.test()``.

    python -m iris_tasks.orchestration.dagtest iris_realtime
    python -m iris_tasks.orchestration.dagtest iris_nightly_calibrations --conf '{"night": "2026-11-20"}'

Airflow must be configured through the environment before this starts (see
``iris-drs airflow-env`` of the dev stack) and the metadata DB migrated. Tasks run in this
process, no scheduler or executor is needed; Deadline Alerts are not evaluated (and are
removed from the in-memory DAG, see :func:`run`). The last stdout line is
``IRIS_DAGTEST_RESULT {json}`` with the run state and every task instance's state, which the
tests parse; the exit status is 0 only for a successful run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

RESULT_MARKER = "IRIS_DAGTEST_RESULT "


def run(dag_id: str, conf: dict[str, Any] | None = None) -> dict[str, Any]:
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=os.environ.get("AIRFLOW__CORE__DAGS_FOLDER"))
    if bag.import_errors:
        raise RuntimeError(f"DAG import errors: {bag.import_errors}")
    dag = bag.get_dag(dag_id)
    if dag is None:
        raise KeyError(f"no DAG {dag_id!r} in {sorted(bag.dags)}")
    # dag.test() in Airflow 3.3.2 cannot finish a run of a DAG with Deadline Alerts: the
    # in-memory DAG it schedules holds the alerts' definitions where the scheduler expects
    # their database ids (DagRun.update_state -> DeadlineAlertModel.get_by_id fails). It never
    # evaluates deadlines anyway (no scheduler loop), so drop them for the test run.
    dag.deadline = None
    dr = dag.test(run_conf=conf or None)
    tis = [{"task_id": ti.task_id, "map_index": ti.map_index,
            "state": str(getattr(ti.state, "value", ti.state))} for ti in dr.get_task_instances()]
    tis.sort(key=lambda t: (t["task_id"], t["map_index"]))
    return {"dag_id": dag_id, "run_id": dr.run_id, "state": str(getattr(dr.state, "value", dr.state)),
            "tasks": tis}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m iris_tasks.orchestration.dagtest")
    parser.add_argument("dag_id")
    parser.add_argument("--conf", default=None, help="run conf (JSON)")
    args = parser.parse_args(argv)
    result = run(args.dag_id, json.loads(args.conf) if args.conf else None)
    sys.stdout.flush()
    print(RESULT_MARKER + json.dumps(result), flush=True)
    return 0 if result["state"] == "success" else 1


if __name__ == "__main__":
    sys.exit(main())
