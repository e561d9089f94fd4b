"""Nodule kinds and attachments of generator version 3: density, edge, size, place, labels, masks."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from dicomops.config import SynthConfig
from dicomops.synthetic import phantom, plan_corpus, render_series
from dicomops.synthetic.corpus import SeriesPlan, write_series
from dicomops.synthetic.phantom import Nodule, NoduleSpec

LUNG_LIKE = (phantom.REGION_LUNG, phantom.REGION_VESSEL)


def _anatomy(seed: int = 3, vessels: bool = True) -> phantom.Anatomy:
    anatomy = phantom.sample_anatomy(np.random.default_rng(seed), z_center=0.0)
    return anatomy if vessels else replace(anatomy, vessels=())


def _place(spec: NoduleSpec, seed: int = 0, anatomy: phantom.Anatomy | None = None) -> tuple[phantom.Anatomy, Nodule]:
    anatomy = anatomy or _anatomy()
    (nodule,) = phantom.place_nodules(np.random.default_rng(seed), anatomy, [spec], np.arange(-30.0, 30.0, 1.0))
    assert nodule.attachment == spec.attachment and nodule.kind == spec.kind
    return anatomy, nodule


def _grid_around(nodule: Nodule, spacing: float = 1.0, z_step: float = 1.0) -> phantom.Grid:
    """A grid wide enough for the whole chest, with only the slices through the nodule."""
    n = round(330 / spacing) // 2 * 2
    half = nodule.diameter_mm / 2 + 4.0
    z = np.arange(nodule.center[2] - half, nodule.center[2] + half + 1e-6, z_step)
    return phantom.Grid(rows=n, cols=n, row_spacing=spacing, col_spacing=spacing, z=z)


def _distance(grid: phantom.Grid, center: tuple[float, float, float]) -> np.ndarray:
    z = np.asarray(grid.z)[:, None, None]
    y = (grid.y0 + np.arange(grid.rows) * grid.row_spacing)[None, :, None]
    x = (grid.x0 + np.arange(grid.cols) * grid.col_spacing)[None, None, :]
    return np.sqrt((x - center[0]) ** 2 + (y - center[1]) ** 2 + (z - center[2]) ** 2)


def _render(anatomy: phantom.Anatomy, nodule: Nodule, grid: phantom.Grid):
    hu0, regions0, _ = phantom.render_phantom(anatomy, [], grid)
    hu, _, mask = phantom.render_phantom(anatomy, [nodule], grid)
    return hu0, regions0, hu, mask, _distance(grid, nodule.center)


def _transition_width(hu: np.ndarray, background: np.ndarray, d: np.ndarray, target: float) -> float:
    """Radial width of the 10-90 % HU transition from lung to the nodule's density."""
    lo, hi = phantom.HU_LUNG + 0.1 * (target - phantom.HU_LUNG), phantom.HU_LUNG + 0.9 * (target - phantom.HU_LUNG)
    ramp = background & (hu > lo) & (hu < hi)
    return float(d[ramp].max() - d[ramp].min())


def test_solid_nodule_is_soft_tissue_with_a_sharp_edge() -> None:
    anatomy, nodule = _place(NoduleSpec("solid"), anatomy=_anatomy(vessels=False))
    _, regions0, hu, mask, d = _render(anatomy, nodule, _grid_around(nodule))
    assert nodule.hu == phantom.HU_NODULE and nodule.actionable
    r = nodule.diameter_mm / 2
    np.testing.assert_array_equal(hu[d <= r - 0.5], phantom.HU_NODULE)
    np.testing.assert_array_equal(mask == 1, d <= r)
    assert _transition_width(hu, regions0 == phantom.REGION_LUNG, d, phantom.HU_NODULE) <= 1.0


def test_ground_glass_is_grey_hazy_and_not_actionable() -> None:
    # Densities over many draws stay in -750..-300 HU and use the range.
    anatomy = _anatomy(vessels=False)
    drawn = phantom.place_nodules(np.random.default_rng(1), anatomy, [NoduleSpec("ground-glass")] * 60,
                                  np.arange(-200.0, 200.0, 1.0))
    densities = np.array([n.hu for n in drawn])
    assert densities.min() >= -750 and densities.max() <= -300 and np.ptp(densities) > 250
    assert all(5.0 <= n.diameter_mm <= 15.0 and not n.actionable for n in drawn)

    _, nodule = _place(NoduleSpec("ground-glass"), anatomy=anatomy)
    _, regions0, hu, mask, d = _render(anatomy, nodule, _grid_around(nodule))
    r, soft = nodule.diameter_mm / 2, nodule.edge_mm
    assert 2.0 <= soft <= 3.0
    np.testing.assert_array_equal(hu[d <= r - soft / 2], np.float32(nodule.hu))
    inside = hu[mask == 1]
    assert inside.min() >= phantom.HU_LUNG and inside.max() <= -300
    assert phantom.GGO_HU[0] <= np.median(inside) <= phantom.GGO_HU[1]

    # The same nodule, solid, has an edge less than half as wide: ill-defined versus sharp.
    solid = replace(nodule, kind="solid", hu=phantom.HU_NODULE, edge_mm=0.0)
    hu_solid = phantom.render_phantom(anatomy, [solid], _grid_around(nodule))[0]
    lung = regions0 == phantom.REGION_LUNG
    ggo_width = _transition_width(hu, lung, d, nodule.hu)
    solid_width = _transition_width(hu_solid, lung, d, phantom.HU_NODULE)
    assert ggo_width >= 1.5 and ggo_width > 2 * solid_width, (ggo_width, solid_width)


def test_ground_glass_lets_vessels_show_through() -> None:
    anatomy, nodule = _place(NoduleSpec("ground-glass", "vascular"), seed=4)
    hu0, regions0, hu, mask, _ = _render(anatomy, nodule, _grid_around(nodule, spacing=0.5))
    vessel = (regions0 == phantom.REGION_VESSEL) & (mask > 0)
    assert vessel.any()
    np.testing.assert_array_equal(hu[vessel], hu0[vessel])


def test_part_solid_has_a_solid_core_in_ground_glass() -> None:
    anatomy, nodule = _place(NoduleSpec("part-solid"), seed=2, anatomy=_anatomy(vessels=False))
    assert 0.3 <= nodule.core_fraction <= 0.6 and phantom.GGO_HU[0] <= nodule.hu <= phantom.GGO_HU[1]
    _, _, hu, mask, d = _render(anatomy, nodule, _grid_around(nodule))
    r, core = nodule.diameter_mm / 2, nodule.diameter_mm / 2 * nodule.core_fraction
    np.testing.assert_array_equal(hu[d <= core - 0.5], phantom.HU_NODULE)
    shell = (d >= core + 1.0) & (d <= r - nodule.edge_mm / 2)
    assert shell.any()
    np.testing.assert_array_equal(hu[shell], np.float32(nodule.hu))
    assert (mask[d <= r] == 1).all()  # the mask is the whole nodule, not only its core


@pytest.mark.parametrize("spec", [NoduleSpec("solid"), NoduleSpec("ground-glass"), NoduleSpec("part-solid"),
                                  NoduleSpec("solid", "vascular"), NoduleSpec("solid", small=True)])
def test_mask_volume_is_the_sphere(spec: NoduleSpec) -> None:
    anatomy, nodule = _place(spec, seed=5)
    grid = _grid_around(nodule)
    mask = phantom.render_phantom(anatomy, [nodule], grid)[2]
    expected = np.pi / 6 * nodule.diameter_mm**3
    tolerance = 0.25 if spec.small else 0.1
    assert abs(int((mask == 1).sum()) - expected) <= tolerance * expected, (mask.sum(), expected)


@pytest.mark.parametrize("seed", range(4))
def test_pleural_nodule_reaches_into_the_wall_and_its_mask_stops_at_the_lung(seed: int) -> None:
    anatomy, nodule = _place(NoduleSpec("solid", "pleural"), seed=seed, anatomy=_anatomy(seed))
    hu0, regions0, hu, mask, d = _render(anatomy, nodule, _grid_around(nodule))
    sphere = d <= nodule.diameter_mm / 2
    in_wall = sphere & ~np.isin(regions0, LUNG_LIKE)
    assert in_wall.any(), "a juxta-pleural nodule touches the chest wall"
    # Only lateral or posterior chest wall: soft tissue, never the heart, bone or fat.
    assert set(np.unique(regions0[in_wall])) == {phantom.REGION_SOFT}
    np.testing.assert_array_equal(mask > 0, sphere & ~in_wall)
    np.testing.assert_array_equal(hu[in_wall], hu0[in_wall])
    assert 0.3 * sphere.sum() < (mask > 0).sum() < sphere.sum()


@pytest.mark.parametrize("seed", range(4))
def test_vascular_nodule_touches_a_vessel(seed: int) -> None:
    anatomy, nodule = _place(NoduleSpec("solid", "vascular"), seed=seed, anatomy=_anatomy(seed))
    _, regions0, _, mask, _ = _render(anatomy, nodule, _grid_around(nodule, spacing=0.5))
    touching = ndimage.binary_dilation(mask > 0, iterations=1)
    assert (touching & (regions0 == phantom.REGION_VESSEL)).any()
    assert phantom.nodule_fits(anatomy, nodule)


def test_nodules_keep_apart_and_out_of_the_mediastinum() -> None:
    anatomy = _anatomy(7)
    specs = [NoduleSpec("solid", "none"), NoduleSpec("part-solid", "pleural"), NoduleSpec("solid", "vascular"),
             NoduleSpec("ground-glass", "none"), NoduleSpec("solid", "pleural", small=True)]
    nodules = phantom.place_nodules(np.random.default_rng(8), anatomy, specs, np.arange(-30.0, 30.0, 1.0))
    assert [(n.kind, n.attachment) for n in nodules] == [(s.kind, s.attachment) for s in specs]
    for i, a in enumerate(nodules):
        fits = phantom.pleural_fits if a.attachment == "pleural" else phantom.nodule_fits
        assert fits(anatomy, a)
        for b in nodules[i + 1:]:
            gap = np.linalg.norm(np.subtract(a.center, b.center)) - (a.diameter_mm + b.diameter_mm) / 2
            assert gap >= phantom.NODULE_GAP_MM


def _plan(specs: tuple[NoduleSpec, ...], label: int, **kw) -> SeriesPlan:
    base = dict(index=2, seed=9, scenario="baseline", vendor="siemens", label=label, nodule_count=len(specs),
                fault=None, fault_detail="", matrix=128, slices=24, nodule_specs=specs)
    base.update(kw)
    return SeriesPlan(**base)


def test_small_nodules_are_annotated_but_leave_the_series_negative(tmp_path: Path) -> None:
    plan = _plan((NoduleSpec("solid", small=True), NoduleSpec("part-solid", "pleural", small=True)), label=0)
    row = write_series(plan, tmp_path).label_row
    records = json.loads(str(row["nodules"]))
    assert row["label"] == 0 and row["actionable_count"] == 0 and row["nodule_count"] == 2
    assert all(3.0 <= n["diameter_mm"] < 6.0 and n["actionable"] is False for n in records)
    assert [n["kind"] for n in records] == ["solid", "part-solid"]
    with np.load(tmp_path / str(row["mask_path"])) as npz:
        assert set(np.unique(npz["mask"])) == {0, 1, 2}


def test_mismatched_nodule_specs_are_refused() -> None:
    with pytest.raises(ValueError, match="nodule_count"):
        _plan((NoduleSpec(),), label=1, nodule_count=2)
    with pytest.raises(ValueError, match="kind"):
        NoduleSpec("calcified")


def test_plan_label_rule_and_mix() -> None:
    plans = plan_corpus(SynthConfig(patients=600, seed=4))
    anatomy = _anatomy(1)
    kinds: dict[str, int] = {}
    for plan in plans:
        actionable = [s for s in plan.specs if s.actionable]
        if plan.label:
            assert 1 <= len(actionable) <= 3 and len(plan.specs) - len(actionable) <= 1
        else:
            assert not actionable and len(plan.specs) <= 2
        for s in plan.specs:
            kinds[s.kind] = kinds.get(s.kind, 0) + 1
        # Drawn sizes keep the rule: an actionable spec gives >= 6 mm, the others do not act.
        nodules = phantom.place_nodules(np.random.default_rng(plan.index), anatomy, list(plan.specs),
                                        np.arange(-30.0, 30.0, 1.0))
        assert int(any(n.actionable for n in nodules)) == plan.label
    negatives = [p for p in plans if not p.label]
    assert 0.3 < np.mean([p.nodule_count > 0 for p in negatives]) < 0.5
    assert kinds["solid"] > kinds["part-solid"] + kinds["ground-glass"]  # solid dominates


def test_mask_instance_ids_follow_the_record_order(tmp_path: Path) -> None:
    specs = (NoduleSpec("solid"), NoduleSpec("ground-glass", "vascular"), NoduleSpec("part-solid"))
    plan = _plan(specs, label=1, matrix=256, slices=40)
    row = write_series(plan, tmp_path).label_row
    rendered = render_series(plan)
    records = json.loads(str(row["nodules"]))
    assert [r["kind"] for r in records] == [s.kind for s in specs] == [n.kind for n in rendered.nodules]
    assert row["actionable_count"] == 2 and [r["actionable"] for r in records] == [True, False, True]
    with np.load(tmp_path / str(row["mask_path"])) as npz:
        mask, ipp_z = npz["mask"], npz["ipp_z"]
    np.testing.assert_array_equal(mask, rendered.mask)
    assert set(np.unique(mask)) == {0, 1, 2, 3}
    g = rendered.grid
    for k, record in enumerate(records):
        zi, yi, xi = np.nonzero(mask == k + 1)
        centroid = (g.x0 + xi.mean() * g.col_spacing, g.y0 + yi.mean() * g.row_spacing, ipp_z[zi].mean())
        assert np.allclose(centroid, record["center_mm"], atol=1.5), (k, centroid, record["center_mm"])


def test_same_plan_gives_identical_arrays() -> None:
    specs = (NoduleSpec("part-solid", "pleural"), NoduleSpec("ground-glass", "vascular"),
             NoduleSpec("solid", small=True))
    a, b = render_series(_plan(specs, label=1)), render_series(_plan(specs, label=1))
    assert a.nodules == b.nodules
    np.testing.assert_array_equal(a.mask, b.mask)
    np.testing.assert_array_equal(a.acquisition.stored, b.acquisition.stored)
    assert plan_corpus(SynthConfig(patients=50, seed=6)) == plan_corpus(SynthConfig(patients=50, seed=6))
