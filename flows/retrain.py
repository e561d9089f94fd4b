"""Alert-driven retraining: all labelled data (the original corpus, monitored batches whose labels
have arrived and reviewed clinical series, with readers' labels in place of earlier ones) → ingest → preprocess → cross-validated training → export → promotion gate,
then the segmenter on the same pool and its own gate (unless ``segment.enabled`` is off), every run
tagged with its cause. A cooldown per model and a lock stop retrain storms."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

from prefect import flow

from dicomops.config import PipelineConfig, load_settings
from dicomops.layout import WorkLayout
from dicomops.monitoring import guard
from dicomops.monitoring.stage import (
    check_training_source,
    combine_sources,
    labelled_sources,
    reset_retrain_work,
    retrain_folders,
    split_retrain_pool,
)
from flows.export import export
from flows.ingest import ingest
from flows.preprocess import preprocess
from flows.runners import on_dask
from flows.scope import tracked, writing
from flows.segment import segment
from flows.train import train
from tasks.feedback import apply_reader_labels, readers_source
from tasks.monitor import tag_run, version_pool
from tasks.tracking import hash_corpus, open_run


@flow(name="dicomops-retrain", log_prints=True)
def retrain(work: Path | None = None, config: PipelineConfig = PipelineConfig(), trigger: str = "manual",
            monitoring_run_id: str = "") -> dict[str, object]:
    """Retrain `config.train.model_name` on every labelled source; skip (and say why) inside the
    cooldown, or when an alert finds the labelled pool the last retrain learned from (nothing new)."""
    settings = load_settings()
    work = Path(work or settings.work_dir)
    uri, name = settings.mlflow_tracking_uri, config.train.model_name
    check_training_source(config.monitor.training_source)  # before the cooldown is taken
    alert = trigger in ("drift", "feedback")  # alert-driven: one cooldown and one lock for both
    verdict = guard.check_cooldown(work, name, config.monitor.cooldown_hours) if alert \
        else guard.Verdict(True, f"trigger={trigger} is not rate limited")
    if not verdict.go:
        print(f"retrain {verdict.reason}")
        return {"status": "skipped", "reason": verdict.reason}
    try:
        with writing(work, "dicomops-retrain", settings), guard.retrain_lock(work):
            # Again under the lock: an alert's retrain that took it meanwhile has recorded its start.
            verdict = guard.check_cooldown(work, name, config.monitor.cooldown_hours) if alert else verdict
            if not verdict.go:
                print(f"retrain {verdict.reason}")
                return {"status": "skipped", "reason": verdict.reason}
            print(f"retrain: {verdict.reason}")
            sources = labelled_sources(work, config.monitor.training_source)
            # The readers' version, copied for this retrain: a feedback pass meanwhile cannot change it.
            readers, snapshot, clinical = readers_source(work, config.feedback, sources,
                                                         WorkLayout(work).retrain_readers)
            sources += [clinical] if clinical else []  # reviewed clinical series no other source holds
            src, retrain_work = retrain_folders(work)
            src = combine_sources(sources, src)
            data_hash = hash_corpus(src)
            pool = guard.pool_identity(data_hash, hash_corpus(snapshot))
            if alert and (same := guard.same_pool(work, name, pool)):
                print(f"retrain {same}")
                return {"status": "skipped", "reason": same}
            print(f"retrain: {reset_retrain_work(work, pool)}")
            # A retrain that fails gives the cooldown back: the next alert retrains, and says why.
            with guard.cooldown_taken(work, name, monitoring_run_id, trigger) if alert else nullcontext():
                result = _retrain(work, config, uri, settings.mlflow_artifact_root, trigger, monitoring_run_id,
                                  len(sources), src, data_hash, retrain_work, readers, snapshot)
                guard.record_pool(work, name, pool, str(result["version"]))
            return result
    except guard.RetrainLocked as err:
        print(f"retrain {err}")
        return {"status": "skipped", "reason": str(err)}


def _retrain(work: Path, config: PipelineConfig, uri: str, artifact_root: Path | None, trigger: str,
             monitoring_run_id: str, n_sources: int, src: Path, data_hash: str, retrain_work: Path,
             readers: dict[str, str], snapshot: Path) -> dict[str, object]:
    cause = {"trigger": trigger, "monitoring_run_id": monitoring_run_id, "retrain.sources": str(n_sources)}
    run_id = open_run(uri, config.experiment, artifact_root, "retrain", data_hash,
                      {"retrain.sources": n_sources, "retrain.trigger": trigger})
    with tracked(uri, run_id):
        # The pool as DVC records it, so that the versions registered below can be retrained from it.
        cause |= version_pool(uri, run_id, src)
        tag_run(uri, run_id, cause)
        on_dask(ingest, config.ingest.dask_address)(
            src, retrain_work, config.ingest, config.experiment, parent_run_id=run_id)
        # Readers' labels override the earlier ones (the same pseudonymous series UIDs on both sides).
        tag_run(uri, run_id, readers | apply_reader_labels(snapshot, retrain_work))
        on_dask(preprocess, config.preprocess.dask_address)(
            retrain_work, config.preprocess, config.experiment, parent_run_id=run_id)
        # The pool's own split: the earlier retrain's folds carried over, the new series assigned.
        print(f"retrain: {split_retrain_pool(retrain_work, config.train.n_splits, config.train.seed)}")
        trained = train(retrain_work, config.train, config.preprocess, config.experiment, parent_run_id=run_id,
                        run_tags=cause, feedback_work=work, feedback_config=config.feedback,
                        privacy_config=config.ingest.privacy)
        exported = export(retrain_work, config.export, config.train.model_name, version=str(trained["version"]))
        # The segmenter learns from the same labelled pool and is gated on its own metric (CPM).
        segmented = (segment(retrain_work, config.segment, config.preprocess, config.train, config.experiment,
                             parent_run_id=run_id, run_tags=cause, privacy_config=config.ingest.privacy,
                             feedback_work=work, feedback_config=config.feedback)
                     if config.segment.enabled else {})
    print(f"retrain ({trigger}): version {trained['version']} from {n_sources} labelled source(s), "
          f"{'promoted' if trained['promoted'] else 'awaiting review'}; tensorrt: {exported['tensorrt']}"
          + (f"; segmenter version {segmented['version']}, {segmented['decision']}" if segmented else ""))
    return {"status": "retrained", "mlflow_run_id": run_id, "version": trained["version"],
            "promoted": trained["promoted"], "sources": n_sources, "work": str(retrain_work),
            "segmenter_version": segmented.get("version"), "segmenter_promoted": segmented.get("promoted")}
