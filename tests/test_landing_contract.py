"""The landing contract: only whole files are claimed, and what is not taken is reported.

A tester wrote half a raw file and the rest 3 s later: the old trigger claimed the half, the
truncated bytes became the archived raw. These tests write files the way real writers do (in
place, in pieces; atomically renamed; never finished) and check what the landing area, the
trigger and the ledger make of them.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from iris_tasks.orchestration.landing import (
    readiness,
    survey_directory,
)
from iris_tasks.orchestration.ledger import FrameLedger
from iris_tasks.rawcheck import inspect_structure


def _raw_bytes(shape=(1, 3, 16, 16)) -> bytes:
    """A small raw-like FITS file (PRIMARY + SCI uint16 + a table) as bytes."""
    import io

    buf = io.BytesIO()
    data = (np.arange(np.prod(shape)) % 1000).astype(np.uint16).reshape(shape)
    fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(data, name="SCI"),
                  fits.BinTableHDU.from_columns([fits.Column("A", "J", array=[1, 2])], name="ASDF")]
                 ).writeto(buf)
    return buf.getvalue()


def _age(path: Path, seconds: float) -> None:
    """Make the file look last written ``seconds`` ago (atime/mtime; ctime becomes now, so
    the file also looks renamed: callers that need 'written in place' check mtime only)."""
    t = time.time() - seconds
    os.utime(path, (t, t))


# -- the FITS structure ---------------------------------------------------------------------
def test_every_cut_of_a_raw_file_is_incomplete(tmp_path):
    """The landing check's reader (rawcheck.inspect_structure) on every cut of a file."""
    whole = _raw_bytes()
    path = tmp_path / "f.fits"
    path.write_bytes(whole)
    check = inspect_structure(path)
    assert check.structure_ok and [h.name for h in check.hdus] == ["PRIMARY", "SCI", "ASDF"]
    for cut in range(0, len(whole) - 1, 997):
        st = _write(path, whole[:cut]).stat()
        assert readiness(str(path), st, now=st.st_mtime + 10), f"cut at {cut} looks whole"
    st = _write(path, whole).stat()
    assert readiness(str(path), st, now=st.st_mtime + 10) is None


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


# -- readiness: in place, renamed, stale ------------------------------------------------------
def test_a_file_written_in_pieces_waits_until_whole_and_settled(tmp_path):
    whole = _raw_bytes()
    path = tmp_path / "f.fits"
    path.write_bytes(whole[: len(whole) // 2])
    st = path.stat()
    assert readiness(str(path), st, now=st.st_mtime + 0.1)  # just written: settles first
    assert "incomplete" in readiness(str(path), st, now=st.st_mtime + 5)  # settled, but half
    with open(path, "ab") as f:
        f.write(whole[len(whole) // 2:])
    st = path.stat()
    assert readiness(str(path), st, now=st.st_mtime + 0.2, settle_seconds=1.0)
    assert readiness(str(path), st, now=st.st_mtime + 1.5, settle_seconds=1.0) is None
    # Never finished: claimed after the stale time, to be quarantined as truncated.
    path.write_bytes(whole[:3000])
    st = path.stat()
    assert readiness(str(path), st, now=st.st_mtime + 60, stale_seconds=120)
    assert readiness(str(path), st, now=st.st_mtime + 121, stale_seconds=120) is None


def test_an_atomically_renamed_whole_file_is_ready_at_once(tmp_path):
    tmp = tmp_path / ".f.fits.part"
    with open(tmp, "wb") as f:
        f.write(_raw_bytes())
        f.flush()
        os.fsync(f.fileno())
    time.sleep(0.05)  # the rename must come after the last write's timestamp tick
    final = tmp_path / "f.fits"
    os.rename(tmp, final)
    st = final.stat()
    assert st.st_ctime_ns > st.st_mtime_ns
    assert readiness(str(final), st, now=st.st_mtime + 0.06, settle_seconds=30) is None
    # Renamed but truncated (a broken writer): still waits for the stale time.
    tmp.write_bytes(_raw_bytes()[:5000])
    time.sleep(0.05)
    os.rename(tmp, final)
    assert "incomplete" in readiness(str(final), final.stat(), settle_seconds=30)


def test_a_primary_header_alone_is_not_a_frame_yet(tmp_path):
    path = tmp_path / "f.fits"
    fits.PrimaryHDU().writeto(path)
    _age(path, 10)
    assert "SCI" in readiness(str(path), path.stat())


def test_survey_reports_what_it_ignores(tmp_path):
    land = tmp_path / "landing"
    land.mkdir()
    good = land / "good.fits"
    good.write_bytes(_raw_bytes())
    _age(good, 10)
    (land / "half.fits").write_bytes(_raw_bytes()[:4000])
    (land / "zipped.fits.gz").write_bytes(b"\x1f\x8b")
    (land / "notes.txt").write_bytes(b"x")
    (land / "night2").mkdir()
    (land / "night2" / "deep.fits").write_bytes(_raw_bytes())
    (land / "link.fits").symlink_to(good)
    (land / ".hidden.fits").write_bytes(b"x")
    (land / "c.fits.part").write_bytes(b"x")
    survey = survey_directory(land)
    assert [e.name for e in survey.ready] == ["good.fits"]
    assert [e.name for e, _ in survey.waiting] == ["half.fits"]
    reasons = {e.name: e.reason for e in survey.ignored}
    assert set(reasons) == {"zipped.fits.gz", "notes.txt", "night2", "link.fits"}
    assert "compressed" in reasons["zipped.fits.gz"] and "sub-directory" in reasons["night2"]
    assert "symbolic link" in reasons["link.fits"]


def test_ledger_keeps_the_ignored_entries_until_they_are_gone(tmp_path):
    led = FrameLedger(tmp_path / "ledger.sqlite")
    scope = "file:///landing/"
    led.note_ignored([("file:///landing/a.fits.gz", "a.fits.gz", 3, "compressed"),
                      ("file:///landing/sub", "sub", 0, "sub-directory")], scope=scope)
    led.note_ignored([("file:///other/x.txt", "x.txt", 1, "not a .fits")], scope="file:///other/")
    assert [e["name"] for e in led.ignored()] == ["a.fits.gz", "sub", "x.txt"]
    led.note_ignored([("file:///landing/sub", "sub", 0, "sub-directory")], scope=scope)
    assert sorted(e["name"] for e in led.ignored()) == ["sub", "x.txt"]
    gone = [e for e in led.ignored(current_only=False) if e["gone_at"]]
    assert [e["name"] for e in gone] == ["a.fits.gz"]


# -- the trigger, as the tester tried it -------------------------------------------------------
def test_trigger_announces_a_file_written_in_two_halves_only_when_whole(tmp_path):
    """Half written, the rest 3 s later: the trigger announces it once, whole, after the
    settle time; the ignored entries reach the ledger."""
    from iris_tasks.orchestration.triggers import landing_trigger

    land = tmp_path / "landing"
    land.mkdir()
    (land / "frame.fits.gz").write_bytes(b"\x1f\x8b")
    ledger = tmp_path / "ledger.sqlite"
    whole = _raw_bytes()
    path = land / "frame.fits"

    async def main() -> tuple[dict, float, float]:
        trig = landing_trigger(str(land), ledger_path=str(ledger), poll_interval=0.1,
                               settle_seconds=0.5)
        events = trig.run()
        first = asyncio.ensure_future(events.__anext__())
        await asyncio.sleep(0.3)
        with open(path, "wb") as f:
            f.write(whole[: len(whole) // 2])
        await asyncio.sleep(3.0)
        assert not first.done(), "announced a half-written file"
        with open(path, "ab") as f:
            f.write(whole[len(whole) // 2:])
        t_whole = time.monotonic()
        ev = await asyncio.wait_for(first, 10)
        return ev.payload, time.monotonic() - t_whole, path.stat().st_size

    payload, delay, size = asyncio.run(main())
    assert payload["name"] == "frame.fits" and payload["size"] == size == len(whole)
    assert 0.4 <= delay < 3.0, delay
    ignored = FrameLedger(ledger).ignored()
    assert [(e["name"], "compressed" in e["reason"]) for e in ignored] == [("frame.fits.gz", True)]


@pytest.mark.parametrize("name", ["a b.fits", "ümlaut.fits"])
def test_odd_names_are_frames_like_any_other(tmp_path, name):
    land = tmp_path / "landing"
    land.mkdir()
    path = land / name
    path.write_bytes(_raw_bytes())
    _age(path, 5)
    assert [e.name for e in survey_directory(land).ready] == [name]


def test_the_reference_writer_lands_a_file_that_is_ready_at_once(tmp_path):
    from iris_tasks.orchestration.landing import deliver

    src = tmp_path / "made.fits"
    src.write_bytes(_raw_bytes())
    land = tmp_path / "landing"
    land.mkdir()
    landed = deliver(src, land, "renamed.fits")
    assert landed == land / "renamed.fits" and landed.read_bytes() == src.read_bytes()
    assert [p.name for p in land.iterdir()] == ["renamed.fits"]  # no partial left behind
    st = landed.stat()
    # Ready without the settle wait whenever the rename's timestamp tick follows the last
    # write's (fsync makes that the rule; a coarse clock can still tie them: then 1 s).
    assert readiness(str(landed), st, now=st.st_mtime + 1.0, settle_seconds=1.0) is None
