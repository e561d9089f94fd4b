"""The champion as the clinical path uses it: its network, the preprocessing it was trained with,
its operating point; and a study's series scored by it.

The preprocessing comes from the training run itself (``weights/preprocess_config.json``, logged
beside the weights), never from today's defaults, so a changed default cannot silently change what
a served model sees. The series score is :func:`dicomops.training.scoring.series_score`.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from dicomops.config import PreprocessConfig, TrainConfig
from dicomops.export.contract import METADATA_KEY, InputContract
from dicomops.layout import WorkLayout
from dicomops.tracking.registry import CHAMPION, WEIGHTS_ARTIFACT, alias_version
from dicomops.tracking.runs import configure_mlflow

PREPROCESS_CONFIG = "preprocess_config.json"


@dataclass(frozen=True)
class Champion:
    """A loaded model version: what scores a study and what its result says it came from."""

    name: str
    version: str
    run_id: str
    model: torch.nn.Module
    train: TrainConfig
    preprocess: PreprocessConfig
    contract: InputContract

    @property
    def threshold(self) -> float:
        return self.contract.threshold


def load_champion(tracking_uri: str, name: str, alias: str = CHAMPION) -> Champion:
    """The version of `name` holding `alias`, ready to score; a clear error when there is none or it
    predates what the clinical path needs."""
    import mlflow
    from dicomops.training.model import load_trained

    client = configure_mlflow(tracking_uri)
    mv = alias_version(client, name, alias)  # an unreadable registry raises RegistryUnavailableError
    if mv is None:
        raise ValueError(f"no version of {name} holds the alias '{alias}'; train and promote a model first "
                         f"(dicomops train, then dicomops promote VERSION)")
    raw = (mlflow.models.get_model_info(f"models:/{name}/{mv.version}").metadata or {}).get(METADATA_KEY)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = client.download_artifacts(str(mv.run_id), f"{WEIGHTS_ARTIFACT}/{PREPROCESS_CONFIG}", tmp)
        except Exception as err:
            raise ValueError(f"{name} version {mv.version} was trained before its preprocessing was stored with "
                             f"it ({WEIGHTS_ARTIFACT}/{PREPROCESS_CONFIG}); retrain it to use it here") from err
        preprocess = PreprocessConfig.model_validate(json.loads(Path(path).read_text()))
    if raw is None:
        raise ValueError(f"{name} version {mv.version} has no input contract in its MLmodel metadata; retrain it")
    model, train, _ = load_trained(tracking_uri, str(mv.run_id))
    return Champion(name, str(mv.version), str(mv.run_id), model, train, preprocess, InputContract.from_mapping(raw))


def score_study(champion: Champion, study_work: Path) -> pd.DataFrame:
    """Preprocess the accepted series of an ingested study work directory the way the champion was
    trained, and score each: one row per series (``SeriesInstanceUID`` is the work directory's
    pseudonym), with ``score``, ``present`` at the champion's operating point and ``best_z``."""
    from dicomops.preprocessing.stage import preprocess_corpus
    from dicomops.training.data import load_volume
    from dicomops.training.scoring import score_series

    layout = WorkLayout(study_work)
    preprocess_corpus(study_work, champion.preprocess.model_copy(update={"workers": 1}))
    index = layout.preprocessed.read_index()
    volumes = (load_volume(layout.preprocessed.volume(row.path)) for row in index.itertuples())
    scores = score_series(champion.model, index.assign(label=index.label.clip(lower=0)).itertuples(), volumes,
                          champion.preprocess.slab_slices, champion.train.input_size, champion.train.top_k_slices)
    return scores.drop(columns="label").assign(present=lambda f: f.score >= champion.threshold)
