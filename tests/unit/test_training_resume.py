"""Resuming a training: the same model as an uninterrupted one, the same labels, the same early stop,
a registration that a retry finishes instead of repeating, and a state file naming a run the
MLflow store lacks."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import mlflow
from dicomops import io
from dicomops.config import PreprocessConfig, TrainConfig
from dicomops.layout import WorkLayout
from dicomops.tracking import registry
from dicomops.training import cv, mlflow_runs
from dicomops.training import state as train_state
from dicomops.training.loop import fit, load_checkpoint, save_checkpoint
from tests.toy_slabs import toy_slabs

CFG = TrainConfig(epochs=3, input_size=32, batch_size=16, patience=5, precision="fp32", num_workers=0)


def _max_difference(a: torch.nn.Module, b: torch.nn.Module) -> float:
    return max(float((p - q).abs().max()) for p, q in zip(a.state_dict().values(), b.state_dict().values(),
                                                            strict=True) if p.is_floating_point())


# With a worker, its augmentation seeds must follow too; with a moving average of the weights, the
# average (train.ema_decay) resumes as well; with batch norm's statistics recomputed before each
# validation (train.precise_bn), the same subset of slabs gives them; with the auxiliary localisation
# head (train.aux_mask_weight), the head and its optimiser state resume too.
@pytest.mark.parametrize(("workers", "ema_decay", "precise_bn", "aux"),
                         [(0, 0.0, 0, 0.0), (1, 0.0, 0, 0.0), (0, 0.9, 0, 0.0), (0, 0.0, 24, 0.0), (0, 0.0, 0, 1.0)])
def test_a_training_interrupted_after_an_epoch_and_resumed_gives_the_uninterrupted_weights(
        tmp_path: Path, workers: int, ema_decay: float, precise_bn: int, aux: float) -> None:
    cfg = CFG.model_copy(update={"num_workers": workers, "ema_decay": ema_decay, "precise_bn": precise_bn,
                                 "aux_mask_weight": aux})
    train, val = toy_slabs(64, 0, masks=aux > 0), toy_slabs(32, 1)
    whole = fit(train, val, cfg, tmp_path / "a.pt", seed=1)
    with pytest.raises(InterruptedError):
        fit(train, val, cfg, tmp_path / "b.pt", seed=1, stop_after=1)
    resumed = fit(train, val, cfg, tmp_path / "b.pt", seed=1)
    assert resumed.resumed_from == 1
    assert [h["train_loss"] for h in resumed.history] == [h["train_loss"] for h in whole.history]
    assert [h["val_slice_auc"] for h in resumed.history] == [h["val_slice_auc"] for h in whole.history]
    assert _max_difference(whole.model, resumed.model) == 0.0


def test_a_checkpoint_without_the_generator_states_still_resumes_and_says_the_result_will_differ(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    train, val = toy_slabs(64, 0), toy_slabs(32, 1)
    with pytest.raises(InterruptedError):
        fit(train, val, CFG, tmp_path / "old.pt", seed=1, stop_after=1)
    state = load_checkpoint(tmp_path / "old.pt")
    assert state is not None and "generators" in state
    generators = state.pop("generators")
    assert isinstance(generators, dict)
    state["rng"] = generators["torch"]  # what a checkpoint from before the states were kept holds
    save_checkpoint(tmp_path / "old.pt", state)
    with caplog.at_level(logging.WARNING, logger="dicomops.training.loop"):
        resumed = fit(train, val, CFG, tmp_path / "old.pt", seed=1)
    assert resumed.resumed_from == 1 and resumed.epochs_run == 3
    assert "will differ from an uninterrupted" in caplog.text


def test_a_fold_that_stopped_early_does_not_train_on_when_resumed(tmp_path: Path) -> None:
    # Validation labels unrelated to the slabs: the AUC wanders and patience 1 stops it early.
    train, val = toy_slabs(64, 0), toy_slabs(32, 2, signal=False)
    cfg = CFG.model_copy(update={"epochs": 10, "patience": 1})
    first = fit(train, val, cfg, tmp_path / "c.pt", seed=1)
    assert first.epochs_run < 10  # stopped early
    # Killed after the early stop's checkpoint, while the fold's series were scored: the re-run.
    again = fit(train, val, cfg, tmp_path / "c.pt", seed=1)
    assert (again.epochs_run, again.best_epoch, again.resumed_from) == (first.epochs_run, first.best_epoch,
                                                                        first.epochs_run)
    assert len(again.history) == len(first.history)
    assert _max_difference(first.model, again.model) == 0.0


def _index(layout: WorkLayout, labels: list[int]) -> None:
    rows = [{"SeriesInstanceUID": f"S{i}", "PatientID": f"P{i}", "vendor": ["ge", "siemens"][i % 2],
             "label": label, "path": f"v{i}"} for i, label in enumerate(labels)]
    layout.preprocessed.root.mkdir(parents=True, exist_ok=True)
    io.write_parquet(layout.preprocessed.index, pd.DataFrame(rows))


def test_changed_labels_change_the_resume_key_so_no_run_resumes_across_them(tmp_path: Path) -> None:
    layout = WorkLayout(tmp_path)
    labels = [0, 1] * 8
    _index(layout, labels)
    pre = PreprocessConfig()
    key = train_state.run_key(layout, CFG, pre, "split", "data")
    assert train_state.run_key(layout, CFG, pre, "split", "data") == key
    train_state.start_fresh(layout, key, "parent-run", "exp")
    assert train_state.resumable_run(layout, key) == "parent-run"
    labels[3] = 0  # a reader corrected one series after the crash
    _index(layout, labels)
    changed = train_state.run_key(layout, CFG, pre, "split", "data")
    assert changed != key
    assert train_state.resumable_run(layout, changed) is None


def test_the_gate_settings_are_not_in_the_resume_key(tmp_path: Path) -> None:
    layout = WorkLayout(tmp_path)
    _index(layout, [0, 1] * 8)
    pre = PreprocessConfig()
    key = train_state.run_key(layout, CFG, pre, "split", "data")
    gate = CFG.model_copy(update={"promotion_margin": 0.02, "min_auc": 0.6, "vendor_tolerance": 0.1})
    assert train_state.run_key(layout, gate, pre, "split", "data") == key  # a changed margin resumes
    assert train_state.run_key(layout, CFG.model_copy(update={"epochs": 4}), pre, "split", "data") != key


@pytest.mark.parametrize("labels", [[0] * 16, [1] * 16])
def test_labelled_series_all_of_one_class_are_refused_before_any_training(labels: list[int]) -> None:
    series = pd.DataFrame({"SeriesInstanceUID": [f"S{i}" for i in range(16)], "label": labels})
    present, missing = ("negative", "positive") if labels[0] == 0 else ("positive", "negative")
    with pytest.raises(ValueError, match=rf"every labelled series is {present}: a classifier needs {missing} series"
                                         rf".*threshold are undefined.*label {1 - labels[0]} in its labels.csv"):
        cv.check_classes(series)
    cv.check_classes(series.assign(label=[0, 1] * 8))  # both: trains


def test_leave_one_vendor_out_on_one_vendor_is_refused_before_any_training(tmp_path: Path) -> None:
    layout = WorkLayout(tmp_path)
    rows = [{"SeriesInstanceUID": f"S{i}", "PatientID": f"P{i}", "vendor": "ge", "label": i % 2, "path": f"v{i}"}
            for i in range(16)]
    layout.preprocessed.root.mkdir(parents=True, exist_ok=True)
    io.write_parquet(layout.preprocessed.index, pd.DataFrame(rows))
    cfg = CFG.model_copy(update={"leave_one_vendor_out": True})
    with pytest.raises(ValueError, match=r"at least two vendors.*only ge.*--leave-one-vendor-out"):
        cv.prepare(layout, cfg)
    assert not layout.folds_file.exists()
    assert cv.prepare(layout, CFG).n_splits == 4  # without it, one vendor trains


@pytest.fixture()
def tracking(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def test_a_state_naming_a_run_this_store_lacks_starts_afresh_and_says_why(
        tmp_path: Path, tracking: str, caplog: pytest.LogCaptureFixture) -> None:
    layout = WorkLayout(tmp_path / "work")
    other = f"sqlite:///{tmp_path / 'other.db'}"
    first = mlflow_runs.open_parent_run(layout, "key", other, "exp", tmp_path / "art", {}, {}, None)
    stale = layout.train.fold(0) / "checkpoint.pt"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"old")
    # Moved to another store (a server): the run key matches, the run is not there.
    with caplog.at_level(logging.WARNING, logger="dicomops.training.mlflow_runs"):
        run = mlflow_runs.open_parent_run(layout, "key", tracking, "exp", tmp_path / "art", {}, {}, None)
    assert run != first
    assert mlflow.tracking.MlflowClient(tracking).get_run(run).info.status == "RUNNING"
    assert train_state.load_state(layout)["parent_run_id"] == run and not stale.exists()
    assert first in caplog.text and "starts afresh" in caplog.text and str(layout.train.state) in caplog.text
    # A fold run deleted in the UI likewise: nothing can be resumed into it.
    fold = mlflow_runs.create_nested_run(tracking, run, "fold-0", {})
    train_state.update_fold(layout, 0, run_id=fold, done=True)
    mlflow.tracking.MlflowClient(tracking).delete_run(fold)
    again = mlflow_runs.open_parent_run(layout, "key", tracking, "exp", tmp_path / "art", {}, {}, None)
    assert again not in (run, first) and train_state.fold_entry(layout, 0) == {}
    # The run still there: resumed, as before.
    assert mlflow_runs.open_parent_run(layout, "key", tracking, "exp", tmp_path / "art", {}, {}, None) == again


def test_a_registration_retried_after_the_version_was_created_finishes_that_version(tmp_path: Path,
                                                                                    tracking: str) -> None:
    client = mlflow.tracking.MlflowClient(tracking)
    parent = mlflow_runs.open_parent_run(WorkLayout(tmp_path / "work"), "key", tracking, "exp", tmp_path / "art",
                                         {}, {}, None)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2)).eval()
    example = np.zeros((2, 4), dtype=np.float32)
    calls = []

    def card(version: str) -> str:
        calls.append(version)
        if len(calls) == 1:
            raise ConnectionError("registry briefly unavailable")  # after MLflow created the version
        return f"card of {version}"

    with pytest.raises(ConnectionError):
        registry.register_model(tracking, parent, model, example, "retry-model", card, {"cv.mean_auc": "0.9"})
    version = registry.register_model(tracking, parent, model, example, "retry-model", card, {"cv.mean_auc": "0.9"})
    versions = client.search_model_versions("name='retry-model'")
    assert [str(v.version) for v in versions] == [version] == calls[1:]  # one version, not an orphan beside it
    finished = client.get_model_version("retry-model", version)
    assert finished.description == f"card of {version}" and finished.tags["cv.mean_auc"] == "0.9"
    assert str(client.get_model_version_by_alias("retry-model", "challenger").version) == version
