"""IFS flexure in the frame ledger and the prior the real-time chain hands the flexure step.

Each IFS frame's offsets (FLEXDX/FLEXDY, errors, FLEXMETH, whether measured on the frame)
are recorded in ``frame_flexure`` when it is reduced; a frame that cannot measure an axis
gets, from the orchestration (never from the reduction code reading the ledger), the
weighted mean of that axis as measured on the night's frames of the same mode/scale/filter
and CRDS context within IRIS_FLEXURE_PRIOR_MINUTES. Both ledger backends.
"""

from __future__ import annotations

import datetime as dt

import numpy as np
import pytest
from astropy.io import fits

from iris_tasks import datamodels as dm
from iris_tasks.ifs import FlexureStep
from iris_tasks.ifs.flexure_step import clear_flexure_cache
from iris_tasks.instrument import nominal_design
from iris_tasks.orchestration.flexure_memory import (
    combine_offsets,
    flexure_prior_options,
    record_frame_flexure,
)
from iris_tasks.orchestration.frame import Frame
from iris_tasks.orchestration.ledger import FrameLedger, isotime

# test_ledger_postgres holds the ledger fixtures (SQLite and a fresh PostgreSQL schema).
from test_ledger_postgres import led, pg_schema, pg_url, target  # noqa: F401, I001  # isort: skip
from test_ifs_flexure import READ_VAR, SIZE, _meta, _trace_model, shifted_frame, sky_cube  # noqa: I001  # isort: skip

NIGHT = "2026-12-06"
T0 = dt.datetime(2026, 12, 7, 8, 0, tzinfo=dt.UTC)
CTX = "iris_0042.pmap"
WINDOW = 1800.0


def _row(ledger: FrameLedger, fid: str, minutes: float, *, dy: float, dy_err: float = 0.01,
         dy_measured: bool = True, filter: str = "Kbb", context: str = CTX) -> None:  # noqa: A002
    ledger.record_flexure(fid, dx=0.1, dy=dy, dx_err=0.005, dy_err=dy_err, rotation=0.0,
                       method="LIT+OH" if dy_measured else "LIT", dx_measured=True,
                       dy_measured=dy_measured, night=NIGHT, mode="LENSLET", scale="4",
                       filter=filter, obs_time=isotime(T0 + dt.timedelta(minutes=minutes)),
                       crds_context=context)


def _near(ledger: FrameLedger, minutes: float, **kw) -> list[str]:
    args = dict(night=NIGHT, mode="LENSLET", scale="4", filter="Kbb", crds_context=CTX,
                obs_time=isotime(T0 + dt.timedelta(minutes=minutes)),
                window_seconds=WINDOW, axis="dy")
    args.update(kw)
    return [r["frame_id"] for r in ledger.flexure_neighbours(**args)]


def test_flexure_rows_and_the_neighbours_they_offer(led: FrameLedger):  # noqa: F811
    _row(led, "a" * 16, 0, dy=0.07)
    _row(led, "b" * 16, 10, dy=0.09)
    _row(led, "c" * 16, 20, dy=0.0, dy_measured=False)  # its dy was not measured: no source
    _row(led, "d" * 16, 5, dy=0.5, filter="Hbb")  # another filter
    _row(led, "e" * 16, 6, dy=0.5, context="iris_0041.pmap")  # offsets from another model
    _row(led, "f" * 16, 60, dy=0.3)  # an hour later
    # nearest in time first; outside the window, other filters and contexts left out
    assert _near(led, 12) == ["b" * 16, "a" * 16]
    assert _near(led, 45) == ["f" * 16]  # b is 35 min away
    assert _near(led, 12, axis="dx") == ["b" * 16, "c" * 16, "a" * 16]
    assert _near(led, 12, exclude="b" * 16) == ["a" * 16]
    assert _near(led, 12, crds_context=None) == ["b" * 16, "e" * 16, "a" * 16]
    assert _near(led, 100) == []
    row = led.flexure("c" * 16)
    assert (row["dy_measured"], row["dx_measured"], row["method"]) == (0, 1, "LIT")
    assert isinstance(row["dy"], float) and row["scale"] == "4"
    # reduced again: the row is replaced, not doubled
    led.record_flexure("c" * 16, dx=0.11, dy=0.08, method="LIT+PRIORY", dx_measured=True,
                       dy_measured=False, source="ledger dy 2 fr", night=NIGHT,
                       mode="LENSLET", scale="4", filter="Kbb", crds_context=CTX,
                       obs_time=isotime(T0 + dt.timedelta(minutes=20)))
    assert (led.flexure("c" * 16)["dy"], led.flexure("c" * 16)["source"]) == (0.08,
                                                                              "ledger dy 2 fr")
    assert led.flexure("0" * 16) is None
    # what `iris-drs ledger --frame` prints, and what the read-only page reads
    led.claim(sha256="c" * 64, filename="c.fits", source_uri="s3://c", landed_at=isotime())
    assert led.snapshot("c" * 16)["frames"][0]["flexure"]["method"] == "LIT+PRIORY"
    with FrameLedger(led.location, readonly=True).reader() as r:
        got = r.flexure_of(["a" * 16, "c" * 16, "9" * 16])
    assert sorted(got) == ["a" * 16, "c" * 16] and got["a" * 16]["dy"] == 0.07


def test_combine_offsets_weights_by_error_and_keeps_the_scatter():
    one = combine_offsets([{"dy": 0.1, "dy_err": 0.02}], "dy")
    assert one == (pytest.approx(0.1), pytest.approx(0.02))
    mean, err = combine_offsets([{"dy": 0.1, "dy_err": 0.01}, {"dy": 0.2, "dy_err": 0.03}], "dy")
    assert mean == pytest.approx((0.1 / 0.01**2 + 0.2 / 0.03**2) / (1 / 0.01**2 + 1 / 0.03**2))
    # the two disagree by 0.1 px, far beyond their errors: the scatter is the uncertainty
    assert err == pytest.approx(np.sqrt(0.9 * (0.1 - mean) ** 2 + 0.1 * (0.2 - mean) ** 2))
    assert err > 1 / np.sqrt(1 / 0.01**2 + 1 / 0.03**2)


def _frame(fid: str) -> Frame:
    return Frame(frame_id=fid, sha256=fid * 4, filename=f"{fid}.fits", raw_path=f"/x/{fid}",
                 landed_at=isotime(), source_uri=f"s3://l/{fid}", night=NIGHT,
                 mode="lenslet", filter="Kbb", kind="science", crds_context=CTX)


def test_unmeasurable_dy_takes_the_dy_of_the_frame_before(tmp_path):
    """Frame A measures its dy (OH lines); B, 10 min later, has no usable lines: it gets A's
    dy with the source named, in its header and the ledger; C, 45 min after A and 35 after
    B, gets no dy (nothing measured within 30 min) and stays at 0."""
    ledger = FrameLedger(tmp_path / "ledger.sqlite")
    mode = "LENSLET"
    d = nominal_design(mode, SIZE)
    lines_cube, thr = sky_cube(d)
    bare_cube, _ = sky_cube(d, line_peak=0.0)
    clear_flexure_cache()
    tpath = _trace_model(tmp_path / "trace.fits", mode, d, thr)
    dx, dy = 0.12, 0.27

    def reduce(fid: str, cube: np.ndarray, minutes: float, seed: int) -> fits.Header:
        img, var = shifted_frame(d, cube, dx, dy, seed=seed)
        rate = dm.ImageModel(data=img, err=np.sqrt(var), dq=np.zeros(img.shape, np.uint32),
                             var_poisson=var - READ_VAR,
                             var_rnoise=np.full_like(var, READ_VAR))
        _meta(rate, mode)
        when = T0 + dt.timedelta(minutes=minutes)
        rate.meta.observation.mjd = 40587.0 + when.timestamp() / 86400.0
        rate.meta.filename = f"{fid}_rate.fits"
        rate.save(str(tmp_path / rate.meta.filename))
        # what reduce_frame does: the prior from the ledger, the step, the record
        header = fits.getheader(tmp_path / rate.meta.filename, 0)
        opts = flexure_prior_options(_frame(fid), header, ledger, window_seconds=WINDOW)
        # method 'oh': the spectrum ends would give this bright test frame a dy; the 4 mas
        # lenslet's frames have neither usable lines nor ends
        out = FlexureStep.call(rate, override_ifstrace=str(tpath), method="oh", **opts)
        path = tmp_path / f"{fid}_out.fits"
        out.save(str(path))
        head = fits.getheader(path, 0)
        record_frame_flexure(_frame(fid), head, ledger)
        return head

    a = reduce("a" * 16, lines_cube, 0, 51)
    assert a["FLEXMETH"] == "LIT+OH" and a["FLEXDY"] == pytest.approx(dy, abs=0.02)
    row_a = ledger.flexure("a" * 16)
    assert (row_a["dy_measured"], row_a["source"]) == (1, None)
    assert row_a["obs_time"] == isotime(T0) and row_a["dy"] == pytest.approx(a["FLEXDY"])

    b = reduce("b" * 16, bare_cube, 10, 52)
    assert b["FLEXMETH"] == "LIT+PRIORY"
    assert (b["FLEXDY"], b["FLEXEDY"]) == (pytest.approx(a["FLEXDY"]),
                                           pytest.approx(a["FLEXEDY"]))
    assert "a" * 8 in b["FLEXSRC"] and "-10min" in b["FLEXSRC"]
    row_b = ledger.flexure("b" * 16)
    assert (row_b["dy_measured"], row_b["dx_measured"]) == (0, 1)
    assert row_b["source"] == b["FLEXSRC"] and row_b["dy"] == pytest.approx(a["FLEXDY"])

    c = reduce("c" * 16, bare_cube, 45, 53)
    assert (c["FLEXMETH"], c["FLEXDY"]) == ("LIT", 0.0)  # B's dy was itself a prior
    assert "FLEXSRC" not in c
    assert ledger.flexure("c" * 16)["dy_measured"] == 0
    # switched off: no prior even inside the window
    assert flexure_prior_options(_frame("d" * 16), a, ledger, window_seconds=0) == {}
    clear_flexure_cache()


def test_the_night_page_shows_the_flexure(led: FrameLedger):  # noqa: F811
    from iris_ops.ledger import load_frame, load_night

    fids = []
    for i in range(3):
        row, _ = led.claim(sha256=f"{i:02d}" + "cd" * 31, filename=f"len_{i}.fits",
                           source_uri=f"s3://l/{i}", landed_at=isotime(T0))
        led.update_frame(row["frame_id"], night=NIGHT, detector="IFS", obsname="LEN-SCI")
        fids.append(row["frame_id"])
    led.record_flexure(fids[0], dx=0.12, dy=0.27, dx_err=0.004, dy_err=0.011, method="LIT+OH",
                       dx_measured=True, dy_measured=True, night=NIGHT)
    led.record_flexure(fids[1], dx=0.13, dy=0.27, dx_err=0.005, dy_err=0.011,
                       method="LIT+PRIORY", dx_measured=True, dy_measured=False,
                       source="ledger dy 1 fr -10..-10min aaaaaaaa", night=NIGHT)
    view = load_night(led.location, NIGHT)
    text = {f.frame_id: f.flexure for f in view.frames}
    assert text[fids[0]] == "flexure dx +0.120 ± 0.004, dy +0.270 ± 0.011 px [LIT+OH]"
    assert text[fids[1]].endswith("[LIT+PRIORY] prior: ledger dy 1 fr -10..-10min aaaaaaaa")
    assert text[fids[2]] is None  # not an IFS frame reduced with flexure
    assert load_frame(led.location, fids[1]).flexure == text[fids[1]]
