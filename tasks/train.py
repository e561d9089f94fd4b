"""Training tasks: one library call each; they pass paths, run ids and versions."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import task

from dicomops.config import (
    FeedbackConfig,
    PreprocessConfig,
    PrivacyConfig,
    TrainConfig,
    load_settings,
)
from dicomops.layout import WorkLayout
from dicomops.tracking import registry
from dicomops.tracking.lineage import ACCEPTED_HASH_TAG, git_commit
from dicomops.training import champion_pool, cv, mlflow_runs
from dicomops.training import state as train_state


@task(name="check-classes")
def check_classes(work: Path) -> None:
    """Refuse, before any fold trains, labelled series all of one class (cv.check_classes)."""
    cv.check_classes(WorkLayout(work).labelled_series())


@task(name="prepare-splits")
def prepare_splits(work: Path, cfg: TrainConfig) -> tuple[Path, str]:
    layout = WorkLayout(work)
    return layout.folds_file, cv.prepare(layout, cfg).sha256


@task(name="release-pool-counts")
def release_pool_counts(work: Path, cfg: PrivacyConfig) -> str:
    """The labelled pool's counts per vendor and label under differential privacy: what every card,
    table and picture of the training shows (free when this pool was released before)."""
    from dicomops.feedback import privacy

    counts = privacy.release_pool(work, cfg, privacy.ledger_for(work, load_settings().privacy_ledger))
    return counts.caption


@task(name="open-training-run", retries=2, retry_delay_seconds=[2, 10])
def open_training_run(work: Path, cfg: TrainConfig, pre: PreprocessConfig, split_hash: str, data_hash: str,
                      tracking_uri: str, experiment: str, artifact_root: Path | None, params: dict[str, object],
                      parent_run_id: str | None, run_tags: dict[str, str]) -> str:
    layout = WorkLayout(work)
    key = train_state.run_key(layout, cfg, pre, split_hash, data_hash)
    return mlflow_runs.open_parent_run(layout, key, tracking_uri, experiment, artifact_root,
                                       cv.training_tags(layout, data_hash, split_hash) | run_tags, params,
                                       parent_run_id)


@task(name="train-fold", tags=["cpu-heavy"])
def train_fold(work: Path, cfg: TrainConfig, slab_slices: int, fold: int, tracking_uri: str) -> Path:
    return cv.run_fold(WorkLayout(work), cfg, slab_slices, fold, tracking_uri)


@task(name="summarise-cross-validation")
def summarise_cv(work: Path, cfg: TrainConfig, tracking_uri: str) -> dict[str, Any]:
    return cv.summarise(WorkLayout(work), cfg, tracking_uri)


@task(name="leave-one-vendor-out", tags=["cpu-heavy"])
def leave_one_vendor_out(work: Path, cfg: TrainConfig, slab_slices: int, tracking_uri: str) -> dict[str, float]:
    table = cv.leave_one_vendor_out(WorkLayout(work), cfg, slab_slices, tracking_uri)
    return {str(r.held_out_vendor): float(r.auc) for r in table.itertuples()}


@task(name="train-final-model", tags=["cpu-heavy"])
def train_final_model(work: Path, cfg: TrainConfig, slab_slices: int, tracking_uri: str) -> Path:
    return cv.train_final(WorkLayout(work), cfg, slab_slices, tracking_uri)


# Retries are safe: a retry (or a re-run) finishes the version its first attempt made from this
# training's run rather than registering the run again (dicomops.tracking.registry.register_model).
@task(name="register-model", retries=2, retry_delay_seconds=[2, 10])
def register_model(work: Path, cfg: TrainConfig, pre: PreprocessConfig, tracking_uri: str, data_hash: str,
                   split_hash: str, run_tags: dict[str, str]) -> str:
    return cv.register(WorkLayout(work), cfg, pre, tracking_uri,
                       {ACCEPTED_HASH_TAG: data_hash, "split_sha256": split_hash,
                        "git_commit": git_commit()} | run_tags)


@task(name="mark-training-complete")
def mark_training_complete(work: Path, version: str) -> None:
    """After the training's last step: a later run with the same key trains afresh; before it, resumes."""
    train_state.mark_complete(WorkLayout(work), version)


@task(name="store-monitoring-reference", tags=["cpu-heavy"], retries=1, retry_delay_seconds=[5])
def store_reference(work: Path, tracking_uri: str, model_name: str, version: str) -> str:
    """Training features scored by the new version, kept with it for the drift monitor."""
    from dicomops.monitoring.stage import reference_for_version

    return reference_for_version(work, tracking_uri, model_name, version)


@task(name="promotion-gate")
def promotion_gate(tracking_uri: str, cfg: TrainConfig, version: str, work: Path | None = None,
                   feedback_work: Path | None = None, feedback: FeedbackConfig | None = None) -> dict[str, Any]:
    """The gate; with `feedback_work`, also on the series readers labelled there (dicomops.feedback.gate)."""
    readers = None
    if work is not None and feedback_work is not None:
        from dicomops.deid.keys import key_from_settings
        from dicomops.feedback.gate import readers_for

        readers = readers_for(work, feedback_work, cfg.model_name, feedback or FeedbackConfig(), key_from_settings())
    # The champion on this version's pool: after a retrain its own CV figures are of another pool.
    pool = champion_pool.pool_for(work, tracking_uri, cfg.model_name) if work is not None else None
    decision = registry.apply_promotion_gate(tracking_uri, cfg.model_name, version, margin=cfg.promotion_margin,
                                             vendor_tolerance=cfg.vendor_tolerance, min_auc=cfg.min_auc,
                                             readers=readers,
                                             min_reader_series=(feedback or FeedbackConfig()).min_cases, pool=pool)
    return {"promoted": decision.promote, "decision": decision.label, "reasons": list(decision.reasons)}
