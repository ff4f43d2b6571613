"""Schemas round-trip through FITS, astropy reads every product, DQ flags are one definition."""

import numpy as np
import pytest
from astropy.io import fits

from iris_tasks import datamodels as dm
from iris_tasks.datamodels import dqflags


def _fill_meta(model, detector="IMG1"):
    model.meta.instrument.detector = detector
    model.meta.instrument.filter = "Kbb"
    model.meta.instrument.ifsmode = "N/A"
    model.meta.observation.obstype = "SCI"
    model.meta.observation.obsname = "IMG1-SCI"
    model.meta.observation.exp_no = 3
    model.meta.observation.date = "2026-11-23"
    model.meta.observation.time = "06:12:00.000"
    model.meta.exposure.sampmode = "UTR"
    model.meta.exposure.nreads = 3
    model.meta.exposure.read_time = 1.4
    model.meta.pointing.ra = 150.1
    return model


ARRAY_MODELS = [
    (dm.RampModel, {"data": np.arange(2 * 3 * 8 * 8, dtype=np.uint16).reshape(2, 3, 8, 8)}),
    (dm.ImageModel, {"data": np.ones((8, 8), np.float32), "dq": np.full((8, 8), 6, np.uint32),
                     "err": np.full((8, 8), 0.5, np.float32)}),
    (dm.CubeModel, {"data": np.ones((5, 4, 4), np.float32), "wavelength": np.linspace(2.0, 2.4, 5)}),
    (dm.DarkModel, {"data": np.full((8, 8), 0.01, np.float32)}),
    (dm.FlatModel, {"data": np.full((8, 8), 1.0, np.float32)}),
    (dm.MaskModel, {"dq": np.zeros((8, 8), np.uint32)}),
    (dm.SaturationModel, {"data": np.full((8, 8), 6e4, np.float32)}),
    (dm.LinearityModel, {"coeffs": np.zeros((3, 8, 8), np.float32)}),
    (dm.ReadnoiseModel, {"data": np.full((8, 8), 5.0, np.float32)}),
    (dm.GainModel, {"data": np.full((8, 8), 2.0, np.float32)}),
    (dm.IfsTraceModel, {"trace_x": np.zeros((2, 2, 4), np.float32),
                        "trace_y": np.zeros((2, 2, 4), np.float32),
                        "wavelength": np.linspace(2.0, 2.4, 4)}),
    (dm.TelluricModel, {"data": np.linspace(1.0, 2.0, 6), "err": np.full(6, 0.01),
                        "dq": np.zeros(6, np.uint32), "wavelength": np.linspace(2.0, 2.4, 6)}),
    (dm.PhotomModel, {}),  # header keywords only
]


@pytest.mark.parametrize(("cls", "arrays"), ARRAY_MODELS, ids=[c.__name__ for c, _ in ARRAY_MODELS])
def test_roundtrip_fits(tmp_path, cls, arrays):
    path = tmp_path / f"{cls.__name__}.fits"
    model = _fill_meta(cls(**arrays))
    model.save(path)

    # astropy alone reads the product: metadata in the primary header, arrays in extensions.
    with fits.open(path) as hdul:
        assert hdul[0].header["DATAMODL"] == cls.__name__
        assert hdul[0].header["DETECTOR"] == "IMG1"
        assert hdul[0].header["INSTRUME"] == "IRIS"
        assert "ASDF" in hdul
        for name, array in arrays.items():
            hdu_name = model._schema["properties"][name]["fits_hdu"]
            np.testing.assert_array_equal(hdul[hdu_name].data, array)

    reopened = dm.open_model(path)
    assert type(reopened) is cls
    for name, array in arrays.items():
        np.testing.assert_array_equal(getattr(reopened, name), array)
        # FITS stores big-endian; the value type (not the byte order) must survive.
        assert getattr(reopened, name).dtype.newbyteorder("=") == array.dtype
    assert reopened.meta.observation.time == "06:12:00.000"
    if isinstance(reopened, dm.ReferenceFileModel):
        assert reopened.meta.reftype == cls.reftype.upper()


def test_ramp_read_times_and_crds_parameters(tmp_path):
    model = _fill_meta(dm.RampModel(data=np.zeros((1, 3, 4, 4), np.uint16)))
    np.testing.assert_allclose(model.read_times(), [1.4, 2.8, 4.2])
    params = model.get_crds_parameters()
    assert params["DETECTOR"] == "IMG1"
    assert params["FILTER"] == "Kbb"
    assert params["DATE-OBS"] == "2026-11-23"
    assert model.crds_observatory == dm.CRDS_OBSERVATORY


def test_ramp_without_read_time_is_a_clear_error():
    model = dm.RampModel(data=np.zeros((1, 3, 4, 4), np.uint16))
    model.meta.filename = "x_raw.fits"
    with pytest.raises(ValueError, match="x_raw.fits.*READTIME"):
        model.read_times()


def test_invalid_enum_value_is_refused():
    model = dm.ImageModel((4, 4))
    with pytest.warns(Warning, match="IMG9"):
        model.meta.instrument.detector = "IMG9"
    assert model.meta.instrument.detector is None


def test_open_model_errors_name_the_file(tmp_path):
    with pytest.raises(dm.IrisFileError, match="missing.fits.*not found"):
        dm.open_model(tmp_path / "missing.fits")
    junk = tmp_path / "junk.fits"
    junk.write_bytes(b"this is not FITS")
    with pytest.raises(dm.IrisFileError, match="junk.fits"):
        dm.open_model(junk)


def test_provenance_keywords_are_written(tmp_path):
    model = dm.ImageModel(data=np.zeros((4, 4), np.float32))
    model.meta.ref_file.crds.context_used = "tmt_0003.pmap"
    model.meta.ref_file.dark.name = "tmt_iris_dark_0001.fits"
    model.meta.cal_step.dark_sub = "COMPLETE"
    model.save(tmp_path / "p.fits")
    header = fits.getheader(tmp_path / "p.fits")
    assert header["CRDS_CTX"] == "tmt_0003.pmap"
    assert header["R_DARK"] == "tmt_iris_dark_0001.fits"
    assert header["S_DARK"] == "COMPLETE"


def test_dq_flags_are_jwst_values_and_interpretable():
    assert dqflags.pixel["DO_NOT_USE"] == 1
    assert dqflags.pixel["SATURATED"] == 2
    assert dqflags.pixel["JUMP_DET"] == 4
    assert dqflags.pixel["NO_FLAT_FIELD"] == 2**18
    assert dqflags.pixel["REFERENCE_PIXEL"] == 2**31
    assert dqflags.interpret(2 | 4) == ["JUMP_DET", "SATURATED"]
    assert dqflags.to_bits("SATURATED,JUMP_DET") == 6
    values = [v for v in dqflags.pixel.values() if v]
    assert len(values) == len(set(values)), "two DQ names share a bit"
    assert all(v & (v - 1) == 0 for v in values), "every DQ value is a single bit"
