"""The promotion gate compares champion and challenger on the challenger's pool, labels and folds,
not each by the cross-validation of its own pool (which a retrain changes): a real SQLite MLflow
store, the champion's out-of-fold scores and split as its training run keeps them
(``cv/oof_scores.parquet``, ``cv/folds.json``). Its fold models run for real in the train, segment
and monitor flow tests; here the rule of which of them scores which series."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from mlflow.entities import Param
from mlflow.tracking import MlflowClient
from sklearn.metrics import roc_auc_score

from dicomops import io
from dicomops.config import PreprocessConfig
from dicomops.layout import WorkLayout
from dicomops.tracking import registry
from dicomops.tracking.promotion import ModelScore, PoolComparison, decide_promotion
from dicomops.tracking.runs import flatten_params
from dicomops.training.champion_pool import (
    champion_folds,
    champion_on_pool,
    oof_artifact,
    pool_for,
    split_artifact,
)

# Two folds, two vendors, both classes of each vendor in each fold; a patient per series.
POOL = pd.DataFrame({
    "SeriesInstanceUID": [f"2.25.{i}" for i in range(12)],
    "PatientID": [f"p{i}" for i in range(12)],
    "vendor": ["ge", "ge", "ge", "siemens", "siemens", "siemens"] * 2,
    "label": [1, 0, 0, 1, 0, 0, 1, 1, 0, 1, 0, 0],
    "fold": [0] * 6 + [1] * 6,
    # The challenger's out-of-fold scores: one miss, a siemens negative of fold 1 above its positive.
    "score": [0.9, 0.1, 0.2, 0.8, 0.3, 0.2, 0.7, 0.5, 0.4, 0.9, 0.95, 0.3],
})
# The champion's out-of-fold scores on the same series: as good in ge, worse in siemens.
CHAMPION_SCORES = [0.8, 0.2, 0.1, 0.3, 0.6, 0.2, 0.9, 0.8, 0.1, 0.2, 0.7, 0.4]
# The champion's split of the same twelve series: the challenger's (a retrain carries it over).
SPLIT = [{"train": list(POOL.SeriesInstanceUID[6:]), "val": list(POOL.SeriesInstanceUID[:6])},
         {"train": list(POOL.SeriesInstanceUID[:6]), "val": list(POOL.SeriesInstanceUID[6:])}]


def _fold_mean(table: pd.DataFrame, vendor: str | None = None) -> float:
    """The fold-mean AUC by hand: sklearn per fold, then the mean."""
    part = table if vendor is None else table[table.vendor == vendor]
    return float(np.mean([roc_auc_score(g.label, g.score) for _, g in part.groupby("fold")]))


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str, Path]:
    root = tmp_path_factory.mktemp("champion-pool")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    return uri, MlflowClient(uri).create_experiment("pool", artifact_location=(root / "art").as_uri()), root


def _params(pre: PreprocessConfig) -> list[Param]:
    """The ``preprocess.*`` parameters a training run logs (flows/train.py)."""
    return [Param(k, str(v)) for k, v in flatten_params({"preprocess": pre.model_dump(mode="json")}).items()]


def _work(root: Path, pool: pd.DataFrame, store: tuple[str, str, Path], pre: PreprocessConfig = PreprocessConfig()) -> Path:
    """A challenger's training work directory as the gate reads it, its training run with its
    preprocessing's parameters."""
    uri, experiment, _ = store
    layout = WorkLayout(root / "work")
    io.write_parquet(layout.train.oof_predictions, pool.drop(columns="PatientID"))
    io.write_parquet(layout.preprocessed.index, pool[["SeriesInstanceUID", "PatientID", "vendor", "label"]])
    run = MlflowClient(uri).create_run(experiment)
    MlflowClient(uri).log_batch(run.info.run_id, params=_params(pre))
    io.write_json(layout.train.state, {"parent_run_id": run.info.run_id, "folds": {}})
    return layout.root


def _version(uri: str, experiment: str, name: str, tags: dict[str, float], folder: Path,
             scores: pd.DataFrame | None = None, pre: PreprocessConfig | None = None,
             split: list[dict[str, list[str]]] | None = SPLIT) -> str:
    """A version of `name` with `tags` (``cv.*``, logged unrounded too), and in its run what its
    training keeps: out-of-fold scores and split (``cv/``), preprocessing (``preprocess.*``)."""
    client = MlflowClient(uri)
    if not client.search_registered_models(f"name = '{name}'"):
        client.create_registered_model(name)
    run = client.create_run(experiment)
    for key, value in tags.items():
        client.log_metric(run.info.run_id, key, value)
    folder.mkdir(parents=True, exist_ok=True)
    if scores is not None:
        client.log_artifact(run.info.run_id, str(io.write_parquet(folder / "oof_scores.parquet", scores)), "cv")
        if split is not None:
            (folder / "folds.json").write_text(json.dumps({"folds": split, "n_splits": len(split), "seed": 0}))
            client.log_artifact(run.info.run_id, str(folder / "folds.json"), "cv")
    if pre is not None:
        client.log_batch(run.info.run_id, params=_params(pre))
    mv = client.create_model_version(name, source=f"runs:/{run.info.run_id}/model", run_id=run.info.run_id)
    for key, value in tags.items():
        client.set_model_version_tag(name, mv.version, key, f"{value:.4f}")
    return str(mv.version)


def _champion(uri: str, name: str, version: str) -> None:
    client = MlflowClient(uri)
    client.set_registered_model_alias(name, registry.CHAMPION, version)
    client.set_registered_model_tag(name, registry.RECORDED_CHAMPION, version)
    client.set_model_version_tag(name, version, "promotion.decision", "auto-promoted")


def _pair(store: tuple[str, str, Path], name: str, champion_tags: dict[str, float], challenger_tags: dict[str, float],
          scores: pd.DataFrame | None = None, pre: PreprocessConfig | None = None) -> tuple[str, str, str]:
    """`name` with a champion (`scores`, `pre`: what its run keeps) and a challenger holding their
    aliases; the store's URI and the two versions."""
    uri, experiment, root = store
    champion = _version(uri, experiment, name, champion_tags, root / f"{name}-1", scores, pre)
    _champion(uri, name, champion)
    challenger = _version(uri, experiment, name, challenger_tags, root / f"{name}-2")
    MlflowClient(uri).set_registered_model_alias(name, registry.CHALLENGER, challenger)
    return uri, champion, challenger


BASIS = ("compared on this version's pool, labels and folds: champion v{} by the models of its cross-validation, "
         "each series scored by one that never trained on its patient")


def test_each_series_is_scored_by_a_champion_fold_model_that_never_saw_its_patient() -> None:
    known = POOL.iloc[:8]
    split = [{"train": [], "val": list(known.SeriesInstanceUID[:4])},
             {"train": [], "val": list(known.SeriesInstanceUID[4:])}]
    pool = POOL.assign(PatientID=POOL.PatientID.where(~POOL.SeriesInstanceUID.isin(["2.25.8", "2.25.9"]),
                                                      pd.Series(["p5", "p2"], index=[8, 9])),
                       fold=[0] * 6 + [1, 1, 0, 0, 1, 1])
    folds = champion_folds(pool, split)
    # Held out by the champion: that fold; a new series of a patient it held out: the patient's fold
    # (2.25.8 is p5's, held out by fold 1; 2.25.9 is p2's, fold 0), whatever the challenger's fold;
    # a new patient: the challenger's fold, modulo the champion's fold count.
    assert list(folds) == [0, 0, 0, 0, 1, 1, 1, 1, 1, 0, 1, 1]
    assert list(champion_folds(pool, [*split, {"train": [], "val": []}])[10:]) == [1, 1]
    three = champion_folds(pool.assign(fold=[0] * 10 + [4, 5]), [*split, {"train": [], "val": []}])
    assert list(three[10:]) == [1, 2]  # 4 % 3, 5 % 3
    # A patient two of the champion's folds held out (its split leaked): no fold model is clear of it.
    leaky = pool.assign(PatientID=pool.PatientID.where(pool.SeriesInstanceUID != "2.25.4", "p0"))
    assert np.isnan(champion_folds(leaky.assign(PatientID=leaky.PatientID.where(
        leaky.SeriesInstanceUID != "2.25.10", "p0")), split)[10])


def test_the_champion_is_scored_by_its_out_of_fold_scores_on_the_challengers_folds_and_labels(
        store: tuple[str, str, Path], tmp_path: Path) -> None:
    uri, experiment, root = store
    scores = pd.DataFrame({"SeriesInstanceUID": POOL.SeriesInstanceUID, "score": CHAMPION_SCORES})
    version = _version(uri, experiment, "scored", {"cv.mean_auc": 0.99}, root / "scored", scores, PreprocessConfig())
    assert (oof_artifact(tmp_path), split_artifact(tmp_path)) == ("cv/oof_scores.parquet", "cv/folds.json")
    # Readers changed a label since the champion was trained: the pool's label is the one both answer.
    pool = POOL.assign(label=POOL.label.where(POOL.SeriesInstanceUID != "2.25.2", 1))
    compared = champion_on_pool(_work(tmp_path, pool, store), uri, "scored", version)
    assert compared.unavailable == "" and (compared.series, compared.rescored) == (12, 0)
    champion = pool.assign(score=CHAMPION_SCORES)
    assert compared.champion is not None and compared.challenger is not None
    assert compared.champion.mean_auc == pytest.approx(_fold_mean(champion))
    assert compared.challenger.mean_auc == pytest.approx(_fold_mean(pool))
    for vendor in ("ge", "siemens"):
        assert compared.champion.vendor_auc[vendor] == pytest.approx(_fold_mean(champion, vendor))
        assert compared.challenger.vendor_auc[vendor] == pytest.approx(_fold_mean(pool, vendor))
    # Not the champion's own figure (0.99 in its tags), and not the pool's labels before the change.
    assert compared.champion.mean_auc < 0.9
    assert compared.champion.mean_auc != pytest.approx(_fold_mean(POOL.assign(score=CHAMPION_SCORES)))


def test_new_series_are_scored_by_the_fold_model_clear_of_their_patient_whatever_its_workers_were(
        store: tuple[str, str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The champion knew eight series; a retrain added a follow-up of p5 (held out by its fold 1), one
    # of p2 (fold 0) and two new patients. Settings that shape no input (workers, the seed) do not
    # stop its fold models scoring them; the models themselves run in the flow tests.
    from dicomops.training import champion_pool

    uri, experiment, root = store
    known = pd.DataFrame({"SeriesInstanceUID": POOL.SeriesInstanceUID[:8], "score": CHAMPION_SCORES[:8]})
    split = [{"train": [], "val": list(POOL.SeriesInstanceUID[:4])}, {"train": [], "val": list(POOL.SeriesInstanceUID[4:8])}]
    version = _version(uri, experiment, "grown", {"cv.mean_auc": 0.9}, root / "grown", known,
                       PreprocessConfig(workers=7, seed=3), split)
    pool = POOL.assign(PatientID=["p0", "p1", "p2", "p3", "p4", "p5", "p6", "p7", "p5", "p2", "p10", "p11"])
    asked: dict[int, list[str]] = {}

    def fold_model(layout: WorkLayout, tracking_uri: str, parent: str, fold: int, series: list[str]) -> pd.Series:
        asked[fold] = series
        return pd.Series([CHAMPION_SCORES[int(uid.rsplit(".", 1)[1])] for uid in series], index=series)

    monkeypatch.setattr(champion_pool, "_fold_model_scores", fold_model)
    compared = champion_on_pool(_work(tmp_path, pool, store, PreprocessConfig(workers=1)), uri, "grown", version)
    assert asked == {0: ["2.25.9"], 1: ["2.25.8", "2.25.10", "2.25.11"]}
    assert (compared.series, compared.rescored) == (12, 4)
    assert compared.champion is not None
    assert compared.champion.mean_auc == pytest.approx(_fold_mean(POOL.assign(score=CHAMPION_SCORES)))


def test_the_gate_promotes_on_the_pool_what_the_champions_own_figures_would_have_refused(
        store: tuple[str, str, Path], tmp_path: Path) -> None:
    scores = pd.DataFrame({"SeriesInstanceUID": POOL.SeriesInstanceUID, "score": CHAMPION_SCORES})
    # The champion's own pool was easier: 0.99 there. The challenger's CV on its harder pool: 0.95.
    own = {"cv.mean_auc": _fold_mean(POOL), "cv.auc.ge": _fold_mean(POOL, "ge"),
           "cv.auc.siemens": _fold_mean(POOL, "siemens")}
    uri, champion, challenger = _pair(store, "harder", {"cv.mean_auc": 0.99, "cv.auc.ge": 0.99, "cv.auc.siemens": 0.99},
                                      own, scores, PreprocessConfig())
    work = _work(tmp_path, POOL, store)
    gate = {"margin": 0.005, "vendor_tolerance": 0.02, "min_auc": 0.5}
    refused = decide_promotion(ModelScore(own["cv.mean_auc"], {"ge": own["cv.auc.ge"], "siemens": own["cv.auc.siemens"]}),
                               ModelScore(0.99, {"ge": 0.99, "siemens": 0.99}), **gate)
    assert not refused.promote  # what the gate said before it compared on one pool

    decision = registry.apply_promotion_gate(uri, "harder", challenger, pool=pool_for(work, uri, "harder"), **gate)
    reasons = "; ".join(decision.reasons)
    assert decision.promote, reasons
    assert decision.reasons[0] == BASIS.format(champion)
    assert f"beats champion {_fold_mean(POOL.assign(score=CHAMPION_SCORES)):.4f}" in reasons
    assert str(MlflowClient(uri).get_registered_model("harder").aliases[registry.CHAMPION]) == challenger


def test_a_champion_without_stored_scores_is_compared_by_its_own_figures_and_the_reason_says_so(
        store: tuple[str, str, Path], tmp_path: Path) -> None:
    uri, champion, challenger = _pair(store, "older", {"cv.mean_auc": 0.99}, {"cv.mean_auc": 0.95})
    work = _work(tmp_path, POOL, store)
    decision = registry.apply_promotion_gate(uri, "older", challenger, margin=0.005, vendor_tolerance=0.02,
                                             min_auc=0.5, pool=pool_for(work, uri, "older"))
    assert not decision.promote and decision.label == "awaiting-review"
    assert decision.reasons[0] == (f"champion v{champion} compared by the AUC of its own cross-validation, on its own "
                                   "pool: its run keeps no cv/oof_scores.parquet (it was trained before 2026-12-06)")
    assert "vs champion 0.9900" in decision.reasons[1]


def test_new_series_are_not_scored_by_a_champion_of_other_preprocessing(
        store: tuple[str, str, Path], tmp_path: Path) -> None:
    uri, experiment, root = store
    known = pd.DataFrame({"SeriesInstanceUID": POOL.SeriesInstanceUID[:8], "score": CHAMPION_SCORES[:8]})
    version = _version(uri, experiment, "respaced", {"cv.mean_auc": 0.9}, root / "respaced", known,
                       PreprocessConfig(spacing_mm=(2.0, 2.0, 2.0)))
    compared = champion_on_pool(_work(tmp_path, POOL, store), uri, "respaced", version)
    assert compared.champion is None
    assert compared.unavailable == ("it was trained on other preprocessing (preprocess.spacing_mm [2.0, 2.0, 2.0] -> "
                                    "[1.0, 1.0, 1.0]), so its models cannot score the series new to it")


def test_a_failure_to_score_on_the_pool_is_a_gate_error_never_a_decision(store: tuple[str, str, Path]) -> None:
    # Falling back to the champion's own figures would decide a retrain on the comparison the pool
    # replaces, for good: the version stays challenger, and the tags say why without the details.
    uri, champion, challenger = _pair(store, "broken", {"cv.mean_auc": 0.9}, {"cv.mean_auc": 0.95})

    def failing(version: str) -> PoolComparison:
        raise FileNotFoundError("/somewhere/2.25.1/train/oof_predictions.parquet")

    decision = registry.apply_promotion_gate(uri, "broken", challenger, margin=0.005, vendor_tolerance=0.02,
                                             min_auc=0.5, pool=failing)
    assert not decision.promote and decision.label == "gate-error"
    tags = MlflowClient(uri).get_model_version("broken", challenger).tags
    assert tags["promotion.decision"] == "gate-error"
    assert (f"the champion v{champion} could not be scored on this version's pool (FileNotFoundError; the log "
            "says more); the version stays challenger") in tags["promotion.reasons"]
    assert "2.25.1" not in tags["promotion.reasons"]
    assert str(MlflowClient(uri).get_registered_model("broken").aliases[registry.CHAMPION]) == champion


def test_on_the_pool_a_vendor_drop_refuses_and_the_floor_stays_on_the_challengers_own_figure() -> None:
    own = ModelScore(0.91, {"ge": 0.9, "siemens": 0.92})
    champion_own = ModelScore(0.80, {"ge": 0.8, "siemens": 0.8})
    pool = PoolComparison("3", challenger=ModelScore(0.90, {"ge": 0.97, "siemens": 0.83}),
                          champion=ModelScore(0.85, {"ge": 0.80, "siemens": 0.90}), series=40, rescored=10)
    assert decide_promotion(own, champion_own, min_auc=0.5).promote  # its own figures beat the champion's
    decision = decide_promotion(own, champion_own, min_auc=0.5, pool=pool)
    assert not decision.promote and decision.reasons[0] == BASIS.format(3)
    assert "siemens: AUC drops 0.9000 -> 0.8300 (more than 0.0200)" in decision.reasons
    assert "mean AUC 0.9000 beats champion 0.8500 by +0.0500" in decision.reasons
    assert not any(str(n) in decision.reasons[0] for n in (40, 10))  # no count of the pool
    floored = decide_promotion(ModelScore(0.79, {"ge": 0.79}), champion_own, min_auc=0.8,
                               pool=PoolComparison("3", ModelScore(0.95, {"ge": 0.95}), ModelScore(0.7, {"ge": 0.7}),
                                                   40, 0))
    assert not floored.promote and "mean AUC 0.7900 is below the floor 0.8000" in floored.reasons


def test_a_segmenter_champion_without_its_split_is_compared_by_its_own_cpm_and_the_reason_says_so(
        store: tuple[str, str, Path], tmp_path: Path) -> None:
    # Its fold models could not be matched with the series they held out (dicomops.segmentation.champion_pool;
    # the comparison itself runs in the segment and monitor flow tests).
    from dicomops.segmentation.champion_pool import pool_for as segmenter_pool_for

    uri, champion, challenger = _pair(store, "seg-older", {"cv.mean_cpm": 0.9}, {"cv.mean_cpm": 0.8})
    decision = registry.apply_promotion_gate(uri, "seg-older", challenger, margin=0.005, vendor_tolerance=0.02,
                                             min_auc=0.5, metric="cpm",
                                             pool=segmenter_pool_for(tmp_path / "work", uri, "seg-older"))
    assert not decision.promote
    assert decision.reasons[0] == (f"champion v{champion} compared by the CPM of its own cross-validation, on its "
                                   "own pool: its run keeps no cv/folds.json (it was trained before 2026-12-06)")
    assert "mean CPM 0.8000 vs champion 0.9000" in decision.reasons[1]
