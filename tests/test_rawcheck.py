"""iris_tasks.rawcheck on its own: the plausibility rules on simulated frames of every kind
(no false alarm on good frames, reversed illuminated ramps caught), and the edge cases the
corpus does not cover (several ramps, padding, subarrays, many bad cards, darks)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from iris_tasks import metadata as md
from iris_tasks import rawcheck

FRAMES = [("IMG1-DRK", "IMG1"), ("IMG1-NFF", "IMG1"), ("IMG1-SCI", "IMG2"),
          ("SLI-SCI", "IFS"), ("LEN-SPX", "IFS"), ("SLI-IDP", "IFS")]


def _header(obsname: str = "IMG1-SCI", nreads: int = 5, nramps: int = 1) -> fits.Header:
    recipe = md.RECIPES[obsname]
    return fits.Header({
        "INSTRUME": "IRIS", "DETECTOR": recipe.detectors[0], "OBSTYPE": recipe.obstype,
        "OBSNAME": obsname, "EXP_NO": 1, "SAMPMODE": "UTR", "NUMREADS": nreads,
        "NUMRAMPS": nramps, "READTIME": 1.4, "EXPTIME": 5.6, "DATE-OBS": "2026-11-24",
        "TIME-OBS": "06:00:00.000", "FILTER": "Ks", "RA": 10.0, "DEC": -20.0, "PA": 0.0})


def _ramp(rng, nramps=1, nreads=5, ny=32, nx=32, rate=20.0, noise=6.0) -> np.ndarray:
    k = np.arange(nreads, dtype=np.float64)[None, :, None, None]
    values = 12000 + rate * k + rng.normal(0, noise, (nramps, nreads, ny, nx))
    return np.clip(values, 0, 65535).astype(np.uint16)


def _write(path: Path, data: np.ndarray, header: fits.Header | None = None) -> Path:
    if header is None:
        header = _header(nreads=data.shape[-3], nramps=data.shape[0] if data.ndim == 4 else 1)
    fits.HDUList([fits.PrimaryHDU(header=header), fits.ImageHDU(data, name="SCI")]).writeto(path)
    return path


@pytest.mark.parametrize(("obsname", "detector"), FRAMES)
@pytest.mark.parametrize("nreads", [2, 5])
def test_simulated_frames_pass_and_reversed_illuminated_ramps_do_not(tmp_path, obsname, detector,
                                                                      nreads):
    from iris_tasks.simulate import simulate_frame

    path, _ = simulate_frame(tmp_path / "f.fits", obsname, detector, size=64, nreads=nreads,
                             sampmode="CDS" if nreads == 2 else "UTR", seed=11,
                             night="2026-11-20")
    verdict = md.inspect_file(path)
    assert verdict.warnings == () and verdict.stats["sample_pixels"] == 56 * 56
    with fits.open(path) as hdul:
        hdul["SCI"].data = hdul["SCI"].data[:, ::-1].copy()
        hdul.writeto(tmp_path / "reversed.fits")
    if obsname.endswith("DRK"):  # no signal: reversing a dark is not detectable (nor harmful)
        md.validate_file(tmp_path / "reversed.fits")
        return
    with pytest.raises(md.MetadataError, match="reads decrease with time"):
        md.validate_file(tmp_path / "reversed.fits")


def test_every_ramp_is_checked(tmp_path, rng):
    data = _ramp(rng, nramps=3)
    assert md.inspect_file(_write(tmp_path / "ok.fits", data)).recipe.obsname == "IMG1-SCI"
    data[2] = data[2, ::-1]
    with pytest.raises(md.MetadataError, match=r"ramp 2: last - first"):
        md.validate_file(_write(tmp_path / "bad.fits", data))


def test_single_ramp_without_the_ramp_axis(tmp_path, rng):
    path = _write(tmp_path / "r3.fits", _ramp(rng)[0], _header())
    assert md.inspect_file(path).stats["sample_pixels"] == 32 * 32


def test_dark_with_a_falling_median_is_only_a_warning(tmp_path, rng):
    # A -15 DN drift over the ramp in every pixel: a reset anomaly on a dark, no light.
    data = _ramp(rng, rate=-3.75, noise=4.0)
    header = _header("IMG1-DRK")
    verdict = md.inspect_file(_write(tmp_path / "dark.fits", data, header))
    assert any("median ramp falls" in m for _, m in verdict.warnings)
    header["OBSNAME"], header["OBSTYPE"] = "IMG1-SCI", "SCI"  # the same ramp lit: backwards
    with pytest.raises(md.MetadataError, match="reads decrease with time"):
        md.validate_file(_write(tmp_path / "sci.fits", data, header))


def test_mostly_saturated_is_a_warning_all_saturated_a_problem(tmp_path, rng):
    data = _ramp(rng)
    data[..., :20] = 65535  # 62.5 % of the pixels at full scale
    verdict = md.inspect_file(_write(tmp_path / "most.fits", data))
    assert any("65535" in m for _, m in verdict.warnings)
    data[...] = 65535
    data[0, :, 0, 0] = np.arange(5) + 60000  # one pixel alive: still 99.9 % saturated
    with pytest.raises(md.MetadataError, match="saturated: 99.9%"):
        md.validate_file(_write(tmp_path / "all.fits", data))


def test_subarray_away_from_the_edges_has_no_reference_pixels(tmp_path, rng):
    header = _header()
    header.update({"SUBARRAY": "SUB32", "XSTART": 1001, "YSTART": 2001, "XSIZE": 32,
                   "YSIZE": 32})
    verdict = md.inspect_file(_write(tmp_path / "sub.fits", _ramp(rng), header))
    assert verdict.stats["reference_pixels"] == 0 and verdict.stats["sample_pixels"] == 1024
    header.update({"XSTART": 1, "YSTART": 1})  # the corner: 4 reference rows and columns
    verdict = md.inspect_file(_write(tmp_path / "corner.fits", _ramp(rng), header))
    assert verdict.stats["sample_pixels"] == 28 * 28 and verdict.stats["reference_pixels"] > 0


def test_padding_trailing_bytes_and_structure_complete(tmp_path, rng):
    path = _write(tmp_path / "ok.fits", _ramp(rng))
    assert rawcheck.structure_complete(path)
    raw = path.read_bytes()
    sci = rawcheck.inspect_structure(path).sci
    short = tmp_path / "short_padding.fits"
    short.write_bytes(raw[:sci.data_end + 10])  # data whole, padding cut
    verdict = md.inspect_file(short)
    assert any("not padded" in m for _, m in verdict.warnings)
    zeros = tmp_path / "zeros.fits"
    zeros.write_bytes(raw + b"\0" * 5000)
    assert any("5000 zero bytes" in m for _, m in md.inspect_file(zeros).warnings)
    cut = tmp_path / "cut.fits"
    cut.write_bytes(raw[:sci.data_end - 2])
    assert not rawcheck.structure_complete(cut)
    assert not rawcheck.structure_complete(tmp_path / "missing.fits")
    assert not rawcheck.structure_complete(tmp_path)  # a directory


def test_many_invalid_cards_are_summarised_and_keywords_still_checked(tmp_path, rng):
    path = _write(tmp_path / "ok.fits", _ramp(rng))
    data = bytearray(path.read_bytes())
    for i in range(12):  # twelve cards of junk in place of twelve COMMENT-free slots
        card = f"BAD{i:02d}   = 1.2.{i}".ljust(80).encode()
        start = data.find(b"END" + b" " * 77)
        data[start:start + 80] = card
        data[start + 80:start + 160] = b"END".ljust(80)
    path.write_bytes(bytes(data))
    with pytest.raises(md.MetadataError) as info:
        md.validate_file(path)
    problems = dict(info.value.problems)
    assert "BAD00" in problems and "2 more invalid cards" in problems["HEADER"]
    assert len(info.value.problems) == 11


def test_invalid_mandatory_card_is_a_structure_problem(tmp_path, rng):
    path = _write(tmp_path / "ok.fits", _ramp(rng))
    data = path.read_bytes()
    start = data.find(b"NAXIS1  =", 2880)  # in the SCI header
    bad = tmp_path / "bad_naxis.fits"
    bad.write_bytes(data[:start] + b"NAXIS1  = 'wide'".ljust(80) + data[start + 80:])
    with pytest.raises(md.MetadataError) as info:
        md.validate_file(bad)
    assert any("NAXISn missing" in m for _, m in info.value.problems)
