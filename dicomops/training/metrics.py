"""Classification metrics per fold and per vendor (a data slice), and their summaries."""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.metrics import cohen_kappa_score, f1_score, roc_auc_score, roc_curve


def youden_threshold(y: np.ndarray, score: np.ndarray) -> float:
    """The operating point maximising sensitivity + specificity - 1 on (y, score)."""
    fpr, tpr, thresholds = roc_curve(y, score)
    return float(thresholds[int(np.argmax(tpr - fpr))])


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
    """Mean and standard deviation across folds for each vendor and metric."""
    metrics = ["auc", "sensitivity", "specificity", "f1", "kappa"]
    grouped = per_fold.groupby("vendor")[metrics]
    mean, std = grouped.mean(), grouped.std(ddof=1)
    out = mean.add_suffix("_mean").join(std.add_suffix("_std"))
    return out.reset_index()
