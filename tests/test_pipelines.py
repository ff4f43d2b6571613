"""Recipe entry points (run_readout, run_reduction, masters) and the iris-drs commands."""

import argparse

import numpy as np
import pytest
from astropy.io import fits
from test_steps_support import detector_references, write_ramp, write_rate

from iris_tasks.metadata import MetadataError
from iris_tasks.pipelines import cli as pipelines_cli
from iris_tasks.pipelines.recipes import (
    build_master_darks,
    build_masters_dir,
    classify,
    product_path,
    reduce_path,
    run_readout,
    run_readout_model,
    run_reduction,
)

# stpipe's crds_client still calls crds' deprecated cache-lock helper on every lookup.
pytestmark = pytest.mark.filterwarnings("ignore:'get_cache_lock' is deprecated:DeprecationWarning")


@pytest.fixture(scope="module")
def crds_env(tmp_path_factory):
    from iris_tasks.calib.testing import temporary_cache

    root = tmp_path_factory.mktemp("crds_pipelines")
    refs = detector_references(root / "refs")
    with temporary_cache(root / "cache") as calib:
        context = calib.publish_references([str(p) for p in refs.values()], "pipeline tests")
        yield calib, context


def _run_cli(argv):
    parser = argparse.ArgumentParser(prog="iris-drs")
    sub = parser.add_subparsers(dest="command")
    pipelines_cli.register_cli(sub)
    args = parser.parse_args(argv)
    return args.handler(args)


def test_product_names():
    assert product_path("/a/x_raw.fits", "/o", "rate").as_posix() == "/o/x_rate.fits"
    assert product_path("x_rate.fits", "o", "cal").name == "x_cal.fits"
    assert product_path("2026-11-22_IMG1_IMG1-SCI_0001.fits", "o", "rate").name == \
        "2026-11-22_IMG1_IMG1-SCI_0001_rate.fits"


def test_run_readout_and_reduction(crds_env, tmp_path):
    _, context = crds_env
    raw = write_ramp(tmp_path / "sci_0001.fits", 20.0)
    rate = run_readout(raw, tmp_path / "out", context=context)
    assert rate == tmp_path / "out" / "sci_0001_rate.fits"
    cal = run_reduction(rate, tmp_path / "out", context=context)
    assert cal.name == "sci_0001_cal.fits"
    header = fits.getheader(cal)
    assert header["FILENAME"] == "sci_0001_cal.fits"
    assert header["CRDS_CTX"] == context and header["S_SKYSUB"] == "COMPLETE"
    assert header["SKYFILES"].startswith("NONE")  # no skies: the documented model fallback
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".tmp")]


def test_rate_handed_over_in_memory_gives_the_same_product(crds_env, tmp_path):
    """Stage 2 on the rate model stage 1 just saved (the real-time chain's hand-over) writes
    the product stage 2 writes from the rate file: same arrays, same header cards."""
    _, context = crds_env
    raw = write_ramp(tmp_path / "sci_0002.fits", 20.0)
    from_file = run_reduction(run_readout(raw, tmp_path / "a", context=context), tmp_path / "a",
                              context=context)
    rate, model = run_readout_model(raw, tmp_path / "b", context=context)
    in_memory = run_reduction(rate, tmp_path / "b", context=context, rate_model=model)
    assert in_memory.name == from_file.name
    volatile = {"DATE", "CHECKSUM", "DATASUM"}
    with fits.open(from_file) as a, fits.open(in_memory) as b:
        assert [h.name for h in a] == [h.name for h in b]
        for ha, hb in zip(a, b, strict=True):
            if ha.name == "ASDF":
                continue
            cards_a = {k: v for k, v in ha.header.items() if k not in volatile}
            cards_b = {k: v for k, v in hb.header.items() if k not in volatile}
            assert cards_a == cards_b, ha.name
            if ha.data is not None:
                np.testing.assert_array_equal(ha.data, hb.data, err_msg=ha.name)


def test_sky_frames_required_when_asked(crds_env, tmp_path):
    rate = write_rate(tmp_path / "s_rate.fits", np.full((64, 64), 10.0))
    with pytest.raises(ValueError, match="no sky frames"):
        run_reduction(rate, tmp_path, sky_method="frames")


def test_invalid_raw_header_fails_before_processing(crds_env, tmp_path):
    raw = write_ramp(tmp_path / "bad.fits", 1.0)
    with fits.open(raw, mode="update") as hdul:
        hdul[0].header["OBSNAME"] = "IMG1-XYZ"
    with pytest.raises(MetadataError, match="OBSNAME"):
        run_readout(raw, tmp_path)


def test_frames_without_stage2_keep_their_rate(crds_env, tmp_path):
    # IFS cubes are covered in tests/test_ifs_steps.py (they need an ifstrace reference).
    dark = write_rate(tmp_path / "drk_rate.fits", np.ones((64, 64)), obsname="IMG1-DRK", obstype="CAL")
    assert run_reduction(dark, tmp_path) is None
    assert not list(tmp_path.glob("*_s3d.fits")) and not list(tmp_path.glob("*_cal.fits"))


def test_reduce_directory_with_sky_and_masters(crds_env, tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    write_ramp(raw / "sci.fits", 30.0, seed=1)
    write_ramp(raw / "sky1.fits", 25.0, seed=2, obsname="IMG1-SKY", exp_no=1)
    write_ramp(raw / "sky2.fits", 28.0, seed=3, obsname="IMG1-SKY", exp_no=2)
    for i in range(3):
        write_ramp(raw / f"drk{i}.fits", 0.5, seed=10 + i, obsname="IMG1-DRK", obstype="CAL",
                   exp_no=i, time=f"0{i}:00:00")
    found = classify(sorted(raw.iterdir()))
    assert len(found.nightly["dark"]) == 3 and len(found.frames) == 6
    written = reduce_path(raw, tmp_path / "out")
    names = {p.name for p in written}
    assert {"sci_rate.fits", "sci_cal.fits", "sky1_cal.fits", "drk0_rate.fits"} <= names
    assert any(n.endswith("_dark.fits") for n in names)
    header = fits.getheader(tmp_path / "out" / "sci_cal.fits")
    assert header["SKYFILES"] == "sky1_rate.fits,sky2_rate.fits"
    assert fits.getheader(tmp_path / "out" / "sky1_cal.fits")["S_SKYSUB"] == "SKIPPED"


def test_master_darks_from_raw_ramps_and_publish(crds_env, tmp_path):
    calib, context = crds_env
    raws = [write_ramp(tmp_path / f"d{i}.fits", 0.2, seed=20 + i, obsname="IMG1-DRK",
                       obstype="CAL", exp_no=i) for i in range(4)]
    raws.append(write_ramp(tmp_path / "lonely.fits", 0.2, nreads=3, obsname="IMG1-DRK",
                           obstype="CAL", exp_no=9))
    out = tmp_path / "masters"
    written = build_master_darks(raws, out)
    assert [p.name for p in written] == ["iris_img1_utr5_6s_2026-11-22_dark.fits"]
    header = fits.getheader(written[0])
    assert header["NCOMBINE"] == 4 and header["READPATT"] == "UTR5"
    src = tmp_path / "night"
    src.mkdir()
    for raw in raws[:4]:
        raw.rename(src / raw.name)
    written, new = build_masters_dir(src, tmp_path / "published", publish=True)
    try:
        assert new != context and new == calib.operational_context()
        assert len(written) == 1
    finally:
        calib.set_operational_context(context)


def test_cli_commands(crds_env, tmp_path, capsys):
    _, context = crds_env
    raw = write_ramp(tmp_path / "c.fits", 10.0)
    assert _run_cli(["readout", str(raw), "-o", str(tmp_path / "x" / "c_rate.fits"),
                     "--context", context]) == 0
    assert (tmp_path / "x" / "c_rate.fits").exists()
    assert _run_cli(["reduce", str(tmp_path / "x" / "c_rate.fits"), "--out", str(tmp_path / "y"),
                     "--sky", "model"]) == 0
    assert (tmp_path / "y" / "c_cal.fits").exists()
    printed = capsys.readouterr().out.split()
    assert str(tmp_path / "y" / "c_cal.fits") in printed
    with pytest.raises(ValueError, match="no nightly dark, flat or arc"):
        _run_cli(["masters", str(tmp_path / "y"), "--out", str(tmp_path / "z")])
