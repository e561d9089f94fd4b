"""A tiny trained, promoted and exported champion in its own SQLite store: what every serving test
scores with. One epoch on a 20-patient synthetic corpus at 32 px (about a minute on two cores)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from dicomops import ingest
from dicomops.config import (
    ExportConfig,
    IngestConfig,
    PipelineConfig,
    PreprocessConfig,
    SynthConfig,
    TrainConfig,
)
from dicomops.preprocessing.stage import preprocess_corpus
from dicomops.synthetic import generate_corpus

PRE = PreprocessConfig(spacing_mm=(2.0, 2.0, 2.0), crop_xy=160, workers=1)
TINY = TrainConfig(epochs=1, input_size=32, batch_size=16, num_workers=0, model_name="pacs-classifier", min_auc=0.0)
EXPORT = ExportConfig(parity_samples=32, calibration_samples=16, int8_max_auc_drop=1.0, max_batch=32)
CONFIG = PipelineConfig(preprocess=PRE, train=TINY, export=EXPORT, ingest=IngestConfig(workers=1, max_invalid_fraction=0.5))
KEY = b"champion-key-0123456789abcdef"


@dataclass(frozen=True)
class ExportedChampion:
    uri: str
    artifacts: Path
    work: Path


def make_champion(root: Path) -> ExportedChampion:
    from flows.export import export
    from flows.train import train

    generate_corpus(root / "src", SynthConfig(patients=20, seed=17, fault_rate=0.0, matrix=128, slices=12, workers=1))
    work = root / "work"
    uri = f"sqlite:///{root / 'mlflow' / 'mlflow.db'}"
    artifacts = root / "mlflow" / "artifacts"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.setenv("DICOMOPS_MLFLOW_ARTIFACT_ROOT", str(artifacts))
        ingest.run(root / "src", work, IngestConfig(workers=1), KEY)
        preprocess_corpus(work, PRE)
        result = train(work=work, config=TINY, preprocess_config=PRE, experiment="pacs-test")
        assert result["promoted"], result
        export(work=work, config=EXPORT, model_name=TINY.model_name, alias="champion")
    return ExportedChampion(uri, artifacts, work)


@pytest.fixture(scope="session")
def exported_champion(tmp_path_factory: pytest.TempPathFactory, prefect_harness: None) -> ExportedChampion:
    return make_champion(tmp_path_factory.mktemp("champion"))
