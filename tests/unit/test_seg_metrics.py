"""Nodule segmentation metrics on small constructed volumes: Dice, candidates, the LUNA16 hit rule,
FROC/CPM and kappa checked against hand computations, summaries and the two pictures."""

from __future__ import annotations

import math
import re
from pathlib import Path

import matplotlib
import matplotlib.image
import numpy as np
import pytest

from dicomops.segmentation import plots
from dicomops.segmentation.metrics import (
    FP_RATES,
    MAX_ELONGATION,
    SIZE_BINS,
    NoduleRef,
    SeriesEval,
    elongation,
    equivalent_diameter_mm,
    evaluate_series,
    extract_candidates,
    findings,
    froc,
    nodule_table,
    series_kappa,
    series_kappa_interval,
    size_bin,
    size_kappa,
    size_pairs,
    summarise,
)

matplotlib.use("Agg")

SHAPE = (40, 40, 40)


def cube(volume: np.ndarray, lo: tuple[int, int, int], size: int | tuple[int, int, int], value: float) -> None:
    s = (size,) * 3 if isinstance(size, int) else size
    volume[lo[0]:lo[0] + s[0], lo[1]:lo[1] + s[1], lo[2]:lo[2] + s[2]] = value


def volumes() -> tuple[np.ndarray, np.ndarray]:
    return np.zeros(SHAPE, np.float32), np.zeros(SHAPE, np.int16)


def nodule(score: float | None, kind: str = "solid", diameter: float = 8.0, dice: float = 0.5,
           predicted: float | None = None) -> dict:
    return {"label": 1, "diameter_mm": diameter, "kind": kind, "attachment": "none", "size_bin": size_bin(diameter),
            "score": score, "dice": dice, "predicted_diameter_mm": predicted}


def scan(nodules: list[dict], fps: list[float], vendor: str = "A", *, ref: bool | None = None,
         pred: bool = True, fp_diameters: list[float | None] | None = None, dice: float = 0.5) -> SeriesEval:
    return SeriesEval(series="s", vendor=vendor, nodules=nodules, false_positives=fps, dice=dice,
                      present_ref=bool(nodules) if ref is None else ref, present_pred=pred,
                      false_positive_diameters_mm=fp_diameters or [])


# -- size bins and Dice ------------------------------------------------------------------------


def test_size_bin_edges() -> None:
    assert [size_bin(d) for d in (0, 5.99, 6, 9.99, 10, 30)] == [SIZE_BINS[0]] * 2 + [SIZE_BINS[1]] * 2 + [SIZE_BINS[2]] * 2
    with pytest.raises(ValueError, match="diameter_mm"):
        size_bin(-1)


def test_perfect_cube_has_dice_one_and_its_equivalent_diameter() -> None:
    prob, ref = volumes()
    cube(ref, (10, 10, 10), 4, 1)
    cube(prob, (10, 10, 10), 4, 0.9)
    e = evaluate_series(prob, ref, [NoduleRef(1, 5.0)])
    (n,) = e.nodules
    assert n["dice"] == 1.0 and e.dice == 1.0
    assert n["score"] == pytest.approx(0.9)
    # 64 voxels of 1 mm³: (6 * 64 / pi) ** (1/3) = 122.23 ** (1/3) = 4.963 mm
    assert n["predicted_diameter_mm"] == pytest.approx(4.9633, abs=1e-3)
    assert e.false_positives == [] and e.present_ref and e.present_pred


def test_spacing_scales_predicted_diameter() -> None:
    prob, ref = volumes()
    cube(ref, (10, 10, 10), 4, 1)
    cube(prob, (10, 10, 10), 4, 0.9)
    e = evaluate_series(prob, ref, [NoduleRef(1, 10.0)], spacing=(2.0, 1.0, 1.0))
    # 64 voxels of 2 mm³ = 128 mm³: 4.963 * 2 ** (1/3) = 6.253 mm
    assert e.nodules[0]["predicted_diameter_mm"] == pytest.approx(6.2535, abs=1e-3)


def test_half_overlap_dice() -> None:
    prob, ref = volumes()
    cube(ref, (10, 10, 10), 4, 1)
    cube(prob, (12, 10, 10), 4, 0.8)  # shifted 2 of 4 voxels along i
    e = evaluate_series(prob, ref, [NoduleRef(1, 5.0)])
    # |P ∩ R| = 2 * 4 * 4 = 32, |P| = |R| = 64: 2 * 32 / 128 = 0.5
    assert e.nodules[0]["dice"] == pytest.approx(0.5)
    assert e.dice == pytest.approx(0.5)


def test_false_positive_elsewhere_lowers_series_dice_not_nodule_dice() -> None:
    prob, ref = volumes()
    cube(ref, (5, 5, 5), 4, 1)
    cube(prob, (5, 5, 5), 4, 0.9)
    cube(prob, (30, 30, 30), 4, 0.7)  # 64 predicted voxels on no nodule
    e = evaluate_series(prob, ref, [NoduleRef(1, 5.0)])
    assert e.nodules[0]["dice"] == 1.0
    # series: 2 * 64 / (128 + 64) = 2/3
    assert e.dice == pytest.approx(2 / 3)
    assert e.false_positives == [pytest.approx(0.7)]
    assert e.false_positive_diameters_mm == [pytest.approx(4.9633, abs=1e-3)]


def test_per_nodule_dice_counts_whole_overlapping_component_and_threshold() -> None:
    prob, ref = volumes()
    cube(ref, (10, 10, 10), 2, 1)  # 8 voxels
    cube(prob, (10, 10, 10), (4, 2, 2), 0.9)  # 16 voxels, 8 on the nodule
    cube(prob, (14, 10, 10), (2, 2, 2), 0.3)  # touching, but under the threshold of 0.5
    e = evaluate_series(prob, ref, [NoduleRef(1, 3.0)])
    # P = the 16 voxels at >= 0.5: 2 * 8 / (16 + 8) = 2/3
    assert e.nodules[0]["dice"] == pytest.approx(2 / 3)
    assert e.nodules[0]["score"] == pytest.approx(0.9)


def test_empty_series_has_dice_one_and_missed_nodule_none_and_zero() -> None:
    prob, ref = volumes()
    e = evaluate_series(prob, ref, [])
    assert e.dice == 1.0 and e.nodules == [] and not e.present_ref and not e.present_pred

    cube(ref, (10, 10, 10), 4, 1)
    e = evaluate_series(prob, ref, [NoduleRef(1, 5.0)])
    assert e.nodules[0]["score"] is None
    assert e.nodules[0]["dice"] == 0.0
    assert e.nodules[0]["predicted_diameter_mm"] is None
    assert e.dice == 0.0 and e.present_ref and not e.present_pred


def test_unknown_label_and_bad_thresholds_raise() -> None:
    prob, ref = volumes()
    with pytest.raises(ValueError, match=r"label\(s\) \[3\]"):
        evaluate_series(prob, ref, [NoduleRef(3, 5.0)])
    with pytest.raises(ValueError, match="candidate_threshold"):
        evaluate_series(prob, ref, [], threshold=0.1, candidate_threshold=0.5)


# -- candidates and the hit rule ---------------------------------------------------------------


def test_two_blobs_give_two_candidates_best_first_and_single_voxels_drop() -> None:
    prob = np.zeros(SHAPE, np.float32)
    cube(prob, (5, 5, 5), 3, 0.4)
    prob[6, 6, 6] = 0.7  # blob A: 27 voxels, peak 0.7, centroid (6, 6, 6)
    cube(prob, (20, 20, 20), 2, 0.95)  # blob B: 8 voxels, centroid (20.5, 20.5, 20.5)
    prob[35, 35, 35] = 0.99  # one voxel: under min_voxels
    cands, cmap = extract_candidates(prob)
    assert [c.score for c in cands] == [pytest.approx(0.95), pytest.approx(0.7)]
    assert [c.voxels for c in cands] == [8, 27]
    assert cands[0].centre == pytest.approx((20.5, 20.5, 20.5))
    assert cands[1].centre == pytest.approx((6.0, 6.0, 6.0))
    assert cmap.dtype == np.int32
    assert cmap[20, 20, 20] == cands[0].component == 1 and cmap[6, 6, 6] == cands[1].component == 2
    assert cmap[35, 35, 35] == 0
    top, top_map = extract_candidates(prob, max_candidates=1)
    assert [c.score for c in top] == [pytest.approx(0.95)] and top_map[6, 6, 6] == 0
    assert len(extract_candidates(prob, min_voxels=1)[0]) == 3


def test_corner_touching_voxels_are_one_component() -> None:
    prob = np.zeros(SHAPE, np.float32)
    prob[10, 10, 10] = prob[11, 11, 11] = 0.5  # 26- but not 6-connected
    cands, _ = extract_candidates(prob)
    assert len(cands) == 1 and cands[0].voxels == 2


def test_centre_within_radius_hits_without_overlap() -> None:
    prob, ref = volumes()
    cube(ref, (19, 19, 19), 3, 1)  # centroid (20, 20, 20)
    cube(prob, (22, 19, 19), 3, 0.6)  # adjacent, centroid (23, 20, 20): 3 mm away, no overlap
    cube(prob, (2, 2, 2), 2, 0.9)  # far away: a false positive
    e = evaluate_series(prob, ref, [NoduleRef(1, 8.0)])  # radius 4 mm
    assert e.nodules[0]["score"] == pytest.approx(0.6)
    assert e.nodules[0]["dice"] == 0.0  # detected, but not segmented on it
    assert e.false_positives == [pytest.approx(0.9)]
    # 3 voxels of 2 mm along i = 6 mm > 4 mm: now a miss and a second false positive
    e = evaluate_series(prob, ref, [NoduleRef(1, 8.0)], spacing=(2.0, 1.0, 1.0))
    assert e.nodules[0]["score"] is None
    assert sorted(e.false_positives) == [pytest.approx(0.6), pytest.approx(0.9)]


def test_two_candidates_on_one_nodule_are_no_false_positive() -> None:
    prob, ref = volumes()
    cube(ref, (10, 10, 10), 6, 1)
    cube(prob, (10, 10, 10), 2, 0.8)
    cube(prob, (14, 14, 14), 2, 0.3)  # a second, weaker hit on the same nodule
    e = evaluate_series(prob, ref, [NoduleRef(1, 6.0)])
    assert e.nodules[0]["score"] == pytest.approx(0.8)
    assert e.false_positives == []


def test_one_blob_over_the_lung_hits_one_nodule_not_all_of_them() -> None:
    """A map of 0.2 everywhere is one candidate overlapping every nodule: it scored each a hit at no
    false positive (CPM 1.0 at Dice 0, and the gate promoted it). By overlap a candidate is credited
    with the nodule nearest its centre only; the centre rule still credits any whose radius holds it."""
    prob, ref = volumes()
    cube(ref, (4, 4, 4), 3, 1)
    cube(ref, (24, 24, 24), 4, 2)
    prob[:] = 0.2
    e = evaluate_series(prob, ref, [NoduleRef(1, 3.0), NoduleRef(2, 4.0)])
    assert [n["score"] is not None for n in e.nodules] == [False, True]  # its centre, the volume's, is nearer nodule 2
    assert froc([e]).cpm == pytest.approx(0.5)
    # two candidates, each over its own nodule: both hit, as before
    prob[:] = 0.0
    cube(prob, (4, 4, 4), 3, 0.8)
    cube(prob, (24, 24, 24), 4, 0.7)
    e = evaluate_series(prob, ref, [NoduleRef(1, 3.0), NoduleRef(2, 4.0)])
    assert [n["score"] for n in e.nodules] == [pytest.approx(0.8), pytest.approx(0.7)]


# -- FROC --------------------------------------------------------------------------------------


def froc_set() -> list[SeriesEval]:
    """Four scans, four nodules (scores 0.9, 0.6, 0.4 and a miss), six false positives."""
    return [
        scan([nodule(0.9, "solid"), nodule(0.6, "ground-glass")], [0.8, 0.3], vendor="A"),
        scan([nodule(None, "ground-glass")], [0.7], vendor="B"),
        scan([nodule(0.4, "solid")], [0.95, 0.5, 0.2], vendor="A"),
        scan([], [], vendor="B"),
    ]


def test_froc_and_cpm_by_hand() -> None:
    f = froc(froc_set())
    # threshold: 0.95  0.9  0.8  0.7  0.6  0.5  0.4  0.3  0.2
    # sens:      0    .25  .25  .25  .5   .5   .75  .75  .75   (of 4 nodules)
    # FP/scan:   .25  .25  .5   .75  .75  1    1    1.25 1.5   (of 4 scans)
    assert f.sensitivity == pytest.approx([0, .25, .25, .25, .5, .5, .75, .75, .75])
    assert f.fps_per_scan == pytest.approx([.25, .25, .5, .75, .75, 1, 1, 1.25, 1.5])
    # best sensitivity with FP/scan <= rate: 1/8 → none → 0; 1/4, 1/2 → .25; 1 … 8 → .75
    assert f.at_rates == pytest.approx(dict(zip(FP_RATES, [0, .25, .25, .75, .75, .75, .75], strict=True)))
    assert f.cpm == pytest.approx(3.5 / 7)  # = 0.5
    assert (f.nodules, f.scans) == (4, 4)


def test_froc_subgroup_keeps_every_scans_false_positives() -> None:
    solid = froc(froc_set(), nodule_filter=lambda n: n["kind"] == "solid")
    # solid nodules 0.9, 0.4; FPs as before: at .25 FP/scan (t=.9) .5, at 1 FP/scan (t=.4) 1
    assert solid.at_rates == pytest.approx(dict(zip(FP_RATES, [0, .5, .5, 1, 1, 1, 1], strict=True)))
    assert solid.cpm == pytest.approx(5 / 7)
    glass = froc(froc_set(), nodule_filter=lambda n: n["kind"] == "ground-glass")
    # 0.6 is reached at .75 FP/scan; the other is missed: 0, 0, 0, .5, .5, .5, .5
    assert glass.cpm == pytest.approx(2 / 7)
    # vendor A alone: nodules .9, .6, .4 over 2 scans with FPs .95 .8 .5 .3 .2
    # t=.95 (0, .5) .9 (1/3, .5) .8 (1/3, 1) .6 (2/3, 1) .5 (2/3, 1.5) .4 (1, 1.5) .3 (1, 2) .2 (1, 2.5)
    vendor_a = froc([e for e in froc_set() if e.vendor == "A"])
    assert vendor_a.at_rates == pytest.approx(dict(zip(FP_RATES, [0, 0, 1 / 3, 2 / 3, 1, 1, 1], strict=True)))


def test_froc_without_nodules_is_nan() -> None:
    f = froc([scan([], [0.5])])
    assert math.isnan(f.cpm) and f.nodules == 0 and f.scans == 1
    assert froc([]).scans == 0 and math.isnan(froc([]).cpm)


# -- kappa -------------------------------------------------------------------------------------


def test_series_kappa_by_hand() -> None:
    # (ref, pred): TT ×3, TF ×1, FF ×2. p_o = 5/6; p_e = 4/6 * 3/6 + 2/6 * 3/6 = 1/2;
    # kappa = (5/6 - 1/2) / (1 - 1/2) = 2/3
    pairs = [(True, True)] * 3 + [(True, False)] + [(False, False)] * 2
    evals = [scan([], [], ref=r, pred=p) for r, p in pairs]
    assert series_kappa(evals) == pytest.approx(2 / 3)
    assert math.isnan(series_kappa([scan([], [], ref=True, pred=True)] * 3))


def test_series_kappa_interval_is_the_bootstrap_of_cohens_kappa() -> None:
    from sklearn.metrics import cohen_kappa_score

    # The philips cell of the demo: 19 series with a nodule, all found; 5 without, 2 with a false finding.
    pairs = [(True, True)] * 19 + [(False, True)] * 2 + [(False, False)] * 3
    evals = [scan([], [], ref=r, pred=p) for r, p in pairs]
    point = series_kappa(evals)
    low, high = series_kappa_interval(evals, resamples=400, seed=3)
    # The same resamples through scikit-learn, one by one.
    picks = np.random.default_rng(3).integers(0, len(pairs), size=(400, len(pairs)))
    slow = [cohen_kappa_score([pairs[i][0] for i in row], [pairs[i][1] for i in row]) for row in picks
            if len({pairs[i][0] for i in row} | {pairs[i][1] for i in row}) > 1]
    slow = [k for k in slow if np.isfinite(k)]
    assert (low, high) == pytest.approx(tuple(np.percentile(slow, [2.5, 97.5])))
    assert low < point < high and high - low > 0.4  # five series without a nodule decide it
    # Ten times the series in the same proportions: a narrower interval around the same kappa.
    low10, high10 = series_kappa_interval(evals * 10, resamples=400, seed=3)
    assert low10 < point < high10 and high10 - low10 < (high - low) / 2
    assert all(math.isnan(v) for v in series_kappa_interval([scan([], [], ref=True, pred=True)] * 5))
    assert all(math.isnan(v) for v in series_kappa_interval([]))


def test_size_kappa_by_hand() -> None:
    evals = [
        scan([nodule(0.9, diameter=12, predicted=11),  # (>=10, >=10)
              nodule(0.8, diameter=8, predicted=5),  # (6-10, <6)
              nodule(None, diameter=4)],  # (<6, absent)
             [0.9, 0.3], fp_diameters=[4.0, 7.0]),  # (absent, <6); 0.3 is under the threshold
        scan([nodule(0.7, diameter=7, predicted=7.5),  # (6-10, 6-10)
              nodule(0.4, diameter=11, predicted=12)], []),  # 0.4 < 0.5: (>=10, absent)
    ]
    # 6 pairs, agreeing 2: p_o = 2/6. Reference: >=10 2, 6-10 2, <6 1, absent 1;
    # predicted: >=10 1, 6-10 1, <6 2, absent 2. p_e = (2*1 + 2*1 + 1*2 + 1*2) / 36 = 8/36
    # kappa = (12/36 - 8/36) / (28/36) = 4/28 = 1/7
    assert size_kappa(evals) == pytest.approx(1 / 7)


# -- summaries and tables ----------------------------------------------------------------------


def test_summarise_keys_are_mlflow_names_and_values_agree() -> None:
    evals = froc_set()
    evals[1].vendor = "GE Medical Systems"
    s = summarise(evals)
    valid = re.compile(r"^[A-Za-z0-9_\-. /]+$")
    assert all(valid.match(k) for k in s), [k for k in s if not valid.match(k)]
    assert all(isinstance(v, float) for v in s.values())
    assert s["cpm"] == pytest.approx(0.5)
    assert s["sens_at_0.125"] == 0 and s["sens_at_1"] == pytest.approx(0.75)
    assert s["cpm_kind_solid"] == pytest.approx(5 / 7) and s["cpm_kind_ground_glass"] == pytest.approx(2 / 7)
    assert {"cpm_size_lt6", "cpm_size_6to10", "cpm_size_ge10", "cpm_a", "cpm_ge_medical_systems",
            "dice_ge6_a", "kappa_series_a", "dice_mean", "dice_ge6_mean", "series_dice_mean",
            "kappa_series", "kappa_size"} <= set(s)
    assert math.isnan(s["cpm_size_lt6"])  # every nodule here is 8 mm: NaN, kept
    assert s["dice_mean"] == pytest.approx(0.5)


def test_nodule_table_has_one_row_per_nodule() -> None:
    table = nodule_table(froc_set())
    assert len(table) == 4
    assert list(table.columns[:3]) == ["series", "vendor", "label"]
    assert table.vendor.tolist() == ["A", "A", "B", "A"]
    assert nodule_table([]).empty


# -- pictures ----------------------------------------------------------------------------------


def test_froc_figure_writes_png(tmp_path: Path) -> None:
    evals = froc_set()
    out = plots.froc_figure({"all": froc(evals), "vendor B": froc([e for e in evals if e.vendor == "B"]),
                             "none": froc([scan([], [0.2])])}, "FROC", tmp_path / "froc.png")
    pixels = matplotlib.image.imread(out)
    w, h = plots.FROC_SIZE
    assert pixels.shape[:2] == (int(h * plots.DPI), int(w * plots.DPI))
    assert pixels[..., :3].std() > 0.05


def test_contour_grid_writes_png(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    image = rng.random((80, 70, 20)).astype(np.float32)
    ref = np.zeros(image.shape, np.int16)
    pred = np.zeros(image.shape, bool)
    cube(ref, (30, 30, 8), 6, 2)
    cube(pred, (32, 31, 8), 6, True)
    case = {"image": image, "reference": ref, "prediction": pred, "centre": (33, 33, 10), "caption": "A · 8 mm"}
    edge = {**case, "centre": (2, 68, 10), "caption": "at the edge"}
    out = plots.contour_grid([case, case, edge, case, case], tmp_path / "grid.png", "Contours")
    pixels = matplotlib.image.imread(out)
    # 5 panels: 4 columns, 2 rows of 3 × 3.5 in, plus 1 in of margin
    assert pixels.shape[:2] == ((2 * 3.5 + 1) * plots.DPI, 4 * 3 * plots.DPI)
    # both outline colours are drawn
    for colour in (plots.REFERENCE_COLOUR, plots.PREDICTION_COLOUR):
        rgb = np.array(matplotlib.colors.to_rgb(colour))
        assert (np.abs(pixels[..., :3] - rgb).max(axis=-1) < 0.08).sum() > 50
    with pytest.raises(ValueError, match="caption"):
        plots.contour_grid([{k: v for k, v in case.items() if k != "caption"}], tmp_path / "x.png", "x")


def test_a_speck_is_a_froc_candidate_but_not_a_finding() -> None:
    prob, ref = volumes()
    cube(prob, (2, 2, 2), 2, 0.9)  # 8 voxels: a 2.5 mm sphere's volume, under the 3 mm of a finding
    speck = evaluate_series(prob, ref, [])
    assert speck.false_positives == [pytest.approx(0.9)] and not speck.present_pred
    cube(prob, (10, 10, 10), 3, 0.9)  # 27 voxels: 3.7 mm
    blob = evaluate_series(prob, ref, [])
    assert len(blob.false_positives) == 2 and blob.present_pred
    # In the size agreement the speck is left out, the blob is an 'absent' reference called '<6 mm'.
    assert size_pairs([blob]) == [("absent", "<6 mm")]


def test_a_finding_needs_the_finding_threshold_while_its_voxels_need_the_segmentation_threshold() -> None:
    prob, ref = volumes()
    cube(prob, (10, 10, 10), 4, 0.6)  # 64 voxels at 0.6: segmented at 0.5, a 5 mm candidate
    assert evaluate_series(prob, ref, []).present_pred  # the finding threshold defaults to the voxels'
    doubtful = evaluate_series(prob, ref, [], finding_threshold=0.75)
    assert not doubtful.present_pred and doubtful.false_positives == [pytest.approx(0.6)]
    assert doubtful.false_positive_diameters_mm == [pytest.approx(equivalent_diameter_mm(64))]
    assert size_pairs([doubtful], 0.75) == [] and size_pairs([doubtful], 0.5) == [("absent", "<6 mm")]
    prob[11, 11, 11] = 0.8  # the same candidate, now scoring 0.8
    assert evaluate_series(prob, ref, [], finding_threshold=0.75).present_pred
    with pytest.raises(ValueError, match="finding_threshold"):
        evaluate_series(prob, ref, [], candidate_threshold=0.3, finding_threshold=0.2)


def sphere(centre: tuple[float, float, float], radius: float) -> np.ndarray:
    grid = np.indices(SHAPE, dtype=float)
    return sum((g - c) ** 2 for g, c in zip(grid, centre, strict=True)) <= radius**2  # type: ignore[no-any-return]


def test_elongation_is_one_for_round_shapes_and_grows_with_a_tube_s_length() -> None:
    assert elongation(np.argwhere(sphere((20, 20, 20), 5))) == pytest.approx(1.0, abs=0.01)
    assert elongation(np.array([[3, 4, 5]])) == pytest.approx(1.0)  # one voxel is a cube
    # A cylinder 12 mm long and 4 mm wide: 1.15 x 12 / 4 = 3.46 if continuous; this one's 13-voxel
    # disc has an in-plane variance of 14/13 + 1/12 mm² instead of 1 + 0: sqrt(12 / 1.16) = 3.22.
    tube = np.zeros(SHAPE, bool)
    tube[10:22] = sphere((0, 20, 20), 2)[0]
    assert elongation(np.argwhere(tube)) == pytest.approx(math.sqrt(12 / (14 / 13 + 1 / 12)), rel=1e-6)
    # The same voxels with 1/3 mm slices along the tube: 4 mm long and 4 mm wide, about round.
    assert elongation(np.argwhere(tube), (1 / 3, 1.0, 1.0)) == pytest.approx(
        math.sqrt((12 / 9) / (14 / 13 + 1 / 12)), rel=1e-6)
    # A single flat slice still has a thickness, so its elongation is finite.
    flat = np.zeros(SHAPE, bool)
    flat[5:9, 5:9, 5] = True
    assert elongation(np.argwhere(flat)) == pytest.approx(math.sqrt((16 / 12) / (1 / 12)))  # 4 mm across, 1 thick


def test_a_vessel_s_piece_is_a_candidate_but_not_a_finding() -> None:
    prob, ref = volumes()
    tube = np.zeros(SHAPE, bool)
    tube[5:15] = sphere((0, 10, 10), 1.6)[0]  # 10 mm of a 3.2 mm vessel: elongation 3.6, 6.1 mm equivalent
    prob[tube] = 0.95
    piece = evaluate_series(prob, ref, [], finding_threshold=0.75)
    assert piece.false_positives == [pytest.approx(0.95)] and not piece.present_pred
    assert piece.false_positive_elongations[0] > MAX_ELONGATION
    assert size_pairs([piece], 0.75) == []
    assert findings(prob, finding_threshold=0.75)[0] == []
    # The rule is the shape alone: without it the same piece is a finding, and so is a ball of its volume.
    assert evaluate_series(prob, ref, [], finding_threshold=0.75, max_elongation=math.inf).present_pred
    (f,), _ = findings(prob, finding_threshold=0.75, max_elongation=math.inf)
    assert f.elongation == pytest.approx(piece.false_positive_elongations[0])
    ball = sphere((25, 25, 25), equivalent_diameter_mm(int(tube.sum())) / 2)
    prob[:] = 0
    prob[ball] = 0.95
    round_one = evaluate_series(prob, ref, [], finding_threshold=0.75)
    assert round_one.present_pred and round_one.false_positive_elongations[0] < 1.1
    assert size_pairs([round_one], 0.75) == [("absent", size_bin(round_one.false_positive_diameters_mm[0]))]


def test_a_nodule_hit_only_by_a_tube_is_absent_in_the_size_categories() -> None:
    prob, ref = volumes()
    ref[sphere((20, 20, 20), 3)] = 1
    tube = np.zeros(SHAPE, bool)
    tube[12:28] = sphere((0, 20, 20), 1.6)[0]  # a vessel through the nodule's place, segmented instead
    prob[tube] = 0.9
    e = evaluate_series(prob, ref, [NoduleRef(1, 6.0)], finding_threshold=0.75)
    assert e.nodules[0]["score"] == pytest.approx(0.9) and e.nodules[0]["elongation"] > MAX_ELONGATION
    assert not e.present_pred
    assert size_pairs([e], 0.75) == [("6-10 mm", "absent")]
    prob[:] = 0
    prob[ref > 0] = 0.9
    e = evaluate_series(prob, ref, [NoduleRef(1, 6.0)], finding_threshold=0.75)
    assert e.present_pred and size_pairs([e], 0.75) == [("6-10 mm", size_bin(e.nodules[0]["predicted_diameter_mm"]))]


def test_findings_report_what_the_series_call_counts_and_only_their_voxels() -> None:
    prob, ref = volumes()
    cube(prob, (4, 4, 4), (4, 4, 2), 0.9)  # a finding: 32 voxels of 2 mm³, a 4 mm cube, 4.96 mm
    cube(prob, (4, 4, 4), 1, 0.95)  # ... scoring 0.95
    cube(prob, (20, 20, 20), (2, 2, 1), 0.9)  # a speck: 4 voxels of 2 mm³, 2.5 mm, under the 3 mm
    cube(prob, (30, 4, 4), 4, 0.6)  # doubtful: segmented, but scoring under the finding threshold
    cube(prob, (4, 30, 30), (3, 3, 1), 0.3)  # a candidate with no voxel at the segmentation threshold
    found, mask = findings(prob, threshold=0.5, candidate_threshold=0.1, finding_threshold=0.75,
                           spacing=(1.0, 1.0, 2.0))
    (only,) = found
    assert only.score == pytest.approx(0.95) and only.voxels == 32
    assert only.centre == pytest.approx((5.5, 5.5, 4.5))
    assert only.diameter_mm == pytest.approx(equivalent_diameter_mm(32, (1.0, 1.0, 2.0)))
    assert only.elongation == pytest.approx(1.0)  # a cube in mm
    assert only.slices == (4, 6)  # in the volume, not in the box the judgement reads
    expected = np.zeros(SHAPE, bool)
    cube(expected, (4, 4, 4), (4, 4, 2), True)
    assert np.array_equal(mask, expected)
    # One rule: the series call of evaluate_series is made by exactly these findings.
    call = evaluate_series(prob, ref, [], threshold=0.5, finding_threshold=0.75, spacing=(1.0, 1.0, 2.0))
    assert call.present_pred and len(call.false_positives) == 4
    cube(prob, (4, 4, 4), 4, 0.0)
    assert findings(prob, finding_threshold=0.75) == ([], pytest.approx(np.zeros(SHAPE, bool)))
    assert not evaluate_series(prob, ref, [], finding_threshold=0.75).present_pred
    with pytest.raises(ValueError, match="candidate_threshold"):
        findings(prob, candidate_threshold=0.8, finding_threshold=0.75)
