"""Quicklook PNGs from raw ramps, images and cubes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from PIL import Image

from iris_tasks.quicklook import (
    QuicklookError,
    block_average,
    load_preview,
    main,
    make_quicklook,
    make_thumbnail_pair,
)


def _primary(**kw: str) -> fits.PrimaryHDU:
    hdu = fits.PrimaryHDU()
    hdu.header.update({"OBSTYPE": "SCI", "OBSNAME": "IMG1-SCI", "DETECTOR": "IMG1", **kw})
    return hdu


def _write_raw(path: Path, rng: np.random.Generator, shape=(2, 4, 48, 64)) -> np.ndarray:
    nreads = shape[-3]
    base = rng.integers(1000, 2000, size=shape[-2:]).astype(np.uint16)
    rate = np.linspace(0, 300, shape[-1], dtype=np.float64)[None, :].repeat(shape[-2], 0)
    reads = np.stack([base + (rate * k).astype(np.uint16) for k in range(nreads)])
    data = np.broadcast_to(reads, shape).astype(np.uint16)
    fits.HDUList([_primary(), fits.ImageHDU(data, name="SCI")]).writeto(path)
    return data


def _write_image(path: Path, rng: np.random.Generator, shape=(64, 64)) -> tuple[np.ndarray, np.ndarray]:
    sci = rng.normal(10.0, 1.0, shape).astype(np.float32)
    dq = np.zeros(shape, np.uint32)
    dq[40:56, 40:56] = 1  # DO_NOT_USE block
    dq[0:8, 0:8] = 4  # JUMP_DET only: must not be masked
    fits.HDUList([_primary(), fits.ImageHDU(sci, name="SCI"),
                  fits.ImageHDU(np.ones_like(sci), name="ERR"), fits.ImageHDU(dq, name="DQ")]).writeto(path)
    return sci, dq


def _png_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as im:
        assert im.format == "PNG"
        return im.size


def test_raw_ramp_is_last_minus_first(tmp_path: Path, rng: np.random.Generator) -> None:
    data = _write_raw(tmp_path / "raw.fits", rng)
    prev = load_preview(tmp_path / "raw.fits")
    assert prev.kind == "ramp" and prev.shape == data.shape
    expected = data[0, -1].astype(np.float32) - data[0, 0].astype(np.float32)
    np.testing.assert_array_equal(prev.image, expected)
    assert prev.header["OBSNAME"] == "IMG1-SCI"

    q = make_quicklook(tmp_path / "raw.fits", tmp_path / "raw_ql.png")
    assert q.kind == "ramp" and q.png_size == (512, 384)  # 64 x 48 keeps its aspect
    assert _png_size(q.path) == (512, 384)
    assert "IMG1-SCI" in q.title and "IMG1" in q.title and "raw.fits" in q.title


def test_raw_ramp_without_ramp_axis(tmp_path: Path, rng: np.random.Generator) -> None:
    data = _write_raw(tmp_path / "raw3.fits", rng, shape=(5, 32, 32))
    prev = load_preview(tmp_path / "raw3.fits")
    assert prev.kind == "ramp"
    np.testing.assert_array_equal(prev.image, data[-1].astype(np.float32) - data[0])


def test_image_masks_do_not_use(tmp_path: Path, rng: np.random.Generator) -> None:
    sci, dq = _write_image(tmp_path / "cal.fits", rng)
    prev = load_preview(tmp_path / "cal.fits")
    assert prev.kind == "image"
    assert np.isnan(prev.image[40:56, 40:56]).all()
    assert np.isfinite(prev.image[0:8, 0:8]).all()  # other DQ bits are shown
    q = make_quicklook(tmp_path / "cal.fits", tmp_path / "cal_ql.png", size=64)
    assert _png_size(q.path) == (64, 64)
    with Image.open(q.path) as im:
        r, g, b = im.convert("RGB").getpixel((47, 64 - 1 - 47))  # inside the block (origin lower)
    assert (r, g, b) != (r, r, r) and r > g  # drawn in the "bad" colour, not grey
    assert q.vmin < 10.0 < q.vmax


def test_cube_is_collapsed(tmp_path: Path, rng: np.random.Generator) -> None:
    cube = rng.normal(1.0, 0.01, (20, 30, 40)).astype(np.float32)
    cube[:, 5, 5] = 50.0
    dq = np.zeros(cube.shape, np.uint32)
    dq[:, 10, 10] = 1  # dead spaxel at every wavelength -> NaN
    dq[:10, 5, 5] = 1  # half the planes masked -> mean of the rest
    fits.HDUList([_primary(OBSNAME="LEN-SCI", DETECTOR="IFS", IFSMODE="LENSLET"),
                  fits.ImageHDU(cube, name="SCI"), fits.ImageHDU(dq, name="DQ")]).writeto(tmp_path / "s3d.fits")
    prev = load_preview(tmp_path / "s3d.fits")
    assert prev.kind == "cube" and prev.image.shape == (30, 40)
    assert np.isnan(prev.image[10, 10]) and prev.image[5, 5] == pytest.approx(50.0)
    q = make_quicklook(tmp_path / "s3d.fits", tmp_path / "s3d_ql.png", size=200)
    assert q.kind == "cube" and _png_size(q.path) == (200, 150)
    assert "collapsed" in q.title


def test_arrays_and_model_like_objects(tmp_path: Path, rng: np.random.Generator) -> None:
    image = rng.normal(size=(50, 50)).astype(np.float32)
    q = make_quicklook(image, tmp_path / "a.png", size=100, title="custom title")
    assert q.title == "custom title" and _png_size(q.path) == (100, 100)

    class Model:
        data = image
        dq = np.ones((50, 50), np.uint32)  # everything DO_NOT_USE

    q = make_quicklook(Model(), tmp_path / "m.png", size=100)
    assert _png_size(q.path) == (100, 100)  # all-NaN still renders ("no valid pixels")


def test_block_average_handles_nan_and_edges() -> None:
    img = np.arange(36, dtype=np.float32).reshape(6, 6)
    img[0:3, 0:3] = np.nan  # a whole block: stays NaN
    img[3, 3] = np.nan  # one pixel of a block: mean of the other 8
    out = block_average(img, 2)
    assert out.shape == (2, 2)
    assert np.isnan(out[0, 0])
    block = img[3:6, 3:6]
    assert out[1, 1] == pytest.approx(np.nanmean(block))
    # 7x5 into size 3: factor 3, padded (not cropped) -> 3x2
    assert block_average(np.ones((7, 5), np.float32), 3).shape == (3, 2)
    assert block_average(np.ones((4, 4), np.float32), 512).shape == (4, 4)


def test_thumbnail_pair(tmp_path: Path, rng: np.random.Generator) -> None:
    _write_raw(tmp_path / "raw.fits", rng, shape=(1, 3, 64, 64))
    _write_image(tmp_path / "cal.fits", rng)
    out = make_thumbnail_pair(tmp_path / "raw.fits", tmp_path / "cal.fits", tmp_path / "pair.png", size=128)
    assert _png_size(out) == (256, 128)


def test_errors_are_clear(tmp_path: Path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("this is not FITS\n" * 100)
    with pytest.raises(QuicklookError, match=r"notes.txt: not a readable FITS file"):
        make_quicklook(text, tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()
    with pytest.raises(QuicklookError, match="file not found"):
        make_quicklook(tmp_path / "missing.fits", tmp_path / "x.png")
    with pytest.raises(QuicklookError, match="1-D"):
        make_quicklook(np.zeros(10), tmp_path / "x.png")
    with pytest.raises(QuicklookError, match="stretch"):
        make_quicklook(np.zeros((4, 4)), tmp_path / "x.png", stretch="rainbow")
    fits.HDUList([fits.PrimaryHDU()]).writeto(tmp_path / "empty.fits")
    with pytest.raises(QuicklookError, match="no SCI extension"):
        make_quicklook(tmp_path / "empty.fits", tmp_path / "x.png")


@pytest.mark.parametrize("stretch", ["zscale", "asinh", "minmax", "percentile"])
def test_stretches(tmp_path: Path, rng: np.random.Generator, stretch: str) -> None:
    q = make_quicklook(rng.normal(size=(32, 32)), tmp_path / "s.png", size=32, stretch=stretch)
    assert q.vmax > q.vmin


def test_cli(tmp_path: Path, rng: np.random.Generator, capsys: pytest.CaptureFixture[str]) -> None:
    _write_image(tmp_path / "cal.fits", rng)
    assert main([str(tmp_path / "cal.fits"), "--size", "64"]) == 0
    assert _png_size(tmp_path / "cal_ql.png") == (64, 64)
    (tmp_path / "bad.fits").write_text("nope")
    assert main([str(tmp_path / "bad.fits")]) == 1
    assert "not a readable FITS file" in capsys.readouterr().err


@pytest.mark.slow
def test_full_frame(tmp_path: Path, rng: np.random.Generator) -> None:
    # Speed is a bench figure, not a test assertion (timings on shared CI cores are noise).
    image = rng.normal(100.0, 5.0, (4096, 4096)).astype(np.float32)
    dq = np.zeros(image.shape, np.uint32)
    dq[:, :4] = 1
    q = make_quicklook(image, tmp_path / "full.png", dq=dq)
    assert _png_size(q.path) == (512, 512)
