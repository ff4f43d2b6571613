"""IFS stage 2 through stpipe: ExtractCubeStep, CubeSkySubStep, Ifs2Pipeline (iris_ifs2)."""

import datetime as dt
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from stpipe import Step

from iris_tasks import datamodels as dm
from iris_tasks.datamodels import CubeModel, open_model
from iris_tasks.datamodels.dqflags import pixel
from iris_tasks.ifs import CubeSkySubStep, ExtractCubeStep, Ifs2Pipeline, SkyCubeError
from iris_tasks.ifs.extract_step import clear_geometry_cache
from iris_tasks.simulate import build_trace, project_cube
from iris_tasks.steps import ReferenceFileError

SCALE = {"LENSLET": "4", "SLICER": "25"}
GAIN = 2.0


def _meta(model, mode, *, obsname=None, size=128):
    m = model.meta
    m.instrument.name = "IRIS"
    m.instrument.detector = "IFS"
    m.instrument.filter = "Kbb"
    m.instrument.ifsmode = mode
    m.instrument.ifsscale = SCALE[mode]
    m.subarray.name = "FULL"
    m.subarray.xstart = m.subarray.ystart = 1
    m.subarray.xsize = m.subarray.ysize = size
    if obsname is not None:
        m.observation.obstype = "SCI"
        m.observation.obsname = obsname
        m.observation.date = "2026-11-24"
        m.observation.time = "06:00:00"
        m.exposure.readpatt = "UTR10"
        m.exposure.gain = GAIN
        m.pointing.ra, m.pointing.dec, m.pointing.pa = 150.1, 2.2, 0.0
    return model


def write_trace(path, mode, size=128, *, ifsmode=None):
    trace = build_trace(mode, size, "Kbb", SCALE[mode], 0)
    ref = _meta(trace.to_model(), ifsmode or mode, size=size)
    ref.meta.reftype = "IFSTRACE"
    ref.meta.useafter = "2020-01-01T00:00:00"
    ref.meta.pedigree = "SIMULATION"
    ref.meta.description = "test trace"
    ref.meta.author = "tests"
    ref.save(str(path))
    return trace, Path(path)


def write_rate(path, mode, electrons, *, size=128, var_e=1.0, dq=None):
    """A _rate image (DN/s) of an illumination in e-/s, with a consistent variance split."""
    data = (electrons / GAIN).astype(np.float32)
    vr = np.full(data.shape, var_e / GAIN**2, np.float32)
    model = dm.ImageModel(data=data, err=np.sqrt(vr), dq=np.zeros(data.shape, np.uint32)
                          if dq is None else dq, var_poisson=np.zeros_like(vr), var_rnoise=vr)
    _meta(model, mode, obsname="LEN-SCI" if mode == "LENSLET" else "SLI-SCI", size=size)
    model.meta.cal_step.readout = "COMPLETE"
    model.meta.bunit_data = "DN/s"
    model.save(str(path))
    return Path(path)


@pytest.fixture(autouse=True)
def _fresh_geometry_cache():
    clear_geometry_cache()
    yield
    clear_geometry_cache()


@pytest.mark.parametrize("mode", ["LENSLET", "SLICER"])
def test_extract_step_call_with_override_gives_the_cube(tmp_path, mode):
    trace, tpath = write_trace(tmp_path / "trace.fits", mode)
    cube = np.random.default_rng(1).uniform(1.0, 3.0, trace.cube_shape)
    rate = write_rate(tmp_path / "sci_rate.fits", mode, project_cube(trace, cube, (128, 128)))
    result = ExtractCubeStep.call(str(rate), override_ifstrace=str(tpath), gain_source="header",
                                  noise_tol=0.0, rtol=1e-11)
    assert isinstance(result, CubeModel)
    assert result.data.shape == trace.cube_shape
    assert np.max(np.abs(result.data / cube - 1)) < 1e-4  # e-/s, throughput divided out
    assert np.all(result.dq == 0) and np.all(result.err > 0)
    meta = result.meta
    assert meta.cal_step.extract_cube == "COMPLETE"
    assert meta.ref_file.ifstrace.name == str(tpath.resolve())
    assert meta.bunit_data == "electron/s" and meta.bunit_err == "electron/s"
    w = meta.wcsinfo
    assert (w.ctype3, w.cunit3, w.crpix3) == ("WAVE", "um", 1.0)
    assert w.crval3 == pytest.approx(trace.wavelength[0])
    assert w.cdelt3 == pytest.approx(np.diff(trace.wavelength).mean())
    assert (w.ctype1, w.ctype2) == ("RA---TAN", "DEC--TAN")
    assert w.cdelt1 == pytest.approx(float(SCALE[mode]) / 3.6e6)
    assert w.crval1 == pytest.approx(150.1) and w.crval2 == pytest.approx(2.2)
    assert np.allclose(result.wavelength, trace.wavelength)
    # the product is a FITS cube that opens as a CubeModel again
    out = tmp_path / "sci_s3d.fits"
    result.save(str(out))
    again = open_model(out)
    assert isinstance(again, CubeModel) and again.data.shape == trace.cube_shape
    from astropy.io import fits

    with fits.open(out) as hdul:
        assert hdul["SCI"].header["CTYPE3"] == "WAVE" and hdul["SCI"].header["BUNIT"] == "electron/s"
        assert hdul[0].header["S_CUBE"] == "COMPLETE"
        assert hdul[0].header["R_IFSTRC"].endswith("trace.fits")
        assert "WAVELENGTH" in hdul


def test_gain_reference_map_converts_per_pixel(tmp_path):
    trace, tpath = write_trace(tmp_path / "trace.fits", "LENSLET")
    cube = np.full(trace.cube_shape, 2.0)
    electrons = project_cube(trace, cube, (128, 128))
    gain = np.where(np.arange(128)[None, :] < 64, 1.9, 2.1).astype(np.float32) * np.ones((128, 1))
    rate = write_rate(tmp_path / "sci_rate.fits", "LENSLET", electrons)
    with dm.ImageModel(str(rate)) as m:
        m.data = (electrons / gain).astype(np.float32)
        m.save(str(rate))
    gref = _meta(dm.GainModel(data=gain.astype(np.float32)), "LENSLET")
    gref.meta.reftype, gref.meta.useafter = "GAIN", "2020-01-01T00:00:00"
    gpath = tmp_path / "gain.fits"
    gref.save(str(gpath))
    result = ExtractCubeStep.call(str(rate), override_ifstrace=str(tpath),
                                  override_gain=str(gpath), noise_tol=0.0, rtol=1e-11)
    assert np.max(np.abs(result.data / cube - 1)) < 1e-4
    assert result.meta.ref_file.gain.name == str(gpath.resolve())
    # header GAIN (2.0) instead: half the field is 5 % off
    off = ExtractCubeStep.call(str(rate), override_ifstrace=str(tpath), gain_source="header")
    assert np.max(np.abs(off.data / cube - 1)) > 0.04
    raw = ExtractCubeStep.call(str(rate), override_ifstrace=str(tpath), gain_source="none")
    assert raw.meta.bunit_data == "DN/s"


def test_flat_fielded_rate_is_converted_with_the_gain_maps_median(tmp_path):
    """After a DN/s flat (QE / gain) the gain pattern is already divided out: the per-pixel
    map would apply it a second time; the rate is in DN/s of a typical pixel."""
    trace, tpath = write_trace(tmp_path / "trace.fits", "LENSLET")
    cube = np.full(trace.cube_shape, 2.0)
    electrons = project_cube(trace, cube, (128, 128))
    gain = np.where(np.arange(128)[None, :] < 64, 1.9, 2.1).astype(np.float32) * np.ones((128, 1))
    gref = _meta(dm.GainModel(data=gain.astype(np.float32)), "LENSLET")
    gref.meta.reftype, gref.meta.useafter = "GAIN", "2020-01-01T00:00:00"
    gref.save(str(tmp_path / "gain.fits"))
    # A rate already flat-fielded: in DN/s of a typical (median-gain) pixel everywhere.
    rate = write_rate(tmp_path / "sci_rate.fits", "LENSLET", electrons)
    typical = float(np.median(gain))
    with dm.ImageModel(str(rate)) as m:
        m.data = (electrons / typical).astype(np.float32)
        m.meta.cal_step.flat_field = "COMPLETE"
        m.save(str(rate))
    result = ExtractCubeStep.call(str(rate), override_ifstrace=str(tpath),
                                  override_gain=str(tmp_path / "gain.fits"), noise_tol=0.0,
                                  rtol=1e-11)
    assert np.max(np.abs(result.data / cube - 1)) < 1e-4  # no 2 x 5 % channel step
    assert result.meta.bunit_data == "electron/s"


def test_trace_that_does_not_fit_the_frame_is_refused_by_name(tmp_path):
    trace, _ = write_trace(tmp_path / "trace.fits", "LENSLET")
    rate = write_rate(tmp_path / "sci_rate.fits", "LENSLET",
                      project_cube(trace, np.ones(trace.cube_shape), (128, 128)))
    _, big = write_trace(tmp_path / "trace_256.fits", "LENSLET", size=256)
    with pytest.raises(ReferenceFileError, match=r"trace_256\.fits.*256x256 detector"):
        ExtractCubeStep.call(str(rate), override_ifstrace=str(big), gain_source="header")
    _, other = write_trace(tmp_path / "slicer_trace.fits", "SLICER")
    with pytest.raises(ReferenceFileError, match=r"slicer_trace\.fits.*IFSMODE=SLICER"):
        ExtractCubeStep.call(str(rate), override_ifstrace=str(other), gain_source="header")
    # a 256 trace without size keywords: its positions fall off the 128 frame
    t256 = build_trace("LENSLET", 256, "Kbb", "4", 0).to_model()
    _meta(t256, "LENSLET", size=256)
    t256.meta.subarray.xsize = t256.meta.subarray.ysize = None
    t256.meta.reftype, t256.meta.useafter = "IFSTRACE", "2020-01-01T00:00:00"
    bare = tmp_path / "bare_trace.fits"
    t256.save(str(bare))
    with pytest.raises(ReferenceFileError, match=r"bare_trace\.fits.*outside the 128x128"):
        ExtractCubeStep.call(str(rate), override_ifstrace=str(bare), gain_source="header")
    # and an imager frame is not an IFS frame
    with dm.ImageModel(str(rate)) as m:
        m.meta.instrument.ifsmode = "N/A"
        m.save(str(tmp_path / "img_rate.fits"))
    with pytest.raises(ValueError, match="IFSMODE=N/A"):
        ExtractCubeStep.call(str(tmp_path / "img_rate.fits"), override_ifstrace=str(other))


def test_dq_flagged_pixels_give_empty_voxels(tmp_path):
    trace, tpath = write_trace(tmp_path / "trace.fits", "LENSLET")
    cube = np.full(trace.cube_shape, 2.0)
    electrons = project_cube(trace, cube, (128, 128))
    dq = np.zeros((128, 128), np.uint32)
    j, i = 1, 4
    x, y = trace.trace_x[j, i, 5:9], trace.trace_y[j, i, 5:9]
    dq[int(np.floor(y.min())):int(np.floor(y.max())) + 2,
       int(np.rint(x.min())) - 4:int(np.rint(x.max())) + 5] = pixel["DO_NOT_USE"]
    dq[60, 60] = pixel["SATURATED"]
    electrons[dq != 0] = 1e6  # garbage under the flags
    rate = write_rate(tmp_path / "sci_rate.fits", "LENSLET", electrons, dq=dq)
    result = ExtractCubeStep.call(str(rate), override_ifstrace=str(tpath), gain_source="header",
                                  noise_tol=0.0, rtol=1e-11)
    empty = pixel["DO_NOT_USE"] | pixel["NON_SCIENCE"]
    assert np.all((result.dq[5:9, j, i] & empty) == empty)
    assert np.all(np.isnan(result.data[5:9, j, i]))
    ok = result.dq == 0
    assert ok.sum() > 0.97 * ok.size
    assert np.max(np.abs(result.data[ok] / cube[ok] - 1)) < 1e-4


def _cube_model(data, mode="LENSLET", err=0.1):
    shape = data.shape
    c = CubeModel(data=data.astype(np.float32), err=np.full(shape, err, np.float32),
                  dq=np.zeros(shape, np.uint32), wavelength=np.linspace(2.0, 2.4, shape[0]))
    _meta(c, mode, obsname="LEN-SCI")
    c.meta.bunit_data = "electron/s"
    for step in ("dark_sub", "flat_field", "extract_cube"):
        setattr(c.meta.cal_step, step, "COMPLETE")
    return c


def test_cube_sky_subtraction_from_sky_cubes_and_outer_fallback(tmp_path):
    rng = np.random.default_rng(2)
    shape = (30, 12, 40)
    sky = np.linspace(1.0, 3.0, 30)[:, None, None] * np.ones(shape)
    src = np.zeros(shape)
    src[:, 5:7, 19:21] = 50.0
    skies = []
    for q in range(3):
        m = _cube_model(sky + rng.normal(0, 0.1, shape))
        m.meta.filename = f"sky{q}_s3d.fits"
        m.save(str(tmp_path / m.meta.filename))
        skies.append(str(tmp_path / m.meta.filename))
    result = CubeSkySubStep.call(_cube_model(sky + src), sky_files=skies)
    assert np.abs(result.data - src).max() < 0.5
    assert result.meta.cal_step.sky_sub == "COMPLETE"
    assert result.meta.provenance.sky_files == "sky0_s3d.fits,sky1_s3d.fits,sky2_s3d.fits"
    assert np.median(result.err) > 0.1  # the sky's error is added
    # no sky frames: the per-wavelength median of the outer spaxels, said in SKYFILES
    fallback = CubeSkySubStep.call(_cube_model(sky + src))
    assert np.allclose(fallback.data, src, atol=1e-4)
    assert fallback.meta.provenance.sky_files.startswith("NONE (median of")
    with pytest.raises(SkyCubeError, match="method='frames'"):
        CubeSkySubStep.call(_cube_model(sky + src), method="frames")
    wrong = _cube_model(sky)
    wrong.meta.instrument.filter = "Hbb"
    with pytest.raises(SkyCubeError, match="FILTER=Hbb"):
        CubeSkySubStep.call(_cube_model(sky + src), sky_files=[wrong])
    raw = _cube_model(sky)
    raw.meta.cal_step.flat_field = None
    with pytest.raises(SkyCubeError, match="flat_field not done"):
        CubeSkySubStep.call(_cube_model(sky + src), sky_files=[raw])
    destriped = _cube_model(sky + src)
    destriped.meta.cal_step.destripe = "COMPLETE"  # a sky cube reduced without it differs by the stripes
    with pytest.raises(SkyCubeError, match="destripe not done"):
        CubeSkySubStep.call(destriped, sky_files=[_cube_model(sky)])


def test_step_classes_and_aliases():
    assert ExtractCubeStep.class_alias == "extract_cube"
    assert CubeSkySubStep.class_alias == "cube_sky_sub"
    assert Ifs2Pipeline.class_alias == "iris_ifs2"
    assert issubclass(Ifs2Pipeline, Step) and hasattr(Ifs2Pipeline, "step_defs")
    assert set(Ifs2Pipeline.step_defs) == {"dq_init", "dark_sub", "flat_field", "destripe", "flexure",
                                           "extract_cube", "sky_sub", "telluric"}


# -- end to end: simulator ramps -> readout (CRDS) -> iris_ifs2 (CRDS) -----------------------

@pytest.fixture(scope="module")
def simulated_night(tmp_path_factory):
    """LEN-SCI/LEN-SKY and SLI-SCI/SLI-SKY ramps at 128 px with their references in CRDS."""
    from iris_tasks.calib.testing import temporary_cache
    from iris_tasks.simulate.frames import FrameFactory, FrameSpec, write_atomic
    from iris_tasks.simulate.references import write_reference_files

    root = tmp_path_factory.mktemp("ifs_e2e")
    size = 128
    factory = FrameFactory(size=size, seed=4, detector_overrides={"onef_rms": 0.0, "cr_rate": 0.0},
                           optics="ideal")
    start = dt.datetime(2026, 11, 24, 6, 0, tzinfo=dt.UTC)
    raws = {}
    for obs, mode in (("LEN-SCI", "LENSLET"), ("LEN-SKY", "LENSLET"), ("SLI-SCI", "SLICER"),
                      ("SLI-SKY", "SLICER")):
        spec = FrameSpec(detector="IFS", obsname=obs, exp_no=1, start=start, filter="Kbb",
                         nreads=10, ifsscale=SCALE[mode])
        model, _ = factory.make(spec)
        raws[obs] = write_atomic(model, root / "raw" / spec.filename)
    refs = write_reference_files(root / "refs", ["IFS"], size, 4, "2020-01-01T00:00:00",
                                 readpatts=("UTR10",),
                                 ifs_configs=(("LENSLET", "4", "Kbb"), ("SLICER", "25", "Kbb")),
                                 factory=factory)
    with temporary_cache(root / "cache") as calib:
        context = calib.publish_references([str(r) for r in refs], "IFS e2e references")
        from iris_tasks.steps import ReadoutStep

        rates = {}
        for obs, raw in raws.items():
            r = ReadoutStep.call(str(raw))
            rates[obs] = root / f"{raw.stem}_rate.fits"
            r.save(str(rates[obs]))
        yield factory, rates, context, root


@pytest.mark.parametrize("mode", ["LENSLET", "SLICER"])
def test_ifs2_pipeline_on_simulated_frames(simulated_night, mode):
    factory, rates, context, root = simulated_night
    p = "LEN" if mode == "LENSLET" else "SLI"
    cube = Ifs2Pipeline.call(str(rates[f"{p}-SCI"]), sky_files=[str(rates[f"{p}-SKY"])])
    meta = cube.meta
    assert (meta.cal_step.dq_init, meta.cal_step.dark_sub, meta.cal_step.flat_field,
            meta.cal_step.extract_cube, meta.cal_step.sky_sub) == ("COMPLETE",) * 5
    assert meta.ref_file.ifstrace.name.startswith("crds://tmt_iris_ifstrace")
    for reftype in ("mask", "dark", "flat", "gain"):
        assert getattr(meta.ref_file, reftype).name.startswith(f"crds://tmt_iris_{reftype}")
    assert meta.ref_file.crds.context_used == context
    assert meta.provenance.sky_files == rates[f"{p}-SKY"].name
    assert meta.bunit_data == "electron/s"
    scene = factory.ifs_scene(mode, SCALE[mode], "Kbb")
    truth = (scene.source_spectrum * scene.transmission)[:, None, None] * scene.source_profile[None]
    # the brightest spaxels of the point source, summed: flux to a few % (stage-1 residuals)
    core = scene.source_profile >= 0.5 * scene.source_profile.max()
    got = np.nansum(cube.data[:, core], axis=1)
    want = truth[:, core].sum(axis=1)
    assert np.sum(got) / np.sum(want) == pytest.approx(1.0, abs=0.05)
    resid = (cube.data - truth) / cube.err
    ok = cube.dq == 0
    assert ok.mean() > 0.95
    assert np.median(np.abs(resid[ok])) < 1.0  # ~0.67 for unit-normal residuals
    out = root / f"{p}_s3d.fits"
    cube.save(str(out))
    assert isinstance(open_model(out), CubeModel)


def test_ifs2_sky_frame_itself_skips_sky_subtraction(simulated_night):
    _, rates, _, _ = simulated_night
    cube = Ifs2Pipeline.call(str(rates["LEN-SKY"]), steps={"sky_sub": {"skip": True}})
    assert cube.meta.cal_step.sky_sub == "SKIPPED"
    assert cube.meta.cal_step.extract_cube == "COMPLETE"


def test_ifs2_without_sky_frames_uses_the_outer_spaxels(simulated_night):
    _, rates, _, root = simulated_night
    sky_cube = Ifs2Pipeline.call(str(rates["SLI-SKY"]), steps={"sky_sub": {"skip": True}})
    sky_path = root / "sli_sky_s3d.fits"
    sky_cube.save(str(sky_path))
    # an already reduced sky cube is used as it is
    with_cube = Ifs2Pipeline.call(str(rates["SLI-SCI"]), sky_files=[str(sky_path)])
    assert with_cube.meta.provenance.sky_files == "sli_sky_s3d.fits"
    fallback = Ifs2Pipeline.call(str(rates["SLI-SCI"]))
    assert fallback.meta.cal_step.sky_sub == "COMPLETE"
    assert fallback.meta.provenance.sky_files.startswith("NONE (median of")
    with pytest.raises(SkyCubeError, match="method='frames'"):
        Ifs2Pipeline.call(str(rates["SLI-SCI"]), steps={"sky_sub": {"method": "frames"}})


def test_recipe_reduces_ifs_frames_to_cubes(simulated_night, tmp_path):
    """``run_reduction`` (what the CLI and the DAGs call) gives IFS science an _s3d cube."""
    from iris_tasks.pipelines.recipes import reduce_path, run_reduction

    _, rates, _, _ = simulated_night
    cube_path = run_reduction(rates["LEN-SCI"], tmp_path, sky_paths=[rates["LEN-SKY"]])
    assert cube_path.name.endswith("_s3d.fits")
    with fits.open(cube_path) as hdul:
        assert hdul[0].header["S_CUBE"] == "COMPLETE"
        assert hdul[0].header["SKYMETH"] == "FRAMES"
        assert "LEN-SKY" in hdul[0].header["SKYFILES"]
        assert hdul["SCI"].data.ndim == 3
        assert hdul[0].header["FLEXMETH"] != "NONE" and "FLEXDX" in hdul[0].header
    # the real-time chain's flexure prior reaches the step and the cube's header: with every
    # own measurement refused (max_error), dy is the prior's
    opts = {"flexure": {"max_error": 1e-9, "prior_dy": 0.05, "prior_dy_err": 0.0,
                        "prior_source": "ledger test"}}
    prior_cube = run_reduction(rates["LEN-SCI"], tmp_path / "prior", step_options=opts)
    head = fits.getheader(prior_cube)
    assert (head["FLEXMETH"], head["FLEXDY"], head["FLEXDX"]) == ("PRIORY", 0.05, 0.0)
    assert head["FLEXSRC"] == "ledger test"
    # A directory pairs the science frame with its own mode's sky frames.
    indir = tmp_path / "in"
    indir.mkdir()
    for obs in ("SLI-SCI", "SLI-SKY"):
        (indir / rates[obs].name).write_bytes(rates[obs].read_bytes())
    written = reduce_path(indir, tmp_path / "out")
    cubes = sorted(p.name for p in written if p.name.endswith("_s3d.fits"))
    assert len(cubes) == 2
    sci_cube = next(p for p in written if "SLI-SCI" in p.name and p.name.endswith("_s3d.fits"))
    assert "SLI-SKY" in fits.getheader(sci_cube)["SKYFILES"]


def test_reduce_frame_records_the_flexure_and_hands_over_the_prior(simulated_night, tmp_path):
    """The real-time reduce stage (orchestration.realtime.reduce_frame) on IFS frames: the
    frame's flexure goes into the ledger; the next frame of the same mode/scale/filter gets
    the measured offsets as its flexure step's prior (recorded in its reduce stage)."""
    import dataclasses
    import json

    from iris_tasks.config import settings
    from iris_tasks.orchestration.frame import Frame
    from iris_tasks.orchestration.ledger import FrameLedger, isotime
    from iris_tasks.orchestration.realtime import reduce_frame

    _, rates, context, _ = simulated_night
    ledger = FrameLedger(tmp_path / "ledger.sqlite")
    cfg = dataclasses.replace(settings(), flexure_prior_minutes=30.0)

    def frame(fid, obs, kind):
        return Frame(frame_id=fid, sha256=fid * 4, filename=f"{obs}.fits", raw_path="/none",
                     landed_at=isotime(), source_uri="s3://x", night="2026-11-23",
                     detector="IFS", kind=kind, mode="lenslet", filter="Kbb",
                     crds_context=context, rate_path=str(rates[obs]),
                     work_dir=str(tmp_path / fid))

    sci = reduce_frame(frame("a" * 16, "LEN-SCI", "science"), ledger=ledger, cfg=cfg)
    head = fits.getheader(sci.product_path)
    row = ledger.flexure("a" * 16)
    assert (row["dx"], row["dy"], row["method"]) == (head["FLEXDX"], head["FLEXDY"],
                                                     head["FLEXMETH"])
    assert (row["mode"], row["scale"], row["filter"]) == ("LENSLET", SCALE["LENSLET"], "Kbb")
    assert row["dx_measured"] == ("LIT" in head["FLEXMETH"].split("+")) == 1
    reduce_frame(frame("b" * 16, "LEN-SKY", "sky"), ledger=ledger, cfg=cfg)
    (stage,) = [s for s in ledger.stages("b" * 16) if s["stage"] == "reduce"]
    prior = json.loads(stage["detail"])["flexure_prior"]
    assert prior["prior_dx"] == pytest.approx(row["dx"]) and "a" * 8 in prior["prior_source"]
    assert ledger.flexure("b" * 16) is not None
