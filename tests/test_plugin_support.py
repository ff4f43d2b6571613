"""A small hand-made night in a real frame ledger, shared by the plugin tests (no tests here).

Frames on two detectors and three OBSNAMEs: done (one over its deadline), still processing,
quarantined; stages with durations, products with quicklook PNGs, a nightly calibration run
with QA metrics, and a quarantine reason file.
"""

from __future__ import annotations

import datetime as dt
import json
import struct
import sys
import zlib
from pathlib import Path

from iris_tasks.orchestration.ledger import FrameLedger, isotime

ROOT = Path(__file__).resolve().parents[1]
PLUGINS = ROOT / "plugins"
if str(PLUGINS) not in sys.path:
    sys.path.insert(0, str(PLUGINS))

NIGHT = "2026-11-23"
T0 = dt.datetime(2026, 11, 24, 7, 0, 0, tzinfo=dt.UTC)


def write_png(path: Path, size: int = 16, level: int = 128) -> Path:
    """A valid grey PNG (gradient) without any imaging library."""
    rows = b"".join(b"\x00" + bytes((level + 7 * x + 3 * y) % 256 for x in range(size))
                    for y in range(size))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", size, size, 8, 0, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png)
    return path


def _stage(led: FrameLedger, fid: str, name: str, start: dt.datetime, dur: float,
           status: str = "success", **detail) -> None:
    sid = led.start_stage(fid, name, dag_id="iris_realtime", run_id="rt__1", try_number=1)
    with led.connect(write=True) as conn:
        conn.execute(
            "UPDATE stages SET started_at = ?, ended_at = ?, duration_seconds = ?, status = ?, "
            "detail = ? WHERE id = ?",
            (isotime(start), isotime(start + dt.timedelta(seconds=dur)), dur, status,
             json.dumps(detail) if detail else None, sid))


def build_night(state: Path) -> FrameLedger:
    """Fill ``state/ledger.sqlite`` (+ quicklooks, quarantine, store) and return the ledger."""
    led = FrameLedger(state / "ledger.sqlite")
    ql = state / "work" / "ql"
    frames = [
        # (name, detector, obsname, deadline, [(stage, start offset, duration)], status)
        ("iris_0001_raw.fits", "IMG1", "IMG1-SCI", 30.0, 9.0, "done"),
        ("iris_0002_raw.fits", "IMG1", "IMG1-SCI", 30.0, 34.0, "done"),  # deadline missed
        ("iris_0003_raw.fits", "IMG2", "IMG1-DRK", 30.0, 7.5, "done"),
        ("iris_0004_raw.fits", "IFS", "LEN-SCI", 60.0, None, "processing"),
        ("iris_0005_raw.fits", "IMG1", "IMG1-SCI", 30.0, None, "quarantined"),
    ]
    for i, (name, det, obs, deadline, latency, status) in enumerate(frames):
        landed = T0 + dt.timedelta(seconds=20 * i)
        sha = f"{i + 1:02d}" + "ab" * 31
        row, _ = led.claim(sha256=sha, filename=name, source_uri=f"/landing/{name}",
                           landed_at=isotime(landed), dag_id="iris_realtime", run_id="rt__1")
        fid = row["frame_id"]
        arr = led.record_arrival(f"/landing/{name}", 1000 + i, 1.0 + i,
                                 seen_at=isotime(landed + dt.timedelta(seconds=0.5)))
        led.close_arrival(arr["id"], frame_id=fid, outcome="new")
        led.update_frame(fid, night=NIGHT, detector=det, obsname=obs, obstype=obs.split("-")[1],
                         deadline_seconds=deadline,
                         deadline_at=isotime(landed + dt.timedelta(seconds=deadline)),
                         status="processing")
        if status == "quarantined":
            led.update_frame(fid, status="quarantined",
                             error="missing_keyword: OBSNAME not in primary header")
            continue
        t = landed + dt.timedelta(seconds=2.0)
        _stage(led, fid, "readout", t, 3.0, task_id="frame.readout", map_index=i)
        if status != "done":
            continue
        _stage(led, fid, "reduce", t + dt.timedelta(seconds=3.5), 2.0,
               task_id="frame.reduce", map_index=i)
        _stage(led, fid, "ingest", t + dt.timedelta(seconds=6.0), 1.0,
               task_id="frame.ingest", map_index=i)
        base = f"{det}/{obs}/{name.replace('_raw.fits', '')}"
        led.add_product(fid, "raw", key=f"raw/{NIGHT}/{base}_raw.fits")
        led.add_product(fid, "cal", key=f"products/{NIGHT}/{base}_cal.fits")
        led.add_product(fid, "ql_raw", path=str(write_png(ql / f"{fid}_raw.png", level=40)))
        led.add_product(fid, "ql", path=str(write_png(ql / f"{fid}_ql.png", level=200)),
                        key=f"quicklook/{NIGHT}/{base}_ql.png")
        led.finish(fid, when=landed + dt.timedelta(seconds=latency))
    led.record_calibration(
        NIGHT, status="published", context="tmt_0002.pmap", previous_context="tmt_0001.pmap",
        dag_id="iris_nightly_calibrations", run_id="manual__2026-11-24",
        masters=[{"name": "iris_img1_dark_0002.fits", "reftype": "dark", "detector": "IMG1",
                  "n_inputs": 5, "key": "references/iris_img1_dark_0002.fits",
                  "ql": str(write_png(ql / "dark.png", level=90))}],
        qa={"iris_img1_dark_0002.fits": {"passed": True, "median_ratio": 1.0021,
                                         "hot_pixel_fraction": 0.0004}},
    )
    qdir = state / "quarantine" / NIGHT / "iris_0005_raw"
    qdir.mkdir(parents=True, exist_ok=True)
    (qdir / "reason.json").write_text(json.dumps({"filename": "iris_0005_raw.fits",
                                                  "reason": "missing_keyword"}))
    return led
