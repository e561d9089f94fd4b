"""Series assembly: geometric order, gaps, duplicates, tilt, mixed orientation and spacing."""

from __future__ import annotations

import numpy as np
import pandas as pd

from dicomops.dicom.series import GeometryTolerance, assemble_series


def _series(z: list[float], uid: str = "S1", *, shift_x_per_slice: float = 0.0,
            orientation: tuple[float, ...] = (1, 0, 0, 0, 1, 0), spacing: float = 0.7,
            instance_numbers: list[int] | None = None) -> pd.DataFrame:
    rows = []
    for k, zk in enumerate(z):
        rows.append({
            "source_path": f"{uid}/{k:03d}", "SOPInstanceUID": f"{uid}.{k}", "SeriesInstanceUID": uid,
            "StudyInstanceUID": "ST", "PatientID": "PX-A", "Rows": 64, "Columns": 64,
            "PixelSpacing_0": spacing, "PixelSpacing_1": spacing,
            "ImagePositionPatient_0": k * shift_x_per_slice, "ImagePositionPatient_1": 0.0,
            "ImagePositionPatient_2": zk,
            **{f"ImageOrientationPatient_{i}": float(v) for i, v in enumerate(orientation)},
            "InstanceNumber": (instance_numbers or list(range(1, len(z) + 1)))[k],
            "GantryDetectorTilt": 0.0, "Manufacturer": "ACME",
        })
    return pd.DataFrame(rows)


TOL = GeometryTolerance(min_slices=4)


def test_orders_by_position_not_by_instance_number_or_name() -> None:
    z = [5.0, 1.0, 3.0, 2.0, 4.0]
    result = assemble_series(_series(z, instance_numbers=[9, 3, 1, 7, 5]), TOL)
    assert result.quarantine.empty
    ordered = result.instances.sort_values("slice_index")
    assert ordered.ImagePositionPatient_2.tolist() == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert result.series.iloc[0].slice_spacing == 1.0


def test_reversed_order_and_feet_first_normal() -> None:
    # Orientation with the column direction flipped: the normal points to -z, so slice order
    # follows descending z; a z-sorting implementation gets it backwards.
    result = assemble_series(_series([0.0, 1.0, 2.0, 3.0], orientation=(1, 0, 0, 0, -1, 0)), TOL)
    ordered = result.instances.sort_values("slice_index")
    assert ordered.ImagePositionPatient_2.tolist() == [3.0, 2.0, 1.0, 0.0]
    assert result.series.iloc[0].normal_2 == -1.0


def test_true_spacing_differs_from_thickness() -> None:
    result = assemble_series(_series(list(np.arange(8) * 0.625)), TOL)
    assert abs(result.series.iloc[0].slice_spacing - 0.625) < 1e-9


def test_gap_is_quarantined_as_a_whole_series() -> None:
    result = assemble_series(_series([0.0, 1.0, 2.0, 4.0, 5.0]), TOL)
    assert result.instances.empty
    assert set(result.quarantine.reason) == {"geometry:gap"} and len(result.quarantine) == 5


def test_duplicate_position() -> None:
    result = assemble_series(_series([0.0, 1.0, 1.0, 2.0, 3.0]), TOL)
    assert set(result.quarantine.reason) == {"geometry:duplicate_position"}


def test_nonuniform_spacing() -> None:
    result = assemble_series(_series([0.0, 1.0, 2.0, 3.3, 4.3, 5.3]), TOL)
    assert set(result.quarantine.reason) == {"geometry:nonuniform_spacing"}


def test_gantry_tilt_from_positions() -> None:
    # 0.2 mm lateral drift per 1 mm slice is an 11 degree tilt.
    result = assemble_series(_series([0.0, 1.0, 2.0, 3.0, 4.0], shift_x_per_slice=0.2), TOL)
    assert set(result.quarantine.reason) == {"geometry:gantry_tilt"}
    small = assemble_series(_series([0.0, 1.0, 2.0, 3.0, 4.0], shift_x_per_slice=0.001), TOL)
    assert small.quarantine.empty and small.series.iloc[0].tilt_degrees < 0.1


def test_mixed_orientation_and_pixel_spacing() -> None:
    a = _series([0.0, 1.0, 2.0, 3.0])
    a.loc[2, "ImageOrientationPatient_0"] = 0.9
    assert set(assemble_series(a, TOL).quarantine.reason) == {"geometry:orientation"}
    b = _series([0.0, 1.0, 2.0, 3.0])
    b.loc[1, "PixelSpacing_0"] = 0.9
    assert set(assemble_series(b, TOL).quarantine.reason) == {"geometry:pixel_spacing"}


def test_duplicate_instance_keeps_the_first_copy() -> None:
    frame = _series([0.0, 1.0, 2.0, 3.0])
    copy = frame.iloc[[1]].assign(source_path="S1/zzz_copy")
    result = assemble_series(pd.concat([frame, copy]), TOL)
    assert result.quarantine.to_dict("records") == [
        {"source_path": "S1/zzz_copy", "reason": "duplicate_instance",
         "detail": "same SOPInstanceUID as an earlier file"}]
    assert len(result.instances) == 4


def test_too_few_slices() -> None:
    result = assemble_series(_series([0.0, 1.0]), TOL)
    assert set(result.quarantine.reason) == {"geometry:too_few_slices"}


def test_the_tolerances_are_the_config_section_with_its_defaults_and_bounds() -> None:
    import pydantic
    import pytest

    from dicomops.config import GeometryConfig, IngestConfig

    assert GeometryTolerance is GeometryConfig
    assert IngestConfig().geometry == GeometryTolerance() and GeometryTolerance().min_slices == 8
    with pytest.raises(pydantic.ValidationError, match="min_slices"):
        GeometryTolerance(min_slices=0)
    # A config value reaches the check: a 1.3 mm in-plane spacing change passes only when allowed.
    frame = pd.concat([_series([0, 1, 2, 3], spacing=0.7), _series([4, 5], spacing=2.0)], ignore_index=True)
    frame["SOPInstanceUID"] = [f"S1.{k}" for k in range(len(frame))]
    frame["source_path"] = [f"S1/{k:03d}" for k in range(len(frame))]
    strict = assemble_series(frame, IngestConfig(geometry={"min_slices": 4}).geometry)
    loose = IngestConfig(geometry={"min_slices": 4, "pixel_spacing_mm": 2.0}).geometry
    assert set(strict.quarantine.reason) == {"geometry:pixel_spacing"}
    assert assemble_series(frame, loose).quarantine.empty


def test_a_series_uid_shared_by_two_patients_is_quarantined_even_when_its_slices_line_up() -> None:
    """A sender that reuses series UIDs: patient B's slices continue patient A's grid, a clean volume
    of two people unless the identity is checked."""
    first, second = _series([0.0, 1.0, 2.0, 3.0]), _series([4.0, 5.0, 6.0, 7.0])
    second["SOPInstanceUID"] += "-b"
    second["source_path"] += "-b"
    assert assemble_series(pd.concat([first, second.assign(PatientID="PX-A")]), TOL).quarantine.empty
    for column, reason in (("PatientID", "several_patients"), ("StudyInstanceUID", "several_studies")):
        result = assemble_series(pd.concat([first, second.assign(**{column: "OTHER"})]), TOL)
        assert result.instances.empty and set(result.quarantine.reason) == {reason}
        assert len(result.quarantine) == 8 and "OTHER" not in result.quarantine.detail.iloc[0]


def test_steps_each_within_tolerance_that_add_up_off_the_grid_are_quarantined() -> None:
    """80 steps of 1.0 mm then 79 of 1.09 mm: every step within 10 % of the median, yet the last
    slices lie 7 mm from where preprocessing's regular grid puts them (a bug hunt's SR point was
    6.8 mm off its nodule). A scanner's jitter of a few hundredths stays accepted."""
    z = np.concatenate([np.arange(81) * 1.0, 80.0 + np.arange(1, 80) * 1.09])
    result = assemble_series(_series(z.tolist()), TOL)
    assert set(result.quarantine.reason) == {"geometry:nonuniform_spacing"}
    assert "from a regular grid" in result.quarantine.detail.iloc[0]
    jitter = np.arange(160) * 1.0 + np.random.default_rng(0).uniform(-0.03, 0.03, 160)
    assert assemble_series(_series(jitter.tolist()), TOL).quarantine.empty
