"""The cross-validation's MLflow side: the parent run, one nested run per fold or held-out vendor,
per-epoch metric batches, and the tables and pictures attached to the parent.

Runs are passed by id; every nested run ends FINISHED or FAILED, whatever interrupts it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from dicomops import progress
from dicomops.layout import WorkLayout
from dicomops.tracking import runs
from dicomops.training import state as train_state

StepLogger = Callable[[int, dict[str, float]], None]
log = logging.getLogger(__name__)


def open_parent_run(layout: WorkLayout, key: str, tracking_uri: str, experiment: str, artifact_root: Path | None,
                    tags: dict[str, str], params: dict[str, object], parent_run_id: str | None) -> str:
    """The cross-validation's parent run: the unfinished one with the same key, or a new one.

    An unfinished training whose runs this MLflow store lacks (the store moved to a server, or a run
    was deleted in the UI) starts afresh, with a warning: nothing can be resumed into a run that is
    not there, and the user asked for a training, not for the old store."""
    if (run_id := train_state.resumable_run(layout, key)) is not None:
        client = runs.configure_mlflow(tracking_uri)
        recorded = [run_id, *(str(f["run_id"]) for f in train_state.load_state(layout).get("folds", {}).values()
                              if f.get("run_id"))]
        if not (gone := [r for r in recorded if not run_exists(client, r)]):
            client.update_run(run_id, status="RUNNING")
            return run_id
        log.warning("%s names an unfinished training whose run(s) %s the MLflow store at MLFLOW_TRACKING_URI "
                    "lacks (another store, or deleted): the training starts afresh in this store, and that "
                    "training's checkpoints are removed", layout.train.state, ", ".join(gone))
    run_id = runs.start_run(tracking_uri, experiment, artifact_root, run_name="train", tags=tags,
                            params=params, parent_run_id=parent_run_id)
    train_state.start_fresh(layout, key, run_id, experiment)
    return run_id


def run_exists(client: Any, run_id: str) -> bool:
    """Whether `run_id` is in the store and not deleted. Any failure but "no such run" raises: an
    outage must never read as a missing run (the training would start afresh and lose its checkpoints)."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, ErrorCode

    try:
        run = client.get_run(run_id)
    except MlflowException as err:
        if err.error_code == ErrorCode.Name(RESOURCE_DOES_NOT_EXIST):
            return False
        raise
    return bool(run.info.lifecycle_stage != "deleted")


def create_nested_run(tracking_uri: str, parent: str, name: str, tags: dict[str, str]) -> str:
    client = runs.configure_mlflow(tracking_uri)
    experiment_id = client.get_run(parent).info.experiment_id
    return str(client.create_run(experiment_id, run_name=name, tags={"mlflow.parentRunId": parent, **tags}).info.run_id)


def fold_run(layout: WorkLayout, tracking_uri: str, fold: int) -> str:
    """The fold's nested run: the one a killed run left behind (reopened), or a new one, with the
    series it trains on and is scored on as its MLflow dataset inputs."""
    run_id = train_state.fold_entry(layout, fold).get("run_id")
    if run_id is not None:
        runs.configure_mlflow(tracking_uri).update_run(run_id, status="RUNNING")
        return str(run_id)
    folds = layout.read_folds()
    run_id = create_nested_run(tracking_uri, train_state.parent_run(layout), f"fold-{fold}", {
        "fold": str(fold), runs.DESCRIPTION_TAG: (
            f"Fold {fold} of {folds.n_splits}: trained on the other folds' series, scored on this fold's "
            f"{len(folds.val(fold))} (see Datasets; the split is the parent run's cv/folds.json).")})
    log_split_inputs(layout, tracking_uri, run_id, {"training": folds.train(fold), "validation": folds.val(fold)},
                     f"fold-{fold}")
    train_state.update_fold(layout, fold, run_id=run_id, done=False)
    return run_id


def log_split_inputs(layout: WorkLayout, tracking_uri: str, run_id: str, parts: dict[str, list[str]],
                     prefix: str) -> None:
    """Each part of a split (context → series) as an MLflow dataset input of `run_id`: the series
    pseudonyms, vendors and labels, with the de-identified corpus as its source and the source
    corpus's DVC md5 in its name, so the run's Datasets panel says what it learned from."""
    import warnings

    from mlflow.data.pandas_dataset import from_pandas
    from mlflow.entities import DatasetInput, InputTag

    from dicomops.ingest import source_dvc_md5

    series = layout.labelled_series().set_index("SeriesInstanceUID")[["vendor", "label"]]
    md5 = source_dvc_md5(layout.root)
    data = f"data {md5.removesuffix('.dir')[:8]}" if md5 else "data"
    source = layout.ingest.deid.resolve().as_uri()
    inputs = []
    for context, ids in parts.items():
        frame = series.loc[list(ids)].reset_index()
        # MLflow warns that a file URI "can be interpreted in multiple ways" (all of them local) and
        # that an integer label column cannot hold missing values (it never does): not for the log.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            dataset = from_pandas(frame, source=source, targets="label", name=f"{prefix} {context} ({data})")
            entity = dataset._to_mlflow_entity()
        inputs.append(DatasetInput(entity, tags=[InputTag("mlflow.data.context", context)]))
    runs.configure_mlflow(tracking_uri).log_inputs(run_id, datasets=inputs)


@contextmanager
def closing(tracking_uri: str, run_id: str) -> Iterator[str]:
    """End `run_id` FINISHED when the block completes, FAILED on any exception or interrupt."""
    client = runs.configure_mlflow(tracking_uri)
    try:
        yield run_id
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")


def step_logger(tracking_uri: str, run_id: str, prefix: str = "", *, label: str = "", epochs: int = 0) -> StepLogger:
    """A callback for the training loop: one metric batch per epoch, and with a `label` one line of
    progress in the flow run's log (``label: epoch e/epochs, loss …``)."""
    def log(epoch: int, metrics: dict[str, float]) -> None:
        runs.log_metrics(tracking_uri, run_id, {f"{prefix}{m}": v for m, v in metrics.items()}, step=epoch)
        if label:
            progress.epoch(label, epoch, epochs, metrics)

    return log


def log_results(tracking_uri: str, run_id: str, metrics: dict[str, float], files: list[Path],
                artifact_path: str | None = None, tags: dict[str, str] | None = None) -> None:
    """Metrics in one batch, files as artifacts, tags."""
    if metrics:
        runs.log_metrics(tracking_uri, run_id, metrics)
    if files:
        runs.log_artifacts(tracking_uri, run_id, files, artifact_path)
    if tags:
        runs.set_tags(tracking_uri, run_id, tags)
