"""The segmentation flow: the classifier's folds → one segmenter per fold → FROC/Dice/kappa summary →
final segmenter → registry → ONNX with parity → promotion gate on CPM."""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from dicomops.config import (
    FeedbackConfig,
    PreprocessConfig,
    PrivacyConfig,
    SegmentConfig,
    TrainConfig,
    load_settings,
)
from dicomops.segmentation import cv
from dicomops.stages import decided_under
from dicomops.tracking import flatten_params
from dicomops.tracking.promotion import gate_settings, model_settings
from flows.scope import tracked, writing
from tasks import segment as s
from tasks import stages
from tasks.preprocess import check_made_from, hash_accepted_corpus
from tasks.train import prepare_splits, release_pool_counts


@flow(name="dicomops-segment", log_prints=True)
def segment(work: Path | None = None, config: SegmentConfig = SegmentConfig(),
            preprocess_config: PreprocessConfig = PreprocessConfig(), train_config: TrainConfig = TrainConfig(),
            experiment: str = "dicomops", parent_run_id: str | None = None,
            run_tags: dict[str, str] | None = None, privacy_config: PrivacyConfig = PrivacyConfig(),
            feedback_work: Path | None = None, feedback_config: FeedbackConfig | None = None) -> dict[str, object]:
    """Cross-validate the nodule segmenter in the classifier's folds, train, register and gate it (with
    `feedback_work`, a retrain's, also on the series readers labelled there)."""
    settings = load_settings()
    work = Path(work or settings.work_dir)
    uri = settings.mlflow_tracking_uri
    with writing(work, "dicomops-segment", settings):
        data_hash = hash_accepted_corpus(work)
        # Never learn from what an earlier corpus left: its hash would go on this model.
        check_made_from(work, data_hash)
        _, split_hash = prepare_splits(work, train_config)
        # The labels, nodule records and masks too: readers correct them without changing a file.
        # Not the gate's settings: changed alone, they gate the registered version again.
        key = stages.stage_key("segment", {"data": data_hash, "labels": s.hash_segmenter_labels(work),
                                           "split": split_hash, "segment": model_settings(config),
                                           "preprocess": preprocess_config.model_dump(mode="json"),
                                           "tags": run_tags or {}})
        gate = gate_settings(config)
        if (cached := stages.registered(work, "segment", key, uri, config.model_name)) is not None:
            if not decided_under(cached, gate):  # the gate's settings changed, or it could not decide
                decision = s.promotion_gate(uri, config, str(cached["version"]), work, feedback_work, feedback_config)
                cached = stages.gated_again(work, "segment", key, cached, gate, decision)
            print(f"segment: data, split, model settings and code unchanged; version {cached['version']} stands "
                  f"({cached.get('decision', 'as recorded')}), skipped")
            return {**cached, "skipped": True}
        stages.started(work, "segment")
        params = flatten_params({"segment": config.model_dump(mode="json"),
                                 "preprocess": preprocess_config.model_dump(mode="json")})
        run_id = s.open_segmentation_run(work, config, preprocess_config, split_hash, data_hash, uri, experiment,
                                         settings.mlflow_artifact_root, params, parent_run_id, run_tags or {})
        with tracked(uri, run_id):
            print(f"segment: {release_pool_counts(work, privacy_config)}")
            for fold in range(train_config.n_splits):
                s.segment_fold(work, config, preprocess_config, fold, uri)
            summary = s.summarise(work, config, uri)
            s.train_final(work, config, uri)
            version = s.register(work, config, preprocess_config, uri, data_hash, split_hash, run_tags or {})
            exported = s.export(work, config, uri, version)
            decision = s.promotion_gate(uri, config, version, work, feedback_work, feedback_config)
            s.mark_complete(work, version)
        print(f"segment: {cv.describe(summary)}; version {version} {decision['decision']}: "
              f"{'; '.join(decision['reasons'])}")
        result: dict[str, object] = {"mlflow_run_id": run_id, "version": version, "cpm": summary["cpm"],
                                     "vendor_cpm": summary["vendor_cpm"], "dice_ge6": summary["dice_ge6_mean"],
                                     "dice_ge6_native": summary["dice_ge6_native_mean"],
                                     "kappa_series": summary["kappa_series"],
                                     "actionable_auc": summary["actionable_auc"],
                                     "vendor_actionable_auc": summary["vendor_actionable_auc"], "promoted": decision["promoted"],
                                     "decision": decision["decision"], "work": str(work),
                                     "onnx_sha256": exported["export.onnx.sha256"], "gate": gate}
        stages.done(work, "segment", key, result)
    return {**result, "skipped": False}
