"""Whether a series holds an actionable nodule, read off the segmenter's findings.

The corpus labels a series by the Lung-RADS v2022 baseline rule (:mod:`dicomops.synthetic.phantom`):
actionable is a solid or part-solid nodule of at least 6 mm; small nodules and pure ground glass
are not. A reader applies that rule to what they measure, and so does this module, to what the
segmentation measured: each finding's size (the equivalent diameter of its segmented voxels) and
the width of its solid part (:func:`dicomops.segmentation.metrics.solid_width_mm` over its voxels
at solid density, at or above -300 HU; ground glass lies between -750 and -300). Width, not
volume: vessels stay visible through ground glass, and one crossing a 14 mm ground-glass nodule
holds as many solid voxels as a 5 mm core, but measures its calibre (1.6-3.2 mm) across.

The series score is the best finding's probability, weighed down smoothly where the finding is
under the size or has no solid core, so that it ranks series (an AUC, comparable with the
classifier's) and not only calls them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from dicomops.config import PreprocessConfig, SegmentConfig
from dicomops.preprocessing.transforms import resolve_window
from dicomops.segmentation.metrics import Found, findings

SOLID_HU = -300.0  # the top of ground glass (phantom.GGO_HU); solid tissue and solid cores lie above
ACTIONABLE_MM = 6.0  # Lung-RADS v2022: solid or part-solid nodules under 6 mm are category 2
SIZE_SOFTNESS_MM = 1.0  # logistic scale, as sizes are measured: 6 mm weighs 0.5, 5 mm 0.27, 7 mm 0.73
CORE_MM = 3.5  # a solid part this wide weighs 0.5: vessels crossing ground glass measured 2.8 mm
CORE_SOFTNESS_MM = 0.5


def solid_level(pre: PreprocessConfig) -> float | None:
    """:data:`SOLID_HU` in the units of images preprocessed with `pre` (its window, scaled to [0, 1]);
    None with ``window='header'``, where each series has its own window and so no one level holds
    (the call is then not made: set a preset such as 'lung' to have it)."""
    if pre.window == "header":
        return None
    center, width = resolve_window(pre, [])
    if width == 0:  # window 'none': the image holds HU
        return SOLID_HU
    low = center - width / 2
    return min(max((SOLID_HU - low) / width, 0.0), 1.0)


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x > -60 else 0.0


def finding_score(found: Found) -> float:
    """One finding's weight as an actionable nodule: its probability × how surely it is at least
    6 mm × how surely it has a solid core."""
    if found.solid_core_mm is None:
        raise ValueError("the finding carries no solid core; call findings() with the image and its solid_level")
    return (found.score * _sigmoid((found.diameter_mm - ACTIONABLE_MM) / SIZE_SOFTNESS_MM)
            * _sigmoid((found.solid_core_mm - CORE_MM) / CORE_SOFTNESS_MM))


def series_score(found: Sequence[Found]) -> float:
    """The series' actionable score: its best finding's (0 with none)."""
    return max((finding_score(f) for f in found), default=0.0)


def weighed(prob: np.ndarray, image: np.ndarray, level: float, cfg: SegmentConfig,
            spacing: Sequence[float] = (1.0, 1.0, 1.0)) -> list[Found]:
    """Every finding the call weighs: each candidate from ``cfg.candidate_threshold`` up, not only
    those reported at ``cfg.finding_threshold`` (the size and core weigh down the rest), with its
    solid core measured at `level` (:func:`solid_level`) in `image`."""
    found, _ = findings(prob, threshold=cfg.threshold, candidate_threshold=cfg.candidate_threshold,
                        finding_threshold=cfg.candidate_threshold, spacing=spacing, image=image, solid_level=level)
    return found


def slice_scores(found: Sequence[Found], depth: int) -> np.ndarray:
    """Per slice (last axis, `depth` of them) the best :func:`finding_score` of the findings whose
    segmented voxels lie on it, 0 where none does: the segmenter's call, slice by slice, as a
    slice classifier's target (:mod:`dicomops.segmentation.teacher`)."""
    out = np.zeros(depth, dtype=np.float64)
    for f in found:
        if f.slices is None:
            raise ValueError("the finding carries no slices; it comes from findings() of an older version")
        lo, hi = f.slices
        out[lo:hi] = np.maximum(out[lo:hi], finding_score(f))
    return out
