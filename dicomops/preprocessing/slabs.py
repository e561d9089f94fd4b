"""2.5D samples: k adjacent slices as channels, labelled by the nodule mask of the centre slice.

Sampling: every positive slice (at least ``min_positive_voxels`` mask voxels; with ``positive_area_share``,
also that share of the nodule's largest cross-section, the caps above and below left out) plus
``negative_ratio`` times as many negative slices drawn at random with a seed, per series; a series
without positives contributes negatives in the same proportion to the corpus average, so negative
series are seen. Every *hard* negative (a slice showing only a nodule that is not actionable) is
taken besides. Slab edges repeat the first or last slice.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

# slabs.parquet's columns; ``repeat`` (since 2026-12-07): how many times training takes the slab.
SLAB_COLUMNS = ["SeriesInstanceUID", "z", "slice_label", "series_label", "repeat"]


def slice_labels(mask: np.ndarray, min_voxels: int) -> np.ndarray:
    """1 for slices (last axis) whose mask (binary or instance ids) has at least `min_voxels` voxels."""
    return (np.count_nonzero(mask.reshape(-1, mask.shape[-1]), axis=0) >= min_voxels).astype(np.int8)


def central_slice_labels(mask: np.ndarray, ids: list[int] | None, min_voxels: int,
                         min_area_share: float) -> np.ndarray:
    """Slice labels (last axis) for the nodules `ids` of an instance mask (None: every nonzero value).

    1 where one of them covers at least `min_voxels` voxels and at least `min_area_share` of its own
    largest cross-section; -1 (*ignore*: neither trained on nor scored) where one shows only a cap
    smaller than that; 0 elsewhere. A cap of a 6 mm nodule looks like the middle of a 4 mm one, which
    is a negative, so labelling it positive teaches the classifier a contradiction. For a sphere a
    share of 0.5 keeps the middle 71 % of the slices it spans. A share of 0 gives :func:`slice_labels`.
    """
    depth = mask.shape[-1]
    flat = mask.reshape(-1, depth)
    values = [int(v) for v in np.unique(flat) if v] if ids is None else [int(v) for v in ids]
    labels = np.zeros(depth, np.int8)
    for value in values:
        area = np.count_nonzero(flat == value, axis=0)
        shows = area >= min_voxels
        if not shows.any():
            continue
        central = shows & (area >= min_area_share * area.max())
        labels[shows & ~central & (labels == 0)] = -1
        labels[central] = 1
    return labels


def slab_index(zs: np.ndarray, k: int, depth: int) -> np.ndarray:
    """(len(zs), k) slice numbers of the slabs centred on slices `zs` of a volume `depth` slices
    deep: ``z - k//2 … z + k//2``, edges repeated."""
    return np.clip(np.asarray(zs, dtype=np.int64)[:, None] + np.arange(-(k // 2), k // 2 + 1), 0, depth - 1)


def slab(volume: np.ndarray, z: int, k: int) -> np.ndarray:
    """Slices ``z - k//2 … z + k//2`` of a (X, Y, Z) volume as a (k, X, Y) array, edges repeated."""
    return np.moveaxis(volume[..., slab_index(np.array([z]), k, volume.shape[-1])[0]], -1, 0)


def slices_showing(mask: np.ndarray, ids: list[int], labels: np.ndarray, min_voxels: int) -> np.ndarray:
    """The positive slices (``labels == 1``) on which one of the nodules `ids` of an instance mask
    covers at least `min_voxels` voxels."""
    shows = slice_labels(np.isin(mask, ids), min_voxels) if ids else np.zeros(len(labels), np.int8)
    return np.flatnonzero((shows == 1) & (labels == 1))


def sample_slabs(index: pd.DataFrame, labels_by_series: dict[str, np.ndarray], negative_ratio: float,
                 seed: int, hard_by_series: dict[str, np.ndarray] | None = None,
                 repeat_by_series: dict[str, np.ndarray] | None = None, repeat: int = 1) -> pd.DataFrame:
    """The (series, z, slice_label, series_label) table that training draws from. `hard_by_series`:
    negative slices each series contributes whatever the draw (the random ones come from the rest).
    `repeat_by_series`: positive slices each series marks with ``repeat`` = `repeat` (every other
    row has 1): how many times training takes the slab (``build_slab_set(..., repeats=True)``, each
    copy augmented on its own); the negatives drawn are as many as without them."""
    rng = np.random.default_rng(seed)
    rows = []
    positives_total = sum(int(v.sum()) for v in labels_by_series.values())
    series_total = max(len(labels_by_series), 1)
    per_negative_series = round(negative_ratio * positives_total / series_total)
    for row in index.itertuples():
        lab = labels_by_series[row.SeriesInstanceUID]
        pos = np.flatnonzero(lab == 1)
        hard = np.intersect1d((hard_by_series or {}).get(row.SeriesInstanceUID, np.array([], int)),
                              np.flatnonzero(lab == 0))
        neg = np.setdiff1d(np.flatnonzero(lab == 0), hard)
        n_neg = round(negative_ratio * len(pos)) if len(pos) else per_negative_series
        n_neg = min(max(n_neg, 1), len(neg))
        chosen_neg = rng.choice(neg, size=n_neg, replace=False) if n_neg else np.array([], int)
        again = set(np.intersect1d((repeat_by_series or {}).get(row.SeriesInstanceUID, np.array([], int)), pos).tolist())
        for z in sorted(pos.tolist() + hard.tolist() + chosen_neg.tolist()):
            rows.append({"SeriesInstanceUID": row.SeriesInstanceUID, "z": int(z),
                         "slice_label": int(lab[z]), "series_label": int(row.label),
                         "repeat": repeat if z in again else 1})
    return pd.DataFrame(rows, columns=SLAB_COLUMNS)
