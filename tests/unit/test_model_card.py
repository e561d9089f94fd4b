"""The version page as a model card: the interval on each AUC, the per-vendor evidence, sections that
stages rewrite without losing each other's, and one meaning per alias through gate, promotion and
rejection."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from scipy.stats import bootstrap
from sklearn.metrics import roc_auc_score

from dicomops.feedback import privacy
from dicomops.tracking import model_card, registry
from dicomops.training.metrics import auc_confidence_interval
from dicomops.training.scoring import vendor_evidence

NAME = "card-test-model"


def _stratified_scipy(y: np.ndarray, s: np.ndarray, seed: int) -> tuple[float, float]:
    """The same interval computed the slow way: scipy's bootstrap on each class, AUC by sklearn."""
    pos, neg = s[y == 1], s[y == 0]
    res = bootstrap((pos, neg), lambda p, n: roc_auc_score(np.r_[np.ones(len(p)), np.zeros(len(n))], np.r_[p, n]),
                    paired=False, vectorized=False, n_resamples=1000, method="percentile", random_state=seed)
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def test_the_auc_interval_agrees_with_scipy_and_narrows_with_more_series() -> None:
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 300)
    s = y * 0.9 + rng.normal(size=300)
    low, high = auc_confidence_interval(y, s)
    ref_low, ref_high = _stratified_scipy(y, s, seed=1)
    assert low < roc_auc_score(y, s) < high
    assert abs(low - ref_low) < 0.02 and abs(high - ref_high) < 0.02
    small_low, small_high = auc_confidence_interval(y[:30], s[:30])
    assert small_high - small_low > 1.5 * (high - low)
    assert auc_confidence_interval(np.array([0, 1, 0, 1]), np.array([0.1, 0.9, 0.2, 0.8])) == (1.0, 1.0)
    assert all(np.isnan(auc_confidence_interval(np.ones(5), np.arange(5.0))))
    with pytest.raises(ValueError, match="level"):
        auc_confidence_interval(y, s, level=95)


def _preds() -> pd.DataFrame:
    # ge: 2 positives (scores 0.9, 0.4), 2 negatives (0.6, 0.1); siemens: all right.
    return pd.DataFrame({"vendor": ["ge"] * 4 + ["siemens"] * 4, "label": [1, 1, 0, 0] * 2,
                         "score": [0.9, 0.4, 0.6, 0.1, 0.8, 0.7, 0.2, 0.3]})


def test_vendor_evidence_counts_outcomes_at_the_threshold() -> None:
    by_vendor = pd.DataFrame({"vendor": ["all", "ge", "siemens"], "auc_mean": [0.9, 0.75, 1.0],
                              "auc_std": [0.1, 0.2, 0.0]})
    table = vendor_evidence(_preds(), 0.5, by_vendor).set_index("vendor")
    ge = table.loc["ge"]
    assert (ge.n, ge.positives, ge.tp, ge.fp, ge.fn, ge.tn) == (4, 2, 1, 1, 1, 1)
    assert ge.sensitivity == 0.5 and ge.specificity == 0.5 and ge.auc_pooled == 0.75 and ge.auc_fold_mean == 0.75
    assert table.loc["all"].n == 8 and table.loc["siemens"].auc_pooled == 1.0
    # two positives and two negatives: no interval (its resamples barely differ; siemens' was
    # "1.000 (1.000-1.000)"); with five of each, one around the pooled AUC
    assert np.isnan(table.loc["ge"].auc_ci_low) and np.isnan(table.loc["siemens"].auc_ci_high)
    more = pd.concat([_preds()] * 3, ignore_index=True)
    wide = vendor_evidence(more, 0.5, by_vendor).set_index("vendor").loc["ge"]
    assert wide.auc_ci_low <= 0.75 <= wide.auc_ci_high and wide.auc_ci_low < wide.auc_ci_high


def test_a_fold_mean_of_fewer_folds_than_the_split_says_so() -> None:
    """canon's "1.000 ± –" came from one fold of four (the others held one class of it)."""
    from dicomops.training.metrics import summarise_folds

    per_fold = pd.DataFrame({"vendor": ["canon"] * 4, "fold": range(4), "auc": [1.0, np.nan, np.nan, np.nan],
                             "sensitivity": 1.0, "specificity": 1.0, "f1": 1.0, "kappa": 1.0})
    summary = summarise_folds(per_fold)
    assert int(summary.set_index("vendor").loc["canon", "auc_folds"]) == 1
    evidence = vendor_evidence(pd.DataFrame({"vendor": ["canon"] * 4, "label": [1, 0, 1, 0], "score": [0.9, 0.1, 0.8, 0.2]}),
                               0.5, summary)
    text = model_card.evidence_section({"mean_auc": 1.0, "std_auc": float("nan"), "threshold": 0.5},
                                       evidence.to_dict("records"), _pool(), n_splits=4)
    assert "(1 of 4 folds)" in text and "(–" not in text  # no interval of dashes either


def _pool() -> privacy.PoolCounts:
    """What the privacy module released of the pool: noisy cells, siemens' negatives suppressed."""
    release = privacy.Release(name=privacy.POOL_RELEASE, dataset="ds", by=privacy.POOL_BY, epsilon=1.0, delta=6e-7,
                              scale=1.0, threshold=11, table=pd.DataFrame({
                                  "vendor": ["ge", "ge", "siemens"], "label": ["0", "1", "1"], "count": [14, 17, 12]}))
    return privacy.PoolCounts(release, "", "rows")


def _card(version: str = "3", pool: privacy.PoolCounts | None = None) -> str:
    evidence = vendor_evidence(_preds(), 0.5, pd.DataFrame({"vendor": ["all", "ge", "siemens"],
                                                            "auc_mean": [0.9, 0.75, 1.0], "auc_std": [0.1, 0.2, 0.0]}))
    summary = {"mean_auc": 0.9, "std_auc": 0.1, "threshold": 0.5}
    per_fold = [{"fold": 0, "n": 4, "positives": 2, "auc": 0.75, "sensitivity": 0.5, "specificity": 0.5}]
    return model_card.initial_card(NAME, version, summary, evidence.to_dict("records"), per_fold,
                                   {"data.accepted_sha256": "abc", "split_sha256": "def"}, pool or _pool(),
                                   vendor_names={"canon": ["TOSHIBA"], "ge": ["GE MEDICAL SYSTEMS"]})


def test_the_card_leads_with_the_decision_and_its_tables_have_one_cell_per_column() -> None:
    padded = _card()
    assert "| 14&nbsp; | 17&nbsp; |" in padded  # MLflow's tables have no padding of their own
    card = padded.replace(model_card.PAD, "")
    assert card.startswith("## Decision: pending")
    assert list(model_card.split_sections(card)) == [model_card.DECISION, model_card.EVIDENCE, model_card.FOLDS,
                                                     model_card.IDENTITY, model_card.REVIEW]
    table = [line for line in card.splitlines() if line.startswith("| ")]
    header = next(line for line in table if line.startswith("| vendor |"))
    rows = [line for line in table if line.startswith(("| ge ", "| siemens ", "| **all** "))]
    assert len(rows) == 3 and all(row.count("|") == header.count("|") for row in rows)
    # The released counts, never the exact ones (ge: 2 and 2; outcomes 1 / 1 / 1 / 1).
    # two of each class: the pooled AUC without an interval (none under 5 of a class)
    assert "| ge | 14 | 17 | 0.750 |" in card and "| siemens | \u2039 11 | 12 |" in card
    assert "| **all** | 14+ | 29 |" in card and "/ 1 / 1" not in card and "TP" not in card
    assert "\u03b5 = 1" in card and "cells under 11 suppressed" in card
    with pytest.raises(ValueError, match="one cell per column"):
        model_card.table(["a", "b"], "lr", [["1"]])
    assert "canon ← TOSHIBA" in card and "dicomops promote 3" in card


def test_a_card_without_a_release_shows_no_count_and_says_why() -> None:
    card = _card(pool=privacy.PoolCounts(None, "the privacy budget is spent (...)")).replace(model_card.PAD, "")
    assert "| ge | \u2013 | \u2013 | 0.750 |" in card
    assert "Counts of the training pool not released: the privacy budget is spent" in card


def test_a_section_rewrite_keeps_the_others_and_the_order() -> None:
    card = _card()
    decided = model_card.set_section(card, model_card.DECISION,
                                     model_card.decision_section("awaiting-review", ("gain +0.001",), "3",
                                                                 model_name="dicomops-ct-classifier"))
    exported = model_card.set_section(decided, model_card.EXPORT,
                                      model_card.export_section({"export.onnx.parity_max_abs_diff": 1.5e-6}, "skipped",
                                                                "runs:/x/export"))
    sections = model_card.split_sections(exported)
    assert list(sections)[:2] == [model_card.DECISION, model_card.EVIDENCE]
    assert list(sections).index(model_card.EXPORT) == list(sections).index(model_card.IDENTITY) + 1
    assert sections[model_card.EVIDENCE] == model_card.split_sections(card)[model_card.EVIDENCE]
    assert exported.startswith("## Decision: awaiting review — challenger") and "- gain +0.001" in exported
    assert "pending" not in exported.split("\n", 1)[0] and "1.5e-06" in exported


def _registry(tmp_path: Path) -> tuple[str, MlflowClient]:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    client.create_registered_model(NAME)
    experiment = client.create_experiment("card", artifact_location=(tmp_path / "art").as_uri())
    for auc in (0.90, 0.901, 0.95):
        run = client.create_run(experiment)
        mv = client.create_model_version(NAME, source=f"runs:/{run.info.run_id}/model", run_id=run.info.run_id,
                                         description=_card(str(len(client.search_model_versions()) + 1)))
        client.set_model_version_tag(NAME, mv.version, "cv.mean_auc", str(auc))
        client.set_model_version_tag(NAME, mv.version, "cv.auc.ge", str(auc))
    return uri, client


def _aliases(client: MlflowClient) -> dict[str, str]:
    return {alias: str(version) for alias, version in client.get_registered_model(NAME).aliases.items()}


def _gate(uri: str, client: MlflowClient, version: str) -> registry.Decision:
    client.set_registered_model_alias(NAME, registry.CHALLENGER, version)  # as register_model does
    return registry.apply_promotion_gate(uri, NAME, version, margin=0.005, vendor_tolerance=0.02, min_auc=0.8)


def test_each_version_holds_one_alias_meaning_through_gate_promotion_and_rejection(tmp_path: Path) -> None:
    uri, client = _registry(tmp_path)
    assert _gate(uri, client, "1").label == "auto-promoted"
    assert _aliases(client) == {"champion": "1"}  # the gate's champion is no longer the challenger
    assert client.get_model_version(NAME, "1").description.startswith("## Decision: promoted automatically")

    assert _gate(uri, client, "2").label == "awaiting-review"  # +0.001 is below the margin
    assert _aliases(client) == {"champion": "1", "challenger": "2"}
    card = client.get_model_version(NAME, "2").description
    assert card.startswith("## Decision: awaiting review — challenger") and "not above margin" in card
    assert model_card.EVIDENCE in model_card.split_sections(card)  # training's evidence survived

    registry.promote(uri, NAME, "2", reviewer="dr-who", note="reviewed the misses")
    assert _aliases(client) == {"champion": "2"}
    two, one = client.get_model_version(NAME, "2"), client.get_model_version(NAME, "1")
    assert two.description.startswith("## Decision: approved by a reviewer — champion")
    assert "**dr-who**: reviewed the misses" in two.description and "not above margin" in two.description
    assert one.description.startswith("## Decision: replaced") and one.tags["promotion.replaced_by"] == "2"

    client.set_registered_model_alias(NAME, registry.CHALLENGER, "3")
    with pytest.raises(ValueError, match="reason"):
        registry.reject(uri, NAME, "3", "dr-who", " ")
    with pytest.raises(ValueError, match="is the champion"):
        registry.reject(uri, NAME, "2", "dr-who", "not good")
    registry.reject(uri, NAME, "3", "dr-who", "misses small nodules on canon")
    assert _aliases(client) == {"champion": "2"}
    three = client.get_model_version(NAME, "3")
    assert three.tags["review.decision"] == "rejected" and three.tags["promotion.decision"] == "rejected-by-reviewer"
    assert three.description.startswith("## Decision: rejected by a reviewer")
    assert "misses small nodules on canon" in three.description


def test_decisions_made_on_the_mlflow_page_alone_are_recorded_by_the_next_sync(tmp_path: Path) -> None:
    uri, client = _registry(tmp_path)
    assert _gate(uri, client, "1").label == "auto-promoted"
    client.set_registered_model_alias(NAME, registry.CHALLENGER, "2")
    client.set_registered_model_alias(NAME, registry.CHALLENGER, "3")
    # In the UI: version 3 gets the champion alias (it keeps challenger, as the UI leaves it), and
    # version 2 is tagged rejected with a reason.
    client.set_registered_model_alias(NAME, registry.CHAMPION, "3")
    client.set_model_version_tag(NAME, "2", "review.decision", "rejected")
    client.set_model_version_tag(NAME, "2", "review.reason", "misses on siemens")
    changes = registry.sync_reviews(uri, NAME)
    assert len(changes) == 3, changes
    assert _aliases(client) == {"champion": "3"}
    three, one, two = (client.get_model_version(NAME, v) for v in ("3", "1", "2"))
    assert three.tags["promotion.decision"] == "promoted-by-reviewer"
    assert three.description.startswith("## Decision: approved by a reviewer — champion")
    assert "a reviewer in the MLflow UI" in three.description
    assert one.tags["promotion.replaced_by"] == "3" and one.description.startswith("## Decision: replaced")
    assert two.tags["promotion.decision"] == "rejected-by-reviewer" and "misses on siemens" in two.description
    assert registry.sync_reviews(uri, NAME) == []  # nothing left to record


def test_a_card_never_outgrows_what_mlflow_keeps_and_keeps_the_decision_and_evidence() -> None:
    long = _card() + "\n" + model_card.section(model_card.EXPORT, "- x " * 2000)
    fitted = model_card.fit(long)
    assert len(fitted) <= model_card.LIMIT < len(long)
    sections = model_card.split_sections(fitted)
    assert list(sections)[:2] == [model_card.DECISION, model_card.EVIDENCE] and "Left out" in sections
    assert model_card.EXPORT in sections["Left out"]
    assert model_card.fit(_card()) == _card()  # a card that fits is left alone


def test_a_champion_moved_back_by_hand_and_a_rerun_gate_are_recorded_right(tmp_path: Path) -> None:
    uri, client = _registry(tmp_path)
    assert _gate(uri, client, "1").label == "auto-promoted"
    client.set_registered_model_alias(NAME, registry.CHALLENGER, "3")
    assert _gate(uri, client, "3").label == "auto-promoted"  # 0.95 beats 0.90 by more than the margin
    assert client.get_model_version(NAME, "1").tags["promotion.replaced_by"] == "3"
    client.set_registered_model_alias(NAME, registry.CHAMPION, "1")  # a reviewer rolls back on the page
    assert registry.sync_reviews(uri, NAME)
    one, three = client.get_model_version(NAME, "1"), client.get_model_version(NAME, "3")
    assert one.description.startswith("## Decision: approved by a reviewer") and "promotion.replaced_by" not in one.tags
    assert three.description.startswith("## Decision: replaced") and three.tags["promotion.replaced_by"] == "1"
    again = registry.apply_promotion_gate(uri, NAME, "3", margin=0.005, vendor_tolerance=0.02, min_auc=0.8)
    assert not again.promote and "not the challenger" in again.reasons[0]
    assert _aliases(client) == {"champion": "1"}


def test_the_review_commands_name_the_model_unless_it_is_the_commands_default() -> None:
    """A segmenter's page told its reviewer `dicomops promote 3`, which promotes version 3 of the
    classifier (the commands' default model)."""
    segmenter = model_card.review_section("dicomops-ct-nodule-seg", "3", "FROC pictures")
    assert "`dicomops promote 3 --model-name dicomops-ct-nodule-seg --reviewer NAME`" in segmenter
    assert "`dicomops reject 3 --model-name dicomops-ct-nodule-seg --reviewer NAME" in segmenter
    assert "Evidence: FROC pictures." in segmenter and "ROC" not in segmenter.replace("FROC", "")
    decided = model_card.decision_section("awaiting-review", (), "3", model_name="dicomops-ct-nodule-seg")
    assert "dicomops promote 3 --model-name dicomops-ct-nodule-seg --reviewer NAME" in decided
    classifier = model_card.review_section("dicomops-ct-classifier", "3")
    assert "`dicomops promote 3 --reviewer NAME`" in classifier and "--model-name" not in classifier


def test_the_export_section_names_openvino_only_where_the_export_ran_it() -> None:
    ran = model_card.export_section({"export.onnx.parity_max_abs_diff": 1e-6, "export.ov_int8.auc_int8": 0.9765,
                                     "export.ov_int8.throughput_b32": 4128.0,
                                     "export.ov_int8.speedup_vs_ort_fp32_b32": 2.238, "export.ov_int8.speedup_b32": 2.41},
                                    "skipped", "runs:/x/export")
    assert ("OpenVINO on CPU (engines ov-fp32, ov-int8): INT8 AUC 0.9765; throughput at batch 32 4128 slabs/s INT8, "
            "2.24x ONNX Runtime FP32 and 2.41x its own FP32") in ran
    assert "OpenVINO" not in model_card.export_section({"export.onnx.parity_max_abs_diff": 1e-6}, "skipped", "runs:/x")


def test_the_export_section_gives_the_int8_series_check_where_the_export_ran_it() -> None:
    ran = model_card.export_section({"export.onnx.parity_max_abs_diff": 1e-6, "export.int8.series_auc_fp32": 0.991,
                                     "export.int8.series_auc_int8": 0.8416, "export.int8.series": 30.0,
                                     "export.int8.series_max_abs_diff": 0.631}, "skipped", "runs:/x/export")
    assert ("- INT8 series scores (what is served): series AUC 0.9910 → 0.8416 over 30 series, scores moved by up "
            "to 0.631 on ONNX Runtime; the tags export.int8.series_check and export.ov_int8.series_check say whether "
            "each INT8 engine serves this version") in ran
    both = model_card.export_section({"export.onnx.parity_max_abs_diff": 1e-6, "export.int8.series_auc_fp32": 0.991,
                                      "export.int8.series_auc_int8": 0.8416, "export.int8.series": 30.0,
                                      "export.int8.series_max_abs_diff": 0.631, "export.ov_int8.series_auc_int8": 0.8911,
                                      "export.ov_int8.series_max_abs_diff": 0.412}, "skipped", "runs:/x/export")
    assert ("scores moved by up to 0.631 on ONNX Runtime, series AUC 0.8911 and up to 0.412 on OpenVINO; the tags "
            "export.int8.series_check") in both
    assert "series scores" not in model_card.export_section({"export.onnx.parity_max_abs_diff": 1e-6}, "skipped",
                                                            "runs:/x")
