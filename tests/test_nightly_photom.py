"""Imager zero points through CRDS: the ``photom`` step in ``iris_image2`` and the nightly
``photom`` references.

* The pipeline: with a ``photom`` reference in CRDS the ``_cal`` comes out in MJy/sr (SCI and
  ERR times PHOTMJSR, the header saying so); without one the step is skipped with a warning
  and the frame still reduces; a standard (IMG1-TEL) and a sky frame are not calibrated, and
  a flux-calibrated sky frame is refused by the science frame's sky subtraction.
* The nightly hook, without Airflow: the night's IMG1-TEL ``_cal`` frames found in the ledger
  and the store, one zero point per standard built, QA'd and published (a star-less and a
  saturated standard reported with their reasons), CRDS serving it to the night's science
  frame, the reprocessing selecting that frame only, and the step then putting a star of known
  magnitude at its Vega flux density within 2 %.

The standards are the simulator's 256 px IMG1 frames of tests/test_fluxcal_imager.py
(flat-fielded with a master flat built from lamp flats); the rest is the real ledger,
LocalStore and temporary CRDS caches.
"""

from __future__ import annotations

import datetime as dt
import json
import math
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from test_fluxcal_imager import START, _standard, frames, vega_flux_mjy  # noqa: F401
from test_nightly_telluric import _processed, _rate, qa_each
from test_steps_support import detector_references, reference, write_rate

from iris_tasks.config import settings
from iris_tasks.orchestration.ledger import FrameLedger
from iris_tasks.steps.photom import measure_zero_point, photmjsr_from_zero_point

# stpipe's crds_client still calls crds' deprecated cache-lock helper on every lookup.
pytestmark = pytest.mark.filterwarnings("ignore:'get_cache_lock' is deprecated:DeprecationWarning")

IMAGER = {"DETECTOR": "IMG1", "FILTER": "H"}


def test_image2_puts_cal_in_mjy_per_sr_with_a_crds_zero_point_and_skips_without(
        tmp_path, caplog):
    from iris_tasks.calib.testing import temporary_cache
    from iris_tasks.datamodels import ImageModel
    from iris_tasks.instrument.standards import filter_band
    from iris_tasks.pipelines import Image2Pipeline
    from iris_tasks.pipelines.recipes import run_reduction
    from iris_tasks.steps import SkyCalibrationError

    science = np.full((64, 64), 40.5, np.float32)  # 40 sky + 0.5 dark
    science[30:33, 30:33] += 100.0
    rate = write_rate(tmp_path / "sci_rate.fits", science)
    no_sky = {"sky_sub": {"skip": True}}
    with temporary_cache(tmp_path / "crds") as calib:
        calib.publish_references([str(p) for p in detector_references(tmp_path / "refs").values()],
                                 "detector references, no zero point")
        caplog.clear()
        plain = Image2Pipeline.call(str(rate), steps=no_sky)
        assert plain.meta.cal_step.photom == "SKIPPED"
        assert plain.meta.cal_step.flat_field == "COMPLETE"  # the frame still reduces
        assert plain.meta.bunit_data != "MJy/sr"
        assert "no photom reference applies to DETECTOR=IMG1 FILTER=Kbb" in caplog.text

        zp_ref = reference("photom", filt="Kbb")
        zp_ref.meta.photometry.zero_point = 24.0
        zp_ref.save(str(tmp_path / "zp_photom.fits"))
        calib.publish_references([str(tmp_path / "zp_photom.fits")], "a zero point")

        cal = Image2Pipeline.call(str(rate), steps=no_sky)
        conv = photmjsr_from_zero_point(24.0, filter_band("Kbb"), 0.004)
        assert cal.meta.cal_step.photom == "COMPLETE"
        np.testing.assert_allclose(cal.data, plain.data * conv, rtol=1e-5)
        np.testing.assert_allclose(cal.err, plain.err * conv, rtol=1e-5)
        cal.save(str(tmp_path / "sci_cal.fits"))
        with fits.open(tmp_path / "sci_cal.fits") as hdul:
            primary = hdul[0].header
            assert primary["S_PHOTOM"] == "COMPLETE" and primary["PHOTZP"] == 24.0
            assert primary["PHOTMJSR"] == pytest.approx(conv, rel=1e-9)
            assert primary["R_PHOTOM"] == "crds://" + Path(calib.get_references(
                dict(primary), ["photom"])["photom"]).name
            assert hdul["SCI"].header["BUNIT"] == "MJy/sr" == hdul["ERR"].header["BUNIT"]
            assert hdul["SCI"].header["CTYPE1"] == "RA---TAN"  # assign_wcs ran before it

        # A standard is left in its count-rate unit (the nightly build measures it).
        standard = Image2Pipeline.call(str(write_rate(tmp_path / "tel_rate.fits", science,
                                                      obsname="IMG1-TEL", exp_no=3)), steps=no_sky)
        assert standard.meta.cal_step.photom == "SKIPPED" and standard.meta.bunit_data != "MJy/sr"

        # A sky frame's _cal stays in DN/s for the science frames' sky subtraction, which then
        # goes on to flux-calibrate the science frame.
        sky_rate = write_rate(tmp_path / "sky_rate.fits", np.full((64, 64), 30.5, np.float32),
                              obsname="IMG1-SKY", exp_no=2)
        sky_cal = run_reduction(sky_rate, tmp_path / "out")
        with ImageModel(str(sky_cal)) as sky:
            assert sky.meta.cal_step.photom == "SKIPPED" and sky.meta.bunit_data != "MJy/sr"
        reduced = run_reduction(rate, tmp_path / "out", sky_paths=[sky_cal])
        with ImageModel(str(reduced)) as out:
            assert out.meta.cal_step.sky_sub == "COMPLETE" and out.meta.cal_step.photom == "COMPLETE"
            assert out.data[31, 31] == pytest.approx(100.0 * conv, rel=1e-3)  # sky scaled to 40
        # A flux-calibrated sky frame is refused, naming the unit mismatch.
        calibrated_sky = Image2Pipeline.call(str(sky_rate), steps=no_sky)
        assert calibrated_sky.meta.bunit_data == "MJy/sr"
        with pytest.raises(SkyCalibrationError, match="S_PHOTOM differs"):
            Image2Pipeline.call(str(rate), sky_files=[calibrated_sky])


def test_night_imager_standards_become_photom_references_and_reprocess_the_science(
        frames, iris_state, tmp_path, caplog):  # noqa: F811
    from iris_tasks.calib.testing import temporary_cache, write_reference
    from iris_tasks.masters.common import night_start_utc
    from iris_tasks.metadata import observing_night
    from iris_tasks.orchestration import nightly, reprocess
    from iris_tasks.orchestration.approval import approval_request, decide
    from iris_tasks.steps.photom_step import PhotomStep
    from iris_tasks.storage import open_store, product_key

    cfg = settings()
    led = FrameLedger(cfg.ledger_path)
    store = open_store(cfg.store_url)
    t_std = START + dt.timedelta(hours=2)  # when _standard's frames are taken
    night = observing_night(t_std.strftime("%Y-%m-%d"), t_std.strftime("%H:%M:%S"))
    work = tmp_path / "frames"
    work.mkdir()

    def standard_cal(name: str, filt: str, mag: float, **kw) -> Path:
        cal, _ = _standard(frames, filt, mag, name=name, **kw)
        cal.meta.night = night
        path = work / f"{name}_cal.fits"
        cal.save(str(path))
        return path

    good = standard_cal("std", "H", 17.0)
    bright = standard_cal("bright", "Ks", 9.0)  # saturated core
    empty = standard_cal("empty", "Ks", 17.0, sky_only=True)  # only in the store
    sci = _rate(work / "sci_rate.fits", START, "IMG1-SCI", config=IMAGER)  # before the standard
    sky = _rate(work / "sky_rate.fits", START, "IMG1-SKY", config=IMAGER)

    with temporary_cache(tmp_path / "crds") as calib:
        first = calib.publish_references(
            [str(write_reference(tmp_path / "d.fits", "dark", DETECTOR="IMG1", READPATT="UTR10"))],
            "pre-night")
        ids = {name: _processed(led, f"{name}.fits", obsname, kind, first, {"rate": path}, path,
                                night=night, config=IMAGER)
               for name, obsname, kind, path in (("sci", "IMG1-SCI", "science", sci),
                                                 ("sky", "IMG1-SKY", "sky", sky))}
        for name, cal in (("std", good), ("bright", bright)):
            rate = _rate(work / f"{name}_rate.fits", t_std, "IMG1-TEL", config=IMAGER)
            ids[name] = _processed(led, f"{name}.fits", "IMG1-TEL", "telluric", first,
                                   {"rate": rate, "cal": cal}, rate, night=night, config=IMAGER)
        store.put_file(empty, product_key(night, "IMG1", "IMG1-TEL", empty.name), {})
        with pytest.raises(calib.ReferenceMissingError, match="no photom reference"):
            calib.get_references(dict(fits.getheader(sci, 0)), ["photom"], context=first)

        gathered = nightly.gather_calibrations(night)
        assert sorted(Path(p).name for p in gathered["photom"]) == [
            "bright_cal.fits", "empty_cal.fits", "std_cal.fits"]
        assert gathered["telluric"] == []
        masters = nightly.build_masters(gathered)
        built = [m for m in masters if m.endswith("_photom.fits")]
        failed = sorted(Path(m).name for m in masters if m.endswith(nightly.FAILED_SUFFIX))
        assert len(built) == 1 and failed == ["iris_bright_cal_photom.failed.json",
                                              "iris_empty_cal_photom.failed.json"]
        reports, errors = qa_each(masters)
        assert "saturated" in errors["iris_bright_cal_photom.failed.json"]
        assert "no star" in errors["iris_empty_cal_photom.failed.json"]
        (report,) = reports
        assert report["reftype"] == "photom" and report["metrics"]["airmass"] == 1.25
        assert report["metrics"]["star_snr"] >= 100 and report["metrics"]["zero_point_err"] < 0.01
        request = approval_request(reports, masters, night)
        assert "zero_point" in request["body"] and "no star" in request["body"]
        decision = decide(request["offered"], ["Approve all"], night=night, how="auto",
                          reports=reports, failed=request["failed"])
        published = nightly.publish_masters(reports, night, decision=decision)
        new = published["context"]
        assert published["references"] == [Path(built[0]).name]

        # The night's first standard serves the night from its start: the science frame taken
        # before it gets it.
        header = fits.getheader(built[0], 0)
        assert (header["USEAFTER"], header["TIME-OBS"][:8]) == (night_start_utc(night), "08:00:00")
        served = calib.get_references(dict(fits.getheader(sci, 0)), ["photom"], context=new)
        assert fits.getval(served["photom"], "PHOTZP") == header["PHOTZP"]

        # Reprocessing: the science frame only (not the sky frame, not the standards).
        request = reprocess.resolve_request({}, [published], partition_key=night)
        selected = {f.frame_id: f for f in reprocess.select_frames(request["context"],
                                                                    request["nights"])}
        assert set(selected) == {ids["sci"]}
        old, ref = selected[ids["sci"]].changes["photom"]
        assert old is None and ref == Path(served["photom"]).name

        # What reprocessing then does to a science _cal of the night: skipped under the
        # pre-night context, in MJy/sr under the new one; a star of H = 18.5 at its Vega flux.
        science, _ = _standard(frames, "H", 18.5, name="night_sci", science=True)
        caplog.clear()
        before = PhotomStep(crds_context=first).run(science.copy())
        assert before.meta.cal_step.photom == "SKIPPED"
        assert "no photom reference applies" in caplog.text
        after = PhotomStep(crds_context=new).run(science)
        assert after.meta.cal_step.photom == "COMPLETE" and after.meta.bunit_data == "MJy/sr"
        assert after.meta.ref_file.photom.name.endswith(Path(served["photom"]).name)
        assert after.meta.photometry.zero_point == pytest.approx(header["PHOTZP"])
        star = measure_zero_point(after.data, after.err, after.dq, 18.5, min_snr=10)
        got = star.rate * (0.004 * math.pi / 180 / 3600) ** 2
        print(f"H = 18.5 star through the nightly zero point: {got / vega_flux_mjy('H', 18.5) - 1:+.4f}")
        assert got / vega_flux_mjy("H", 18.5) == pytest.approx(1.0, abs=0.02)


def test_photom_builder_refuses_what_cannot_give_a_zero_point(frames, tmp_path):  # noqa: F811
    """Each refusal names the file and the reason (the nightly build reports it as a failed
    master); a good standard's reference carries what the step and the QA read."""
    from iris_tasks.masters.common import MasterBuildError
    from iris_tasks.masters.photom import build_photom, photom_filename

    cal, _ = _standard(frames, "J", 17.0, name="builder_std")
    master = build_photom(cal)
    meta = master.model.meta
    assert (meta.reftype, meta.instrument.detector, meta.instrument.filter) == ("PHOTOM", "IMG1",
                                                                                "J")
    assert meta.telluric.airmass == 1.25 and meta.standard.band == "J"
    assert meta.photometry.photmjsr == pytest.approx(
        photmjsr_from_zero_point(meta.photometry.zero_point, "J", 0.004))
    assert photom_filename(master) == "iris_img1_j_20261130t080000_photom.fits"
    with cal.copy() as wrong:
        wrong.meta.standard.band = "H"
        with pytest.raises(MasterBuildError, match="mismatched filter: the standard's magnitude "
                                                   "is in H but the frame is J"):
            build_photom(wrong)
    with cal.copy() as science:
        science.meta.observation.obsname = "IMG1-SCI"
        with pytest.raises(MasterBuildError, match="OBSNAME=IMG1-SCI is not an imager standard"):
            build_photom(science)
    with cal.copy() as unflat:
        unflat.meta.cal_step.flat_field = "SKIPPED"
        with pytest.raises(MasterBuildError, match="not flat-fielded"):
            build_photom(unflat)
    with cal.copy() as nomag:
        nomag.meta.standard.mag = None
        with pytest.raises(MasterBuildError, match="STDMAG"):
            build_photom(nomag)


def test_simulated_night_standard_gives_the_nightly_zero_point(iris_state, tmp_path, caplog):
    """The simulated night's IMG1-TEL (``NightPlan.n_imager_telluric``, as the demo and
    ``iris-drs simulate night`` take it) through the real-time chain and the nightly hook: its
    ``_cal`` gathered from the ledger, a ``photom`` reference built, QA'd, approved and
    published, served to the night's science frame, which the reprocessing then selects and
    whose zero point the photom step brings to the frame's airmass (header AIRMASS, the plan's)."""
    from iris_tasks.calib.testing import temporary_cache
    from iris_tasks.orchestration import nightly, reprocess
    from iris_tasks.orchestration.approval import approval_request, decide
    from iris_tasks.orchestration.local_run import process_paths
    from iris_tasks.simulate import NightPlan, simulate_night

    night = "2026-11-24"
    plan = NightPlan(n_dark=0, n_flat=0, n_sky=1, n_science=1, imager_filters=("Ks",),
                     n_imager_telluric=1, airmass=1.3)
    sim = tmp_path / "sim"
    manifest = simulate_night(sim, size=128, nreads=4, detectors=["IMG1"], seed=5, night=night,
                              plan=plan)
    kinds = {f["obsname"]: sim / f["path"] for f in manifest["files"]}
    assert sorted(kinds) == ["IMG1-SCI", "IMG1-SKY", "IMG1-TEL"]
    std = fits.getheader(kinds["IMG1-TEL"], 0)
    assert (std["STDMAG"], std["STDMAGBD"], std["AIRMASS"]) == (17.0, "Ks", 1.2)
    # the science and sky frames at the plan's airmass, which the photom step reads
    assert [fits.getval(kinds[k], "AIRMASS") for k in ("IMG1-SCI", "IMG1-SKY")] == [1.3, 1.3]
    with temporary_cache(tmp_path / "crds") as calib:
        first = calib.publish_references([str(sim / r["path"]) for r in manifest["references"]],
                                         "pre-night")
        results = process_paths([str(sim / f["path"]) for f in manifest["files"]])
        assert [r["status"] for r in results] == ["done"] * 3
        gathered = nightly.gather_calibrations(night)
        assert [Path(p).name for p in gathered["photom"]] == [
            kinds["IMG1-TEL"].name.replace(".fits", "_cal.fits")]
        masters = nightly.build_masters(gathered)
        (built,) = [m for m in masters if m.endswith("_photom.fits")]
        reports, errors = qa_each(masters)
        assert not errors, errors
        (report,) = reports
        print("simulated night's standard:", {k: round(v, 4) for k, v in report["metrics"].items()})
        assert report["metrics"]["star_snr"] >= 100 and report["metrics"]["zero_point_err"] < 0.01
        request = approval_request(reports, masters, night)
        decision = decide(request["offered"], ["Approve all"], night=night, how="auto",
                          reports=reports, failed=request["failed"])
        published = nightly.publish_masters(reports, night, decision=decision)
        assert published["references"] == [Path(built).name] and published["previous"] == first
        served = calib.get_references(dict(fits.getheader(kinds["IMG1-SCI"], 0)), ["photom"],
                                      context=published["context"])
        assert fits.getval(served["photom"], "PHOTZP") == fits.getval(built, "PHOTZP")
        request = reprocess.resolve_request({}, [published], partition_key=night)
        selected = reprocess.select_frames(request["context"], request["nights"])
        assert [f.filename for f in selected] == [kinds["IMG1-SCI"].name]
        assert selected[0].changes["photom"][0] is None

        # What the reprocessing's photom step then does to the science _cal: the standard's
        # zero point brought from its airmass 1.2 to the frame's 1.3 with the reference's
        # extinction, instead of "the frame's airmass is unknown" and no correction.
        from iris_tasks.datamodels import ImageModel
        from iris_tasks.simulate import DetectorModel
        from iris_tasks.steps.photom_step import PhotomStep

        (cal,) = [p["path"] for p in FrameLedger(settings().ledger_path).products(
            selected[0].frame_id) if p["kind"] == "cal"]
        with caplog.at_level("WARNING"), ImageModel(cal) as model:
            out = PhotomStep(crds_context=published["context"]).run(model)
        assert "airmass is unknown" not in caplog.text
        phot = out.meta.photometry
        assert out.meta.cal_step.photom == "COMPLETE" and out.meta.observation.airmass == 1.3
        assert (phot.standard_airmass, phot.extinction) == (1.2, fits.getval(built, "PHOTEXT"))
        assert phot.extinction_correction == pytest.approx(-phot.extinction * 0.1)
        assert phot.zero_point == pytest.approx(fits.getval(built, "PHOTZP")
                                                + phot.extinction_correction)

        # The night's science stars in MJy/sr against their truth (scoring only: the frame
        # truth's Vega magnitudes of A0V-coloured stars at the frame's airmass 1.3, through the
        # simulator's bandpass and atmosphere): the standard at 1.2 and the table's extinction
        # put them within the 2 %. The 128 px frame has no room for the zero point's
        # 30 px aperture around its stars, so they are measured in 16 px apertures with the
        # aperture correction measured on the standard's own _cal (30 px over 16 px), as
        # photometry of small fields does. That correction also cancels what the 30 px
        # aperture of this 4-read frame picks up from the readout's uncorrected 1/f noise
        # (clean_flicker is off in the real-time chain): the reference's PHOTZP is printed
        # against the simulator's truth (+0.038 mag here, 2026-12-08, with PHOTZPER 0.006;
        # the same frame read out with clean_flicker: -0.0001 mag; docs/telluric.md).
        def truth_of(obsname: str) -> dict:
            entry = manifest_entry(manifest, obsname)
            return json.loads((sim / entry["truth"]["frame"]).read_text())["scene"]

        truth, std_truth = truth_of("IMG1-SCI"), truth_of("IMG1-TEL")
        assert truth["vega_mag"]["airmass"] == 1.3
        det = DetectorModel.for_detector("IMG1", manifest["size"], manifest["seed"])
        # the flat-fielded frame's DN/s are e-/s at this gain (docs/simulate.md)
        gain = 1.0 / float(np.median((det.flat("Ks") / det.gain)[det.active]))
        zp_truth = std_truth["atmosphere"]["zero_point_mag"] - 2.5 * math.log10(gain)
        print(f"photom reference PHOTZP {fits.getval(built, 'PHOTZP'):.4f} +- "
              f"{fits.getval(built, 'PHOTZPER'):.4f}, simulator {zp_truth:.4f} (DN/s at the "
              "median gain, airmass 1.2)")
        with ImageModel(gathered["photom"][0]) as std_cal:
            wide = measure_zero_point(std_cal.data, std_cal.err, std_cal.dq, 17.0).rate
            narrow, _ = aperture_flux(std_cal, std_truth["stars"], 0)
        errors = star_flux_errors(out, truth, "Ks", min_snr=100,
                                  aperture_correction=wide / narrow)
        print(f"aperture correction 16 -> 30 px {wide / narrow:.4f}; simulated night's science "
              "stars, calibrated / true flux - 1:", [round(float(e), 4) for e in errors])
        assert errors and all(abs(e) < 0.02 for e in errors)


def manifest_entry(manifest: dict, obsname: str) -> dict:
    (entry,) = [f for f in manifest["files"] if f["obsname"] == obsname]
    return entry


def aperture_flux(cal, stars: dict, index: int, radius: float = 16.0) -> tuple[float, float]:
    """(flux, S/N) of star ``index`` of a truth star list in ``cal``: the usable pixels (no
    DO_NOT_USE) of an aperture of ``radius`` px at its truth position, less the median of the
    usable pixels of a 20-28 px annulus, divided by the share of the star's light those pixels
    hold in the simulator's PSF (the star rendered alone: truth, for scoring only)."""
    from iris_tasks.datamodels.dqflags import pixel
    from iris_tasks.simulate.scenes import StarField

    data, err = np.asarray(cal.data, np.float64), np.asarray(cal.err, np.float64)
    good = np.isfinite(data) & ((np.asarray(cal.dq) & pixel["DO_NOT_USE"]) == 0)
    ny, nx = data.shape
    x, y = stars["x"][index], stars["y"][index]
    yy, xx = np.mgrid[0:ny, 0:nx]
    r = np.hypot(xx - x, yy - y)
    ap, ann = (r <= radius) & good, (r >= 20) & (r <= 28) & good
    flux = data[ap].sum() - np.median(data[ann]) * ap.sum()
    alone = StarField(x=[x], y=[y], flux=[1.0], fwhm_px=stars["fwhm_px"], psf=stars["psf"],
                      beta=stars["beta"], stamp_radius=stars["stamp_radius_px"]).render((ny, nx))
    share = float(alone[ap].sum() / alone.sum())
    return flux / share, flux / math.sqrt((err[ap] ** 2).sum())


def star_flux_errors(cal, truth: dict, band: str, *, min_snr: float, aperture_correction: float,
                     radius: float = 16.0) -> list[float]:
    """Calibrated flux density / truth - 1 of each star of a photom-calibrated ``_cal``
    (MJy/sr; :func:`aperture_flux` times ``aperture_correction``, the pixel solid angle)
    against the Vega flux density of its truth magnitude: the stars with S/N >= ``min_snr``,
    their aperture inside the active area and no neighbour brighter than 0.2 % of them within
    2 ``radius``."""
    ny, nx = np.shape(cal.data)
    sr = (0.004 * math.pi / 180 / 3600) ** 2  # the 4 mas pixel's solid angle
    stars = truth["stars"]
    xs, ys, fluxes = stars["x"], stars["y"], stars["flux_e_per_s"]
    out = []
    for i, mag in enumerate(truth["vega_mag"]["mag"]):
        x, y = xs[i], ys[i]
        if min(x, y, nx - 1 - x, ny - 1 - y) < radius + 4:  # the 4 px reference border
            continue
        if any(math.hypot(x - xs[j], y - ys[j]) < 2 * radius and fluxes[j] > 0.002 * fluxes[i]
               for j in range(len(xs)) if j != i):
            continue
        flux, snr = aperture_flux(cal, stars, i, radius)
        if snr >= min_snr:
            out.append(flux * aperture_correction * sr / vega_flux_mjy(band, mag) - 1.0)
    return out
