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
class NightView:
    night: str | None
    nights: list[str] = field(default_factory=list)
    frames: list[FrameRow] = field(default_factory=list)
    masters: list[MasterRow] = field(default_factory=list)
    quarantine: list[QuarantineRow] = field(default_factory=list)
    ignored: list[IgnoredRow] = field(default_factory=list)  # now, not per night
    source: str = ""  # where the data came from (shown in the footer)
    problem: str | None = None  # e.g. "ledger not found" (the page still renders)

    def summary(self) -> dict[str, Any]:
        lat = sorted(f.latency_s for f in self.frames if f.latency_s is not None)
        by_status: dict[str, int] = {}
        for f in self.frames:
            by_status[f.status] = by_status.get(f.status, 0) + 1
        return {
            "frames": len(self.frames),
            "by_status": dict(sorted(by_status.items())),
            "latency_p50_s": percentile(lat, 50),
            "latency_p95_s": percentile(lat, 95),
            "deadline_misses": sum(1 for f in self.frames if f.deadline_missed),
            "quarantined": len(self.quarantine),
            "ignored_in_landing": len(self.ignored),
            "masters": len(self.masters),
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
        return {
            "night": self.night,
            "nights": self.nights,
            "summary": self.summary(),
            "frames": [asdict(f) for f in self.frames],
            "masters": [asdict(m) for m in self.masters],
            "quarantine": [asdict(q) for q in self.quarantine],
            "ignored": [asdict(i) for i in self.ignored],
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
