"""OBSTYPE/OBSNAME table and metadata validation: every OBSNAME accepted, bad cases named."""

import pytest

from iris_tasks import metadata as md

DESIGN_TABLE = {
    "CAL": ["IMG1-NFF", "SLI-NFF", "LEN-SPX", "IMG1-DRK", "SLI-DRK", "LEN-DRK", "IMG1-TEL",
            "SLI-TEL", "LEN-TEL"],
    "ENG": ["SLI-IDP", "LEN-IDP"],
    "SCI": ["IMG1-SCI", "LEN-SCI", "SLI-SCI", "IMG1-SKY", "LEN-SKY", "SLI-SKY"],
}


def good_header(obsname: str) -> dict:
    recipe = md.RECIPES[obsname]
    header = {
        "INSTRUME": "IRIS", "DETECTOR": recipe.detectors[-1], "OBSTYPE": recipe.obstype,
        "OBSNAME": obsname, "EXP_NO": 1, "SAMPMODE": "UTR", "NUMREADS": 5, "NUMRAMPS": 1,
        "READTIME": 1.4, "EXPTIME": 5.6, "DATE-OBS": "2026-11-24", "TIME-OBS": "06:00:00.000",
        "FILTER": "Kbb", "RA": 10.0, "DEC": -20.0, "PA": 0.0,
    }
    if recipe.mode != "imager":
        header["IFSMODE"] = recipe.ifsmode
        header["IFSSCALE"] = "25"
    return header


def test_table_is_the_design_table():
    assert {t: sorted(n) for t, n in md.OBSNAMES_BY_OBSTYPE.items()} == \
        {t: sorted(n) for t, n in DESIGN_TABLE.items()}
    for obsname, recipe in md.RECIPES.items():
        assert recipe.stages[0] == "readout"
        assert recipe.deadline_seconds == (30.0 if obsname.startswith("IMG1") else 60.0)
    assert {n for n, r in md.RECIPES.items() if r.nightly == "dark"} == {"IMG1-DRK", "SLI-DRK", "LEN-DRK"}
    assert {n for n, r in md.RECIPES.items() if r.nightly == "flat"} == {"IMG1-NFF", "SLI-NFF", "LEN-SPX"}


@pytest.mark.parametrize("obsname", sorted(md.RECIPES))
def test_every_obsname_validates(obsname):
    recipe = md.validate_header(good_header(obsname), "f.fits", data_shape=(1, 5, 16, 16))
    assert recipe.obsname == obsname


@pytest.mark.parametrize(
    ("change", "keyword", "expected"),
    [
        ({"OBSNAME": "IMG1-XYZ"}, "OBSNAME", "IMG1-NFF"),
        ({"OBSTYPE": "CAL"}, "OBSNAME", "IMG1-DRK"),  # IMG1-SCI is not a CAL name
        ({"OBSTYPE": "FOO"}, "OBSTYPE", "CAL, ENG, SCI"),
        ({"DETECTOR": "IFS"}, "DETECTOR", "IMG1, IMG2"),
        ({"DETECTOR": None}, "DETECTOR", "missing"),
        ({"INSTRUME": "NIRC2"}, "INSTRUME", "IRIS"),
        ({"SAMPMODE": "RAMP"}, "SAMPMODE", "CDS, MCDS, UTR"),
        ({"SAMPMODE": "CDS"}, "NUMREADS", "expected 2"),
        ({"SAMPMODE": "MCDS", "NFOWLER": 3}, "NFOWLER", "2k <= NUMREADS"),
        ({"NUMREADS": 0}, "NUMREADS", ">= 1"),
        ({"READTIME": -1.0}, "READTIME", "positive"),
        ({"DATE-OBS": "24/11/2026"}, "DATE-OBS", "YYYY-MM-DD"),
        ({"DATE-OBS": "2026-02-30"}, "DATE-OBS", "not a calendar date"),
        ({"DATE-OBS": "1999-12-31"}, "DATE-OBS", "before 2020-01-01"),
        ({"TIME-OBS": "6am"}, "TIME-OBS", "hh:mm:ss"),
        ({"TIME-OBS": "25:61:00"}, "TIME-OBS", "not a time of day"),
        ({"DEC": 95.0}, "DEC", "[-90, 90]"),
        ({"EXP_NO": "one"}, "EXP_NO", "integer"),
        ({"XSTART": 4000, "YSTART": 1, "XSIZE": 200, "YSIZE": 16}, "XSIZE", "beyond"),
    ],
)
def test_bad_headers_are_named(change, keyword, expected):
    header = good_header("IMG1-SCI")
    header.update(change)
    header = {k: v for k, v in header.items() if v is not None}
    with pytest.raises(md.MetadataError) as info:
        md.validate_header(header, "night/IMG1_0001.fits")
    message = str(info.value)
    assert message.startswith("night/IMG1_0001.fits: ")
    assert keyword in dict(info.value.problems)
    assert expected in dict(info.value.problems)[keyword] or expected in message


def test_ifs_mode_must_match_obsname():
    header = good_header("LEN-SCI")
    header["IFSMODE"] = "SLICER"
    with pytest.raises(md.MetadataError, match="IFSMODE.*'LENSLET'"):
        md.validate_header(header, "x.fits")


def test_shape_checked_against_numreads():
    with pytest.raises(md.MetadataError, match="NUMREADS: 5 but the data hold 4 reads"):
        md.validate_header(good_header("IMG1-SCI"), "x.fits", data_shape=(1, 4, 16, 16))


def test_all_problems_reported_at_once():
    with pytest.raises(md.MetadataError) as info:
        md.validate_header({"INSTRUME": "IRIS"}, "empty.fits")
    missing = {k for k, m in info.value.problems if m == "missing"}
    assert {"DETECTOR", "OBSTYPE", "OBSNAME", "NUMREADS", "READTIME", "DATE-OBS"} <= missing


def test_night_and_readpatt():
    # 04:00 UTC on the 24th is 18:00 on the 23rd in Hawaii: the night of the 23rd.
    assert md.observing_night("2026-11-24", "04:00:00") == "2026-11-23"
    assert md.observing_night("2026-11-24", "15:30:00") == "2026-11-23"
    assert md.observing_night("2026-11-24", "23:00:00") == "2026-11-24"
    assert md.readpatt("UTR", 10) == "UTR10"


def test_leap_second_time_is_a_valid_instant():
    header = good_header("IMG1-SCI")
    header.update({"DATE-OBS": "2026-12-31", "TIME-OBS": "23:59:60.500"})
    md.validate_header(header, "x.fits")
    assert md.parse_obs_datetime("2026-12-31", "23:59:60.5").isoformat() == "2027-01-01T00:00:00.500000"
    assert md.observing_night("2026-12-31", "23:59:60.5") == "2026-12-31"


def test_validate_file_reads_header_and_shape(tmp_path):
    import numpy as np
    from astropy.io import fits

    path = tmp_path / "raw.fits"
    header = fits.Header(good_header("IMG1-DRK"))
    rng = np.random.default_rng(1)
    # A dark ramp: a bias level plus read noise (an all-zero array is quarantined).
    ramp = (12000 + rng.normal(0, 8, (1, 5, 8, 8))).astype(np.uint16)
    fits.HDUList([fits.PrimaryHDU(header=header), fits.ImageHDU(ramp, name="SCI")]).writeto(path)
    assert md.validate_file(str(path)).obsname == "IMG1-DRK"
    verdict = md.inspect_file(path)
    assert verdict.warnings == () and verdict.stats["sample_pixels"] == 64
    zeros = tmp_path / "zeros.fits"
    fits.HDUList([fits.PrimaryHDU(header=header),
                  fits.ImageHDU(np.zeros((1, 5, 8, 8), np.uint16), name="SCI")]).writeto(zeros)
    with pytest.raises(md.MetadataError, match="zeros.fits: .*SCI: all-zero data"):
        md.validate_file(str(zeros))
    bad = tmp_path / "bad.fits"
    bad.write_text("nope")
    with pytest.raises(md.MetadataError, match="bad.fits: invalid IRIS metadata: FILE"):
        md.validate_file(str(bad))
