"""The training flow refuses, before it splits or trains, a corpus whose labelled series are all of
one class: it used to train four folds and register a classifier whose threshold was infinite."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from dicomops import io
from dicomops.config import TrainConfig
from dicomops.layout import WorkLayout
from dicomops.preprocessing.stage import corpus_content_hash
from flows.train import train

pytestmark = pytest.mark.usefixtures("prefect_harness")


def _prepared(work: Path, label: int) -> None:
    """What ingest and preprocessing leave for sixteen series of one label (the tables, no volumes)."""
    layout = WorkLayout(work)
    layout.ingest.accepted.parent.mkdir(parents=True, exist_ok=True)
    io.write_parquet(layout.ingest.accepted, pd.DataFrame({"deid_path": [f"s{i}/1.dcm" for i in range(16)],
                                                           "sha256": [f"{i:064x}" for i in range(16)]}))
    layout.preprocessed.root.mkdir(parents=True, exist_ok=True)
    io.write_parquet(layout.preprocessed.index, pd.DataFrame([
        {"SeriesInstanceUID": f"S{i}", "PatientID": f"P{i}", "vendor": ["ge", "siemens"][i % 2], "label": label,
         "path": f"volumes/v{i}.npz"} for i in range(16)]))
    io.write_json(layout.preprocessed.made_from, {"corpus": corpus_content_hash(work)})


@pytest.mark.parametrize("label", [0, 1])
def test_a_corpus_of_one_class_is_refused_before_any_split_run_or_fold(label: int, mlflow_env: str,
                                                                     tmp_path: Path) -> None:
    work = tmp_path / "work"
    _prepared(work, label)
    missing = "positive" if label == 0 else "negative"
    with pytest.raises(ValueError, match=f"a classifier needs {missing} series too"):
        train(work=work, config=TrainConfig(epochs=1, input_size=32, num_workers=0, model_name="one-class"))
    layout = WorkLayout(work)
    assert not layout.folds_file.exists() and not layout.train.state.exists()
    assert not (tmp_path / "mlflow" / "mlflow.db").exists()  # no run opened
