"""The training flow: folds → cross-validation summary → final model → registry → promotion gate."""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from dicomops.config import (
    FeedbackConfig,
    PreprocessConfig,
    PrivacyConfig,
    TrainConfig,
    load_settings,
)
from dicomops.stages import decided_under
from dicomops.tracking import flatten_params
from dicomops.tracking.promotion import gate_settings, model_settings
from flows.scope import tracked, writing
from tasks import stages
from tasks import train as t
from tasks.preprocess import check_made_from, hash_accepted_corpus, hash_labels


@flow(name="dicomops-train", log_prints=True)
def train(work: Path | None = None, config: TrainConfig = TrainConfig(),
          preprocess_config: PreprocessConfig = PreprocessConfig(), experiment: str = "dicomops",
          parent_run_id: str | None = None, run_tags: dict[str, str] | None = None,
          feedback_work: Path | None = None, feedback_config: FeedbackConfig | None = None,
          privacy_config: PrivacyConfig = PrivacyConfig()) -> dict[str, object]:
    """Cross-validate, train the final model, register it and run the promotion gate (also on the
    series readers labelled in `feedback_work`'s feedback store, when given)."""
    settings = load_settings()
    work = Path(work or settings.work_dir)
    uri = settings.mlflow_tracking_uri
    k = preprocess_config.slab_slices
    with writing(work, "dicomops-train", settings):
        data_hash = hash_accepted_corpus(work)
        # Never learn from what an earlier corpus left: its hash would go on this model.
        check_made_from(work, data_hash)
        t.check_classes(work)  # both classes, before anything is written or trained
        _, split_hash = t.prepare_splits(work, config)
        # The labels too: readers' labels (dicomops.feedback) change them without changing a file.
        # Not the gate's settings: changed alone, they gate the registered version again.
        key = stages.stage_key("train", {"data": data_hash, "labels": hash_labels(work), "split": split_hash,
                                         "train": model_settings(config),
                                         "preprocess": preprocess_config.model_dump(mode="json"),
                                         "tags": run_tags or {}})
        gate = gate_settings(config)
        if (cached := stages.registered(work, "train", key, uri, config.model_name)) is not None:
            if not decided_under(cached, gate):  # the gate's settings changed, or it could not decide
                decision = t.promotion_gate(uri, config, str(cached["version"]), work, feedback_work, feedback_config)
                cached = stages.gated_again(work, "train", key, cached, gate, decision)
            print(f"train: data, split, model settings and code unchanged; version {cached['version']} stands "
                  f"({cached.get('decision', 'as recorded')}), skipped")
            return {**cached, "skipped": True}
        stages.started(work, "train")
        params = flatten_params({"train": config.model_dump(mode="json"),
                                 "preprocess": preprocess_config.model_dump(mode="json")})
        run_id = t.open_training_run(work, config, preprocess_config, split_hash, data_hash, uri, experiment,
                                     settings.mlflow_artifact_root, params, parent_run_id, run_tags or {})
        with tracked(uri, run_id):
            print(f"train: {t.release_pool_counts(work, privacy_config)}")
            for fold in range(config.n_splits):
                t.train_fold(work, config, k, fold, uri)
            summary = t.summarise_cv(work, config, uri)
            if config.leave_one_vendor_out:
                summary["lovo_auc"] = t.leave_one_vendor_out(work, config, k, uri)
            t.train_final_model(work, config, k, uri)
            version = t.register_model(work, config, preprocess_config, uri, data_hash, split_hash, run_tags or {})
            t.store_reference(work, uri, config.model_name, version)
            decision = t.promotion_gate(uri, config, version, work, feedback_work, feedback_config)
            t.mark_training_complete(work, version)
        print(f"train: mean CV AUC {summary['mean_auc']:.3f} ± {summary['std_auc']:.3f}; version {version} "
              f"{decision['decision']}: {'; '.join(decision['reasons'])}")
        result: dict[str, object] = {"mlflow_run_id": run_id, "version": version, "mean_auc": summary["mean_auc"],
                                     "vendor_auc": summary["vendor_auc"], "promoted": decision["promoted"],
                                     "decision": decision["decision"], "work": str(work),
                                     "lovo_auc": summary.get("lovo_auc", {}), "gate": gate}
        stages.done(work, "train", key, result)
    return {**result, "skipped": False}
