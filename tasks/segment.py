"""Segmentation tasks: one library call each; they pass paths, run ids and versions."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import task

from dicomops.config import FeedbackConfig, PreprocessConfig, SegmentConfig
from dicomops.layout import WorkLayout
from dicomops.segmentation import cv
from dicomops.tracking.lineage import ACCEPTED_HASH_TAG, git_commit, lineage_tags


@task(name="open-segmentation-run", retries=2, retry_delay_seconds=[2, 10])
def open_segmentation_run(work: Path, cfg: SegmentConfig, pre: PreprocessConfig, split_hash: str, data_hash: str,
                          tracking_uri: str, experiment: str, artifact_root: Path | None,
                          params: dict[str, object], parent_run_id: str | None, run_tags: dict[str, str]) -> str:
    layout = WorkLayout(work)
    key = cv.run_key(layout, cfg, pre, split_hash, data_hash)
    tags = lineage_tags(accepted_sha256=data_hash) | {"split_sha256": split_hash} | run_tags
    return cv.open_run(layout, key, tracking_uri, experiment, artifact_root, tags, params, parent_run_id)


@task(name="hash-segmenter-labels")
def hash_segmenter_labels(work: Path) -> str:
    """What the segmenter learns from besides the images: labels, nodule records, masks."""
    return cv.labels_sha256(WorkLayout(work))


@task(name="segment-fold", tags=["cpu-heavy"])
def segment_fold(work: Path, cfg: SegmentConfig, pre: PreprocessConfig, fold: int, tracking_uri: str) -> Path:
    return cv.run_fold(WorkLayout(work), cfg, fold, tracking_uri, pre=pre)


@task(name="summarise-segmentation")
def summarise(work: Path, cfg: SegmentConfig, tracking_uri: str) -> dict[str, Any]:
    return cv.summarise(WorkLayout(work), cfg, tracking_uri)


@task(name="train-final-segmenter", tags=["cpu-heavy"])
def train_final(work: Path, cfg: SegmentConfig, tracking_uri: str) -> Path:
    return cv.train_final(WorkLayout(work), cfg, tracking_uri)


# Retries are safe: a retry (or a re-run) finishes the version its first attempt made from this
# run rather than registering the run again (dicomops.tracking.registry.register_model).
@task(name="register-segmenter", retries=2, retry_delay_seconds=[2, 10])
def register(work: Path, cfg: SegmentConfig, pre: PreprocessConfig, tracking_uri: str, data_hash: str,
             split_hash: str, run_tags: dict[str, str]) -> str:
    return cv.register(WorkLayout(work), cfg, pre, tracking_uri, {ACCEPTED_HASH_TAG: data_hash,
                                                                  "split_sha256": split_hash,
                                                                  "git_commit": git_commit()} | run_tags)


@task(name="export-segmenter", tags=["cpu-heavy"])
def export(work: Path, cfg: SegmentConfig, tracking_uri: str, version: str) -> dict[str, Any]:
    return cv.export(WorkLayout(work), cfg, tracking_uri, version)


@task(name="mark-segmentation-complete")
def mark_complete(work: Path, version: str) -> None:
    """After the gate, the last step: a run that fails before it (the export, the gate) resumes with
    the version it registered; one that fails after it would have started afresh and registered a
    second version."""
    cv.mark_complete(WorkLayout(work), version)


@task(name="segmenter-promotion-gate")
def promotion_gate(tracking_uri: str, cfg: SegmentConfig, version: str, work: Path | None = None,
                   feedback_work: Path | None = None, feedback: FeedbackConfig | None = None) -> dict[str, Any]:
    """The gate on CPM; with `feedback_work`, also on the series readers labelled there (as the classifier's)."""
    from dicomops.deid.keys import key_from_settings

    return cv.gate(tracking_uri, cfg, version, work, feedback_work, feedback,
                   key_from_settings() if feedback_work is not None else None)
