"""Series-level scoring and cross-validation summaries: pure functions over models, arrays and
tables, with no MLflow and no work directory.

The series score is defined here once (:class:`SeriesRule`, from ``train.top_k_slices`` and
``train.series_rule``). The cross-validation scores series with it, the drift monitor reads it as
the model's output column, and the served model applies the same rule.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch

from dicomops.config import TrainConfig
from dicomops.training.data import all_slabs
from dicomops.training.loop import predict
from dicomops.training.metrics import (
    auc_confidence_interval,
    binary_metrics,
    per_vendor_metrics,
    summarise_folds,
    youden_threshold,
)

FOLD_METRICS = ("auc", "sensitivity", "specificity", "f1", "kappa")
# Fewer positives or negatives than this and the stratified bootstrap's resamples barely differ: a
# vendor with one positive, or perfectly separated, got an interval of zero width ("1.000 (1.000-1.000)").
MIN_CASES_FOR_INTERVAL = 5


# Slice probabilities are read as logits within these bounds: float32's softmax rounds to 0 or 1
# beyond about ±17, and a clipped probability must not become an infinite logit.
_PROBABILITY_FLOOR = 1e-7


@dataclass(frozen=True)
class SeriesRule:
    """How a series' slice probabilities become its score.

    ``top_k_mean``: the mean of the `top_k` highest slice probabilities. ``top_k_contrast``: how far
    the series' `top_k` highest slices stand above its own slices, in logits: with m the mean of the
    `top_k` highest slice logits and a the mean of all of them, ``tanh((m - a) / 2)``, 0 where the
    best slices are no different from the series' average and towards 1 as they stand out. A
    nodule is local, while what the network reads off a whole series (its scanner's texture, its
    coverage) lifts or lowers every slice; the contrast leaves out that offset, which
    ``top_k_mean`` ranks series by.
    """

    top_k: int
    kind: Literal["top_k_mean", "top_k_contrast"] = "top_k_mean"

    def __post_init__(self) -> None:
        if self.top_k < 1:
            raise ValueError(f"top_k must be at least 1, got {self.top_k}")
        if self.kind not in ("top_k_mean", "top_k_contrast"):
            raise ValueError(f"series rule {self.kind!r} is not one of top_k_mean, top_k_contrast")

    @classmethod
    def of(cls, cfg: TrainConfig) -> SeriesRule:
        """The rule a model trained with `cfg` is scored by."""
        return cls(cfg.top_k_slices, cfg.series_rule)

    @property
    def is_probability(self) -> bool:
        """Whether the score is a probability (a mean of slab probabilities), as a report may call it."""
        return self.kind == "top_k_mean"

    def describe(self) -> str:
        """For the model's input contract and card."""
        if self.kind == "top_k_mean":
            return f"mean of the {self.top_k} highest slab probabilities"
        return (f"tanh of half the mean logit of the {self.top_k} highest slabs above the mean logit of all the "
                "series' slabs")


def series_score(slice_probabilities: np.ndarray, rule: SeriesRule) -> float:
    """The series' score from its slice probabilities, by `rule`."""
    probs = np.asarray(slice_probabilities, dtype=float)
    if probs.size == 0:
        raise ValueError("a series without slices has no score")
    if rule.kind == "top_k_mean":
        return float(np.sort(probs)[-rule.top_k:].mean())
    clipped = np.clip(probs, _PROBABILITY_FLOOR, 1.0 - _PROBABILITY_FLOOR)
    logits = np.log(clipped) - np.log1p(-clipped)
    return float(np.tanh((np.sort(logits)[-rule.top_k:].mean() - logits.mean()) / 2.0))


def score_series(model: torch.nn.Module, series: Iterable[Any], volumes: Iterable[np.ndarray], k: int, size: int,
                 rule: SeriesRule) -> pd.DataFrame:
    """One row per series (rows with ``SeriesInstanceUID``, ``vendor``, ``label``): its score and the
    slice that scored highest."""
    rows = []
    for row, volume in zip(series, volumes, strict=True):
        probs = predict(model, all_slabs(volume, k, size))
        rows.append({"SeriesInstanceUID": row.SeriesInstanceUID, "vendor": row.vendor, "label": int(row.label),
                     "score": series_score(probs, rule), "best_z": int(np.argmax(probs))})
    return pd.DataFrame(rows)


def fold_metrics(preds: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, float]]:
    """One fold's per-vendor table at its own Youden point, and the same figures as flat metrics,
    with that point as ``threshold``: the card reads sensitivity and specificity at the pooled
    point (``cv.threshold``), and a fold's run at another without it said which."""
    threshold = youden_threshold(preds.label.to_numpy(), preds.score.to_numpy()) if preds.label.nunique() == 2 else 0.5
    table = per_vendor_metrics(preds, threshold)
    by_vendor = table.set_index("vendor")
    flat = {f"{m}.{v}": float(by_vendor.loc[v, m]) for v in table.vendor for m in FOLD_METRICS}
    flat["threshold"] = float(threshold)
    return table, {k: v for k, v in flat.items() if np.isfinite(v)}


@dataclass(frozen=True)
class CVSummary:
    """The pooled out-of-fold predictions, summarised."""

    threshold: float
    per_fold: pd.DataFrame     # fold × vendor metrics at the pooled threshold
    by_vendor: pd.DataFrame    # mean ± std across folds per vendor, and ``all``
    result: dict[str, Any]     # mean_auc, std_auc, vendor_auc, threshold, final_epochs

    def metrics(self) -> dict[str, float]:
        out = {"cv.mean_auc": self.result["mean_auc"], "cv.std_auc": self.result["std_auc"],
               "cv.threshold": self.threshold}
        out.update({f"cv.auc.{v}": a for v, a in self.result["vendor_auc"].items()})
        return out


def summarise_predictions(preds: pd.DataFrame, best_epochs: list[int]) -> CVSummary:
    """Per-fold × vendor metrics at the pooled Youden point, their mean ± std, and the epochs the
    final model trains for (the median of the folds' best epochs)."""
    threshold = youden_threshold(preds.label.to_numpy(), preds.score.to_numpy())
    per_fold = _per_fold(preds, threshold)
    summary = summarise_folds(per_fold)
    by_vendor = summary.set_index("vendor")
    mean_auc, vendor_auc = _auc_figures(by_vendor)
    result: dict[str, Any] = {
        "mean_auc": mean_auc,
        "std_auc": float(by_vendor.loc["all", "auc_std"]),
        "vendor_auc": vendor_auc,
        "threshold": threshold,
        "final_epochs": int(max(1, np.median(best_epochs))),
    }
    return CVSummary(threshold, per_fold, summary, result)


def fold_mean_auc(preds: pd.DataFrame) -> tuple[float, dict[str, float]]:
    """The fold-mean AUC of `preds` (``fold``, ``vendor``, ``label``, ``score``) and each vendor's:
    what :func:`summarise_predictions` reports as ``mean_auc`` and ``vendor_auc``, for any scores
    over the same folds (AUC needs no threshold)."""
    return _auc_figures(summarise_folds(_per_fold(preds, 0.5)).set_index("vendor"))


def _per_fold(preds: pd.DataFrame, threshold: float) -> pd.DataFrame:
    """Fold × vendor metrics (and each fold's ``all``) at `threshold`."""
    return pd.concat([per_vendor_metrics(g, threshold).assign(fold=i) for i, g in preds.groupby("fold")],
                     ignore_index=True)


def _auc_figures(by_vendor: pd.DataFrame) -> tuple[float, dict[str, float]]:
    """``mean_auc`` and ``vendor_auc`` of a :func:`summarise_folds` table indexed by vendor."""
    return (float(by_vendor.loc["all", "auc_mean"]),
            {str(v): float(by_vendor.loc[v, "auc_mean"]) for v in by_vendor.index if v != "all"})


def vendor_evidence(preds: pd.DataFrame, threshold: float, by_vendor: pd.DataFrame, level: float = 0.95,
                    seed: int = 0) -> pd.DataFrame:
    """What a reviewer needs per vendor (and ``all``), from the pooled out-of-fold predictions: series
    and positives, the pooled AUC with a stratified bootstrap interval, the fold-mean AUC ± sd (what
    the promotion gate compares; from `by_vendor`, :class:`CVSummary.by_vendor`), and sensitivity,
    specificity and the four outcome counts at `threshold`."""
    folds = by_vendor.set_index("vendor")
    rows = []
    for vendor, part in [("all", preds), *preds.groupby("vendor", sort=True)]:
        m = binary_metrics(part.label.to_numpy(), part.score.to_numpy(), threshold)
        pred, label = part.score >= threshold, part.label == 1
        low, high = float("nan"), float("nan")  # a bootstrap over a handful of one class is no interval
        if min(int(label.sum()), int((~label).sum())) >= MIN_CASES_FOR_INTERVAL:
            low, high = auc_confidence_interval(part.label.to_numpy(), part.score.to_numpy(), level, seed=seed)
        counted = folds.loc[vendor, "auc_folds"] if vendor in folds.index and "auc_folds" in folds else float("nan")
        rows.append({"vendor": str(vendor), "n": len(part), "positives": int(label.sum()), "auc_pooled": m["auc"],
                     "auc_ci_low": low, "auc_ci_high": high,
                     "auc_fold_mean": float(folds.loc[vendor, "auc_mean"]) if vendor in folds.index else float("nan"),
                     "auc_fold_std": float(folds.loc[vendor, "auc_std"]) if vendor in folds.index else float("nan"),
                     "auc_folds": float(counted),
                     "sensitivity": m["sensitivity"], "specificity": m["specificity"],
                     "tp": int((pred & label).sum()), "fp": int((pred & ~label).sum()),
                     "fn": int((~pred & label).sum()), "tn": int((~pred & ~label).sum())})
    return pd.DataFrame(rows)
