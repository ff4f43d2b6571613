"""The nightly IFS instrument model, end to end, on the realistic simulator.

The simulator's as-built IFS (distorted traces, non-linear dispersion, a core + halo PSF that
varies with wavelength and position, flexure per exposure; :mod:`iris_tasks.simulate.ifs_optics`)
makes lamp flats, arcs and a science frame. The pipeline learns its model from the flats and
arcs only (:func:`iris_tasks.masters.ifs_model.build_ifs_model`, starting from the optical
design); the simulator's truth is used here to score, never handed to the pipeline.

Rate images are made from the simulator's illumination (flat-fielded by the detector's own
QE, Poisson + read noise at the ramp-fit level) rather than through the readout, so the test
exercises the IFS model and not stage 1 (covered elsewhere).
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import numpy as np
import pytest

from iris_tasks.datamodels import IfsTraceModel, ImageModel
from iris_tasks.datamodels.dqflags import pixel
from iris_tasks.masters import MasterBuildError
from iris_tasks.masters.ifs_model import build_ifs_model, save_ifs_model
from iris_tasks.simulate.frames import FrameFactory, FrameSpec, ramp_model
from iris_tasks.simulate.references import mask_dq

# Lenslet spectra are 200 rows long from 1024 px up (as on the 4096 detector); on smaller
# test detectors they are too short for the Kbb arc lines to fix a cubic dispersion. The
# slicer's spaxels inside a slice are not seen one by one in a continuum flat (they blend):
# their positions follow the slice edges and the distortion the edges of all slices trace,
# which needs the 10 slices of a 1024 px detector (256 px has 3, each a quarter of the field).
SIZE = {"LENSLET": 1024, "SLICER": 1024}
SEED = 11
NIGHT = "2026-11-30"
SCALE = {"LENSLET": "4", "SLICER": "25"}
PREFIX = {"LENSLET": "LEN", "SLICER": "SLI"}
LAMP = {"LENSLET": "LEN-SPX", "SLICER": "SLI-NFF"}
FWHM_PER_SIGMA = 2.0 * np.sqrt(2.0 * np.log(2.0))

pytestmark = pytest.mark.slow


def _spec(mode: str, obsname: str, exp_no: int, hour: float, lamps: str | None = None,
          read_time: float | None = None) -> FrameSpec:
    start = dt.datetime.fromisoformat(f"{NIGHT}T00:00:00+00:00") + dt.timedelta(hours=hour)
    kwargs = {"lamps": lamps} if lamps else {}
    if read_time:
        kwargs["read_time"] = read_time
    return FrameSpec(detector="IFS", obsname=obsname, exp_no=exp_no, start=start, filter="Kbb",
                     ifsscale=SCALE[mode], **kwargs)


def write_rate(factory: FrameFactory, spec: FrameSpec, path: Path, rng: np.random.Generator,
               *, noise: bool = True) -> dict:
    """A ``_rate`` image of ``spec`` (DN/s, VAR_POISSON/VAR_RNOISE of a UTR ramp fit) and the
    frame's truth description (flexure included)."""
    det = factory.detector(spec.detector)
    illumination, info = factory.illumination(spec)
    electrons = np.asarray(illumination, np.float64) * det.flat(spec.filter)
    gain = np.asarray(det.gain, np.float64)
    rate = electrons / gain
    n = spec.nreads
    dt_read = spec.read_time
    t = (n - 1) * dt_read
    var_p = np.maximum(rate, 0.0) * 6.0 / 5.0 / (gain * t)
    var_r = 12.0 * np.asarray(det.read_noise, np.float64) ** 2 / (n * (n * n - 1) * dt_read**2)
    data = rate + (rng.normal(size=rate.shape) * np.sqrt(var_p + var_r) if noise else 0.0)
    dq = mask_dq(det)
    dq[~det.active] |= np.uint32(pixel["REFERENCE_PIXEL"])
    ramp = ramp_model(np.zeros((1, 2, *rate.shape), np.uint16), spec, det)
    model = ImageModel(data=data.astype(np.float32), err=np.sqrt(var_p + var_r).astype(np.float32),
                       dq=dq.astype(np.uint32), var_poisson=var_p.astype(np.float32),
                       var_rnoise=var_r.astype(np.float32))
    model.update(ramp)
    model.meta.exposure.gain = float(np.median(gain[det.active]))
    model.save(str(path))
    ramp.close()
    return info


@pytest.fixture(scope="module")
def night(tmp_path_factory):
    """Per mode: two lamp flats and one arc of the afternoon, a science frame of the night
    (files), and the factory for the truth."""
    root = tmp_path_factory.mktemp("ifs_model")
    rng = np.random.default_rng(SEED)
    out: dict = {}
    for mode in ("LENSLET", "SLICER"):
        factory = FrameFactory(size=SIZE[mode], seed=SEED,
                               detector_overrides={"onef_rms": 0.0, "cr_rate": 0.0})
        files: dict = {"flat": [], "arc": [], "info": {}, "factory": factory}
        for i in (1, 2):
            spec = _spec(mode, LAMP[mode], i, 2.0 + 0.05 * i)
            path = root / f"{spec.filename[:-5]}_rate.fits"
            files["info"][path.name] = write_rate(factory, spec, path, rng)
            files["flat"].append(path)
        # one arc per lamp, as arcs are taken: together their lines blend at this dispersion
        for n, lamp in enumerate(("Ar", "Kr", "Ne", "Xe"), 1):
            spec = _spec(mode, f"{PREFIX[mode]}-IDP", n, 2.2 + 0.02 * n, lamps=lamp)
            path = root / f"{spec.filename[:-5]}_rate.fits"
            files["info"][path.name] = write_rate(factory, spec, path, rng)
            files["arc"].append(path)
        out[mode] = files
    return out


def _truth_positions(factory, mode, wavelength, flexures_x, flexures_y):
    """The as-built trace at ``wavelength`` (per spaxel), x moved by the flats' mean flexure
    and y by the arcs' (the model takes its x from the flats and its y from the arcs)."""
    truth = factory.ifs_truth(mode, SCALE[mode], "Kbb")
    ny_s, nx_s, _ = truth.trace_x.shape
    tx = np.empty((ny_s, nx_s, wavelength.size))
    ty = np.empty_like(tx)
    for j in range(ny_s):
        for i in range(nx_s):
            tx[j, i] = np.interp(wavelength, truth.wavelength, truth.trace_x[j, i])
            ty[j, i] = np.interp(wavelength, truth.wavelength, truth.trace_y[j, i])
    size = factory.size
    fx = np.mean([f.apply(tx, ty, size)[0] for f in flexures_x], axis=0)
    fy = np.mean([f.apply(tx, ty, size)[1] for f in flexures_y], axis=0)
    return truth, fx, fy


def _flexure(info: dict):
    from iris_tasks.simulate.ifs_optics import Flexure

    f = info["flexure"]
    return Flexure(f["dx_px"], f["dy_px"], f["rot_deg"])


@pytest.fixture(scope="module")
def built(night, tmp_path_factory):
    """The instrument model of each mode, built from that mode's flats and arcs."""
    out_dir = tmp_path_factory.mktemp("models")
    out = {}
    for mode in ("LENSLET", "SLICER"):
        master = build_ifs_model(night[mode]["flat"], night[mode]["arc"], subtract_dark=False)
        out[mode] = (save_ifs_model(master, out_dir), master.qa)
    return out


@pytest.mark.parametrize("mode", ["LENSLET", "SLICER"])
def test_model_from_flats_and_arcs_matches_the_as_built_instrument(night, built, mode):
    files = night[mode]
    path, qa = built[mode]
    model = IfsTraceModel(str(path))
    assert model.meta.model_version == 2
    assert model.meta.reftype.upper() == "IFSTRACE"
    assert model.meta.instrument.ifsmode == mode and model.meta.instrument.filter == "Kbb"
    assert model.profile is not None and model.profile.ndim == 4
    wave = np.asarray(model.wavelength)
    truth, tx, ty = _truth_positions(
        files["factory"], mode, wave, [_flexure(files["info"][p.name]) for p in files["flat"]],
        [_flexure(files["info"][p.name]) for p in files["arc"]])
    mx, my = np.asarray(model.trace_x, np.float64), np.asarray(model.trace_y, np.float64)
    assert mx.shape == tx.shape
    # Score where the spectra are on the detector, away from the band's outermost 3 % (the
    # filter edges, where neither lamp nor arc light constrains the solution).
    inner = (wave > wave[0] + 0.03 * (wave[-1] - wave[0])) & (wave < wave[-1] - 0.03 * (wave[-1] - wave[0]))
    on = (ty > 8) & (ty < SIZE[mode] - 9) & inner[None, None, :]
    dx = (mx - tx)[on]
    dy = (my - ty)[on]
    # The flats and the arc have different flexure; each part of the model carries its own
    # frame's offset (the per-frame flexure fit takes it out of science frames).
    report = {"x_rms": float(np.sqrt(np.mean(dx**2))), "y_rms": float(np.sqrt(np.mean(dy**2))),
              "x_median": float(np.median(dx)), "y_median": float(np.median(dy))}
    print(mode, json.dumps(report))
    assert report["x_rms"] < 0.03, report
    # wavelengths: rms in resolution elements (the LSF FWHM in rows)
    resel_rows = FWHM_PER_SIGMA * float(np.nanmedian(truth.psf_sigma_y))
    assert report["y_rms"] / resel_rows < 0.05, report
    # LSF: within a few % of the truth at the model's nodes
    lsf_truth = np.stack([np.stack([np.interp(model.lsf_wave, truth.lsf_wave, truth.lsf_sigma_um[j, i])
                                    for i in range(truth.lsf_sigma_um.shape[1])])
                          for j in range(truth.lsf_sigma_um.shape[0])])
    ratio = np.asarray(model.lsf_sigma, np.float64) / lsf_truth
    print(mode, f"LSF ratio median {np.nanmedian(ratio):.4f} rms {np.nanstd(ratio):.4f}")
    assert abs(np.nanmedian(ratio) - 1.0) < 0.05
    assert qa["wave_rms_resel"] < 0.1 and model.meta.wave_rms_resel < 0.1
    assert qa["trace_rms"] < 0.05 and model.meta.trace_rms < 0.05


def test_builder_refuses_an_arc_without_lamps_and_names_the_file(night, tmp_path):
    factory = night["SLICER"]["factory"]
    rng = np.random.default_rng(1)
    spec = _spec("SLICER", "SLI-IDP", 2, 2.3, lamps="Ar")
    dark_arc = tmp_path / "dark_arc_rate.fits"
    write_rate(factory, spec, dark_arc, rng)
    # the lamp did not light: replace the frame by noise around zero
    with ImageModel(str(dark_arc)) as m:
        m.data = (rng.normal(size=m.data.shape) * np.sqrt(m.var_rnoise)).astype(np.float32)
        m.save(str(dark_arc))
    with pytest.raises(MasterBuildError, match="dark_arc_rate.fits"):
        build_ifs_model(night["SLICER"]["flat"], [dark_arc], subtract_dark=False)


def test_builder_refuses_mixed_configurations(night):
    with pytest.raises(MasterBuildError, match="mix several configurations"):
        build_ifs_model([*night["LENSLET"]["flat"], *night["SLICER"]["flat"]],
                        night["LENSLET"]["arc"], subtract_dark=False)


def _source_truth(factory, mode, wave: np.ndarray) -> np.ndarray:
    """(ny_s, nx_s) true source flux (e-/s, before the spaxel throughput) summed over the
    model's wavelength bins ``wave``: continuum density integrated over them plus the line."""
    from iris_tasks.simulate.ifs import build_realistic_scene  # noqa: F401 (scene API)

    scene = factory.ifs_scene(mode, SCALE[mode], "Kbb")
    source = scene.components("science")[0]
    step = float(np.median(np.diff(wave)))
    lo, hi = wave[0] - step / 2, wave[-1] + step / 2
    fine = np.linspace(lo, hi, 20001)
    density = np.interp(fine, source.wave_um, source.density, left=0.0, right=0.0)
    total = float(np.trapezoid(density, fine))
    inside = (source.line_um >= lo) & (source.line_um <= hi)
    total += float(np.sum(source.line_flux[inside]))
    return source.spatial * total


@pytest.mark.parametrize("mode", ["LENSLET", "SLICER"])
def test_science_frame_is_extracted_with_its_own_flexure(night, built, mode, tmp_path):
    """A science frame and its sky frame hours after the calibrations, each with its own
    flexure: the flexure step measures it from the frame, extract_cube follows it, and the
    sky-subtracted cube keeps the source's spatial distribution."""
    from iris_tasks.ifs import Ifs2Pipeline

    files = night[mode]
    factory = files["factory"]
    path, _ = built[mode]
    rng = np.random.default_rng(SEED + 1)
    rates, infos = {}, {}
    for kind, hour in (("SKY", 7.9), ("SCI", 8.0)):
        # a science exposure (10 reads of 30 s): the 4 mas sky's OH lines, which fix the
        # wavelength zero point, are lost in the noise of a 13 s calibration-length frame
        spec = _spec(mode, f"{PREFIX[mode]}-{kind}", 1, hour, read_time=30.0)
        rates[kind] = tmp_path / f"{spec.filename[:-5]}_rate.fits"
        infos[kind] = write_rate(factory, spec, rates[kind], rng)
    skip = {"skip": True}
    steps = {"dq_init": skip, "dark_sub": skip, "flat_field": skip, "destripe": skip,
             "flexure": {"override_ifstrace": str(path)},
             "extract_cube": {"override_ifstrace": str(path), "gain_source": "header"}}
    cube = Ifs2Pipeline.call(str(rates["SCI"]), sky_files=[str(rates["SKY"])], steps=steps)
    truth_flex = infos["SCI"]["flexure"]
    # the cal frames' mean offset is in the model: the science frame's offset is relative to it
    cal = [files["info"][p.name]["flexure"] for p in files["flat"]]
    arc = [files["info"][p.name]["flexure"] for p in files["arc"]]
    want_dx = truth_flex["dx_px"] - np.mean([f["dx_px"] for f in cal])
    want_dy = truth_flex["dy_px"] - np.mean([f["dy_px"] for f in arc])
    got = cube.meta.flexure
    report = {"dx": got.dx, "want_dx": want_dx, "dy": got.dy, "want_dy": want_dy,
              "method": got.method, "rot_deg": truth_flex["rot_deg"]}
    print(mode, json.dumps(report, default=float))
    assert abs(got.dx - want_dx) < 0.03, report
    if mode == "LENSLET" and got.method == "LIT":
        # The 4 mas lenslet sky of 10 x 30 s is too faint for the wavelength zero point
        # (measured 2026-12-07 on this frame: the strongest OH window at 5.6 sigma over 256
        # spaxels, 1 of 13 windows above 5 sigma; with all 512 spaxels dy 0.04 +- 0.12 px,
        # above max_error 0.1; the spectrum ends' starts and stops disagree by 4 sigma). The
        # fit must then say so and apply nothing, not a confident wrong value (it reported
        # 0.28 +- 0.04 px for 0.07 before the OH fit's errors were fixed).
        assert got.dy == 0.0 and got.dy_err == 0.0, report
    else:
        assert abs(got.dy - want_dy) < 0.03, report
        assert abs(got.dy - want_dy) < 4 * got.dy_err + 0.01, report

    data = np.where(np.isfinite(cube.data), cube.data, 0.0)
    wave = np.asarray(cube.wavelength)
    measured = data.sum(axis=0)  # (ny_s, nx_s), e-/s summed over the band
    truth = _source_truth(factory, mode, wave)
    # one global factor (the PSF halo beyond the profile window, the lamp-relative throughput
    # and the QE average are not what this test is about): from the whole field
    scale = measured.sum() / truth.sum()
    j, i = np.unravel_index(np.argmax(truth), truth.shape)
    box = (slice(max(j - 1, 0), j + 2), slice(max(i - 1, 0), i + 2))
    peak_err = measured[j, i] / (scale * truth[j, i]) - 1.0
    box_err = measured[box].sum() / (scale * truth[box].sum()) - 1.0
    print(mode, f"scale {scale:.4f} brightest spaxel {peak_err:+.4f} 3x3 {box_err:+.4f}")
    assert abs(peak_err) < 0.02
    assert abs(box_err) < 0.01

    # The source's emission line: its centroid in the 3x3 spectrum against its vacuum
    # wavelength, in bins of the cube's grid (a wavelength error along the dispersion).
    source = factory.ifs_scene(mode, SCALE[mode], "Kbb").components("science")[0]
    step = float(np.median(np.diff(wave)))
    k_line = (float(source.line_um[0]) - wave[0]) / step
    k = np.arange(wave.size)
    spectrum = data[:, box[0], box[1]].sum(axis=(1, 2))
    near = np.abs(k - k_line) <= 6
    side = (np.abs(k - k_line) > 8) & (np.abs(k - k_line) <= 20)
    continuum = np.polyval(np.polyfit(k[side], spectrum[side], 1), k)
    excess = (spectrum - continuum)[near]
    centroid_err = float((k[near] * excess).sum() / excess.sum() - k_line)
    # Spaxels the source does not reach (below 1e-4 of its peak): band sums against their ERR
    # (quadrature over the band; the voxels' errors are nearly independent along a spectrum).
    err = np.where(np.isfinite(cube.err), cube.err, 0.0)
    empty = truth < 1e-4 * truth.max()
    chi = measured[empty] / np.sqrt((err**2).sum(axis=0)[empty])
    print(mode, f"line centroid {centroid_err:+.4f} bin; empty spaxels: {empty.sum()} "
          f"mean chi {chi.mean():+.3f} rms {chi.std():.3f}")
    # The wavelength scale is right to a few 1e-3 bin; what is left is the flexure along the
    # dispersion that the frame could not measure (the 4 mas lenslet's OH lines are too faint:
    # its dy is left at 0, so the line sits that far off - measured +0.075 bin for a
    # +0.074 px offset; bins are 1.00-1.03 rows).
    unapplied = want_dy - got.dy
    assert abs(centroid_err - unapplied) < 0.05, (centroid_err, unapplied)
    if got.method and "OH" in got.method:
        assert abs(centroid_err) < 0.05
    # No systematic light in spaxels the source does not reach. (Their band sums scatter
    # 0.65x their quadrature ERR in the lenslet but 2.8x in the slicer: not explained yet -
    # OH-line residuals between the science and sky frames, which have different flexure,
    # are the first suspect; an open point in docs/ifs.md.)
    assert abs(chi.mean()) < 3 * chi.std() / np.sqrt(chi.size)
