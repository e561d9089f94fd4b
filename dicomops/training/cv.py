"""Cross-validation over the work directory: the split, one training per fold, the summary, leave
one vendor out, the final model and its registration.

This module wires three others: :mod:`dicomops.training.scoring` (pure scores and summaries),
:mod:`dicomops.training.state` (where a killed run resumes) and :mod:`dicomops.training.mlflow_runs`
(nested runs and what they log). Paths come from :class:`dicomops.layout.WorkLayout`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from dicomops import io
from dicomops.config import PreprocessConfig, TrainConfig
from dicomops.feedback import privacy
from dicomops.layout import Folds, WorkLayout
from dicomops.tracking import model_card, registry
from dicomops.tracking.lineage import ACCEPTED_HASH_TAG
from dicomops.training import mlflow_runs, plots, saliency, scoring
from dicomops.training import state as train_state
from dicomops.training.data import SlabSet, build_slab_set, load_volume
from dicomops.training.loop import fit, train_precision
from dicomops.training.model import build_model, load_state_dict
from dicomops.training.splits import fold_counts, load_or_create_folds


def prepare(layout: WorkLayout, cfg: TrainConfig) -> Folds:
    """Write or reuse ``splits/folds.json`` (checked against the labelled series and the config).

    Also refuses, before any fold trains, a leave-one-vendor-out the series cannot support."""
    series = layout.labelled_series()
    if cfg.leave_one_vendor_out:
        check_vendors_to_leave_out(series)
    return load_or_create_folds(layout, series, cfg.n_splits, cfg.seed)


def check_classes(series: pd.DataFrame) -> None:
    """A classifier learns to tell positive series from negative ones: its cross-validated AUC and the
    operating threshold chosen on the ROC of its out-of-fold scores are undefined without both (a
    corpus with no positive series registered a version whose threshold was infinite).

    Raises:
        ValueError: the labelled series are all of one class, saying what to change.
    """
    classes = {int(label) for label in series.label.unique()}
    if classes == {0, 1}:
        return
    if not classes:
        raise ValueError("no labelled series to train on: give the corpus a labels.csv with a label (0 or 1) per "
                         "series, then ingest and preprocess it again")
    present, missing, label = ("negative", "positive", 1) if 1 not in classes else ("positive", "negative", 0)
    raise ValueError(f"every labelled series is {present}: a classifier needs {missing} series too, or its "
                     f"cross-validated AUC and operating threshold are undefined. Add {missing} series to the "
                     f"corpus (label {label} in its labels.csv), or correct the labels that made them all {present}, "
                     "then ingest and preprocess it again")


def check_vendors_to_leave_out(series: pd.DataFrame) -> None:
    """Leaving one vendor out trains on the others: with a single vendor there are none.

    Raises:
        ValueError: the labelled series come from fewer than two vendors, saying what to change.
    """
    vendors = sorted(str(v) for v in series.vendor.unique())
    if len(vendors) < 2:
        raise ValueError(f"leave-one-vendor-out needs labelled series from at least two vendors, and these are "
                         f"only {', '.join(vendors) or 'none'}: train without --leave-one-vendor-out "
                         "(train.leave_one_vendor_out: false), or add another vendor's series")


def score_series(model: torch.nn.Module, layout: WorkLayout, series: pd.DataFrame, k: int, size: int,
                 rule: scoring.SeriesRule) -> pd.DataFrame:
    """Series-level scores of the rows of `series` (see :func:`scoring.series_score`)."""
    volumes = (load_volume(layout.preprocessed.volume(row.path)) for row in series.itertuples())
    return scoring.score_series(model, series.itertuples(), volumes, k, size, rule)


def run_fold(layout: WorkLayout, cfg: TrainConfig, k: int, fold: int, tracking_uri: str,
             stop_after: int | None = None) -> Path:
    """Train and evaluate one fold in its own nested MLflow run; return its predictions file."""
    out = layout.train.fold(fold)
    if train_state.fold_entry(layout, fold).get("done"):
        return out / "predictions.parquet"
    run_id = mlflow_runs.fold_run(layout, tracking_uri, fold)
    with mlflow_runs.closing(tracking_uri, run_id):
        folds = layout.read_folds()
        series = layout.labelled_series().set_index("SeriesInstanceUID")
        train = build_slab_set(layout, folds.train(fold), k, cfg.input_size, masks=cfg.aux_mask_weight > 0,
                               repeats=True)
        val = build_slab_set(layout, folds.val(fold), k, cfg.input_size)
        mlflow_runs.log_results(tracking_uri, run_id, {}, [], tags={"precision": train_precision(cfg).name})
        result = fit(train, val, cfg, out / "checkpoint.pt", seed=cfg.seed + fold,
                     log=mlflow_runs.step_logger(tracking_uri, run_id, label=f"{cfg.architecture} fold {fold}",
                                                      epochs=cfg.epochs), stop_after=stop_after,
                     teacher=teacher_for(layout, cfg, tracking_uri, train, fold))
        # The fold's model, as a later student's teacher for this fold (dicomops.training.distill).
        mlflow_runs.log_results(tracking_uri, run_id, {},
                                save_weights(result.model, cfg, k, out / "weights"), registry.WEIGHTS_ARTIFACT)
        preds = score_series(result.model, layout, series.loc[folds.val(fold)].reset_index(), k, cfg.input_size,
                             scoring.SeriesRule.of(cfg))
        preds["fold"] = fold
        io.write_parquet(out / "predictions.parquet", preds)
        table, metrics = scoring.fold_metrics(preds)
        io.write_csv(out / "metrics.csv", table)
        metrics.update({"best_epoch": float(result.best_epoch), "epochs_run": float(result.epochs_run),
                        "resumed_from_epoch": float(result.resumed_from),
                        "data_wait_share": float(np.mean([h["data_wait_share"] for h in result.history])),
                        "samples_per_second": float(np.mean([h["samples_per_second"] for h in result.history]))})
        mlflow_runs.log_results(tracking_uri, run_id, metrics,
                                [privacy.shown(out / "metrics.csv", table), plots.roc_by_vendor(preds, out / "roc.png")])
    train_state.update_fold(layout, fold, done=True, best_epoch=result.best_epoch)
    return out / "predictions.parquet"


def save_weights(model: torch.nn.Module, cfg: TrainConfig, k: int, folder: Path) -> list[Path]:
    """``model.pt`` and ``train_config.json`` in `folder`: what :func:`registry.load_weights` rebuilds from."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), folder / "model.pt")
    io.write_json(folder / "train_config.json", cfg.model_dump(mode="json") | {"in_channels": k})
    return [folder / "model.pt", folder / "train_config.json"]


def teacher_for(layout: WorkLayout, cfg: TrainConfig, tracking_uri: str, train: SlabSet,
                fold: int | None) -> torch.Tensor | None:
    """With ``cfg.distill_from``, the teacher's logits for `train` (:mod:`dicomops.training.distill`)."""
    if cfg.distill_from is None:
        return None
    from dicomops.training.distill import teacher_targets

    return teacher_targets(layout, tracking_uri, cfg.model_name, cfg.distill_from, train_state.parent_run(layout),
                           train, fold)


def summarise(layout: WorkLayout, cfg: TrainConfig, tracking_uri: str) -> dict[str, Any]:
    """Pool the folds' predictions: per-fold × vendor metrics, mean ± std, plots, summary.json."""
    paths = layout.train
    preds = pd.concat([pd.read_parquet(paths.fold(i) / "predictions.parquet") for i in range(cfg.n_splits)],
                      ignore_index=True)
    cv = scoring.summarise_predictions(preds, train_state.best_epochs(layout, cfg.n_splits))
    io.write_csv(paths.per_fold_metrics, cv.per_fold)
    io.write_csv(paths.cv_summary, cv.by_vendor)
    io.write_parquet(paths.oof_predictions, preds)
    io.write_parquet(paths.oof_scores, preds[["SeriesInstanceUID", "score"]])
    io.write_json(paths.summary, cv.result)
    io.write_csv(paths.fold_counts, fold_counts(layout.read_folds().folds, layout.labelled_series()))
    evidence = io.write_csv(paths.evidence, scoring.vendor_evidence(preds, cv.threshold, cv.by_vendor))
    pictures = [plots.roc_by_vendor(preds, paths.picture("roc_by_vendor.png")),
                plots.roc_by_fold(preds, paths.picture("roc_by_fold.png")),
                plots.confusion(preds, cv.threshold, paths.picture("confusion.png")),
                plots.confusion_by_vendor(preds, cv.threshold, paths.picture("confusion_by_vendor.png")),
                # Each series drawn with where its own fold's model looked: that model never saw it.
                plots.sample_grid(layout, preds, cv.threshold, paths.picture("samples.png"),
                                  models=saliency.fold_models(layout, cfg, sorted(preds.fold.unique())),
                                  input_size=cfg.input_size)]
    mlflow_runs.log_results(tracking_uri, train_state.parent_run(layout), cv.metrics(),
                            [privacy.shown(paths.per_fold_metrics, cv.per_fold), privacy.shown(paths.cv_summary, cv.by_vendor),
                             privacy.shown(paths.evidence, pd.read_csv(evidence)), paths.summary, layout.folds_file,
                             paths.oof_scores, *pictures], "cv")
    return cv.result


def leave_one_vendor_out(layout: WorkLayout, cfg: TrainConfig, k: int, tracking_uri: str) -> pd.DataFrame:
    """How the model generalises to an unseen scanner: for each vendor, train on all the others for
    the cross-validated number of epochs and score that vendor's series. One nested run per vendor
    (``lovo-<vendor>``); the table goes to ``WORK/train/lovo.csv`` and ``lovo.auc.<vendor>`` metrics.
    A vendor already scored (its predictions on disk) is not retrained when the training resumes.
    """
    from sklearn.metrics import roc_auc_score

    parent = train_state.parent_run(layout)
    epochs = int(io.read_json(layout.train.summary)["final_epochs"])
    series = layout.labelled_series()
    check_vendors_to_leave_out(series)
    rows = []
    for vendor in sorted(series.vendor.unique()):
        out = layout.train.held_out(str(vendor))
        held = series[series.vendor == vendor]
        if not (out / "predictions.parquet").exists():
            run_id = mlflow_runs.create_nested_run(tracking_uri, parent, f"lovo-{vendor}",
                                                   {"held_out_vendor": str(vendor)})
            with mlflow_runs.closing(tracking_uri, run_id):
                train_ids = list(series[series.vendor != vendor].SeriesInstanceUID)
                data = build_slab_set(layout, train_ids, k, cfg.input_size, masks=cfg.aux_mask_weight > 0,
                                      repeats=True)
                result = fit(data, None, cfg, out / "checkpoint.pt",
                             seed=cfg.seed + 2000, epochs=epochs, log=mlflow_runs.step_logger(
                                 tracking_uri, run_id, label=f"{cfg.architecture} without {vendor}", epochs=epochs))
                preds = score_series(result.model, layout, held.reset_index(drop=True), k, cfg.input_size,
                                     scoring.SeriesRule.of(cfg))
                io.write_parquet(out / "predictions.parquet", preds)
                if preds.label.nunique() == 2:
                    mlflow_runs.log_results(tracking_uri, run_id,
                                            {"auc": float(roc_auc_score(preds.label, preds.score))}, [])
        preds = pd.read_parquet(out / "predictions.parquet")
        auc = float(roc_auc_score(preds.label, preds.score)) if preds.label.nunique() == 2 else float("nan")
        rows.append({"held_out_vendor": vendor, "auc": auc, "n": len(preds), "positives": int(preds.label.sum())})
    table = pd.DataFrame(rows)
    io.write_csv(layout.train.lovo, table)
    mlflow_runs.log_results(tracking_uri, parent, {f"lovo.auc.{r.held_out_vendor}": r.auc for r in table.itertuples()
                                                   if not np.isnan(r.auc)}, [privacy.shown(layout.train.lovo, table)], "cv")
    return table


def train_final(layout: WorkLayout, cfg: TrainConfig, k: int, tracking_uri: str) -> Path:
    """Train on every labelled series for the cross-validated number of epochs; save the weights."""
    summary = io.read_json(layout.train.summary)
    data = build_slab_set(layout, list(layout.labelled_series().SeriesInstanceUID), k, cfg.input_size,
                          masks=cfg.aux_mask_weight > 0, repeats=True)
    log = mlflow_runs.step_logger(tracking_uri, train_state.parent_run(layout), prefix="final.",
                                 label=f"final {cfg.architecture}", epochs=int(summary["final_epochs"]))
    result = fit(data, None, cfg, layout.train.final / "checkpoint.pt", seed=cfg.seed + 1000,
                 epochs=int(summary["final_epochs"]), log=log,
                 teacher=teacher_for(layout, cfg, tracking_uri, data, None))
    path = layout.train.final_weights
    torch.save(result.model.state_dict(), path)
    return path


def register(layout: WorkLayout, cfg: TrainConfig, pre: PreprocessConfig, tracking_uri: str,
             tags: dict[str, str]) -> str:
    """Register the final model with the cross-validation as its description; alias challenger.

    The MLmodel metadata carries the input contract (slab shape, spacing, window, threshold), which
    the export stage writes into the ONNX file and the Triton configuration.
    """
    from dicomops.export.contract import METADATA_KEY, InputContract

    if (registered := train_state.registered_version(layout)) is not None:
        return registered  # a re-run after a crash past the registration: that version goes on
    paths = layout.train
    summary = io.read_json(paths.summary)
    k = pre.slab_slices
    contract = InputContract.from_configs(pre, cfg, summary["threshold"])
    per_fold = pd.read_csv(paths.per_fold_metrics)
    per_fold_all = per_fold[per_fold.vendor == "all"].to_dict("records")
    model = build_model(cfg, k)
    model.load_state_dict(load_state_dict(paths.final_weights))
    model.eval()
    # Two samples, not one: MLflow saves the pt2 format through torch.export, which would fix a batch
    # dimension of size 1 and refuse any other batch size.
    example = np.zeros((2, k, cfg.input_size, cfg.input_size), dtype=np.float32)
    # Rounded: tags are read as text on the version page. The gate compares the same figures to full
    # precision, as summarise logged them to this run (registry.version_figures).
    version_tags = {"cv.mean_auc": f"{summary['mean_auc']:.4f}", "cv.std_auc": f"{summary['std_auc']:.4f}",
                    "cv.threshold": f"{summary['threshold']:.4f}", "architecture": cfg.architecture, **tags}
    teacher = None if cfg.distill_from is None else registry.parse_ref(cfg.distill_from, cfg.model_name)
    if teacher is not None:
        version_tags["distilled_from"] = "/".join(teacher)
    version_tags.update({f"cv.auc.{v}": f"{a:.4f}" for v, a in summary["vendor_auc"].items()})
    # Only this training's: a lovo.csv an earlier training left is not about this model.
    lovo = pd.read_csv(paths.lovo).to_dict("records") if cfg.leave_one_vendor_out and paths.lovo.exists() else None
    parent = train_state.parent_run(layout)
    # The plain weights and the config that builds the network: export and monitoring rebuild the
    # nn.Module from them (the pt2 model MLflow serves cannot expose its penultimate layer).
    io.write_json(paths.final_config, cfg.model_dump(mode="json") | {"in_channels": k})
    # The preprocessing it learned from, for whoever scores new studies with it (dicomops.serving).
    io.write_json(paths.final_preprocess_config, pre.model_dump(mode="json"))
    mlflow_runs.log_results(tracking_uri, parent, {},
                            [paths.final_weights, paths.final_config, paths.final_preprocess_config],
                            registry.WEIGHTS_ARTIFACT)
    evidence = pd.read_csv(paths.evidence).to_dict("records")
    identity = {key: tags[key] for key in (ACCEPTED_HASH_TAG, "split_sha256", "git_commit") if key in tags}
    identity["split (series per fold)"] = f"runs:/{parent}/cv/folds.json"
    identity["architecture"] = f"{cfg.architecture} over {k}-slice slabs of {cfg.input_size}×{cfg.input_size}"
    if teacher is not None:
        identity["distilled from"] = (f"version {teacher[1]} of {teacher[0]} (alpha {cfg.distill_alpha}, "
                                      f"temperature {cfg.distill_temperature})")

    def card(version: str) -> str:
        return model_card.initial_card(cfg.model_name, version, summary, evidence, per_fold_all, identity,
                                       privacy.pool_counts(layout.root), lovo, vendor_names(layout))

    # Once per training run: a retried registration finishes its first attempt's version.
    version = registry.register_model(tracking_uri, parent, model, example, cfg.model_name, card, version_tags,
                                      metadata={METADATA_KEY: contract.to_json()})
    train_state.record_version(layout, version)  # complete only after the gate (train_state.mark_complete)
    return version


def vendor_names(layout: WorkLayout) -> dict[str, list[str]]:
    """Each vendor key of the labelled series, and the Manufacturer values it stands for."""
    series = layout.labelled_series()
    if "Manufacturer" not in series:
        return {}
    return {str(v): sorted({str(m) for m in part.Manufacturer}) for v, part in series.groupby("vendor")}


def training_tags(layout: WorkLayout, data_hash: str, split_hash: str) -> dict[str, str]:
    """Lineage of a training run: code, data, split, ingest validation, de-identification, versions.
    `data_hash` is :func:`dicomops.preprocessing.stage.corpus_content_hash` of the accepted corpus."""
    from dicomops.deid.profile import PROFILE_NAME, PROFILE_TAG
    from dicomops.tracking.lineage import lineage_tags

    tags = lineage_tags(accepted_sha256=data_hash)
    tags["split_sha256"] = split_hash
    validation = layout.ingest.validation
    if validation.exists():
        tags["ingest.validation_success_share"] = f"{io.read_json(validation)['success_share']:.4f}"
    tags[PROFILE_TAG] = PROFILE_NAME
    return tags
