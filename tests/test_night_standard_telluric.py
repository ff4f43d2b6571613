"""The simulated night's IFS standard (NightPlan.ifs_standard, as simulate_night plans it)
gives the nightly telluric build a reference: reduced with the instrument model and IFS flat
learned from the shared telluric night's lamp flats and arcs (tests/telluric_night.py), built
with the nightly QA's thresholds (build_telluric_references, nightly.qa_master)."""

from __future__ import annotations

import numpy as np
import pytest
from astropy.io import fits
from telluric_night import NIGHT, SEED, SIZE, _steps, write_rate

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("telluric")]


def test_night_slicer_standard_builds_a_telluric_reference(night, tmp_path):
    from iris_tasks.ifs import Ifs2Pipeline
    from iris_tasks.orchestration import nightly
    from iris_tasks.pipelines.recipes import build_telluric_references
    from iris_tasks.simulate.frames import FrameFactory
    from iris_tasks.simulate.night import NightPlan, plan_night

    plan = NightPlan(n_dark=0, n_flat=0, n_arc=0, n_sky=0, n_science=0,
                     ifs_modes=(("SLICER", "25"),))
    (spec,) = plan_night(NIGHT, ["IFS"], nreads=10, plan=plan)
    assert spec.obsname == "SLI-TEL" and spec.standard == plan.ifs_standard
    # the night generator's factory (no atmosphere of its own), the shared night's detector
    factory = FrameFactory(size=SIZE, seed=SEED, detector_overrides={"onef_rms": 0.0,
                                                                     "cr_rate": 0.0})
    rate = tmp_path / f"{spec.filename[:-5]}_rate.fits"
    info = write_rate(factory, spec, rate, np.random.default_rng(SEED))
    assert info["n_saturated"] == 0
    cube = tmp_path / "tel_s3d.fits"
    Ifs2Pipeline.call(str(rate), steps=_steps(night["trace"], night["flat"])).save(str(cube))
    limits = nightly.thresholds()["telluric"]
    written, failures = build_telluric_references([cube], tmp_path / "refs", night=NIGHT,
                                                  limits=limits)
    assert not failures and len(written) == 1
    report = nightly.qa_master(str(written[0]))
    assert report["passed"] and report["metrics"]["response_snr"] > 1.3 * limits["response_snr"][0]
    with fits.open(written[0]) as hdul:
        (row,) = hdul["STANDARDS"].data
        assert row["sptype"].strip() == plan.ifs_standard.sptype
        assert row["mag"] == plan.ifs_standard.mag and row["airmass"] == plan.airmass
