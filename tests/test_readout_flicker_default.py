"""The readout step's ``clean_flicker`` setting decided per detector (JWST style): 'auto' is
on for imager frames (DETECTOR IMG1-IMG4) except flats and off for the IFS; explicit
true / false (Python bools or the command line's strings) override it; S_FLICKR records
whether it ran.  The step's default is still false (2026-12-08: the cleaning takes a
bright star's unmasked wings for stripes, docs/readout.md).  64 x 64 frames of
``test_steps_support``, 16-column channels."""

from __future__ import annotations

import numpy as np
import pytest
from astropy.io import fits
from test_steps_support import N, detector_references, write_ramp

from iris_tasks.steps import ReadoutStep
from iris_tasks.steps.readout_step import flicker_default, flicker_setting


@pytest.fixture(scope="module")
def refs(tmp_path_factory):
    paths = detector_references(tmp_path_factory.mktemp("refs"))
    return {f"override_{t}": str(paths[t])
            for t in ("mask", "saturation", "linearity", "readnoise", "gain")}


def _raw(path, **meta):
    rate = np.full((N, N), 20.0)
    rate[20:23, 30:33] = 900.0  # a source for the mask
    raw = write_ramp(path, rate, seed=4, **meta)
    with fits.open(raw, mode="update") as hdul:
        hdul[0].header["NCHAN"] = 4  # 16-column channels (the default 32 would be 2 wide)
    return str(raw)


def _run(raw, refs, tmp_path, **options):
    """The step's output as saved (header keywords from the file, as a reader sees them)."""
    out = ReadoutStep.call(raw, flicker_rows=32, **refs, **options)
    path = tmp_path / f"out_{len(list(tmp_path.iterdir()))}.fits"
    out.save(str(path))
    return np.array(out.data), fits.getval(path, "S_FLICKR")


def test_auto_is_on_for_an_imager_raw_and_the_explicit_settings_override_it(refs, tmp_path):
    raw = _raw(tmp_path / "img.fits")
    default, s_default = _run(raw, refs, tmp_path)
    auto, s_auto = _run(raw, refs, tmp_path, clean_flicker="auto")
    on, s_on = _run(raw, refs, tmp_path, clean_flicker=True)
    off, s_off = _run(raw, refs, tmp_path, clean_flicker=False)
    np.testing.assert_array_equal(auto, on)
    np.testing.assert_array_equal(default, off)  # not 'auto' by default yet
    assert not np.array_equal(auto, off)
    assert (s_default, s_auto, s_on, s_off) == ("SKIPPED", "COMPLETE", "COMPLETE", "SKIPPED")
    # the command line's spellings (--steps.readout.clean_flicker=false / true / auto)
    np.testing.assert_array_equal(_run(raw, refs, tmp_path, clean_flicker="false")[0], off)
    np.testing.assert_array_equal(_run(raw, refs, tmp_path, clean_flicker="TRUE")[0], on)
    with pytest.raises(ValueError, match="clean_flicker must be 'auto', true or false"):
        ReadoutStep.call(raw, clean_flicker="sometimes", **refs)


def test_auto_is_off_for_an_ifs_raw_and_true_still_forces_it(refs, tmp_path):
    raw = _raw(tmp_path / "ifs.fits", obsname="LEN-SCI", detector="IFS", filt="Kbb")
    auto, s_auto = _run(raw, refs, tmp_path, clean_flicker="auto")
    off, s_off = _run(raw, refs, tmp_path, clean_flicker=False)
    on, s_on = _run(raw, refs, tmp_path, clean_flicker=True)
    np.testing.assert_array_equal(auto, off)
    assert not np.array_equal(auto, on)
    assert (s_auto, s_off, s_on) == ("SKIPPED", "SKIPPED", "COMPLETE")


def test_auto_per_imager_frame_kind():
    """Science, standards, sky and darks are cleaned; flats are not (their row structure is
    the detector's response); the IFS never; no DETECTOR: not cleaned."""
    for obsname in ("IMG1-SCI", "IMG1-TEL", "IMG1-SKY", "IMG1-DRK", None):
        assert flicker_default("IMG1", obsname)[0], obsname
    assert flicker_default("img2", "IMG1-SCI")[0]
    assert not flicker_default("IMG1", "IMG1-NFF")[0]
    for obsname in ("LEN-SCI", "SLI-SCI", "LEN-TEL", "SLI-DRK", "LEN-SPX"):
        assert not flicker_default("IFS", obsname)[0], obsname
    assert not flicker_default(None, "IMG1-SCI")[0]
    assert [flicker_setting(v) for v in (True, False, "auto", "on", "off", "1", "no")] == [
        True, False, None, True, False, True, False]


def test_the_stage1_pipeline_passes_the_command_line_setting(refs, tmp_path):
    """iris_stage1 with --steps.readout.clean_flicker=auto / false (as the CLI's strun
    gives them: strings)."""
    from iris_tasks.pipelines.stage1 import Stage1Pipeline

    raw = _raw(tmp_path / "img.fits")
    steps = {**refs, "flicker_rows": 32}
    auto = Stage1Pipeline.call(raw, steps={"readout": {**steps, "clean_flicker": "auto"}})
    off = Stage1Pipeline.call(raw, steps={"readout": {**steps, "clean_flicker": "false"}})
    assert auto.meta.cal_step.clean_flicker == "COMPLETE"
    assert off.meta.cal_step.clean_flicker == "SKIPPED"
    assert not np.array_equal(auto.data, off.data)
