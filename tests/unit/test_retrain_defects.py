"""Retrain defects found on 2026-12-06: a grown pool's split carried over fold by fold, a failed
retrain giving the cooldown back, and a monitored folder counted once however many batches name it."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from dicomops import io
from dicomops.layout import WorkLayout
from dicomops.monitoring import guard
from dicomops.monitoring.stage import labelled_sources, record_batch, reset_retrain_work
from dicomops.training.splits import (
    check_no_leakage,
    extend_folds,
    load_or_create_folds,
    make_folds,
    refresh_folds,
)

VENDORS = ("siemens", "ge", "philips", "canon")


def _pool(patients: range, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = [{"SeriesInstanceUID": f"2.25.{p}.{s}", "PatientID": f"pt-{p}", "vendor": VENDORS[p % 4],
             "label": int(rng.random() < 0.5)} for p in patients for s in range(1 + (p % 3 == 0))]
    return pd.DataFrame(rows)


def _fold_of(folds: list[dict[str, list[str]]]) -> dict[str, int]:
    return {s: i for i, f in enumerate(folds) for s in f["val"]}


def test_a_grown_pool_keeps_each_series_in_its_fold_and_spreads_the_new_ones_by_vendor(tmp_path: Path) -> None:
    first = _pool(range(40))
    layout = WorkLayout(tmp_path)
    earlier = load_or_create_folds(layout, first, 4, seed=1).folds
    # Retrain 2: 24 new patients, a new series of patient 1 (split before), and one series gone.
    gone = first.SeriesInstanceUID.iloc[-1]
    returning = pd.DataFrame([{"SeriesInstanceUID": "2.25.1.9", "PatientID": "pt-1", "vendor": "ge", "label": 1}])
    second = pd.concat([first[first.SeriesInstanceUID != gone], _pool(range(100, 124), seed=2), returning])
    folds, line = refresh_folds(layout, second, 4, seed=1)
    before, after = _fold_of(earlier), _fold_of(folds.folds)
    assert set(after) == set(second.SeriesInstanceUID)
    assert all(after[s] == before[s] for s in before if s != gone)
    assert after["2.25.1.9"] == before["2.25.1.0"]  # the patient's fold
    check_no_leakage(folds.folds, second)
    new = second[~second.SeriesInstanceUID.isin(list(before))]
    for vendor in VENDORS:  # six new patients a vendor: spread over the folds, never piled into one
        placed = pd.Series([after[s] for s in new[new.vendor == vendor].SeriesInstanceUID]).value_counts()
        assert placed.size >= 3 and placed.max() <= 3, (vendor, placed.to_dict())
    assert "kept in their folds" in line and "33 new" in line and "1 no longer" in line
    # Training reads the carried-over split as its own; it still refuses any other series set.
    assert load_or_create_folds(layout, second, 4, seed=1) == folds
    with pytest.raises(ValueError, match="made for other series"):
        load_or_create_folds(layout, first, 4, seed=1)
    assert refresh_folds(layout, second, 4, seed=1) == (folds, "split unchanged: the same 86 series")


def test_a_split_that_cannot_be_carried_over_is_made_afresh_and_says_why(tmp_path: Path) -> None:
    first = _pool(range(40))
    layout = WorkLayout(tmp_path)
    earlier = load_or_create_folds(layout, first, 4, seed=1).folds
    # A kept patient's series now under another PatientID in another fold: carried over, it would leak.
    moved = first.copy()
    a, b = (next(s for s in f["val"]) for f in earlier[:2])
    moved.loc[moved.SeriesInstanceUID == b, "PatientID"] = moved.loc[moved.SeriesInstanceUID == a, "PatientID"].iloc[0]
    with pytest.raises(ValueError, match="folds 0 and 1"):
        extend_folds(earlier, moved, seed=1)
    folds, line = refresh_folds(layout, moved, 4, seed=1)
    assert line.startswith("split made afresh (the earlier one cannot be carried over")
    assert folds.folds == make_folds(moved, 4, seed=1)
    other_seed, line = refresh_folds(layout, moved, 4, seed=5)
    assert "seed=5" in line and other_seed.seed == 5


def test_a_new_pool_clears_the_retrain_works_training_state_and_the_same_pool_keeps_it(tmp_path: Path) -> None:
    target = WorkLayout(tmp_path).retrain_work
    state, checkpoint = target.train.state, target.train.fold(0) / "checkpoint.pt"
    for path in (state, checkpoint, target.segment.state, target.stage_record("train"), target.folds_file):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("{}")
    reset_retrain_work(tmp_path, "pool-1")
    assert not state.exists() and not checkpoint.exists() and not target.segment.state.exists()
    assert not target.stage_record("train").exists()
    assert target.folds_file.exists()  # carried over by the split, not dropped
    state.parent.mkdir(parents=True)
    state.write_text("{}")
    assert "resumes" in reset_retrain_work(tmp_path, "pool-1") and state.exists()
    assert "cleared" in reset_retrain_work(tmp_path, "pool-2") and not state.exists()


def test_a_failed_retrain_gives_the_cooldown_back_and_the_next_alert_says_so(tmp_path: Path) -> None:
    t0 = dt.datetime(2026, 12, 1, tzinfo=dt.UTC)
    with guard.cooldown_taken(tmp_path, "m", "run-1", "drift", now=t0):
        pass
    assert not guard.check_cooldown(tmp_path, "m", 24, now=t0 + dt.timedelta(hours=1)).go
    t1 = t0 + dt.timedelta(hours=30)
    with pytest.raises(RuntimeError, match="gate"), guard.cooldown_taken(tmp_path, "m", "run-2", "drift", now=t1):
        # Under the lock, a second alert right behind this retrain is still skipped.
        assert not guard.check_cooldown(tmp_path, "m", 24, now=t1 + dt.timedelta(seconds=1)).go
        raise RuntimeError("ingest gate failed")
    verdict = guard.check_cooldown(tmp_path, "m", 24, now=t1 + dt.timedelta(hours=1))
    assert verdict.go and "failed" in verdict.reason and "trigger=drift" in verdict.reason
    assert guard.last_start(tmp_path, "m") == t0.isoformat(timespec="seconds")  # the feedback loop counts from it
    with guard.cooldown_taken(tmp_path, "m", "run-3", "feedback", now=t1 + dt.timedelta(hours=2)):
        pass
    after = guard.check_cooldown(tmp_path, "m", 24, now=t1 + dt.timedelta(hours=3))
    assert not after.go and "failed" not in after.reason


def test_a_folder_monitored_night_after_night_is_one_labelled_source(tmp_path: Path) -> None:
    data, incoming = tmp_path / "data", tmp_path / "incoming"
    for folder in (data, incoming):
        folder.mkdir()
        (folder / "labels.csv").write_text("SeriesInstanceUID\n")
    work = tmp_path / "work"
    for night, batch in enumerate(("aaaa", "bbbb", "cccc")):
        record_batch(work, batch, incoming if night != 1 else tmp_path / "data" / ".." / "incoming")
    record_batch(work, "dddd", data)
    assert labelled_sources(work, data) == [data, incoming]
    assert io.read_json(WorkLayout(work).batch("bbbb").batch_record)["src"].endswith("incoming")
