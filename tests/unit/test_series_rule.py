"""The series score (`training.scoring.SeriesRule`): both rules against hand-computed values, what the
contrast ranks differently, saturated probabilities, and which rule a version's logged config gets."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dicomops.config import PreprocessConfig, TrainConfig
from dicomops.export.contract import InputContract
from dicomops.training.scoring import SeriesRule, series_score


def test_the_top_k_mean_is_the_mean_of_the_k_highest_probabilities() -> None:
    assert series_score(np.array([0.1, 0.9, 0.3, 0.7, 0.2]), SeriesRule(3)) == pytest.approx((0.9 + 0.7 + 0.3) / 3)


def test_the_contrast_is_tanh_of_half_the_top_logits_above_the_series_mean_logit() -> None:
    probs = np.array([0.5, 0.5, 0.5, 0.9])  # logits 0, 0, 0, ln 9
    top, mean = math.log(9), math.log(9) / 4
    assert series_score(probs, SeriesRule(1, "top_k_contrast")) == pytest.approx(math.tanh((top - mean) / 2))
    top2 = (math.log(9) + 0.0) / 2
    assert series_score(probs, SeriesRule(2, "top_k_contrast")) == pytest.approx(math.tanh((top2 - mean) / 2))
    # A series whose slices are all alike has no contrast, however high they score.
    assert series_score(np.full(10, 0.97), SeriesRule(3, "top_k_contrast")) == pytest.approx(0.0, abs=1e-12)


def test_the_contrast_ranks_a_local_peak_above_a_series_that_is_high_everywhere() -> None:
    everywhere = np.full(40, 0.95)
    everywhere[:3] = 0.99
    peak = np.full(40, 0.02)
    peak[20:23] = 0.9
    mean, contrast = SeriesRule(3), SeriesRule(3, "top_k_contrast")
    assert series_score(everywhere, mean) > series_score(peak, mean)
    assert series_score(peak, contrast) > series_score(everywhere, contrast)


def test_saturated_probabilities_give_a_finite_score_below_one() -> None:
    probs = np.zeros(50, dtype=np.float32)
    probs[:3] = 1.0  # float32's softmax rounds logits beyond about 17 to exactly 1 and 0
    score = series_score(probs, SeriesRule(3, "top_k_contrast"))
    assert math.isfinite(score) and 0.99 < score < 1.0


def test_bad_rules_say_what_is_wrong() -> None:
    with pytest.raises(ValueError, match="top_k must be at least 1"):
        SeriesRule(0)
    with pytest.raises(ValueError, match="not one of top_k_mean, top_k_contrast"):
        SeriesRule(3, "median")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="without slices"):
        series_score(np.zeros(0), SeriesRule(3, "top_k_contrast"))


def test_a_new_training_uses_the_contrast_and_a_version_logged_before_it_the_mean() -> None:
    assert SeriesRule.of(TrainConfig()) == SeriesRule(3, "top_k_contrast")
    logged = TrainConfig().model_dump(mode="json")
    del logged["series_rule"]
    assert SeriesRule.of(TrainConfig.from_logged(logged)) == SeriesRule(3, "top_k_mean")
    assert SeriesRule.of(TrainConfig.from_logged(TrainConfig().model_dump(mode="json"))).kind == "top_k_contrast"


def test_the_input_contract_says_which_rule_scores_the_series() -> None:
    pre = PreprocessConfig()
    contrast = InputContract.from_configs(pre, TrainConfig(), 0.7)
    mean = InputContract.from_configs(pre, TrainConfig(series_rule="top_k_mean"), 0.7)
    assert contrast.series_score.startswith("tanh of half the mean logit of the 3 highest slabs")
    assert mean.series_score == "mean of the 3 highest slab probabilities"
