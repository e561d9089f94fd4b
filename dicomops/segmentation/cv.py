"""The segmenter's cross-validation over a work directory, with the classifier's discipline: the same
persisted vendor-stratified folds (``splits/folds.json``), one nested MLflow run per fold, metrics per
vendor, nodule kind and size, checkpoints and resumption, a final model on every series, its own
registered model and a promotion gate on CPM.

State lives in ``WORK/segment/state.json``: a killed run resumes into the same MLflow runs, finished
folds are skipped and an interrupted one continues from its checkpoint.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import resource
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from dicomops import io
from dicomops.config import PreprocessConfig, SegmentConfig
from dicomops.feedback import privacy
from dicomops.layout import WorkLayout
from dicomops.preprocessing.stage import annotation_hash
from dicomops.segmentation import actionable, plots
from dicomops.segmentation import metrics as m
from dicomops.segmentation.data import SegVolume, forget_volumes, load_volumes, series_table
from dicomops.segmentation.loop import SegFit, fit, mean_history
from dicomops.segmentation.model import build_segmenter, for_inference, probability
from dicomops.synthetic.sidecars import LABELS_CSV
from dicomops.tracking import model_card, registry, runs
from dicomops.tracking.promotion import model_settings
from dicomops.training import mlflow_runs
from dicomops.training.loop import choose_precision

PREDICTION_SCALE = 255  # out-of-fold probabilities are kept as uint8 (prob * 255) for the pictures
# ONNX Runtime against torch, max |Δ probability|. Looser than the classifier's 1e-4: each instance
# normalisation sums over a whole 160x160x64 window, in another order in each runtime. Measured on
# the demo's trained segmenter: 8e-5 over whole volumes, 1.8e-4 in single windows.
PARITY_TOLERANCE = 1e-3
# The files of a ``weights/`` artifact (a fold run's, and the final model's on the parent run).
WEIGHTS_FILE, SEGMENT_CONFIG_FILE, PREPROCESS_CONFIG_FILE = "model.pt", "segment_config.json", "preprocess_config.json"


# -- state --------------------------------------------------------------------------------------

def run_key(layout: WorkLayout, cfg: SegmentConfig, pre: PreprocessConfig, split_hash: str, data_hash: str) -> str:
    """What a segmentation depends on: settings, split, data and labels. Same key, same run to resume.

    `data_hash` covers the DICOM files only, and readers correct masks, nodule records and labels
    without changing one: what the segmenter learns from (:func:`labels_sha256`) is part of the key,
    so that a resumed run never pools folds trained on the old with folds trained on the new, as
    the classifier's (:func:`dicomops.training.state.run_key`). The gate's settings are not: they
    change no model (:func:`dicomops.tracking.promotion.model_settings`)."""
    blob = json.dumps({"segment": model_settings(cfg), "pre": pre.model_dump(mode="json"),
                       "split": split_hash, "data": data_hash, "labels": labels_sha256(layout)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def labels_sha256(layout: WorkLayout) -> str:
    """The sha256 of what the segmenter learns from besides the images, series by series in series
    order: the series' label, its nodule records (``labels.csv``) and the bytes of its mask file."""
    table = series_table(layout).sort_values("SeriesInstanceUID")
    deid = layout.ingest.deid
    labels = pd.read_csv(deid / LABELS_CSV, keep_default_na=False, usecols=lambda c: c in ("SeriesInstanceUID",
                                                                                           "mask_path"))
    masks = dict(zip(labels.SeriesInstanceUID.astype(str), labels.mask_path.astype(str), strict=True)) \
        if "mask_path" in labels else {}

    def mask_sha256(uid: str) -> str:
        path = deid / masks[uid] if masks.get(uid) else None
        return annotation_hash(path) if path is not None and path.is_file() else ""

    rows = [[str(uid), int(label), str(nodules), mask_sha256(str(uid))]
            for uid, label, nodules in zip(table.SeriesInstanceUID, table.label, table.nodules, strict=True)]
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()


def _state(layout: WorkLayout) -> dict[str, Any]:
    path = layout.segment.state
    return io.read_json(path) if path.exists() else {}


def _update(layout: WorkLayout, **values: Any) -> None:
    state = _state(layout)
    state.update(values)
    io.write_json(layout.segment.state, state)


def _fold_entry(layout: WorkLayout, fold: int) -> dict[str, Any]:
    return dict(_state(layout).get("folds", {}).get(str(fold), {}))


def _update_fold(layout: WorkLayout, fold: int, **values: Any) -> None:
    state = _state(layout)
    state.setdefault("folds", {}).setdefault(str(fold), {}).update(values)
    io.write_json(layout.segment.state, state)


def parent_run(layout: WorkLayout) -> str:
    state = _state(layout)
    if "parent_run_id" not in state:
        raise ValueError(f"{layout.segment.state} has no segmentation run; run 'dicomops segment --work {layout.root}'")
    return str(state["parent_run_id"])


def open_run(layout: WorkLayout, key: str, tracking_uri: str, experiment: str, artifact_root: Path | None,
             tags: dict[str, str], params: dict[str, object], parent_run_id: str | None) -> str:
    """The segmentation's parent run: the unfinished one with the same key, or a new one."""
    state = _state(layout)
    if state.get("key") == key and not state.get("complete") and state.get("parent_run_id"):
        runs.configure_mlflow(tracking_uri).update_run(state["parent_run_id"], status="RUNNING")
        return str(state["parent_run_id"])
    if layout.segment.root.exists():
        shutil.rmtree(layout.segment.root)  # another training's checkpoints must not be resumed
    tags = {runs.DESCRIPTION_TAG: (
        "Nodule segmentation (MONAI 3D UNet, Dice + Focal loss) cross-validated in the classifier's folds; "
        "FROC/CPM, per-nodule Dice and kappa per vendor, nodule kind and size in cv/."), **tags}
    run_id = runs.start_run(tracking_uri, experiment, artifact_root, run_name="segment", tags=tags, params=params,
                            parent_run_id=parent_run_id)
    io.write_json(layout.segment.state, {"key": key, "parent_run_id": run_id, "folds": {}, "complete": False})
    return run_id


# -- evaluation ---------------------------------------------------------------------------------

def evaluate(model: torch.nn.Module, volumes: list[SegVolume], cfg: SegmentConfig, pre: PreprocessConfig,
             keep: Path | None = None) -> tuple[list[m.SeriesEval], dict[str, float]]:
    """Score every volume by sliding windows and judge it nodule by nodule, and its series by the
    actionable rule (:mod:`dicomops.segmentation.actionable`, on images preprocessed with `pre`);
    with `keep`, write each probability map there (``<series>.npz``, uint8). Also returns seconds
    per series."""
    precision = choose_precision(cfg.precision)
    level = actionable.solid_level(pre)
    evals, seconds = [], []
    net = for_inference(model)
    for v in volumes:
        tick = time.perf_counter()
        prob = probability(net, v.image, cfg, precision.autocast(), prepared=True)
        seconds.append(time.perf_counter() - tick)
        score = None
        if level is not None:
            score = actionable.series_score(actionable.weighed(prob, v.image, level, cfg))
        evals.append(dataclasses.replace(
            m.evaluate_series(prob, v.mask, v.nodules, series=v.series, vendor=v.vendor, threshold=cfg.threshold,
                              candidate_threshold=cfg.candidate_threshold, finding_threshold=cfg.finding_threshold,
                              native=v.native),
            actionable_ref=v.actionable, actionable_score=score))
        if keep is not None:
            io.write_npz(keep / f"{v.series}.npz", prob=np.round(prob * PREDICTION_SCALE).astype(np.uint8))
    return evals, {"inference_seconds_per_series": float(np.mean(seconds)) if seconds else float("nan"),
                   "inference_seconds_max": float(np.max(seconds)) if seconds else float("nan")}


def save_evals(path: Path, evals: list[m.SeriesEval]) -> None:
    io.write_json(path, [dataclasses.asdict(e) for e in evals])


def load_evals(path: Path) -> list[m.SeriesEval]:
    return [m.SeriesEval(**e) for e in io.read_json(path)]


def peak_rss_gb() -> float:
    """This process's peak resident memory so far (Linux reports kilobytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


# -- folds, summary, final model ----------------------------------------------------------------

def run_fold(layout: WorkLayout, cfg: SegmentConfig, fold: int, tracking_uri: str, *, pre: PreprocessConfig,
             stop_after: int | None = None) -> Path:
    """Train on the other folds' series, judge this fold's, in a nested run; return its evals file."""
    out = layout.segment.fold(fold)
    if _fold_entry(layout, fold).get("done"):
        return out / "evals.json"
    folds = layout.read_folds()
    run_id = _fold_entry(layout, fold).get("run_id")
    if run_id is None:
        run_id = mlflow_runs.create_nested_run(tracking_uri, parent_run(layout), f"segment-fold-{fold}", {
            "fold": str(fold), runs.DESCRIPTION_TAG: (
                f"Segmenter fold {fold} of {folds.n_splits}: trained on the other folds' series, judged per nodule "
                f"on this fold's {len(folds.val(fold))}.")})
        mlflow_runs.log_split_inputs(layout, tracking_uri, run_id,
                                     {"training": folds.train(fold), "validation": folds.val(fold)},
                                     f"segment-fold-{fold}")
        _update_fold(layout, fold, run_id=run_id, done=False)
    else:
        runs.configure_mlflow(tracking_uri).update_run(run_id, status="RUNNING")
    with mlflow_runs.closing(tracking_uri, run_id):
        train = load_volumes(layout, folds.train(fold), cfg.patch, cfg.border_share)
        val = load_volumes(layout, folds.val(fold), cfg.patch, cfg.border_share)
        mlflow_runs.log_results(tracking_uri, run_id, {}, [],
                                tags={"precision": choose_precision(cfg.precision).name})
        tick = time.perf_counter()
        result = fit(train, cfg, out / "checkpoint.pt", seed=cfg.seed + fold,
                     log=mlflow_runs.step_logger(tracking_uri, run_id, label=f"segmenter fold {fold}",
                                                      epochs=cfg.epochs), stop_after=stop_after)
        train_seconds = time.perf_counter() - tick
        # The fold's model, as a later student's teacher for this fold (dicomops.training.distill).
        mlflow_runs.log_results(tracking_uri, run_id, {}, save_weights(result.model, cfg, pre, out / "weights"),
                                registry.WEIGHTS_ARTIFACT)
        evals, timing = evaluate(result.model, val, cfg, pre, keep=out / "probabilities")
        save_evals(out / "evals.json", evals)
        metrics = m.summarise(evals, cfg.finding_threshold) | timing | {
            "train_seconds": train_seconds, "epochs_run": float(result.epochs_run),
            "resumed_from_epoch": float(result.resumed_from),
            "data_wait_share": mean_history(result, "data_wait_share"),
            "samples_per_second": mean_history(result, "samples_per_second"), "peak_rss_gb": peak_rss_gb()}
        picture = plots.froc_figure(_vendor_curves(evals), f"Fold {fold}: FROC per vendor", out / "froc.png")
        mlflow_runs.log_results(tracking_uri, run_id, _shown(metrics), [picture])
    _update_fold(layout, fold, done=True)
    return out / "evals.json"


def save_weights(model: torch.nn.Module, cfg: SegmentConfig, pre: PreprocessConfig, folder: Path) -> list[Path]:
    """``model.pt``, ``segment_config.json`` and ``preprocess_config.json`` in `folder`: what
    :func:`dicomops.segmentation.teacher.load_segmenter` rebuilds the network and its call from."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), folder / WEIGHTS_FILE)
    io.write_json(folder / SEGMENT_CONFIG_FILE, cfg.model_dump(mode="json"))
    io.write_json(folder / PREPROCESS_CONFIG_FILE, pre.model_dump(mode="json"))
    return [folder / WEIGHTS_FILE, folder / SEGMENT_CONFIG_FILE, folder / PREPROCESS_CONFIG_FILE]


def _finite(metrics: dict[str, float]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if v is not None and np.isfinite(v)}


def _shown(metrics: dict[str, float]) -> dict[str, float]:
    """The metrics people see: finite, and no exact count (:mod:`dicomops.feedback.privacy`)."""
    return {k: v for k, v in _finite(metrics).items() if k not in privacy.EXACT_COUNT_COLUMNS}


def _vendor_curves(evals: list[m.SeriesEval]) -> dict[str, m.Froc]:
    curves = {"all vendors": m.froc(evals)}
    for vendor in sorted({e.vendor for e in evals}):
        curves[vendor] = m.froc([e for e in evals if e.vendor == vendor])
    return curves


def _group_table(evals: list[m.SeriesEval]) -> pd.DataFrame:
    """CPM, sensitivities, Dice and kappa per vendor, nodule kind, attachment and size bin."""
    rows: list[dict[str, Any]] = []

    def row(group: str, value: str, froc: m.Froc, nodules: list[dict[str, Any]], part: list[m.SeriesEval]) -> None:
        ge6, ge6_native = m.nodule_dices(nodules, m.SIZE_EDGES_MM[0]), m.nodule_dices(nodules, m.SIZE_EDGES_MM[0], "dice_native")
        per_series = group in ("all", "vendor")
        low, high = m.series_kappa_interval(part) if per_series else (float("nan"), float("nan"))
        rows.append({"group": group, "value": value, "scans": froc.scans, "nodules": froc.nodules, "cpm": froc.cpm,
                     **{f"sens@{r:g}": s for r, s in froc.at_rates.items()},
                     "dice_mean": float(np.mean([n["dice"] for n in nodules])) if nodules else float("nan"),
                     "dice_ge6_mean": float(np.mean(ge6)) if ge6 else float("nan"),
                     "dice_ge6_native_mean": float(np.mean(ge6_native)) if ge6_native else float("nan"),
                     "kappa_series": m.series_kappa(part) if per_series else float("nan"),
                     "kappa_series_low": low, "kappa_series_high": high})

    every = [n for e in evals for n in e.nodules]
    row("all", "all", m.froc(evals), every, evals)
    for vendor in sorted({e.vendor for e in evals}):
        part = [e for e in evals if e.vendor == vendor]
        row("vendor", vendor, m.froc(part), [n for e in part for n in e.nodules], part)
    for field in ("kind", "attachment", "size_bin"):
        for value in sorted({str(n[field]) for n in every}):
            def chosen(n: dict[str, Any], field: str = field, value: str = value) -> bool:
                return str(n[field]) == value
            row(field, value, m.froc(evals, nodule_filter=chosen), [n for n in every if chosen(n)], evals)
    return pd.DataFrame(rows)


def summarise(layout: WorkLayout, cfg: SegmentConfig, tracking_uri: str) -> dict[str, Any]:
    """Pool the folds' out-of-fold evaluations: tables, FROC and contour pictures, summary.json."""
    paths = layout.segment
    folds = layout.read_folds()
    by_fold = [load_evals(paths.fold(i) / "evals.json") for i in range(folds.n_splits)]
    evals = [e for part in by_fold for e in part]
    metrics = m.summarise(evals, cfg.finding_threshold)
    calls = actionable_cv(by_fold)
    metrics |= {"cv.actionable_auc": calls.get("mean", float("nan")),
                **{f"cv.actionable_auc.{m.slug(v)}": a for v, a in calls.get("vendor", {}).items()}}
    table = _group_table(evals)
    aucs = {("all", "all"): calls.get("mean"), **{("vendor", v): a for v, a in calls.get("vendor", {}).items()}}
    table["auc_actionable"] = [aucs.get((r.group, str(r.value)), float("nan")) for r in table.itertuples()]
    io.write_csv(paths.by_group, table)
    io.write_csv(paths.nodules, m.nodule_table(evals))
    io.write_csv(paths.series, pd.DataFrame([{"series": e.series, "vendor": e.vendor, "dice": e.dice,
                                              "present_ref": e.present_ref, "present_pred": e.present_pred,
                                              "false_positives": len(e.false_positives)} for e in evals]))
    vendors = table[table.group == "vendor"].set_index("value")
    by_kind = {f"{r.group}: {r.value}": m.froc(evals, nodule_filter=_chooser(r.group, r.value))
               for r in table[table.group.isin(["kind", "size_bin"])].itertuples()}
    pictures = [plots.froc_figure(_vendor_curves(evals), "Nodule FROC per vendor (out of fold)",
                                  paths.picture("froc_by_vendor.png")),
                plots.froc_figure(by_kind, "Nodule FROC per kind and size (out of fold)",
                                  paths.picture("froc_by_kind.png")),
                contour_picture(layout, evals, paths.picture("contours.png"), cfg)]
    summary = {"cpm": metrics["cpm"], "vendor_cpm": {v: float(r.cpm) for v, r in vendors.iterrows()},
               "vendor_dice_ge6": {v: float(r.dice_ge6_mean) for v, r in vendors.iterrows()},
               "vendor_dice_ge6_native": {v: float(r.dice_ge6_native_mean) for v, r in vendors.iterrows()},
               "vendor_kappa": {v: float(r.kappa_series) for v, r in vendors.iterrows()},
               "vendor_kappa_interval": {v: [float(r.kappa_series_low), float(r.kappa_series_high)]
                                         for v, r in vendors.iterrows()},
               "dice_ge6_mean": metrics["dice_ge6_mean"], "dice_ge6_native_mean": metrics["dice_ge6_native_mean"],
               "kappa_series": metrics["kappa_series"],
               "kappa_size": metrics["kappa_size"], "actionable_auc": calls.get("mean"),
               "actionable_auc_std": calls.get("std"), "vendor_actionable_auc": calls.get("vendor", {}),
               "sensitivity": {f"{r:g}": metrics[f"sens_at_{r:g}"] for r in m.FP_RATES},
               "series": len(evals), "nodules": int(metrics["n_nodules"]), "final_epochs": cfg.epochs}
    io.write_json(paths.summary, summary)
    # People see no exact count (dicomops.feedback.privacy): the per-nodule and per-series tables stay
    # in the work directory, and the copies logged lose their counts.
    shown_summary = io.write_json(paths.root / "shown" / paths.summary.name,
                                  {k: v for k, v in summary.items() if k not in privacy.EXACT_COUNT_COLUMNS})
    mlflow_runs.log_results(tracking_uri, parent_run(layout), _shown(metrics),
                            [privacy.shown(paths.by_group, table), shown_summary, layout.folds_file, *pictures], "cv")
    return summary


def describe(summary: dict[str, Any]) -> str:
    """One line of a :func:`summarise` summary for a console: CPM, Dice, kappa and the actionable
    call's AUC overall and per vendor ("–" where it was not made)."""
    f = model_card._f
    vendors = ", ".join(f"{v} {f(a)}" for v, a in summary.get("vendor_actionable_auc", {}).items())
    native = summary.get("dice_ge6_native_mean")  # absent from a summary before 2026-12-06, NaN without one
    return (f"CPM {f(summary['cpm'])}, Dice (nodules >= 6 mm) {f(summary['dice_ge6_mean'])}"
            + (f" (on the acquired slices {f(native)})" if f(native) != "–" else "") + ", series kappa "
            f"{f(summary['kappa_series'])}, actionable-call AUC {f(summary.get('actionable_auc'))}"
            + (f" ({vendors})" if vendors else ""))


def actionable_cv(by_fold: list[list[m.SeriesEval]]) -> dict[str, Any]:
    """The AUC of the findings' actionable call (:mod:`dicomops.segmentation.actionable`) as the
    classifier's cross-validation reports its own (per fold and vendor, then the mean over folds:
    :func:`dicomops.training.scoring.summarise_predictions`), so the two read side by side. Empty
    where an evaluation carries no score (folds judged before the call existed)."""
    from dicomops.training.scoring import summarise_predictions

    rows = [{"fold": i, "vendor": e.vendor, "label": int(bool(e.actionable_ref)), "score": e.actionable_score}
            for i, part in enumerate(by_fold) for e in part]
    if not rows or any(e.actionable_score is None or e.actionable_ref is None for part in by_fold for e in part):
        return {}
    result = summarise_predictions(pd.DataFrame(rows), [1]).result
    return {"mean": result["mean_auc"], "std": result["std_auc"], "vendor": result["vendor_auc"]}


def _chooser(group: str, value: str) -> Any:
    return lambda n: str(n[group]) == value


def contour_picture(layout: WorkLayout, evals: list[m.SeriesEval], out: Path, cfg: SegmentConfig,
                    cases: int = 12) -> Path:
    """Reference and predicted contours through the nodules a reviewer should see first: the missed
    and worst-segmented ones, then the best, each from its own fold's model (which never saw it)."""
    folds = layout.read_folds()
    fold_of = {uid: i for i in range(folds.n_splits) for uid in folds.val(i)}
    rows = [(e, n) for e in evals for n in e.nodules]
    rows.sort(key=lambda en: (en[1]["score"] is not None, en[1]["dice"]))
    chosen = rows[: cases - cases // 3] + rows[len(rows) - cases // 3:] if len(rows) > cases else rows
    volumes = {v.series: v for v in load_volumes(layout, sorted({e.series for e, _ in chosen}), cfg.patch,
                                                 cfg.border_share)}
    items = []
    for e, n in chosen:
        v = volumes[e.series]
        with np.load(layout.segment.fold(fold_of[e.series]) / "probabilities" / f"{e.series}.npz") as npz:
            prob = npz["prob"][: v.shape[0], : v.shape[1], : v.shape[2]]
        where = np.argwhere(v.mask == n["label"])
        centre = tuple(int(c) for c in where.mean(axis=0).round()) if len(where) else (0, 0, 0)
        found = "missed" if n["score"] is None else f"score {n['score']:.2f}"
        items.append({"image": v.image, "reference": v.mask == n["label"], "centre": centre,
                      "prediction": prob >= round(0.5 * PREDICTION_SCALE),
                      "caption": f"{e.vendor} {n['kind']} {n['attachment']} {n['diameter_mm']:.1f} mm\n"
                                 f"Dice {n['dice']:.2f}, {found}"})
    return plots.contour_grid(items, out, "Nodules: reference (green) and prediction (orange), out of fold")


def train_final(layout: WorkLayout, cfg: SegmentConfig, tracking_uri: str) -> Path:
    """Train on every labelled series for the configured epochs; save the weights."""
    ids = list(layout.labelled_series().SeriesInstanceUID)
    log = mlflow_runs.step_logger(tracking_uri, parent_run(layout), prefix="final.", label="final segmenter",
                                 epochs=cfg.epochs)
    volumes = load_volumes(layout, ids, cfg.patch, cfg.border_share)
    result: SegFit = fit(volumes, cfg, layout.segment.final / "checkpoint.pt", seed=cfg.seed + 1000, log=log)
    path = layout.segment.final_weights
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(result.model.state_dict(), path)
    mlflow_runs.log_results(tracking_uri, parent_run(layout),
                            {"final.samples_per_second": mean_history(result, "samples_per_second"),
                             "final.data_wait_share": mean_history(result, "data_wait_share"),
                             "peak_rss_gb": peak_rss_gb()}, [])
    return path


def register(layout: WorkLayout, cfg: SegmentConfig, pre: PreprocessConfig, tracking_uri: str,
             tags: dict[str, str]) -> str:
    """Register the final segmenter as a version of ``cfg.model_name`` with its card; alias challenger.

    Once per segmentation run, as the classifier's (:func:`registry.register_model`): a retried
    registration finishes the version its first attempt made, and a re-run after a crash past the
    registration goes on with the version recorded in the state."""
    if (registered := registered_version(layout)) is not None:
        return registered
    paths = layout.segment
    summary = io.read_json(paths.summary)
    model = build_segmenter(cfg)
    model.load_state_dict(torch.load(paths.final_weights, weights_only=True))
    model.eval()
    io.write_json(paths.final_config, cfg.model_dump(mode="json"))
    io.write_json(paths.final_preprocess_config, pre.model_dump(mode="json"))
    parent = parent_run(layout)
    # What the gate compares, to full precision as metrics of the run (registry.version_figures); rounded
    # in the tags, which people read on the version page.
    figures = {"cv.mean_cpm": summary["cpm"], "cv.dice_ge6": summary["dice_ge6_mean"],
               "cv.dice_ge6_native": summary.get("dice_ge6_native_mean", float("nan")),
               "cv.kappa_series": summary["kappa_series"],
               **{f"cv.cpm.{v}": c for v, c in summary["vendor_cpm"].items() if np.isfinite(c)}}
    mlflow_runs.log_results(tracking_uri, parent, _finite(figures), [paths.final_weights, paths.final_config,
                                                                     paths.final_preprocess_config],
                            registry.WEIGHTS_ARTIFACT)
    version_tags = {key: f"{value:.4f}" for key, value in figures.items()} | tags
    example = np.zeros((2, 1, *cfg.patch), dtype=np.float32)

    def card(version: str) -> str:
        return seg_card(cfg.model_name, version, summary, pd.read_csv(paths.by_group), parent,
                        privacy.pool_counts(layout.root))

    version = registry.register_model(tracking_uri, parent, model, example, cfg.model_name, card, version_tags,
                                      output=torch.sigmoid)
    record_version(layout, version)  # complete only after the gate (mark_complete)
    return version


def seg_card(model_name: str, version: str, summary: dict[str, Any], table: pd.DataFrame, run_id: str,
             pool: privacy.PoolCounts) -> str:
    """The version page: decision, per-vendor FROC/Dice/kappa, per kind and size, where the pictures are."""
    f = model_card._f

    vendors = [str(v) for v in table[table.group == "vendor"].value]

    def rows(*groups: str) -> list[list[str]]:
        part = table[table.group.isin(groups)]
        return [[str(r.value), *counts(str(r.value), r.group), f(r.cpm), f(r["sens@1"]), f(r.dice_ge6_mean),
                 f(r.get("dice_ge6_native_mean")), kappa(r), *([f(r.get("auc_actionable"))] if r.group in ("all", "vendor") else [])]
                for _, r in part.iterrows()]

    def kappa(r: pd.Series) -> str:
        low, high = r.get("kappa_series_low", float("nan")), r.get("kappa_series_high", float("nan"))
        return f(r.kappa_series) + (f" ({f(low)}–{f(high)})" if np.isfinite(low) and np.isfinite(high) else "")

    def counts(value: str, group: str) -> list[str]:
        if group == "all":
            return [pool.total(0, vendors), pool.total(1, vendors)]
        return [pool.cell(value, 0), pool.cell(value, 1)] if group == "vendor" else []

    header = ("", "series without", "series with", "CPM", "sens @1 FP", "Dice ≥6 mm", "on its slices",
              "kappa (series, 95 % CI)", "AUC (actionable)")
    metrics = ("", "CPM", "sens @1 FP", "Dice ≥6 mm", "on its slices", "kappa (series)")
    body = ["Out-of-fold, four folds stratified by vendor (the classifier's `splits/folds.json`).",
            f"**CPM {f(summary['cpm'])}**, mean Dice of nodules ≥ 6 mm {f(summary['dice_ge6_mean'])} at 1 mm, "
            f"{f(summary.get('dice_ge6_native_mean'))} on the series' own slices (where the annotation was drawn and "
            "the SEG goes back), "
            f"series kappa {f(summary['kappa_series'])}, size-category kappa {f(summary['kappa_size'])}. "
            f"The kappas count findings: candidates segmented at least {m.MIN_FINDING_MM:g} mm across and round "
            f"(elongation at most {m.MAX_ELONGATION:g}, not a vessel's piece); the FROC counts every candidate.",
            f"Actionable series (the classifier's label) called from the findings' size and solid part: mean CV "
            f"AUC {f(summary.get('actionable_auc'))} ± {f(summary.get('actionable_auc_std'))}, per fold and vendor "
            "as the classifier reports its own.", "",
            *model_card.table(header, "lrrrrrrrr", rows("all", "vendor")), "",
            f"*Series without, with* an actionable nodule: {pool.caption} The *all* row adds the vendors' "
            "released cells (+: and the suppressed ones). The kappa's interval is a percentile bootstrap over "
            "series: a vendor's rests on its few series without a nodule.", "",
            *model_card.table(metrics, "lrrrrr", rows("kind", "attachment", "size_bin")), "",
            f"Pictures: `runs:/{run_id}/cv/froc_by_vendor.png`, `cv/froc_by_kind.png`, `cv/contours.png`."]
    evidence = ("the run's artifacts `cv/` (FROC per vendor and per nodule kind, contours of predicted and "
                "reference nodules, `metrics_by_group.csv`, `series.csv`, `nodules.csv`) and its fold runs")
    parts = [model_card.decision_section("pending", (), version, model_name=model_name),
             model_card.section(model_card.EVIDENCE, "\n".join(body)),
             model_card.review_section(model_name, version, evidence)]
    return model_card.fit("\n".join(parts))


def export(layout: WorkLayout, cfg: SegmentConfig, tracking_uri: str, version: str,
           parity_volumes: int = 2) -> dict[str, Any]:
    """ONNX of the registered segmenter (dynamic batch and spatial axes), its parity against torch on
    whole validation volumes of fold 0 by the same sliding window, logged to the version's run under
    ``export/`` with ``export.onnx.sha256`` and the parity figures as version tags."""
    from dicomops.export.onnx_export import sha256
    from dicomops.segmentation.export import check_parity, export_onnx

    model = build_segmenter(cfg)
    model.load_state_dict(torch.load(layout.segment.final_weights, weights_only=True))
    out = layout.export_dir(f"{version}-segmenter") / "segmenter.onnx"
    export_onnx(model, cfg, out)
    ids = layout.read_folds().val(0)[:parity_volumes]
    volumes = load_volumes(layout, ids, cfg.patch, cfg.border_share)
    report = check_parity(model, out, [v.image for v in volumes], cfg, tolerance=PARITY_TOLERANCE)
    io.write_json(out.with_name("parity.json"), report)
    client = runs.configure_mlflow(tracking_uri)
    run_id = client.get_model_version(cfg.model_name, version).run_id
    mlflow_runs.log_results(tracking_uri, str(run_id), {}, [out, out.with_name("parity.json")], "export")
    tags = {"export.onnx.sha256": sha256(out), "export.parity_max_abs_diff": f"{report['max_abs_diff']:.2e}",
            "export.onnx_s_per_volume": f"{report['onnx_s_per_volume']:.2f}",
            "export.torch_s_per_volume": f"{report['torch_s_per_volume']:.2f}"}
    for key, value in tags.items():
        client.set_model_version_tag(cfg.model_name, version, key, value)
    forget_volumes()  # the last step that reads them: the process gives their memory back
    return {"onnx": str(out), **tags}


def gate(tracking_uri: str, cfg: SegmentConfig, version: str, work: Path | None = None,
         feedback_work: Path | None = None, feedback: Any = None, key: bytes | None = None) -> dict[str, Any]:
    """The promotion gate on CPM, with floors for the Dice and the series kappa (``segment.min_dice``,
    ``segment.min_series_kappa``); with the training's `work`, the champion judged on its pool
    (:mod:`dicomops.segmentation.champion_pool`); with a retrain's `feedback_work`, also on
    the series readers labelled there (:func:`dicomops.feedback.gate.segmenter_readers_for`), as the
    classifier's. `feedback`: its FeedbackConfig (default settings when None)."""
    from dicomops.config import FeedbackConfig

    feedback = feedback or FeedbackConfig()
    readers = None
    if work is not None and feedback_work is not None:
        from dicomops.feedback.gate import segmenter_readers_for

        readers = segmenter_readers_for(work, feedback_work, cfg.model_name, feedback, key)
    floors = {"Dice (nodules >= 6 mm)": ("cv.dice_ge6", cfg.min_dice),
              "series kappa": ("cv.kappa_series", cfg.min_series_kappa)}
    pool = None
    if work is not None:  # the champion judged again on this version's series, references and folds
        from dicomops.segmentation.champion_pool import pool_for

        pool = pool_for(work, tracking_uri, cfg.model_name)
    decision = registry.apply_promotion_gate(tracking_uri, cfg.model_name, version, margin=cfg.promotion_margin,
                                             vendor_tolerance=cfg.vendor_tolerance, min_auc=cfg.min_cpm, metric="cpm",
                                             readers=readers, min_reader_series=feedback.min_cases, floors=floors,
                                             pool=pool)
    return {"promoted": decision.promote, "decision": decision.label, "reasons": list(decision.reasons)}


def registered_version(layout: WorkLayout) -> str | None:
    """The version this (unfinished) run registered, if it got that far."""
    version = _state(layout).get("version")
    return None if version is None else str(version)


def record_version(layout: WorkLayout, version: str) -> None:
    _update(layout, version=version)


def mark_complete(layout: WorkLayout, version: str) -> None:
    """Registered and exported: a later run with the same key starts afresh."""
    _update(layout, complete=True, version=version)
