"""The unit of real-time work: one raw frame, as an immutable, typed record.

A :class:`Frame` is made when a landing-area file is claimed, classified once (in the claim
task: :func:`.realtime.admit_frames`) and then carried by every task -- archive, process,
ingest -- and by reprocessing, each stage returning a new record with what it added
(``dataclasses.replace``; nothing is changed in place). Between Airflow tasks and over the
compute server's socket it travels as a plain JSON-able dict (:meth:`Frame.to_dict` /
:meth:`Frame.from_dict`, which refuses unknown keys: a misspelt field is an error, not a
silently dropped value). A frame read back from the ledger is :meth:`Frame.from_ledger_row`.

Fields, in the order the chain fills them::

    claim       frame_id sha256 filename raw_path landed_at source_uri outcome
    classify    night detector obstype obsname kind mode filter readpatt deadline_seconds
                deadline_at stages final_suffix work_dir
    readout     crds_context rate_path
    reduce      product_path final_path
    quicklook   quicklook_path
    reprocess   target_context previous_context changes (set by the selection)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Ledger columns that are not frame fields (bookkeeping of the frame's processing).
_LEDGER_ONLY = frozenset({
    "claimed_at", "status", "finished_at", "latency_seconds", "deadline_missed", "dag_id",
    "run_id", "duplicates", "error", "updated_at",
})


@dataclass(frozen=True)
class Frame:
    """One raw frame on its way through the real-time chain (see the module docstring)."""

    frame_id: str
    sha256: str
    filename: str
    raw_path: str
    landed_at: str  # ISO 8601 UTC: what the deadlines count from
    source_uri: str
    outcome: str = "new"  # of the claim: new | retry
    # classification
    night: str | None = None
    detector: str | None = None
    obstype: str | None = None
    obsname: str | None = None
    kind: str | None = None
    mode: str | None = None
    filter: str | None = None
    readpatt: str | None = None
    deadline_seconds: float | None = None
    deadline_at: str | None = None
    stages: tuple[str, ...] = ()
    final_suffix: str | None = None
    work_dir: str | None = None
    # products of the chain
    crds_context: str | None = None
    rate_path: str | None = None
    product_path: str | None = None
    final_path: str | None = None
    quicklook_path: str | None = None
    # reprocessing under a new CRDS context
    target_context: str | None = None
    previous_context: str | None = None
    changes: dict[str, Any] = field(default_factory=dict)

    @property
    def classified(self) -> bool:
        """Whether the classification is carried (it is done once, at claim)."""
        return self.obsname is not None and bool(self.stages)

    def with_(self, **changes: Any) -> Frame:
        """A copy with ``changes`` (``dataclasses.replace``)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form, for XCom and the compute server."""
        out = dataclasses.asdict(self)
        out["stages"] = list(self.stages)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | Frame) -> Frame:
        """The frame a task received (a dict from XCom or JSON, or a Frame already)."""
        if isinstance(data, Frame):
            return data
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise TypeError(f"not Frame fields: {', '.join(unknown)}")
        values = dict(data)
        if "stages" in values:
            values["stages"] = tuple(values["stages"] or ())
        if values.get("changes") is None:
            values.pop("changes", None)
        return cls(**values)

    @classmethod
    def from_ledger_row(cls, row: Mapping[str, Any], *, work_root: str | Path | None = None,
                        **extra: Any) -> Frame:
        """A frame from its ``frames`` row; the recipe fields follow from its OBSNAME (the
        row holds what classification found), ``work_dir`` from ``work_root``."""
        from .. import metadata

        values = {k: v for k, v in row.items() if k not in _LEDGER_ONLY}
        recipe = metadata.RECIPES.get(str(values.get("obsname")))
        if recipe is not None:
            values.setdefault("stages", tuple(recipe.stages))
            values.setdefault("final_suffix", recipe.final_suffix)
        if work_root is not None:
            values.setdefault("work_dir", str(Path(work_root) / str(row["frame_id"])))
        values.setdefault("source_uri", row.get("source_uri") or "")
        values.setdefault("raw_path", row.get("raw_path") or "")
        values.update(extra)
        return cls.from_dict(values)
