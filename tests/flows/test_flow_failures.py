"""Every flow ends its MLflow run FAILED on any exception, not only on a failed gate, and a flow
that cannot take the work directory says who holds it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import mlflow
from dicomops.config import IngestConfig
from dicomops.errors import WorkDirLockedError
from flows.ingest import ingest

pytestmark = pytest.mark.usefixtures("prefect_harness")


def _runs(uri: str, name: str) -> list[mlflow.entities.Run]:
    client = mlflow.tracking.MlflowClient(uri)
    experiment = client.get_experiment_by_name("dicomops")
    if experiment is None:
        return []
    return [r for r in client.search_runs([experiment.experiment_id]) if r.info.run_name == name]


def test_an_error_inside_ingest_ends_its_run_failed_and_leaves_no_record(
        clean_corpus: Path, mlflow_env: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from dicomops import ingest as library

    def disk_full(*args: object, **kwargs: object) -> Path:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(library, "validate_headers", disk_full)
    work = tmp_path / "work"
    with pytest.raises(OSError, match="No space left"):
        ingest(src=clean_corpus, work=work, config=IngestConfig(workers=1))
    (run,) = _runs(mlflow_env, "ingest")
    assert run.info.status == "FAILED"
    assert not (work / ".stages" / "ingest.json").exists()
    assert not (work / ".lock.holder").exists()  # the lock went with the flow


def test_a_flow_on_a_held_work_directory_fails_naming_the_holder(
        clean_corpus: Path, mlflow_env: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    work = tmp_path / "work"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom dicomops import locking\n"
         "with locking.hold(sys.argv[1], 'dicomops-monitor'):\n    print('held', flush=True); time.sleep(60)",
         str(work)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        monkeypatch.setenv("DICOMOPS_WORK_LOCK_TIMEOUT_S", "0.5")
        with pytest.raises(WorkDirLockedError, match=rf"is being written by dicomops-monitor \(pid {holder.pid} "):
            ingest(src=clean_corpus, work=work, config=IngestConfig(workers=1))
    finally:
        holder.kill()
        holder.wait()
    assert _runs(mlflow_env, "ingest") == []  # it stopped before opening a run or touching the work directory
    assert not (work / "ingest").exists()


def test_training_refuses_what_preprocessing_made_from_an_earlier_corpus(mlflow_env: str, tmp_path: Path) -> None:
    """A corpus ingested after preprocessing, or a preprocessing that stopped half-way, is not trained
    on in name only: train and segment say to preprocess again, before writing anything."""
    import pandas as pd

    from dicomops import io
    from dicomops.layout import WorkLayout
    from dicomops.preprocessing.stage import check_made_from, corpus_content_hash
    from flows.segment import segment
    from flows.train import train

    work = tmp_path / "work"
    layout = WorkLayout(work)
    layout.ingest.accepted.parent.mkdir(parents=True)
    layout.preprocessed.root.mkdir(parents=True)
    pd.DataFrame({"deid_path": ["a/1.dcm"], "sha256": ["0" * 64]}).to_parquet(layout.ingest.accepted)
    pd.DataFrame({"SeriesInstanceUID": ["1.2.3"]}).to_parquet(layout.preprocessed.index)
    io.write_json(layout.preprocessed.made_from, {"corpus": corpus_content_hash(work)})
    check_made_from(work, corpus_content_hash(work))  # unchanged: goes on
    pd.DataFrame({"deid_path": ["b/1.dcm"], "sha256": ["1" * 64]}).to_parquet(layout.ingest.accepted)
    before = sorted(p.relative_to(work) for p in work.rglob("*"))
    for flow_ in (train, segment):
        with pytest.raises(ValueError, match=rf"another accepted corpus.*dicomops preprocess --work {work}"):
            flow_(work=work)
    assert sorted(p.relative_to(work) for p in work.rglob("*") if p.name not in (".lock", ".lock.holder")) == before
    layout.preprocessed.made_from.unlink()  # what a preprocessing stopped half-way leaves
    with pytest.raises(ValueError, match="no known corpus"):
        check_made_from(work, corpus_content_hash(work))
