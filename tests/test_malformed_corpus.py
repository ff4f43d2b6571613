"""The malformed-input corpus (tests/malformed_corpus.py) through validate_file, ``iris-drs
info`` and the whole real-time chain without a scheduler.

Every "quarantine" case must be rejected by :func:`iris_tasks.metadata.validate_file` with
its reason among the problems, and ``iris-drs info`` must say the same (exit 2, the file and
the problem named, no traceback); good frames validate. The chain test lands the corpus the
way the landing scan sees it and checks every frame's terminal state in the ledger, the
quarantine reasons, and that good frames (odd names included) end ``done`` with their raw
archived.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from malformed_corpus import NIGHT, CorpusCase, write_corpus

from iris_tasks import metadata as md

SIZE = 64
NREADS = 4
SEED = 20261120


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[CorpusCase]]:
    directory = tmp_path_factory.mktemp("corpus") / "landing"
    return directory, write_corpus(directory, size=SIZE, nreads=NREADS, seed=SEED)


def _of(cases: list[CorpusCase], expected: str) -> list[CorpusCase]:
    return [c for c in cases if c.expected == expected]


def _problem_lines(exc: md.MetadataError) -> list[str]:
    return [f"{k}: {m}" for k, m in exc.problems]


def test_corpus_covers_the_classes(corpus):
    directory, cases = corpus
    assert len(cases) >= 30
    assert {c.expected for c in cases} == {"quarantine", "ignored", "duplicate", "done"}
    assert len({c.relpath for c in cases}) == len(cases)
    for c in cases:
        path = c.path(directory)
        assert path.is_symlink() or path.is_file(), c
        assert (c.expected == "quarantine") == bool(c.reason), c
    names = {c.name for c in _of(cases, "quarantine")}
    assert {"empty", "truncated_in_data", "missing_asdf", "invalid_card_value",
            "non_ascii_header", "float32_reads", "all_zero", "reversed_reads",
            "all_saturated", "date_1999"} <= names
    assert any(not c.relpath.isascii() for c in _of(cases, "done"))
    assert any(" " in c.relpath for c in _of(cases, "done"))


def test_validate_file_verdicts(corpus):
    directory, cases = corpus
    wrong = []
    for c in cases:
        if c.expected == "ignored":
            continue
        path = c.path(directory)
        try:
            recipe = md.validate_file(path)
        except md.MetadataError as exc:
            lines = _problem_lines(exc)
            if c.expected != "quarantine":
                wrong.append(f"{c.name}: expected valid, got {lines}")
            elif not any(c.reason in line for line in lines):
                wrong.append(f"{c.name}: {c.reason!r} not in {lines}")
            elif not str(exc).startswith(f"{path}: "):
                wrong.append(f"{c.name}: message does not name the file: {exc}")
        else:
            if c.expected == "quarantine":
                wrong.append(f"{c.name}: expected a quarantine ({c.reason}), validated as "
                             f"{recipe.obsname}")
    assert not wrong, "\n".join(wrong)


def test_qa_warning_does_not_stop_a_frame(corpus):
    directory, cases = corpus
    case = next(c for c in cases if c.name == "trailing_garbage")
    verdict = md.inspect_file(case.path(directory))
    assert verdict.recipe.obsname == "IMG1-SCI"
    assert any("after the last HDU" in m for _, m in verdict.warnings)
    assert verdict.stats["sample_pixels"] == (SIZE - 8) ** 2


def test_info_gives_the_same_verdict(corpus, capsys):
    from iris_tasks.cli import main

    directory, cases = corpus
    wrong = []
    for c in cases:
        if c.expected == "ignored":
            continue
        path = str(c.path(directory))
        rc = main(["info", path])
        out, err = capsys.readouterr()
        text = out + err
        if "Traceback" in text:
            wrong.append(f"{c.name}: traceback\n{text}")
        if c.expected == "quarantine":
            if rc != 2 or path not in err or c.reason not in out or c.reason not in err:
                wrong.append(f"{c.name}: rc={rc}, expected 2 naming {path} and {c.reason!r}:\n{text}")
        elif rc != 0 or "valid     = yes" not in out:
            wrong.append(f"{c.name}: rc={rc}, expected a valid frame:\n{text}")
    assert not wrong, "\n".join(wrong)
    # --json carries the same problems.
    truncated = next(c for c in cases if c.name == "truncated_in_data")
    assert main(["info", "--json", str(truncated.path(directory))]) == 2
    info = json.loads(capsys.readouterr().out)
    assert info["valid"] is False and any("truncated" in p for p in info["problems"])
    assert info["extensions"] == [["PRIMARY", []], ["SCI", [1, NREADS, SIZE, SIZE]]]


def test_info_as_a_command(corpus):
    directory, cases = corpus
    by_name = {c.name: c for c in cases}
    files = [str(by_name[n].path(directory)) for n in ("good_science", "truncated_in_data",
                                                       "float32_reads")]
    proc = subprocess.run([sys.executable, "-m", "iris_tasks.cli", "info", *files],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc
    assert "Traceback" not in proc.stdout + proc.stderr
    assert f"iris-drs info: {files[1]}: invalid: FILE: truncated: HDU 1 (SCI)" in proc.stderr
    assert f"iris-drs info: {files[2]}: invalid: SCI: data type float32" in proc.stderr
    assert files[0] not in proc.stderr and "valid     = yes" in proc.stdout
    missing = subprocess.run([sys.executable, "-m", "iris_tasks.cli", "info",
                              str(directory / "no-such-file.fits")],
                             capture_output=True, text=True, timeout=300)
    assert missing.returncode == 2 and "No such file" in missing.stderr
    assert "Traceback" not in missing.stdout + missing.stderr


def test_realtime_chain_on_the_corpus(corpus, tmp_path, monkeypatch):
    """The corpus landed in one burst, as the landing scan sees it, through the real-time
    chain without a scheduler (process_paths): every frame ends in its expected state."""
    from iris_tasks.calib.testing import temporary_cache
    from iris_tasks.config import settings
    from iris_tasks.orchestration.landing import survey_directory
    from iris_tasks.orchestration.ledger import FrameLedger
    from iris_tasks.orchestration.local_run import process_paths
    from iris_tasks.simulate import write_reference_files
    from iris_tasks.storage import open_store, product_key
    from iris_tasks.storage.keys import key_filename

    directory, cases = corpus
    monkeypatch.setenv("IRIS_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("IRIS_LANDING", str(tmp_path / "landing"))
    monkeypatch.setenv("IRIS_STORE_URL", (tmp_path / "store").as_uri())
    monkeypatch.delenv("IRIS_ALERT_WEBHOOK", raising=False)
    cfg = settings()

    # What the landing scan would claim (settled and stale at once: the files are complete or
    # will never be): exactly the non-ignored files; sub-directory, symlink and compressed
    # frame are reported as ignored, hidden and partial files are a writer's in-flight names.
    survey = survey_directory(directory, settle_seconds=0.0, stale_seconds=0.0)
    claimable = {e.name for e in survey.ready} | {e.name for e, _ in survey.waiting}
    reported = {e.name for e in survey.ignored}
    for c in cases:
        assert (c.relpath in claimable) == (c.expected != "ignored"), c
    assert reported == {"compressed_good.fits.gz", "subdir", "symlink_to_good_flat.fits"}
    landed = [c for c in cases if c.expected != "ignored"]

    refs = write_reference_files(tmp_path / "refs", ["IMG1"], size=SIZE, seed=SEED,
                                 readpatts=(f"UTR{NREADS}",), imager_filters=("Ks",))
    with temporary_cache(tmp_path / "crds") as calib:
        calib.publish_references([str(p) for p in refs], "corpus references")
        results = process_paths([str(c.path(directory)) for c in landed], cfg=cfg)

    by_file = {r["filename"]: r for r in results}
    assert len(results) == len(landed)
    ledger = FrameLedger(cfg.ledger_path)
    store = open_store(cfg.store_url)
    wrong = []
    for c in landed:
        result = by_file[Path(c.relpath).name]
        status = result["status"]
        if c.expected == "quarantine":
            row = ledger.frame(result["frame_id"])
            reasons = list(cfg.quarantine_dir.glob(f"*/{result['frame_id']}/reason.json"))
            if status != "quarantined" or row["status"] != "quarantined" or len(reasons) != 1:
                wrong.append(f"{c.name}: {status}/{row['status']}, {len(reasons)} reason files")
                continue
            doc = json.loads(reasons[0].read_text())
            lines = [f"{p['keyword']}: {p['message']}" for p in doc["problems"]]
            if not any(c.reason in line for line in lines):
                wrong.append(f"{c.name}: {c.reason!r} not in reason.json {lines}")
            if not (reasons[0].parent / Path(c.relpath).name).is_file():
                wrong.append(f"{c.name}: raw file not kept beside reason.json")
        elif c.expected == "duplicate":
            original = by_file["good_science_0004.fits"]
            if status != "duplicate" or result["frame_id"] != original["frame_id"]:
                wrong.append(f"{c.name}: {status}, frame {result.get('frame_id')}")
        else:  # done
            if status != "done":
                row = ledger.frame(result["frame_id"]) if result.get("frame_id") else {}
                wrong.append(f"{c.name}: {status} ({row.get('error')})")
                continue
            products = {p["kind"]: p for p in ledger.products(result["frame_id"])}
            raw = products.get("raw")
            name = Path(c.relpath).name
            expected_key = product_key(NIGHT, "IMG1", result["obsname"], name, "raw")
            if "rate" not in products:
                wrong.append(f"{c.name}: no rate product ({sorted(products)})")
            if raw is None or raw["key"] != expected_key or not store.exists(raw["key"]):
                wrong.append(f"{c.name}: raw not archived as {expected_key} ({raw})")
            elif Path(raw["key"]).name != key_filename(name):
                wrong.append(f"{c.name}: key name {raw['key']}")
            if ledger.frame(result["frame_id"])["filename"] != name:
                wrong.append(f"{c.name}: the ledger lost the original name")
    assert not wrong, "\n".join(wrong)
    statuses = {f["status"] for f in ledger.frames()}
    assert statuses <= {"done", "quarantined"}, statuses
