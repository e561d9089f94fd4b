"""Assemble a de-identified series into a Hounsfield-unit volume with its affine.

The array is (columns, rows, slices) = (i, j, k), the layout MONAI's DICOM readers produce, and the
affine maps (i, j, k) to RAS millimetres (MONAI's world convention), built from
ImagePositionPatient, ImageOrientationPatient, PixelSpacing and the true slice spacing the gate
measured. Slices are stacked in the gate's geometric order (``slice_index``), never by file name,
InstanceNumber or SliceLocation.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
from pydicom.uid import UID

from dicomops.dicom.fastheader import read_fast

AIR_HU = -1000.0
MIN_HU = -1024.0
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass
class Volume:
    hu: np.ndarray  # float32 (i, j, k) = (columns, rows, slices)
    affine: np.ndarray  # 4x4, voxel index -> RAS mm
    windows: list[tuple[float, float]]  # header (center, width) pairs, in header order


def stored_to_hu(stored: np.ndarray, slope: float, intercept: float, padding: int | None,
                 fov: np.ndarray | None = None) -> np.ndarray:
    """Stored values → HU in float32; padding and out-of-field pixels become air (-1000 HU).

    The padding comparison uses the stored value, before rescaling: a padding value of -2000 with
    an intercept of -1024 would otherwise become -3024 HU and poison every statistic.
    """
    hu = stored.astype(np.float32)
    hu *= np.float32(slope)
    hu += np.float32(intercept)
    if padding is not None:
        hu[stored == padding] = AIR_HU
    hu[hu < MIN_HU] = AIR_HU  # below the physical minimum: padding the header did not declare
    if fov is not None:
        hu[..., ~fov] = AIR_HU
    return hu


def dicom_affine(iop: np.ndarray, ipp_first: np.ndarray, pixel_spacing: tuple[float, float],
                 slice_step: float, normal: np.ndarray) -> np.ndarray:
    """The RAS affine of a (columns, rows, slices) array.

    ImageOrientationPatient's first triple is the direction of increasing column index, its
    second the direction of increasing row index; PixelSpacing is (between rows, between columns).
    """
    row_dir, col_dir = np.asarray(iop[:3], float), np.asarray(iop[3:], float)
    lps = np.eye(4)
    lps[:3, 0] = row_dir * pixel_spacing[1]
    lps[:3, 1] = col_dir * pixel_spacing[0]
    lps[:3, 2] = np.asarray(normal, float) * slice_step
    lps[:3, 3] = ipp_first
    return LPS_TO_RAS @ lps


def _windows(center: object, width: object) -> list[tuple[float, float]]:
    if center is None or width is None or (isinstance(center, float) and np.isnan(center)):
        return []
    centers = [float(v) for v in str(center).split("\\") if v.strip()]
    widths = [float(v) for v in str(width).split("\\") if v.strip()]
    return list(zip(centers, widths, strict=False))


def read_pixels(path: Path, rows: int, cols: int, bits: int, signed: int,
                bits_stored: int | None = None) -> np.ndarray:
    """One slice's stored values: native little-endian data straight from the file, anything
    else (compressed, big endian, odd layouts) decoded by pydicom.

    PixelData longer than the matrix needs is padding the gate accepted: only the first
    Rows x Columns values are read, and bits above BitsStored are ignored, as pydicom does
    (scanners may leave other data there).
    """
    if bits == 16:
        header = read_fast(str(path), (), path.stat().st_size)
        length, start = header.pixel if header is not None and header.pixel is not None else (None, 0)
        if header is not None and length is not None and length >= rows * cols * 2 \
                and not UID(header.syntax).is_compressed:
            with path.open("rb") as fh:
                fh.seek(start)
                raw = fh.read(rows * cols * 2)
            stored = np.frombuffer(raw, dtype="<i2" if signed else "<u2").reshape(rows, cols)
            if bits_stored is None or not 0 < bits_stored < 16:
                return stored
            if signed:  # sign-extend from the top stored bit
                shift = 16 - bits_stored
                return (stored << shift) >> shift
            return stored & np.uint16((1 << bits_stored) - 1)
    return pydicom.dcmread(path).pixel_array  # decodes compressed syntaxes via the installed plugins


def load_series(instances: pd.DataFrame, deid_root: Path) -> Volume:
    """Read one series' de-identified files (rows of ``accepted.parquet``) into a HU volume."""
    rows = instances.sort_values("slice_index")
    first = rows.iloc[0]
    n_rows, n_cols = int(first.Rows), int(first.Columns)
    stored: np.ndarray | None = None
    for k, rel in enumerate(rows.deid_path):
        pixels = read_pixels(Path(deid_root) / rel, n_rows, n_cols, int(first.BitsAllocated),
                             int(first.PixelRepresentation), int(first.BitsStored))
        if stored is None:
            stored = np.empty((len(rows), n_rows, n_cols), dtype=pixels.dtype)
        stored[k] = pixels
    assert stored is not None
    padding = None if pd.isna(first.get("PixelPaddingValue")) else int(first.PixelPaddingValue)
    hu = stored_to_hu(stored, float(first.RescaleSlope), float(first.RescaleIntercept), padding)
    iop = np.array([first[f"ImageOrientationPatient_{i}"] for i in range(6)], float)
    ipp = np.array([first[f"ImagePositionPatient_{i}"] for i in range(3)], float)
    normal = np.cross(iop[:3], iop[3:])
    normal /= np.linalg.norm(normal)
    affine = dicom_affine(iop, ipp, (float(first.PixelSpacing_0), float(first.PixelSpacing_1)),
                          float(first.slice_spacing), normal)
    # (slices, rows, cols) -> (cols, rows, slices)
    volume = np.ascontiguousarray(hu.transpose(2, 1, 0))
    return Volume(volume, affine, _windows(first.get("WindowCenter"), first.get("WindowWidth")))
