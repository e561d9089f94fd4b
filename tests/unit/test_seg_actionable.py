"""The actionable call read off the segmenter's findings: solid widths on constructed shapes, the
solid level per window, the score's ordering, its AUC and the cross-validation summary that reads
like the classifier's."""

from __future__ import annotations

import numpy as np
import pytest

from dicomops.config import PreprocessConfig
from dicomops.segmentation import actionable
from dicomops.segmentation.cv import actionable_cv
from dicomops.segmentation.metrics import (
    Found,
    SeriesEval,
    actionable_auc,
    findings,
    solid_width_mm,
    summarise,
)

SHAPE = (48, 48, 48)
LUNG = 0.33  # aerated lung in the lung window's units
GROUND_GLASS = 0.55  # about -525 HU
SOLID = 0.93  # about +50 HU


def ball(shape: tuple[int, int, int], centre: tuple[float, float, float], diameter: float) -> np.ndarray:
    grid = np.indices(shape).astype(float)
    return sum((g - c) ** 2 for g, c in zip(grid, centre, strict=True)) <= (diameter / 2) ** 2


def tube(shape: tuple[int, int, int], centre: tuple[float, float, float], calibre: float) -> np.ndarray:
    """A vessel along the first axis through `centre`, `calibre` wide."""
    grid = np.indices(shape).astype(float)
    return (grid[1] - centre[1]) ** 2 + (grid[2] - centre[2]) ** 2 <= (calibre / 2) ** 2


def test_solid_width_is_a_cores_diameter_and_a_vessels_calibre_whatever_its_length() -> None:
    core = ball(SHAPE, (24, 24, 24), 7)
    assert 6.0 <= solid_width_mm(core) <= 8.0
    vessel = tube(SHAPE, (24, 24, 24), 3) & ball(SHAPE, (24, 24, 24), 14)  # 14 mm of a 3 mm vessel
    volume_diameter = (6 * vessel.sum() / np.pi) ** (1 / 3)
    assert volume_diameter > 5.0  # as many voxels as a 5 mm core ...
    assert solid_width_mm(vessel) <= 4.0  # ... but it is 3 mm across
    assert solid_width_mm(np.zeros(SHAPE, bool)) == 0.0
    # Spacing: the same voxels at 0.5 mm are half as wide.
    assert solid_width_mm(core, (0.5, 0.5, 0.5)) == pytest.approx(solid_width_mm(core) / 2)


def _series(solid_core: bool, vessel: bool, diameter: float = 14) -> tuple[np.ndarray, np.ndarray]:
    """A ground-glass (or solid) nodule of `diameter` in lung; its probability map."""
    image = np.full(SHAPE, LUNG, np.float32)
    nodule = ball(SHAPE, (24, 24, 24), diameter)
    image[nodule] = GROUND_GLASS
    if vessel:
        image[tube(SHAPE, (24, 24, 24), 3)] = SOLID
    if solid_core:
        image[ball(SHAPE, (24, 24, 24), diameter * 0.45)] = SOLID
    prob = np.where(nodule, 0.95, 0.01).astype(np.float32)
    return image, prob


@pytest.mark.parametrize(("core", "vessel", "width"), [(False, False, (0.0, 0.0)), (False, True, (2.0, 4.0)),
                                                       (True, True, (5.5, 7.5)), (True, False, (5.5, 7.5))])
def test_findings_measure_the_width_of_their_solid_part(core: bool, vessel: bool, width: tuple[float, float]) -> None:
    image, prob = _series(core, vessel)
    found, _ = findings(prob, image=image, solid_level=0.70)
    assert len(found) == 1
    assert width[0] <= found[0].solid_core_mm <= width[1]
    assert found[0].diameter_mm == pytest.approx(14, abs=0.5)


def test_findings_without_an_image_measure_no_core_and_need_both_arguments() -> None:
    image, prob = _series(True, False)
    found, _ = findings(prob)
    assert found[0].solid_core_mm is None
    with pytest.raises(ValueError, match="both image and solid_level"):
        findings(prob, image=image)
    with pytest.raises(ValueError, match="one shape"):
        findings(prob, image=image[:-1], solid_level=0.7)
    with pytest.raises(ValueError, match="solid core"):
        actionable.finding_score(found[0])


def test_the_solid_level_is_minus_300_hu_in_the_windows_units() -> None:
    assert actionable.solid_level(PreprocessConfig()) == pytest.approx(0.70)  # lung window [-1350, 150]
    assert actionable.solid_level(PreprocessConfig(window="none")) == -300.0
    assert actionable.solid_level(PreprocessConfig(window="soft_tissue")) == 0.0  # below its window: clipped
    assert actionable.solid_level(PreprocessConfig(window="header")) is None  # no one level: no call


def test_the_series_score_ranks_by_the_rule_solid_or_part_solid_and_at_least_6_mm() -> None:
    def score(d: float, core: float, p: float = 0.99) -> float:
        return actionable.series_score([Found((0.0, 0.0, 0.0), d, p, 100, solid_core_mm=core)])

    solid_8 = score(8, 8)
    part_solid_9 = score(9, 4.5)
    ground_glass_14_with_vessel = score(14, 2.8)
    solid_4 = score(4, 4)
    assert min(solid_8, part_solid_9) > 0.7
    assert max(ground_glass_14_with_vessel, solid_4) < 0.25
    assert score(8, 8, p=0.5) < solid_8  # the network's confidence still counts
    assert actionable.series_score([]) == 0.0
    # The best finding decides.
    many = [Found((0.0, 0.0, 0.0), 14, 0.99, 100, solid_core_mm=0.0), Found((1.0, 1.0, 1.0), 8, 0.9, 50, solid_core_mm=8)]
    assert actionable.series_score(many) == pytest.approx(actionable.finding_score(many[1]))


def _eval(vendor: str, ref: bool | None, score: float | None) -> SeriesEval:
    return SeriesEval(series=f"{vendor}-{score}", vendor=vendor, nodules=[], false_positives=[], dice=1.0,
                      present_ref=False, present_pred=False, actionable_ref=ref, actionable_score=score)


def test_actionable_auc_is_the_roc_auc_and_nan_where_it_is_undefined() -> None:
    evals = [_eval("a", True, 0.9), _eval("a", True, 0.4), _eval("a", False, 0.5), _eval("a", False, 0.1)]
    assert actionable_auc(evals) == pytest.approx(0.75)  # 3 of 4 pairs ordered
    assert np.isnan(actionable_auc(evals[:2]))
    assert np.isnan(actionable_auc([*evals, _eval("a", True, None)]))
    metrics = summarise(evals)
    assert metrics["auc_actionable"] == pytest.approx(0.75)
    assert metrics["auc_actionable_a"] == pytest.approx(0.75)


def test_the_cross_validation_summary_is_the_mean_over_folds_as_for_the_classifier() -> None:
    fold0 = [_eval("a", True, 0.9), _eval("a", False, 0.1), _eval("b", True, 0.3), _eval("b", False, 0.6)]
    fold1 = [_eval("a", True, 0.4), _eval("a", False, 0.5), _eval("b", True, 0.8), _eval("b", False, 0.2)]
    out = actionable_cv([fold0, fold1])
    # fold 0: all 0.75, a 1, b 0; fold 1: all 0.75, a 0, b 1.
    assert out["mean"] == pytest.approx(0.75)
    assert out["vendor"] == pytest.approx({"a": 0.5, "b": 0.5})
    assert out["std"] == pytest.approx(0.0)
    assert actionable_cv([fold0, [_eval("a", True, None)]]) == {}


def test_the_console_line_gives_the_call_per_vendor_and_a_dash_where_it_was_not_made() -> None:
    from dicomops.segmentation.cv import describe

    base = {"cpm": 0.9441, "dice_ge6_mean": 0.8243, "kappa_series": 0.8323}
    line = describe(base | {"actionable_auc": 0.9895, "vendor_actionable_auc": {"ge": 1.0, "philips": 0.9167}})
    assert line == ("CPM 0.944, Dice (nodules >= 6 mm) 0.824, series kappa 0.832, actionable-call AUC 0.990 "
                    "(ge 1.000, philips 0.917)")
    assert describe(base | {"actionable_auc": None, "vendor_actionable_auc": {}}).endswith("actionable-call AUC –")
    # The Dice on the acquired slices, where the summary has one.
    assert describe(base | {"dice_ge6_native_mean": 0.8391, "actionable_auc": None}).startswith(
        "CPM 0.944, Dice (nodules >= 6 mm) 0.824 (on the acquired slices 0.839), series kappa 0.832")


def test_the_call_slice_by_slice_scores_each_slice_by_the_findings_on_it() -> None:
    """The segmenter as a slice teacher: an 8 mm solid nodule scores high on its slices only, a 4 mm
    one low on its own, a slice with both takes the better, and empty slices score 0."""
    from dicomops.config import SegmentConfig
    from dicomops.segmentation.teacher import as_logits

    image = np.full(SHAPE, LUNG, np.float32)
    prob = np.full(SHAPE, 0.01, np.float32)
    big, small = ball(SHAPE, (14, 14, 20), 8), ball(SHAPE, (34, 34, 24), 4)
    for nodule in (big, small):
        image[nodule], prob[nodule] = SOLID, 0.95
    found = actionable.weighed(prob, image, 0.8, SegmentConfig())
    assert sorted(f.slices for f in found) == [(16, 25), (22, 27)]  # the last axis: z 20 ± 4, z 24 ± 2
    scores = actionable.slice_scores(found, SHAPE[-1])
    best = max(actionable.finding_score(f) for f in found)
    weak = min(actionable.finding_score(f) for f in found)
    assert best > 0.8 and weak < 0.1
    assert np.allclose(scores[16:25], best) and np.allclose(scores[25:27], weak)
    assert not scores[:16].any() and not scores[27:].any()
    # The same call the series gets: its best slice is its score.
    assert scores.max() == pytest.approx(actionable.series_score(found))
    # As logits, a softmax gives the score back, within the floor of a slice with no finding.
    logits = as_logits(scores)
    assert np.allclose(logits.softmax(1)[:, 1].numpy(), np.clip(scores, 1e-3, 1 - 1e-3), rtol=1e-5, atol=1e-6)
    assert np.isfinite(logits.numpy()).all()
    with pytest.raises(ValueError, match="no slices"):
        actionable.slice_scores([Found((0.0, 0.0, 0.0), 8, 0.9, 50, solid_core_mm=8)], 4)
