"""Where a cross-validation stands, in ``WORK/train/state.json``, so that a killed run resumes into
the same MLflow runs: finished folds are skipped, an interrupted fold continues from its checkpoint.

The record holds the run key (what the training depends on), the parent run, one entry per fold
(its nested run, whether it finished, its best epoch), and the registered version once complete.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from typing import Any

from dicomops import io
from dicomops.config import PreprocessConfig, TrainConfig
from dicomops.layout import WorkLayout


def run_key(cfg: TrainConfig, pre: PreprocessConfig, split_hash: str, data_hash: str) -> str:
    """What a training depends on: settings, split and data. Same key, same training to resume."""
    blob = json.dumps({"train": cfg.model_dump(mode="json"), "pre": pre.model_dump(mode="json"),
                       "split": split_hash, "data": data_hash}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


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


def mark_complete(layout: WorkLayout, version: str) -> None:
    state = load_state(layout)
    state.update({"complete": True, "version": version})
    save_state(layout, state)
