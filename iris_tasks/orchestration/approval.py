"""Operator approval of new master calibrations: the question, the answer, the record.

Plain functions (no Airflow import) behind the ``approve`` task of ``iris_nightly_calibrations``
(:mod:`iris_tasks.orchestration.approval_operator` puts them in an Airflow human-in-the-loop
request) and its ``publish`` task:

* :func:`approval_settings` - who decides (``IRIS_CALIBRATION_APPROVAL``), how long a request
  waits (``IRIS_APPROVAL_TIMEOUT``) and what happens when nobody answers in time
  (``IRIS_APPROVAL_DEFAULT``);
* :func:`approval_request` - the options offered (approve all, one per master that passed QA,
  reject), the answer taken on a timeout, and the markdown body with the QA numbers of every
  master against its predecessor;
* :func:`decide` - an answer (an operator's, the timeout's or the automatic one) turned into
  a decision: which masters are approved, by whom, why;
* :func:`record_decision` - the decision as a JSON document under the night's work area, a
  row of the ledger and a lineage event (masters -> decision document), whatever it was.

========================== ===============================================================
``IRIS_CALIBRATION_APPROVAL`` ``operator``: an operator answers in the UI's Required Actions
                           page or the REST API; ``auto`` (default): the masters that passed
                           QA are approved at once (unattended tests, the demo)
``IRIS_APPROVAL_TIMEOUT``  hours a request waits for an answer (default 12; 0: no timeout)
``IRIS_APPROVAL_DEFAULT``  the answer taken on a timeout: ``reject`` (default: the previous
                           context stays) or ``publish-if-green`` (approve all, but only if
                           every master of the night passed QA; else reject)
========================== ===============================================================
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigurationError

log = logging.getLogger(__name__)

ENV_APPROVAL_MODE = "IRIS_CALIBRATION_APPROVAL"
ENV_APPROVAL_TIMEOUT = "IRIS_APPROVAL_TIMEOUT"
ENV_APPROVAL_DEFAULT = "IRIS_APPROVAL_DEFAULT"
MODES = ("auto", "operator")
TIMEOUT_DEFAULTS = ("reject", "publish-if-green")
DEFAULT_TIMEOUT_HOURS = 12.0

APPROVE_ALL = "Approve all"
REJECT = "Reject"
REASON_PARAM = "reason"

# The QA numbers shown per reference type, in this order (the others stay in the task log).
_SHOWN_METRICS = {
    "dark": ("median_new", "median_old", "median_shift", "residual_rms", "hot_change"),
    "flat": ("median_ratio", "rms_ratio", "bad_change", "thruput_rms", "profile_bias"),
    "ifstrace": ("trace_rms", "wave_rms_resel", "profile_residual", "traced_fraction",
                 "shape_change", "offset_change"),
    "telluric": ("response_snr", "line_residual", "masked_fraction", "airmass",
                 "response_ratio"),
    "photom": ("zero_point", "zero_point_err", "star_snr", "airmass", "zero_point_change"),
}


@dataclass(frozen=True)
class ApprovalSettings:
    """How a night's new masters are approved (see the module docstring)."""

    mode: str = "auto"
    timeout: dt.timedelta | None = dt.timedelta(hours=DEFAULT_TIMEOUT_HOURS)
    on_timeout: str = "reject"


def approval_settings(environ: Mapping[str, str] | None = None) -> ApprovalSettings:
    """The approval settings from the environment; a wrong value raises ConfigurationError."""
    env = os.environ if environ is None else environ
    mode = (env.get(ENV_APPROVAL_MODE) or "auto").strip().lower()
    if mode not in MODES:
        raise ConfigurationError(f"{ENV_APPROVAL_MODE}={mode!r}: expected one of {', '.join(MODES)}")
    on_timeout = (env.get(ENV_APPROVAL_DEFAULT) or "reject").strip().lower()
    if on_timeout not in TIMEOUT_DEFAULTS:
        raise ConfigurationError(f"{ENV_APPROVAL_DEFAULT}={on_timeout!r}: expected one of "
                                 f"{', '.join(TIMEOUT_DEFAULTS)}")
    raw = (env.get(ENV_APPROVAL_TIMEOUT) or str(DEFAULT_TIMEOUT_HOURS)).strip()
    try:
        hours = float(raw)
    except ValueError:
        raise ConfigurationError(f"{ENV_APPROVAL_TIMEOUT}={raw!r}: expected hours (a number)") from None
    if hours < 0:
        raise ConfigurationError(f"{ENV_APPROVAL_TIMEOUT}={raw!r}: hours cannot be negative")
    timeout = dt.timedelta(hours=hours) if hours > 0 else None
    return ApprovalSettings(mode=mode, timeout=timeout, on_timeout=on_timeout)


def option_name(master: str) -> str:
    """The option that stands for one master: its file name (unique within a night)."""
    return Path(master).name


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None else str(value)


def _bounds(bounds: Any) -> str:
    if not isinstance(bounds, (list, tuple)) or len(bounds) != 2:
        return _fmt(bounds)
    low, high = bounds
    if low is None:
        return f"<= {_fmt(high)}"
    if high is None:
        return f">= {_fmt(low)}"
    return f"{_fmt(low)} - {_fmt(high)}"


def body_markdown(reports: Sequence[Mapping[str, Any]], night: str, *,
                  failed: Sequence[str] = (), settings: ApprovalSettings | None = None,
                  current_context: str | None = None, base_url: str | None = None) -> str:
    """The request's markdown: one table of QA numbers per master that passed, against the
    reference the current context selects for it, then the masters that failed QA; with
    ``base_url`` (the Airflow UI's) a link to the night page's QA table and previews."""
    settings = settings or ApprovalSettings()
    lines = [f"**Night {night}**: {len(reports)} new master(s) passed QA"
             + (f", {len(failed)} failed (not offered)" if failed else "")
             + (f". Operational context now: `{current_context}`." if current_context else "."),
             ""]
    if base_url:
        lines += [f"Quicklooks and QA of the night's masters: "
                  f"[night page]({base_url.rstrip('/')}/iris-ops/?night={night})", ""]
    lines += [
             f"Choose **{APPROVE_ALL}**, the masters to publish, or **{REJECT}** (give a "
             f"reason). Only approved masters become references in a new CRDS context; "
             f"its asset event starts the reprocessing of the night.", ""]
    if settings.timeout is not None:
        lines += [f"Without an answer within {settings.timeout.total_seconds() / 3600:g} h: "
                  + ("**approve all** (every master of the night passed QA)."
                     if settings.on_timeout == "publish-if-green" and not failed
                     else "**reject** (the previous context stays operational)."), ""]
    for r in reports:
        name = option_name(r["master"])
        previous = Path(r["previous"]).name if r.get("previous") else None
        lines += [f"### `{name}` ({r.get('reftype', '?')})",
                  f"previous: `{previous}`" if previous else f"previous: none - {r.get('note', 'first of its kind')}",
                  "", "| metric | value | accepted |", "|---|---|---|"]
        metrics, limits = r.get("metrics") or {}, r.get("thresholds") or {}
        shown = [m for m in _SHOWN_METRICS.get(r.get("reftype"), ()) if m in metrics]
        shown += [m for m in limits if m in metrics and m not in shown]
        for m in shown:
            lines.append(f"| {m} | {_fmt(metrics[m])} | {_bounds(limits.get(m)) if m in limits else ''} |")
        lines.append("")
    if failed:
        lines += ["**Failed QA** (the previous references stay for these; see the `qa` task logs):", ""]
        lines += [f"- `{option_name(m)}`" + (f": {why}" if (why := build_failure(m)) else "")
                  for m in failed]
    return "\n".join(lines)


def build_failure(master: str) -> str | None:
    """Why a master could not be built (the reason in its ``*.failed.json``, see
    :func:`iris_tasks.orchestration.nightly.build_masters`), or None for a built master."""
    from .common import FAILED_SUFFIX

    if not str(master).endswith(FAILED_SUFFIX):
        return None
    try:
        return str(json.loads(Path(master).read_text())["reason"])
    except (OSError, ValueError, KeyError) as exc:
        return f"(reason not readable from {master}: {exc})"


def approval_request(reports: Sequence[Mapping[str, Any]], masters: Sequence[str], night: str,
                     settings: ApprovalSettings | None = None,
                     current_context: str | None = None, base_url: str | None = None) -> dict[str, Any]:
    """What the operator is asked: ``{"subject", "body", "options", "defaults", "offered"}``.

    ``reports`` are the QA reports that came back (passed ones), ``masters`` every master the
    night built (those without a passing report failed QA). ``defaults`` is the answer taken
    on a timeout.
    """
    settings = settings or ApprovalSettings()
    passed = [r for r in reports if r and r.get("passed")]
    offered = [r["master"] for r in passed]
    failed = [m for m in masters if m not in set(offered)]
    green = not failed
    defaults = [APPROVE_ALL] if settings.on_timeout == "publish-if-green" and green else [REJECT]
    return {
        "subject": f"IRIS night {night}: publish {len(offered)} new master calibration(s)?",
        "body": body_markdown(passed, night, failed=failed, settings=settings,
                              current_context=current_context, base_url=base_url),
        "options": [APPROVE_ALL, *(option_name(m) for m in offered), REJECT],
        "defaults": defaults,
        "offered": offered,
        "failed": failed,
    }


def _user_name(user: Any) -> str | None:
    if isinstance(user, Mapping):
        return str(user.get("name") or user.get("id") or "") or None
    return str(user) if user else None


def decide(offered: Sequence[str], chosen: Sequence[str], *, night: str,
           params_input: Mapping[str, Any] | None = None, responded_by: Any = None,
           responded_at: str | None = None, timedout: bool = False, how: str = "operator",
           reports: Sequence[Mapping[str, Any]] = (), failed: Sequence[str] = ()) -> dict[str, Any]:
    """The decision of one answer. ``Reject`` wins over anything chosen with it; ``Approve
    all`` approves every offered master; otherwise the masters named are approved.

    Returns a JSON-ready dict: ``night``, ``decision`` (``approved`` | ``partial`` |
    ``rejected``), ``approved`` and ``offered`` (master paths), ``by``, ``reason``, ``how``
    (``operator`` | ``timeout`` | ``auto``), ``chosen``, ``responded_at``, ``reports``, ``failed``.
    """
    chosen = list(chosen)
    by = _user_name(responded_by)
    if timedout:
        how, by = "timeout", by or "timeout"
    reason = str((params_input or {}).get(REASON_PARAM) or "").strip()
    by_name = {option_name(m): m for m in offered}
    if unknown := [c for c in chosen if c not in (APPROVE_ALL, REJECT, *by_name)]:
        raise ConfigurationError(f"approval of night {night}: unknown option(s) {unknown}")
    if REJECT in chosen or not chosen:
        approved: list[str] = []
    elif APPROVE_ALL in chosen:
        approved = list(offered)
    else:
        approved = [by_name[c] for c in chosen]
    decision = ("rejected" if not approved else "approved" if len(approved) == len(offered)
                else "partial")
    if timedout and not reason:
        reason = f"no answer before the timeout: default {chosen}"
    return {"night": night, "decision": decision, "approved": approved, "offered": list(offered),
            "by": by or how, "reason": reason, "how": how, "chosen": chosen,
            "responded_at": responded_at or dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "reports": [dict(r) for r in reports], "failed": list(failed)}


def auto_decision(reports: Sequence[Mapping[str, Any]], masters: Sequence[str], night: str) -> dict[str, Any]:
    """``IRIS_CALIBRATION_APPROVAL=auto``: every master that passed QA is approved."""
    request = approval_request(reports, masters, night)
    return decide(request["offered"], [APPROVE_ALL], night=night, how="auto", responded_by="auto",
                  reports=[r for r in reports if r and r.get("passed")], failed=request["failed"])


def record_decision(decision: Mapping[str, Any], *, work_dir: str | os.PathLike[str],
                    ledger: Any, calibration_id: int | None = None,
                    run: Mapping[str, Any] | None = None) -> Path:
    """Keep a decision: ``<work_dir>/nightly/<night>/approval/<run>.json``, a ledger row, and a
    lineage event from the offered masters to that document. Returns the document's path."""
    from .. import lineage

    run = dict(run or {})
    night = decision["night"]
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S")
    safe_run = "".join(c if c.isalnum() or c in "-_." else "_" for c in str(run.get("run_id") or "manual"))
    out = Path(work_dir) / "nightly" / night / "approval"
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{stamp}_{safe_run}_{decision['decision']}.json"
    doc = {k: v for k, v in decision.items() if k != "reports"}
    path.write_text(json.dumps({**doc, "dag_id": run.get("dag_id"), "run_id": run.get("run_id"),
                                "calibration_id": calibration_id}, indent=1))
    ledger.record_calibration_decision(
        night, decision=decision["decision"], decided_by=decision["by"], how=decision["how"],
        reason=decision["reason"], offered=decision["offered"], approved=decision["approved"],
        calibration_id=calibration_id, document=str(path), dag_id=run.get("dag_id"),
        run_id=run.get("run_id"))
    lineage.record(decision["offered"], [path], job="iris_nightly_calibrations.approve")
    log.info("night %s: %s by %s (%s)%s", night, decision["decision"], decision["by"], decision["how"],
             f": {decision['reason']}" if decision["reason"] else "")
    return path
