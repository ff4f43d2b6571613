"""The simulator's atmosphere and standard stars (iris_tasks.simulate.atmosphere): physical
behaviour of the transmission, the standard's flux from its magnitude, and frames through it."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pytest

from iris_tasks.instrument.standards import (
    filter_band,
    hydrogen_lines,
    standard_teff,
    vega_zero_point,
)
from iris_tasks.simulate.atmosphere import (
    REFERENCE_AIRMASS,
    Atmosphere,
    PhysicalSource,
    TelluricStandard,
    transmission,
)
from iris_tasks.simulate.frames import FrameFactory, FrameSpec, ramp_model

START = dt.datetime(2026, 11, 30, 8, 0, tzinfo=dt.UTC)


def test_transmission_has_the_water_bands_and_scales_with_airmass_and_water():
    w = np.arange(0.95, 2.45, 0.0005)
    t1 = transmission(w, 1.0)
    # the windows are clear, the water bands between J/H and H/K mostly dark (at the published
    # curve's 5 A sampling their deepest points are 3-6 % transmission at airmass 1)
    for lo, hi in ((1.20, 1.30), (1.55, 1.75), (2.05, 2.30)):
        assert np.median(t1[(w > lo) & (w < hi)]) > 0.9
    for lo, hi in ((1.36, 1.42), (1.83, 1.92)):
        band = t1[(w > lo) & (w < hi)]
        assert np.median(band) < 0.5 and band.min() < 0.07
    # Beer-Lambert: T(X) = T(1)^X, exactly, at fixed water
    t2 = transmission(w, 2.0)
    assert np.allclose(t2, t1 ** 2, atol=1e-12)
    # the published curve comes back at its own airmass and water vapour
    assert np.allclose(transmission(w, REFERENCE_AIRMASS), transmission(w, 1.5, 1.6))
    # more water deepens the water bands more than the CO2 bands at 2.0 micron
    wet = transmission(w, 1.0, 4.0)
    water = (w > 1.12) & (w < 1.16)
    co2 = (w > 2.004) & (w < 2.012)
    assert np.median(-np.log(wet[water]) / -np.log(t1[water])) == pytest.approx(2.5, rel=1e-6)
    assert 1.0 < np.median(-np.log(wet[co2]) / -np.log(t1[co2])) < 2.0
    with pytest.raises(ValueError, match="airmass"):
        transmission(w, 0.9)


def test_standard_star_flux_follows_its_magnitude_and_has_hydrogen_lines():
    lam0, f0 = vega_zero_point("Ks")
    assert lam0 == pytest.approx(2.159) and f0 == pytest.approx(4.283e-11)
    assert filter_band("Kbb") == "Ks" and filter_band("Hbb") == "H" and filter_band("Jbb") == "J"
    star = TelluricStandard(mag=12.5)
    assert star.temperature == standard_teff("A0V") == 9700.0
    assert star.continuum(np.array([lam0]))[0] == pytest.approx(f0 * 10 ** (-0.4 * 12.5))
    # Rayleigh-Jeans-like fall towards the red for a 9700 K star
    assert star.continuum(np.array([2.3]))[0] < star.continuum(np.array([2.0]))[0]
    brg = float(hydrogen_lines(2.16, 2.17).wavelength_um[0])
    assert brg == pytest.approx(2.16612, abs=2e-5)
    depth = 1 - star.line_profile(np.array([brg]))[0]
    assert depth == pytest.approx(0.45, abs=0.03)
    assert star.line_profile(np.array([2.25]))[0] > 0.995  # continuum between lines
    with pytest.raises(ValueError, match="G2V"):
        standard_teff("G2V")


def test_telluric_and_science_frames_through_the_atmosphere_at_their_own_airmass():
    factory = FrameFactory(size=256, seed=3, atmosphere=Atmosphere(pwv_mm=2.0))
    det = factory.detector("IFS")
    images = {}
    for airmass in (1.0, 2.0):
        spec = factory.on_sky(FrameSpec(detector="IFS", obsname="SLI-TEL", exp_no=1, start=START,
                                        filter="Kbb", ifsscale="25", airmass=airmass))
        image, info = factory.illumination(spec)
        images[airmass] = image
        atm = info["atmosphere"]
        assert atm["airmass"] == airmass and atm["pwv_mm"] == 2.0
        assert atm["standard"]["sptype"] == "A0V" and atm["standard"]["teff_used"] == 9700.0
        assert len(atm["transmission"]) == len(atm["transmission_wave_um"]) > 100
        model = ramp_model(np.zeros((1, 2, 256, 256), np.uint16), spec, det)
        assert model.meta.observation.airmass == airmass
        assert (model.meta.standard.sptype, model.meta.standard.teff, model.meta.standard.mag,
                model.meta.standard.band) == ("A0V", 9700.0, 12.0, "Ks")
    # more air, less light (the sky's airglow is the same in both)
    assert images[2.0].sum() < 0.97 * images[1.0].sum()
    sci = factory.on_sky(FrameSpec(detector="IFS", obsname="SLI-SCI", exp_no=1, start=START,
                                   filter="Kbb", ifsscale="25", airmass=1.2))
    image, info = factory.illumination(sci)
    assert info["atmosphere"]["source_physical"] == pytest.approx(
        {k: v for k, v in vars(PhysicalSource()).items()})
    assert np.isfinite(image).all() and image.max() > 0
    model = ramp_model(np.zeros((1, 2, 256, 256), np.uint16), sci, det)
    assert model.meta.standard.sptype is None  # only telluric frames name a standard
