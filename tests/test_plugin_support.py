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

import sqlalchemy as sa

from iris_tasks.orchestration.ledger import FrameLedger, isotime, stages

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


def write_raw(path: Path, seed: int, n: int = 48) -> Path:
    """A tiny raw ramp (SCI uint16, (1, 3, n, n)) with a primary header, like a landed frame."""
    import numpy as np
    from astropy.io import fits

    rng = np.random.default_rng(seed)
    reads = np.cumsum(rng.poisson(50, size=(1, 3, n, n)), axis=1).astype(np.uint16) + 1000
    prim = fits.PrimaryHDU()
    prim.header["OBSNAME"] = "IMG1-SCI"
    prim.header["DETECTOR"] = "IMG1"
    path.parent.mkdir(parents=True, exist_ok=True)
    fits.HDUList([prim, fits.ImageHDU(reads, name="SCI")]).writeto(path, overwrite=True)
    return path


def write_master(path: Path, n: int = 48) -> Path:
    import numpy as np
    from astropy.io import fits

    prim = fits.PrimaryHDU()
    prim.header.update(REFTYPE="DARK", DETECTOR="IMG1", NINPUTS=3)
    img = np.linspace(0, 1, n * n, dtype=np.float32).reshape(n, n)
    path.parent.mkdir(parents=True, exist_ok=True)
    fits.HDUList([prim, fits.ImageHDU(img, name="SCI")]).writeto(path, overwrite=True)
    return path


def _stage(led: FrameLedger, fid: str, name: str, start: dt.datetime, dur: float,
           status: str = "success", **detail) -> None:
    sid = led.start_stage(fid, name, dag_id="iris_realtime", run_id="rt__1", try_number=1)
    with led.connect(write=True) as conn:  # fixed times, for a known latency breakdown
        conn.execute(sa.update(stages).where(stages.c.id == sid).values(
            started_at=isotime(start), ended_at=isotime(start + dt.timedelta(seconds=dur)),
            duration_seconds=dur, status=status, detail=json.dumps(detail) if detail else None))


def build_night(state: Path, ledger: str | Path | None = None) -> FrameLedger:
    """Fill ``state/ledger.sqlite``, or the ledger at ``ledger`` (a path or a PostgreSQL URL),
    and the quicklooks, quarantine and store under ``state``; return the ledger."""
    led = FrameLedger(ledger or state / "ledger.sqlite")
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
            qdir = state / "quarantine" / NIGHT / fid
            raw = write_raw(qdir / name, seed=i)
            led.update_frame(fid, status="quarantined", raw_path=str(raw),
                             finished_at=isotime(landed + dt.timedelta(seconds=3)),
                             error="quarantined: OBSNAME: missing keyword")
            (qdir / "reason.json").write_text(json.dumps({
                "frame_id": fid, "filename": name, "reason": "invalid IRIS metadata",
                "problems": [{"keyword": "OBSNAME", "message": "missing keyword"}]}))
            continue
        work = state / "work" / fid
        led.update_frame(fid, raw_path=str(write_raw(work / name, seed=i)))
        t = landed + dt.timedelta(seconds=2.0)
        _stage(led, fid, "readout", t, 3.0, task_id="frame", map_index=i)
        if status != "done":
            continue
        _stage(led, fid, "reduce", t + dt.timedelta(seconds=3.5), 2.0,
               task_id="frame", map_index=i)
        _stage(led, fid, "ingest", t + dt.timedelta(seconds=6.0), 1.0,
               task_id="frame", map_index=i)
        base = f"{det}/{obs}/{name.replace('_raw.fits', '')}"
        led.add_product(fid, "raw", path=str(work / name), key=f"raw/{NIGHT}/{base}_raw.fits")
        led.add_product(fid, "rate", key=f"products/{NIGHT}/{base}_rate.fits")
        led.add_product(fid, "cal", key=f"products/{NIGHT}/{base}_cal.fits")
        led.add_product(fid, "quicklook", path=str(write_png(work / f"{fid}_ql.png", level=200)),
                        key=f"quicklook/{NIGHT}/{base}_ql.png")
        led.finish(fid, when=landed + dt.timedelta(seconds=latency))
    masters = state / "work" / "nightly" / NIGHT / "masters"
    good = str(write_master(masters / "iris_img1_dark_0002.fits"))
    bad = str(write_master(masters / "iris_img1_flat_0002.fits"))
    write_master(masters / "iris_ifs_flat_0002.fits")  # built, but its QA task failed: no report
    led.record_calibration(
        NIGHT, status="published", context="tmt_0002.pmap", previous_context="tmt_0001.pmap",
        dag_id="iris_nightly_calibrations", run_id="manual__2026-11-24",
        masters=[good],
        qa=[{"master": good, "reftype": "dark", "previous": "tmt_iris_dark_0001.fits",
             "metrics": {"median_ratio": 1.0021, "rms_diff": 0.8}, "failed": [], "passed": True},
            {"master": bad, "reftype": "flat", "previous": "tmt_iris_flat_0001.fits",
             "metrics": {"median_ratio": 1.31}, "failed": ["median_ratio"], "passed": False}],
    )
    return led
