"""The reference a monitor compares against: the feature table of the training data of the model
version being served, stored as an MLflow artifact of that version's run.

The ``probability`` column of the reference holds the out-of-fold cross-validation scores: they are
how the trained recipe scores series it has not seen, which is what a new batch is. The final
model's own scores on its training series would be overconfident and look like output drift.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from dicomops import io
from dicomops.layout import WorkLayout
from dicomops.monitoring.features import feature_table
from dicomops.tracking import runs
from dicomops.tracking.registry import alias_version
from dicomops.training.scoring import SeriesRule

ARTIFACT = "monitoring/reference.parquet"
TAG = "monitoring.reference"


def build_reference(work: Path, model: torch.nn.Module, k: int, size: int, rule: SeriesRule) -> pd.DataFrame:
    """Features of every labelled training series; out-of-fold scores as the probability column."""
    layout = WorkLayout(work)
    labelled = sorted(layout.labelled_series().SeriesInstanceUID)
    table = feature_table(work, model, k, size, rule, series=labelled)
    oof = layout.train.oof_predictions
    if oof.exists():
        scores = pd.read_parquet(oof).set_index("SeriesInstanceUID").score
        table["probability"] = scores.reindex(labelled).to_numpy()
    return table


def store_reference(tracking_uri: str, name: str, version: str, run_id: str, table: pd.DataFrame,
                    folder: Path) -> str:
    """Write the table, attach it to the version's run, point the version at it; return its URI."""
    path = io.write_parquet(Path(folder) / "reference.parquet", table)
    runs.log_artifacts(tracking_uri, run_id, [path], "monitoring")
    uri = f"runs:/{run_id}/{ARTIFACT}"
    runs.configure_mlflow(tracking_uri).set_model_version_tag(name, version, TAG, uri)
    return uri


@dataclass(frozen=True)
class ServingModel:
    """The version a monitor watches: its number, run, alias and reference table."""

    name: str
    version: str
    run_id: str
    alias: str
    reference: pd.DataFrame


def load_serving(tracking_uri: str, name: str, alias: str = "champion") -> ServingModel:
    """The version holding `alias` and the reference stored with it."""
    client = runs.configure_mlflow(tracking_uri)
    mv = alias_version(client, name, alias)  # an unreadable registry raises RegistryUnavailableError
    if mv is None:
        raise ValueError(f"no version of {name} holds the alias '{alias}'; train and promote a model first "
                         f"(dicomops train, dicomops promote VERSION)")
    uri = mv.tags.get(TAG)
    if not uri:
        raise ValueError(f"{name} version {mv.version} has no '{TAG}' tag: it was trained before monitoring "
                         "existed; retrain it so that its reference features are stored")
    with tempfile.TemporaryDirectory() as tmp:
        local = client.download_artifacts(str(mv.run_id), ARTIFACT, tmp)
        reference = pd.read_parquet(local)
    return ServingModel(name, str(mv.version), str(mv.run_id), alias, reference)
