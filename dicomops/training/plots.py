"""Pictures a reviewer reads in the MLflow UI: ROC curves, confusion matrix, sample slices."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score, roc_curve

from dicomops.layout import WorkLayout


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _roc(ax: Any, frame: pd.DataFrame, label: str) -> None:
    if frame.label.nunique() < 2:
        return
    fpr, tpr, _ = roc_curve(frame.label, frame.score)
    ax.plot(fpr, tpr, label=f"{label} (AUC {roc_auc_score(frame.label, frame.score):.3f}, n={len(frame)})")


def _roc_figure(curves: list[tuple[str, pd.DataFrame]], title: str, out: Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 5))
    for label, frame in curves:
        _roc(ax, frame, label)
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", title=title)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def roc_by_vendor(preds: pd.DataFrame, out: Path) -> Path:
    curves = [("all", preds)] + [(str(v), part) for v, part in preds.groupby("vendor")]
    return _roc_figure(curves, "Series-level ROC by vendor", out)


def roc_by_fold(preds: pd.DataFrame, out: Path) -> Path:
    return _roc_figure([(f"fold {f}", part) for f, part in preds.groupby("fold")], "Series-level ROC by fold", out)


def confusion(preds: pd.DataFrame, threshold: float, out: Path) -> Path:
    plt = _plt()
    pred = (preds.score >= threshold).astype(int)
    matrix = np.array([[((preds.label == t) & (pred == p)).sum() for p in (0, 1)] for t in (0, 1)])
    fig, ax = plt.subplots(figsize=(4, 3.6))
    ax.imshow(matrix, cmap="Blues")
    for (i, j), v in np.ndenumerate(matrix):
        ax.text(j, i, str(v), ha="center", va="center", fontsize=14)
    ax.set(xticks=[0, 1], yticks=[0, 1], xticklabels=["no nodule", "nodule"], yticklabels=["no nodule", "nodule"],
           xlabel="predicted", ylabel="label", title=f"Out-of-fold, threshold {threshold:.3f}")
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def sample_grid(layout: WorkLayout, preds: pd.DataFrame, out: Path, n: int = 8) -> Path:
    """The highest-scoring slice of a few series per outcome, with label and score."""
    from dicomops.training.data import load_volume

    plt = _plt()
    pre = layout.preprocessed
    index = pre.read_index().set_index("SeriesInstanceUID")
    picks = preds.sort_values("score", ascending=False)
    chosen = pd.concat([picks[picks.label == 1].head(n // 2), picks[picks.label == 0].head(n // 2)])
    fig, axes = plt.subplots(2, max(len(chosen) // 2, 1), figsize=(2.6 * max(len(chosen) // 2, 1), 5.6), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, row in zip(axes.ravel(), chosen.itertuples(), strict=False):
        volume = load_volume(pre.volume(index.loc[row.SeriesInstanceUID, "path"]))
        ax.imshow(volume[:, :, row.best_z].astype(np.float32).T, cmap="gray", vmin=0, vmax=1, origin="lower")
        ax.set_title(f"{row.vendor} y={row.label} p={row.score:.2f}", fontsize=8)
    fig.suptitle("Highest-scoring slice per series (top: nodule series, bottom: none)")
    fig.tight_layout()
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return out
