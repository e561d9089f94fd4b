"""A nodule's Dice on the series' own grid (`dice_native`), beside the Dice at 1 mm.

On thick slices the 1 mm reference is the acquired mask's slices repeated; the native Dice reads the
prediction where the annotation was drawn, as the SEG is written back.
"""

from __future__ import annotations

import numpy as np
import pytest

from dicomops.segmentation import metrics as m
from dicomops.segmentation.native import to_native_mask

# Voxel spacing (slice, row, column order below is (i, j, k) = (column, row, slice)) of two demo vendors.
PHILIPS = (0.88, 0.88, 2.0)
SIEMENS = (0.68, 0.68, 1.0)
HALF = 16.0  # mm either side of the centre


def _affine(spacing: tuple[float, float, float], origin: float) -> np.ndarray:
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = origin
    return affine


def _grid(spacing: tuple[float, float, float]) -> tuple[np.ndarray, np.ndarray]:
    """Voxel centres (mm) of a grid from -HALF along each axis, and its affine."""
    axes = [np.arange(-HALF, HALF + 1e-6, s) for s in spacing]
    return np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1), _affine(spacing, -HALF)


def _sphere(points: np.ndarray, centre: np.ndarray, diameter: float) -> np.ndarray:
    return ((points - centre) ** 2).sum(axis=-1) <= (diameter / 2) ** 2


def _case(spacing: tuple[float, float, float], centre: np.ndarray, diameter: float):
    """A sphere annotated on a native grid, its reference at 1 mm by nearest neighbour (as the
    preprocessing resamples masks), and the exact sphere at 1 mm as a prediction."""
    native_points, native_affine = _grid(spacing)
    native = _sphere(native_points, centre, diameter).astype(np.uint8)
    pre_points, pre_affine = _grid((1.0, 1.0, 1.0))
    # The native mask read at the 1 mm voxel centres, nearest neighbour: the same lookup, the other way.
    reference = m.read_on_native(native, np.linalg.inv(native_affine) @ pre_affine, (0, 0, 0),
                                 pre_points.shape[:3]).astype(np.uint8)
    exact = _sphere(pre_points, centre, diameter).astype(np.float32)
    index = np.argwhere(native > 0)
    ref = m.NativeReference.of(index, native[tuple(index.T)], native.shape, native_affine, pre_affine)
    return exact, reference, ref, (native, native_affine, pre_affine)


def _dices(spacing: tuple[float, float, float], n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    at_1mm, native = [], []
    for _ in range(n):
        exact, reference, ref, _ = _case(spacing, rng.uniform(-1, 1, 3), rng.uniform(6, 14))
        row = m.evaluate_series(exact, reference, [m.NoduleRef(1, 8.0)], native=ref).nodules[0]
        at_1mm.append(row["dice"])
        native.append(row["dice_native"])
    return np.array(at_1mm), np.array(native)


def test_an_exact_sphere_is_judged_alike_on_every_vendor_only_on_its_own_slices() -> None:
    """The figures the metric's docstring quotes. An exact sphere of 6-14 mm, predicted at 1 mm,
    scores a mean Dice of 0.886 against philips' 2 mm slices repeated at 1 mm and 0.957 against
    siemens' 1 mm slices: a gap of 0.07 that no model can close. Read on each series' own grid it
    scores 0.932 and 0.939 (what is left is the 1 mm prediction's own grain)."""
    philips_1mm, philips_native = _dices(PHILIPS, 150)
    siemens_1mm, siemens_native = _dices(SIEMENS, 150)
    assert philips_1mm.mean() == pytest.approx(0.886, abs=0.005)
    assert siemens_1mm.mean() == pytest.approx(0.957, abs=0.005)
    assert philips_native.mean() == pytest.approx(0.932, abs=0.005)
    assert siemens_native.mean() == pytest.approx(0.939, abs=0.005)
    assert philips_native.mean() - philips_1mm.mean() > 0.04


def test_native_dice_is_the_1mm_dice_when_the_grids_are_one() -> None:
    """The same components on the same grid: the two Dices agree nodule by nodule, anywhere in a
    larger volume (the judgement's box shifts every index)."""
    rng = np.random.default_rng(3)
    shape = (60, 50, 40)
    points = np.stack(np.indices(shape), axis=-1).astype(float)
    reference = np.zeros(shape, np.uint8)
    reference[_sphere(points, np.array([40.0, 30.0, 25.0]), 9.0)] = 1
    reference[_sphere(points, np.array([12.0, 10.0, 8.0]), 7.0)] = 2
    prob = np.clip(reference.astype(np.float32) + rng.normal(0, 0.35, shape).astype(np.float32), 0, 1)
    prob[_sphere(points, np.array([41.5, 30.0, 25.0]), 9.0)] = 0.9  # shifted: a Dice below 1
    index = np.argwhere(reference > 0)
    ref = m.NativeReference.of(index, reference[tuple(index.T)], shape, np.eye(4), np.eye(4))
    rows = m.evaluate_series(prob, reference, [m.NoduleRef(1, 9.0), m.NoduleRef(2, 7.0)], native=ref).nodules
    for row in rows:
        assert row["dice_native"] == pytest.approx(row["dice"], abs=1e-12)
    assert rows[0]["dice"] < 0.99


def test_only_the_components_on_the_nodule_count_and_a_missed_nodule_scores_zero() -> None:
    exact, reference, ref, (native, native_affine, pre_affine) = _case(PHILIPS, np.zeros(3), 10.0)
    far = np.zeros_like(exact)
    far[2:6, 2:6, 2:6] = 1.0  # a false positive away from the nodule
    row = m.evaluate_series(np.maximum(exact, far), reference, [m.NoduleRef(1, 10.0)], native=ref).nodules[0]
    alone = m.evaluate_series(exact, reference, [m.NoduleRef(1, 10.0)], native=ref).nodules[0]
    assert row["dice_native"] == alone["dice_native"]
    missed = m.evaluate_series(far, reference, [m.NoduleRef(1, 10.0)], native=ref).nodules[0]
    assert missed["dice_native"] == 0.0 and missed["dice"] == 0.0
    # The SEG's own lookup gives the same mask: the Dice is that of what goes back.
    seg = to_native_mask(exact, pre_affine, native_affine, native.shape)
    truth = native > 0
    assert alone["dice_native"] == pytest.approx(2 * (seg & truth).sum() / (seg.sum() + truth.sum()))


def test_without_a_native_reference_the_native_dice_is_absent_from_the_means() -> None:
    exact, reference, ref, _ = _case(SIEMENS, np.zeros(3), 8.0)
    with_native = m.evaluate_series(exact, reference, [m.NoduleRef(1, 8.0)], series="a", vendor="v", native=ref)
    without = m.evaluate_series(exact, reference, [m.NoduleRef(1, 8.0)], series="b", vendor="v")
    assert without.nodules[0]["dice_native"] is None
    summary = m.summarise([with_native, without])
    assert summary["dice_ge6_native_mean"] == pytest.approx(with_native.nodules[0]["dice_native"])
    assert summary["dice_ge6_native_v"] == summary["dice_ge6_native_mean"]
    assert np.isnan(m.summarise([without])["dice_ge6_native_mean"])
    assert list(m.nodule_table([with_native]).columns).count("dice_native") == 1


def test_a_native_reference_needs_one_label_per_voxel() -> None:
    with pytest.raises(ValueError, match="one label per voxel"):
        m.NativeReference.of(np.zeros((3, 3)), np.ones(2), (4, 4, 4), np.eye(4), np.eye(4))
