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
from typing import Any

import numpy as np
import pandas as pd
from pydicom.pixels import pixel_array
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
                 fov: np.ndarray | None = None, *, padded: np.ndarray | None = None,
                 out: np.ndarray | None = None) -> np.ndarray:
    """Stored values → HU in float32; padding and out-of-field pixels become air (-1000 HU).

    The padding comparison uses the stored value, before rescaling: a padding value of -2000 with
    an intercept of -1024 would otherwise become -3024 HU and poison every statistic. `padded`, a
    mask of padding pixels found otherwise (:func:`padding_mask`), is air too. `out` receives the
    result (one slice of a volume) instead of a new array.
    """
    hu = np.multiply(stored, np.float32(slope), out=out, dtype=np.float32)
    hu += np.float32(intercept)
    if padding is not None:
        hu[stored == padding] = AIR_HU
    if padded is not None:
        hu[padded] = AIR_HU
    hu[hu < MIN_HU] = AIR_HU  # below the physical minimum: padding the header did not declare
    if fov is not None:
        hu[..., ~fov] = AIR_HU
    return hu


def stored_values(cells: np.ndarray, bits_stored: int | None, signed: int) -> np.ndarray:
    """The pixel values in the low BitsStored bits of each cell (PS3.5 8.1.1): the bits above are not
    part of the value (scanners may leave other data there) and are ignored, as pydicom does."""
    width = cells.dtype.itemsize * 8
    if bits_stored is None or not 0 < bits_stored < width:
        return cells
    if signed:  # sign-extend from the top stored bit
        shift = width - bits_stored
        return (cells << shift) >> shift
    return cells & cells.dtype.type((1 << bits_stored) - 1)


def padding_mask(cells: np.ndarray, stored: np.ndarray, padding: int | None, bits_stored: int | None,
                 signed: int) -> np.ndarray | None:
    """The pixels that hold PixelPaddingValue, or None without one.

    PS3.3 C.7.5.1.1.2 puts the padding value in the stored pixel's units, within the range BitsStored
    allows: such a value is compared with the stored values. A value outside that range (an unsigned
    12-bit series padded with 0xFFFF) can only mean the whole cell as written, high bits included:
    it is compared with the cells, since masked to 12 bits it would be 4095, a real pixel value
    (+3071 HU with the usual intercept), and the padding would go unrecognised.
    """
    if padding is None:
        return None
    width = cells.dtype.itemsize * 8
    bits = bits_stored if bits_stored is not None and 0 < bits_stored <= width else width
    low, high = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
    return (stored if low <= padding <= high else cells) == padding


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


def read_cells(path: Path, rows: int, cols: int, bits: int, signed: int, frames: int = 1) -> np.ndarray:
    """One slice's pixel cells as written, bits above BitsStored included: native little-endian data
    straight from the file, anything else (compressed, big endian, odd layouts) decoded by pydicom.

    PixelData longer than the matrix needs is padding the gate accepted: only the first
    Rows x Columns values are read.

    Raises:
        ValueError: `frames` (NumberOfFrames) is above 1: a CT Image Storage instance is one slice,
            and reading its first frame alone would drop the others without a word.
    """
    if frames > 1:
        raise ValueError("NumberOfFrames above 1: a CT Image Storage instance holds one slice; split the "
                         "frames into single-frame instances")  # the header's value is not quoted
    if bits == 16:
        header = read_fast(str(path), (), path.stat().st_size)
        length, start = header.pixel if header is not None and header.pixel is not None else (None, 0)
        if header is not None and length is not None and length >= rows * cols * 2 \
                and not UID(header.syntax).is_compressed:
            with path.open("rb") as fh:
                fh.seek(start)
                raw = fh.read(rows * cols * 2)
            return np.frombuffer(raw, dtype="<i2" if signed else "<u2").reshape(rows, cols)
    # Decodes compressed syntaxes via the installed plugins; the high bits are left for the caller.
    return np.asarray(pixel_array(path, correct_unused_bits=False))


def _int_or_none(value: Any) -> int | None:
    return None if pd.isna(value) else int(value)


def _series_windows(rows: pd.DataFrame) -> list[tuple[float, float]]:
    """The header windows most slices carry (ties: the first in slice order); windows are legal per
    slice, and the volume is windowed once."""
    if "WindowCenter" not in rows or "WindowWidth" not in rows:
        return []
    counts: dict[tuple[str, str], int] = {}
    for center, width in zip(rows.WindowCenter, rows.WindowWidth, strict=True):
        if center is None or width is None or pd.isna(center) or pd.isna(width):
            continue
        counts[(str(center), str(width))] = counts.get((str(center), str(width)), 0) + 1
    if not counts:
        return []
    center, width = max(counts, key=lambda pair: counts[pair])  # max keeps the first of equals
    return _windows(center, width)


def load_series(instances: pd.DataFrame, deid_root: Path) -> Volume:
    """Read one series' de-identified files (rows of ``accepted.parquet``) into a HU volume.

    Every slice is read and rescaled with its own header values (RescaleSlope, RescaleIntercept,
    PixelPaddingValue, BitsAllocated, BitsStored, PixelRepresentation): all may differ from slice to
    slice in a CT series, and a scanner that re-encodes one slice (a wider range, another
    intercept) is legal. The geometry is the first slice's, checked for the whole series by the gate.

    Raises:
        ValueError: A file declares more than one frame (:func:`read_cells`).
    """
    rows = instances.sort_values("slice_index")
    first = rows.iloc[0]
    n_rows, n_cols = int(first.Rows), int(first.Columns)
    hu = np.empty((len(rows), n_rows, n_cols), dtype=np.float32)
    frames = rows["NumberOfFrames"] if "NumberOfFrames" in rows else pd.Series([None] * len(rows))
    paddings = rows["PixelPaddingValue"] if "PixelPaddingValue" in rows else pd.Series([None] * len(rows))
    for k, (rel, bits, signed, bits_stored, slope, intercept, padding, n_frames) in enumerate(zip(
            rows.deid_path, rows.BitsAllocated, rows.PixelRepresentation, rows.BitsStored, rows.RescaleSlope,
            rows.RescaleIntercept, paddings, frames, strict=True)):
        cells = read_cells(Path(deid_root) / rel, n_rows, n_cols, int(bits), int(signed), _int_or_none(n_frames) or 1)
        stored = stored_values(cells, _int_or_none(bits_stored), int(signed))
        padded = padding_mask(cells, stored, _int_or_none(padding), _int_or_none(bits_stored), int(signed))
        stored_to_hu(stored, float(slope), float(intercept), None, padded=padded, out=hu[k])
    iop = np.array([first[f"ImageOrientationPatient_{i}"] for i in range(6)], float)
    ipp = np.array([first[f"ImagePositionPatient_{i}"] for i in range(3)], float)
    normal = np.cross(iop[:3], iop[3:])
    normal /= np.linalg.norm(normal)
    affine = dicom_affine(iop, ipp, (float(first.PixelSpacing_0), float(first.PixelSpacing_1)),
                          float(first.slice_spacing), normal)
    # (slices, rows, cols) -> (cols, rows, slices)
    volume = np.ascontiguousarray(hu.transpose(2, 1, 0))
    return Volume(volume, affine, _series_windows(rows))
