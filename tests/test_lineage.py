"""Lineage helpers and the ``iris-drs lineage`` query on hand-made OpenLineage event files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from iris_tasks import lineage


def test_dataset_names_follow_the_provider_conventions(tmp_path):
    assert lineage.ol_name("s3://iris/products/a_cal.fits") == ("s3://iris", "products/a_cal.fits")
    assert lineage.ol_name((tmp_path / "a.fits").as_uri()) == ("file", str(tmp_path / "a.fits"))
    assert lineage.dataset_uri(tmp_path / "x.fits") == (tmp_path / "x.fits").as_uri()
    assert lineage.dataset_uri("s3://b/k") == "s3://b/k"


def test_record_outside_airflow_writes_a_complete_event(tmp_path):
    lineage.record([tmp_path / "in.fits"], ["s3://b/out.fits"], job="iris_realtime.readout",
                   lineage_dir=tmp_path)
    (event,) = lineage.load_events(tmp_path)
    assert event["eventType"] == "COMPLETE" and event["job"]["name"] == "iris_realtime.readout"
    assert event["inputs"] == [{"namespace": "file", "name": str(tmp_path / "in.fits")}]
    assert event["outputs"] == [{"namespace": "s3://b", "name": "out.fits"}]
    # Without a job name (and outside Airflow) nothing is written.
    lineage.record(["a"], ["b"], lineage_dir=tmp_path)
    assert len(lineage.load_events(tmp_path)) == 1


def _product(path: Path, **keywords) -> Path:
    from astropy.io import fits

    hdr = fits.Header(keywords)
    fits.HDUList([fits.PrimaryHDU(header=hdr), fits.ImageHDU(np.zeros((2, 2), np.float32), name="SCI")]
                 ).writeto(path)
    return path


@pytest.fixture
def chain(tmp_path, monkeypatch):
    """Events for raw -> rate (+refs) -> cal (+flat, sky rate) -> s3 object, as tasks write them."""
    monkeypatch.setenv("IRIS_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("IRIS_CRDS_PATH", str(tmp_path / "crds"))
    events = tmp_path / "state" / "lineage"
    crds = tmp_path / "crds"
    raw, sky_raw = tmp_path / "landing" / "f_raw.fits", tmp_path / "landing" / "sky.fits"
    rate, sky_rate = tmp_path / "work" / "f_rate.fits", tmp_path / "work" / "sky_rate.fits"
    cal = _product(tmp_path / "f_cal.fits", RAWFILE="f_raw.fits", CRDS_CTX="tmt_0003.pmap",
                   R_DARK="crds://tmt_iris_dark_0002.fits", R_FLAT="crds://tmt_iris_flat_0001.fits",
                   S_FLAT="COMPLETE")
    dark = crds / "references" / "tmt" / "iris" / "tmt_iris_dark_0002.fits"
    flat = crds / "references" / "tmt" / "iris" / "tmt_iris_flat_0001.fits"
    ctx = crds / "mappings" / "tmt" / "tmt_0003.pmap"
    master_input = tmp_path / "work" / "drk_rate.fits"
    steps = [
        ("iris_realtime.frame.readout", [raw, dark, ctx], [rate]),
        ("iris_realtime.frame.readout", [sky_raw, dark, ctx], [sky_rate]),
        ("iris_realtime.frame.reduce", [rate, sky_rate, flat, ctx], [cal]),
        ("iris_realtime.frame", [raw, rate, cal], ["s3://iris/raw/f_raw.fits", "s3://iris/products/n/IMG1/IMG1-SCI/f_cal.fits"]),
        # The master's own history must not leak into the product's answer.
        ("iris_nightly_calibrations.publish", [master_input], [ctx]),
    ]
    for job, ins, outs in steps:
        lineage.write_event(job, [lineage.dataset_uri(i) for i in ins],
                            [lineage.dataset_uri(o) for o in outs], lineage_dir=events)
    return {"cal": cal, "raw": raw, "sky": sky_raw, "dark": dark, "flat": flat, "ctx": ctx,
            "master_input": master_input, "events": events}


def test_lineage_of_a_local_product(chain):
    result = lineage.lineage_of(str(chain["cal"]))
    assert result["header"]["RAWFILE"] == "f_raw.fits" and result["header"]["CRDS_CTX"] == "tmt_0003.pmap"
    assert set(result["raw_frames"]) == {chain["raw"].as_uri(), chain["sky"].as_uri()}
    assert set(result["references"]) == {chain["dark"].as_uri(), chain["flat"].as_uri()}
    assert result["contexts"] == [chain["ctx"].as_uri()]
    assert chain["master_input"].as_uri() not in json.dumps(result)
    assert [s["job"] for s in result["steps"]].count("iris_realtime.frame.readout") == 2


def test_lineage_of_an_object_key_or_name(chain):
    by_key = lineage.lineage_of("products/n/IMG1/IMG1-SCI/f_cal.fits")
    assert by_key["matched"] == ["s3://iris/products/n/IMG1/IMG1-SCI/f_cal.fits"]
    assert chain["raw"].as_uri() in by_key["raw_frames"]
    # The header is read from the local file the ingest event names.
    assert by_key["header"]["R_FLAT"] == "crds://tmt_iris_flat_0001.fits"
    # A bare file name identifies nothing (two nights' products share names): no match, a warning.
    by_name = lineage.lineage_of("f_cal.fits")
    assert by_name["matched"] == [] and by_name["raw_frames"] == [] and by_name["warnings"]


def test_lineage_cli(chain, capsys):
    import argparse

    parser = argparse.ArgumentParser()
    lineage.register_cli(parser.add_subparsers())
    args = parser.parse_args(["lineage", str(chain["cal"]), "--json"])
    assert args.handler(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert chain["raw"].as_uri() in out["raw_frames"]
    args = parser.parse_args(["lineage", "unknown_cal.fits"])
    assert args.handler(args) == 3
    assert "(none found)" in capsys.readouterr().out
