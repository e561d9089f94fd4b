"""Classification metrics per fold and per vendor (a data slice), and their summaries."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from sklearn.metrics import cohen_kappa_score, f1_score, roc_auc_score, roc_curve


def youden_threshold(y: np.ndarray, score: np.ndarray) -> float:
    """The operating point maximising sensitivity + specificity - 1 on (y, score).

    Where no threshold does better than calling every case negative (a model that ranks no positive
    above a negative), that is the point: scikit-learn names it +inf, which a DICOM SR's numeric item
    and a JSON answer cannot carry, so it is the smallest float above the highest score instead. The
    same cases are called positive (none), and the threshold can be written down (a one-epoch model
    of the tests did this on a CPU without AVX-512, and every SR of its studies failed)."""
    fpr, tpr, thresholds = roc_curve(y, score)
    best = float(thresholds[int(np.argmax(tpr - fpr))])
    return best if np.isfinite(best) else float(np.nextafter(np.max(np.asarray(score, dtype=float)), np.inf))


def binary_metrics(y: np.ndarray, score: np.ndarray, threshold: float) -> dict[str, float]:
    """ROC AUC, and sensitivity, specificity, F1 and Cohen's kappa at `threshold`.

    AUC is NaN when only one class is present (it is undefined, not 0.5).
    """
    y = np.asarray(y).astype(int)
    score = np.asarray(score, dtype=float)
    pred = (score >= threshold).astype(int)
    tp = int(((pred == 1) & (y == 1)).sum())
    tn = int(((pred == 0) & (y == 0)).sum())
    fp = int(((pred == 1) & (y == 0)).sum())
    fn = int(((pred == 0) & (y == 1)).sum())
    both = len(np.unique(y)) == 2
    return {
        "auc": float(roc_auc_score(y, score)) if both else float("nan"),
        "sensitivity": tp / (tp + fn) if tp + fn else float("nan"),
        "specificity": tn / (tn + fp) if tn + fp else float("nan"),
        "f1": float(f1_score(y, pred, zero_division=0)),
        "kappa": float(cohen_kappa_score(y, pred)) if len(np.unique(np.r_[y, pred])) > 1 else float("nan"),
        "n": float(len(y)),
        "positives": float(y.sum()),
    }


def per_vendor_metrics(frame: pd.DataFrame, threshold: float) -> pd.DataFrame:
    """Metrics for every vendor in `frame` (columns ``vendor``, ``label``, ``score``) and ``all``."""
    rows = [{"vendor": "all", **binary_metrics(frame.label.to_numpy(), frame.score.to_numpy(), threshold)}]
    for vendor, part in frame.groupby("vendor", sort=True):
        rows.append({"vendor": vendor, **binary_metrics(part.label.to_numpy(), part.score.to_numpy(), threshold)})
    return pd.DataFrame(rows)


def summarise_folds(per_fold: pd.DataFrame) -> pd.DataFrame:
    """Mean and standard deviation across folds for each vendor and metric, and ``auc_folds``, the
    folds whose AUC counts (a fold without both classes of a vendor has none)."""
    metrics = ["auc", "sensitivity", "specificity", "f1", "kappa"]
    grouped = per_fold.groupby("vendor")[metrics]
    mean, std = grouped.mean(), grouped.std(ddof=1)
    out = mean.add_suffix("_mean").join(std.add_suffix("_std"))
    out["auc_folds"] = per_fold.groupby("vendor")["auc"].count()
    return out.reset_index()


def auc_confidence_interval(y: np.ndarray, score: np.ndarray, level: float = 0.95, n_boot: int = 2000,
                            seed: int = 0) -> tuple[float, float]:
    """A stratified percentile-bootstrap interval for the ROC AUC of (y, score); (nan, nan) when a
    class is missing (the resamples: :func:`bootstrap_aucs`)."""
    if not (0 < level < 1):
        raise ValueError(f"level must lie in (0, 1), got {level}")
    aucs = bootstrap_aucs(y, [score], n_boot, seed)[:, 0]
    if np.isnan(aucs).all():
        return float("nan"), float("nan")
    tail = (1 - level) / 2
    low, high = np.quantile(aucs, [tail, 1 - tail])
    return float(low), float(high)


def bootstrap_aucs(y: np.ndarray, scores: Sequence[np.ndarray], n_boot: int = 2000, seed: int = 0) -> np.ndarray:
    """The ROC AUC of each of `scores` over the same `n_boot` stratified resamples of the series:
    shape (n_boot, len(scores)), NaN when a class is missing. The same draws for every score make
    their differences paired.

    Positives and negatives are resampled separately, as pROC does by default, so every resample
    keeps both classes and the interval exists even for a vendor with three positives. The AUC of a
    resample is the Mann-Whitney statistic read from one comparison matrix of positives × negatives
    weighted by how often each was drawn, so 2,000 resamples cost about as much as 30 calls of
    ``roc_auc_score`` (``benchmarks/model_card.py`` measures it against ``scipy.stats.bootstrap``).
    """
    y = np.asarray(y).astype(int)
    scores = [np.asarray(score, dtype=float) for score in scores]
    n_pos, n_neg = int((y == 1).sum()), int((y == 0).sum())
    if n_pos == 0 or n_neg == 0:
        return np.full((n_boot, len(scores)), np.nan)
    rng = np.random.default_rng(seed)
    draws_pos = rng.multinomial(n_pos, np.full(n_pos, 1 / n_pos), size=n_boot)
    draws_neg = rng.multinomial(n_neg, np.full(n_neg, 1 / n_neg), size=n_boot)
    out = np.empty((n_boot, len(scores)))
    for j, score in enumerate(scores):
        pos, neg = score[y == 1], score[y == 0]
        wins = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])
        out[:, j] = ((draws_pos @ wins) * draws_neg).sum(axis=1) / (n_pos * n_neg)  # one BLAS product
    return out
