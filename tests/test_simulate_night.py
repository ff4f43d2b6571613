"""A small simulated night: valid files, complete manifest and truth, references, CLI."""

import json
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from iris_tasks import datamodels as dm
from iris_tasks.metadata import validate_file
from iris_tasks.simulate import NightPlan, simulate_frame, simulate_night

NIGHT = "2026-11-23"


@pytest.fixture(scope="module")
def night(tmp_path_factory):
    out = tmp_path_factory.mktemp("night")
    manifest = simulate_night(out, size=64, nreads=3, detectors=["IMG1", "IFS"], seed=7, night=NIGHT,
                              ifs_optics="ideal")
    return out, manifest


def test_every_file_is_valid_and_opens(night):
    out, manifest = night
    assert manifest["files"]
    for entry in manifest["files"]:
        path = out / entry["path"]
        recipe = validate_file(str(path))
        assert recipe.obsname == entry["obsname"]
        with fits.open(path) as hdul:
            h = hdul[0].header
            assert h["OBSNAME"] == entry["obsname"] and h["DETECTOR"] == entry["detector"]
            assert h["NIGHT"] == NIGHT and h["FILENAME"] == path.name
            assert h["READPATT"] == "UTR3" and h["GAIN"] > 0 and "ASDF" in hdul
            assert hdul["SCI"].data.dtype.kind == "u"
            # every on-sky frame at the night's airmass (NightPlan.airmass), which the photom
            # and telluric steps read; the frame's truth says the same; none off the sky
            on_sky = recipe.kind in ("science", "sky", "telluric")
            truth = json.loads((out / entry["truth"]["frame"]).read_text())
            assert h.get("AIRMASS") == truth["airmass"] == (NightPlan().airmass if on_sky
                                                             else None), entry["path"]
        model = dm.open_model(path)
        assert isinstance(model, dm.RampModel) and model.data.shape == (1, 3, 64, 64)
        model.close()
    assert not list((out / "raw").glob(".*"))  # no temporary files left behind


def test_night_has_the_planned_frames(night):
    out, manifest = night
    count = Counter((f["detector"], f["obsname"]) for f in manifest["files"])
    assert count[("IMG1", "IMG1-DRK")] == 5
    assert count[("IMG1", "IMG1-NFF")] == 6  # 3 per filter, Ks and H
    assert count[("IMG1", "IMG1-SKY")] == 2 and count[("IMG1", "IMG1-SCI")] == 2
    for p in ("LEN", "SLI"):
        assert count[("IFS", f"{p}-DRK")] == 5 and count[("IFS", f"{p}-SKY")] == 2
        assert count[("IFS", f"{p}-SCI")] == 2 and count[("IFS", f"{p}-TEL")] == 1
        assert count[("IFS", f"{p}-IDP")] == 4  # one arc per lamp
    assert count[("IFS", "LEN-SPX")] == 3 and count[("IFS", "SLI-NFF")] == 3
    names = [Path(f["path"]).name for f in manifest["files"]]
    assert "2026-11-23_IMG1_IMG1-SCI_0002.fits" in names and len(set(names)) == len(names)
    # nightly dark/flat groups share a READPATT and filter as the masters need
    flats = [f for f in manifest["files"] if f["obsname"] == "IMG1-NFF"]
    assert Counter(f["filter"] for f in flats) == {"Ks": 3, "H": 3}


def test_manifest_and_truth_are_complete(night):
    out, manifest = night
    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk == json.loads(json.dumps(manifest))
    for entry in manifest["files"]:
        for pointer in entry["truth"].values():
            assert (out / pointer).exists(), pointer
        frame_truth = json.loads((out / entry["truth"]["frame"]).read_text())
        assert frame_truth["obsname"] == entry["obsname"]
        assert frame_truth["cosmic_rays"]["n_events"] == len(frame_truth["cosmic_rays"]["rows"])
    sci = next(f for f in manifest["files"] if f["obsname"] == "IMG1-SCI")
    stars = json.loads((out / sci["truth"]["stars"]).read_text())
    assert len(stars["x"]) == len(stars["flux_e_per_s"]) >= 3
    frame = json.loads((out / sci["truth"]["frame"]).read_text())
    assert frame["scene"]["stars"]["flux_e_per_s"] == stars["flux_e_per_s"]
    # true sky positions: the same in the detector's star list and in every dithered frame
    assert len(stars["ra_deg"]) == len(stars["dec_deg"]) == len(stars["x"])
    assert frame["scene"]["stars"]["ra_deg"] == stars["ra_deg"]
    assert frame["scene"]["stars"]["dec_deg"] == stars["dec_deg"]
    with fits.open(out / manifest["detectors"]["IMG1"]["truth_maps"]) as hdul:
        for ext in ("BIAS", "GAIN", "READNOISE", "DARK", "HOT", "NONLIN_A", "SATURATION",
                    "FLAT_KS", "FLAT_H", "DNFLAT_KS", "DNFLAT_H", "CHAN_BIAS"):
            assert ext in hdul
    ifs = manifest["ifs"]["LENSLET"]
    with fits.open(out / ifs["truth_maps"]) as hdul:
        assert hdul["SOURCE"].data.ndim == 3 and "TRACE_X" in hdul and "WAVELENGTH" in hdul


def test_prenight_references_match_the_truth(night):
    out, manifest = night
    refs = manifest["references"]
    types = Counter((r["detector"], r["reftype"]) for r in refs)
    for det in ("IMG1", "IFS"):
        for reftype in ("mask", "saturation", "linearity", "readnoise", "gain", "dark", "flat"):
            assert types[(det, reftype)] >= 1, (det, reftype)
    assert types[("IFS", "ifstrace")] == 2 and types[("IMG1", "flat")] == 2
    for r in refs:
        h = fits.getheader(out / r["path"])
        for key in ("REFTYPE", "INSTRUME", "DETECTOR", "FILTER", "IFSMODE", "READPATT",
                    "USEAFTER", "PEDIGREE", "DESCRIP", "AUTHOR"):
            assert h.get(key) not in (None, ""), (r["path"], key)
        assert h["PEDIGREE"] == "SIMULATION"
        model = dm.open_model(out / r["path"])
        assert type(model) is dm.REFERENCE_MODELS[r["reftype"]]
        model.close()
    dark = next(r for r in refs if r["reftype"] == "dark" and r["detector"] == "IMG1")
    assert dark["readpatt"] == "UTR3"
    with fits.open(out / manifest["detectors"]["IMG1"]["truth_maps"]) as truth, \
            fits.open(out / dark["path"]) as ref:
        np.testing.assert_allclose(ref["SCI"].data, truth["DARK"].data / truth["GAIN"].data, rtol=1e-6)
    flat = next(r for r in refs if r["reftype"] == "flat" and r["detector"] == "IFS")
    assert flat["ifsmode"] in ("LENSLET", "SLICER") and flat["filter"] == "Kbb"
    # the flat references are the DN/s flat (QE / gain), stored in the truth as DNFLAT_<FILTER>
    for det, filt, ifsmode in (("IMG1", "Ks", "N/A"), ("IMG1", "H", "N/A"), ("IFS", "Kbb", "LENSLET")):
        ref_entry = next(r for r in refs if r["reftype"] == "flat" and r["detector"] == det
                         and r["filter"] == filt and r["ifsmode"] == ifsmode)
        with fits.open(out / manifest["detectors"][det]["truth_maps"]) as truth, \
                fits.open(out / ref_entry["path"]) as ref:
            usable = (ref["DQ"].data & dm.dqflags.pixel["NO_FLAT_FIELD"]) == 0
            expected = truth[f"DNFLAT_{filt.upper()}"].data
            np.testing.assert_allclose(ref["SCI"].data[usable], expected[usable], rtol=1e-6)


def test_same_seed_same_bytes_and_subsets_agree(night, tmp_path):
    out, manifest = night
    plan = NightPlan(n_dark=1, n_flat=1, n_sky=0, n_science=2, imager_filters=("Ks",))
    again = simulate_night(tmp_path, size=64, nreads=3, detectors=["IMG1"], seed=7, night=NIGHT,
                           plan=plan, references=False)
    for entry in again["files"]:
        if entry["obsname"] == "IMG1-NFF" or entry["obsname"] == "IMG1-SCI":
            a = fits.getdata(out / entry["path"], "SCI")
            b = fits.getdata(tmp_path / entry["path"], "SCI")
            assert a.tobytes() == b.tobytes(), entry["path"]
            ta = json.loads((out / entry["truth"]["frame"]).read_text())
            tb = json.loads((tmp_path / entry["truth"]["frame"]).read_text())
            for t in (ta, tb):  # the schedule (start times) depends on the plan
                del t["date_obs"], t["time_obs"]
            assert ta == tb
    with fits.open(out / "truth/IMG1_detector.fits") as a, fits.open(tmp_path / "truth/IMG1_detector.fits") as b:
        for ext in ("BIAS", "GAIN", "DARK", "FLAT_KS"):
            assert a[ext].data.tobytes() == b[ext].data.tobytes()
    other = simulate_night(tmp_path / "s8", size=64, nreads=3, detectors=["IMG1"], seed=8,
                           night=NIGHT, plan=plan, references=False)
    a = fits.getdata(out / again["files"][-1]["path"], "SCI")
    b = fits.getdata(tmp_path / "s8" / other["files"][-1]["path"], "SCI")
    assert a.tobytes() != b.tobytes()


def test_single_frame_matches_the_night(night, tmp_path):
    out, manifest = night
    path, truth = simulate_frame(tmp_path, "IMG1-SCI", "IMG1", size=64, nreads=3, seed=7,
                                 exp_no=2, night=NIGHT, truth_path=tmp_path / "t.json")
    assert path.name == "2026-11-23_IMG1_IMG1-SCI_0002.fits" and path.parent == tmp_path
    other, _ = simulate_frame(f"{tmp_path}/new/", "IMG1-DRK", "IMG1", size=64, nreads=2, seed=7,
                              night=NIGHT)
    assert other == tmp_path / "new" / "2026-11-23_IMG1_IMG1-DRK_0001.fits"
    umask = os.umask(0)
    os.umask(umask)
    assert other.stat().st_mode & 0o777 == 0o666 & ~umask  # as open() would create it
    validate_file(str(path))
    a = fits.getdata(path, "SCI")
    b = fits.getdata(out / "raw" / path.name, "SCI")
    assert a.tobytes() == b.tobytes()
    assert json.loads((tmp_path / "t.json").read_text())["scene"]["dither_px"] == truth["scene"]["dither_px"]


def _cli(monkeypatch, argv):
    from iris_tasks import cli

    if "iris_tasks.simulate.cli" not in cli.COMMAND_MODULES:  # until the lead registers it
        monkeypatch.setattr(cli, "COMMAND_MODULES", (*cli.COMMAND_MODULES, "iris_tasks.simulate.cli"))
    return cli.main(argv)


def test_cli_frame_references_and_night(monkeypatch, tmp_path, capsys):
    frame = tmp_path / "land" / "x.fits"
    assert _cli(monkeypatch, ["simulate", "frame", "--obsname", "LEN-SCI", "--detector", "IFS",
                              "--out", str(frame), "--size", "64", "--reads", "2",
                              "--sampmode", "CDS"]) == 0
    h = fits.getheader(frame)
    assert h["SAMPMODE"] == "CDS" and h["NUMREADS"] == 2 and h["IFSMODE"] == "LENSLET"
    validate_file(str(frame))
    assert _cli(monkeypatch, ["simulate", "frame", "--obsname", "IMG1-SCI", "--detector", "IFS",
                              "--out", str(tmp_path), "--size", "64"]) == 1
    assert "cannot take IMG1-SCI" in capsys.readouterr().err
    img = tmp_path / "img.fits"
    assert _cli(monkeypatch, ["simulate", "frame", "--obsname", "IMG1-SCI", "--detector", "IMG1",
                              "--out", str(img), "--size", "64", "--reads", "2", "--pa", "-30.5",
                              "--truth", str(tmp_path / "img.json")]) == 0
    assert fits.getheader(img)["PA"] == -30.5
    assert json.loads((tmp_path / "img.json").read_text())["scene"]["pointing"]["pa_deg"] == -30.5
    validate_file(str(img))
    assert _cli(monkeypatch, ["simulate", "references", "--out", str(tmp_path / "refs"),
                              "--size", "64", "--detectors", "IMG3", "--readpatt", "UTR3,UTR10"]) == 0
    written = sorted(p.name for p in (tmp_path / "refs").iterdir())
    assert "iris_sim_dark_IMG3_UTR10.fits" in written and "iris_sim_mask_IMG3.fits" in written
    assert _cli(monkeypatch, ["simulate", "night", "--out", str(tmp_path / "n"), "--size", "32",
                              "--reads", "2", "--detectors", "IMG4", "--darks", "1", "--flats", "1",
                              "--sky", "1", "--science", "1", "--night", NIGHT,
                              "--no-references"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["frames"] == 6 and summary["references"] == 0  # with one IMG1-TEL


def test_prenight_references_publish_and_select_in_crds(night, tmp_path):
    """A fresh CRDS cache given the simulated references selects them for the raw frames."""
    calib_testing = pytest.importorskip("iris_tasks.calib.testing")
    out, manifest = night
    with calib_testing.temporary_cache(tmp_path / "crds") as calib:
        calib.publish_references([out / r["path"] for r in manifest["references"]], "simulated pre-night")
        by_type: dict[str, dict[str, str]] = {}
        for r in manifest["references"]:
            by_type.setdefault(r["detector"], {})[r["reftype"]] = r["path"]
        for obsname in ("IMG1-SCI", "LEN-SCI", "SLI-NFF"):
            entry = next(f for f in manifest["files"] if f["obsname"] == obsname)
            header = dict(fits.getheader(out / entry["path"]))
            types = ["mask", "saturation", "linearity", "readnoise", "gain", "dark", "flat"]
            if entry["detector"] == "IFS":
                types.append("ifstrace")
            chosen = calib.get_references(header, types)
            assert set(chosen) == set(types)
            flat = fits.getheader(chosen["flat"])
            assert flat["DETECTOR"] == entry["detector"] and flat["FILTER"] == entry["filter"]
            assert flat["IFSMODE"] == entry["ifsmode"]
            if entry["detector"] == "IFS":
                trace = fits.getheader(chosen["ifstrace"])
                assert trace["IFSSCALE"] == entry["ifsscale"]


def test_imager_standard_header_airmass_is_the_one_its_rate_went_through():
    """An imager standard's count rate goes through the atmosphere also without the factory's
    (airmass 1 unless given): its header AIRMASS and truth say that airmass, given or not."""
    import datetime as dt

    from iris_tasks.simulate import FrameFactory, FrameSpec
    from iris_tasks.simulate.atmosphere import TelluricStandard

    factory = FrameFactory(size=64, seed=3)
    start = dt.datetime(2026, 11, 24, 7, 0, tzinfo=dt.UTC)
    rates = {}
    for airmass in (None, 1.0, 1.6):
        spec = FrameSpec(detector="IMG1", obsname="IMG1-TEL", exp_no=1, start=start, nreads=2,
                         standard=TelluricStandard(mag=17.0, band="Ks"), airmass=airmass)
        model, truth = factory.make(spec, noise=False, cosmic_rays=False)
        atm = truth["scene"]["atmosphere"]
        assert model.meta.observation.airmass == truth["airmass"] == atm["airmass"] \
            == (airmass or 1.0)
        rates[airmass] = atm["star_e_per_s"]
        model.close()
    assert rates[None] == rates[1.0] > rates[1.6]  # extinction applied at the header's airmass


def test_ifs_standard_is_a_declared_star_through_the_atmosphere(tmp_path):
    """The night's IFS standard (NightPlan.ifs_standard) is the star its header declares
    (STDSPTYP/STDTEFF/STDMAG/STDMAGBD, the truth's standard), seen through the atmosphere at
    its AIRMASS: the star's light scales with STDMAG and falls with the airmass; the ideal
    optics keep the generic star without a standard's header."""
    import dataclasses

    from iris_tasks.simulate import FrameFactory

    plan = NightPlan(n_dark=0, n_flat=0, n_arc=0, n_sky=0, n_science=0, n_telluric=1,
                     ifs_modes=(("SLICER", "25"),))
    manifest = simulate_night(tmp_path, size=64, nreads=2, detectors=["IFS"], seed=4, night=NIGHT,
                              plan=plan, references=False)
    (entry,) = manifest["files"]
    star = plan.ifs_standard
    h = fits.getheader(tmp_path / entry["path"])
    truth = json.loads((tmp_path / entry["truth"]["frame"]).read_text())
    atm = truth["scene"]["atmosphere"]
    assert (h["STDSPTYP"], h["STDMAGBD"]) == (star.sptype, star.band) == \
        (atm["standard"]["sptype"], atm["standard"]["band"])
    assert h["STDMAG"] == star.mag == atm["standard"]["mag"]
    assert h["STDTEFF"] == pytest.approx(star.temperature) and 9000 < star.temperature < 10500
    assert h["AIRMASS"] == plan.airmass == atm["airmass"] == truth["airmass"]

    from iris_tasks.simulate.night import plan_night

    factory = FrameFactory(size=64, seed=4)
    (spec,) = plan_night(NIGHT, ["IFS"], nreads=2, plan=plan)
    image = {}
    for key, changes in (("m", {}), ("m+1", {"standard": dataclasses.replace(star, mag=star.mag + 1)}),
                         ("m+2", {"standard": dataclasses.replace(star, mag=star.mag + 2)}),
                         ("X2", {"airmass": 2.0})):
        image[key] = factory.illumination(dataclasses.replace(spec, **changes))[0].astype(np.float64)
    ratio = (image["m"] - image["m+1"]).sum() / (image["m+1"] - image["m+2"]).sum()
    assert ratio == pytest.approx(10**0.4, rel=1e-3)
    assert 0 < (image["m"] - image["X2"]).sum() < 0.5 * (image["m"] - image["m+1"]).sum()

    # the magnitude in the band of the IFS filter (the telluric build needs it)
    (hbb,) = plan_night(NIGHT, ["IFS"], nreads=2,
                        plan=dataclasses.replace(plan, ifs_filter="Hbb"))
    assert hbb.standard == dataclasses.replace(star, band="H")
    ideal = simulate_night(tmp_path / "ideal", size=64, nreads=2, detectors=["IFS"], seed=4,
                           night=NIGHT, plan=plan, references=False, ifs_optics="ideal")
    assert "STDSPTYP" not in fits.getheader(tmp_path / "ideal" / ideal["files"][0]["path"])
    with pytest.raises(ValueError, match="realistic optics"):
        FrameFactory(size=64, seed=4, optics="ideal").illumination(spec)


def test_ifs_science_goes_through_the_standards_atmosphere(tmp_path):
    """The night's IFS science (NightPlan.ifs_atmosphere, on by default) is the physical
    source through the same atmosphere as the night's standard, each at its own AIRMASS and
    the same water vapour: the frame truth records both, the science's light falls with its
    airmass as the transmission says, and a single simulated frame goes through it too.
    ``ifs_atmosphere=False`` keeps the scene's e-/s source."""
    import dataclasses

    from iris_tasks.simulate.atmosphere import transmission
    from iris_tasks.simulate.night import night_factory, plan_night

    plan = NightPlan(n_dark=0, n_flat=0, n_arc=0, n_sky=1, n_science=1, n_telluric=1,
                     ifs_modes=(("SLICER", "25"),), airmass=1.1, ifs_standard_airmass=1.4)
    manifest = simulate_night(tmp_path, size=64, nreads=2, detectors=["IFS"], seed=4, night=NIGHT,
                              plan=plan, references=False)
    assert manifest["ifs_atmosphere"] is True
    truth = {f["obsname"]: json.loads((tmp_path / f["truth"]["frame"]).read_text())
             for f in manifest["files"]}
    sci, tel = truth["SLI-SCI"]["scene"]["atmosphere"], truth["SLI-TEL"]["scene"]["atmosphere"]
    assert (sci["airmass"], tel["airmass"]) == (1.1, 1.4)
    assert fits.getval(tmp_path / "raw" / truth["SLI-SCI"]["file"], "AIRMASS") == 1.1
    assert fits.getval(tmp_path / "raw" / truth["SLI-TEL"]["file"], "AIRMASS") == 1.4
    assert sci["pwv_mm"] == tel["pwv_mm"] and "source_physical" in sci
    assert sci["transmission_wave_um"] == tel["transmission_wave_um"]
    w = np.array(sci["transmission_wave_um"])
    # one atmosphere (Beer-Lambert: T_sci = T_std ^ (X_sci / X_std)), deep bands in the band
    t_sci, t_tel = np.array(sci["transmission"]), np.array(tel["transmission"])
    np.testing.assert_allclose(t_sci, t_tel ** (1.1 / 1.4), atol=2e-5)
    assert t_tel.min() < 0.5
    assert "atmosphere" not in truth["SLI-SKY"]["scene"]  # airglow only

    # the science's light (sky-subtracted, noiseless) falls with airmass as the band's
    # transmission weighted by the source's detected spectrum does
    factory = night_factory(plan, size=64, seed=4)
    spec = next(s for s in plan_night(NIGHT, ["IFS"], nreads=2, plan=plan)
                if s.obsname == "SLI-SCI")
    sky = factory.illumination(next(s for s in plan_night(NIGHT, ["IFS"], nreads=2, plan=plan)
                                    if s.obsname == "SLI-SKY"))[0].astype(np.float64)
    light = {x: (factory.illumination(dataclasses.replace(spec, airmass=x))[0] - sky).sum()
             for x in (1.0, 2.0)}
    t1, t2 = transmission(w, 1.0, sci["pwv_mm"]), transmission(w, 2.0, sci["pwv_mm"])
    assert light[2.0] / light[1.0] == pytest.approx(t2.mean() / t1.mean(), rel=0.02)
    assert light[2.0] < light[1.0]

    off = simulate_night(tmp_path / "off", size=64, nreads=2, detectors=["IFS"], seed=4,
                         night=NIGHT, plan=dataclasses.replace(plan, ifs_atmosphere=False),
                         references=False)
    assert off["ifs_atmosphere"] is False
    entry = next(f for f in off["files"] if f["obsname"] == "SLI-SCI")
    assert "atmosphere" not in json.loads((tmp_path / "off" / entry["truth"]["frame"]).read_text())["scene"]
    _, single = simulate_frame(tmp_path / "one.fits", "SLI-SCI", "IFS", size=64, nreads=2, seed=4,
                               night=NIGHT)
    assert single["scene"]["atmosphere"]["airmass"] == NightPlan().airmass
