"""Segmenter output back on the original series: the native voxel grid and the DICOM SEG over it.

The segmenter sees the preprocessing cache (1 mm, RAS, cropped in-plane); a radiologist sees the
acquired slices. :func:`to_native_mask` carries a prediction back by nearest neighbour through the
two affines, which both map voxel centres to RAS millimetres, so no resampler's grid convention
enters. :func:`native_grid` builds the native affine from the datasets the way
:func:`dicomops.preprocessing.volume.load_series` does from the gate's table (slices in geometric
order along the normal, the median step as slice spacing), and :func:`series_segmentation` puts the
mask back into the order of the source datasets for :func:`dicomops.pacs.results.segmentation`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import highdicom as hd
import numpy as np
import pydicom

from dicomops.config import GeometryConfig
from dicomops.dicom.series import slice_normal
from dicomops.pacs import results
from dicomops.preprocessing.volume import dicom_affine
from dicomops.segmentation import metrics

DUPLICATE_MM = 1e-3  # slices closer than this along the normal are the same position
# The gate's tolerance: whatever series it accepts, its SEG can lie on (a tighter one failed studies).
ORIENTATION_TOLERANCE = GeometryConfig.model_fields["orientation"].default


@dataclass(frozen=True)
class NativeGrid:
    """The voxel grid of an acquired series.

    Attributes:
        affine: 4x4, native voxel index (i, j, k) = (column, row, slice) → RAS mm.
        shape: (columns, rows, slices).
        order: ``order[k]`` is the position in the source list of geometric slice ``k``.
    """

    affine: np.ndarray
    shape: tuple[int, int, int]
    order: np.ndarray


def native_grid(datasets: Sequence[pydicom.Dataset], orientation_tolerance: float = ORIENTATION_TOLERANCE) -> NativeGrid:
    """The (columns, rows, slices) grid of one series, slices ordered along the slice normal, in the
    orientation of its first slice; the others' direction cosines may differ by `orientation_tolerance`.

    Raises:
        ValueError: When there are no datasets, they differ in matrix or orientation, or two share
            a position.
    """
    if not datasets:
        raise ValueError("datasets is empty; give the slices of one series")
    first = datasets[0]
    rows, cols = int(first.Rows), int(first.Columns)
    iop = np.asarray([float(v) for v in first.ImageOrientationPatient], float)
    for ds in datasets:
        if (int(ds.Rows), int(ds.Columns)) != (rows, cols):
            raise ValueError("datasets differ in Rows/Columns; give the slices of one series")
        if np.abs(np.asarray([float(v) for v in ds.ImageOrientationPatient]) - iop).max() > orientation_tolerance:
            raise ValueError("datasets differ in ImageOrientationPatient; give the slices of one series")
    normal = slice_normal(iop)
    ipp = np.asarray([[float(v) for v in ds.ImagePositionPatient] for ds in datasets], float)
    proj = ipp @ normal
    order = np.argsort(proj, kind="stable")
    steps = np.diff(proj[order])
    if (steps < DUPLICATE_MM).any():
        raise ValueError(f"{int((steps < DUPLICATE_MM).sum())} slices share a position; drop the duplicates")
    if len(datasets) > 1:
        step = float(np.median(steps))
    else:
        step = float(first.get("SpacingBetweenSlices") or first.get("SliceThickness") or 1.0)
    spacing = [float(v) for v in first.PixelSpacing]
    affine = dicom_affine(iop, ipp[order[0]], (spacing[0], spacing[1]), step, normal)
    return NativeGrid(affine, (cols, rows, len(datasets)), order)


def to_native_mask(prob_or_mask: np.ndarray, pre_affine: np.ndarray, native_affine: np.ndarray,
                   native_shape: tuple[int, int, int], threshold: float = 0.5) -> np.ndarray:
    """A prediction on the preprocessing grid, looked up at every native voxel centre.

    Each native voxel centre goes to RAS through `native_affine`, then to a preprocessed index
    through the inverse of `pre_affine`, and takes the nearest preprocessed voxel's value; centres
    outside the preprocessed volume (cropped away) are background. Probabilities are thresholded
    (``>= threshold``, as the segmentation metrics do) before the lookup, so the mask is what the
    metrics scored.

    Args:
        prob_or_mask: (I, J, K) probabilities, or a boolean / label mask (any non-zero is nodule).
        pre_affine: 4x4 affine of `prob_or_mask` (the cache's ``affine``).
        native_affine: 4x4 affine of the native grid (:func:`native_grid`).
        native_shape: (columns, rows, slices) of the native grid.
        threshold: Probability that makes a voxel nodule; ignored for boolean and integer masks.

    Returns:
        Boolean (columns, rows, slices) mask on the native grid.
    """
    values = np.asarray(prob_or_mask)
    if values.ndim != 3:
        raise ValueError(f"prob_or_mask must be an (I, J, K) volume, got shape {values.shape}")
    pre_affine, native_affine = np.asarray(pre_affine, float), np.asarray(native_affine, float)
    for name, affine in (("pre_affine", pre_affine), ("native_affine", native_affine)):
        if affine.shape != (4, 4) or not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
            raise ValueError(f"{name} must be a finite, invertible 4x4 voxel-to-RAS matrix")
    shape = tuple(int(n) for n in native_shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"native_shape must be three positive sizes (columns, rows, slices), got {native_shape}")
    if values.dtype.kind == "f":
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"threshold must lie in (0, 1), got {threshold}")
        mask = values >= threshold
    else:
        mask = values != 0
    return metrics.read_on_native(mask, np.linalg.inv(pre_affine) @ native_affine, (0, 0, 0), shape)


def series_segmentation(source_datasets: Sequence[pydicom.Dataset], mask_native_xyz: np.ndarray,
                        finding: results.Finding, *, series_number: int = 9002,
                        instance_number: int = 1) -> hd.seg.Segmentation:
    """The binary SEG of a native-grid mask over its source series.

    Args:
        source_datasets: The series' slices, in any order (the order the SEG lists them in).
        mask_native_xyz: Boolean (columns, rows, slices) mask, slices in geometric order
            (:func:`native_grid`, what :func:`to_native_mask` returns).
        finding: The model's result; its name and version identify the algorithm.
        series_number: Series Number of the new SEG series.
        instance_number: Instance Number of the SEG in it.

    Raises:
        ValueError: When the mask's shape is not the series' (columns, rows, slices), and as
            :func:`dicomops.pacs.results.segmentation` does (empty mask, absent finding).
    """
    grid = native_grid(source_datasets)
    mask = np.asarray(mask_native_xyz)
    if mask.shape != grid.shape:
        raise ValueError(f"mask shape {mask.shape} is not the series' (columns, rows, slices) = {grid.shape}; "
                         "map predictions with to_native_mask first")
    frames = np.empty((grid.shape[2], grid.shape[1], grid.shape[0]), dtype=mask.dtype)
    frames[grid.order] = mask.transpose(2, 1, 0)  # geometric slice k lies on source_datasets[order[k]]
    return results.segmentation(source_datasets, frames, finding, series_number=series_number,
                                instance_number=instance_number)

