"""The exception hierarchy (iris_tasks.errors), the retry policy keyed on it, and @iris_task."""

from __future__ import annotations

import subprocess
import sys

import pytest

from iris_tasks import errors
from iris_tasks.errors import (
    BadInputError,
    ConfigurationError,
    ConflictError,
    FrameSkipped,
    IrisError,
    ProcessingError,
    TransientError,
    is_retriable,
    is_skip,
)


def _classes():
    """(class, its category, the bases it had before the hierarchy) for every re-based class."""
    from iris_tasks import metadata, quicklook
    from iris_tasks.calib import errors as calib_errors
    from iris_tasks.datamodels import io
    from iris_tasks.ifs import sky_step
    from iris_tasks.masters import common as masters
    from iris_tasks.orchestration import nightly
    from iris_tasks.steps import assign_wcs_step, base, sky_sub_step
    from iris_tasks.storage import base as storage

    return [
        (metadata.MetadataError, BadInputError, ValueError),
        (io.IrisFileError, BadInputError, ValueError),
        (quicklook.QuicklookError, BadInputError, ValueError),
        (masters.MasterBuildError, BadInputError, ValueError),
        (assign_wcs_step.PointingError, BadInputError, ValueError),
        (sky_step.SkyCubeError, ProcessingError, ValueError),
        (sky_sub_step.SkyCalibrationError, ProcessingError, ValueError),
        (nightly.QAError, ProcessingError, RuntimeError),
        (base.ReferenceFileError, ConfigurationError, RuntimeError),
        (calib_errors.CalibrationError, ConfigurationError, Exception),
        (calib_errors.ReferenceMissingError, ConfigurationError, calib_errors.CalibrationError),
        (calib_errors.ContextError, ConfigurationError, calib_errors.CalibrationError),
        (calib_errors.CorruptFileError, ConfigurationError, calib_errors.CalibrationError),
        (storage.StorageError, TransientError, RuntimeError),
        (storage.ObjectNotFoundError, TransientError, storage.StorageError),
        (storage.ChecksumMismatchError, TransientError, storage.StorageError),
        (storage.ObjectConflictError, ConflictError, storage.StorageError),
    ]


def test_every_rebased_class_keeps_its_bases_and_gains_a_category():
    for cls, category, old_base in _classes():
        assert issubclass(cls, IrisError), cls
        assert issubclass(cls, category), (cls, category)
        assert issubclass(cls, old_base), f"{cls.__name__} lost its base {old_base.__name__}"
    # exactly one of the five categories, except the conflict that is also a storage error
    categories = (TransientError, BadInputError, ConfigurationError, ProcessingError, ConflictError)
    for cls, category, _ in _classes():
        held = [c.__name__ for c in categories if issubclass(cls, c)]
        expected = 2 if category is ConflictError else 1
        assert len(held) == expected, (cls.__name__, held)


def test_retriable_means_transient_without_a_vetoing_category():
    from iris_tasks.metadata import MetadataError
    from iris_tasks.storage.base import ChecksumMismatchError, ObjectConflictError, StorageError

    assert is_retriable(StorageError("k", "connection reset"))
    assert is_retriable(ChecksumMismatchError("k", "re-read differs"))
    assert not is_retriable(ObjectConflictError("k", "other bytes stored"))
    assert not is_retriable(MetadataError("f.fits", [("OBSNAME", "missing")]))
    assert not is_retriable(ConnectionError("builtin: judged by the policy, not here"))
    assert TransientError.retriable and not BadInputError.retriable


def test_nested_gives_the_wrapped_exception():
    try:
        try:
            raise OSError("disk")
        except OSError as exc:
            raise TransientError("store down") from exc
    except TransientError as err:
        assert isinstance(err.nested, OSError)
    try:
        try:
            raise KeyError("k")
        except KeyError:
            raise BadInputError("implicit chain")  # noqa: B904 - the implicit chain is the test
    except BadInputError as err:
        assert isinstance(err.nested, KeyError)
    assert BadInputError("alone").nested is None


def test_errors_module_imports_nothing_of_the_project_nor_airflow():
    code = ("import sys, iris_tasks.errors; "
            "print(sorted(m for m in sys.modules if m.startswith(('iris_tasks.', 'airflow'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "['iris_tasks.errors']"


# -- the DAG retry policy ------------------------------------------------------------------
class _FlakyService(TransientError):
    """A TransientError the policy has never heard of: matched through its base class."""


class _Weird(BadInputError):
    pass


def _decide(policy, exc):
    return policy.evaluate(exc, try_number=1, max_tries=5).action


@pytest.mark.parametrize("serialized", [False, True], ids=["as-defined", "deserialized"])
def test_storage_retry_policy_keys_on_the_categories(serialized):
    import botocore.exceptions
    from airflow.sdk import RetryAction
    from airflow.sdk.definitions.retry_policy import ExceptionRetryPolicy

    from iris_tasks.calib.errors import ReferenceMissingError
    from iris_tasks.metadata import MetadataError
    from iris_tasks.orchestration.dag_defaults import STORAGE_RETRY_POLICY
    from iris_tasks.orchestration.nightly import QAError
    from iris_tasks.storage.base import ChecksumMismatchError, ObjectConflictError, StorageError

    policy = STORAGE_RETRY_POLICY
    if serialized:  # what the scheduler stores and a worker may rebuild
        policy = ExceptionRetryPolicy.deserialize(policy.serialize())

    retry = [_FlakyService("s3 throttled"), StorageError("k", "503 Slow Down"),
             ChecksumMismatchError("k", "upload corrupted"), ConnectionError("reset"),
             TimeoutError("read timed out"),
             botocore.exceptions.EndpointConnectionError(endpoint_url="http://127.0.0.1:1")]
    for exc in retry:
        assert _decide(policy, exc) is RetryAction.RETRY, type(exc).__name__
        assert errors.is_retried(exc), type(exc).__name__  # the same rule, for the ledger

    qa_report = {"master": "m.fits", "metrics": {"rms": 9.0}, "thresholds": {"rms": "<= 3"},
                 "failed": ["rms"]}
    fail = [_Weird("bad"), MetadataError("f.fits", [("OBSNAME", "missing")]), ReferenceMissingError("no dark"),
            QAError(qa_report), ObjectConflictError("k", "other bytes"), FrameSkipped("q"),
            ValueError("a bug"), KeyError("a bug")]
    for exc in fail:
        assert _decide(policy, exc) is RetryAction.FAIL, type(exc).__name__
        assert not errors.is_retried(exc), type(exc).__name__


# -- @iris_task ----------------------------------------------------------------------------
def test_iris_task_keeps_the_callable_and_runs_lineage_label_and_skip(monkeypatch):
    import inspect

    from airflow.sdk.exceptions import AirflowSkipException

    from iris_tasks import lineage
    from iris_tasks.orchestration import dag_tasks

    calls: list[str] = []
    monkeypatch.setattr(lineage, "begin_task", lambda: calls.append("lineage"))
    monkeypatch.setattr(dag_tasks, "set_map_label", lambda v: calls.append(f"label {v['filename']}"))

    @dag_tasks.iris_task(label="frame", retries=0)
    def process(frame: dict, **context) -> dict:
        """Doc of process."""
        calls.append("body")
        if frame.get("skip"):
            raise FrameSkipped(f"{frame['filename']} quarantined")
        return {"ok": frame["filename"]}

    assert process.function.__name__ == "process"
    assert process.function.__doc__ == "Doc of process."
    assert list(inspect.signature(process.function).parameters) == ["frame", "context"]
    assert process.kwargs.get("map_index_template") == dag_tasks.MAP_LABEL

    assert process.function(frame={"filename": "a.fits"}) == {"ok": "a.fits"}
    assert calls == ["label a.fits", "lineage", "body"]
    with pytest.raises(AirflowSkipException, match="b.fits quarantined"):
        process.function({"filename": "b.fits", "skip": True})

    with pytest.raises(TypeError, match="no argument 'frame'"):
        @dag_tasks.iris_task(label="frame")
        def wrong(master: str) -> None:
            pass


def test_label_text():
    from iris_tasks.orchestration.dag_tasks import label_text

    assert label_text({"filename": "n1_0001.fits"}) == "n1_0001.fits"
    assert label_text({}) == "?"
    assert label_text("/state/masters/dark_2026.fits") == "dark_2026.fits"
    assert label_text(None) == "?"


# -- skips in the frame ledger -------------------------------------------------------------
def test_is_skip_knows_airflows_skip_and_ours():
    from airflow.sdk.exceptions import AirflowSkipException

    assert is_skip(FrameSkipped("quarantined"))
    assert is_skip(AirflowSkipException("nothing to do"))
    assert not is_skip(ValueError("AirflowSkipException"))

    class AirflowSkipExceptionLookalike(Exception):
        pass

    assert not is_skip(AirflowSkipExceptionLookalike())


def test_frame_stage_leaves_a_skipped_frame_alone_and_fails_a_failed_one(tmp_path):
    from iris_tasks.orchestration.common import frame_stage
    from iris_tasks.orchestration.ledger import FAILED, FrameLedger

    ledger = FrameLedger(tmp_path / "ledger.sqlite")
    ident = {"dag_id": "d", "run_id": "r", "try_number": 1, "task_id": None, "map_index": None}
    skipped, _ = ledger.claim(sha256="ab" * 32, filename="s.fits", source_uri="file:///s",
                              landed_at="2026-11-24T00:00:00+00:00")
    failed, _ = ledger.claim(sha256="cd" * 32, filename="f.fits", source_uri="file:///f",
                             landed_at="2026-11-24T00:00:00+00:00")

    with pytest.raises(FrameSkipped):
        with frame_stage(ledger, skipped["frame_id"], "process", ident=ident):
            raise FrameSkipped("quarantined")
    with pytest.raises(ProcessingError):
        with frame_stage(ledger, failed["frame_id"], "process", ident=ident):
            raise ProcessingError("fit did not converge")

    assert ledger.frame(skipped["frame_id"])["status"] == skipped["status"]
    row = ledger.frame(failed["frame_id"])
    assert row["status"] == FAILED and "ProcessingError: fit did not converge" in row["error"]


def test_frame_stage_keeps_a_frame_open_while_its_store_fault_is_retried(tmp_path):
    """A store fault the task will retry (tries left, a retried category) leaves the frame
    open with the fault as its error (it must not look failed while a retry may still store
    it); the last try's fault, a non-retried one, or an identity without max_tries fail it."""
    from iris_tasks.orchestration.common import frame_stage
    from iris_tasks.orchestration.ledger import FAILED, FrameLedger
    from iris_tasks.storage.base import StorageError

    ledger = FrameLedger(tmp_path / "ledger.sqlite")

    def frame(n: int) -> dict:
        row, _ = ledger.claim(sha256=f"{n:02d}" * 32, filename=f"f{n}.fits",
                              source_uri=f"file:///f{n}", landed_at="2026-11-24T00:00:00+00:00")
        return row

    def fail(row: dict, exc: Exception, **ident) -> dict:
        ident = {"dag_id": "d", "run_id": "r", "task_id": "frame", "map_index": 0, **ident}
        with pytest.raises(type(exc)):
            with frame_stage(ledger, row["frame_id"], "archive", ident=ident):
                raise exc
        return ledger.frame(row["frame_id"])

    outage = StorageError("raw/f.fits", "head failed: Could not connect to the endpoint URL")
    first = frame(1)
    row = fail(first, outage, try_number=1, max_tries=4)
    assert row["status"] == first["status"] != FAILED
    assert "archive: StorageError" in row["error"] and "try 1 of 5; retried" in row["error"]
    assert ledger.stages(first["frame_id"])[-1]["status"] == "failed"  # on the stage all the same
    assert fail(frame(2), outage, try_number=5, max_tries=4)["status"] == FAILED  # the last try
    assert fail(frame(3), outage, try_number=1)["status"] == FAILED  # no max_tries: as before
    bug = fail(frame(4), ValueError("a bug"), try_number=1, max_tries=4)
    assert bug["status"] == FAILED and "ValueError: a bug" in bug["error"]


def test_all_names_exported():
    assert set(errors.__all__) <= set(dir(errors))
