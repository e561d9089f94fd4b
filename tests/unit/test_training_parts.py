"""Cross-validation splits, metrics against hand-computed values, and the promotion gate."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from dicomops.layout import WorkLayout
from dicomops.tracking.promotion import ModelScore, decide_promotion
from dicomops.training.metrics import (
    binary_metrics,
    per_vendor_metrics,
    summarise_folds,
    youden_threshold,
)
from dicomops.training.splits import (
    LeakageError,
    check_no_leakage,
    fold_counts,
    load_or_create_folds,
    make_folds,
)


def _series(n_patients: int = 80, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rates = {"siemens": 0.25, "ge": 0.4, "philips": 0.5, "canon": 0.6}
    rows = []
    for p in range(n_patients):
        vendor = list(rates)[p % 4]
        for s in range(1 + (p % 3 == 0)):  # some patients have two series
            rows.append({"SeriesInstanceUID": f"S{p}.{s}", "PatientID": f"P{p}", "vendor": vendor,
                         "label": int(rng.random() < rates[vendor])})
    return pd.DataFrame(rows)


def test_folds_group_patients_and_keep_vendor_proportions() -> None:
    series = _series()
    folds = make_folds(series, 4, seed=3)
    assert sorted(s for f in folds for s in f["val"]) == sorted(series.SeriesInstanceUID)
    check_no_leakage(folds, series)
    counts = fold_counts(folds, series).groupby(["fold", "vendor"]).series.sum().unstack()
    expected = series.vendor.value_counts() / 4
    for vendor in expected.index:
        # grouped splitting keeps each fold within a couple of series of proportional
        assert (abs(counts[vendor] - expected[vendor]) <= 2).all(), counts[vendor].tolist()
    assert make_folds(series, 4, seed=3) == folds


def test_leakage_raises() -> None:
    series = _series(40)
    folds = make_folds(series, 4)
    moved = [dict(f) for f in folds]
    patient_series = series[series.PatientID == series.PatientID.iloc[0]].SeriesInstanceUID.tolist()
    moved[0] = {"train": moved[0]["train"] + patient_series, "val": moved[0]["val"] + patient_series}
    with pytest.raises(LeakageError, match="fold 0"):
        check_no_leakage(moved, series)


def test_too_little_data_says_what_to_change() -> None:
    with pytest.raises(ValueError, match="lower n_splits or add data"):
        make_folds(_series(8), 4)


def test_split_file_is_made_once_and_reused(tmp_path: Path) -> None:
    series = _series(40)
    layout = WorkLayout(tmp_path)
    first = load_or_create_folds(layout, series, 4, seed=1)
    again = load_or_create_folds(layout, series, 4, seed=1)
    assert again == first and len(first.sha256) == 64
    assert first.folds == make_folds(series, 4, seed=1) and (first.n_splits, first.seed) == (4, 1)
    with pytest.raises(ValueError, match="made for other series"):
        load_or_create_folds(layout, series.iloc[:-1], 4, seed=1)


def test_a_changed_fold_count_or_seed_against_the_split_file_names_the_fix(tmp_path: Path) -> None:
    series = _series(40)
    layout = WorkLayout(tmp_path)
    load_or_create_folds(layout, series, 4, seed=1)
    with pytest.raises(ValueError, match=r"4-fold split made with seed 1.*n_splits=5.*set train.n_splits=4"):
        load_or_create_folds(layout, series, 5, seed=1)
    with pytest.raises(ValueError, match=r"seed=7.*train.seed=1.*or delete .*folds.json"):
        load_or_create_folds(layout, series, 4, seed=7)
    assert layout.read_folds().n_splits == 4  # the file was left as it was


def test_binary_metrics_against_hand_computed_values() -> None:
    y = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    score = np.array([0.1, 0.4, 0.35, 0.8, 0.7, 0.9, 0.2, 0.6])
    m = binary_metrics(y, score, threshold=0.5)
    # predictions at 0.5: [0,0,0,1,1,1,0,1] -> TP 3, FN 1, TN 3, FP 1
    assert m["sensitivity"] == 0.75 and m["specificity"] == 0.75 and m["f1"] == 0.75
    assert m["kappa"] == pytest.approx(0.5)  # observed 0.75, chance 0.5
    # AUC: of the 16 positive-negative pairs, 11 rank the positive higher (3 + 4 + 1 + 3)
    assert m["auc"] == pytest.approx(11 / 16)
    assert math.isnan(binary_metrics(np.zeros(4), np.arange(4), 0.5)["auc"])
    # J = TPR - FPR at each score: 0.25, 0, 0.25, 0.5 (at 0.6), 0.25, 0, 0.25, 0 from the top down
    assert youden_threshold(y, score) == 0.6


def test_youden_threshold_maximises_sensitivity_plus_specificity() -> None:
    # Ten negatives, four positives: three positives just above six negatives, one far above all.
    negatives = [0.02, 0.05, 0.10, 0.15, 0.20, 0.25, 0.40, 0.50, 0.60, 0.65]
    positives = [0.30, 0.32, 0.35, 0.95]
    y = np.array([0] * len(negatives) + [1] * len(positives))
    score = np.array(negatives + positives)
    # At 0.30: TPR 1, FPR 4/10, J 0.6, the one maximum. A naive choice scores lower: 0.5 gives J -0.05,
    # the median (0.31) 0.35, the neighbouring scores 0.25 and 0.32 give 0.5 and 0.35, and the
    # accuracy-maximising 0.95 (11 of 14 right, against 10 at 0.30) gives 0.25.
    assert youden_threshold(y, score) == 0.30
    m = binary_metrics(y, score, youden_threshold(y, score))
    assert (m["sensitivity"], m["specificity"]) == (1.0, 0.6)
    assert youden_threshold(y[::-1], score[::-1]) == 0.30  # the order of the rows does not matter


@pytest.mark.parametrize("score", [[0.9, 0.8, 0.2, 0.1], [0.5, 0.5, 0.5, 0.5], [-0.2, -0.2, -0.7, -0.9]])
def test_a_model_no_threshold_helps_gets_a_finite_threshold_that_calls_nothing_positive(score: list[float]) -> None:
    """Every negative at or above every positive: scikit-learn's best point is +inf, which an SR's
    numeric item and a JSON answer cannot carry; the threshold is just above the highest score."""
    y, s = np.array([0, 0, 1, 1]), np.array(score)
    threshold = youden_threshold(y, s)
    assert np.isfinite(threshold) and threshold > s.max() and threshold == np.nextafter(s.max(), np.inf)
    m = binary_metrics(y, s, threshold)
    assert (m["sensitivity"], m["specificity"]) == (0.0, 1.0)  # what +inf called: nothing positive


def test_per_vendor_and_fold_summary() -> None:
    frame = pd.DataFrame({"vendor": ["a", "a", "b", "b"], "label": [0, 1, 0, 1], "score": [0.2, 0.8, 0.6, 0.4]})
    table = per_vendor_metrics(frame, 0.5).set_index("vendor")
    assert table.loc["a", "auc"] == 1.0 and table.loc["b", "auc"] == 0.0 and table.loc["all", "auc"] == 0.75
    per_fold = pd.DataFrame({"vendor": ["a", "a"], "auc": [0.8, 0.9], "sensitivity": [1, 1],
                             "specificity": [0.5, 0.7], "f1": [0.6, 0.8], "kappa": [0.2, 0.4]})
    summary = summarise_folds(per_fold).set_index("vendor")
    assert summary.loc["a", "auc_mean"] == pytest.approx(0.85)
    assert summary.loc["a", "auc_std"] == pytest.approx(np.std([0.8, 0.9], ddof=1))


def test_promotion_gate_decisions() -> None:
    champion = ModelScore(0.95, {"ge": 0.96, "siemens": 0.94})
    better = ModelScore(0.97, {"ge": 0.97, "siemens": 0.95})
    assert decide_promotion(better, champion).promote
    small_gain = ModelScore(0.952, {"ge": 0.96, "siemens": 0.94})
    assert not decide_promotion(small_gain, champion, margin=0.005).promote
    vendor_drop = ModelScore(0.97, {"ge": 0.99, "siemens": 0.90})
    decision = decide_promotion(vendor_drop, champion, vendor_tolerance=0.02)
    assert not decision.promote
    # the gain itself is fine; siemens (0.94 -> 0.90) is the one vendor blamed, ge (0.96 -> 0.99) is not
    assert [r.split(":")[0] for r in decision.reasons if r.startswith(("ge", "siemens"))] == ["siemens"]
    assert decision.tags()["promotion.decision"] == "awaiting-review"
    missing = ModelScore(0.99, {"ge": 0.99})
    assert not decide_promotion(missing, champion).promote
    assert decide_promotion(ModelScore(0.9), None, min_auc=0.8).promote
    assert not decide_promotion(ModelScore(0.7), None, min_auc=0.8).promote
    assert decide_promotion(better, champion).tags()["promotion.decision"] == "auto-promoted"
    with pytest.raises(ValueError, match="non-negative"):
        decide_promotion(better, champion, margin=-1)


def test_a_figure_below_its_floor_is_never_promoted_and_a_vendor_neither_model_scored_blocks_nothing() -> None:
    """The segmenter's gate: a blob over the lung had CPM 1.0 at Dice 0.001 and was auto-promoted;
    with floors for the Dice and the series kappa it waits for a reviewer, first model or not. A
    vendor whose AUC neither model has (no positives there) blocked every later promotion."""
    blob = ModelScore(1.0, {"ge": 1.0})
    floors = {"Dice (nodules >= 6 mm)": (0.001, 0.5), "series kappa": (float("nan"), 0.4)}
    first = decide_promotion(blob, None, min_auc=0.8, metric="CPM", floors=floors)
    assert not first.promote
    assert first.reasons[1:] == ("Dice (nodules >= 6 mm) 0.0010 is below its floor 0.5000",
                                 "series kappa is undefined (its floor is 0.4000)")
    later = decide_promotion(blob, ModelScore(0.9, {"ge": 0.9}), metric="CPM", floors=floors)
    assert not later.promote and "Dice (nodules >= 6 mm) 0.0010 is below its floor 0.5000" in later.reasons
    off = {"Dice (nodules >= 6 mm)": (float("nan"), 0.0), "series kappa": (float("nan"), -1.0)}
    assert decide_promotion(blob, None, min_auc=0.8, metric="CPM", floors=off).promote  # floors off: nothing judged
    fine = {"Dice (nodules >= 6 mm)": (0.82, 0.5), "series kappa": (0.94, 0.4)}
    assert decide_promotion(blob, None, min_auc=0.8, metric="CPM", floors=fine).promote
    assert decide_promotion(blob, ModelScore(0.9, {"ge": 0.9}), metric="CPM", floors=fine).promote
    nan = float("nan")
    neither = decide_promotion(ModelScore(0.95, {"ge": 0.95, "philips": nan}), ModelScore(0.90, {"ge": 0.90, "philips": nan}))
    assert neither.promote and any(r.startswith("philips: AUC undefined for both") for r in neither.reasons)
    assert not decide_promotion(ModelScore(0.95, {"ge": 0.95, "philips": nan}), ModelScore(0.90, {"ge": 0.90, "philips": 0.8})).promote
    # beating a poor champion is not enough: the floor holds for every promotion, not the first only
    poor = decide_promotion(ModelScore(0.60, {"ge": 0.60}), ModelScore(0.55, {"ge": 0.55}), min_auc=0.8)
    assert not poor.promote and "mean AUC 0.6000 is below the floor 0.8000" in poor.reasons


@pytest.mark.parametrize(("k", "depth"), [(1, 4), (3, 1), (3, 7), (5, 9)])
def test_all_slabs_and_sampled_slabs_are_every_slab_resized_bit_for_bit(k: int, depth: int) -> None:
    import torch.nn.functional as F

    from dicomops.preprocessing.slabs import slab
    from dicomops.training.data import all_slabs, slabs_at

    volume = np.random.default_rng(k * depth).random((40, 40, depth)).astype(np.float16)

    def resized(zs: list[int], size: int = 16) -> torch.Tensor:  # the definition: each slab cut, then resized
        stack = torch.from_numpy(np.stack([slab(volume, z, k) for z in zs]).astype(np.float32))
        return F.interpolate(stack, size=(size, size), mode="area")

    fast = all_slabs(volume, k, 16)
    assert fast.shape == (depth, k, 16, 16) and torch.equal(fast, resized(list(range(depth))))
    sampled = [depth - 1, 0, depth // 2, depth // 2]  # out of order, repeated, at both edges
    assert torch.equal(slabs_at(volume, np.array(sampled), k, 16), resized(sampled))
    assert torch.equal(slabs_at(volume, np.array(sampled), k, 40), resized(sampled, 40))  # the cache's own size


def test_stem_stride_halves_the_first_feature_map_and_old_versions_rebuild_with_stride_1() -> None:
    from dicomops.config import TrainConfig
    from dicomops.training.model import build_model, model_from_config

    def stem_shape(cfg: TrainConfig) -> tuple[int, ...]:
        model = build_model(cfg, 3).eval()
        with torch.no_grad():
            return tuple(model.conv1(torch.zeros(1, 3, cfg.input_size, cfg.input_size)).shape)

    narrow = TrainConfig(input_size=64, stem_stride=1)
    wide = TrainConfig(input_size=128, stem_stride=2)
    assert stem_shape(narrow) == stem_shape(wide) == (1, 16, 64, 64)
    # A version registered before the option existed has no stem_stride in its train_config.json.
    raw = narrow.model_dump(mode="json") | {"in_channels": 3}
    del raw["stem_stride"]
    assert model_from_config(raw).conv1.stride == (1, 1)
    assert model_from_config(wide.model_dump(mode="json") | {"in_channels": 3}).conv1.stride == (2, 2)


def test_a_diverging_training_stops_with_what_to_change(tmp_path: Path) -> None:
    # A learning rate far too large sends the weights to infinity within an epoch: the loop stops with
    # an error naming the epoch, the precision and the settings to change, instead of registering a
    # model whose scores are NaN (or failing inside scikit-learn's AUC).
    from dicomops.config import TrainConfig
    from dicomops.training.data import SlabSet
    from dicomops.training.loop import fit

    g = torch.Generator().manual_seed(0)
    y = torch.tensor([0, 1] * 16)
    x = (torch.rand(32, 3, 32, 32, generator=g) + y[:, None, None, None]).half()
    slabs = SlabSet(x, y, [f"s{i}" for i in range(32)], np.zeros(32, dtype=int))
    sane = TrainConfig(epochs=1, input_size=32, batch_size=8, num_workers=0, precision="fp32")
    assert math.isfinite(fit(slabs, slabs, sane, tmp_path / "a.pt", seed=0).best_auc)
    wild = sane.model_copy(update={"learning_rate": 1e30})
    with pytest.raises(FloatingPointError, match=r"diverged at epoch 1 \(cpu-fp32\).*train.learning_rate"):
        fit(slabs, slabs, wild, tmp_path / "b.pt", seed=0)


def test_auto_precision_keeps_the_3d_teacher_in_float32_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    # bfloat16 autocast of the 3-D teacher gave NaN on a CPU with AVX-512 BF16: `auto` trains it
    # in float32 there; 2-D networks follow choose_precision; `bf16` still forces. The CPU is
    # made to report bf16 units, so the check means the same on a CPU without them.
    from dicomops.config import TrainConfig
    from dicomops.training.loop import choose_precision, train_precision

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    assert choose_precision("auto").autocast_dtype == torch.bfloat16
    assert train_precision(TrainConfig()).autocast_dtype == torch.bfloat16
    assert train_precision(TrainConfig(architecture="resnet3d-slim")).autocast_dtype is None
    assert train_precision(TrainConfig(architecture="resnet3d-slim", precision="bf16")).autocast_dtype == torch.bfloat16
    assert train_precision(TrainConfig()) == choose_precision("auto")


def test_channels_last_changes_the_layout_of_2d_and_3d_networks_and_no_output() -> None:
    from dicomops.config import TrainConfig
    from dicomops.training.model import build_model, channels_last

    torch.manual_seed(0)
    flat = build_model(TrainConfig(architecture="resnet-slim", input_size=32), 3).eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        before = flat(x)
        nhwc = channels_last(flat, "resnet-slim")
        assert nhwc is flat
        conv = next(m for m in nhwc.modules() if isinstance(m, torch.nn.Conv2d))
        assert conv.weight.is_contiguous(memory_format=torch.channels_last) and not conv.weight.is_contiguous()
        assert torch.allclose(nhwc(x), before, atol=1e-5)
    volume = build_model(TrainConfig(architecture="resnet3d-slim", input_size=32), 3).eval()
    with torch.no_grad():
        before = volume(x)
        ndhwc = channels_last(volume, "resnet3d-slim")
        assert ndhwc is volume
        conv3 = next(m for m in ndhwc.modules() if isinstance(m, torch.nn.Conv3d) and m.in_channels > 1)
        assert conv3.weight.is_contiguous(memory_format=torch.channels_last_3d) and not conv3.weight.is_contiguous()
        assert torch.allclose(ndhwc(x), before, atol=1e-5)


def test_loader_workers_none_on_the_cpu_some_on_cuda_unless_set() -> None:
    from dicomops.config import TrainConfig
    from dicomops.training.loop import Precision, loader_workers

    cpu, cuda = Precision(torch.device("cpu"), torch.bfloat16), Precision(torch.device("cuda"), torch.float16)
    assert loader_workers(TrainConfig(), cpu) == 0
    assert 1 <= loader_workers(TrainConfig(), cuda) <= 4
    assert loader_workers(TrainConfig(num_workers=2), cpu) == 2 and loader_workers(TrainConfig(num_workers=0), cuda) == 0


def test_a_folds_metrics_carry_the_threshold_they_were_read_at() -> None:
    """A fold's run showed sensitivity and specificity at the fold's own Youden point, which it never
    logged, beside a card that reads them at the pooled point: they disagreed with no way to tell."""
    from dicomops.training.scoring import fold_metrics

    preds = pd.DataFrame({"vendor": ["ge"] * 6, "label": [0, 0, 0, 1, 1, 1],
                          "score": [0.1, 0.2, 0.6, 0.5, 0.7, 0.9]})
    _, flat = fold_metrics(preds)
    assert flat["threshold"] == pytest.approx(0.5)
    assert flat["sensitivity.ge"] == 1.0 and flat["specificity.ge"] == pytest.approx(2 / 3)
