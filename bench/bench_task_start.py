"""What one Airflow task start costs here (Airflow 3.3, LocalExecutor), by component.

Starts the dev stack's Airflow services (scheduler, dag-processor, triggerer, api-server; no
compute server, no object store) with a DAG folder holding one bench DAG whose run maps a
no-op task ``--tasks`` times, runs it, and divides the stack's CPU (bench/stack_cpu.py: exact
per process tree, idle cost measured first and taken out) by the number of task instances.
Variants restart the stack with one Airflow option changed, so that the choice of the
real-time DAG's structure rests on numbers:

    default       the project's settings (OpenLineage file transport, events emitted in a fork)
    ol-thread     [openlineage] execute_in_thread = True (no fork per lineage event)
    ol-off        OpenLineage disabled

    .venv/bin/python bench/bench_task_start.py --tasks 24
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from stack_cpu import ROLES, cpu_delta, format_reference, machine_reference, stack_cpu  # noqa: E402

DAG_ID = "bench_task_start"
DAG_FILE = f'''
import datetime as dt
from airflow.sdk import dag, task


@dag(dag_id="{DAG_ID}", schedule=None, start_date=dt.datetime(2026, 1, 1, tzinfo=dt.UTC),
     catchup=False, max_active_tasks=4)
def bench_task_start():
    @task
    def noop(i: int) -> int:
        return i

    noop.expand(i=list(range({{tasks}})))


bench_task_start()
'''

VARIANTS = {
    "default": {},
    "ol-thread": {"AIRFLOW__OPENLINEAGE__EXECUTE_IN_THREAD": "True"},
    "ol-off": {"AIRFLOW__OPENLINEAGE__DISABLED": "True"},
}


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def measure(variant: str, tasks: int, work: Path, idle_seconds: float) -> dict[str, float]:
    from iris_devstack.demo import trigger, unpause, wait_for_dags, wait_run
    from iris_devstack.stack import AIRFLOW_COMPONENTS, Stack

    dags = work / "dags"
    dags.mkdir(parents=True, exist_ok=True)
    (dags / f"{DAG_ID}.py").write_text(DAG_FILE.replace("{tasks}", str(tasks)))
    stack = Stack(work / f"stack-{variant}")
    overrides = {"AIRFLOW__CORE__DAGS_FOLDER": str(dags), **VARIANTS[variant]}
    stack.start(components=AIRFLOW_COMPONENTS, env_overrides=overrides)
    try:
        wait_for_dags(stack, [DAG_ID])
        unpause(stack, [DAG_ID])
        # One warm-up run: first-use imports and caches are not what a task start costs.
        wait_run(stack, DAG_ID, trigger(stack, DAG_ID), timeout=600)
        c0, t0 = stack_cpu(stack), time.monotonic()
        time.sleep(idle_seconds)
        idle_rate = {k: v / (time.monotonic() - t0) for k, v in cpu_delta(c0, stack_cpu(stack)).items()}
        c0, t0 = stack_cpu(stack), time.monotonic()
        state = wait_run(stack, DAG_ID, trigger(stack, DAG_ID), timeout=1200)
        wall = time.monotonic() - t0
        used = cpu_delta(c0, stack_cpu(stack))
        if state != "success":
            raise RuntimeError(f"{variant}: the bench run ended {state}")
    finally:
        stack.stop()
    per_task = {k: max(0.0, used[k] - idle_rate[k] * wall) / tasks for k in ROLES}
    per_task["wall per task"] = wall / tasks
    return per_task


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tasks", type=int, default=24, help="mapped task instances per run")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated")
    ap.add_argument("--idle-seconds", type=float, default=20.0)
    args = ap.parse_args(argv)
    reference = machine_reference()
    log(format_reference(reference))
    work = Path(tempfile.mkdtemp(prefix="iris-task-start-"))
    results = {}
    try:
        for variant in args.variants.split(","):
            log(f"{variant}: {args.tasks} task instances")
            results[variant] = measure(variant, args.tasks, work, args.idle_seconds)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    roles = [r for r in ROLES if r not in ("compute server", "s3 server")]
    print(f"\nCore-seconds per task start (no-op mapped task, {args.tasks} per run, LocalExecutor):")
    print(f"{'variant':<10} " + " ".join(f"{r[:14]:>14}" for r in roles) + f" {'total':>7} {'wall/task':>9}")
    for variant, r in results.items():
        print(f"{variant:<10} " + " ".join(f"{r[k]:14.3f}" for k in roles)
              + f" {sum(r[k] for k in roles):7.3f} {r['wall per task']:8.2f}s")
    print(format_reference(reference))
    return 0


if __name__ == "__main__":
    sys.exit(main())
