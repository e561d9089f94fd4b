"""Where a cross-validation stands, in ``WORK/train/state.json``, so that a killed run resumes into
the same MLflow runs: finished folds are skipped, an interrupted fold continues from its checkpoint.

The record holds the run key (what the training depends on), the parent run, one entry per fold
(its nested run, whether it finished, its best epoch), the registered version once registered, and
whether the training is complete (after its promotion gate).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from typing import Any

from dicomops import io
from dicomops.config import PreprocessConfig, TrainConfig
from dicomops.layout import WorkLayout
from dicomops.tracking.promotion import model_settings


def run_key(layout: WorkLayout, cfg: TrainConfig, pre: PreprocessConfig, split_hash: str, data_hash: str) -> str:
    """What a training depends on: settings, split, data and labels. Same key, same training to resume.

    `data_hash` covers the DICOM files only, and readers' labels change without changing one: the
    labels the training learns from (:func:`labels_sha256`) are part of the key, so that a resumed
    run never pools folds scored on the old labels with folds trained on the new. The gate's
    settings are not: they change no model (:func:`dicomops.tracking.promotion.model_settings`)."""
    blob = json.dumps({"train": model_settings(cfg), "pre": pre.model_dump(mode="json"),
                       "split": split_hash, "data": data_hash, "labels": labels_sha256(layout)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def labels_sha256(layout: WorkLayout) -> str:
    """The sha256 of every labelled series' label (:meth:`WorkLayout.labelled_series`), in series order."""
    series = layout.labelled_series().sort_values("SeriesInstanceUID")
    pairs = [[str(uid), int(label)] for uid, label in zip(series.SeriesInstanceUID, series.label, strict=True)]
    return hashlib.sha256(json.dumps(pairs).encode()).hexdigest()


def load_state(layout: WorkLayout) -> dict[str, Any]:
    path = layout.train.state
    return io.read_json(path) if path.exists() else {}


def save_state(layout: WorkLayout, state: dict[str, Any]) -> None:
    io.write_json(layout.train.state, state)


def resumable_run(layout: WorkLayout, key: str) -> str | None:
    """The parent run of an unfinished training with the same key, if there is one."""
    state = load_state(layout)
    return str(state["parent_run_id"]) if state.get("key") == key and not state.get("complete") else None


def start_fresh(layout: WorkLayout, key: str, parent_run_id: str, experiment: str) -> None:
    """A new training: forget the old state and its checkpoints (they must not be resumed)."""
    for stale in layout.train.root.glob("*"):
        if stale.is_dir():
            shutil.rmtree(stale)
    save_state(layout, {"key": key, "parent_run_id": parent_run_id, "experiment": experiment, "folds": {},
                        "complete": False})


def parent_run(layout: WorkLayout) -> str:
    state = load_state(layout)
    if "parent_run_id" not in state:
        raise ValueError(f"{layout.train.state} has no training run; run 'dicomops train --work {layout.root}'")
    return str(state["parent_run_id"])


def fold_entry(layout: WorkLayout, fold: int) -> dict[str, Any]:
    return dict(load_state(layout).get("folds", {}).get(str(fold), {}))


def update_fold(layout: WorkLayout, fold: int, **values: Any) -> None:
    state = load_state(layout)
    state.setdefault("folds", {}).setdefault(str(fold), {}).update(values)
    save_state(layout, state)


def best_epochs(layout: WorkLayout, n_splits: int) -> list[int]:
    folds = load_state(layout)["folds"]
    return [int(folds[str(i)]["best_epoch"]) for i in range(n_splits)]


def record_version(layout: WorkLayout, version: str) -> None:
    """The version this training registered: a re-run after a crash in a later step (the monitoring
    reference, the gate) goes on with it instead of training and registering again."""
    state = load_state(layout)
    state["version"] = version
    save_state(layout, state)


def registered_version(layout: WorkLayout) -> str | None:
    """The version this (unfinished) training registered, if it got that far."""
    version = load_state(layout).get("version")
    return None if version is None else str(version)


def mark_complete(layout: WorkLayout, version: str) -> None:
    """Registered, referenced and gated: a later run with the same key starts afresh. Only after the
    training's last step, so that a crash before it resumes instead."""
    state = load_state(layout)
    state.update({"complete": True, "version": version})
    save_state(layout, state)
