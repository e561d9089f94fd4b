"""Group instances into series, order slices geometrically and check the series is a clean volume.

Slices are ordered by the projection of ImagePositionPatient on the slice normal, never by file
name, InstanceNumber or SliceLocation. A series that is not a regular grid (gap, duplicate
position, mixed orientation, matrix or pixel spacing, gantry tilt), or whose UID is shared by files of
several patients or studies, is quarantined whole.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from dicomops.config import GeometryConfig

IOP_COLUMNS = [f"ImageOrientationPatient_{i}" for i in range(6)]
IPP_COLUMNS = [f"ImagePositionPatient_{i}" for i in range(3)]

# The tolerances are the config section itself, so their defaults and bounds exist once.
GeometryTolerance = GeometryConfig


@dataclass
class AssemblyResult:
    instances: pd.DataFrame  # accepted instances with slice_index and series geometry columns
    series: pd.DataFrame  # one row per accepted series
    quarantine: pd.DataFrame  # source_path, reason, detail


def drop_duplicate_instances(index: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Keep the first file of each SOPInstanceUID (by source path); quarantine the copies."""
    ordered = index.sort_values("source_path", kind="stable")
    dup = ordered.duplicated("SOPInstanceUID", keep="first")
    rejected = ordered.loc[dup, ["source_path"]].assign(
        reason="duplicate_instance", detail="same SOPInstanceUID as an earlier file")
    return ordered.loc[~dup], rejected


def slice_normal(orientation: np.ndarray) -> np.ndarray:
    """Unit normal of the slice plane from the six direction cosines (row × column)."""
    row, col = orientation[:3], orientation[3:]
    n = np.cross(row, col)
    norm = np.linalg.norm(n)
    if norm < 1e-6:
        raise ValueError("ImageOrientationPatient row and column directions are parallel")
    return n / norm


def check_series(group: pd.DataFrame, tol: GeometryTolerance) -> tuple[str | None, str, dict[str, float]]:
    """Return (failure or None, detail, geometry) for the instances of one series."""
    for column, what in (("PatientID", "patients"), ("StudyInstanceUID", "studies")):
        # A series belongs to one study of one patient (PS3.3 A.1.2); one UID over several is a
        # sender's broken UID generation, and its slices may well line up into one clean volume.
        if column in group and (count := group[column].astype(str).nunique()) > 1:
            return (f"several_{what}", f"this SeriesInstanceUID is shared by files of {count} {what} ({column}); "
                    "a series belongs to one study of one patient: fix how the sender makes its UIDs, or send "
                    "each acquisition under a UID of its own", {})
    n = len(group)
    if n < tol.min_slices:
        return "geometry:too_few_slices", f"{n} slices, at least {tol.min_slices} needed", {}
    iop = group[IOP_COLUMNS].to_numpy(dtype=float)
    if np.abs(iop - iop[0]).max() > tol.orientation:
        return "geometry:orientation", "slices have different ImageOrientationPatient", {}
    if group["Rows"].nunique() > 1 or group["Columns"].nunique() > 1:
        return "geometry:matrix", "slices have different Rows or Columns", {}
    ps = group[["PixelSpacing_0", "PixelSpacing_1"]].to_numpy(dtype=float)
    if np.abs(ps - ps[0]).max() > tol.pixel_spacing_mm:
        return "geometry:pixel_spacing", "slices have different PixelSpacing", {}
    try:
        normal = slice_normal(iop[0])
    except ValueError as err:
        return "geometry:orientation", str(err), {}
    ipp = group[IPP_COLUMNS].to_numpy(dtype=float)
    proj = ipp @ normal
    order = np.argsort(proj, kind="stable")
    steps = np.diff(proj[order])
    if (steps < tol.duplicate_mm).any():
        return "geometry:duplicate_position", f"{int((steps < tol.duplicate_mm).sum())} slices share a position", {}
    step = float(np.median(steps))
    deviation = np.abs(steps - step) / step
    if deviation.max() > tol.spacing_relative:
        worst = float(steps[np.argmax(deviation)])
        what = "gap" if worst > step * 1.5 else "nonuniform_spacing"
        return f"geometry:{what}", f"slice step {worst:.3f} mm where the median is {step:.3f} mm", {}
    # Preprocessing places slice k at k median steps from the first: each step may be within the
    # tolerance and their sum not (the nodules' positions in the reports would be that far off).
    drift = np.abs(proj[order] - proj[order][0] - step * np.arange(n))
    if drift.max() > tol.grid_drift * step:
        return ("geometry:nonuniform_spacing", f"slices lie up to {float(drift.max()):.2f} mm from a regular grid "
                f"of the median step {step:.3f} mm (ingest.geometry.grid_drift allows {tol.grid_drift} steps)", {})
    # Tilt: slice origins drift in-plane as they move along the normal.
    offsets = ipp[order] - ipp[order][0]
    along = offsets @ normal
    in_plane = np.linalg.norm(offsets - np.outer(along, normal), axis=1)
    tilt = float(np.degrees(np.arctan2(in_plane[-1], along[-1]))) if along[-1] > 0 else 0.0
    header_tilt = float(np.nan_to_num(group["GantryDetectorTilt"].astype(float).abs().max()))
    tilt = max(tilt, header_tilt)
    if tilt > tol.max_tilt_degrees:
        return "geometry:gantry_tilt", f"gantry tilt {tilt:.2f} degrees", {}
    geometry = {
        "slice_spacing": step,
        "tilt_degrees": tilt,
        "normal_0": float(normal[0]), "normal_1": float(normal[1]), "normal_2": float(normal[2]),
        "z_extent_mm": float(proj[order][-1] - proj[order][0]),
    }
    return None, "", {"order": order, **geometry}  # type: ignore[dict-item]


SERIES_COLUMNS = ["SeriesInstanceUID", "StudyInstanceUID", "PatientID", "Manufacturer",
                  "ManufacturerModelName", "ConvolutionKernel", "KVP", "Rows", "Columns",
                  "PixelSpacing_0", "PixelSpacing_1", "SliceThickness", "BitsStored",
                  "PixelRepresentation", "RescaleSlope", "RescaleIntercept", "TransferSyntaxUID",
                  "StudyDate"]


EMPTY_GEOMETRY = ["slice_spacing", "tilt_degrees", "normal_0", "normal_1", "normal_2", "z_extent_mm", "n_slices",
                  "instance_order_reversed"]


def assemble_series(index: pd.DataFrame, tol: GeometryTolerance | None = None) -> AssemblyResult:
    """Order and check every series in `index` (the de-identified instance table)."""
    tol = tol or GeometryTolerance()
    index, quarantine = drop_duplicate_instances(index)
    kept: list[pd.DataFrame] = []
    series_rows: list[dict[str, object]] = []
    rejected: list[pd.DataFrame] = [quarantine]
    for uid, group in index.groupby("SeriesInstanceUID", sort=True):
        failure, detail, geo = check_series(group, tol)
        if failure:
            rejected.append(group[["source_path"]].assign(reason=failure, detail=detail))
            continue
        order = geo.pop("order")
        ordered = group.iloc[order].copy()
        ordered["slice_index"] = np.arange(len(ordered), dtype=np.int32)
        ordered["slice_spacing"] = geo["slice_spacing"]
        kept.append(ordered)
        first = ordered.iloc[0]
        row = {c: first.get(c) for c in SERIES_COLUMNS}
        row.update(geo)
        row["n_slices"] = len(ordered)
        instance = ordered["InstanceNumber"].astype(float)
        row["instance_order_reversed"] = bool(instance.is_monotonic_decreasing and len(ordered) > 1)
        row["SeriesInstanceUID"] = uid
        series_rows.append(row)
    instances = pd.concat(kept, ignore_index=True) if kept else \
        index.iloc[0:0].assign(slice_index=pd.Series(dtype="int32"), slice_spacing=pd.Series(dtype="float64"))
    # No series accepted: the table keeps its columns, so that later steps read an empty table.
    series = pd.DataFrame(series_rows) if series_rows else pd.DataFrame(columns=[*SERIES_COLUMNS, *EMPTY_GEOMETRY])
    return AssemblyResult(
        instances=instances,
        series=series,
        quarantine=pd.concat(rejected, ignore_index=True)[["source_path", "reason", "detail"]],
    )
