"""The night as the operations page shows it: plain dataclasses, no I/O.

The ledger reader (:mod:`iris_ops.ledger`) fills these; the page (:mod:`iris_ops.app`) renders
them as HTML and as JSON. Keeping them separate means the page can be tested on a hand-made
night and the reader on a real ledger.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

# The badge of a frame's status (values of the ledger's FrameStatus, as strings: this module
# imports nothing of iris_tasks, so the page renders even where the package is missing): done
# is good, failed and quarantined are bad, the rest (claimed, processing, superseded) neither.
GOOD_STATUSES = {"done"}
BAD_STATUSES = {"failed", "quarantined"}


@dataclass
class FrameRow:
    frame_id: str
    filename: str
    night: str = ""
    detector: str = ""
    obsname: str = ""
    obstype: str = ""
    status: str = ""
    landed_at: str | None = None  # ISO-8601 UTC
    ingested_at: str | None = None
    latency_s: float | None = None  # landing -> ingested
    deadline_s: float | None = None
    deadline_missed: bool = False
    breakdown: dict[str, float] = field(default_factory=dict)  # sensing/queueing/compute/ingest
    dag_id: str | None = None
    run_id: str | None = None
    task_id: str | None = None
    map_index: int | None = None
    mapped: bool = False  # task of a mapped group whose map index is unknown
    raw_key: str | None = None
    product_keys: list[str] = field(default_factory=list)
    ql_raw: str | None = None  # local path or object key of a PNG
    ql_reduced: str | None = None
    raw_path: str | None = None  # the raw FITS (a raw preview is rendered from it on demand)
    error: str | None = None
    # Where the frame is listed: "header" (its night from DATE-OBS) or "landing" (the night it
    # landed in, when the header's night is missing or cannot be trusted); header_night is the
    # ledger's night in the second case, shown beside it.
    night_source: str = "header"
    header_night: str | None = None
    flexure: str | None = None  # IFS frames: the offsets the reduction used, one line

    @property
    def status_class(self) -> str:
        s = self.status.lower()
        if s in GOOD_STATUSES:
            return "ok"
        if s in BAD_STATUSES:
            return "bad"
        return "busy"


@dataclass
class MasterRow:
    name: str  # reference file name
    reftype: str = ""
    detector: str = ""
    night: str = ""
    status: str = ""  # published / rejected / ...
    qa_passed: bool | None = None
    qa: dict[str, Any] = field(default_factory=dict)  # metric -> value
    n_inputs: int | None = None
    key: str | None = None
    ql: str | None = None  # PNG path/key, else rendered from `path`
    path: str | None = None  # the master FITS
    failed: list[str] = field(default_factory=list)  # metrics outside their thresholds
    note: str = ""
    dag_id: str | None = None
    run_id: str | None = None
    task_id: str | None = None
    mapped: bool = False


@dataclass
class QuarantineRow:
    filename: str
    reason: str
    detail: str = ""
    at: str | None = None
    location: str | None = None
    frame_id: str | None = None
    landed_at: str | None = None
    header_night: str | None = None  # the night the header gives, when not the page's night


@dataclass
class IgnoredRow:
    """Something in the landing area the DRS does not take (a compressed frame, a
    sub-directory, a link...): data an operator may need to move."""

    name: str
    reason: str
    size: int | None = None
    since: str | None = None  # ISO-8601 UTC, first seen
    uri: str = ""


@dataclass
class WaitingRow:
    """A frame in the landing area that the DRS has not claimed yet: ready (waiting for a
    run), or still being written (``reason`` says why it waits)."""

    name: str
    state: str  # "ready" | "being written"
    reason: str = ""
    size: int | None = None
    since: str | None = None  # ISO-8601 UTC: its modification (directory) or upload (S3) time
    uri: str = ""


@dataclass
class LandingView:
    """The landing area as the api-server sees it now."""

    where: str = ""  # the directory or s3:// prefix
    waiting: list[WaitingRow] = field(default_factory=list)
    ignored: list[IgnoredRow] = field(default_factory=list)
    problem: str | None = None  # e.g. not readable from the api-server: the ledger's list is shown


@dataclass
class ComponentHealth:
    """One line of the health banner. ``state``: ``ok``, ``bad`` (red: the night is at
    risk), ``warn``, ``off`` (not used in this deployment) or ``unknown`` (no answer)."""

    name: str
    state: str
    summary: str
    detail: str = ""

    @property
    def is_bad(self) -> bool:
        return self.state in ("bad", "unknown")


@dataclass
class HealthView:
    components: list[ComponentHealth] = field(default_factory=list)
    checked_at: str | None = None  # ISO-8601 UTC

    @property
    def state(self) -> str:
        """``bad`` when any component is bad or did not answer, else ``warn`` or ``ok``."""
        if any(c.is_bad for c in self.components):
            return "bad"
        if any(c.state == "warn" for c in self.components):
            return "warn"
        return "ok"

    @property
    def problems(self) -> list[ComponentHealth]:
        return [c for c in self.components if c.is_bad or c.state == "warn"]


@dataclass
class ApprovalRow:
    """A human-in-the-loop request waiting for an answer (Airflow's Required Actions), e.g.
    the approval of a night's new masters by ``iris_nightly_calibrations``."""

    dag_id: str
    run_id: str
    task_id: str
    map_index: int = -1
    subject: str = ""
    body: str = ""  # markdown (the QA numbers of iris_nightly_calibrations' request)
    options: list[str] = field(default_factory=list)
    defaults: list[str] = field(default_factory=list)
    created_at: str | None = None
    night: str | None = None
    masters: list[str] = field(default_factory=list)  # options that are master file names


@dataclass
class NightState:
    """Is a night current under the operational CRDS context? (``reprocess.night_states``):
    ``stale_frames`` would be re-reduced by ``iris_reprocess``; ``unknown`` (header not at
    hand) counts as stale; ``unchanged`` are under an older context with the same references."""

    night: str
    context: str
    frames: int = 0
    current: int = 0
    stale_frames: int = 0
    unknown: int = 0
    unchanged: int = 0
    errors: int = 0
    stale: bool = False
    contexts: dict[str, int] = field(default_factory=dict)


@dataclass
class TimelinePage:
    """One page of the night's frames, newest landing first, with the filters applied."""

    frames: list[FrameRow] = field(default_factory=list)
    total: int = 0  # frames matching the filters
    page: int = 1
    per_page: int = 50
    filters: dict[str, str] = field(default_factory=dict)  # detector / obsname / status
    choices: dict[str, list[str]] = field(default_factory=dict)  # the values present tonight

    @property
    def pages(self) -> int:
        return max(1, -(-self.total // self.per_page))


@dataclass
class NightView:
    night: str | None
    nights: list[str] = field(default_factory=list)
    frames: list[FrameRow] = field(default_factory=list)
    masters: list[MasterRow] = field(default_factory=list)
    quarantine: list[QuarantineRow] = field(default_factory=list)
    ignored: list[IgnoredRow] = field(default_factory=list)  # now, not per night
    source: str = ""  # where the data came from (shown in the footer)
    problem: str | None = None  # e.g. "ledger not found" (the page still renders)
    timeline: TimelinePage | None = None  # the live view (None: frames holds the whole night)
    # The whole night's frames, light (status, latency, deadline_missed), for the tiles when
    # `frames` holds only a page of them; None: `frames` is the whole night.
    stats: list[FrameRow] | None = None
    last_done_at: str | None = None  # the newest frame processed, any night (ISO-8601 UTC)
    open_since: str | None = None  # landing time of the oldest frame still open, any night
    landing: LandingView | None = None
    health: HealthView | None = None
    approvals: list[ApprovalRow] = field(default_factory=list)
    # Per night, current or stale under the operational context (None: not looked up)
    night_states: list[NightState] | None = None
    night_states_problem: str | None = None
    now: str | None = None  # when the view was made (ISO-8601 UTC)

    def summary(self) -> dict[str, Any]:
        frames = self.frames if self.stats is None else self.stats
        lat = sorted(f.latency_s for f in frames if f.latency_s is not None)
        by_status: dict[str, int] = {}
        for f in frames:
            by_status[f.status] = by_status.get(f.status, 0) + 1
        return {
            "frames": len(frames),
            "by_status": dict(sorted(by_status.items())),
            "latency_p50_s": percentile(lat, 50),
            "latency_p95_s": percentile(lat, 95),
            "deadline_misses": sum(1 for f in frames if f.deadline_missed),
            "quarantined": len(self.quarantine),
            "ignored_in_landing": len(self.ignored),
            "waiting_in_landing": len(self.landing.waiting) if self.landing else 0,
            "masters": len(self.masters),
            "approvals_pending": len(self.approvals),
        }

    def groups(self) -> list[tuple[str, str, list[FrameRow]]]:
        """Frames grouped by (detector, OBSNAME), groups sorted, frames by landing time."""
        out: dict[tuple[str, str], list[FrameRow]] = {}
        for f in self.frames:
            out.setdefault((f.detector, f.obsname), []).append(f)
        return [
            (det, obs, sorted(rows, key=lambda r: (r.landed_at or "", r.filename)))
            for (det, obs), rows in sorted(out.items())
        ]

    def to_json(self) -> dict[str, Any]:
        timeline = None
        if self.timeline is not None:
            t = self.timeline
            timeline = {"total": t.total, "page": t.page, "pages": t.pages, "per_page": t.per_page,
                        "filters": t.filters, "choices": t.choices}
        health = None
        if self.health is not None:
            health = {"state": self.health.state, "checked_at": self.health.checked_at,
                      "components": [asdict(c) for c in self.health.components]}
        return {
            "night": self.night,
            "nights": self.nights,
            "now": self.now,
            "summary": self.summary(),
            "health": health,
            "timeline": timeline,
            "frames": [asdict(f) for f in self.frames],
            "masters": [asdict(m) for m in self.masters],
            "approvals": [asdict(a) for a in self.approvals],
            "quarantine": [asdict(q) for q in self.quarantine],
            "ignored": [asdict(i) for i in self.ignored],
            "landing": asdict(self.landing) if self.landing else None,
            "night_states": (None if self.night_states is None
                             else [asdict(n) for n in self.night_states]),
            "night_states_problem": self.night_states_problem,
            "last_done_at": self.last_done_at,
            "open_since": self.open_since,
            "source": self.source,
            "problem": self.problem,
        }


def percentile(sorted_values: list[float], q: float) -> float | None:
    """Linear-interpolated percentile of an already sorted list (None when empty)."""
    if not sorted_values:
        return None
    pos = (len(sorted_values) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)
