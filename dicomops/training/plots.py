"""Pictures a reviewer reads in the MLflow UI: ROC curves, confusion matrices, sample slices.

Saved at :data:`DPI` with text of at least 10 pt, so that a caption is legible at the size the
browser shows the PNG.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score, roc_curve

from dicomops.layout import WorkLayout

if TYPE_CHECKING:
    from torch import nn

DPI = 100
# The order a reviewer reads outcomes in: the errors first.
OUTCOMES = ("FP", "FN", "TP", "TN")
OUTCOME_NAMES = {"FP": "false positive", "FN": "missed nodule", "TP": "true positive", "TN": "true negative"}
# Okabe–Ito colours (told apart with the common colour-vision deficiencies), the purple darkened
# so that it reads as text on white.
OUTCOME_COLOURS = {"FP": "#D55E00", "FN": "#AA4499", "TP": "#009E73", "TN": "#0072B2"}
MASK_COLOUR = "#00E5FF"
SALIENCY_CMAP = "inferno"
GRID_COLUMNS = 4
PREDICTION_COLUMNS = ("SeriesInstanceUID", "vendor", "label", "score", "best_z")


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _roc(ax: Any, frame: pd.DataFrame, label: str) -> None:
    if frame.label.nunique() < 2:
        return
    fpr, tpr, _ = roc_curve(frame.label, frame.score)
    # No n= in the legend: counts people see are released under differential privacy, and a
    # picture is not the place for them (the card's evidence table is).
    ax.plot(fpr, tpr, label=f"{label} (AUC {roc_auc_score(frame.label, frame.score):.3f})")


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


def roc_by_engine(scores: pd.DataFrame, out: Path) -> Path:
    """The held-out INT8 comparison (:func:`dicomops.export.qat.held_out`): one curve per engine over
    every fold's validation series."""
    return _roc_figure([(str(e), part) for e, part in scores.groupby("engine", sort=False)],
                       "Held-out series by engine (pooled over folds)", out)


def confusion(preds: pd.DataFrame, threshold: float, out: Path) -> Path:
    """The pooled out-of-fold confusion at `threshold` as shares of each truth row: no exact count
    leaves in a picture (an outcome cell of one series could single a patient out)."""
    plt = _plt()
    share = _row_shares(confusion_counts(preds, threshold).loc["all"])
    fig, ax = plt.subplots(figsize=(4, 3.6))
    ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    for (i, j), v in np.ndenumerate(share):
        ax.text(j, i, f"{v:.0%}", ha="center", va="center", fontsize=14, color="white" if v > 0.6 else "black")
    ax.set(xticks=[0, 1], yticks=[0, 1], xticklabels=["no nodule", "nodule"], yticklabels=["no nodule", "nodule"],
           xlabel="predicted", ylabel="label", title=f"Out-of-fold, threshold {threshold:.3f}")
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


# -- outcomes at the operating threshold -------------------------------------------------------


def outcomes(labels: Any, scores: Any, threshold: float) -> np.ndarray:
    """``TP``/``FP``/``FN``/``TN`` per series; a score at the threshold counts as positive, as in
    :func:`dicomops.training.metrics.binary_metrics`."""
    truth = np.asarray(labels).astype(int) == 1
    positive = np.asarray(scores, dtype=float) >= threshold
    return np.where(positive, np.where(truth, "TP", "FP"), np.where(truth, "FN", "TN"))


def _row_shares(row: pd.Series) -> np.ndarray:
    """[[TN, FP], [FN, TP]] of one confusion row as shares of its truth row (0 where a row is empty)."""
    matrix = np.array([[row.TN, row.FP], [row.FN, row.TP]], dtype=float)
    totals = matrix.sum(axis=1, keepdims=True)
    return np.divide(matrix, totals, out=np.zeros(matrix.shape), where=totals > 0)


def confusion_counts(preds: pd.DataFrame, threshold: float) -> pd.DataFrame:
    """TP, FP, FN, TN and n at `threshold` for ``all`` and for each vendor (rows, in that order)."""
    frame = preds.assign(outcome=outcomes(preds.label, preds.score, threshold))
    parts = [("all", frame)] + [(str(v), part) for v, part in frame.groupby("vendor", sort=True)]
    rows = {name: part.outcome.value_counts().reindex(["TP", "FP", "FN", "TN"], fill_value=0)
            for name, part in parts}
    table = pd.DataFrame(rows).T.astype(int)
    table["n"] = table.sum(axis=1)
    table.index.name, table.columns.name = "vendor", None
    return table


def _allocate(sizes: list[int], slots: int) -> list[int]:
    """Share `slots` among groups of `sizes` one at a time in turn, skipping groups used up."""
    taken = [0] * len(sizes)
    while slots > 0 and any(t < s for t, s in zip(taken, sizes, strict=True)):
        for i, size in enumerate(sizes):
            if slots > 0 and taken[i] < size:
                taken[i] += 1
                slots -= 1
    return taken


def pick_samples(preds: pd.DataFrame, threshold: float, n: int = 12) -> pd.DataFrame:
    """At most `n` series to show, with an ``outcome`` column: false positives, then missed
    nodules, then true positives, then true negatives.

    The errors get up to two thirds of the places, shared between FP and FN in turn; the correct
    series fill the rest, TP and TN in turn, and any place left goes back to the errors. Within an
    outcome the most confident come first: the highest-scoring false and true positives, the
    lowest-scoring misses and true negatives.
    """
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    frame = preds.assign(outcome=outcomes(preds.label, preds.score, threshold))
    ranked = {o: frame[frame.outcome == o].sort_values("score", ascending=o in ("FN", "TN"), kind="stable")
              for o in OUTCOMES}
    sizes = {o: len(ranked[o]) for o in OUTCOMES}
    errors = _allocate([sizes["FP"], sizes["FN"]], n - n // 3)
    rest = _allocate([sizes["TP"], sizes["TN"]], n - sum(errors))
    extra = _allocate([sizes["FP"] - errors[0], sizes["FN"] - errors[1]], n - sum(errors) - sum(rest))
    counts = {"FP": errors[0] + extra[0], "FN": errors[1] + extra[1], "TP": rest[0], "TN": rest[1]}
    return pd.concat([ranked[o].head(counts[o]) for o in OUTCOMES], ignore_index=True)


def short_series_id(uid: str, length: int = 8) -> str:
    """The last `length` characters of a (pseudonymised) SeriesInstanceUID, enough to find it."""
    uid = str(uid)
    return uid if len(uid) <= length else "…" + uid[-length:]


def sample_caption(row: Any) -> tuple[str, str]:
    """The heading (outcome) and the two lines under one sample: vendor and series, truth and score."""
    truth = "nodule" if int(row.label) == 1 else "no nodule"
    heading = f"{row.outcome} · {OUTCOME_NAMES[row.outcome]}"
    return heading, f"{row.vendor} · series {short_series_id(row.SeriesInstanceUID)}\ntruth: {truth} · score {row.score:.2f}"


# -- pictures ----------------------------------------------------------------------------------


def confusion_by_vendor(preds: pd.DataFrame, threshold: float, out: Path) -> Path:
    """One 2 × 2 confusion matrix for all series and one per vendor, at `threshold`.

    Cells show the share of the truth row (sensitivity and specificity on the diagonal), never the
    count: counts people see are released under differential privacy (the card's evidence table).
    """
    plt = _plt()
    table = confusion_counts(preds, threshold)
    cols = min(3, len(table))
    rows = (len(table) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.3 * cols, 3.3 * rows + 0.6), squeeze=False,
                             layout="constrained")
    for ax in axes.ravel()[len(table):]:
        ax.axis("off")
    for ax, (vendor, row) in zip(axes.ravel(), table.iterrows(), strict=False):
        share = _row_shares(row)
        empty = [row.TN + row.FP == 0, row.FN + row.TP == 0]
        ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
        for (i, j), value in np.ndenumerate(share):
            ax.text(j, i, "\u2013" if empty[i] else f"{value:.0%}", ha="center", va="center", fontsize=13,
                    color="white" if value > 0.6 else "black")
        ax.set_xticks([0, 1], ["no nodule", "nodule"], fontsize=10)
        ax.set_yticks([0, 1], ["no\nnodule", "nodule"], fontsize=10)
        ax.set_xlabel("predicted", fontsize=10)
        ax.set_ylabel("truth", fontsize=10)
        ax.set_title(str(vendor), fontsize=12, fontweight="bold" if vendor == "all" else "normal")
    fig.suptitle(f"Out-of-fold confusion by vendor at threshold {threshold:.3f}\n"
                 "share of the truth row (diagonal: specificity, sensitivity)", fontsize=12)
    fig.savefig(out, dpi=DPI)
    plt.close(fig)
    return out


def _radiological(image: np.ndarray) -> np.ndarray:
    """An (X, Y) RAS slice as an image array shown with ``origin="lower"``: anterior up, the
    patient's right on the left of the picture (the radiological convention)."""
    return np.flip(image.T, axis=1)


def _slab_tensor(volume: np.ndarray, z: int, k: int, size: int) -> Any:
    """The (k, size, size) slab the model scored at `z`, resized as :mod:`.data` resizes it."""
    import torch
    import torch.nn.functional as F

    from dicomops.preprocessing.slabs import slab

    t = torch.from_numpy(slab(volume, z, k)[None].astype(np.float32))
    if t.shape[-2:] != (size, size):
        t = F.interpolate(t, size=(size, size), mode="area")
    return t[0]


def _model_of(models: Mapping[int, nn.Module] | nn.Module, fold: Any) -> nn.Module:
    return models[int(fold)] if isinstance(models, Mapping) else models


def _grid_saliency(models: Mapping[int, nn.Module] | nn.Module, picks: pd.DataFrame, slabs: dict[str, Any],
                   shapes: dict[str, tuple[int, int]]) -> dict[str, np.ndarray]:
    """Grad-CAM per picked series, one batch per model, resized to the shown slice."""
    import torch
    import torch.nn.functional as F

    from dicomops.training.saliency import saliency_maps

    folds = picks.fold if isinstance(models, Mapping) else pd.Series(0, index=picks.index)
    maps: dict[str, np.ndarray] = {}
    for fold, part in picks.groupby(folds):
        uids = list(part.SeriesInstanceUID)
        cams = saliency_maps(_model_of(models, fold), torch.stack([slabs[u] for u in uids]))
        for uid, cam in zip(uids, cams, strict=True):
            maps[uid] = F.interpolate(torch.from_numpy(cam)[None, None], size=shapes[uid], mode="bilinear",
                                      align_corners=False)[0, 0].numpy()
    return maps


def sample_grid(layout: WorkLayout, preds: pd.DataFrame, threshold: float, out: Path, *,
                models: Mapping[int, nn.Module] | nn.Module | None = None, input_size: int = 128,
                n: int = 12) -> Path:
    """The highest-scoring slice of up to `n` series, errors first (see :func:`pick_samples`).

    Each sample is framed in its outcome's colour and captioned with outcome, vendor, a short
    series pseudonym, truth and score; the annotated nodule is outlined. With `models` (one per
    fold, keyed by fold number, as :func:`dicomops.training.saliency.fold_models` returns them, or
    one model for every series) a Grad-CAM overlay shows where the model found nodule evidence:
    the fold's model is the one that scored the series without having trained on it.
    `input_size` is the size the model was trained at (``TrainConfig.input_size``).
    """
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    needed = PREDICTION_COLUMNS + (("fold",) if isinstance(models, Mapping) else ())
    missing = [c for c in needed if c not in preds.columns]
    if missing:
        raise ValueError(f"preds lacks column(s) {missing}; pass the out-of-fold predictions of cv.summarise")
    picks = pick_samples(preds, threshold, n)
    if isinstance(models, Mapping) and (absent := sorted({int(f) for f in picks.fold} - set(models))):
        raise ValueError(f"no model for fold(s) {absent}; pass every fold's model (saliency.fold_models)")
    plt = _plt()
    pre = layout.preprocessed
    paths = pre.read_index().set_index("SeriesInstanceUID").path
    # One volume in memory at a time: keep the shown slice, its mask and the slab the model scored.
    slices, masks, slabs = {}, {}, {}
    for row in picks.itertuples():
        uid, z = row.SeriesInstanceUID, int(row.best_z)
        with np.load(pre.volume(paths[uid])) as npz:
            volume = npz["image"]
            slices[uid] = volume[:, :, z].astype(np.float32)
            masks[uid] = npz["mask"][:, :, z] if "mask" in npz.files else None
        if models is not None:
            from dicomops.training.saliency import input_channels

            model = _model_of(models, getattr(row, "fold", 0))
            slabs[uid] = _slab_tensor(volume, z, input_channels(model), input_size)
        del volume
    shapes = {uid: image.shape for uid, image in slices.items()}
    maps = _grid_saliency(models, picks, slabs, shapes) if models is not None and len(picks) else {}

    cols = min(GRID_COLUMNS, max(len(picks), 1))
    rows = max((len(picks) + cols - 1) // cols, 1)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.95 * rows + 1.4), squeeze=False,
                             layout="constrained")
    fig.get_layout_engine().set(wspace=0.04)  # a gap between neighbouring frames
    for ax in axes.ravel():
        ax.axis("off")
    for ax, row in zip(axes.ravel(), picks.itertuples(), strict=False):
        uid, colour = row.SeriesInstanceUID, OUTCOME_COLOURS[row.outcome]
        ax.axis("on")
        ax.imshow(_radiological(slices[uid]), cmap="gray", vmin=0, vmax=1, origin="lower")
        if uid in maps:
            heat = _radiological(maps[uid])
            rgba = plt.get_cmap(SALIENCY_CMAP)(heat)
            rgba[..., 3] = 0.6 * np.clip((heat - 0.2) / 0.8, 0, 1)  # weak evidence stays transparent
            ax.imshow(rgba, origin="lower")
        mask = masks[uid]
        if mask is not None and mask.any():
            ax.contour(_radiological(mask.astype(np.float32)), levels=[0.5], colors=MASK_COLOUR,
                       linewidths=1.2, origin="lower")
        heading, details = sample_caption(row)
        ax.set_title(heading, fontsize=12, fontweight="bold", color=colour)
        ax.set_xlabel(details, fontsize=11)
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_edgecolor(colour)
            spine.set_linewidth(5)

    shown = picks.outcome.value_counts()
    total = confusion_counts(preds, threshold).loc["all"]
    handles: list[Any] = [Patch(facecolor="white", edgecolor=OUTCOME_COLOURS[o], linewidth=3,
                                label=f"{o}: {OUTCOME_NAMES[o]} ({shown.get(o, 0)} of {total[o]} shown)")
                          for o in OUTCOMES]
    handles.append(Line2D([], [], color=MASK_COLOUR, lw=2, label="annotated nodule"))
    if maps:
        handles.append(Patch(color=plt.get_cmap(SALIENCY_CMAP)(0.75), label="Grad-CAM: nodule evidence"))
    fig.legend(handles=handles, loc="outside lower center", ncol=3, fontsize=11, frameon=False)
    if models is None:
        overlay = "No saliency overlay: no model given."
    elif isinstance(models, Mapping):
        overlay = ("Overlay: Grad-CAM of the fold model that scored the series, each map scaled to its own peak "
                   "(coarse: last conv stage).")
    else:
        overlay = ("Overlay: Grad-CAM of one model for every series, each map scaled to its own peak "
                   "(coarse: last conv stage).")
    fig.suptitle(f"Out-of-fold predictions at threshold {threshold:.3f}: errors first, then correct series.\n"
                 "Highest-scoring slice of each series; radiological view (patient's right on the left).\n"
                 + overlay, fontsize=12)
    fig.savefig(out, dpi=DPI)
    plt.close(fig)
    return out
