"""The nightly telluric hook, without Airflow: the night's telluric-standard cubes (SLI-TEL
``_s3d``) found in the ledger and the store, one ``telluric`` reference holding the
configuration's standards built, QA'd and published in the night's new CRDS context beside
the other masters (a standard that gives no response reported as a failed master with its
reason), CRDS serving it to the night's IFS science frames, the reprocessing selecting those
frames because their ``telluric`` selection changes (none -> the night's reference), and the
telluric step interpolating the two standards that bracket a frame's airmass (BRACKET).

The cubes are small synthetic CubeModels with the header a reduced standard carries (the
science accuracy of the response is tests/test_telluric.py's); the rest is the real ledger,
LocalStore and a temporary CRDS cache.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from iris_tasks.config import settings
from iris_tasks.orchestration.ledger import DONE, FrameLedger, isotime

NIGHT = "2026-11-20"  # local date; the night's frames are taken 2026-11-21 05:00-15:00 UTC
CONFIG = {"DETECTOR": "IFS", "IFSMODE": "SLICER", "IFSSCALE": "25", "FILTER": "Kbb"}


def standard_cube(path: Path, when: dt.datetime, *, sptype: str = "A0V", airmass: float = 1.3,
                  star: bool = True, saturated: bool = False, seed: int = 0,
                  noise: float = 0.002) -> Path:
    """A telluric standard's cube as iris_ifs2 leaves it (S_CUBE COMPLETE): an A0V star of
    Ks = 12 through a smooth response with one absorption band, on 16 x 16 spaxels;
    ``saturated``: its core's voxels SATURATED | DO_NOT_USE at every wavelength; ``noise``:
    per-voxel noise as a share of the brightest bin's total count rate."""
    from iris_tasks.datamodels import CubeModel
    from iris_tasks.datamodels.dqflags import pixel
    from iris_tasks.ifs.telluric import blackbody_flam

    rng = np.random.default_rng(seed)
    wave = np.linspace(1.97, 2.38, 300)
    response = 2.0e12 * (1.0 - 0.4 * np.exp(-0.5 * ((wave - 2.05) / 0.01) ** 2))
    counts = response * blackbody_flam(wave, 9700.0, 12.0, "Ks")
    jj, ii = np.mgrid[0:16, 0:16]
    profile = np.exp(-0.5 * ((ii - 7.4) ** 2 + (jj - 8.2) ** 2) / 1.0**2)
    profile /= profile.sum()
    noise = noise * float(counts.max())
    data = (counts[:, None, None] * profile[None] if star else np.zeros((wave.size, 16, 16))) \
        + rng.normal(0.0, noise, (wave.size, 16, 16))
    dq = np.zeros(data.shape, np.uint32)
    if saturated:
        dq[:, 7:10, 6:9] = pixel["SATURATED"] | pixel["DO_NOT_USE"]
        data[:, 7:10, 6:9] = np.nan
    cube = CubeModel(data=data.astype(np.float32), err=np.full(data.shape, noise, np.float32),
                     dq=dq, wavelength=wave)
    inst, obs, std = cube.meta.instrument, cube.meta.observation, cube.meta.standard
    inst.name, inst.detector, inst.ifsmode = "IRIS", CONFIG["DETECTOR"], CONFIG["IFSMODE"]
    inst.ifsscale, inst.filter = CONFIG["IFSSCALE"], CONFIG["FILTER"]
    obs.obsname, obs.target, obs.airmass = "SLI-TEL", "HD 1234", airmass
    obs.date, obs.time = when.strftime("%Y-%m-%d"), when.strftime("%H:%M:%S")
    std.sptype, std.mag, std.band = sptype, 12.0, "Ks"
    cube.meta.night = NIGHT
    cube.meta.cal_step.extract_cube = "COMPLETE"
    cube.save(str(path))
    cube.close()
    return path


def _rate(path: Path, when: dt.datetime, obsname: str = "SLI-SCI", *,
          config: dict[str, str] = CONFIG) -> Path:
    """What CRDS matches a reduced frame on: its rate header (an IFS frame by default)."""
    header = fits.Header({"INSTRUME": "IRIS", "OBSNAME": obsname, "READPATT": "UTR10",
                         "DATE-OBS": when.strftime("%Y-%m-%d"),
                         "TIME-OBS": when.strftime("%H:%M:%S"), **config})
    fits.HDUList([fits.PrimaryHDU(header=header),
                  fits.ImageHDU(np.zeros((4, 4), np.float32), name="SCI")]).writeto(path)
    return path


def _science_cube(when: dt.datetime) -> object:
    """An IFS science cube of the standards' configuration, extracted and sky-subtracted."""
    from iris_tasks.datamodels import CubeModel

    shape = (300, 4, 4)
    cube = CubeModel(data=np.ones(shape, np.float32), err=np.full(shape, 0.1, np.float32),
                     dq=np.zeros(shape, np.uint32), wavelength=np.linspace(1.97, 2.38, 300))
    inst, obs = cube.meta.instrument, cube.meta.observation
    inst.name, inst.detector, inst.ifsmode = "IRIS", CONFIG["DETECTOR"], CONFIG["IFSMODE"]
    inst.ifsscale, inst.filter = CONFIG["IFSSCALE"], CONFIG["FILTER"]
    obs.obsname, obs.airmass = "SLI-SCI", 1.2
    obs.date, obs.time = when.strftime("%Y-%m-%d"), when.strftime("%H:%M:%S")
    cube.meta.exposure.readpatt = "UTR10"
    cube.meta.cal_step.extract_cube = "COMPLETE"
    return cube


def _processed(led: FrameLedger, name: str, obsname: str, kind: str, context: str,
               products: dict[str, Path], raw: Path, *, night: str = NIGHT,
               config: dict[str, str] = CONFIG) -> str:
    """A frame of ``night`` the real-time chain finished under ``context``, with its products
    (an IFS frame of CONFIG by default)."""
    frame, _ = led.claim(sha256=hashlib.sha256(name.encode()).hexdigest(), filename=name,
                         source_uri=f"file://{raw}", landed_at=isotime())
    mode = str(config.get("IFSMODE") or "imager").lower()
    led.update_frame(frame["frame_id"], night=night, obsname=obsname, kind=kind, mode=mode,
                     detector=config["DETECTOR"], filter=config["FILTER"],
                     crds_context=context, raw_path=str(raw))
    for what, path in products.items():
        led.add_product(frame["frame_id"], what, path=str(path))
    led.finish(frame["frame_id"], status=DONE)
    return frame["frame_id"]


def qa_each(masters: list[str]) -> tuple[list[dict], dict[str, str]]:
    """What the nightly ``qa`` tasks make of ``masters``: the reports of those that pass, and
    the QA error of each one that does not (by file name)."""
    from iris_tasks.orchestration import nightly

    reports, errors = [], {}
    for m in masters:
        try:
            reports.append(nightly.qa_master(m))
        except nightly.QAError as exc:
            errors[Path(m).name] = str(exc)
    return reports, errors


def test_night_standards_become_telluric_references_and_reprocess_the_science(
        iris_state, tmp_path):
    from iris_tasks.calib.testing import temporary_cache, write_reference
    from iris_tasks.orchestration import nightly, reprocess
    from iris_tasks.orchestration.approval import approval_request, decide
    from iris_tasks.storage import open_store, product_key

    cfg = settings()
    led = FrameLedger(cfg.ledger_path)
    store = open_store(cfg.store_url)
    t0 = dt.datetime(2026, 11, 21, 6, 0, 0)
    frames = tmp_path / "frames"
    frames.mkdir()
    sci_early = _rate(frames / "sci1_rate.fits", t0)  # before any standard
    sci_late = _rate(frames / "sci2_rate.fits", t0 + dt.timedelta(hours=4))
    sky = _rate(frames / "sky_rate.fits", t0 + dt.timedelta(hours=4, minutes=5), "SLI-SKY")
    hour = dt.timedelta(hours=1)
    tel_first = standard_cube(frames / "tel1_s3d.fits", t0 + hour, airmass=1.35)
    tel_wrong = standard_cube(frames / "tel2_s3d.fits", t0 + 2 * hour, sptype="G2V", seed=1)
    tel_second = standard_cube(frames / "tel3_s3d.fits", t0 + 3 * hour, airmass=1.15, seed=2)
    tel_empty = standard_cube(frames / "tel4_s3d.fits", t0 + 5 * hour, star=False, seed=3)
    tel_saturated = standard_cube(frames / "tel5_s3d.fits", t0 + 6 * hour, saturated=True, seed=4)
    # Builds (the star stands 130 sigma above the field) but its response has a median S/N of
    # ~10 per bin, below QA's 30 (thin cloud, say): left out, the others still published. At
    # airmass 1.25 it would otherwise bracket the 1.2 science below (with 1.15).
    tel_noisy = standard_cube(frames / "tel6_s3d.fits", t0 + 2.5 * hour, airmass=1.25, seed=5,
                              noise=0.01)

    with temporary_cache(tmp_path / "crds") as calib:
        first = calib.publish_references(
            [str(write_reference(tmp_path / "d.fits", "dark", DETECTOR="IFS", READPATT="UTR10"))],
            "pre-night")
        ids = {
            "sci_early": _processed(led, "sci1.fits", "SLI-SCI", "science", first,
                                    {"rate": sci_early}, sci_early),
            "sci_late": _processed(led, "sci2.fits", "SLI-SCI", "science", first,
                                   {"rate": sci_late}, sci_late),
            "sky": _processed(led, "sky.fits", "SLI-SKY", "sky", first, {"rate": sky}, sky),
        }
        for hour, (name, cube) in enumerate((("tel1", tel_first), ("tel2", tel_wrong),
                                             ("tel3", tel_second), ("tel5", tel_saturated),
                                             ("tel6", tel_noisy)), start=1):
            rate = _rate(frames / f"{name}_rate.fits", t0 + dt.timedelta(hours=hour), "SLI-TEL")
            ids[name] = _processed(led, f"{name}.fits", "SLI-TEL", "telluric", first,
                                   {"rate": rate, "s3d": cube}, rate)
        # A standard another host reduced: only its cube in the store, under the product layout.
        store.put_file(tel_empty, product_key(NIGHT, "IFS", "SLI-TEL", tel_empty.name), {})

        # Before the night's references: CRDS has no telluric for the science frames.
        header = dict(fits.getheader(sci_late, 0))
        with pytest.raises(calib.ReferenceMissingError, match="no telluric reference"):
            calib.get_references(header, ["telluric"], context=first)

        gathered = nightly.gather_calibrations(NIGHT)
        assert sorted(Path(p).name for p in gathered["telluric"]) == [
            "tel1_s3d.fits", "tel2_s3d.fits", "tel3_s3d.fits", "tel4_s3d.fits",
            "tel5_s3d.fits", "tel6_s3d.fits"]
        masters = nightly.build_masters(gathered)
        built = sorted(Path(m).name for m in masters if m.endswith("_telluric.fits"))
        failed = sorted(m for m in masters if m.endswith(nightly.FAILED_SUFFIX))
        # One reference for the configuration, holding the night's two good standards; the
        # noisy one, built but below QA, is left out of it instead of failing it.
        assert built == ["iris_ifs_slicer_25mas_kbb_night20261120_telluric.fits"]
        assert [Path(f).name for f in failed] == [
            "iris_tel2_s3d_telluric.failed.json", "iris_tel4_s3d_telluric.failed.json",
            "iris_tel5_s3d_telluric.failed.json", "iris_tel6_s3d_telluric.failed.json"]

        reports, errors = qa_each(masters)
        assert "STDSPTYP" in errors["iris_tel2_s3d_telluric.failed.json"]
        assert "G2V" in errors["iris_tel2_s3d_telluric.failed.json"]
        assert "no star" in errors["iris_tel4_s3d_telluric.failed.json"]
        assert "saturated" in errors["iris_tel5_s3d_telluric.failed.json"]
        noisy = errors["iris_tel6_s3d_telluric.failed.json"]
        assert "response_snr=" in noisy and "< 30" in noisy and "left out of " + built[0] in noisy
        with pytest.raises(nightly.QAError) as qa_noisy:
            nightly.qa_master(str(Path(failed[-1])))
        assert qa_noisy.value.report["failed"] == ["response_snr"]
        assert qa_noisy.value.report["metrics"]["response_snr"] < 30
        assert [r["reftype"] for r in reports] == ["telluric"]
        for r in reports:
            assert r["metrics"]["response_snr"] >= 30 and r["metrics"]["masked_fraction"] < 0.2
            assert set(nightly.thresholds()["telluric"]) <= set(r["metrics"])

        # The operator sees the standards' QA and why the others were not built.
        request = approval_request(reports, masters, NIGHT)
        assert "response_snr" in request["body"] and "no star" in request["body"]
        assert "tel6_s3d.fits: failed QA (response_snr=" in request["body"]
        decision = decide(request["offered"], ["Approve all"], night=NIGHT, how="auto",
                          reports=reports, failed=request["failed"])
        published = nightly.publish_masters(reports, NIGHT, decision=decision)
        new = published["context"]
        assert published["previous"] == first and new != first
        assert sorted(published["references"]) == built

        # The reference (format 2) starts at the night's start and lists both standards with
        # their own times and airmasses; its primary keywords are the first standard's.
        (ref_path,) = [m for m in masters if m.endswith("_telluric.fits")]
        h = fits.getheader(ref_path, 0)
        assert (h["TELFORMT"], h["TELNSTD"], h["USEAFTER"]) == (2, 2, "2026-11-20T22:00:00")
        assert h["TELNREJ"] == 1  # named with its reason in the history
        assert any("tel6_s3d.fits left out by QA: response_snr=" in str(line)
                   for line in h.get("HISTORY", []))
        assert (h["TIME-OBS"], h["TELAIRM"], h["TELAIRLO"], h["TELAIRHI"]) == (
            "07:00:00", 1.35, 1.15, 1.35)
        table = fits.getdata(ref_path, "STANDARDS")
        assert [(c, t, round(float(x), 2)) for c, t, x in zip(
            table["cube"], table["time_obs"], table["airmass"], strict=True)] == [
            ("tel1_s3d.fits", "07:00:00", 1.35), ("tel3_s3d.fits", "09:00:00", 1.15)]
        assert fits.getdata(ref_path, "STDRESP").shape == (2, 300)
        served = {name: calib.get_references(dict(fits.getheader(p, 0)), ["telluric"],
                                             context=new)["telluric"]
                  for name, p in (("early", sci_early), ("late", sci_late))}
        (chosen,) = {Path(p).name for p in served.values()}  # CRDS's name of the reference
        assert fits.getval(served["late"], "TELNSTD") == 2

        # Reprocessing the night: the science frames, because their telluric changes; not the
        # sky frame nor the standards, which do not use it (nothing else changed for them).
        request = reprocess.resolve_request({}, [published], partition_key=NIGHT)
        selected = {f.frame_id: f for f in reprocess.select_frames(request["context"],
                                                                    request["nights"])}
        assert set(selected) == {ids["sci_early"], ids["sci_late"]}
        for key in ("sci_early", "sci_late"):
            old, ref = selected[ids[key]].changes["telluric"]
            assert old is None and ref == chosen
        (state,) = reprocess.night_states(new)
        assert (state["stale"], state["stale_frames"], state["unchanged"]) == (True, 2, 6)

        # What reprocessing then does to a cube at airmass 1.2, before and after both
        # standards: the telluric step, under the new context, gets both standards through
        # the one CRDS reference and interpolates them in airmass (1.15 and 1.35: weight 0.25
        # on the second); under the pre-night context it is skipped (the cube stays in e-/s).
        from iris_tasks.ifs.telluric import SURFACE_UNIT
        from iris_tasks.ifs.telluric_step import TelluricStep, standards_in

        before = TelluricStep(crds_context=first).run(_science_cube(t0 + dt.timedelta(hours=4)))
        assert before.meta.cal_step.telluric == "SKIPPED"
        for when in (t0, t0 + dt.timedelta(hours=4)):
            after = TelluricStep(crds_context=new).run(_science_cube(when))
            tel = after.meta.telluric
            assert after.meta.cal_step.telluric == "COMPLETE"
            assert after.meta.bunit_data == SURFACE_UNIT  # erg/s/cm^2/A/arcsec^2
            assert (tel.method, tel.airmass, tel.airmass2) == ("BRACKET", 1.15, 1.35)
            assert tel.weight2 == pytest.approx(0.25)
            assert (tel.star, tel.reference2) == ("tel3_s3d.fits", f"{chosen}[0]")
            assert after.meta.ref_file.telluric.name.endswith(chosen)
        # Without bracketing: the nearest standard (time + airmass) rescaled.
        one = TelluricStep(crds_context=new, bracket_airmass=False).run(_science_cube(t0))
        assert (one.meta.telluric.method, one.meta.telluric.airmass) == ("SCALED", 1.35)

        # A one-standard reference (format 1, no TELFORMT; what was published before
        # 2026-12-07) is still read: one candidate, rescaled.
        from iris_tasks.datamodels import TelluricModel
        from iris_tasks.masters.telluric import build_telluric, save_telluric

        old_style = save_telluric(build_telluric(tel_second), tmp_path / "v1")
        assert "TELFORMT" not in fits.getheader(old_style, 0)
        v1 = TelluricStep(override_telluric=str(old_style)).run(_science_cube(t0))
        assert (v1.meta.telluric.method, v1.meta.telluric.airmass) == ("SCALED", 1.15)
        newer = TelluricModel(ref_path)
        newer.meta.format_version = 3
        with pytest.raises(ValueError, match="TELFORMT=3 is not one this step reads"):
            standards_in(ref_path, newer)

        # The failure documents say what failed and from which cube.
        failure = json.loads(Path(failed[0]).read_text())
        assert failure["reftype"] == "telluric" and failure["inputs"][0].endswith("tel2_s3d.fits")


def test_no_reference_when_no_standard_of_a_configuration_passes_qa(tmp_path):
    """Every standard of the configuration below QA: nothing written for it (the previous
    reference stays operational), each standard a failed master naming its numbers."""
    from iris_tasks.orchestration import nightly
    from iris_tasks.pipelines.recipes import build_telluric_references

    t0 = dt.datetime(2026, 11, 21, 7, 0, 0)
    cubes = [standard_cube(tmp_path / f"noisy{i}_s3d.fits", t0 + dt.timedelta(hours=i),
                           seed=10 + i, noise=0.01) for i in range(2)]
    limits = nightly.thresholds()["telluric"]
    out = tmp_path / "masters"
    out.mkdir()
    written, failures = build_telluric_references(cubes, out, night=NIGHT, limits=limits)
    assert written == [] and not list(out.glob("*_telluric.fits"))
    assert [Path(f.inputs[0]).name for f in failures] == ["noisy0_s3d.fits", "noisy1_s3d.fits"]
    for f in failures:
        assert "no standard of IFS/SLICER/25/Kbb passed" in f.reason
        assert "response_snr" in f.failed and f.metrics["response_snr"] < limits["response_snr"][0]
    with pytest.raises(nightly.QAError, match=r"noisy0_s3d.fits: failed QA \(response_snr="):
        nightly.qa_master(str(nightly._write_failure(failures[0], out)))
    # Without limits (the directory driver) both go in.
    written, failures = build_telluric_references(cubes, out, night=NIGHT)
    assert len(written) == 1 and not failures
    assert fits.getheader(written[0], 0)["TELNSTD"] == 2


def test_a_field_narrower_than_the_aperture_is_refused(tmp_path, caplog):
    """A standard whose aperture reaches far beyond the field (the 4 mas lenslet field of a
    small detector is a few spaxel rows) would give a response missing the light the field
    cuts off: an aperture asked for is refused, naming the numbers; without one (the nightly
    build) the builder takes the largest aperture the field holds around the star, says so
    and records it; the full field builds with the default."""
    from iris_tasks.datamodels import CubeModel
    from iris_tasks.masters import MasterBuildError
    from iris_tasks.masters.telluric import aperture_outside_fraction, build_telluric

    assert aperture_outside_fraction(7.5, 7.5, 4.0, (16, 16)) == 0.0
    assert 0.0 < aperture_outside_fraction(2.0, 7.5, 4.0, (16, 16)) < 0.2
    full = standard_cube(tmp_path / "full_s3d.fits", dt.datetime(2026, 11, 21, 7, 0, 0))
    assert build_telluric(full).model.meta.star_y == pytest.approx(8.2, abs=0.2)
    with CubeModel(str(full)) as cube:
        strip = cube.copy()
        strip.data, strip.err, strip.dq = (a[:, 6:10, :].copy() for a in (cube.data, cube.err, cube.dq))
    with pytest.raises(MasterBuildError, match=r"% of the 4.0-spaxel aperture around the star .* "
                                               r"lies beyond the 16 x 4-spaxel field"):
        build_telluric(strip, aperture_arcsec=0.1)
    with caplog.at_level("WARNING", logger="iris_tasks.masters.telluric"):
        narrow = build_telluric(strip)
    assert "cannot hold the 0.10 arcsec aperture (4.0 spaxels)" in caplog.text
    assert 1.5 <= narrow.qa["radius"] < 2.6
    assert narrow.model.meta.aperture_radius == pytest.approx(narrow.qa["radius"], abs=1e-3)
