"""iris_tasks.calib: offline CRDS cache, selection, publishing, contexts, errors."""

from __future__ import annotations

import os
import socket

import crds
import numpy as np
import pytest
from astropy.io import fits
from crds.core import exceptions as crexc
from crds.core import utils as crds_utils

from iris_tasks.calib import cache as calib_cache
from iris_tasks.calib.testing import temporary_cache, write_reference

NIGHT1 = {"DATE-OBS": "2025-03-01", "TIME-OBS": "05:00:00"}
NIGHT2 = {"DATE-OBS": "2025-07-01", "TIME-OBS": "05:00:00"}


def _refuse_network(*args, **kwargs):
    raise AssertionError(f"network access attempted: {args!r}")


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Every calib test runs with sockets unable to connect or resolve."""
    monkeypatch.setattr(socket.socket, "connect", _refuse_network)
    monkeypatch.setattr(socket.socket, "connect_ex", _refuse_network)
    monkeypatch.setattr(socket, "create_connection", _refuse_network)
    monkeypatch.setattr(socket, "getaddrinfo", _refuse_network)


@pytest.fixture
def calib(tmp_path):
    with temporary_cache(tmp_path / "crds") as module:
        yield module


def dataset(**kw):
    header = {"INSTRUME": "IRIS", "DETECTOR": "IMG1", "READPATT": "UTR10", "FILTER": "Kbb",
              "IFSMODE": "N/A", **NIGHT2}
    header.update(kw)
    return header


def dark(tmp_path, name, useafter="2025-01-01T00:00:00", detector="IMG1", readpatt="UTR10"):
    return write_reference(tmp_path / name, "dark", useafter, DETECTOR=detector, READPATT=readpatt)


# --------------------------------------------------------------------------- bootstrap


def test_bootstrap_creates_checksummed_empty_context(calib, tmp_path):
    root = tmp_path / "crds"
    assert calib.list_contexts() == ["tmt_0000.pmap"]
    assert calib.operational_context() == "tmt_0000.pmap"
    names = calib_cache.verify_context("tmt_0000.pmap")  # every sha1sum checked by crds
    assert "tmt_iris_0000.imap" in names
    for reftype in ("mask", "saturation", "linearity", "readnoise", "gain", "dark", "flat"):
        assert f"tmt_iris_{reftype}_0000.rmap" in names
    assert (root / "config" / "tmt" / "server_config").is_file()
    assert os.environ["CRDS_MODE"] == "local"
    assert os.environ["CRDS_OBSERVATORY"] == "tmt"
    assert os.environ["CRDS_PATH"] == str(root)
    # idempotent: a second configure neither rewrites nor adds anything
    before = sorted(os.listdir(root / "mappings" / "tmt"))
    calib.configure(root)
    assert sorted(os.listdir(root / "mappings" / "tmt")) == before
    assert [e["event"] for e in calib.context_history()] == ["bootstrap"]
    # an empty rule says so, naming the rmap
    with pytest.raises(calib.ReferenceMissingError, match="tmt_iris_gain_0000.rmap"):
        calib.get_reference(dataset(), "gain")


def test_cache_path_with_capital_letters(tmp_path):
    # crds lower-cases CRDS_CONFIG_URI; a cache path with capitals must still be found.
    root = tmp_path / "Run-20261124T004312" / "CRDS"
    with temporary_cache(root) as calib:
        published = calib.publish_references([dark(tmp_path, "d.fits")], "dark")
        params = dataset()
        found = crds.getreferences(params, reftypes=["dark"], observatory="tmt")["dark"]
        assert found.startswith(str(root)) and os.path.isfile(found)
        from stpipe import crds_client

        assert crds_client.get_context_used("tmt") == published
        assert os.environ["CRDS_CONFIG_URI"] == str(root / "config" / "tmt")


def test_rmap_text_is_crds_syntax(calib, tmp_path):
    text = (tmp_path / "crds" / "mappings" / "tmt" / "tmt_iris_flat_0000.rmap").read_text()
    assert "'parkey' : (('DETECTOR', 'FILTER', 'IFSMODE'), ('DATE-OBS', 'TIME-OBS'))" in text
    assert "'classes' : ('Match', 'UseAfter')" in text
    assert "'sha1sum' : '" in text and "selector = Match({" in text


# --------------------------------------------------------------------------- selection


def test_useafter_picks_by_date(calib, tmp_path):
    early = dark(tmp_path, "early.fits", "2025-01-01T00:00:00")
    late = dark(tmp_path, "late.fits", "2025-06-01T12:00:00")
    calib.publish_references([early, late], "two darks")
    first = calib.get_reference(dataset(**NIGHT1), "dark")
    second = calib.get_reference(dataset(**NIGHT2), "dark")
    assert fits.getval(first, "USEAFTER") == "2025-01-01T00:00:00"
    assert fits.getval(second, "USEAFTER") == "2025-06-01T12:00:00"
    # time of day counts: just before the second USEAFTER still gets the first dark
    edge = calib.get_reference(dataset(**{"DATE-OBS": "2025-06-01", "TIME-OBS": "11:59:59"}), "dark")
    assert edge == first
    # ISO DATE-OBS without TIME-OBS is split for UseAfter
    iso = dict(dataset(), **{"DATE-OBS": "2025-06-01T12:00:01"})
    del iso["TIME-OBS"]
    assert calib.get_reference(iso, "dark") == second
    with pytest.raises(calib.ReferenceMissingError, match="DATE-OBS='2024-12-31'"):
        calib.get_reference(dataset(**{"DATE-OBS": "2024-12-31"}), "dark")


def test_match_on_keywords_with_na_fallback(calib, tmp_path):
    files = [
        dark(tmp_path, "utr10.fits", readpatt="UTR10"),
        dark(tmp_path, "cds2.fits", readpatt="CDS2"),
        dark(tmp_path, "img2.fits", detector="IMG2", readpatt="UTR10"),
        write_reference(tmp_path / "kbb.fits", "flat", DETECTOR="IMG1", FILTER="Kbb", IFSMODE="N/A"),
        write_reference(tmp_path / "any.fits", "flat", DETECTOR="IMG1", FILTER="N/A", IFSMODE="N/A"),
        write_reference(tmp_path / "lens.fits", "flat", DETECTOR="IFS", FILTER="Kbb", IFSMODE="LENSLET"),
        write_reference(tmp_path / "gain.fits", "gain", DETECTOR="N/A"),
    ]
    calib.publish_references(files, "match test")

    def source(path):
        return {e["name"]: os.path.basename(e["source"]) for ev in calib.context_history()
                for e in ev.get("references", [])}[os.path.basename(path)]

    assert source(calib.get_reference(dataset(READPATT="UTR10"), "dark")) == "utr10.fits"
    assert source(calib.get_reference(dataset(READPATT="CDS2"), "dark")) == "cds2.fits"
    assert source(calib.get_reference(dataset(DETECTOR="IMG2"), "dark")) == "img2.fits"
    # exact FILTER beats the N/A fallback; matching is case-insensitive (CRDS upper-cases)
    assert source(calib.get_reference(dataset(FILTER="Kbb"), "flat")) == "kbb.fits"
    assert source(calib.get_reference(dataset(FILTER="KBB"), "flat")) == "kbb.fits"
    assert source(calib.get_reference(dataset(FILTER="Hbb"), "flat")) == "any.fits"
    assert source(calib.get_reference(dataset(DETECTOR="IFS", IFSMODE="LENSLET"), "flat")) == "lens.fits"
    # DETECTOR='N/A' gain applies to every detector
    assert source(calib.get_reference(dataset(DETECTOR="IMG4"), "gain")) == "gain.fits"
    assert calib.verify_cache() == []
    text = calib.show()
    assert "DETECTOR=IMG1 FILTER=N/A IFSMODE=N/A" in text and "DETECTOR=N/A" in text
    refs = calib.get_references(dataset(), ["dark", "flat", "gain"])
    assert set(refs) == {"dark", "flat", "gain"}
    assert all(os.path.dirname(p).endswith(os.path.join("references", "tmt", "iris")) for p in refs.values())


def test_missing_match_error_names_keywords_and_rmap(calib, tmp_path):
    calib.publish_references([dark(tmp_path, "d.fits")], "one dark")
    with pytest.raises(calib.ReferenceMissingError) as err:
        calib.get_reference(dataset(DETECTOR="IMG3", READPATT="MCDS4"), "dark")
    message = str(err.value)
    for part in ("DETECTOR='IMG3'", "READPATT='MCDS4'", "DATE-OBS='2025-07-01'",
                 "TIME-OBS='05:00:00'", "tmt_iris_dark_0001.rmap", "tmt_0001.pmap"):
        assert part in message
    with pytest.raises(calib.ReferenceMissingError, match="unknown IRIS reference type 'bias'"):
        calib.get_reference(dataset(), "bias")


def test_dataset_parameters_accepts_astropy_header(calib):
    header = fits.Header()
    header["INSTRUME"] = "IRIS"
    header["DETECTOR"] = "IMG1"
    header["NUMREADS"] = 10
    header["DATE-OBS"] = "2025-07-01T05:00:00.5"
    params = calib.dataset_parameters(header)
    assert params["DATE-OBS"] == "2025-07-01" and params["TIME-OBS"] == "05:00:00.5"
    assert params["NUMREADS"] == 10


# --------------------------------------------------------------------------- publish + contexts


def test_publish_versions_and_reproducible_old_context(calib, tmp_path):
    c1 = calib.publish_references([dark(tmp_path, "v1.fits", "2025-01-01T00:00:00")], "dark v1",
                                  author="ops")
    assert c1 == "tmt_0001.pmap"
    old_ref = calib.get_reference(dataset(), "dark")
    # a newer dark with a later USEAFTER takes over for new data
    c2 = calib.publish_references([dark(tmp_path, "v2.fits", "2025-05-01T00:00:00")], "dark v2")
    assert c2 == "tmt_0002.pmap"
    assert calib.list_contexts() == ["tmt_0000.pmap", "tmt_0001.pmap", "tmt_0002.pmap"]
    assert calib.operational_context() == c2 == calib.newest_context()
    new_ref = calib.get_reference(dataset(), "dark")
    assert new_ref != old_ref
    # explicit old context reproduces the old result; symbolic names work
    assert calib.get_reference(dataset(), "dark", context=c1) == old_ref
    assert calib.get_reference(dataset(), "dark", context="tmt_0001") == old_ref
    assert calib.get_reference(dataset(), "dark", context="tmt-operational") == new_ref
    assert calib.resolve_context("tmt-latest") == c2  # CRDS: "latest" is the operational one
    assert calib.references_changed(dataset(), c1, c2, ["dark", "flat"]) == {
        "dark": (os.path.basename(old_ref), os.path.basename(new_ref))
    }
    assert calib.references_changed(dataset(**NIGHT1), c1, c2, ["dark"]) == {}
    assert calib.references_changed(dataset(), "tmt_0000.pmap", c1, ["dark"]) == {
        "dark": (None, os.path.basename(old_ref))
    }
    # mappings carry derivation and description; every context still verifies
    info = calib.describe_context(c2)
    assert info["derived_from"] == c1 and info["description"] == "dark v2" and info["newest"]
    assert [r["useafter"] for r in info["reftypes"]["dark"]["rules"]] == [
        "2025-01-01 00:00:00", "2025-05-01 00:00:00"]
    assert calib.verify_cache() == []
    events = calib.context_history()
    assert [e["event"] for e in events] == ["bootstrap", "publish", "publish"]
    assert events[1]["author"] == "ops" and events[1]["references"][0]["sha1"]
    assert calib.operational_at(events[1]["time"]) == c1
    # published references are read-only in the cache
    assert os.stat(old_ref).st_mode & 0o777 == 0o444
    assert "dark v2" in calib.show(c2) and "tmt_0002.pmap" in calib.format_contexts()


def test_reftype_added_after_cache_creation(calib, tmp_path, monkeypatch):
    from iris_tasks.calib import crds_tmt, reftypes

    new = reftypes.RefType("skyflat", ("DETECTOR", "FILTER"), "Sky flat")
    monkeypatch.setitem(reftypes.REFTYPES, "skyflat", new)
    monkeypatch.setitem(crds_tmt.TEXT_DESCR, "skyflat", new.description)
    with pytest.raises(calib.ReferenceMissingError, match="no rule for reference type 'skyflat'"):
        calib.get_reference(dataset(), "skyflat")
    path = write_reference(tmp_path / "s.fits", "skyflat", DETECTOR="IMG1", FILTER="J")
    context = calib.publish_references([path], "first sky flat")
    rules = calib.describe_context(context)["reftypes"]["skyflat"]
    assert rules["rmap"] == "tmt_iris_skyflat_0000.rmap" and len(rules["rules"]) == 1
    assert calib.get_reference(dataset(FILTER="J"), "skyflat").endswith("tmt_iris_skyflat_0000.fits")


def test_publish_same_content_again_is_a_no_op(calib, tmp_path):
    path = dark(tmp_path, "d.fits")
    c1 = calib.publish_references([path], "first")
    assert calib.publish_references([path], "retry of the same task") == c1
    assert calib.list_contexts()[-1] == c1


def test_published_references_are_converted_for_the_steps(calib, tmp_path):
    """Publishing also fills the steps' native-byte-order cache, so the first frame after a
    new context does not convert the references itself; CRDS never sees that directory."""
    from iris_tasks.datamodels.io import native_cache_entry

    calib.publish_references([dark(tmp_path, "d.fits")], "night masters")
    (ref,) = calib_cache.references_dir().glob("tmt_iris_dark_*.fits")
    entry = native_cache_entry(ref, calib.native_cache_dir())
    assert (entry / "index.json").is_file() and list(entry.glob("hdu*.npy"))
    assert calib.native_cache_dir().parent == tmp_path / "crds"
    calib_cache.verify_context(calib.operational_context())


def test_dry_run_writes_nothing(calib, tmp_path):
    before = sorted(os.listdir(tmp_path / "crds" / "mappings" / "tmt"))
    name = calib.publish_references([dark(tmp_path, "d.fits")], "plan", dry_run=True)
    assert name == "tmt_0001.pmap"
    assert sorted(os.listdir(tmp_path / "crds" / "mappings" / "tmt")) == before
    assert os.listdir(tmp_path / "crds" / "references" / "tmt" / "iris") == []
    assert calib.operational_context() == "tmt_0000.pmap"


def test_publish_rejects_bad_reference_headers(calib, tmp_path):
    no_readpatt = write_reference(tmp_path / "bad.fits", "dark", DETECTOR="IMG1")
    with pytest.raises(calib.PublishError, match=r"bad\.fits.*READPATT missing"):
        calib.publish_references([no_readpatt], "bad")
    unknown = write_reference(tmp_path / "u.fits", "bias", DETECTOR="IMG1")
    with pytest.raises(calib.PublishError, match="REFTYPE=BIAS"):
        calib.publish_references([unknown], "bad")
    bad_date = write_reference(tmp_path / "t.fits", "gain", "yesterday", DETECTOR="IMG1")
    with pytest.raises(calib.PublishError, match="USEAFTER=yesterday"):
        calib.publish_references([bad_date], "bad")
    a, b = dark(tmp_path, "a.fits"), write_reference(tmp_path / "b.fits", "dark", DETECTOR="IMG1",
                                                     READPATT="UTR10", USEAFTER="2025-01-01T00:00:00")
    with pytest.raises(calib.PublishError, match="publish one of them"):
        calib.publish_references([a, b], "conflict")
    summed = tmp_path / "summed.fits"
    fits.HDUList([fits.PrimaryHDU(header=fits.getheader(a)),
                  fits.ImageHDU(np.ones((4, 4), np.float32), name="SCI")]).writeto(summed, checksum=True)
    damaged = bytearray(summed.read_bytes())
    damaged[-100] ^= 0xFF
    summed.write_bytes(bytes(damaged))
    with pytest.raises(calib.CorruptFileError, match="summed.fits: FITS checksum mismatch"):
        calib.publish_references([summed], "bad")
    garbage = tmp_path / "garbage.fits"
    garbage.write_bytes(b"not a fits file at all" * 10)
    with pytest.raises(calib.CorruptFileError, match="garbage.fits"):
        calib.publish_references([garbage], "bad")
    assert calib.list_contexts() == ["tmt_0000.pmap"]


def test_pin_and_unpin(calib, tmp_path):
    c1 = calib.publish_references([dark(tmp_path, "v1.fits", "2025-01-01T00:00:00")], "v1")
    c2 = calib.publish_references([dark(tmp_path, "v2.fits", "2025-05-01T00:00:00")], "v2")
    ref1 = calib.get_reference(dataset(), "dark", context=c1)
    ref2 = calib.get_reference(dataset(), "dark", context=c2)
    assert calib.set_operational_context(c1) == c1
    assert calib.operational_context() == c1 and calib.cache_status()["pinned"]
    assert calib.get_reference(dataset(), "dark") == ref1  # changing the context changes selection
    # crds itself (the stpipe path) follows the pointer too
    assert crds.getreferences(dataset(), reftypes=["dark"], observatory="tmt")["dark"] == ref1
    # publishing while pinned creates a context but leaves operations alone
    c3 = calib.publish_references([dark(tmp_path, "v3.fits", "2025-06-01T00:00:00")], "v3")
    assert calib.newest_context() == c3 and calib.operational_context() == c1
    assert calib.resolve_context("tmt-edit") == c3
    assert calib.unpin() == c3
    assert calib.operational_context() == c3 and not calib.cache_status()["pinned"]
    assert calib.get_reference(dataset(), "dark") not in (ref1, ref2)
    with pytest.raises(calib.ContextError, match="tmt_0042.pmap"):
        calib.set_operational_context("tmt_0042.pmap")
    with pytest.raises(calib.ContextError, match="not an IRIS context"):
        calib.get_reference(dataset(), "dark", context="jwst_0001.pmap")
    assert [e["event"] for e in calib.context_history()][-2:] == ["publish", "unpin"]


def test_crds_context_env_pins_one_process(calib, tmp_path, monkeypatch):
    c1 = calib.publish_references([dark(tmp_path, "v1.fits", "2025-01-01T00:00:00")], "v1")
    calib.publish_references([dark(tmp_path, "v2.fits", "2025-05-01T00:00:00")], "v2")
    monkeypatch.setenv("CRDS_CONTEXT", c1)
    assert calib.operational_context() == c1
    assert calib.get_reference(dataset(), "dark") == calib.get_reference(dataset(), "dark", c1)


# --------------------------------------------------------------------------- corruption + types


def test_corrupt_mapping_checksum_is_refused(calib, tmp_path):
    calib.publish_references([dark(tmp_path, "d.fits")], "dark")
    rmap_path = tmp_path / "crds" / "mappings" / "tmt" / "tmt_iris_dark_0001.rmap"
    rmap_path.write_text(rmap_path.read_text().replace("tmt_iris_dark_0000.fits",
                                                       "tmt_iris_dark_9999.fits"))
    crds_utils.clear_function_caches()  # forget the copy crds already verified in memory
    with pytest.raises(crexc.ChecksumError):  # crds itself refuses the file
        crds.get_cached_mapping("tmt_iris_dark_0001.rmap")
    with pytest.raises(calib.CorruptFileError, match=r"tmt_iris_dark_0001\.rmap.*checksum"):
        calib.get_reference(dataset(), "dark")
    with pytest.raises(calib.CorruptFileError, match="tmt_iris_dark_0001.rmap"):
        calib.set_operational_context("tmt_0001.pmap")
    assert any("tmt_iris_dark_0001.rmap" in p for p in calib.verify_cache())
    # ...and via the stpipe-style crds call, without going to the network
    with pytest.raises(crexc.CrdsError):
        crds.getreferences(dataset(), reftypes=["dark"], observatory="tmt")


def test_wrong_reftype_and_unreadable_reference(calib, tmp_path):
    calib.publish_references([dark(tmp_path, "d.fits")], "dark")
    cached = calib.get_reference(dataset(), "dark")
    os.chmod(cached, 0o644)
    write_reference(cached, "flat", DETECTOR="IMG1", FILTER="Kbb", IFSMODE="N/A")
    with pytest.raises(calib.WrongReftypeError, match=r"tmt_iris_dark_0000\.fits.*REFTYPE='FLAT'"):
        calib.get_reference(dataset(), "dark")
    with open(cached, "wb") as handle:
        handle.write(b"\0" * 100)
    with pytest.raises(calib.CorruptFileError, match="tmt_iris_dark_0000.fits"):
        calib.get_reference(dataset(), "dark")
    os.remove(cached)
    with pytest.raises(calib.ReferenceMissingError, match="tmt_iris_dark_0000.fits.*missing"):
        calib.get_reference(dataset(), "dark")
    # overrides supplied by a user get the same check
    flat = write_reference(tmp_path / "f.fits", "flat", DETECTOR="IMG1", FILTER="J", IFSMODE="N/A")
    with pytest.raises(calib.WrongReftypeError, match="f.fits"):
        calib.check_reference(flat, "dark")
    assert calib.check_reference(flat, "flat") == str(flat)


# --------------------------------------------------------------------------- crds / stpipe / network


def test_stpipe_style_crds_calls(calib, tmp_path):
    from stpipe import crds_client

    c1 = calib.publish_references([dark(tmp_path, "d.fits")], "dark")
    expected = calib.get_reference(dataset(), "dark")
    params = dataset()
    # exactly what stpipe's crds_client does
    assert crds.getreferences(params, reftypes=["dark"], observatory="tmt") == {"dark": expected}
    assert crds_client.get_multiple_reference_paths(params, ["dark"], "tmt") == {"dark": expected}
    assert crds_client.get_context_used("tmt") == c1
    uri = "crds://" + os.path.basename(expected)
    assert crds_client.reference_uri_to_cache_path(uri, "tmt") == expected
    # a context published in this process is seen by the next crds call
    c2 = calib.publish_references([dark(tmp_path, "d2.fits", "2025-05-01T00:00:00")], "dark 2")
    newer = crds.getreferences(params, reftypes=["dark"], observatory="tmt")["dark"]
    assert newer != expected and crds_client.get_context_used("tmt") == c2


def test_stpipe_step_get_reference_file(calib, tmp_path):
    from stpipe import Step

    class FakeMeta:
        filename = "iris_raw.fits"

    class FakeModel:
        """Just enough of a DataModel for stpipe (its AbstractDataModel duck type)."""

        meta = FakeMeta()
        crds_observatory = "tmt"

        def get_crds_parameters(self):
            return dataset()

        def save(self, path, dir_path=None, *args, **kwargs):
            return path

    class DarkStep(Step):
        spec = "output_ext = string(default='.fits')"
        reference_file_types = ["dark"]

        def process(self, model):
            return self.get_reference_file(model, "dark")

    calib.publish_references([dark(tmp_path, "d.fits")], "dark")
    step = DarkStep()
    assert step.get_reference_file(FakeModel(), "dark") == calib.get_reference(dataset(), "dark")
    # step-parameter references ("pars-darkstep") are switched off by configure()
    assert os.environ["STPIPE_DISABLE_CRDS_STEPPARS"] == "true"
    assert dict(DarkStep.get_config_from_reference(FakeModel())) == {}


def test_no_network_even_when_a_mapping_is_missing(calib, tmp_path):
    calib.publish_references([dark(tmp_path, "d.fits")], "dark")
    (tmp_path / "crds" / "mappings" / "tmt" / "tmt_iris_dark_0001.rmap").unlink()
    crds_utils.clear_function_caches()
    with pytest.raises(calib.CorruptFileError, match="missing from the cache"):
        calib.get_reference(dataset(), "dark")
    # crds would normally try to download the missing rmap from its server: refused offline
    with pytest.raises(crexc.CrdsError):
        crds.getreferences(dataset(), reftypes=["dark"], observatory="tmt")
    assert os.environ["CRDS_SERVER_URL"] == calib.OFFLINE_SERVER_URL


# --------------------------------------------------------------------------- CLI


def test_cli_commands(calib, tmp_path, capsys):
    from iris_tasks.calib.cli import main

    root = str(tmp_path / "crds")
    path = dark(tmp_path, "d.fits")
    raw = tmp_path / "raw.fits"
    fits.PrimaryHDU(header=fits.Header(list(dataset().items()))).writeto(raw)
    assert main(["--cache", root, "publish", str(path), "-m", "cli dark", "--author", "me"]) == 0
    assert "published tmt_0001.pmap" in capsys.readouterr().out
    assert main(["--cache", root, "publish", str(path), "-m", "again"]) == 0
    assert "nothing new" in capsys.readouterr().out
    assert main(["--cache", root, "list"]) == 0
    assert "cli dark" in capsys.readouterr().out
    assert main(["--cache", root, "bestref", str(raw), "-t", "dark"]) == 0
    assert "tmt_iris_dark_0000.fits" in capsys.readouterr().out
    assert main(["--cache", root, "bestref", str(raw), "-t", "flat"]) == 2
    assert main(["--cache", root, "diff", "tmt_0000", "tmt_0001", str(raw), "-t", "dark"]) == 0
    assert "(none) -> tmt_iris_dark_0000.fits" in capsys.readouterr().out
    assert main(["--cache", root, "pin", "tmt_0000"]) == 0
    assert main(["--cache", root, "show"]) == 0
    assert "tmt_0000.pmap  [operational, pinned]" in capsys.readouterr().out
    assert main(["--cache", root, "unpin"]) == 0
    assert main(["--cache", root, "verify"]) == 0
    assert main(["--cache", root, "history"]) == 0
    assert "unpin" in capsys.readouterr().out
    assert main(["--cache", root, "show", "tmt_0099"]) == 1
    assert "tmt_0099.pmap is not in the cache" in capsys.readouterr().err
