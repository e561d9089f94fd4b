"""How the field judges a 3D nodule segmentation model: LUNA16 FROC and CPM, per-nodule Dice and
Cohen's kappa, per vendor (a data slice), per nodule kind and per size.

Volumes are numpy arrays in (i, j, k) voxel order; `spacing` (mm per voxel along i, j, k) turns
voxel counts and distances into millimetres.

The detection rule is LUNA16's: a candidate (a connected component of the probability map above a
low threshold) hits a nodule when it overlaps the nodule's reference voxels or its centre lies
within the nodule's radius of the nodule's centroid. A nodule's score is its best hit's score;
extra hits on one nodule are ignored, and candidates hitting nothing are the false positives.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from scipy import ndimage
from sklearn.metrics import cohen_kappa_score, roc_auc_score

MIN_FINDING_MM = 3.0  # the smallest nodule annotated (LUNA16's too): below it, a speck, not a finding
# A nodule is round; a vessel's piece is a tube. A cylinder L long and D wide has an elongation
# (see elongation) of 1.15 L/D, a sphere 1, an ellipsoid its axes' ratio: 1.75 is a tube 1.5 times
# as long as it is wide, or an ellipsoid of 1.75:1. Above it, a segmented part is not reported as a
# finding (it stays a FROC candidate). On the demo's out-of-fold findings the 143 that hit a nodule
# measured 1.03-1.61; philips' two false series were a vessel (1.78) and a sliver of chest wall (2.51).
MAX_ELONGATION = 1.75
FP_RATES = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)  # LUNA16 operating points, false positives per scan
SIZE_EDGES_MM = (6.0, 10.0)
SIZE_BINS = ("<6 mm", "6-10 mm", ">=10 mm")
SIZE_SLUGS = {"<6 mm": "lt6", "6-10 mm": "6to10", ">=10 mm": "ge10"}
ABSENT = "absent"
KINDS = ("solid", "part-solid", "ground-glass")
ATTACHMENTS = ("none", "pleural", "vascular")
NODULE_COLUMNS = ("series", "vendor", "label", "diameter_mm", "kind", "attachment", "size_bin", "score",
                  "dice", "dice_native", "predicted_diameter_mm", "elongation")
# 26-connectivity: voxels touching at a face, an edge or a corner belong to one component.
CONNECTIVITY = np.ones((3, 3, 3), dtype=bool)


def size_bin(diameter_mm: float) -> str:
    """The Lung-RADS-like size category of a nodule: ``<6 mm``, ``6-10 mm`` or ``>=10 mm``."""
    d = float(diameter_mm)
    if not math.isfinite(d) or d < 0:
        raise ValueError(f"diameter_mm must be a finite non-negative number, got {diameter_mm!r}")
    return SIZE_BINS[int(np.searchsorted(SIZE_EDGES_MM, d, side="right"))]


def equivalent_diameter_mm(voxels: float, spacing: Sequence[float] | np.ndarray = (1.0, 1.0, 1.0)) -> float:
    """The diameter of the sphere with the volume of `voxels` voxels: (6V/π)^(1/3), V in mm³."""
    return float((6.0 * voxels * float(np.prod(spacing)) / math.pi) ** (1.0 / 3.0))


def mask_box(mask: np.ndarray, margin: int) -> tuple[slice, ...] | None:
    """The box around `mask`'s true voxels grown by `margin` per side, inside the array; None if none."""
    box = []
    for axis in range(mask.ndim):
        present = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        if not len(present):
            return None
        box.append(slice(max(int(present[0]) - margin, 0), min(int(present[-1]) + 1 + margin, mask.shape[axis])))
    return tuple(box)


def read_box(prob: np.ndarray, candidate_threshold: float, reference: np.ndarray | None = None) -> tuple[slice, ...]:
    """The box holding every voxel a judgement of `prob` reads: its candidates' (at or above
    `candidate_threshold`) and `reference`'s nonzero ones; one voxel where there are none.

    Everything :func:`findings` and :func:`evaluate_series` measure is unchanged by translation
    (centres and slices are shifted back), so they work inside it: on the demo's out-of-fold maps
    it is a few percent of the volume, and one fold's 30 series were judged in 0.9 s instead of
    13.5 s (same results; elongations to 1e-7).
    """
    keep = prob >= candidate_threshold
    if reference is not None:
        keep |= reference != 0
    return mask_box(keep, 0) or tuple(slice(0, 1) for _ in prob.shape)


@dataclass(frozen=True)
class NoduleRef:
    """One annotated nodule: its value in the reference instance map and what it is."""

    label: int
    diameter_mm: float
    kind: str = "solid"  # solid / part-solid / ground-glass
    attachment: str = "none"  # none / pleural / vascular


@dataclass(frozen=True, eq=False)
class NativeReference:
    """A series' reference on its own grid: the acquired slices and pixels, where the annotation
    was drawn and where the segmenter's SEG goes back (:func:`dicomops.segmentation.native.to_native_mask`).

    Attributes:
        index: (N, 3) native voxel indices (column, row, slice) of every annotated voxel.
        label: (N,) the nodule instance of each (the reference map's values).
        shape: (columns, rows, slices) of the native grid.
        to_pre: 4x4, native voxel index → preprocessed voxel index (``inv(pre_affine) @ native_affine``).
    """

    index: np.ndarray
    label: np.ndarray
    shape: tuple[int, int, int]
    to_pre: np.ndarray

    @classmethod
    def of(cls, index: np.ndarray, label: np.ndarray, shape: Sequence[int], native_affine: np.ndarray,
           pre_affine: np.ndarray) -> NativeReference:
        index, label = np.asarray(index, np.int64).reshape(-1, 3), np.asarray(label).ravel()
        if len(index) != len(label):
            raise ValueError(f"{len(index)} native voxel indices but {len(label)} labels; give one label per voxel")
        to_pre = np.linalg.inv(np.asarray(pre_affine, float)) @ np.asarray(native_affine, float)
        return cls(index, label, (int(shape[0]), int(shape[1]), int(shape[2])), to_pre)


def nearest_index(coords: np.ndarray) -> np.ndarray:
    """The voxel whose centre is nearest each continuous voxel coordinate: ``floor(x + 0.5)``, not
    rint, so a centre half-way between two voxels always takes the upper one."""
    return np.floor(coords + 0.5).astype(np.int64)


def read_on_native(mask: np.ndarray, to_pre: np.ndarray, low: Sequence[int] | np.ndarray, size: Sequence[int] | np.ndarray,
                   offset: Sequence[float] | np.ndarray = (0.0, 0.0, 0.0)) -> np.ndarray:
    """`mask` (on the preprocessing grid, its voxel 0 at preprocessed index `offset`) read at the
    centres of the native voxels of the box from `low`, `size` voxels per axis: each takes the
    preprocessed voxel nearest its centre (:func:`nearest_index`), background outside `mask`. The
    one lookup by which a prediction goes back to the acquired grid, for the SEG
    (:func:`dicomops.segmentation.native.to_native_mask`) and for the Dice read there
    (:func:`native_dice`); slice by slice, so a whole series takes one slice's coordinates in memory."""
    linear, shift = to_pre[:3, :3], to_pre[:3, 3] - np.asarray(offset, float)
    ii, jj = np.meshgrid(np.arange(low[0], low[0] + size[0], dtype=float),
                         np.arange(low[1], low[1] + size[1], dtype=float), indexing="ij")
    in_plane = linear[:, 0, None, None] * ii + linear[:, 1, None, None] * jj  # (3, I, J)
    limits = np.asarray(mask.shape)[:, None, None]
    out = np.zeros(tuple(int(n) for n in size), dtype=bool)
    for k in range(int(size[2])):
        idx = nearest_index(in_plane + (linear[:, 2] * (low[2] + k) + shift)[:, None, None])
        inside = ((idx >= 0) & (idx < limits)).all(axis=0)
        if inside.any():
            out[:, :, k][inside] = mask[idx[0][inside], idx[1][inside], idx[2][inside]]
    return out


def native_dice(selected: np.ndarray, offset: np.ndarray, reference: np.ndarray, native: NativeReference) -> float:
    """Dice on the native grid between `selected` (a boolean map on the preprocessing grid, its
    voxel 0 at preprocessed index `offset`) read there as the SEG is written (:func:`read_on_native`)
    and `reference`, (M, 3) native indices of one nodule. Only the native box around both is read:
    no native voxel outside it has a selected voxel nearest."""
    low, high = reference.min(axis=0).astype(float), reference.max(axis=0).astype(float)
    found = mask_box(selected, 0)
    if found is not None:
        corners = np.array(list(itertools.product(*[(b.start, b.stop - 1) for b in found])), float) + offset
        to_native = np.linalg.inv(native.to_pre)
        mapped = corners @ to_native[:3, :3].T + to_native[:3, 3]
        # A native voxel takes the preprocessed voxel nearest its centre: up to half a preprocessed
        # voxel away, so the box grows by that many native voxels, and one more.
        reach = np.ceil(0.5 * np.abs(to_native[:3, :3]).sum(axis=1)) + 1
        low, high = np.minimum(low, np.floor(mapped.min(axis=0) - reach)), np.maximum(high, np.ceil(mapped.max(axis=0) + reach))
    low = np.maximum(low, 0).astype(np.int64)
    high = np.minimum(high, np.asarray(native.shape) - 1).astype(np.int64)
    size = high - low + 1
    ref = np.zeros(tuple(int(n) for n in size), dtype=bool)
    ref[tuple((reference - low).T)] = True
    predicted = read_on_native(selected, native.to_pre, low, size, offset) if found is not None else np.zeros_like(ref)
    both = int(ref.sum()) + int(predicted.sum())
    return 2 * int((ref & predicted).sum()) / both if both else 1.0


@dataclass(frozen=True)
class Candidate:
    """One connected component of the probability map, as a detection."""

    centre: tuple[float, float, float]  # voxel coordinates of the component's centroid
    score: float  # the highest probability in the component
    voxels: int
    component: int  # its id in the component map


@dataclass
class SeriesEval:
    """What one series contributes to the metrics.

    `false_positive_diameters_mm` and `false_positive_elongations` are aligned with
    `false_positives`: the equivalent-sphere diameter and the elongation of the voxels at or above
    the segmentation threshold in each false-positive candidate (None where there are none). Left
    empty, they are filled with None.
    """

    series: str
    vendor: str
    nodules: list[dict[str, Any]]
    false_positives: list[float]
    dice: float
    present_ref: bool
    present_pred: bool
    false_positive_diameters_mm: list[float | None] = field(default_factory=list)
    # Aligned with `false_positives` too: the elongation of the same voxels (see elongation).
    false_positive_elongations: list[float | None] = field(default_factory=list)
    # The series label (an actionable nodule) and the actionable score of its findings
    # (dicomops.segmentation.actionable); None where the label or the image was not given.
    actionable_ref: bool | None = None
    actionable_score: float | None = None

    def __post_init__(self) -> None:
        for name in ("false_positive_diameters_mm", "false_positive_elongations"):
            values = getattr(self, name)
            if not values:
                setattr(self, name, [None] * len(self.false_positives))
            elif len(values) != len(self.false_positives):
                raise ValueError(f"{name} has {len(values)} entries but false_positives "
                                 f"{len(self.false_positives)}; give one per false positive")


@dataclass(frozen=True, eq=False)
class Froc:
    """A FROC curve (one operating point per distinct score, thresholds descending), the
    sensitivity at each LUNA16 rate and their mean, the CPM."""

    fps_per_scan: np.ndarray
    sensitivity: np.ndarray
    at_rates: dict[float, float]
    cpm: float
    nodules: int
    scans: int


# -- candidates and one series -----------------------------------------------------------------


def _voxels_of(diameter_mm: float, spacing: np.ndarray) -> float:
    """Voxels of a sphere of `diameter_mm` (the inverse of :func:`equivalent_diameter_mm`)."""
    return float(np.pi / 6 * diameter_mm**3 / np.prod(spacing))


def _check_spacing(spacing: Sequence[float]) -> np.ndarray:
    s = np.asarray(spacing, dtype=float)
    if s.shape != (3,) or not np.all(s > 0):
        raise ValueError(f"spacing must be three positive mm values (i, j, k), got {spacing!r}")
    return s


def extract_candidates(prob: np.ndarray, *, threshold: float = 0.1, min_voxels: int = 2,
                       max_candidates: int = 50) -> tuple[list[Candidate], np.ndarray]:
    """The connected components (26-connectivity) of ``prob >= threshold`` as candidates, best
    first, and the int32 component map in which candidate ``n`` (its ``component``) is ``n``.

    Components under `min_voxels` are dropped (single-voxel noise), and only the `max_candidates`
    highest-scoring are kept; both are left out of the map.
    """
    prob = np.asarray(prob)
    if prob.ndim != 3:
        raise ValueError(f"prob must be a 3D (i, j, k) array, got shape {prob.shape}")
    if min_voxels < 1 or max_candidates < 1:
        raise ValueError(f"min_voxels and max_candidates must be at least 1, got {min_voxels}, {max_candidates}")
    labels, n = ndimage.label(prob >= threshold, structure=CONNECTIVITY)
    if n == 0:
        return [], np.zeros(prob.shape, dtype=np.int32)
    # The statistics read only the foreground voxels: over the whole volume ndimage would sort
    # every background voxel too, ten times slower on a CT-sized map.
    fg = np.flatnonzero(labels)
    fg_labels = labels.ravel()[fg]
    ids = np.arange(1, n + 1)
    sizes = np.asarray(ndimage.sum_labels(np.ones(len(fg)), fg_labels, ids)).astype(np.int64)
    scores = np.asarray(ndimage.maximum(prob.ravel()[fg], fg_labels, ids), dtype=float)
    keep = ids[sizes >= min_voxels]
    # Stable on ties: the component found first (lowest index) wins.
    keep = keep[np.argsort(-scores[keep - 1], kind="stable")][:max_candidates]
    lookup = np.zeros(n + 1, dtype=np.int32)
    lookup[keep] = np.arange(1, len(keep) + 1, dtype=np.int32)
    component_map = lookup[labels]
    coords = np.stack(np.unravel_index(fg, prob.shape), axis=1)
    centres = (np.stack([ndimage.mean(coords[:, a], fg_labels, keep) for a in range(3)], axis=1) if len(keep)
               else np.zeros((0, 3)))
    candidates = [Candidate(centre=(float(c[0]), float(c[1]), float(c[2])), score=float(scores[old - 1]),
                            voxels=int(sizes[old - 1]), component=new)
                  for new, (old, c) in enumerate(zip(keep, centres, strict=True), start=1)]
    return candidates, component_map


def elongation(coords: np.ndarray, spacing: Sequence[float] = (1.0, 1.0, 1.0)) -> float:
    """How far a set of voxels (``(N, 3)`` indices) is from round: the square root of the ratio of
    the largest to the smallest principal second moment of the voxels' union, in mm (each voxel a
    box, so one voxel or one flat slice still has a thickness). 1 for a sphere or a cube; a
    cylinder L long and D wide measures 1.15 L/D."""
    return float(_elongations(np.zeros(len(coords), dtype=np.int64), np.asarray(coords, float), 1,
                              _check_spacing(spacing))[0])


def _elongations(ids: np.ndarray, coords: np.ndarray, n: int, mm: np.ndarray) -> np.ndarray:
    """:func:`elongation` of each of the `n` sets ``ids == k`` of `coords` (voxel indices) at once;
    NaN for an empty set."""
    x = coords * mm
    count = np.bincount(ids, minlength=n).astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.stack([np.bincount(ids, x[:, a], minlength=n) for a in range(3)], axis=1) / count[:, None]
        cov = np.empty((n, 3, 3))
        for a in range(3):
            for b in range(a, 3):
                cov[:, a, b] = cov[:, b, a] = (np.bincount(ids, x[:, a] * x[:, b], minlength=n) / count
                                               - mean[:, a] * mean[:, b])
    cov += np.diag(mm**2 / 12.0)  # a voxel's own extent
    empty = count == 0
    cov[empty] = np.eye(3)
    eig = np.linalg.eigvalsh(cov)
    out = np.sqrt(eig[:, -1] / np.maximum(eig[:, 0], 1e-12))
    out[empty] = np.nan
    return out


def _is_finding(scores: np.ndarray, segmented_voxels: np.ndarray, elongations: np.ndarray, finding_threshold: float,
                mm: np.ndarray, min_finding_mm: float, max_elongation: float) -> np.ndarray:
    """Which candidates a reader would be told of: score at least `finding_threshold`, a segmented
    size of at least `min_finding_mm` and a segmented part no more elongated than `max_elongation`
    (not a vessel's piece): the one rule :func:`evaluate_series` judges and :func:`findings`
    reports by."""
    return (np.asarray(scores, float) >= finding_threshold) & \
        (np.asarray(segmented_voxels) >= _voxels_of(min_finding_mm, mm)) & \
        ~(np.asarray(elongations, float) > max_elongation)


@dataclass(frozen=True)
class Found:
    """One finding of :func:`findings`: a candidate a reader is told of."""

    centre: tuple[float, float, float]  # voxel coordinates of its segmented voxels' centroid
    diameter_mm: float  # equivalent-sphere diameter of its segmented voxels
    score: float  # its highest probability
    voxels: int  # its segmented voxels
    # The width of its solid part (see solid_width_mm): 0 for pure ground glass; None when
    # findings() was given no image.
    solid_core_mm: float | None = None
    # The slices (last axis) its segmented voxels lie on: first, and one past the last.
    slices: tuple[int, int] | None = None
    # How far its segmented voxels are from round (see elongation); at most the rule's maximum.
    elongation: float | None = None


def solid_width_mm(solid: np.ndarray, spacing: Sequence[float] | np.ndarray = (1.0, 1.0, 1.0)) -> float:
    """The width of the thickest solid part of a finding: twice the largest distance (mm) from a
    voxel of the boolean `solid` to the nearest voxel that is not solid (outside the array counts
    as not solid). A compact core measures its diameter; a vessel crossing ground glass measures
    its calibre, however long it is (so its volume, which grows with length, is not used). One
    voxel measures two voxels' width; 0 when nothing is solid."""
    if not solid.any():
        return 0.0
    return 2.0 * float(ndimage.distance_transform_edt(np.pad(solid, 1), sampling=spacing).max())


def findings(prob: np.ndarray, *, threshold: float = 0.5, candidate_threshold: float = 0.1,
             finding_threshold: float = 0.75, spacing: Sequence[float] = (1.0, 1.0, 1.0), min_voxels: int = 2,
             max_candidates: int = 50, min_finding_mm: float = MIN_FINDING_MM, image: np.ndarray | None = None,
             solid_level: float | None = None,
             max_elongation: float = MAX_ELONGATION) -> tuple[list[Found], np.ndarray]:
    """What the model reports for one volume: the candidates :func:`evaluate_series` counts as the
    series' findings (the same candidates, the same rule), best first, and the boolean mask of
    their segmented voxels (``prob >= threshold`` inside each finding's candidate), nothing else.

    With the volume's `image` and the `solid_level` of solid tissue in its units (see
    :mod:`dicomops.segmentation.actionable`), each finding also measures its solid core.
    """
    if (image is None) != (solid_level is None):
        raise ValueError("give both image and solid_level to measure solid cores, or neither")
    prob = np.asarray(prob)
    if not 0 < candidate_threshold <= min(threshold, finding_threshold):
        raise ValueError(f"candidate_threshold must lie in (0, min(threshold={threshold}, finding_threshold="
                         f"{finding_threshold})], got {candidate_threshold}")
    mm = _check_spacing(spacing)
    if image is not None:
        image = np.asarray(image)
        if image.shape != prob.shape:
            raise ValueError(f"image {image.shape} and prob {prob.shape} must have one shape")
    shape, area = prob.shape, read_box(prob, candidate_threshold)
    prob, image = prob[area], None if image is None else image[area]
    offset = np.array([s.start for s in area], dtype=float)
    candidates, component_map = extract_candidates(prob, threshold=candidate_threshold, min_voxels=min_voxels,
                                                   max_candidates=max_candidates)
    if not candidates:
        return [], np.zeros(shape, dtype=bool)
    segmented = np.where(prob >= threshold, component_map, 0)
    at = np.flatnonzero(segmented)
    ids = segmented.ravel()[at]
    voxels = np.bincount(ids, minlength=len(candidates) + 1)[1:]
    scores = np.array([c.score for c in candidates], dtype=float)
    coords = np.stack(np.unravel_index(at, prob.shape), axis=1).astype(float)
    shapes = _elongations(ids, coords, len(candidates) + 1, mm)[1:]
    keep = np.flatnonzero(_is_finding(scores, voxels, shapes, finding_threshold, mm, min_finding_mm,
                                      max_elongation)) + 1
    if not len(keep):
        return [], np.zeros(shape, dtype=bool)
    sums = np.stack([np.bincount(ids, weights=coords[:, a], minlength=len(candidates) + 1) for a in range(3)], axis=1)
    cores: dict[int, float | None] = {int(c): None for c in keep}
    boxes = ndimage.find_objects(segmented)
    if image is not None:
        for c in keep:
            box = boxes[c - 1]
            cores[int(c)] = solid_width_mm((segmented[box] == c) & (image[box] >= solid_level), mm)
    k0 = area[2].start
    out = [Found(centre=tuple(float(v) for v in sums[c] / voxels[c - 1] + offset),  # type: ignore[arg-type]
                 diameter_mm=equivalent_diameter_mm(voxels[c - 1], mm), score=float(scores[c - 1]),
                 voxels=int(voxels[c - 1]), solid_core_mm=cores[int(c)],
                 slices=(k0 + int(boxes[c - 1][2].start), k0 + int(boxes[c - 1][2].stop)),
                 elongation=float(shapes[c - 1])) for c in keep]
    mask = np.zeros(shape, dtype=bool)
    mask[area] = np.isin(segmented, keep)
    return out, mask


def evaluate_series(prob: np.ndarray, reference: np.ndarray, nodules: Sequence[NoduleRef], *, series: str = "",
                    vendor: str = "", threshold: float = 0.5, candidate_threshold: float = 0.1,
                    finding_threshold: float | None = None, spacing: Sequence[float] = (1.0, 1.0, 1.0), min_voxels: int = 2,
                    max_candidates: int = 50, min_finding_mm: float = MIN_FINDING_MM,
                    max_elongation: float = MAX_ELONGATION, native: NativeReference | None = None) -> SeriesEval:
    """Score one series against its reference instance map (``0`` background, each nodule its
    ``label``).

    Candidates come from `candidate_threshold` (low, so that the FROC curve reaches high
    sensitivities); the segmentation is ``prob >= threshold``. A nodule's Dice compares its
    reference voxels with the thresholded components that overlap them, so a false positive
    elsewhere in the lung does not lower it (it lowers the whole-series Dice). Reference voxels
    whose label is not in `nodules` count for the series Dice only; candidates on them are false
    positives. The series is called positive (``present_pred``) when a candidate scoring at least
    `finding_threshold` (default `threshold`) has a segmented size of at least `min_finding_mm`
    and is no more elongated than `max_elongation`: the reference annotates nothing smaller, so a
    speck is a candidate for the FROC curve but not a finding a reader would report, and neither is
    a vessel's piece. The finding's score and the voxels' threshold are separate
    operating points, as in detection: the one trades false findings for missed ones, the other
    sets where a nodule's edge is drawn.

    With `native`, each nodule's Dice is also read on the series' own grid (``dice_native``): the
    same components, looked up at the native voxel centres as the SEG is written, against the
    annotation where it was drawn. On thick slices the reference at 1 mm is the native mask's
    slices repeated (nearest neighbour), a staircase no smooth outline matches: an exact sphere of
    6-14 mm predicted at 1 mm scores a mean Dice of 0.886 against philips' 2 mm slices so repeated
    and 0.957 against siemens' 1 mm ones, but 0.932 and 0.939 on their own grids
    (``tests/unit/test_native_dice.py``), so vendors compare fairly there. ``dice_native`` is None
    where `native` is not given.
    """
    prob = np.asarray(prob)
    reference = np.asarray(reference)
    if prob.shape != reference.shape or prob.ndim != 3:
        raise ValueError(f"prob {prob.shape} and reference {reference.shape} must be 3D arrays of one shape")
    finding = threshold if finding_threshold is None else finding_threshold
    if not 0 < candidate_threshold <= min(threshold, finding):
        raise ValueError(f"candidate_threshold must lie in (0, min(threshold={threshold}, finding_threshold="
                         f"{finding})], got {candidate_threshold}")
    mm = _check_spacing(spacing)
    labels = np.array([n.label for n in nodules], dtype=np.int64)
    if len(set(labels.tolist())) != len(labels):
        raise ValueError(f"nodule labels must be unique, got {labels.tolist()}")
    box = read_box(prob, candidate_threshold, reference)
    prob, reference = prob[box], reference[box]
    offset = np.array([b.start for b in box], dtype=float)

    candidates, component_map = extract_candidates(prob, threshold=candidate_threshold, min_voxels=min_voxels,
                                                   max_candidates=max_candidates)
    # Everything per nodule is read at the reference voxels only, which are few.
    ref_at = np.nonzero(reference)
    ref_values = reference[ref_at].astype(np.int64)
    nodule_of = np.full(len(ref_values), -1, dtype=np.int64)  # index into `nodules`, -1 for other labels
    if len(labels):
        order = np.argsort(labels)
        pos = np.minimum(np.searchsorted(labels[order], ref_values), len(labels) - 1)
        nodule_of = np.where(labels[order][pos] == ref_values, order[pos], -1)
    mine = nodule_of >= 0
    ref_voxels = np.bincount(nodule_of[mine], minlength=len(labels))
    if absent := [int(lb) for lb, c in zip(labels, ref_voxels, strict=True) if c == 0]:
        raise ValueError(f"nodule label(s) {absent} do not occur in the reference map")
    coords = np.stack(ref_at, axis=1).astype(float)
    centroids = np.stack([np.bincount(nodule_of[mine], weights=coords[mine, a], minlength=len(labels))
                          for a in range(3)], axis=1) / np.maximum(ref_voxels, 1)[:, None]

    # The LUNA16 hit rule, centre within the radius of the centroid, or overlap. Overlap credits a
    # candidate with one nodule only, the one nearest its centre: a blob over the lung overlapped
    # every nodule, and one candidate scored all of them at no false positive (CPM 1.0 at Dice 0).
    n_cand = len(candidates)
    scores = np.array([c.score for c in candidates], dtype=float)
    overlaps = np.zeros((n_cand, len(labels)), dtype=bool)
    cand_at_ref = component_map[ref_at]
    both = mine & (cand_at_ref > 0)
    overlaps[cand_at_ref[both] - 1, nodule_of[both]] = True
    hits = np.zeros_like(overlaps)
    if n_cand and len(labels):
        centres = np.array([c.centre for c in candidates], dtype=float)
        dist = np.linalg.norm((centres[:, None, :] - centroids[None, :, :]) * mm, axis=2)
        radii = np.array([n.diameter_mm for n in nodules], dtype=float) / 2
        nearest = np.where(overlaps, dist, np.inf).argmin(axis=1)
        overlapping = np.flatnonzero(overlaps.any(axis=1))
        hits[overlapping, nearest[overlapping]] = True
        hits |= dist <= radii[None, :]
    best = np.where(hits, scores[:, None], -np.inf).max(axis=0) if n_cand else np.full(len(labels), -np.inf)

    # Segmentation: components of the thresholded map that touch each nodule.
    predicted = prob >= threshold
    pred_map, n_pred = ndimage.label(predicted, structure=CONNECTIVITY)
    pred_sizes = np.bincount(pred_map.ravel(), minlength=n_pred + 1)
    pred_at_ref = pred_map[ref_at]
    touch = mine & (pred_at_ref > 0)
    inter = np.bincount(nodule_of[touch], minlength=len(labels))
    pairs = np.unique(np.stack([nodule_of[touch], pred_at_ref[touch]]), axis=1)
    pred_voxels = np.bincount(pairs[0], weights=pred_sizes[pairs[1]], minlength=len(labels))

    # The segmented volume inside each candidate (the size a reader would report for it) and its shape.
    seg_at = np.flatnonzero(predicted & (component_map > 0))
    seg_ids = component_map.ravel()[seg_at]
    seg_in_candidate = np.bincount(seg_ids, minlength=n_cand + 1)[1:]
    shapes = _elongations(seg_ids, np.stack(np.unravel_index(seg_at, prob.shape), axis=1).astype(float),
                          n_cand + 1, mm)[1:]
    found = _is_finding(scores, seg_in_candidate, shapes, finding, mm, min_finding_mm, max_elongation)
    # Each nodule's best-scoring hit, as the size categories read it.
    best_hit = np.where(hits, scores[:, None], -np.inf).argmax(axis=0) if n_cand else np.zeros(len(labels), int)

    native_dices: list[float | None] = [None] * len(nodules)
    if native is not None:
        for j, n in enumerate(nodules):
            drawn = native.index[native.label == n.label]
            if len(drawn):
                touching = pairs[1][pairs[0] == j]
                native_dices[j] = native_dice(np.isin(pred_map, touching), offset, drawn, native)

    rows = []
    for j, n in enumerate(nodules):
        rows.append({
            "label": int(n.label), "diameter_mm": float(n.diameter_mm), "kind": n.kind, "attachment": n.attachment,
            "size_bin": size_bin(n.diameter_mm),
            "score": float(best[j]) if np.isfinite(best[j]) else None,
            "dice": float(2 * inter[j] / (pred_voxels[j] + ref_voxels[j])),
            "dice_native": native_dices[j],
            "predicted_diameter_mm": equivalent_diameter_mm(pred_voxels[j], mm) if pred_voxels[j] else None,
            "elongation": (float(shapes[best_hit[j]]) if np.isfinite(best[j]) and np.isfinite(shapes[best_hit[j]])
                           else None),
        })

    false = ~hits.any(axis=1) if n_cand else np.zeros(0, dtype=bool)
    fp_diameters: list[float | None] = [equivalent_diameter_mm(v, mm) if v else None
                                        for v in seg_in_candidate[false]]
    both_sizes = int(predicted.sum()) + len(ref_values)
    overlap = int(predicted[ref_at].sum())
    return SeriesEval(
        series=series, vendor=vendor, nodules=rows, false_positives=[float(s) for s in scores[false]],
        dice=2 * overlap / both_sizes if both_sizes else 1.0,
        present_ref=len(nodules) > 0, present_pred=bool(found.any()),
        false_positive_diameters_mm=fp_diameters,
        false_positive_elongations=[float(v) if np.isfinite(v) else None for v in shapes[false]],
    )


# -- FROC --------------------------------------------------------------------------------------


def froc(evals: Sequence[SeriesEval], *, nodule_filter: Callable[[dict[str, Any]], bool] | None = None,
         fp_rates: Sequence[float] = FP_RATES) -> Froc:
    """The FROC curve and CPM over `evals`, pooling nodules and false positives across scans.

    `nodule_filter` selects nodules (a kind, a size) while every scan's false positives still
    count, as LUNA16 scores its subsets; for a vendor, pass only that vendor's series. Sensitivity
    at a rate is the highest reached with at most that many false positives per scan (0 if none).
    With no selected nodule the sensitivities and the CPM are NaN.
    """
    chosen = [n for e in evals for n in e.nodules if nodule_filter is None or nodule_filter(n)]
    found = np.sort(np.array([n["score"] for n in chosen if n["score"] is not None], dtype=float))
    fps = np.sort(np.array([s for e in evals for s in e.false_positives], dtype=float))
    scans = len(evals)
    thresholds = np.unique(np.concatenate([found, fps]))[::-1]
    fps_per_scan = (len(fps) - np.searchsorted(fps, thresholds, side="left")) / max(scans, 1)
    if not chosen:
        nan = float("nan")
        return Froc(fps_per_scan, np.full(len(thresholds), nan), dict.fromkeys(map(float, fp_rates), nan),
                    nan, 0, scans)
    sensitivity = (len(found) - np.searchsorted(found, thresholds, side="left")) / len(chosen)
    # Sensitivity never falls as the threshold drops, so the best within a rate is the last reached.
    at_rates = {float(r): float(sensitivity[fps_per_scan <= r].max(initial=0.0)) for r in fp_rates}
    return Froc(fps_per_scan, sensitivity, at_rates, float(np.mean(list(at_rates.values()))), len(chosen), scans)


# -- agreement ---------------------------------------------------------------------------------


def _kappa(a: Sequence[Any], b: Sequence[Any]) -> float:
    """Cohen's kappa, NaN where it is undefined (no pairs, or both raters always say one thing)."""
    if not len(a) or len(set(a) | set(b)) < 2:
        return float("nan")
    return float(cohen_kappa_score(list(a), list(b)))


def series_kappa(evals: Sequence[SeriesEval]) -> float:
    """Agreement between 'the series has a nodule' in the reference and in the prediction."""
    return _kappa([e.present_ref for e in evals], [e.present_pred for e in evals])


def series_kappa_interval(evals: Sequence[SeriesEval], level: float = 0.95, resamples: int = 2000,
                          seed: int = 0) -> tuple[float, float]:
    """The percentile bootstrap interval of :func:`series_kappa` at `level`, resampling series.

    A vendor's kappa rests on its few series, most of all on the few without a nodule (five of a
    vendor's 24 on the demo), where one false finding moves it by 0.15 or more: the interval says
    how far apart two vendors' figures can be by chance. Resamples in which kappa is undefined (one
    category only) are left out; NaNs where fewer than half remain.
    """
    ref = np.array([e.present_ref for e in evals], dtype=float)
    pred = np.array([e.present_pred for e in evals], dtype=float)
    if not len(ref):
        return float("nan"), float("nan")
    picks = np.random.default_rng(seed).integers(0, len(ref), size=(resamples, len(ref)))
    a, b = ref[picks], pred[picks]
    observed = (a == b).mean(axis=1)
    pa, pb = a.mean(axis=1), b.mean(axis=1)
    chance = pa * pb + (1 - pa) * (1 - pb)  # Cohen's kappa of two binary raters, every resample at once
    with np.errstate(divide="ignore", invalid="ignore"):
        kappa = np.where(chance < 1, (observed - chance) / (1 - chance), np.nan)
    kappa = kappa[np.isfinite(kappa)]
    if len(kappa) < resamples / 2:
        return float("nan"), float("nan")
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(kappa, [tail, 100 - tail])
    return float(low), float(high)


def size_pairs(evals: Sequence[SeriesEval], threshold: float = 0.5,
               max_elongation: float = MAX_ELONGATION) -> list[tuple[str, str]]:
    """(reference, predicted) size category per nodule and per false positive scoring at least
    `threshold` (the finding threshold).

    A nodule not detected at `threshold`, detected without segmented voxels on it, or whose best
    hit is more elongated than `max_elongation`, is predicted ``absent``; a false positive at
    `threshold` is an ``absent`` reference with its segmented size (skipped when it has no
    segmented voxels, fewer than a finding of :data:`MIN_FINDING_MM`, or the shape of a vessel).
    Evaluations written before the shape was recorded count every shape as round.
    """
    pairs = []
    for e in evals:
        for n in e.nodules:
            detected = (n["score"] is not None and n["score"] >= threshold and n["predicted_diameter_mm"] is not None
                        and _is_round(n.get("elongation"), max_elongation))
            pairs.append((size_bin(n["diameter_mm"]), size_bin(n["predicted_diameter_mm"]) if detected else ABSENT))
        for score, diameter, shape in zip(e.false_positives, e.false_positive_diameters_mm,
                                          e.false_positive_elongations, strict=True):
            if score >= threshold and diameter is not None and diameter >= MIN_FINDING_MM and _is_round(shape, max_elongation):
                pairs.append((ABSENT, size_bin(diameter)))
    return pairs


def _is_round(shape: float | None, max_elongation: float) -> bool:
    return shape is None or shape <= max_elongation


def size_kappa(evals: Sequence[SeriesEval], threshold: float = 0.5) -> float:
    """Agreement of size categories (``<6 mm``, ``6-10 mm``, ``>=10 mm``, ``absent``), see
    :func:`size_pairs`."""
    pairs = size_pairs(evals, threshold)
    return _kappa([p[0] for p in pairs], [p[1] for p in pairs])


# -- summaries ---------------------------------------------------------------------------------


def slug(name: str) -> str:
    """A lower-case MLflow-safe key part: runs of anything but letters and digits become ``_``."""
    s = SIZE_SLUGS.get(name) or re.sub(r"[^a-z0-9]+", "_", str(name).lower()).strip("_")
    return s or "unknown"


def _mean(values: Sequence[float]) -> float:
    return float(np.mean(values)) if len(values) else float("nan")


def nodule_dices(nodules: Iterable[dict[str, Any]], min_mm: float = 0.0, grid: str = "dice") -> list[float]:
    """The Dice of each nodule of at least `min_mm` on one grid: ``dice`` (the preprocessing's 1 mm)
    or ``dice_native`` (the series' own, where it was measured)."""
    return [float(n[grid]) for n in nodules if n["diameter_mm"] >= min_mm and n.get(grid) is not None]


def _dice(evals: Sequence[SeriesEval], min_mm: float = 0.0, grid: str = "dice") -> float:
    return _mean(nodule_dices((n for e in evals for n in e.nodules), min_mm, grid))


def actionable_auc(evals: Sequence[SeriesEval]) -> float:
    """ROC AUC of the series' actionable scores against their labels; NaN without both classes or
    where a series has no score."""
    pairs = [(e.actionable_ref, e.actionable_score) for e in evals]
    if not pairs or any(r is None or s is None for r, s in pairs) or len({r for r, _ in pairs}) < 2:
        return float("nan")
    return float(roc_auc_score([bool(r) for r, _ in pairs], [float(s) for _, s in pairs]))  # type: ignore[arg-type]


def _where(key: str, value: Any) -> Callable[[dict[str, Any]], bool]:
    """A nodule filter for :func:`froc`: the nodules whose `key` is `value`."""
    return lambda n: bool(n[key] == value)


def summarise(evals: Sequence[SeriesEval], threshold: float = 0.5) -> dict[str, float]:
    """A flat dict for ``mlflow.log_metrics``: CPM and sensitivity at each rate, Dice, kappa,
    overall, per vendor, per nodule kind and per size bin. `threshold` is the finding threshold
    of the size-category kappa (the series kappa's is already in each :class:`SeriesEval`).

    Every key is always present for the slices in `evals`; an undefined value (no nodules in a
    slice, kappa with one category) is NaN, which MLflow stores as NaN. Keys per slice are
    ``cpm_<vendor>``, ``dice_ge6_<vendor>``, ``dice_ge6_native_<vendor>`` (NaN where no nodule has a
    native Dice), ``kappa_series_<vendor>``, ``auc_actionable_<vendor>``
    (pooled over `evals`), ``cpm_kind_<kind>`` and
    ``cpm_size_<lt6|6to10|ge10>``, with names passed through :func:`slug`.
    """
    overall = froc(evals)
    out: dict[str, float] = {"cpm": overall.cpm}
    out |= {f"sens_at_{r:g}": s for r, s in overall.at_rates.items()}
    out |= {
        "dice_mean": _dice(evals), "dice_ge6_mean": _dice(evals, SIZE_EDGES_MM[0]),
        "dice_ge6_native_mean": _dice(evals, SIZE_EDGES_MM[0], "dice_native"),
        "series_dice_mean": _mean([e.dice for e in evals]),
        "kappa_series": series_kappa(evals), "kappa_size": size_kappa(evals, threshold),
        "auc_actionable": actionable_auc(evals), "n_series": float(len(evals)), "n_nodules": float(overall.nodules),
    }
    for vendor in sorted({e.vendor for e in evals}):
        part = [e for e in evals if e.vendor == vendor]
        key = slug(vendor)
        out |= {f"cpm_{key}": froc(part).cpm, f"dice_ge6_{key}": _dice(part, SIZE_EDGES_MM[0]),
                f"dice_ge6_native_{key}": _dice(part, SIZE_EDGES_MM[0], "dice_native"),
                f"kappa_series_{key}": series_kappa(part), f"auc_actionable_{key}": actionable_auc(part)}
    for kind in sorted({n["kind"] for e in evals for n in e.nodules}):
        out[f"cpm_kind_{slug(kind)}"] = froc(evals, nodule_filter=_where("kind", kind)).cpm
    for size in SIZE_BINS:
        out[f"cpm_size_{SIZE_SLUGS[size]}"] = froc(evals, nodule_filter=_where("size_bin", size)).cpm
    return out


def nodule_table(evals: Sequence[SeriesEval]) -> pd.DataFrame:
    """One row per reference nodule, with its series and vendor (an MLflow table artifact)."""
    rows = [{"series": e.series, "vendor": e.vendor, **n} for e in evals for n in e.nodules]
    return pd.DataFrame(rows, columns=list(NODULE_COLUMNS))
