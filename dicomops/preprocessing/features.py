"""Per-series image statistics for the drift monitor: HU in the body, noise, body size, spacing.

Computed on the native-resolution HU volume, before resampling (which would smooth the noise the
monitor needs to see).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

BODY_HU = -500.0
SOFT_TISSUE_HU = (-200.0, 200.0)
PERCENTILES = (5, 25, 50, 75, 95)

# The per-series feature columns of ``preprocessed/features.parquet``: preprocessing writes them,
# the drift monitor reads them. Header columns are taken from the gate's instance table.
HEADER_CATEGORICAL = ("Manufacturer", "ManufacturerModelName", "ConvolutionKernel")
HEADER_NUMERIC = ("KVP", "SliceThickness", "PixelSpacing_0", "slice_spacing", "XRayTubeCurrent")
HEADER_FEATURES = (*HEADER_CATEGORICAL, *HEADER_NUMERIC)
IMAGE_NUMERIC = ("body_area_cm2", "body_width_mm", *(f"hu_p{p:02d}" for p in PERCENTILES),
                 "lung_fraction", "noise_hu")


def body_mask(hu: np.ndarray) -> np.ndarray:
    """Voxels inside the patient: the largest 3-D region above -500 HU, with its holes (lungs) filled.

    Holes are filled per slice by keeping voxels that lie between body voxels both along rows and
    along columns, which is exact for the convex-ish outline of a chest and far cheaper than
    ``binary_fill_holes`` slice by slice.
    """
    mask = hu > BODY_HU
    labels, n = ndimage.label(mask)
    if n == 0:
        return mask
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    body = labels == int(np.argmax(sizes))
    return _between(body, 0) & _between(body, 1)


def _between(mask: np.ndarray, axis: int) -> np.ndarray:
    """True between the first and the last True along `axis` (line by line)."""
    n = mask.shape[axis]
    first = np.argmax(mask, axis=axis)
    last = n - 1 - np.argmax(np.flip(mask, axis=axis), axis=axis)
    present = mask.any(axis=axis)
    shape = [1] * mask.ndim
    shape[axis] = n
    idx = np.arange(n).reshape(shape)
    return (idx >= np.expand_dims(first, axis)) & (idx <= np.expand_dims(last, axis)) & np.expand_dims(present, axis)


def noise_estimate(hu: np.ndarray, body: np.ndarray, max_slices: int = 16) -> float:
    """Noise standard deviation (HU) in flat soft tissue, from the in-plane 3×3 high-pass residual
    (median absolute deviation, scaled to a standard deviation).

    For white noise of deviation σ, ``x - mean3x3(x)`` has deviation σ·sqrt(8/9); kernels that
    correlate noise lower the estimate, consistently per kernel, which is what drift detection needs.
    Up to `max_slices` evenly spaced slices are enough for a stable figure.
    """
    take = np.unique(np.linspace(0, hu.shape[2] - 1, min(max_slices, hu.shape[2])).astype(int))
    hu, body = hu[:, :, take], body[:, :, take]
    lo, hi = SOFT_TISSUE_HU
    soft = body & (hu > lo) & (hu < hi)
    soft = ndimage.binary_erosion(soft, structure=np.ones((5, 5, 1), bool))
    if soft.sum() < 50:
        return float("nan")
    residual = (hu - ndimage.uniform_filter(hu, size=(3, 3, 1), mode="nearest"))[soft]
    # Median absolute deviation: robust to the few edges the erosion leaves in the region.
    mad = float(np.median(np.abs(residual - np.median(residual))))
    return 1.4826 * mad / float(np.sqrt(8.0 / 9.0))


def image_features(hu: np.ndarray, affine: np.ndarray) -> dict[str, float]:
    """Statistics of one HU volume (i, j, k) with its affine.

    Body statistics use every second row and column (a quarter of the voxels: the same figures to
    well under 1 HU, four times faster); the noise estimate uses full resolution.
    """
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    body_full = body_mask(hu)
    noise = noise_estimate(hu, body_full)
    hu, body = hu[::2, ::2], body_full[::2, ::2]
    spacing = spacing * np.array([2.0, 2.0, 1.0])
    values = hu[body]
    feats: dict[str, float] = {}
    if values.size:
        for p, v in zip(PERCENTILES, np.percentile(values, PERCENTILES), strict=True):
            feats[f"hu_p{p:02d}"] = float(v)
    else:
        feats.update({f"hu_p{p:02d}": float("nan") for p in PERCENTILES})
    area = body.sum(axis=(0, 1)) * spacing[0] * spacing[1] / 100.0
    widths = [np.ptp(np.nonzero(body[:, :, k].any(axis=1))[0]) * spacing[0] if body[:, :, k].any() else 0.0
              for k in range(body.shape[2])]
    feats["noise_hu"] = noise
    feats["body_area_cm2"] = float(np.mean(area))
    feats["body_width_mm"] = float(np.median(widths))
    feats["lung_fraction"] = float(((hu > -950) & (hu < -700) & body).sum() / max(body.sum(), 1))
    return feats
