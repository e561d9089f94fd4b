"""Cross-validation splits, metrics against hand-computed values, and the promotion gate."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from dicomops.tracking.promotion import ModelScore, decide_promotion
from dicomops.training.metrics import (
    binary_metrics,
    per_vendor_metrics,
    summarise_folds,
    youden_threshold,
)
from dicomops.training.splits import (
    LeakageError,
    check_no_leakage,
    fold_counts,
    load_or_create_folds,
    make_folds,
)


def _series(n_patients: int = 80, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rates = {"siemens": 0.25, "ge": 0.4, "philips": 0.5, "canon": 0.6}
    rows = []
    for p in range(n_patients):
        vendor = list(rates)[p % 4]
        for s in range(1 + (p % 3 == 0)):  # some patients have two series
            rows.append({"SeriesInstanceUID": f"S{p}.{s}", "PatientID": f"P{p}", "vendor": vendor,
                         "label": int(rng.random() < rates[vendor])})
    return pd.DataFrame(rows)


def test_folds_group_patients_and_keep_vendor_proportions() -> None:
    series = _series()
    folds = make_folds(series, 4, seed=3)
    assert sorted(s for f in folds for s in f["val"]) == sorted(series.SeriesInstanceUID)
    check_no_leakage(folds, series)
    counts = fold_counts(folds, series).groupby(["fold", "vendor"]).series.sum().unstack()
    expected = series.vendor.value_counts() / 4
    for vendor in expected.index:
        # grouped splitting keeps each fold within a couple of series of proportional
        assert (abs(counts[vendor] - expected[vendor]) <= 2).all(), counts[vendor].tolist()
    assert make_folds(series, 4, seed=3) == folds


def test_leakage_raises() -> None:
    series = _series(40)
    folds = make_folds(series, 4)
    moved = [dict(f) for f in folds]
    patient_series = series[series.PatientID == series.PatientID.iloc[0]].SeriesInstanceUID.tolist()
    moved[0] = {"train": moved[0]["train"] + patient_series, "val": moved[0]["val"] + patient_series}
    with pytest.raises(LeakageError, match="fold 0"):
        check_no_leakage(moved, series)


def test_too_little_data_says_what_to_change() -> None:
    with pytest.raises(ValueError, match="lower n_splits or add data"):
        make_folds(_series(8), 4)


def test_split_file_is_made_once_and_reused(tmp_path: Path) -> None:
    series = _series(40)
    path = tmp_path / "splits" / "folds.json"
    folds, digest = load_or_create_folds(path, series, 4, seed=1)
    again, digest2 = load_or_create_folds(path, series, 4, seed=99)  # the seed no longer matters
    assert again == folds and digest == digest2 and len(digest) == 64
    with pytest.raises(ValueError, match="made for other series"):
        load_or_create_folds(path, series.iloc[:-1], 4)


def test_binary_metrics_against_hand_computed_values() -> None:
    y = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    score = np.array([0.1, 0.4, 0.35, 0.8, 0.7, 0.9, 0.2, 0.6])
    m = binary_metrics(y, score, threshold=0.5)
    # predictions at 0.5: [0,0,0,1,1,1,0,1] -> TP 3, FN 1, TN 3, FP 1
    assert m["sensitivity"] == 0.75 and m["specificity"] == 0.75 and m["f1"] == 0.75
    assert m["kappa"] == pytest.approx(0.5)  # observed 0.75, chance 0.5
    # AUC: of the 16 positive-negative pairs, 11 rank the positive higher (3 + 4 + 1 + 3)
    assert m["auc"] == pytest.approx(11 / 16)
    assert math.isnan(binary_metrics(np.zeros(4), np.arange(4), 0.5)["auc"])
    assert youden_threshold(y, score) in set(score)


def test_per_vendor_and_fold_summary() -> None:
    frame = pd.DataFrame({"vendor": ["a", "a", "b", "b"], "label": [0, 1, 0, 1], "score": [0.2, 0.8, 0.6, 0.4]})
    table = per_vendor_metrics(frame, 0.5).set_index("vendor")
    assert table.loc["a", "auc"] == 1.0 and table.loc["b", "auc"] == 0.0 and table.loc["all", "auc"] == 0.75
    per_fold = pd.DataFrame({"vendor": ["a", "a"], "auc": [0.8, 0.9], "sensitivity": [1, 1],
                             "specificity": [0.5, 0.7], "f1": [0.6, 0.8], "kappa": [0.2, 0.4]})
    summary = summarise_folds(per_fold).set_index("vendor")
    assert summary.loc["a", "auc_mean"] == pytest.approx(0.85)
    assert summary.loc["a", "auc_std"] == pytest.approx(np.std([0.8, 0.9], ddof=1))


def test_promotion_gate_decisions() -> None:
    champion = ModelScore(0.95, {"ge": 0.96, "siemens": 0.94})
    better = ModelScore(0.97, {"ge": 0.97, "siemens": 0.95})
    assert decide_promotion(better, champion).promote
    small_gain = ModelScore(0.952, {"ge": 0.96, "siemens": 0.94})
    assert not decide_promotion(small_gain, champion, margin=0.005).promote
    vendor_drop = ModelScore(0.97, {"ge": 0.99, "siemens": 0.90})
    decision = decide_promotion(vendor_drop, champion, vendor_tolerance=0.02)
    assert not decision.promote and any("siemens" in r for r in decision.reasons)
    missing = ModelScore(0.99, {"ge": 0.99})
    assert not decide_promotion(missing, champion).promote
    assert decide_promotion(ModelScore(0.9), None, min_auc=0.8).promote
    assert not decide_promotion(ModelScore(0.7), None, min_auc=0.8).promote
    assert decide_promotion(better, champion).tags()["promotion.decision"] == "auto-promoted"
    with pytest.raises(ValueError, match="non-negative"):
        decide_promotion(better, champion, margin=-1)
