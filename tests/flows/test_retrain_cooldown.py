"""An alert-triggered retrain checks the cooldown again once it holds the retrain lock: another
alert's retrain that took the lock first has recorded its start by then, and a second retrain
right behind it would defeat the cooldown (a retrain storm on a burst of alerts). A retrain that
fails gives the cooldown back; a second retrain on a grown pool splits that pool, its earlier
series in their earlier folds, without resuming the first pool's training."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

import flows.retrain as flow
from dicomops import io
from dicomops.config import PipelineConfig, SegmentConfig
from dicomops.layout import WorkLayout
from dicomops.monitoring import guard
from tasks.train import prepare_splits


def test_an_alert_retrain_that_waited_for_the_lock_skips_inside_the_cooldown(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "data"
    src.mkdir()
    (src / "labels.csv").write_text("SeriesInstanceUID\n")
    work = tmp_path / "work"
    config = PipelineConfig.model_validate({"monitor": {"training_source": str(src), "cooldown_hours": 24}})
    name = config.train.model_name
    held = guard.retrain_lock

    @contextlib.contextmanager
    def taken_first(where: Path) -> Iterator[None]:
        # While this retrain waited for the lock, another alert's retrain took it and started.
        guard.record_start(where, name, "run-of-the-other", trigger="drift")
        with held(where):
            yield

    trained: list[Any] = []
    monkeypatch.setattr(guard, "retrain_lock", taken_first)
    monkeypatch.setattr(flow, "readers_source", lambda work, cfg, sources, snapshot: ({}, Path(snapshot), None))
    monkeypatch.setattr(flow, "combine_sources", lambda sources, out: Path(out))
    monkeypatch.setattr(flow, "hash_corpus", lambda folder: "pool")

    def retrained(*a: Any, **k: Any) -> dict[str, object]:
        trained.append(a)
        return {"status": "retrained", "version": "9"}

    monkeypatch.setattr(flow, "_retrain", retrained)
    result = flow.retrain.fn(work=work, config=config, trigger="feedback", monitoring_run_id="run-of-this-one")
    assert result["status"] == "skipped" and "cooldown" in str(result["reason"]), result
    assert trained == []
    # A manual retrain is not rate limited, lock or not.
    assert flow.retrain.fn(work=work, config=config, trigger="manual")["status"] == "retrained"


def _labelled(tmp_path: Path) -> PipelineConfig:
    src = tmp_path / "data"
    src.mkdir()
    (src / "labels.csv").write_text("SeriesInstanceUID\n")
    return PipelineConfig.model_validate({"monitor": {"training_source": str(src), "cooldown_hours": 24},
                                          "segment": SegmentConfig(enabled=False).model_dump()})


def _pool_of(monkeypatch: pytest.MonkeyPatch, pool: dict[str, str]) -> None:
    """The combined sources stand in for themselves; their content hash is ``pool["hash"]``."""
    monkeypatch.setattr(flow, "readers_source", lambda work, cfg, sources, snapshot: ({}, Path(snapshot), None))
    monkeypatch.setattr(flow, "combine_sources", lambda sources, out: Path(out))
    monkeypatch.setattr(flow, "hash_corpus", lambda folder: pool["hash"])


def test_a_failed_alert_retrain_gives_the_cooldown_back_and_the_next_alert_says_so(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    config, work = _labelled(tmp_path), tmp_path / "work"
    _pool_of(monkeypatch, {"hash": "pool"})

    def gate_fails(*a: Any, **k: Any) -> dict[str, object]:
        raise RuntimeError("ingest gate failed")

    monkeypatch.setattr(flow, "_retrain", gate_fails)
    with pytest.raises(RuntimeError, match="gate"):
        flow.retrain.fn(work=work, config=config, trigger="drift", monitoring_run_id="run-A")
    monkeypatch.setattr(flow, "_retrain", lambda *a, **k: {"status": "retrained", "version": "2"})
    capsys.readouterr()
    assert flow.retrain.fn(work=work, config=config, trigger="drift", monitoring_run_id="run-B")["status"] == "retrained"
    assert "(trigger=drift, started at" in capsys.readouterr().out  # the earlier retrain failed, and when
    # The one that succeeded holds the cooldown: the next alert, with a new pool, waits.
    _pool_of(monkeypatch, {"hash": "grown"})
    skipped = flow.retrain.fn(work=work, config=config, trigger="feedback", monitoring_run_id="run-C")
    assert skipped["status"] == "skipped" and "cooldown" in str(skipped["reason"])
    assert "failed" not in str(skipped["reason"])


def test_a_second_retrain_on_a_grown_pool_splits_it_keeping_the_earlier_folds(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config, work = _labelled(tmp_path), tmp_path / "work"
    pool = {"hash": "first"}
    _pool_of(monkeypatch, pool)
    vendors = ("siemens", "ge", "philips", "canon")
    series = pd.DataFrame([{"SeriesInstanceUID": f"2.25.{p}", "PatientID": f"pt-{p}", "vendor": vendors[p % 4],
                            "label": p // 4 % 2, "path": f"volumes/{p}.npz"} for p in range(56)])
    index = {"first": series.iloc[:48], "grown": series}  # one labelled series a vendor × label arrives

    def preprocessed(retrain_work: Path, *a: Any, **k: Any) -> None:
        io.write_parquet(WorkLayout(retrain_work).preprocessed.index, index[pool["hash"]])

    seen: list[dict[str, Any]] = []

    def trained(retrain_work: Path, cfg: Any, *a: Any, **k: Any) -> dict[str, object]:
        layout = WorkLayout(retrain_work)
        resumable = layout.train.state.exists()
        prepare_splits.fn(retrain_work, cfg)  # what the training flow does first
        seen.append({"folds": layout.read_folds().folds, "resumable": resumable})
        io.write_json(layout.train.state, {"key": pool["hash"], "complete": False})  # a training that crashed
        return {"version": str(len(seen)), "promoted": False}

    monkeypatch.setattr(flow, "on_dask", lambda f, address: f)
    monkeypatch.setattr(flow, "ingest", lambda *a, **k: None)
    monkeypatch.setattr(flow, "preprocess", preprocessed)
    monkeypatch.setattr(flow, "train", trained)
    monkeypatch.setattr(flow, "export", lambda *a, **k: {"tensorrt": "skipped: test"})
    monkeypatch.setattr(flow, "open_run", lambda *a, **k: "run")
    monkeypatch.setattr(flow, "tracked", lambda uri, run_id: contextlib.nullcontext(run_id))
    monkeypatch.setattr(flow, "tag_run", lambda *a, **k: None)
    monkeypatch.setattr(flow, "apply_reader_labels", lambda snapshot, retrain_work: {})
    assert flow.retrain.fn(work=work, config=config, trigger="manual")["version"] == "1"
    pool["hash"] = "grown"
    assert flow.retrain.fn(work=work, config=config, trigger="manual")["version"] == "2"
    first, second = ({s: i for i, f in enumerate(run["folds"]) for s in f["val"]} for run in seen)
    assert set(second) == set(series.SeriesInstanceUID)
    assert all(second[s] == fold for s, fold in first.items())  # comparable fold by fold
    stratum = dict(zip(series.SeriesInstanceUID, series.vendor + series.label.astype(str), strict=True))
    for new in series.SeriesInstanceUID.iloc[48:]:  # to a fold with the fewest of its vendor × label
        held = [sum(stratum[s] == stratum[new] for s, fold in first.items() if fold == i) for i in range(4)]
        assert held[second[new]] == min(held), (held, second[new])
    assert seen[1]["resumable"] is False  # the first pool's training state was not left to resume
