"""The ``approve`` task of ``iris_nightly_calibrations``: Airflow's human-in-the-loop request.

:class:`MasterApprovalOperator` is a :class:`~airflow.providers.standard.operators.hitl.HITLOperator`
whose options are known only when it runs: one per master that passed QA, between
``Approve all`` and ``Reject`` (multiple choice), with a ``reason`` field. It writes the request
(subject, markdown body with the QA numbers, options, the timeout's default answer) and parks
the task in Airflow 3.3's ``awaiting_input`` state; the answer comes from the UI's Required
Actions page or ``PATCH /api/v2/dags/{dag}/dagRuns/{run}/taskInstances/approve/-1/hitlDetails``,
or the scheduler applies the default at the timeout. Its result (XCom) is the decision of
:func:`iris_tasks.orchestration.approval.decide`, which ``publish`` acts on.

Imported by the DAG file at parse time: Airflow and :mod:`iris_tasks.orchestration.approval`
(which imports nothing heavy) only.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from airflow.providers.standard.operators.hitl import HITLOperator
from airflow.sdk import Param

from iris_tasks.orchestration.approval import (
    APPROVE_ALL,
    DEFAULT_TIMEOUT_HOURS,
    REASON_PARAM,
    REJECT,
)
from iris_tasks.orchestration.dag_defaults import as_list


class MasterApprovalOperator(HITLOperator):
    """Ask the on-duty operator which of the night's new masters to publish.

    Parameters
    ----------
    reports
        The QA reports of the masters (the mapped ``qa`` task's results; failed ones absent).
    masters
        Every master the night built (``build``'s result), so the request names those that
        failed QA too.
    **kwargs
        Passed to :class:`HITLOperator` (``task_id``, ``trigger_rule``, ...). ``options``,
        ``multiple``, ``defaults`` and ``response_timeout`` are set when the task runs.
    """

    template_fields = (*HITLOperator.template_fields, "reports", "masters")

    def __init__(self, *, reports: Any, masters: Any, **kwargs: Any) -> None:
        kwargs.setdefault("subject", "IRIS: publish the night's new master calibrations?")
        # Given here so that the DAG's execution_timeout stays the limit of the task's own work
        # (HITLOperator would otherwise take it as the response timeout); the one used is set
        # from IRIS_APPROVAL_TIMEOUT when the task runs.
        kwargs.setdefault("response_timeout", dt.timedelta(hours=DEFAULT_TIMEOUT_HOURS))
        # The DAG's params (``night``) come in here too: they are not questions to the
        # operator, the form has the reason only.
        kwargs.pop("params", None)
        params = {REASON_PARAM: Param("", type=["null", "string"],
                                      description="Why (kept in the ledger and the lineage); "
                                                  "expected with a rejection")}
        super().__init__(options=[APPROVE_ALL, REJECT], multiple=True, params=params, **kwargs)
        self.reports = reports
        self.masters = masters

    def _request(self, context: Any, *, current_context: str | None = None) -> tuple[Any, ...]:
        from iris_tasks.orchestration.approval import approval_request, approval_settings
        from iris_tasks.orchestration.nights import night_of_run

        settings = approval_settings()
        reports = as_list(self.reports)
        masters = [str(m) for m in as_list(self.masters)]
        night = night_of_run(context)
        from airflow.providers.common.compat.sdk import conf

        request = approval_request(reports, masters, night, settings, current_context=current_context,
                                   base_url=conf.get("api", "base_url", fallback=None))
        # The options must be the same when the answer comes back (execute_complete runs in a
        # new task process): they are a function of the rendered XComs only.
        self.options = request["options"]
        self.defaults = request["defaults"]
        return settings, reports, night, request

    def execute(self, context: Any) -> Any:
        from iris_tasks import calib
        from iris_tasks.orchestration.approval import auto_decision

        calib.cache_dir()  # configures crds once per process
        settings, reports, night, request = self._request(
            context, current_context=calib.operational_context())
        if settings.mode == "auto":
            self.log.info("IRIS_CALIBRATION_APPROVAL=auto: approving the %d master(s) that "
                          "passed QA", len(request["offered"]))
            return auto_decision(reports, [*request["offered"], *request["failed"]], night)
        self.subject = request["subject"]
        self.body = request["body"]
        self.response_timeout = settings.timeout
        self.log.info("asking for approval of %d master(s) (timeout %s, then %s)",
                      len(request["offered"]), settings.timeout, request["defaults"])
        return super().execute(context)

    def execute_complete(self, context: Any, event: dict[str, Any]) -> Any:
        from iris_tasks.orchestration.approval import decide

        _, reports, night, request = self._request(context)
        answer = super().execute_complete(context, event)
        responded_at = answer.get("responded_at")
        decision = decide(
            request["offered"], answer["chosen_options"], night=night,
            params_input=answer.get("params_input"), responded_by=answer.get("responded_by_user"),
            responded_at=responded_at.isoformat() if hasattr(responded_at, "isoformat") else responded_at,
            timedout=bool(event.get("timedout")), reports=[r for r in reports if r.get("passed")],
            failed=request["failed"])
        self.log.info("night %s: %s by %s (%s) - approved: %s", night, decision["decision"],
                      decision["by"], decision["how"], decision["approved"])
        return decision
