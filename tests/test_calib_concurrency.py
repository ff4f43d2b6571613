"""Concurrent publishers serialise on the cache lock and never corrupt the pointer."""

from __future__ import annotations

import multiprocessing as mp

import pytest

from iris_tasks.calib import cache as calib_cache
from iris_tasks.calib.testing import temporary_cache, write_reference


def _publish(root: str, path: str, barrier, results) -> None:
    from iris_tasks import calib

    calib.configure(root)
    barrier.wait(timeout=30)  # both processes enter publish together
    results.put(calib.publish_references([path], f"concurrent {path}"))


def test_two_processes_publish_at_once(tmp_path):
    root = tmp_path / "crds"
    with temporary_cache(root) as calib:
        paths = [
            write_reference(tmp_path / f"{patt}.fits", "dark", DETECTOR="IMG1", READPATT=patt)
            for patt in ("UTR10", "CDS2")
        ]
        ctx = mp.get_context("fork")
        barrier, results = ctx.Barrier(2), ctx.Queue()
        procs = [ctx.Process(target=_publish, args=(str(root), str(p), barrier, results))
                 for p in paths]
        for proc in procs:
            proc.start()
        for proc in procs:
            proc.join(timeout=60)
            assert proc.exitcode == 0
        made = sorted(results.get(timeout=5) for _ in procs)
        assert made == ["tmt_0001.pmap", "tmt_0002.pmap"]
        # the second publisher derived from the first: the operational context has both
        assert calib.operational_context() == "tmt_0002.pmap"
        rules = calib.describe_context()["reftypes"]["dark"]["rules"]
        assert sorted(r["match"]["READPATT"] for r in rules) == ["CDS2", "UTR10"]
        assert calib.verify_cache() == []
        events = [e for e in calib.context_history() if e["event"] == "publish"]
        assert [e["context"] for e in events] == made
        assert events[1]["derived_from"] == "tmt_0001.pmap"


def test_lock_timeout_is_reported(tmp_path, monkeypatch):
    with temporary_cache(tmp_path / "crds") as calib:
        path = write_reference(tmp_path / "d.fits", "dark", DETECTOR="IMG1", READPATT="UTR10")
        monkeypatch.setattr(calib_cache, "LOCK_TIMEOUT_S", 0.2)
        ctx = mp.get_context("fork")
        holding, release = ctx.Event(), ctx.Event()

        def hold() -> None:
            with calib_cache.locked("test holder"):
                holding.set()
                release.wait(timeout=30)

        holder = ctx.Process(target=hold)
        holder.start()
        try:
            assert holding.wait(timeout=30)
            with pytest.raises(calib.CalibrationError, match=r"timed out after 0.2 s .*iris_calib\.lock"):
                calib.publish_references([path], "blocked")
        finally:
            release.set()
            holder.join(timeout=30)
        assert calib.list_contexts() == ["tmt_0000.pmap"]
        assert calib.publish_references([path], "after release") == "tmt_0001.pmap"
