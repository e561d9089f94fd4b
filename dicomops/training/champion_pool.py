"""The champion on the challenger's pool: what the promotion gate compares after a retrain.

A version's ``cv.*`` figures are of the pool it was trained on. After a retrain added series (a
drifted batch whose labels arrived, reviewed clinical series) or readers changed labels, the
challenger's pool is not the champion's, and comparing the two versions' own CV figures compares
two pools as much as two models: a new, harder scanner lowers the challenger's figures while it is
the better model for it. Here both are scored on the challenger's series, labels and folds:

- the challenger by its out-of-fold scores (``train/oof_predictions.parquet``);
- the champion by its own out-of-fold score where its cross-validation held that series out (the
  ``cv/oof_scores.parquet`` its training run keeps: series and score, no vendor or label), and by
  its final model where it never trained on the series (its out-of-fold scores cover every
  labelled series of its pool, so a series without one is new to it).

Each model's figures are then the fold-mean AUCs over the challenger's folds, overall and per
vendor, computed the same way as ``cv.*`` (:func:`dicomops.training.scoring.fold_mean_auc`).
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from pathlib import Path

import pandas as pd

from dicomops import io
from dicomops.layout import WorkLayout
from dicomops.preprocessing.stage import VOLUME_FIELDS
from dicomops.tracking.promotion import ModelScore, PoolComparison
from dicomops.tracking.registry import WEIGHTS_ARTIFACT
from dicomops.tracking.runs import configure_mlflow
from dicomops.training import scoring


def oof_artifact(work: Path) -> str:
    """Where a training run keeps its out-of-fold scores (``summarise`` logs them under ``cv/``)."""
    return f"cv/{WorkLayout(work).train.oof_scores.name}"


def champion_on_pool(work: Path, tracking_uri: str, name: str, champion_version: str) -> PoolComparison:
    """Both versions on the pool the challenger in `work` was cross-validated on (module docstring).
    A champion that cannot be scored there (its out-of-fold scores or weights not stored, another
    preprocessing) gives ``unavailable`` with the reason, and the gate falls back to its own figures."""
    layout = WorkLayout(work)
    ours = pd.read_parquet(layout.train.oof_predictions)
    client = configure_mlflow(tracking_uri)
    run_id = str(client.get_model_version(name, champion_version).run_id)

    def unavailable(why: str) -> PoolComparison:
        return PoolComparison(str(champion_version), unavailable=why)

    with tempfile.TemporaryDirectory() as tmp:
        try:
            scored = pd.read_parquet(client.download_artifacts(run_id, oof_artifact(work), tmp))
        except Exception as err:  # MLflow raises its own, OSError or a missing-file error by store
            return unavailable(f"its out-of-fold scores are not stored with it ({oof_artifact(work)}: "
                               f"{type(err).__name__}); it was trained before 2026-12-06")
        try:
            theirs_pre = json.loads(Path(client.download_artifacts(
                run_id, f"{WEIGHTS_ARTIFACT}/{layout.train.final_preprocess_config.name}", tmp)).read_text())
        except Exception as err:
            return unavailable(f"its preprocessing is not stored with it ({type(err).__name__})")
    cv_scores = scored.set_index("SeriesInstanceUID").score.astype(float)
    seen = set(scored.SeriesInstanceUID)
    champion = ours[["SeriesInstanceUID", "vendor", "label", "fold"]].copy()
    champion["score"] = champion.SeriesInstanceUID.map(cv_scores)
    unseen = champion[~champion.SeriesInstanceUID.isin(seen)]
    if len(unseen):
        ours_pre = io.read_json(layout.train.final_preprocess_config)
        # What the input contract says shapes a model's input; not the workers, the cache or the seed.
        if differs := [k for k in (*VOLUME_FIELDS, "slab_slices") if ours_pre.get(k) != theirs_pre.get(k)]:
            return unavailable(f"it was trained on other preprocessing ({', '.join(differs)}), so its final model "
                               f"cannot score the {len(unseen)} series new to it")
        final = _final_model_scores(layout, tracking_uri, run_id, list(unseen.SeriesInstanceUID))
        champion.loc[unseen.index, "score"] = champion.loc[unseen.index, "SeriesInstanceUID"].map(final)
    both = champion.score.notna().to_numpy()
    champion, challenger = champion[both], ours[both]
    if champion.empty or champion.label.nunique() < 2:
        return unavailable("no series of both classes can be scored by both")
    return PoolComparison(str(champion_version), _model_score(challenger), _model_score(champion), len(champion),
                          cross_validated=int(champion.SeriesInstanceUID.isin(seen).sum()), unseen=len(unseen))


def _final_model_scores(layout: WorkLayout, tracking_uri: str, run_id: str, series: list[str]) -> pd.Series:
    """The champion's final model's series scores of `series` (preprocessed in `layout`), by its own
    slab depth, input size and top-k rule."""
    from dicomops.training.cv import score_series
    from dicomops.training.model import load_trained

    model, cfg, k = load_trained(tracking_uri, run_id)
    rows = layout.labelled_series().set_index("SeriesInstanceUID").loc[series].reset_index()
    scored = score_series(model, layout, rows, k, cfg.input_size, cfg.top_k_slices)
    return scored.set_index("SeriesInstanceUID").score.astype(float)


def _model_score(preds: pd.DataFrame) -> ModelScore:
    mean, vendors = scoring.fold_mean_auc(preds)
    return ModelScore(mean, vendors)


def pool_for(work: Path, tracking_uri: str, name: str) -> Callable[[str], PoolComparison]:
    """What the promotion gate of `name` asks (``pool(champion_version)``) of the training in `work`."""
    return lambda champion_version: champion_on_pool(work, tracking_uri, name, champion_version)
