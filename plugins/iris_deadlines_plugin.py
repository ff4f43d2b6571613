"""Airflow plugin ``iris_deadlines``: registers the custom deadline reference of ``iris_realtime``
(:class:`iris_tasks.orchestration.deadline_refs.FramesLandedDeadline`: deadlines counted from
when the run's frames landed). The scheduler and the DAG processor find custom deadline
references only through a plugin's ``deadline_references``."""

from __future__ import annotations

from airflow.plugins_manager import AirflowPlugin

from iris_tasks.orchestration.deadline_refs import FramesLandedDeadline


class IrisDeadlinesPlugin(AirflowPlugin):
    name = "iris_deadlines"
    deadline_references = [FramesLandedDeadline]
