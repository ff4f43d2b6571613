"""I/O and bookkeeping of the real-time path: native FITS reads, asdf schema cache, gc."""

import gc

import numpy as np
import pytest
from astropy.io import fits
from test_steps_support import detector_references, write_ramp, write_rate

from iris_tasks import datamodels as dm
from iris_tasks.datamodels import _asdf_cache, open_model
from iris_tasks.datamodels.io import read_native_hdulist
from iris_tasks.pipelines import Image2Pipeline

pytestmark = pytest.mark.filterwarnings("ignore:'get_cache_lock' is deprecated:DeprecationWarning")


def _same_model(fast, slow):
    a, b = fast.to_flat_dict(), slow.to_flat_dict()
    assert a.keys() == b.keys()
    for key, value in a.items():
        other = b[key]
        if isinstance(value, np.ndarray):
            assert value.dtype.isnative, key
            assert value.dtype == other.dtype.newbyteorder("="), key
            np.testing.assert_array_equal(value, other, err_msg=key)
        else:
            assert value == other, key


@pytest.mark.parametrize("kind", ["ramp", "rate", "references"])
def test_open_model_reads_what_stdatamodels_reads(tmp_path, kind):
    """One native pass over a memory map gives the arrays stdatamodels' own read gives
    (pseudo-unsigned uint16/uint32 included), in native byte order."""
    if kind == "ramp":
        paths = [write_ramp(tmp_path / "r.fits", 20.0)]
    elif kind == "rate":
        dq = np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 1000003  # high bits set
        paths = [write_rate(tmp_path / "x_rate.fits", np.linspace(-5, 5, 64 * 64).reshape(64, 64),
                            dq=dq)]
    else:
        paths = list(detector_references(tmp_path / "refs").values())
    for path in paths:
        fast = open_model(path)
        slow = type(fast)(str(path))
        if isinstance(slow, dm.RampModel) and slow.data.ndim == 3:
            slow.data = slow.data[None]
        assert fast.meta.filename == path.name
        _same_model(fast, slow)


def test_native_reference_cache_maps_what_the_file_holds(tmp_path, caplog):
    """References kept in native byte order: the second open maps the cached arrays
    (copy-on-write: a step writing into them changes neither the cache nor the file), equal
    to the direct read; a rewritten file gets a new entry; a damaged entry is rebuilt."""
    refs = detector_references(tmp_path / "refs")
    cache = tmp_path / "native"
    for path in refs.values():
        direct = open_model(path)
        first = open_model(path, native_cache=cache)  # converts and writes the entry
        second = open_model(path, native_cache=cache)  # maps it
        _same_model(first, direct)
        _same_model(second, direct)
    entries = sorted(p.name for p in cache.iterdir())
    assert len(entries) == len(refs) and not any(e.startswith(".") for e in entries)

    gain = refs["gain"]
    mapped = open_model(gain, native_cache=cache)
    assert not mapped.data.flags.owndata and mapped.data.flags.writeable
    mapped.data[:] = -1.0  # private pages only
    again = open_model(gain, native_cache=cache)
    assert np.all(again.data == open_model(gain).data) and np.all(again.data > 0)

    # A changed file (new bytes, new mtime) never matches the old entry.
    model = open_model(gain)
    model.data[:] = 7.0
    model.save(str(gain))
    assert np.all(open_model(gain, native_cache=cache).data == 7.0)

    # A damaged entry: logged, rebuilt, and the read still gives the file's arrays.
    entry = dm.io.native_cache_entry(gain, cache)
    (entry / "hdu1.npy").write_bytes(b"garbage")
    with caplog.at_level("WARNING"):
        assert np.all(open_model(gain, native_cache=cache).data == 7.0)
    assert "unusable" in caplog.text
    assert np.all(open_model(gain, native_cache=cache).data == 7.0)


def test_scaled_images_fall_back_to_astropy(tmp_path):
    """BSCALE-scaled data is not the fast path's business: astropy converts it."""
    path = write_rate(tmp_path / "s_rate.fits", np.full((8, 8), 3.0))
    with fits.open(path) as hdul:
        hdul["ERR"].scale("int16", bscale=0.5, bzero=0)
        hdul.writeto(tmp_path / "scaled_rate.fits")
    assert read_native_hdulist(tmp_path / "scaled_rate.fits") is None
    model = open_model(tmp_path / "scaled_rate.fits")
    assert model.err.dtype == np.float32 and np.allclose(model.err, 0.1, atol=0.25)
    assert model.meta.filename == "scaled_rate.fits"


def test_open_model_errors_name_the_file(tmp_path):
    with pytest.raises(dm.IrisFileError, match="not found"):
        open_model(tmp_path / "missing.fits")
    (tmp_path / "junk.fits").write_bytes(b"not fits at all" * 300)
    with pytest.raises(dm.IrisFileError, match="junk.fits"):
        open_model(tmp_path / "junk.fits")


def test_asdf_schema_resources_are_parsed_once(monkeypatch):
    import asdf.schema
    import yaml

    assert _asdf_cache.install()
    assert getattr(asdf.schema._make_schema_loader, "_iris_cached", False)
    model = dm.ImageModel(data=np.zeros((4, 4), np.float32))  # warm: ndarray schema parsed
    calls = []
    real_load = yaml.load
    monkeypatch.setattr(yaml, "load", lambda *a, **k: calls.append(1) or real_load(*a, **k))
    for _ in range(3):
        model.err = np.ones((4, 4), np.float32)  # validated against ndarray-1.1.0 each time
    assert calls == []
    with pytest.raises(Exception, match="dtype|datatype|ndim|dimension"):
        model.err = np.ones((2, 2, 2), np.float32)  # validation still works


def test_pipeline_collects_garbage_once_not_per_step(tmp_path, monkeypatch):
    """stpipe calls gc.collect() in every Step.run; IRIS sub-steps skip it (base.py)."""
    from iris_tasks.calib.testing import temporary_cache

    refs = detector_references(tmp_path / "refs")
    sci = write_rate(tmp_path / "sci_rate.fits", np.full((64, 64), 20.0, np.float32))
    with temporary_cache(tmp_path / "cache") as calib:
        calib.publish_references([str(p) for p in refs.values()], "gc test")
        Image2Pipeline().run(str(sci))  # warm (imports, CRDS)
        calls = []
        real_collect = gc.collect
        monkeypatch.setattr(gc, "collect", lambda *a: calls.append(a) or real_collect(*a))
        result = Image2Pipeline().run(str(sci))
    assert len(calls) == 1  # the pipeline's own run; not dq_init, dark_sub, ..., assign_wcs
    assert result.meta.cal_step.assign_wcs == "COMPLETE"
    calls.clear()
    gc.collect()  # outside a sub-step the real collect is untouched
    assert len(calls) == 1


def test_sky_model_engines_agree_through_the_pipeline(tmp_path):
    """The step parameter ``model_engine`` selects photutils itself; both give one result."""
    from iris_tasks.calib.testing import temporary_cache

    rng = np.random.default_rng(7)
    data = (40.0 + rng.normal(0.0, 2.0, (64, 64))).astype(np.float32)
    data[30:33, 30:33] += 500.0
    refs = detector_references(tmp_path / "refs")
    sci = write_rate(tmp_path / "sci_rate.fits", data)
    with temporary_cache(tmp_path / "cache") as calib:
        calib.publish_references([str(p) for p in refs.values()], "engine test")
        results = {engine: Image2Pipeline(steps={"sky_sub": {"model_engine": engine,
                                                             "box_size": 16}}).run(str(sci))
                   for engine in ("mesh", "photutils")}
    mesh, ref = results["mesh"], results["photutils"]
    assert mesh.meta.provenance.sky_method == ref.meta.provenance.sky_method == "MODEL"
    np.testing.assert_allclose(mesh.data, ref.data, rtol=0, atol=1e-4 * 2.0)
    np.testing.assert_allclose(mesh.err, ref.err, rtol=1e-5)
    np.testing.assert_array_equal(mesh.dq, ref.dq)
