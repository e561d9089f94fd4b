"""An alert-triggered retrain checks the cooldown again once it holds the retrain lock: another
alert's retrain that took the lock first has recorded its start by then, and a second retrain
right behind it would defeat the cooldown (a retrain storm on a burst of alerts)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import flows.retrain as flow
from dicomops.config import PipelineConfig
from dicomops.monitoring import guard


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
    monkeypatch.setattr(flow, "_retrain", lambda *a, **k: trained.append(a) or {"status": "retrained", "version": "9"})
    result = flow.retrain.fn(work=work, config=config, trigger="feedback", monitoring_run_id="run-of-this-one")
    assert result["status"] == "skipped" and "cooldown" in str(result["reason"]), result
    assert trained == []
    # A manual retrain is not rate limited, lock or not.
    assert flow.retrain.fn(work=work, config=config, trigger="manual")["status"] == "retrained"
