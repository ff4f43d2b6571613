"""Ingest outside the real-time chain: arbitrary files (``iris-drs ingest PATH...``) or one
ledger frame's work-area products (``iris-drs ingest --frame ID``).

The real-time chain itself ingests with :func:`iris_tasks.orchestration.realtime.ingest_frame`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..config import settings
from .common import STORE_KIND, ascii_meta
from .ledger import open_ledger


def _kind_of(path: Path, header: dict[str, Any] | None) -> str:
    name = path.name.lower()
    if name.endswith(".png"):
        return "quicklook"
    if header is not None:
        if header.get("REFTYPE"):
            return "reference"
        if header.get("DATAMODL") in (None, "RampModel") and not any(k.startswith("S_") for k in header):
            return "raw"
    for suffix in ("cal", "s3d", "rate"):
        if name.endswith(f"_{suffix}.fits"):
            return suffix
    return "rate"


def ingest_files(paths: list[str | os.PathLike[str]], *, store_url: str | None = None,
                 night: str | None = None, detector: str | None = None,
                 obsname: str | None = None) -> list[dict[str, Any]]:
    """Store each file under the key its header implies (PNG files take the night, detector
    and OBSNAME of the FITS file listed with them, or the explicit arguments)."""
    from astropy.io import fits

    from .. import metadata
    from ..storage import open_store, product_key

    store = open_store(store_url or settings().store_url)
    out = []
    last: dict[str, str | None] = {"night": night, "detector": detector, "obsname": obsname}
    fits_first = sorted((Path(p) for p in paths), key=lambda p: p.suffix.lower() == ".png")
    for path in fits_first:
        header = None
        if path.suffix.lower() in (".fits", ".fit"):
            header = dict(fits.getheader(path, 0))
            if header.get("DATE-OBS"):
                last["night"] = night or metadata.observing_night(
                    str(header["DATE-OBS"]), str(header.get("TIME-OBS", "00:00:00")))
            last["detector"] = detector or str(header.get("DETECTOR") or last["detector"])
            last["obsname"] = obsname or str(header.get("OBSNAME") or header.get("REFTYPE") or last["obsname"])
        if not all(last.values()):
            raise ValueError(f"{path}: cannot tell night/detector/OBSNAME; pass --night --detector --obsname")
        kind = _kind_of(path, header)
        key = product_key(str(last["night"]), str(last["detector"]), str(last["obsname"]), path.name,
                          "references" if kind == "reference" else STORE_KIND[kind])
        meta = ascii_meta({"night": last["night"], "detector": last["detector"],
                           "obsname": last["obsname"], "product": kind,
                           "crds_context": (header or {}).get("CRDS_CTX")})
        info = store.put_file(path, key, meta, overwrite=kind != "raw")
        out.append({"path": str(path), "key": key, "url": info.url, "sha256": info.sha256,
                    "skipped": info.skipped})
    return out


def ingest_frame_dir(frame_id: str, *, store_url: str | None = None) -> dict[str, Any]:
    """(Re-)ingest a frame from its work area (raw, _rate, _cal/_s3d, _ql.png) and close it."""
    from .frame import Frame
    from .realtime import ingest_frame

    cfg = settings()
    ledger = open_ledger(cfg.ledger_path)
    row = ledger.frame(frame_id)
    if row is None:
        raise KeyError(f"no frame {frame_id} in {ledger.path}")
    work = cfg.work_dir / frame_id
    root = Path(row["filename"]).stem
    files = {p.name: p for p in work.glob("*")} if work.is_dir() else {}
    rate = files.get(f"{root}_rate.fits")
    if rate is None or not row.get("night"):
        raise FileNotFoundError(f"frame {frame_id}: no classified frame with a {root}_rate.fits in {work}")
    product = files.get(f"{root}_cal.fits") or files.get(f"{root}_s3d.fits")
    frame = Frame.from_ledger_row(
        row, work_root=cfg.work_dir, rate_path=str(rate),
        product_path=str(product) if product else None,
        final_suffix=product.stem.rsplit("_", 1)[-1] if product else None,
        quicklook_path=str(files[f"{root}_ql.png"]) if f"{root}_ql.png" in files else None)
    store = None
    if store_url:
        from ..storage import open_store

        store = open_store(store_url)
    return ingest_frame(frame, store=store, ledger=ledger, cfg=cfg, close=row["status"] != "done")
