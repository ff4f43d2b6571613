"""IRIS steps through stpipe: Step.call, strun, CRDS references, overrides, statuses, errors."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from stpipe import Step, crds_client
from stpipe import _cmdline as stpipe_cmdline
from test_steps_support import (
    GAIN,
    READ_NOISE,
    active,
    detector_references,
    reference,
    write_ramp,
    write_rate,
)

from iris_tasks.datamodels import ImageModel, open_model
from iris_tasks.datamodels.dqflags import pixel
from iris_tasks.pipelines import Image2Pipeline, Stage1Pipeline
from iris_tasks.steps import (
    AssignWcsStep,
    DarkSubStep,
    DQInitStep,
    FlatFieldStep,
    ReadoutStep,
    ReferenceFileError,
    SkyCalibrationError,
    SkySubStep,
)
from iris_tasks.steps._integration import get_steps

DNU = pixel["DO_NOT_USE"]

# stpipe's crds_client still calls crds' deprecated cache-lock helper on every lookup.
pytestmark = pytest.mark.filterwarnings("ignore:'get_cache_lock' is deprecated:DeprecationWarning")


@pytest.fixture(scope="module")
def crds_env(tmp_path_factory):
    """A CRDS cache holding one of each IMG1 reference; yields (calib, refs, context)."""
    from iris_tasks.calib.testing import temporary_cache

    root = tmp_path_factory.mktemp("crds_steps")
    refs = detector_references(root / "refs")
    with temporary_cache(root / "cache") as calib:
        context = calib.publish_references([str(p) for p in refs.values()], "step test references")
        yield calib, refs, context


@pytest.fixture
def rate_file(tmp_path):
    data = np.full((64, 64), 20.0, np.float32)
    return write_rate(tmp_path / "sci_rate.fits", data)


def test_entry_point_lists_every_step_with_its_alias():
    import importlib

    for class_path, alias, is_pipeline in get_steps():
        module, name = class_path.rsplit(".", 1)
        cls = getattr(importlib.import_module(module), name)
        assert cls.class_alias == alias
        assert issubclass(cls, Step)
        assert is_pipeline == hasattr(cls, "step_defs")
    from stpipe import entry_points

    aliases = {s.class_alias for s in entry_points.get_steps() if s.package_name == "iris-drs"}
    assert {"readout", "iris_image2", "flat_field"} <= aliases


def test_readout_step_call_records_statuses_and_crds_references(crds_env, tmp_path):
    _, _, context = crds_env
    raw = write_ramp(tmp_path / "sci.fits", 20.0, nramps=2)
    result = ReadoutStep.call(str(raw))
    assert isinstance(result, ImageModel)
    a = active()
    assert np.median(result.data[a]) == pytest.approx(20.0, abs=0.2)
    assert result.dq[0, 0] & pixel["REFERENCE_PIXEL"]
    steps = result.meta.cal_step
    assert (steps.readout, steps.refpix, steps.saturation, steps.linearity, steps.jump,
            steps.ramp_fit) == ("COMPLETE",) * 6
    refs = result.meta.ref_file
    for reftype in ("mask", "saturation", "linearity", "readnoise", "gain"):
        assert getattr(refs, reftype).name.startswith("crds://tmt_iris_" + reftype)
    assert refs.crds.context_used == context
    assert result.meta.bunit_data == "DN/s"
    # two ramps combined: the error is that of one ramp / sqrt(2)
    c_read = 12 / (5 * 24 * 1.5**2)
    one_ramp = np.sqrt(c_read * READ_NOISE**2 + 6 * 26 / (5 * 5 * 24 * 1.5) * 20 / GAIN)
    assert np.median(result.err[a]) == pytest.approx(one_ramp / np.sqrt(2), rel=0.1)


def test_steps_map_references_from_the_native_cache(crds_env, tmp_path, monkeypatch):
    """load_reference keeps each reference in native byte order under the CRDS cache
    (IRIS_NATIVE_CACHE=0 switches it off) and a run from the cache gives the same result."""
    calib = crds_env[0]
    cache = calib.native_cache_dir()
    assert cache == calib.cache_dir() / "iris-native"
    raw = write_ramp(tmp_path / "sci.fits", 20.0)
    first = ReadoutStep.call(str(raw))
    entries = {p.name.split("-")[0] for p in cache.iterdir()}  # <reference stem>-<digest>
    wanted = {f"tmt_iris_{t}_0000" for t in ("mask", "saturation", "linearity", "readnoise", "gain")}
    assert wanted <= entries, entries
    again = ReadoutStep.call(str(raw))
    monkeypatch.setenv("IRIS_NATIVE_CACHE", "0")
    assert calib.native_cache_dir() is None
    uncached = ReadoutStep.call(str(raw))
    for model in (again, uncached):
        np.testing.assert_array_equal(model.data, first.data)
        np.testing.assert_array_equal(model.dq, first.dq)


def test_readout_cds_and_statuses(crds_env, tmp_path):
    raw = write_ramp(tmp_path / "cds.fits", 10.0, nreads=2, sampmode="CDS")
    result = ReadoutStep.call(str(raw))
    assert result.meta.cal_step.jump == "SKIPPED"
    assert np.median(result.data[active()]) == pytest.approx(10.0, abs=1.0)


def test_override_reference_file_and_model(crds_env, tmp_path, rate_file):
    dark = reference("dark", readpatt="UTR5", data=np.full((64, 64), 3.0, np.float32))
    path = tmp_path / "my_dark.fits"
    dark.save(str(path))
    result = DarkSubStep.call(str(rate_file), override_dark=str(path))
    assert np.allclose(result.data, 17.0)
    assert result.meta.ref_file.dark.name == str(path.resolve())
    assert result.meta.cal_step.dark_sub == "COMPLETE"
    # a datamodel as override
    result = DarkSubStep.call(str(rate_file), override_dark=dark)
    assert np.allclose(result.data, 17.0)


def test_crds_context_pins_the_reference_and_keywords(crds_env, tmp_path, rate_file):
    calib, _, first = crds_env
    newer = reference("dark", readpatt="UTR5", useafter="2021-01-01T00:00:00",
                      data=np.full((64, 64), 2.0, np.float32))
    newer.save(str(tmp_path / "newer_dark.fits"))
    second = calib.publish_references([str(tmp_path / "newer_dark.fits")], "newer dark")
    try:
        old = DarkSubStep.call(str(rate_file), crds_context=first)
        new = DarkSubStep.call(str(rate_file))  # operational = the newest
        assert np.allclose(old.data, 19.5) and np.allclose(new.data, 18.0)
        assert old.meta.ref_file.crds.context_used == first
        assert new.meta.ref_file.crds.context_used == second
        assert old.meta.ref_file.dark.name != new.meta.ref_file.dark.name
    finally:
        calib.set_operational_context(first)


def test_no_pars_reference_is_ever_requested(crds_env, rate_file, monkeypatch):
    asked = []
    real = crds_client.get_multiple_reference_paths

    def spy(parameters, reftypes, observatory):
        asked.extend(reftypes)
        return real(parameters, reftypes, observatory)

    monkeypatch.setenv("STPIPE_DISABLE_CRDS_STEPPARS", "false")
    monkeypatch.setattr(crds_client, "get_multiple_reference_paths", spy)
    Image2Pipeline.call(str(rate_file))
    assert asked and not [t for t in asked if t.startswith("pars-")]


def test_asdf_config_file_sets_parameters(crds_env, tmp_path, rate_file):
    step = SkySubStep(method="model", box_size=16)
    cfg = tmp_path / "sky.asdf"
    step.export_config(str(cfg))
    result = SkySubStep.call(str(rate_file), config_file=str(cfg))
    assert result.meta.provenance.sky_files.startswith("NONE")
    assert result.meta.provenance.sky_method == "MODEL"
    # keywords win over the config file
    with pytest.raises(SkyCalibrationError, match="method='frames'"):
        SkySubStep.call(str(rate_file), config_file=str(cfg), method="frames")


def test_strun_style_command_line(crds_env, tmp_path, rate_file):
    out = tmp_path / "out"
    stpipe_cmdline.step_from_cmdline(["flat_field", str(rate_file), f"--output_dir={out}"])
    product = out / "sci_flat_field.fits"
    assert product.exists()
    with fits.open(product) as hdul:
        assert hdul[0].header["S_FLAT"] == "COMPLETE"
        assert hdul[0].header["R_FLAT"].startswith("crds://tmt_iris_flat")
        assert hdul[0].header["CRDS_CTX"].startswith("tmt_")
    # the pipeline with a per-step parameter, by its package-scoped alias
    stpipe_cmdline.step_from_cmdline(["iris-drs::iris_image2", str(rate_file), f"--output_dir={out}",
                                      "--steps.sky_sub.method=model", "--steps.assign_wcs.skip=true"])
    with fits.open(out / "sci_cal.fits") as hdul:
        assert hdul[0].header["S_WCS"] == "SKIPPED"
        assert hdul[0].header["S_SKYSUB"] == "COMPLETE"


def test_strun_executable(crds_env, tmp_path, rate_file):
    """The installed ``strun`` finds IRIS steps through the entry point (separate process)."""
    strun = Path(sys.executable).with_name("strun")
    env = dict(os.environ)
    proc = subprocess.run([str(strun), "assign_wcs", str(rate_file), f"--output_dir={tmp_path}"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    with fits.open(tmp_path / "sci_assign_wcs.fits") as hdul:
        assert hdul["SCI"].header["CTYPE1"] == "RA---TAN"
        assert hdul[0].header["S_WCS"] == "COMPLETE"


def test_image2_pipeline_calibrates_rate_sky_frames(crds_env, tmp_path):
    flat_science = np.full((64, 64), 40.5, np.float32)  # 40 sky + 0.5 dark
    flat_science[30:33, 30:33] += 100.0
    sci = write_rate(tmp_path / "sci_rate.fits", flat_science)
    skies = [write_rate(tmp_path / f"sky{i}_rate.fits", np.full((64, 64), lvl + 0.5, np.float32),
                        obsname="IMG1-SKY", exp_no=i)
             for i, lvl in enumerate((30.0, 40.0, 35.0))]
    result = Image2Pipeline.call(str(sci), sky_files=[str(s) for s in skies])
    steps = result.meta.cal_step
    assert (steps.dq_init, steps.dark_sub, steps.flat_field, steps.sky_sub, steps.assign_wcs) == (
        "COMPLETE",) * 5
    assert result.meta.provenance.sky_files == "sky0_rate.fits,sky1_rate.fits,sky2_rate.fits"
    assert result.meta.provenance.sky_method == "FRAMES"
    a = active()
    assert np.median(result.data[a]) == pytest.approx(0.0, abs=0.01)
    assert result.data[31, 31] == pytest.approx(100.0, abs=0.1)
    assert (result.err[a] > 0.1).all()  # dark and sky errors added to the input's 0.1
    assert result.meta.wcsinfo.ctype1 == "RA---TAN"


def test_dq_init_step(crds_env, tmp_path):
    mask = reference("mask", dq=np.zeros((64, 64), np.uint32))
    mask.dq[10, 11] = pixel["DEAD"] | DNU
    data = np.ones((64, 64), np.float32)
    data[5, 5] = np.nan
    rate = write_rate(tmp_path / "r_rate.fits", data)
    result = DQInitStep.call(str(rate), override_mask=mask)
    assert result.dq[10, 11] == pixel["DEAD"] | DNU
    assert result.dq[5, 5] & DNU
    assert result.meta.cal_step.dq_init == "COMPLETE"


def test_flat_with_zeros_flags_and_unusable_flat_fails(crds_env, tmp_path, rate_file):
    flat = reference("flat", filt="Kbb", data=np.full((64, 64), 2.0, np.float32))
    flat.data[0:2, :] = 0.0
    flat.data[2, 0] = np.nan
    result = FlatFieldStep.call(str(rate_file), override_flat=flat)
    assert np.allclose(result.data[5:, :], 10.0)
    assert (result.dq[0:2] & pixel["NO_FLAT_FIELD"]).all() and (result.dq[0:2] & DNU).all()
    assert result.dq[2, 0] == pixel["NO_FLAT_FIELD"] | DNU
    assert np.allclose(result.data[0:2], 20.0)  # left undivided, not NaN
    flat.data[:40] = 0.0
    with pytest.raises(ReferenceFileError, match="refusing to flat-field"):
        FlatFieldStep.call(str(rate_file), override_flat=flat)


def test_unknown_filter_has_no_flat(crds_env, tmp_path):
    rate = write_rate(tmp_path / "z_rate.fits", np.ones((64, 64)), filt="Zbb")
    with pytest.raises(ReferenceFileError, match=r"no flat reference .*FILTER=.?Zbb"):
        FlatFieldStep.call(str(rate))


def test_dark_of_mismatched_shape_names_the_file(crds_env, tmp_path, rate_file):
    dark = reference("dark", readpatt="UTR5", data=np.zeros((32, 32), np.float32))
    path = tmp_path / "small_dark.fits"
    dark.save(str(path))
    with pytest.raises(ReferenceFileError, match=r"small_dark\.fits.*shape \(32, 32\)"):
        DarkSubStep.call(str(rate_file), override_dark=str(path))


def test_wrong_reftype_override_is_refused(crds_env, rate_file):
    _, refs, _ = crds_env
    with pytest.raises(ReferenceFileError, match="REFTYPE=FLAT"):
        DarkSubStep.call(str(rate_file), override_dark=str(refs["flat"]))


def test_missing_sky_frames_when_asked_for(crds_env, rate_file):
    with pytest.raises(SkyCalibrationError, match="no sky frames"):
        Image2Pipeline.call(str(rate_file), steps={"sky_sub": {"method": "frames"}})


def test_uncalibrated_sky_is_refused_by_the_step(crds_env, tmp_path, rate_file):
    sky = write_rate(tmp_path / "sky_rate.fits", np.ones((64, 64)), obsname="IMG1-SKY")
    model = open_model(rate_file)
    model.meta.cal_step.flat_field = "COMPLETE"
    with pytest.raises(SkyCalibrationError, match="calibrate both alike"):
        SkySubStep.call(model, sky_files=[str(sky)], method="frames")
    other = write_rate(tmp_path / "sky_h_rate.fits", np.ones((64, 64)), obsname="IMG1-SKY", filt="H")
    with pytest.raises(SkyCalibrationError, match="FILTER=H"):
        SkySubStep.call(str(rate_file), sky_files=[str(other)])


def test_skip_and_failure_statuses(crds_env, tmp_path, rate_file):
    result = Image2Pipeline.call(str(rate_file), steps={"dark_sub": {"skip": True},
                                                        "sky_sub": {"skip": True}})
    assert result.meta.cal_step.dark_sub == "SKIPPED"
    assert result.meta.cal_step.sky_sub == "SKIPPED"
    assert result.meta.cal_step.flat_field == "COMPLETE"
    assert result.meta.ref_file.dark.name is None
    # the skipped step run alone afterwards on the product: its status is this run's
    again = DarkSubStep.call(result)
    assert again.meta.cal_step.dark_sub == "COMPLETE" and again.meta.ref_file.dark.name
    assert result.meta.cal_step.dark_sub == "SKIPPED"  # the caller's model is not changed
    model = open_model(rate_file)
    model.meta.pointing.pa = None
    step = AssignWcsStep()
    with pytest.raises(ValueError, match="missing PA"):
        step.run(model)
    assert model.meta.cal_step.assign_wcs == "FAILED"


def test_standalone_step_does_not_modify_the_callers_model(crds_env, rate_file):
    model = open_model(rate_file)
    before = model.data.copy()
    result = DarkSubStep.call(model)
    assert np.array_equal(model.data, before) and result is not model
    assert model.meta.cal_step.dark_sub is None


def test_stage1_pipeline_writes_rate(crds_env, tmp_path):
    raw = write_ramp(tmp_path / "exp_0001.fits", 5.0)
    result = Stage1Pipeline.call(str(raw), output_dir=str(tmp_path / "o"), save_results=True)
    assert result.meta.cal_step.readout == "COMPLETE"
    assert (tmp_path / "o" / "exp_0001_rate.fits").exists()


def test_crds_sys_exit_becomes_an_error_naming_the_step(crds_env, rate_file, monkeypatch):
    # crds answers a broken cache with sys.exit(-1); a worker must see why, not "exited -1".
    def fatal(parameters, reftypes, observatory):
        try:
            raise FileNotFoundError("/data/crds/config/tmt/server_config")
        except FileNotFoundError:
            raise SystemExit(-1) from None

    monkeypatch.setattr(crds_client, "get_multiple_reference_paths", fatal)
    with pytest.raises(ReferenceFileError, match=r"DarkSubStep: CRDS aborted \(exit -1\).*server_config"):
        DarkSubStep.call(str(rate_file))


def test_rate_has_no_var_flat_and_the_flat_step_adds_it(crds_env, tmp_path):
    # JWST layout: VAR_FLAT appears with the flat field, not as a zero plane in every rate.
    raw = write_ramp(tmp_path / "sci.fits", 20.0)
    rate = ReadoutStep.call(str(raw), save_results=True, output_dir=str(tmp_path))
    rate_file = tmp_path / "sci_rate.fits"
    names = [h.name for h in fits.open(rate_file)]
    assert "VAR_POISSON" in names and "VAR_RNOISE" in names and "VAR_FLAT" not in names
    cal = Image2Pipeline.call(str(rate_file), steps={"sky_sub": {"skip": True}})
    assert rate.meta.cal_step.readout == "COMPLETE"
    assert cal.var_flat.shape == cal.data.shape and np.any(cal.var_flat > 0)


@pytest.mark.parametrize("nchan, expected", [(None, 32), (64, 64)])
def test_readout_step_corrects_reference_pixels_per_output_channel_of_the_header(
        crds_env, tmp_path, monkeypatch, nchan, expected):
    import readout_cy

    seen = {}
    real = readout_cy.process_ramp

    def spy(*args, **kwargs):
        seen["channels"] = kwargs.get("refpix_channels")
        return real(*args, **kwargs)

    monkeypatch.setattr(readout_cy, "process_ramp", spy)
    raw = write_ramp(tmp_path / "sci.fits", 20.0)
    if nchan is not None:
        with fits.open(raw, mode="update") as hdul:
            hdul[0].header["NCHAN"] = nchan
    ReadoutStep.call(str(raw), refpix="on")
    assert seen["channels"] == expected
