"""Readers' feedback: reviewers, items, the store, conflict rules, agreement, the retrain trigger."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import cohen_kappa_score

from dicomops.config import FeedbackConfig
from dicomops.deid.keys import KeyedMapper
from dicomops.feedback import store
from dicomops.feedback.store import FeedbackStore, Reviewers, UnknownReaderError

MODEL = "dicomops-ct-classifier"
CFG = FeedbackConfig(reviewers={"ada": "senior", "bo": "reader", "cy": "reader"}, min_cases=4, corrections=3)
T0 = dt.datetime(2026, 11, 1, 9, 0, tzinfo=dt.UTC)


def _item(reader: str, series: str, verdict: str, model_label: int = 1, label: int | None = None,
          minutes: int = 0, version: str = "3", vendor: str = "GE") -> dict[str, object]:
    return store.make_item(reader=reader, role=CFG.reviewers[reader], source="endpoint", verdict=verdict,
                           series=series, vendor=vendor, model=MODEL, version=version,
                           model_label=model_label, model_score=0.9 if model_label else 0.1, reader_label=label,
                           at=T0 + dt.timedelta(minutes=minutes))


def test_only_configured_reviewers_with_their_token_are_taken() -> None:
    reviewers = Reviewers.from_config(CFG, "ada=" + "a" * 24 + ", bo=" + "b" * 24)
    assert reviewers.authenticate("ada", "a" * 24) == "senior"
    assert reviewers.role("cy") == "reader"  # configured, no token: PACS feedback only
    for reader, token in (("ada", "b" * 24), ("cy", "c" * 24), ("mallory", "a" * 24), ("ada", "")):
        with pytest.raises(UnknownReaderError, match="unknown reviewer or wrong token"):
            reviewers.authenticate(reader, token)
    with pytest.raises(UnknownReaderError, match="'mallory' is not a configured reviewer"):
        reviewers.role("mallory")
    with pytest.raises(ValueError, match=r"'eve', who is not in feedback\.reviewers"):
        Reviewers.from_config(CFG, "eve=" + "e" * 24)
    with pytest.raises(ValueError, match="at least 16 characters"):
        Reviewers.from_config(CFG, "ada=short")


def test_items_carry_the_readers_label_and_provenance() -> None:
    assert _item("bo", "s1", "accept")["reader_label"] == 1
    rejected = _item("bo", "s1", "reject")
    assert rejected["reader_label"] == 0 and rejected["changed"] == "label 1 \u2192 0"
    assert _item("bo", "s1", "correct", label=1)["changed"] == "nothing"
    with pytest.raises(ValueError, match="a correction needs the reader's label"):
        _item("bo", "s1", "correct")
    with pytest.raises(ValueError, match="contradicts reader_label"):
        _item("bo", "s1", "accept", label=0)
    with pytest.raises(ValueError, match="verdict must be one of"):
        _item("bo", "s1", "maybe")
    # The same judgement (same reference) is one item, whenever it is seen.
    a = store.make_item(reader="bo", role="reader", source="pacs-sr", verdict="accept", series="s1", vendor="GE",
                        model="m", version="3", model_label=1, model_score=0.8, ref="SR-ABC")
    b = store.make_item(reader="bo", role="reader", source="pacs-sr", verdict="accept", series="s1", vendor="GE",
                        model="m", version="3", model_label=1, model_score=0.8, ref="SR-ABC",
                        at=T0 + dt.timedelta(days=2))
    assert a["item"] == b["item"]


def test_the_store_keeps_history_and_never_an_original_uid(tmp_path: Path) -> None:
    mapper = KeyedMapper(b"k" * 32)
    original = "1.2.840.113619.2.55.3.604688119.969.1268071029.320"
    series = mapper.uid(original)  # how the gate names the series on the training side
    feedback = FeedbackStore(tmp_path)
    first = _item("bo", series, "accept")
    assert feedback.add([first, _item("bo", series, "reject", minutes=5)]) == 2
    assert feedback.add([first]) == 0  # seen again: not stored twice
    assert feedback.items().verdict.tolist() == ["accept", "reject"]
    assert original.encode() not in feedback.path.read_bytes()
    assert series.encode() in feedback.path.read_bytes()


def test_conflicts_resolve_by_the_configured_rule() -> None:
    items = pd.DataFrame([
        _item("bo", "s1", "accept"), _item("cy", "s1", "accept"), _item("ada", "s1", "reject"),  # senior says 0
        _item("bo", "s2", "accept"), _item("cy", "s2", "reject"),                                # a tie
        _item("bo", "s3", "reject"), _item("bo", "s3", "accept", minutes=10),                    # changed mind
    ])
    senior = store.resolve(items, "senior").set_index("SeriesInstanceUID")
    assert senior.label.to_dict() == {"s1": 0, "s2": -1, "s3": 1}
    assert senior.conflict.to_dict() == {"s1": True, "s2": True, "s3": False}
    assert senior.readers["s1"] == "ada=0;bo=1;cy=1"
    assert store.resolve(items, "majority").set_index("SeriesInstanceUID").label["s1"] == 1

    labels = pd.DataFrame({"SeriesInstanceUID": ["s1", "s2", "s4"], "label": [1, 1, 0]})
    pool = store.override_labels(labels, store.resolve(items, "senior")).set_index("SeriesInstanceUID")
    assert pool.label.to_dict() == {"s1": 0, "s2": 1, "s4": 0}
    assert pool.label_before.to_dict() == {"s1": 1, "s2": 1, "s4": 0}
    assert pool.label_source.to_dict() == {"s1": "reader", "s2": "generator", "s4": "generator"}


def test_agreement_is_cohens_kappa_per_vendor_over_the_window() -> None:
    said = [1, 1, 0, 0, 1, 0, 1, 0]
    truth = [1, 0, 0, 0, 1, 1, 1, 0]
    items = [_item("bo", f"s{i}", "accept" if s == t else "reject", model_label=s, minutes=i,
                   vendor="GE" if i < 4 else "SIEMENS") for i, (s, t) in enumerate(zip(said, truth, strict=True))]
    items.append(_item("bo", "old", "reject", model_label=1, minutes=-200 * 24 * 60))  # outside 90 days
    table = store.agreement(pd.DataFrame(items), CFG, now=T0 + dt.timedelta(days=1)).set_index("vendor")
    assert table.loc["all", "series"] == 8
    assert table.loc["all", "kappa"] == pytest.approx(cohen_kappa_score(said, truth))
    assert table.loc["all", "disagreement"] == pytest.approx(2 / 8)
    assert table.loc["GE", "kappa"] == pytest.approx(cohen_kappa_score(said[:4], truth[:4]))
    small = store.agreement(pd.DataFrame(items[:3]), CFG, now=T0 + dt.timedelta(days=1))
    assert np.isnan(small.kappa).all() and np.isnan(small.disagreement).all()  # under min_cases: no figure


def test_a_retrain_is_due_at_the_threshold_and_not_before() -> None:
    now = T0 + dt.timedelta(days=1)
    agreeing = [_item("bo", f"a{i}", "accept", model_label=i % 2, minutes=i) for i in range(20)]
    corrections = [_item("bo", f"c{i}", "reject", minutes=100 + i) for i in range(3)]
    assert store.retrain_due(pd.DataFrame(agreeing + corrections[:2]), CFG, MODEL, "3", now=now) is None
    reason = store.retrain_due(pd.DataFrame(agreeing + corrections), CFG, MODEL, "3", now=now)
    assert reason == "3 corrections of version 3 since it was deployed"
    # Corrections before the last feedback retrain do not count again; another version's never do.
    after = (T0 + dt.timedelta(minutes=101)).isoformat(timespec="seconds")
    assert store.retrain_due(pd.DataFrame(agreeing + corrections), CFG, MODEL, "3", since=after, now=now) is None
    assert store.retrain_due(pd.DataFrame(agreeing + corrections), CFG, MODEL, "4", now=now) is None
    # Low agreement on enough series calls for a retrain by itself.
    poor = [_item("bo", f"p{i}", "reject" if i % 2 else "accept", model_label=i % 2, minutes=i) for i in range(8)]
    reason = store.retrain_due(pd.DataFrame(poor), CFG.model_copy(update={"corrections": 100}), MODEL, "3", now=now)
    assert reason is not None and reason.startswith("agreement with readers fell to kappa")


def test_the_review_endpoint_links_by_pseudonym_and_refuses_without_storing(tmp_path: Path) -> None:
    from dicomops.feedback.review import ReviewError, submit
    from dicomops.serving.predict import RESULT_COLUMNS

    key = b"r" * 32
    original = "1.2.826.0.1.3680043.8.498.7731"
    series = KeyedMapper(key).uid(original)
    folder = tmp_path / "predict" / "online-ST-X"
    folder.mkdir(parents=True)
    row = dict.fromkeys(RESULT_COLUMNS, "") | {"study": "ST-X", "series": series, "manufacturer": "GE", "score": 0.83,
                                               "present": True, "model": "dicomops-ct-classifier", "version": "7",
                                               "status": "scored"}
    pd.DataFrame([row]).to_csv(folder / "results.csv", index=False)
    reviewers = Reviewers.from_config(CFG, "ada=" + "a" * 24)
    body = {"reader": "ada", "series_instance_uid": original, "verdict": "correct", "label": 0}

    refusals = [({**body, "verdict": "maybe"}, "a" * 24, 400), ({**body, "label": 2}, "a" * 24, 400),
                ({**body, "series_instance_uid": "x; drop"}, "a" * 24, 400), ([1], "a" * 24, 400),
                ({**body, "reader": "bo"}, "a" * 24, 401), (body, "b" * 24, 401),
                ({**body, "series_instance_uid": "1.2.3.4"}, "a" * 24, 404),
                ({**body, "verdict": "correct", "label": None}, "a" * 24, 400)]
    for request, token, status in refusals:
        with pytest.raises(ReviewError) as err:
            submit(request, token, reviewers, tmp_path, key)
        assert err.value.status == status, (request, err.value.message)
    assert not FeedbackStore(tmp_path).path.exists()  # nothing stored on any refusal

    stored = submit(body, "a" * 24, reviewers, tmp_path, key)
    assert stored | {"item": ""} == {"stored": True, "item": "", "model": "dicomops-ct-classifier", "version": "7",
                                     "model_label": 1, "reader_label": 0, "changed": "label 1 \u2192 0"}
    (item,) = FeedbackStore(tmp_path).items().to_dict("records")
    assert (item["series"], item["reader"], item["role"], item["source"]) == (series, "ada", "senior", "endpoint")
    assert original not in str(stored) and original.encode() not in FeedbackStore(tmp_path).path.read_bytes()


def test_a_review_judges_the_result_the_reader_read_and_asks_which_when_several_versions_scored(
        tmp_path: Path) -> None:
    """Version 1 said present (the report the reader read), version 2 later said absent. An accept
    without a version is refused (409: which?), not stored as agreeing with version 2's absent;
    with the version it is stored against version 1's call."""
    import time

    from dicomops.feedback.review import ReviewError, submit
    from dicomops.serving.predict import RESULT_COLUMNS

    key = b"r" * 32
    original = "1.2.826.0.1.3680043.8.498.7732"
    series = KeyedMapper(key).uid(original)
    for version, present, batch in (("1", True, "b1"), ("2", False, "b2")):
        folder = tmp_path / "predict" / batch
        folder.mkdir(parents=True)
        row = dict.fromkeys(RESULT_COLUMNS, "") | {"study": "ST", "series": series, "manufacturer": "GE",
                                                   "score": 0.8 if present else 0.2, "present": present,
                                                   "model": MODEL, "version": version, "status": "scored"}
        pd.DataFrame([row]).to_csv(folder / "results.csv", index=False)
        time.sleep(0.01)
    reviewers = Reviewers.from_config(CFG, "ada=" + "a" * 24)
    body = {"reader": "ada", "series_instance_uid": original, "verdict": "accept"}
    for request, status, says in (({**body}, 409, "versions 1, 2 scored that series"),
                                  ({**body, "version": "3"}, 404, "the versions that scored it: 1, 2"),
                                  ({**body, "version": "v1"}, 400, "version must be"),
                                  ({**body, "version": True}, 400, "version must be")):
        with pytest.raises(ReviewError) as err:
            submit(request, "a" * 24, reviewers, tmp_path, key)
        assert (err.value.status, says in err.value.message) == (status, True), err.value.message
    assert not FeedbackStore(tmp_path).path.exists()
    stored = submit({**body, "version": 1}, "a" * 24, reviewers, tmp_path, key)
    assert (stored["version"], stored["model_label"], stored["reader_label"]) == ("1", 1, 1)


def test_readers_labels_go_into_the_pool_and_can_be_applied_again(tmp_path: Path) -> None:
    from dicomops.feedback.stage import apply_to_pool, write_labels

    FeedbackStore(tmp_path).add([_item("ada", "s1", "reject"), _item("bo", "s2", "accept", model_label=0)])
    labels = tmp_path / "labels.csv"
    pd.DataFrame({"SeriesInstanceUID": ["s1", "s2", "s3"], "label": [1, 1, 0], "vendor": ["ge"] * 3}).to_csv(
        labels, index=False)
    assert apply_to_pool(write_labels(tmp_path, CFG), labels) == 2
    pool = pd.read_csv(labels).set_index("SeriesInstanceUID")
    assert pool.label.to_dict() == {"s1": 0, "s2": 0, "s3": 0}
    assert pool.label_before.to_dict() == {"s1": 1, "s2": 1, "s3": 0}
    # A later judgement replaces the earlier one; applying again starts from the labels before readers.
    FeedbackStore(tmp_path).add([_item("ada", "s1", "accept", minutes=5)])
    assert apply_to_pool(write_labels(tmp_path, CFG), labels) == 2
    pool = pd.read_csv(labels).set_index("SeriesInstanceUID")
    assert pool.label.to_dict() == {"s1": 1, "s2": 0, "s3": 0} and pool.label_before["s2"] == 1


def test_the_gate_asks_the_readers_and_refuses_a_challenger_they_agree_with_less(tmp_path: Path) -> None:
    from dicomops.feedback.gate import reader_agreement
    from dicomops.tracking.promotion import ModelScore, decide_promotion

    # Readers judged version 3 (the champion) on six series: it was right on four.
    truth = {"s0": 1, "s1": 1, "s2": 0, "s3": 0, "s4": 1, "s5": 0}
    said = {"s0": 1, "s1": 1, "s2": 0, "s3": 0, "s4": 0, "s5": 1}
    FeedbackStore(tmp_path).add([_item("bo", s, "accept" if said[s] == t else "reject", model_label=said[s])
                                 for s, t in truth.items()])
    # The challenger's out-of-fold scores at threshold 0.5: right on five; s9 has no reader label.
    oof = pd.DataFrame({"SeriesInstanceUID": ["s0", "s1", "s2", "s3", "s4", "s5", "s9"],
                        "score": [0.9, 0.8, 0.1, 0.2, 0.7, 0.6, 0.9]})
    better = reader_agreement(tmp_path, oof, 0.5, MODEL, "3", CFG)
    assert better is not None and (better.series, better.champion, better.challenger) == (6, 4 / 6, 5 / 6)
    worse = reader_agreement(tmp_path, oof.assign(score=1 - oof.score), 0.5, MODEL, "3", CFG)
    assert worse is not None and worse.challenger == pytest.approx(1 / 6)
    assert reader_agreement(tmp_path, oof, 0.5, MODEL, "2", CFG).series == 0  # no calls of version 2 were judged
    assert reader_agreement(tmp_path / "none", oof, 0.5, MODEL, "3", CFG) is None

    champion = ModelScore(0.90, {"ge": 0.9})
    challenger = ModelScore(0.95, {"ge": 0.95})
    assert decide_promotion(challenger, champion, readers=better, min_reader_series=4).promote
    refused = decide_promotion(challenger, champion, readers=worse, min_reader_series=4)
    assert not refused.promote and refused.reasons[-1].endswith("worse than the champion")
    few = decide_promotion(challenger, champion, readers=worse, min_reader_series=10)
    assert few.promote and "fewer than 10, not judged on them" in few.reasons[-1]


def test_simulated_readers_disagree_on_the_chosen_share(tmp_path: Path) -> None:
    from dicomops import io
    from dicomops.feedback.simulate import simulate
    from dicomops.layout import WorkLayout

    paths = WorkLayout(tmp_path).train
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 400)
    preds = pd.DataFrame({"SeriesInstanceUID": [f"2.25.{i}" for i in range(400)], "label": labels,
                          "vendor": rng.choice(["ge", "siemens"], 400),
                          "score": np.clip(labels * 0.6 + rng.random(400) * 0.5, 0, 1)})
    paths.root.mkdir(parents=True)
    io.write_parquet(paths.oof_predictions, preds)
    io.write_json(paths.summary, {"threshold": 0.5})
    io.write_json(paths.state, {"version": "4"})
    with pytest.raises(ValueError, match="version 4's, not version 3's"):
        simulate(tmp_path, "m", "3", readers=2, disagree=0.2)
    assert simulate(tmp_path, "m", "4", readers=2, disagree=0.2) == 800
    assert simulate(tmp_path, "m", "4", readers=2, disagree=0.2) == 0  # the same simulation again: nothing new
    items = FeedbackStore(tmp_path).items()
    truth = preds.set_index("SeriesInstanceUID").label
    flipped = (items.reader_label != items.series.map(truth)).mean()
    assert flipped == pytest.approx(0.2, abs=0.05)
    assert set(items.role) == {"senior", "reader"} and set(items.source) == {"simulated"}
    # Resolved by the senior reader: agreement with the model is measured on every series.
    table = store.agreement(items, CFG.model_copy(update={"min_cases": 10})).set_index("vendor")
    assert table.loc["all", "series"] == 400 and 0 < table.loc["all", "kappa"] < 1


def test_the_segmenters_judgements_never_count_for_the_classifier_of_the_same_version_number(tmp_path: Path) -> None:
    """The classifier and the segmenter are versioned apart, so both have a version 3. Readers who
    corrected the segmenter's version 3 on every series say nothing of the classifier's version 3:
    its agreement, its retrain and its promotion gate see only its own calls."""
    from dicomops.feedback.gate import reader_agreement

    segmenter = "dicomops-ct-nodule-seg"
    classifier = [_item("bo", f"s{i}", "accept", model_label=i % 2, minutes=i) for i in range(8)]
    judged = [store.make_item(reader="bo", role="reader", source="pacs-seg", verdict="correct", series=f"s{i}",
                              vendor="GE", model=segmenter, version="3", model_label=1 - i % 2, model_score=0.5,
                              reader_label=i % 2, at=T0 + dt.timedelta(minutes=20 + i)) for i in range(8)]
    items = pd.DataFrame(classifier + judged)
    table = store.agreement(items, CFG, now=T0 + dt.timedelta(days=1)).set_index(["model", "vendor"])
    assert table.loc[(MODEL, "all"), "kappa"] == 1.0 and table.loc[(MODEL, "all"), "disagreement"] == 0.0
    assert table.loc[(segmenter, "all"), "kappa"] == -1.0 and table.loc[(segmenter, "all"), "disagreement"] == 1.0
    assert store.retrain_due(items, CFG, MODEL, "3", now=T0 + dt.timedelta(days=1)) is None
    assert store.retrain_due(items, CFG, segmenter, "3", now=T0 + dt.timedelta(days=1)).startswith("8 corrections")
    FeedbackStore(tmp_path).add(classifier + judged)
    oof = pd.DataFrame({"SeriesInstanceUID": [f"s{i}" for i in range(8)], "score": [0.9 * (i % 2) for i in range(8)]})
    readers = reader_agreement(tmp_path, oof, 0.5, MODEL, "3", CFG)
    assert readers is not None and (readers.series, readers.champion) == (8, 1.0)


def test_agreement_gives_the_mean_dice_of_the_masks_the_rule_kept(tmp_path: Path) -> None:
    """Per series the Dice of the reader's mask the conflict rule kept (the senior's), averaged per
    vendor; none under min_cases masks; items of a store written before Dice existed read as NaN."""
    segmenter = "dicomops-ct-nodule-seg"

    def seg_item(reader: str, series: str, vendor: str, dice: float, minutes: int) -> dict[str, object]:
        return store.make_item(reader=reader, role=CFG.reviewers[reader], source="pacs-seg", verdict="correct",
                               series=series, vendor=vendor, model=segmenter, version="1", model_label=1,
                               model_score=0.9, reader_label=1, at=T0 + dt.timedelta(minutes=minutes),
                               mask=f"masks/{reader}-{series}.npz", dice=dice, ref=f"{reader}-{series}")

    dice = {"s0": 0.8, "s1": 0.6, "s2": 0.9, "s3": 0.5, "s4": 0.7}
    items = [seg_item("ada", s, "GE" if i < 3 else "SIEMENS", d, i) for i, (s, d) in enumerate(dice.items())]
    items.append(seg_item("bo", "s0", "GE", 0.1, 30))  # later, but the senior's mask wins
    table = store.agreement(pd.DataFrame(items), CFG, now=T0 + dt.timedelta(days=1)).set_index("vendor")
    assert table.loc["all", "dice"] == pytest.approx(np.mean(list(dice.values())))
    assert np.isnan(table.loc["GE", "dice"]) and np.isnan(table.loc["SIEMENS", "dice"])  # 3 and 2 masks < 4
    assert np.isnan(store.agreement(pd.DataFrame(items[:3]), CFG, now=T0 + dt.timedelta(days=1)).dice).all()
    # The classifier's items carry no Dice.
    assert np.isnan(store.agreement(pd.DataFrame([_item("bo", f"c{i}", "accept") for i in range(5)]), CFG,
                                    now=T0 + dt.timedelta(days=1)).dice).all()

    old = pd.DataFrame([_item("bo", "s9", "accept")]).drop(columns=["mask", "dice"])
    path = FeedbackStore(tmp_path).path
    path.parent.mkdir(parents=True)
    old.to_parquet(path)
    read = FeedbackStore(tmp_path).items()
    assert list(read.columns) == store.ITEM_COLUMNS and read["mask"].iloc[0] == "" and np.isnan(read.dice.iloc[0])
    assert FeedbackStore(tmp_path).add(items) == len(items)
    assert FeedbackStore(tmp_path).items().dice.notna().sum() == len(items)


def test_only_the_readers_configured_now_decide_with_the_role_configured_now(tmp_path: Path) -> None:
    """A reader taken off feedback.reviewers (or the demo's simulated readers, configured only for
    the run that simulates them) stays in the history and decides nothing: labels, agreement,
    retrain; a reader's role is today's, not the one stored with their judgement."""
    from dicomops.feedback.stage import due, write_labels

    gone = [store.make_item(reader="sim-reader-1", role="senior", source="simulated", verdict="correct",
                            series=f"s{i}", vendor="GE", model=MODEL, version="3", model_label=1, model_score=0.9,
                            reader_label=0, at=T0 + dt.timedelta(minutes=i)) for i in range(5)]
    kept = [_item("bo", f"s{i}", "accept", model_label=1, minutes=10 + i) for i in range(5)]
    FeedbackStore(tmp_path).add(gone + kept)
    labels = write_labels(tmp_path, CFG)
    assert set(labels.label) == {1} and not labels.conflict.any()  # bo's, not the departed senior's
    assert due(tmp_path, CFG, MODEL, "3", "") is None  # 5 corrections by the departed reader do not count
    assert len(FeedbackStore(tmp_path).items()) == 10  # the history keeps them
    # Configured again, as a reader this time (stored as senior): now a 1 against 1 tie per series.
    again = CFG.model_copy(update={"reviewers": {**CFG.reviewers, "sim-reader-1": "reader"}})
    assert set(write_labels(tmp_path, again).label) == {-1}
    assert due(tmp_path, again, MODEL, "3", "").startswith("5 corrections")


def test_the_segmenters_gate_asks_the_readers_about_its_findings(tmp_path: Path) -> None:
    """A retrained segmenter's out-of-fold findings (segment/series.csv) against the readers' labels,
    beside the champion segmenter's findings in the clinic; the classifier's calls on the same
    series, and the same version number, are not the segmenter's."""
    from dicomops import io
    from dicomops.feedback.gate import segmenter_readers_for
    from dicomops.layout import WorkLayout

    segmenter = "dicomops-ct-nodule-seg"
    truth = {"s0": 1, "s1": 1, "s2": 0, "s3": 0, "s4": 1}
    clinic = {"s0": 1, "s1": 0, "s2": 0, "s3": 1, "s4": 1}  # the champion segmenter: right on 3 of 5
    feedback = tmp_path / "feedback-work"
    FeedbackStore(feedback).add(
        [store.make_item(reader="bo", role="reader", source="pacs-seg", verdict="correct", series=s, vendor="GE",
                         model=segmenter, version="2", model_label=clinic[s], model_score=0.5, reader_label=t,
                         at=T0 + dt.timedelta(minutes=i)) for i, (s, t) in enumerate(truth.items())]
        + [_item("bo", s, "accept", model_label=t, version="2", minutes=10 + i)  # the classifier: always right
           for i, (s, t) in enumerate(truth.items())])
    work = tmp_path / "retrain-work"
    io.write_csv(WorkLayout(work).segment.series, pd.DataFrame({
        "series": ["s0", "s1", "s2", "s3", "s4", "s9"], "vendor": "GE", "dice": 0.8,
        "present_ref": True, "present_pred": [True, True, False, False, False, True], "false_positives": 0}))
    readers = segmenter_readers_for(work, feedback, segmenter, CFG)
    agreement = readers("2")
    assert agreement is not None and (agreement.series, agreement.champion, agreement.challenger) == (5, 3 / 5, 4 / 5)
