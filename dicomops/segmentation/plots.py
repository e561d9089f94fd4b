"""Pictures of a nodule segmentation model for the MLflow UI: FROC curves and contour grids.

Saved at :data:`DPI` with text of at least 10 pt, so that they are legible at the size the browser
shows the PNG; colours are Okabe–Ito (told apart with the common colour-vision deficiencies).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dicomops.segmentation.metrics import FP_RATES, Froc

DPI = 100
CURVE_COLOURS = ("#000000", "#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#AA4499")
REFERENCE_COLOUR = "#009E73"
PREDICTION_COLOUR = "#D55E00"
GRID_COLUMNS = 4
FROC_SIZE = (6.5, 5.0)  # inches; 650 × 500 px at DPI
PANEL_SIZE = (3.0, 3.5)  # inches per contour panel, caption included
GRID_MARGIN = 1.0  # inches for the title and the legend
CASE_KEYS = ("image", "reference", "prediction", "centre", "caption")
RATE_LABELS = ("1/8", "1/4", "1/2", "1", "2", "4", "8")


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def froc_figure(curves: Mapping[str, Froc], title: str, out: Path) -> Path:
    """FROC curves on a log2 axis from 1/8 to 8 false positives per scan, with the seven LUNA16
    operating points marked and CPM in the legend (no counts: those people see are released under
    differential privacy, on the card)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=FROC_SIZE, layout="constrained")
    lo, hi = FP_RATES[0], FP_RATES[-1]
    for (name, curve), colour in zip(curves.items(), CURVE_COLOURS * (len(curves) // len(CURVE_COLOURS) + 1),
                                     strict=False):
        if curve.nodules == 0 or len(curve.fps_per_scan) == 0:
            ax.plot([], [], color=colour, label=f"{name}: no nodules")
            continue
        # Start at no false positives left of the axis and hold the last point to its right edge,
        # so the step curve shows where it is flat; log axes cannot show 0 itself.
        x = np.r_[lo / 8, np.maximum(curve.fps_per_scan, lo / 8), hi * 2]
        y = np.r_[0.0, curve.sensitivity, curve.sensitivity[-1]]
        ax.plot(x, y, drawstyle="steps-post", color=colour, lw=1.8,
                label=f"{name}: CPM {curve.cpm:.3f}")
        rates = list(curve.at_rates)
        ax.plot(rates, [curve.at_rates[r] for r in rates], "o", color=colour, ms=6, mec="white", mew=0.8,
                clip_on=False)
    ax.set_xscale("log", base=2)
    ax.set_xlim(lo, hi)
    ax.set_ylim(0, 1.02)
    ax.set_xticks(FP_RATES, RATE_LABELS, fontsize=10)
    ax.set_xticks([], minor=True)
    ax.tick_params(axis="y", labelsize=10)
    ax.set_xlabel("average false positives per scan", fontsize=11)
    ax.set_ylabel("sensitivity (nodules detected)", fontsize=11)
    ax.set_title(f"{title}\ndots: the 7 LUNA16 operating points; CPM is their mean", fontsize=12)
    ax.grid(True, which="major", alpha=0.4)
    ax.legend(fontsize=10, loc="lower right")
    fig.savefig(out, dpi=DPI)
    plt.close(fig)
    return out


def _crop_slice(volume: np.ndarray, centre: Sequence[int], crop: int) -> np.ndarray:
    """The axial slice through `centre`, `crop` × `crop` around (i, j) (smaller at the volume's
    edge), as an image array: rows j, columns i."""
    i, j, k = (int(c) for c in centre)
    ni, nj, nk = volume.shape
    if not (0 <= i < ni and 0 <= j < nj and 0 <= k < nk):
        raise ValueError(f"centre {tuple(centre)} lies outside the volume of shape {volume.shape}")
    i0 = min(max(i - crop // 2, 0), max(ni - crop, 0))
    j0 = min(max(j - crop // 2, 0), max(nj - crop, 0))
    return np.asarray(volume[i0:i0 + crop, j0:j0 + crop, k]).T


def _outline(ax: Any, mask: np.ndarray, colour: str) -> None:
    mask = (mask > 0).astype(np.float32)
    if 0 < mask.sum() < mask.size:  # a constant mask has no contour at 0.5
        ax.contour(mask, levels=[0.5], colors=colour, linewidths=1.6)


def contour_grid(cases: Sequence[Mapping[str, Any]], out: Path, title: str, crop: int = 64) -> Path:
    """Reference (green) and predicted (vermilion) outlines on the axial slice through each case's
    centre, cropped around it, up to :data:`GRID_COLUMNS` panels a row, captioned underneath."""
    from matplotlib.lines import Line2D

    if crop < 2:
        raise ValueError(f"crop must be at least 2 voxels, got {crop}")
    for n, case in enumerate(cases):
        if missing := [k for k in CASE_KEYS if k not in case]:
            raise ValueError(f"case {n} lacks key(s) {missing}; each case needs {list(CASE_KEYS)}")
    plt = _plt()
    cols = min(GRID_COLUMNS, max(len(cases), 1))
    rows = max((len(cases) + cols - 1) // cols, 1)
    fig, axes = plt.subplots(rows, cols, figsize=(PANEL_SIZE[0] * cols, PANEL_SIZE[1] * rows + GRID_MARGIN),
                             squeeze=False, layout="constrained")
    for ax in axes.ravel():
        ax.axis("off")
    if not cases:
        axes[0, 0].text(0.5, 0.5, "no cases", ha="center", va="center", fontsize=12)
    for ax, case in zip(axes.ravel(), cases, strict=False):
        ax.axis("on")
        centre = case["centre"]
        ax.imshow(_crop_slice(case["image"], centre, crop), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        _outline(ax, _crop_slice(np.asarray(case["reference"]), centre, crop), REFERENCE_COLOUR)
        _outline(ax, _crop_slice(np.asarray(case["prediction"]), centre, crop), PREDICTION_COLOUR)
        ax.set_xlabel(str(case["caption"]), fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
    handles = [Line2D([], [], color=REFERENCE_COLOUR, lw=2, label="reference"),
               Line2D([], [], color=PREDICTION_COLOUR, lw=2, label="prediction")]
    fig.legend(handles=handles, loc="outside lower center", ncol=2, fontsize=11, frameon=False)
    fig.suptitle(f"{title}\naxial slice through each nodule, {crop} × {crop} voxels", fontsize=12)
    fig.savefig(out, dpi=DPI)
    plt.close(fig)
    return out
