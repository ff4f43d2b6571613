"""Frames handed from one worker host to another (hosts share no disk), without a cluster:
the raw bytes and the night's skies are fetched from the store, checksum-verified. The live
version of both is in test_cluster.py."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from iris_tasks.config import settings
from iris_tasks.orchestration.frame import Frame
from iris_tasks.orchestration.landing import localize_frame
from iris_tasks.orchestration.ledger import DONE, FrameLedger, isotime
from iris_tasks.orchestration.realtime import _sky_paths
from iris_tasks.storage import StorageError, open_store


@pytest.fixture
def host_b(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    """Host B's settings: its own state directory, the shared ledger and store."""
    monkeypatch.setenv("IRIS_STATE_DIR", str(tmp_path / "host-b"))
    monkeypatch.setenv("IRIS_LEDGER_URL", str(tmp_path / "ledger.sqlite"))
    monkeypatch.setenv("IRIS_STORE_URL", (tmp_path / "store").as_uri())
    monkeypatch.setenv("IRIS_LANDING", str(tmp_path / "landing"))
    cfg = settings()
    return {"cfg": cfg, "ledger": FrameLedger(cfg.ledger_path), "store": open_store(cfg.store_url),
            "host_a": tmp_path / "host-a"}


def _claimed(host_b: dict, data: bytes, name: str) -> tuple[Frame, Path]:
    """A frame claimed and archived by host A: its raw file is in A's work area only."""
    sha = hashlib.sha256(data).hexdigest()
    row, _ = host_b["ledger"].claim(sha256=sha, filename=name, source_uri=f"file:///landing/{name}",
                                    landed_at=isotime())
    raw = host_b["host_a"] / "work" / row["frame_id"] / name
    raw.parent.mkdir(parents=True)
    raw.write_bytes(data)
    info = host_b["store"].put_file(raw, f"raw/2026-11-21/IMG1/IMG1-SCI/{name}", sha256=sha)
    host_b["ledger"].add_product(row["frame_id"], "raw", path=str(raw), key=info.key, url=info.url,
                                 sha256=info.sha256, size=info.size)
    frame = Frame(frame_id=row["frame_id"], sha256=sha, filename=name, raw_path=str(raw),
                  landed_at=row["landed_at"], source_uri=f"file:///landing/{name}",
                  work_dir=str(raw.parent))
    return frame, raw


def test_raw_frame_claimed_on_another_host_is_fetched_from_the_archive(host_b):
    frame, raw_on_a = _claimed(host_b, b"SIMPLE  = T" + bytes(range(256)) * 40, "f_0001.fits")
    raw_on_a.unlink()  # host A is gone: its disk is not ours
    local = localize_frame(frame)
    work_b = host_b["cfg"].work_dir / frame.frame_id
    assert Path(local.raw_path) == work_b / frame.filename and local.work_dir == str(work_b)
    assert hashlib.sha256(Path(local.raw_path).read_bytes()).hexdigest() == frame.sha256


def test_raw_frame_here_is_used_as_it_is(host_b):
    frame, raw_on_a = _claimed(host_b, b"here", "f_0002.fits")
    assert localize_frame(frame).raw_path == str(raw_on_a)


def test_archived_bytes_that_differ_from_the_claim_are_refused(host_b):
    frame, raw_on_a = _claimed(host_b, b"claimed bytes", "f_0003.fits")
    raw_on_a.unlink()
    with pytest.raises(StorageError, match=r"not on this host.*content changed"):
        localize_frame(Frame(**{**frame.to_dict(), "sha256": "0" * 64}))


def test_sky_processed_on_another_host_is_fetched_from_the_store(host_b):
    ledger, store = host_b["ledger"], host_b["store"]
    sky, _ = _claimed(host_b, b"sky raw", "sky_0001.fits")
    rate = host_b["host_a"] / "work" / sky.frame_id / "sky_0001_rate.fits"
    rate.write_bytes(b"the sky's rate image")
    info = store.put_file(rate, "products/2026-11-21/IMG1/IMG1-SKY/sky_0001_rate.fits")
    ledger.add_product(sky.frame_id, "rate", path=str(rate), key=info.key, url=info.url,
                       sha256=info.sha256, size=info.size)
    ledger.update_frame(sky.frame_id, status=DONE, night="2026-11-21", kind="sky", detector="IMG1",
                        filter="Ks", mode="imager")
    rate.unlink()  # processed on host A
    sci, _ = _claimed(host_b, b"science raw", "sci_0001.fits")
    sci = sci.with_(night="2026-11-21", kind="science", detector="IMG1", filter="Ks", mode="imager",
                    work_dir=str(host_b["cfg"].work_dir / sci.frame_id))
    [path] = _sky_paths(sci, ledger, host_b["cfg"])
    assert Path(path).read_bytes() == b"the sky's rate image"
    assert Path(path).is_relative_to(host_b["cfg"].work_dir / sci.frame_id)
