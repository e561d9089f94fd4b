"""The champion on the challenger's pool: what the promotion gate compares after a retrain.

A version's ``cv.*`` figures are of the pool it was trained on. After a retrain added series (a
drifted batch whose labels arrived, reviewed clinical series) or readers changed labels, the
challenger's pool is not the champion's, and comparing the two versions' own CV figures compares
two pools as much as two models: a new, harder scanner lowers the challenger's figures while it is
the better model for it. Here both are scored on the challenger's series, labels and folds:

- the challenger by its out-of-fold scores (``train/oof_predictions.parquet``);
- the champion by the models of its own cross-validation, each series by one that never trained on
  its patient (:func:`champion_folds`): a series its cross-validation held out keeps the score it
  got then (the ``cv/oof_scores.parquet`` its training run keeps: series and score); a new series
  of a patient it saw is scored by the fold model that held that patient out; a new patient by
  the fold model of the challenger's fold, which saw none of the new patients. Never its final
  model, which trained on every patient it knew, and whose scores are on another scale than its
  fold models' (one fold's AUC would otherwise mix the two).

Each model's figures are then the fold-mean AUCs over the challenger's folds, overall and per
vendor, computed the same way as ``cv.*`` (:func:`dicomops.training.scoring.fold_mean_auc`). The
segmenter's gate follows the same rule (:mod:`dicomops.segmentation.champion_pool`).

Patients are matched by the pool's pseudonymous ``PatientID``: a series the gate of a retrain
remapped again (reviewed clinical series, :mod:`dicomops.feedback.clinical`) is a new patient here,
as it is to the retrain's own split.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from dicomops.layout import WorkLayout
from dicomops.tracking.promotion import ModelScore, PoolComparison
from dicomops.tracking.runs import configure_mlflow
from dicomops.training import scoring
from dicomops.training import state as train_state


def oof_artifact(work: Path) -> str:
    """Where a training run keeps its out-of-fold scores (``summarise`` logs them under ``cv/``)."""
    return f"cv/{WorkLayout(work).train.oof_scores.name}"


def split_artifact(work: Path) -> str:
    """Where a training run (either model's) keeps its split (``summarise`` logs it under ``cv/``)."""
    return f"cv/{WorkLayout(work).folds_file.name}"


def champion_folds(pool: pd.DataFrame, split: list[Mapping[str, Any]]) -> pd.Series:
    """For each series of `pool` (``SeriesInstanceUID``, ``PatientID`` and the challenger's ``fold``),
    the fold of the champion's `split` whose model never trained on its patient: the fold that held
    the series, or its patient's other series, out; for a patient the split never held, the
    challenger's fold modulo the split's fold count (a fold model saw none of the new patients).
    A patient whose series the split held out in different folds (no fold model is clear of it)
    gets none (NaN): it leaves the comparison."""
    held = {uid: fold for fold, part in enumerate(split) for uid in part["val"]}
    seen = pool.SeriesInstanceUID.map(held)
    by_patient = seen.groupby(pool.PatientID.astype(str)).agg(lambda folds: set(folds.dropna().astype(int)))
    patient_fold = {p: next(iter(f)) if len(f) == 1 else (float("nan") if f else None) for p, f in by_patient.items()}
    folds = []
    for fold, patient, own in zip(pool.fold, pool.PatientID.astype(str), seen, strict=True):
        known = patient_fold[patient]
        folds.append(own if pd.notna(own) else int(fold) % len(split) if known is None else known)
    return pd.Series(folds, index=pool.index, dtype=float)


def champion_on_pool(work: Path, tracking_uri: str, name: str, champion_version: str) -> PoolComparison:
    """Both versions on the pool the challenger in `work` was cross-validated on (module docstring).
    A champion registered before its runs kept what this needs, or trained on other preprocessing,
    gives ``unavailable`` with the reason, and the gate compares its own figures. Any other failure
    (the registry unreadable, a fold model missing) raises: the gate then does not decide."""
    layout = WorkLayout(work)
    client = configure_mlflow(tracking_uri)
    parent = str(client.get_model_version(name, champion_version).run_id)
    kept = {a.path for a in client.list_artifacts(parent, "cv")}
    for artifact in (oof_artifact(work), split_artifact(work)):
        if artifact not in kept:
            return PoolComparison(str(champion_version), unavailable=f"its run keeps no {artifact} (it was trained "
                                                                      "before 2026-12-06)")
    with tempfile.TemporaryDirectory() as tmp:
        stored = pd.read_parquet(client.download_artifacts(parent, oof_artifact(work), tmp))
        split = json.loads(Path(client.download_artifacts(parent, split_artifact(work), tmp)).read_text())["folds"]
    ours = pd.read_parquet(layout.train.oof_predictions)
    patients = layout.labelled_series().set_index("SeriesInstanceUID").PatientID
    table = ours.assign(PatientID=ours.SeriesInstanceUID.map(patients).astype(str))
    table["champion_fold"] = champion_folds(table, split)
    table["champion"] = table.SeriesInstanceUID.map(stored.set_index("SeriesInstanceUID").score.astype(float))
    rescored = table[table.champion.isna() & table.champion_fold.notna()]
    if len(rescored):
        if changed := other_preprocessing(tracking_uri, parent, train_state.parent_run(layout)):
            return PoolComparison(str(champion_version), unavailable=(
                f"it was trained on other preprocessing ({changed}), so its models cannot score the series new to it"))
        for fold, part in rescored.groupby("champion_fold"):
            scores = _fold_model_scores(layout, tracking_uri, parent, int(fold), list(part.SeriesInstanceUID))
            table.loc[part.index, "champion"] = part.SeriesInstanceUID.map(scores).to_numpy()
    both = table[table.champion.notna()]
    if both.label.nunique() < 2:
        return PoolComparison(str(champion_version), unavailable="no series of both classes can be scored by both")
    return PoolComparison(str(champion_version), _model_score(both), _model_score(both.assign(score=both.champion)),
                          len(both), rescored=len(rescored))


def other_preprocessing(tracking_uri: str, champion_run: str, our_run: str) -> str:
    """The volume settings on which the champion's training run and ours were preprocessed
    differently, from their logged ``preprocess.*`` parameters ('' if none): where they differ, its
    models would score volumes unlike those they learnt from (a model's slab depth and input size
    are its own, so only the volume matters)."""
    from dicomops.training.distill import volume_settings_changed

    client = configure_mlflow(tracking_uri)
    return volume_settings_changed(client.get_run(champion_run).data.params, client.get_run(our_run).data.params)


def _fold_model_scores(layout: WorkLayout, tracking_uri: str, parent: str, fold: int, series: list[str]) -> pd.Series:
    """The series scores of `series` (preprocessed in `layout`) by fold `fold`'s model of training run
    `parent`, with its own slab depth, input size and top-k rule."""
    from dicomops.training.cv import score_series
    from dicomops.training.distill import fold_run
    from dicomops.training.model import load_trained

    model, cfg, k = load_trained(tracking_uri, fold_run(tracking_uri, parent, fold))
    rows = layout.labelled_series().set_index("SeriesInstanceUID").loc[series].reset_index()
    scored = score_series(model, layout, rows, k, cfg.input_size, scoring.SeriesRule.of(cfg))
    return scored.set_index("SeriesInstanceUID").score.astype(float)


def _model_score(preds: pd.DataFrame) -> ModelScore:
    mean, vendors = scoring.fold_mean_auc(preds)
    return ModelScore(mean, vendors)


def pool_for(work: Path, tracking_uri: str, name: str) -> Callable[[str], PoolComparison]:
    """What the promotion gate of `name` asks (``pool(champion_version)``) of the training in `work`."""
    return lambda champion_version: champion_on_pool(work, tracking_uri, name, champion_version)
