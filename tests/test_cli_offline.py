"""The offline ``iris-drs`` CLI works on its own state and never touches the stack's.

The README flow (simulate, info, calib publish, readout, reduce, masters --publish, calib list,
process-frame, lineage, strun) runs as separate ``iris-drs`` processes in a shell whose
``IRIS_*`` variables name a fake operational state (as after ``eval "$(iris-drs airflow-env)"``);
that state, populated first through ``--operational``, must be byte-for-byte the same after
the flow. ``lineage`` must tell apart two products with the same file name.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from astropy.io import fits

IRIS_DRS = [sys.executable, "-m", "iris_tasks.cli"]
NIGHT = "2026-11-23"
SCI1 = f"{NIGHT}_IMG1_IMG1-SCI_0001"
SCI2 = f"{NIGHT}_IMG1_IMG1-SCI_0002"


def _env(tmp: Path, **extra: str) -> dict[str, str]:
    """A shell environment whose IRIS_* name the fake operational state ``tmp/op``."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("IRIS_", "CRDS_", "XDG_STATE_HOME"))}
    op = tmp / "op"
    env.update({
        "IRIS_STATE_DIR": str(op),
        "IRIS_CRDS_PATH": str(op / "crds"),
        "IRIS_STORE_URL": (op / "store").as_uri(),
        "IRIS_LANDING": str(op / "landing"),
        "IRIS_COMPUTE_SOCKET": "off",
        "XDG_STATE_HOME": str(tmp / "xdg"),  # the CLI's default state: <XDG_STATE_HOME>/iris-drs
        "MPLBACKEND": "Agg",
        "OMP_NUM_THREADS": "1",
    })
    env.update(extra)
    return env


def _run(env: dict[str, str], *args: str, rc: int = 0, cwd: Path | None = None
         ) -> subprocess.CompletedProcess:
    proc = subprocess.run([*IRIS_DRS, *args], env=env, capture_output=True, text=True, cwd=cwd,
                          timeout=300)
    assert proc.returncode == rc, f"{args}: rc {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


def _banner(proc: subprocess.CompletedProcess) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.startswith("iris-drs: ")]
    assert len(lines) == 1, proc.stderr
    return lines[0]


def _snapshot(root: Path) -> dict[str, tuple[str, int]]:
    """Every file under ``root``: (sha256, mtime_ns)."""
    out = {}
    for path in sorted(root.rglob("*")):
        if path.is_file():
            out[str(path.relative_to(root))] = (hashlib.sha256(path.read_bytes()).hexdigest(),
                                                path.stat().st_mtime_ns)
    return out


def _simulate(env: dict[str, str], out: Path, seed: int) -> None:
    _run(env, "simulate", "night", "--out", str(out), "--size", "64", "--detectors", "IMG1",
         "--night", NIGHT, "--seed", str(seed), "--darks", "3", "--flats", "3", "--sky", "1",
         "--science", "2")


@pytest.mark.slow
def test_readme_flow_keeps_the_operational_state_untouched(tmp_path):
    env = _env(tmp_path)
    op, cli = tmp_path / "op", tmp_path / "xdg" / "iris-drs"
    night_a, night_b = tmp_path / "night_a", tmp_path / "night_b"
    _simulate(env, night_a, seed=0)
    _simulate(env, night_b, seed=1)  # the same file names, other content
    assert (night_a / "raw" / f"{SCI1}.fits").is_file()
    assert (night_b / "raw" / f"{SCI1}.fits").is_file()

    # The operational state, made through --operational: that flag does act on it.
    refs_b = sorted(str(p) for p in (night_b / "references").glob("*.fits"))
    proc = _run(env, "--operational", "calib", "publish", *refs_b, "-m", "operations")
    assert "OPERATIONAL" in _banner(proc) and str(op / "crds") in _banner(proc)
    assert f"published tmt_0001.pmap in {op / 'crds'}" in proc.stdout
    proc = _run(env, "process-frame", "--operational", str(night_b / "raw" / f"{SCI2}.fits"))
    assert ": done" in proc.stdout and (op / "ledger.sqlite").is_file()
    assert list((op / "store").rglob(f"{SCI2}_cal.fits"))
    assert list((op / "lineage").glob("ol-*.json"))
    before = _snapshot(op)
    assert any(k.startswith("crds/") for k in before) and "ledger.sqlite" in before

    # --- the README flow, no flag: the CLI's own state --------------------------------------
    proc = _run(env, "info", str(night_a / "raw" / f"{SCI1}.fits"))
    assert "valid     = yes" in proc.stdout and "iris-drs: " not in proc.stderr  # no state used

    raw1 = night_a / "raw" / f"{SCI1}.fits"
    out = tmp_path / "out"
    # An empty CLI cache: one clear line saying what to do, no traceback, no CRDS abort.
    proc = _run(env, "readout", str(raw1), "-o", str(out / "sci_rate.fits"), rc=1)
    banner = _banner(proc)
    assert banner.startswith(f"iris-drs: CLI state {cli} ") and f"IRIS_STATE_DIR={op}" in banner
    assert f"CRDS cache {cli / 'crds'}" in banner and f"ledger {cli / 'ledger.sqlite'}" in banner
    assert "--operational" in banner
    (error,) = [line for line in proc.stderr.splitlines() if "error" in line]
    assert error.startswith("iris-drs readout: error: the CRDS cache")
    assert "iris-drs calib publish" in error
    assert len(proc.stderr.strip().splitlines()) == 2  # the banner and the error, nothing else

    refs_a = sorted(str(p) for p in (night_a / "references").glob("*.fits"))
    proc = _run(env, "calib", "publish", *refs_a, "--description", "pre-night references")
    assert f"published tmt_0001.pmap in {cli / 'crds'}" in proc.stdout

    proc = _run(env, "readout", str(raw1), "-o", str(out / "sci_rate.fits"))  # no --context
    assert fits.getheader(out / "sci_rate.fits")["CRDS_CTX"] == "tmt_0001.pmap"

    proc = _run(env, "reduce", str(night_a / "raw"), "--out", str(out))
    cal1 = out / f"{SCI1}_cal.fits"
    assert str(cal1) in proc.stdout.split() and fits.getheader(cal1)["RAWFILE"] == f"{SCI1}.fits"

    proc = _run(env, "masters", str(night_a / "raw"), "--out", str(tmp_path / "masters"),
                "--publish")
    assert "CRDS context: tmt_0002.pmap" in proc.stdout and str(cli / "crds") in proc.stdout
    flat = next((tmp_path / "masters").glob("*_ks_*flat.fits"))

    proc = _run(env, "calib", "list")
    assert "tmt_0002.pmap    operational" in proc.stdout
    proc = _run(env, "--operational", "calib", "list")  # the stack's cache did not move
    assert "tmt_0001.pmap    operational" in proc.stdout and "tmt_0002" not in proc.stdout

    raw2 = night_a / "raw" / f"{SCI2}.fits"
    proc = _run(env, "process-frame", str(raw2), "--json")
    (result,) = json.loads(proc.stdout)
    assert result["status"] == "done", result
    assert all(url.startswith((cli / "store").as_uri()) for url in result["objects"].values())
    assert result["crds_context"] == "tmt_0002.pmap"

    # lineage: by content or header, never by name.
    b_out = tmp_path / "out_b"
    _run(env, "reduce", str(night_b / "raw" / f"{SCI1}.fits"), "--out", str(b_out))
    cal1_b = b_out / f"{SCI1}_cal.fits"
    assert cal1_b.name == cal1.name
    for product, own, other in ((cal1, night_a, night_b), (cal1_b, night_b, night_a)):
        got = json.loads(_run(env, "lineage", str(product), "--json").stdout)
        assert (own / "raw" / f"{SCI1}.fits").as_uri() in got["raw_frames"], got
        assert not any(str(other) in u for u in got["raw_frames"]), got
        # The operational process-frame of night B's SCI_0002 never shows up.
        assert not any(SCI2 in u for u in got["raw_frames"]), got
    # The real-time product copied elsewhere: found by its SHA-256 in the CLI ledger.
    copy = tmp_path / "copies" / f"{SCI2}_cal.fits"
    copy.parent.mkdir()
    shutil.copy(result["final_path"], copy)
    got = json.loads(_run(env, "lineage", str(copy), "--json").stdout)
    assert raw2.as_uri() in got["raw_frames"] and got["frames"][0]["frame_id"] == result["frame_id"]
    assert not any(str(night_b) in u for u in got["raw_frames"]), got
    # A path rewritten with another product: the older events of that path are not used.
    shutil.copy(cal1_b, cal1)
    got = json.loads(_run(env, "lineage", str(cal1), "--json").stdout)
    assert raw1.as_uri() not in got["raw_frames"]
    # ... its bytes are those of night B's product, whose reduce event names B's raw frame.
    assert (night_b / "raw" / f"{SCI1}.fits").as_uri() in got["raw_frames"], got
    assert got["warnings"] and "older than the file" in got["warnings"][0]
    # A bare name identifies nothing.
    proc = _run(env, "lineage", cal1.name, rc=3, cwd=tmp_path)
    assert "bare file name" in proc.stderr

    # strun with the CLI cache, no --crds_context; the override spelled as stpipe wants it.
    proc = _run(env, "strun", "iris_image2", str(out / "sci_rate.fits"),
                f"--steps.flat_field.override_flat={flat}", f"--output_dir={tmp_path / 'strun'}")
    header = fits.getheader(tmp_path / "strun" / "sci_cal.fits")
    assert header["CRDS_CTX"] == "tmt_0002.pmap" and flat.name in header["R_FLAT"]

    assert _snapshot(op) == before, "the CLI flow changed the operational state"
    assert not (op / "quarantine").exists() and (cli / "ledger.sqlite").is_file()


# -- quick checks, in-process ------------------------------------------------------------------
@pytest.fixture
def shell(tmp_path, monkeypatch):
    """A shell with the stack's IRIS_* set (as after ``eval "$(iris-drs airflow-env)"``)."""
    for key in list(os.environ):
        if key.startswith(("IRIS_", "XDG_STATE_HOME")):
            monkeypatch.delenv(key)
    op = tmp_path / "op"
    monkeypatch.setenv("IRIS_STATE_DIR", str(op))
    monkeypatch.setenv("IRIS_CRDS_PATH", str(op / "crds"))
    monkeypatch.setenv("IRIS_LEDGER_URL", "postgresql://drs:secret@127.0.0.1:1/ops")
    monkeypatch.setenv("IRIS_ALERT_WEBHOOK", "http://127.0.0.1:9/page-the-operators")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return op


def _main(capsys, *argv: str) -> tuple[int, str, str]:
    from iris_tasks.cli import main

    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_default_state_is_the_cli_own_and_the_environment_is_restored(shell, tmp_path, capsys):
    import iris_tasks.calib  # noqa: F401  (crds writes its defaults into os.environ at import)

    before = dict(os.environ)
    rc, out, err = _main(capsys, "calib", "init")
    cli = tmp_path / "home" / ".local" / "state" / "iris-drs"
    assert rc == 0 and json.loads(out)["cache_dir"] == str(cli / "crds")
    (banner,) = err.splitlines()
    assert banner.startswith(f"iris-drs: CLI state {cli} ") and f"IRIS_STATE_DIR={shell}" in banner
    assert "secret" not in banner and "page-the-operators" not in banner
    assert dict(os.environ) == before  # an in-process caller gets its environment back
    assert not shell.exists()


def test_state_flag_before_or_after_the_command_and_from_the_environment(shell, tmp_path, capsys,
                                                                          monkeypatch):
    for argv in (["--state", str(tmp_path / "a"), "calib", "init"],
                 ["calib", "--state", str(tmp_path / "a"), "init"],
                 ["calib", "init", "--state", str(tmp_path / "a")]):
        rc, out, _ = _main(capsys, *argv)
        assert rc == 0 and json.loads(out)["cache_dir"] == str(tmp_path / "a" / "crds"), argv
    monkeypatch.setenv("IRIS_CLI_STATE", str(tmp_path / "b"))
    rc, _, err = _main(capsys, "ledger", "--json")
    assert rc == 0 and f"ledger {tmp_path / 'b' / 'ledger.sqlite'}" in err
    assert f"store {(tmp_path / 'b' / 'store').as_uri()}" in err


def test_operational_uses_the_stack_configuration_with_the_password_masked(shell, capsys):
    from iris_tasks.cli import build_parser, resolve_state

    choice = resolve_state(build_parser().parse_args(["--operational", "ledger"]))
    assert choice.operational and choice.environment == {}
    assert choice.state_dir == str(shell) and choice.crds_cache == str(shell / "crds")
    assert "secret" not in choice.banner() and "drs:***@127.0.0.1:1/ops" in choice.banner()
    assert choice.banner().startswith("iris-drs: OPERATIONAL state")


def test_bad_flag_combinations_are_one_line_errors(shell, tmp_path, capsys):
    rc, _, err = _main(capsys, "--operational", "--state", str(tmp_path / "x"), "ledger")
    assert rc == 1 and err.strip() == (
        "iris-drs ledger: error: give either --state DIR or --operational, not both")
    rc, _, err = _main(capsys, "--state", str(tmp_path / "x"), "info", __file__)
    assert rc == 1 and "info takes no --state/--operational" in err
    assert not (tmp_path / "x").exists()


def _product(path: Path, rawfile: str) -> Path:
    import numpy as np

    path.parent.mkdir(parents=True, exist_ok=True)
    fits.HDUList([fits.PrimaryHDU(header=fits.Header({"RAWFILE": rawfile, "FILENAME": path.name,
                                                      "ORIGIN": str(path)})),
                  fits.ImageHDU(np.zeros((2, 2), np.float32), name="SCI")]).writeto(path)
    return path


def test_lineage_tells_apart_products_that_share_a_file_name(shell, tmp_path):
    """Two nights, the same product name: each reports its own raw frame; a copy is known by
    its content; a bare name matches nothing; a path rewritten since its events is not
    described by them."""
    from iris_tasks import lineage

    events = tmp_path / "lineage"
    name = "2026-11-23_IMG1_IMG1-SCI_0001"
    raws = {n: tmp_path / n / "raw" / f"{name}.fits" for n in ("a", "b")}
    cals = {n: _product(tmp_path / n / "out" / f"{name}_cal.fits", f"{name}.fits") for n in raws}
    for n in raws:
        lineage.write_event("iris-drs.reduce", [lineage.dataset_uri(raws[n])],
                            [lineage.dataset_uri(cals[n])], lineage_dir=events)
    for n, other in (("a", "b"), ("b", "a")):
        got = lineage.lineage_of(str(cals[n]), lineage_dir=events)
        assert got["raw_frames"] == [raws[n].as_uri()], got
        assert raws[other].as_uri() not in json.dumps(got)
    copy = tmp_path / "elsewhere" / cals["b"].name
    copy.parent.mkdir()
    shutil.copy(cals["b"], copy)
    got = lineage.lineage_of(str(copy), lineage_dir=events)
    assert got["raw_frames"] == [raws["b"].as_uri()] and "same content" in got["identified_by"][0]
    got = lineage.lineage_of(cals["a"].name, lineage_dir=events)
    assert got["raw_frames"] == [] and got["steps"] == [] and "bare file name" in got["warnings"][0]
    os.utime(cals["a"], (os.path.getmtime(cals["a"]) + 60,) * 2)  # rewritten after its event
    got = lineage.lineage_of(str(cals["a"]), lineage_dir=events)
    assert got["raw_frames"] == [f"{name}.fits"] and got["steps"] == []  # the header only
    assert "older than the file" in got["warnings"][0]


def test_lineage_drops_events_that_contradict_the_header(shell, tmp_path):
    from iris_tasks import lineage

    events = tmp_path / "lineage"
    cal = _product(tmp_path / "out" / "x_cal.fits", "x.fits")
    lineage.write_event("iris-drs.reduce", [lineage.dataset_uri(tmp_path / "raw" / "y.fits")],
                        [lineage.dataset_uri(cal)], lineage_dir=events)
    got = lineage.lineage_of(str(cal), lineage_dir=events)
    assert got["raw_frames"] == ["x.fits"] and "not the header's RAWFILE x.fits" in got["warnings"][0]
