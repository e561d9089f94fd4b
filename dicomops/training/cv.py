"""Cross-validation over the work directory: folds, per-fold training with nested MLflow runs,
series-level evaluation per vendor, the summary, and the final model.

State lives in ``WORK/train/state.json`` so that a run killed mid-way resumes into the same MLflow
runs: finished folds are skipped, an interrupted fold continues from its last checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from dicomops import io
from dicomops.config import PreprocessConfig, TrainConfig
from dicomops.tracking import runs
from dicomops.training import plots
from dicomops.training.data import SlabSet, all_slabs, build_slab_set, load_volume
from dicomops.training.loop import choose_precision, fit, predict
from dicomops.training.metrics import per_vendor_metrics, summarise_folds, youden_threshold
from dicomops.training.splits import fold_counts, load_or_create_folds


def train_dir(work: Path) -> Path:
    return Path(work) / "train"


def labelled_series(work: Path) -> pd.DataFrame:
    index = pd.read_parquet(Path(work) / "preprocessed" / "index.parquet")
    labelled = index[index.label >= 0].reset_index(drop=True)
    if labelled.empty:
        raise ValueError("no labelled series in preprocessed/index.parquet; training needs labels.csv in the source")
    return labelled


def run_key(cfg: TrainConfig, pre: PreprocessConfig, split_hash: str, data_hash: str) -> str:
    blob = json.dumps({"train": cfg.model_dump(mode="json"), "pre": pre.model_dump(mode="json"),
                       "split": split_hash, "data": data_hash}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def prepare(work: Path, cfg: TrainConfig) -> tuple[Path, str]:
    """Write or reuse ``splits/folds.json``; return its path and sha256."""
    series = labelled_series(work)
    path = Path(work) / "splits" / "folds.json"
    _, digest = load_or_create_folds(path, series, cfg.n_splits, cfg.seed)
    return path, digest


def load_state(work: Path) -> dict[str, Any]:
    path = train_dir(work) / "state.json"
    return io.read_json(path) if path.exists() else {}


def save_state(work: Path, state: dict[str, Any]) -> None:
    io.write_json(train_dir(work) / "state.json", state)


def open_parent_run(work: Path, key: str, tracking_uri: str, experiment: str, artifact_root: Path | None,
                    tags: dict[str, str], params: dict[str, object], parent_run_id: str | None) -> str:
    """The cross-validation's parent run: the unfinished one with the same key, or a new one."""
    state = load_state(work)
    if state.get("key") == key and not state.get("complete"):
        runs.configure_mlflow(tracking_uri).update_run(state["parent_run_id"], status="RUNNING")
        return str(state["parent_run_id"])
    run_id = runs.start_run(tracking_uri, experiment, artifact_root, run_name="train", tags=tags,
                            params=params, parent_run_id=parent_run_id)
    for stale in train_dir(work).glob("*"):  # checkpoints of an earlier training must not be resumed
        if stale.is_dir():
            shutil.rmtree(stale)
    save_state(work, {"key": key, "parent_run_id": run_id, "experiment": experiment, "folds": {},
                      "complete": False})
    return run_id


def _slabs(work: Path, series_ids: list[str], k: int, size: int) -> SlabSet:
    index = pd.read_parquet(Path(work) / "preprocessed" / "index.parquet")
    slabs = pd.read_parquet(Path(work) / "preprocessed" / "slabs.parquet")
    return build_slab_set(work, index, slabs, series_ids, k, size)


def score_series(model: torch.nn.Module, work: Path, series: pd.DataFrame, k: int, size: int,
                 top_k: int) -> pd.DataFrame:
    """Series-level scores: the mean of the `top_k` highest slice probabilities over all slices."""
    rows = []
    for row in series.itertuples():
        probs = predict(model, all_slabs(load_volume(work, row.path), k, size))
        rows.append({"SeriesInstanceUID": row.SeriesInstanceUID, "vendor": row.vendor, "label": int(row.label),
                     "score": float(np.sort(probs)[-top_k:].mean()), "best_z": int(np.argmax(probs))})
    return pd.DataFrame(rows)


def run_fold(work: Path, cfg: TrainConfig, k: int, fold: int, tracking_uri: str,
             stop_after: int | None = None) -> Path:
    """Train and evaluate one fold in its own nested MLflow run; return its predictions file."""
    state = load_state(work)
    out = train_dir(work) / f"fold-{fold}"
    if str(fold) in state["folds"] and state["folds"][str(fold)].get("done"):
        return out / "predictions.parquet"
    client = runs.configure_mlflow(tracking_uri)
    parent = state["parent_run_id"]
    run_id = state["folds"].get(str(fold), {}).get("run_id")
    if run_id is None:
        experiment_id = client.get_run(parent).info.experiment_id
        run_id = client.create_run(experiment_id, run_name=f"fold-{fold}",
                                   tags={"mlflow.parentRunId": parent, "fold": str(fold)}).info.run_id
        state["folds"][str(fold)] = {"run_id": run_id, "done": False}
        save_state(work, state)
    else:
        client.update_run(run_id, status="RUNNING")
    try:
        folds = json.loads((Path(work) / "splits" / "folds.json").read_text())["folds"]
        series = labelled_series(work).set_index("SeriesInstanceUID")
        train_ids, val_ids = folds[fold]["train"], folds[fold]["val"]
        train, val = _slabs(work, train_ids, k, cfg.input_size), _slabs(work, val_ids, k, cfg.input_size)

        def log(epoch: int, metrics: dict[str, float]) -> None:
            runs.log_metrics(tracking_uri, run_id, metrics, step=epoch)

        client.set_tag(run_id, "precision", choose_precision(cfg.precision).name)
        result = fit(train, val, cfg, out / "checkpoint.pt", seed=cfg.seed + fold, log=log, stop_after=stop_after)
        val_series = series.loc[val_ids].reset_index()
        preds = score_series(result.model, work, val_series, k, cfg.input_size, cfg.top_k_slices)
        preds["fold"] = fold
        io.write_parquet(out / "predictions.parquet", preds)
        threshold = youden_threshold(preds.label.to_numpy(), preds.score.to_numpy()) \
            if preds.label.nunique() == 2 else 0.5
        table = per_vendor_metrics(preds, threshold)
        io.write_csv(out / "metrics.csv", table)
        metrics = {f"{m}.{v}": float(table.set_index("vendor").loc[v, m])
                   for v in table.vendor for m in ("auc", "sensitivity", "specificity", "f1", "kappa")}
        metrics.update({"best_epoch": float(result.best_epoch), "epochs_run": float(result.epochs_run),
                        "resumed_from_epoch": float(result.resumed_from),
                        "data_wait_share": float(np.mean([h["data_wait_share"] for h in result.history])),
                        "samples_per_second": float(np.mean([h["samples_per_second"] for h in result.history]))})
        runs.log_metrics(tracking_uri, run_id, {k2: v for k2, v in metrics.items() if not np.isnan(v)})
        runs.log_artifacts(tracking_uri, run_id, [out / "metrics.csv", plots.roc_by_vendor(preds, out / "roc.png")])
        client.set_terminated(run_id, "FINISHED")
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    state = load_state(work)
    state["folds"][str(fold)].update({"done": True, "best_epoch": result.best_epoch})
    save_state(work, state)
    return out / "predictions.parquet"


def summarise(work: Path, cfg: TrainConfig, tracking_uri: str) -> dict[str, Any]:
    """Pool the folds' predictions: per-fold × vendor metrics, mean ± std, plots, summary.json."""
    state = load_state(work)
    parent = state["parent_run_id"]
    preds = pd.concat([pd.read_parquet(train_dir(work) / f"fold-{i}" / "predictions.parquet")
                       for i in range(cfg.n_splits)], ignore_index=True)
    threshold = youden_threshold(preds.label.to_numpy(), preds.score.to_numpy())
    per_fold = pd.concat([per_vendor_metrics(g, threshold).assign(fold=i) for i, g in preds.groupby("fold")],
                         ignore_index=True)
    summary = summarise_folds(per_fold)
    root = train_dir(work)
    io.write_csv(root / "per_fold_metrics.csv", per_fold)
    io.write_csv(root / "cv_summary.csv", summary)
    io.write_parquet(root / "oof_predictions.parquet", preds)
    by_vendor = summary.set_index("vendor")
    best_epochs = [int(state["folds"][str(i)]["best_epoch"]) for i in range(cfg.n_splits)]
    vendor_auc = {str(v): float(by_vendor.loc[v, "auc_mean"]) for v in by_vendor.index if v != "all"}
    result: dict[str, Any] = {
        "mean_auc": float(by_vendor.loc["all", "auc_mean"]),
        "std_auc": float(by_vendor.loc["all", "auc_std"]),
        "vendor_auc": vendor_auc,
        "threshold": threshold,
        "final_epochs": int(max(1, np.median(best_epochs))),
    }
    io.write_json(root / "summary.json", result)
    series = labelled_series(work)
    folds = json.loads((Path(work) / "splits" / "folds.json").read_text())["folds"]
    io.write_csv(root / "fold_counts.csv", fold_counts(folds, series))
    metrics = {"cv.mean_auc": result["mean_auc"], "cv.std_auc": result["std_auc"], "cv.threshold": threshold}
    metrics.update({f"cv.auc.{v}": a for v, a in vendor_auc.items()})
    runs.log_metrics(tracking_uri, parent, metrics)
    pictures = [plots.roc_by_vendor(preds, root / "roc_by_vendor.png"),
                plots.roc_by_fold(preds, root / "roc_by_fold.png"),
                plots.confusion(preds, threshold, root / "confusion.png"),
                plots.sample_grid(work, preds, root / "samples.png")]
    runs.log_artifacts(tracking_uri, parent, [root / "per_fold_metrics.csv", root / "cv_summary.csv",
                                              root / "fold_counts.csv", root / "summary.json", *pictures], "cv")
    return result


def leave_one_vendor_out(work: Path, cfg: TrainConfig, k: int, tracking_uri: str) -> pd.DataFrame:
    """How the model generalises to an unseen scanner: for each vendor, train on all the others for
    the cross-validated number of epochs and score that vendor's series. One nested run per vendor
    (``lovo-<vendor>``); the table goes to ``WORK/train/lovo.csv`` and ``lovo.auc.<vendor>`` metrics.
    A vendor already scored (its predictions on disk) is not retrained when the training resumes.
    """
    from sklearn.metrics import roc_auc_score

    state = load_state(work)
    parent = str(state["parent_run_id"])
    epochs = int(io.read_json(train_dir(work) / "summary.json")["final_epochs"])
    series = labelled_series(work)
    client = runs.configure_mlflow(tracking_uri)
    rows = []
    for vendor in sorted(series.vendor.unique()):
        out = train_dir(work) / f"lovo-{vendor}"
        held = series[series.vendor == vendor]
        if not (out / "predictions.parquet").exists():
            experiment_id = client.get_run(parent).info.experiment_id
            run_id = client.create_run(experiment_id, run_name=f"lovo-{vendor}",
                                       tags={"mlflow.parentRunId": parent, "held_out_vendor": str(vendor)}).info.run_id

            def log(epoch: int, metrics: dict[str, float], run_id: str = run_id) -> None:
                runs.log_metrics(tracking_uri, run_id, metrics, step=epoch)

            try:
                train_ids = list(series[series.vendor != vendor].SeriesInstanceUID)
                result = fit(_slabs(work, train_ids, k, cfg.input_size), None, cfg, out / "checkpoint.pt",
                             seed=cfg.seed + 2000, epochs=epochs, log=log)
                preds = score_series(result.model, work, held.reset_index(drop=True), k, cfg.input_size,
                                     cfg.top_k_slices)
                io.write_parquet(out / "predictions.parquet", preds)
                if preds.label.nunique() == 2:
                    runs.log_metrics(tracking_uri, run_id, {"auc": float(roc_auc_score(preds.label, preds.score))})
                client.set_terminated(run_id, "FINISHED")
            except BaseException:
                client.set_terminated(run_id, "FAILED")
                raise
        preds = pd.read_parquet(out / "predictions.parquet")
        auc = float(roc_auc_score(preds.label, preds.score)) if preds.label.nunique() == 2 else float("nan")
        rows.append({"held_out_vendor": vendor, "auc": auc, "n": len(preds), "positives": int(preds.label.sum())})
    table = pd.DataFrame(rows)
    io.write_csv(train_dir(work) / "lovo.csv", table)
    runs.log_metrics(tracking_uri, parent, {f"lovo.auc.{r.held_out_vendor}": r.auc for r in table.itertuples()
                                            if not np.isnan(r.auc)})
    runs.log_artifacts(tracking_uri, parent, [train_dir(work) / "lovo.csv"], "cv")
    return table


def train_final(work: Path, cfg: TrainConfig, k: int, tracking_uri: str) -> Path:
    """Train on every labelled series for the cross-validated number of epochs; save the weights."""
    summary = io.read_json(train_dir(work) / "summary.json")
    series = labelled_series(work)
    data = _slabs(work, list(series.SeriesInstanceUID), k, cfg.input_size)
    out = train_dir(work) / "final"
    state = load_state(work)

    parent = str(state["parent_run_id"])

    def log(epoch: int, metrics: dict[str, float]) -> None:
        runs.log_metrics(tracking_uri, parent, {f"final.{m}": v for m, v in metrics.items()}, step=epoch)

    result = fit(data, None, cfg, out / "checkpoint.pt", seed=cfg.seed + 1000, epochs=int(summary["final_epochs"]),
                 log=log)
    path = out / "model.pt"
    torch.save(result.model.state_dict(), path)
    return path


def register(work: Path, cfg: TrainConfig, pre: PreprocessConfig, tracking_uri: str, tags: dict[str, str]) -> str:
    """Register the final model with the cross-validation as its description; alias challenger.

    The MLmodel metadata carries the input contract (slab shape, spacing, window, threshold), which
    the export stage writes into the ONNX file and the Triton configuration.
    """
    from dicomops.export.contract import METADATA_KEY, InputContract
    from dicomops.tracking import registry
    from dicomops.training.model import build_model

    root = train_dir(work)
    summary = io.read_json(root / "summary.json")
    k = pre.slab_slices
    contract = InputContract.from_configs(pre, cfg, summary["threshold"])
    per_vendor = pd.read_csv(root / "cv_summary.csv").to_dict("records")
    per_fold = pd.read_csv(root / "per_fold_metrics.csv")
    per_fold_all = per_fold[per_fold.vendor == "all"].to_dict("records")
    model = build_model(cfg, k)
    model.load_state_dict(registry.load_state_dict(root / "final" / "model.pt"))
    model.eval()
    # Two samples, not one: MLflow saves the pt2 format through torch.export, which would fix a batch
    # dimension of size 1 and refuse any other batch size.
    example = np.zeros((2, k, cfg.input_size, cfg.input_size), dtype=np.float32)
    version_tags = {"cv.mean_auc": f"{summary['mean_auc']:.6f}", "cv.std_auc": f"{summary['std_auc']:.6f}",
                    "cv.threshold": f"{summary['threshold']:.6f}", **tags}
    version_tags.update({f"cv.auc.{v}": f"{a:.6f}" for v, a in summary["vendor_auc"].items()})
    lovo_path = root / "lovo.csv"
    lovo = pd.read_csv(lovo_path).to_dict("records") if lovo_path.exists() else None
    state = load_state(work)
    # The plain weights and the config that builds the network: export and monitoring rebuild the
    # nn.Module from them (the pt2 model MLflow serves cannot expose its penultimate layer).
    io.write_json(root / "final" / "train_config.json", cfg.model_dump(mode="json") | {"in_channels": k})
    runs.log_artifacts(tracking_uri, state["parent_run_id"], [root / "final" / "model.pt",
                                                               root / "final" / "train_config.json"], "weights")
    version = registry.register_model(tracking_uri, state["parent_run_id"], model, example, cfg.model_name,
                                      registry.version_description(summary, per_vendor, per_fold_all, lovo), version_tags,
                                      metadata={METADATA_KEY: contract.to_json()})
    state.update({"complete": True, "version": version})
    save_state(work, state)
    return version


def training_tags(work: Path, data_hash: str, split_hash: str) -> dict[str, str]:
    """Lineage of a training run: code, data, split, ingest validation, de-identification, versions."""
    from dicomops.deid.profile import PROFILE_NAME
    from dicomops.tracking.lineage import lineage_tags

    tags = lineage_tags(data_hash)
    tags["split_sha256"] = split_hash
    validation = Path(work) / "ingest" / "validation.json"
    if validation.exists():
        tags["ingest.validation_success_share"] = f"{io.read_json(validation)['success_share']:.4f}"
    tags["deid.profile"] = PROFILE_NAME
    return tags
