"""The export stage over a registered model version: ONNX → parity → INT8 → TensorRT → Triton,
with every file's sha256 and every check's figure attached to the version in MLflow.

Files go to ``WORK/export/v<version>/``; the version's source run (the training run that logged
the model) receives them under ``export/`` so that the version page links to them, and the version
carries ``export.*`` tags with the figures and hashes: the sha256 of each ONNX file, of the TensorRT
plan, of ``manifest.json`` (which lists every file's) and of the training's configuration files that
serving reads beside them (:func:`seal`), so that serving checks every file it is given
(:func:`dicomops.serving.champion.check_hashes`).
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from dicomops import io
from dicomops.config import ExportConfig, PreprocessConfig, TrainConfig
from dicomops.errors import ExportCheckError
from dicomops.export import onnx_export, openvino_engine, quantize, tensorrt_engine, triton
from dicomops.export.contract import METADATA_KEY, InputContract
from dicomops.layout import WorkLayout
from dicomops.tracking import registry, runs
from dicomops.training.data import SlabSet, build_slab_set, forget_slabs

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelRef:
    name: str
    version: str
    run_id: str
    contract: InputContract


@dataclass
class ExportReport:
    version: str
    folder: str
    files: dict[str, str] = field(default_factory=dict)  # relative path → sha256
    metrics: dict[str, float] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    tensorrt: str = ""
    openvino: str = ""


def resolve_version(tracking_uri: str, name: str, version: str | None, alias: str | None) -> ModelRef:
    """The model version to export (by number or alias; with neither, the challenger if a version
    is under review, else the champion) and the contract it was registered with."""
    import mlflow

    client = runs.configure_mlflow(tracking_uri)
    if version is not None and alias is not None:
        raise ValueError("give one of --version or --alias, not both")
    if version is None and alias is None:
        registry.sync_reviews(tracking_uri, name)  # a challenger rejected on the page is not exported
        held = registry.alias_version(client, name, registry.CHALLENGER) or \
            registry.alias_version(client, name, registry.CHAMPION)
        if held is None:
            raise ValueError(f"{name} has no challenger and no champion; give --version")
        version = str(held.version)
    if version:
        mv = registry.model_version(client, name, version)
    elif (mv := registry.alias_version(client, name, str(alias))) is None:
        raise ValueError(f"no version of {name} holds the alias '{alias}'")
    info = mlflow.models.get_model_info(f"models:/{name}/{mv.version}")
    raw = (info.metadata or {}).get(METADATA_KEY)
    if raw is None:
        from dicomops.config import SegmentConfig

        if name == SegmentConfig().model_name or "cv.mean_cpm" in (mv.tags or {}):  # the segmenter's gate metric
            raise ValueError(f"{name} is the nodule segmenter: `dicomops export` exports classifiers; the segment "
                             "stage exports the segmenter to ONNX (with its parity check) when it registers a version")
        raise ValueError(f"{name} version {mv.version} was registered without '{METADATA_KEY}' in its MLmodel "
                         "metadata, so its input contract is unknown; retrain it with this dicomops")
    return ModelRef(name, str(mv.version), str(mv.run_id), InputContract.from_mapping(raw))


def load_torch_model(tracking_uri: str, ref: ModelRef) -> tuple[torch.nn.Module, TrainConfig]:
    """The version's network rebuilt from its run's ``weights/`` (the same state dict MLflow logged),
    and the training's config."""
    from dicomops.training.model import load_trained

    model, train_cfg, _ = load_trained(tracking_uri, ref.run_id)
    return model, train_cfg


def weights_configs(tracking_uri: str, ref: ModelRef) -> tuple[dict[str, str], PreprocessConfig | None]:
    """The sha256 of the configuration files serving reads from the version's run (``weights/``),
    and its preprocessing (None, with a warning, for a run that never stored it)."""
    from dicomops.serving.champion import CONFIG_SHA_TAGS, PREPROCESS_CONFIG

    client = runs.configure_mlflow(tracking_uri)
    hashes: dict[str, str] = {}
    pre = None
    with tempfile.TemporaryDirectory(prefix="dicomops-weights-") as tmp:
        for name in CONFIG_SHA_TAGS:
            try:
                path = Path(client.download_artifacts(ref.run_id, f"{registry.WEIGHTS_ARTIFACT}/{name}", tmp))
            except Exception as err:  # a run from before its configuration was stored: serving refuses it
                log.warning("run %s has no %s/%s (%s); its sha256 is not registered", ref.run_id,
                            registry.WEIGHTS_ARTIFACT, name, err)
                continue
            hashes[name] = onnx_export.sha256(path)
            if name == PREPROCESS_CONFIG:
                pre = PreprocessConfig.model_validate(json.loads(path.read_text()))
    return hashes, pre


def checked_contract(ref: ModelRef, pre: PreprocessConfig | None) -> InputContract:
    """The version's registered contract, which the run's preprocessing must agree with; settings a
    contract registered before they were recorded are taken from that preprocessing (what the
    version was trained with), so the export's contract names them all."""
    if pre is None:
        return ref.contract
    wrong = ref.contract.disagreements(pre)
    if wrong:
        raise ValueError(f"the run of {ref.name} version {ref.version} holds a weights/preprocess_config.json that "
                         f"disagrees with the version's registered input contract ({'; '.join(wrong)}): it was "
                         "changed after training; restore it from the training's work directory (train/) first")
    if ref.contract.unrecorded:
        log.info("%s version %s was registered before its contract recorded %s; the export records them from its "
                 "run's preprocessing", ref.name, ref.version, ", ".join(ref.contract.unrecorded))
    return ref.contract.completed(pre)


def seal(folder: Path, manifest: dict[str, Any], weights: Mapping[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """Write ``manifest.json`` into `folder`: `manifest` with every file's sha256 (``files``) and the
    training's configuration files' (``weights``). Returns the files' sha256 and the version tags
    that register them: each ONNX file's, the TensorRT plan's, the configuration files' and the
    manifest's own (which vouches for every other file)."""
    from dicomops.serving.champion import CONFIG_SHA_TAGS, MANIFEST, MANIFEST_SHA_TAG, PLAN_SHA_TAG
    from dicomops.serving.engine import ENGINE_FILES, SHA_TAGS

    files = {str(p.relative_to(folder)): onnx_export.sha256(p) for p in sorted(folder.rglob("*"))
             if p.is_file() and p != folder / MANIFEST}
    io.write_json(folder / MANIFEST, {**manifest, "files": files, "weights": dict(weights)})
    by_tag = {tag: ENGINE_FILES[kind] for kind, tag in SHA_TAGS.items()} | {PLAN_SHA_TAG: ENGINE_FILES["tensorrt"]}
    tags = {tag: files[name] for tag, name in by_tag.items() if name in files}
    tags |= {CONFIG_SHA_TAGS[name]: sha for name, sha in weights.items()}
    tags[MANIFEST_SHA_TAG] = onnx_export.sha256(folder / MANIFEST)
    return files, tags


def registered_problem(tracking_uri: str, ref: ModelRef) -> str | None:
    """Why the files registered for `ref` would not be served now (missing, changed since, or from an
    export that did not register them all), or None: what decides whether a recorded export may be
    skipped."""
    from dicomops.serving.champion import registered_problem as problem

    return problem(tracking_uri, ref.name, ref.version)


def _sample(data: SlabSet, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    idx = np.random.default_rng(seed).permutation(len(data.y))[:n]
    idx.sort()
    return data.x[idx].float().numpy(), data.y[idx].numpy()


def check_data(layout: WorkLayout, contract: InputContract, fold: int) -> tuple[SlabSet, SlabSet]:
    """The slabs that calibrate and check an export: the training and validation parts of `fold`,
    shaped as the contract says."""
    folds = layout.read_folds()
    if fold >= folds.n_splits:
        raise ValueError(f"export.check_fold={fold} but {layout.folds_file} has {folds.n_splits} folds; "
                         f"choose a fold below {folds.n_splits}")
    return (build_slab_set(layout, folds.train(fold), contract.channels, contract.height),
            build_slab_set(layout, folds.val(fold), contract.channels, contract.height))


def _time_session(path: Path, shape: tuple[int, ...], batch: int, threads: int, repeats: int = 20) -> tuple[float, float]:
    """Batch-1 latency (ms) and batch-`batch` throughput (samples/s) of an ONNX Runtime session."""
    sess = onnx_export.session(path, threads)
    name = sess.get_inputs()[0].name
    return _time_runner(lambda x: sess.run(None, {name: x}), shape, batch, repeats)


def _time_runner(run: Any, shape: tuple[int, ...], batch: int, repeats: int = 20) -> tuple[float, float]:
    """Batch-1 latency (ms) and batch-`batch` throughput (samples/s) of an engine's call on slabs."""
    rng = np.random.default_rng(0)
    one, many = rng.random((1, *shape), np.float32), rng.random((batch, *shape), np.float32)
    for _ in range(3):
        run(one), run(many)
    time.sleep(quantize.IDLE_PAUSE_S)  # the engine timed before may still have threads spinning
    start = time.perf_counter()
    for _ in range(repeats):
        run(one)
    latency = (time.perf_counter() - start) / repeats * 1e3
    start = time.perf_counter()
    for _ in range(max(3, repeats // 4)):
        run(many)
    return latency, batch * max(3, repeats // 4) / (time.perf_counter() - start)


def check_dynamic_batch(path: Path, x: np.ndarray, sizes: tuple[int, ...] = (1, 7, 32)) -> float:
    """Max difference of per-sample outputs across batch sizes (zero for a correct dynamic axis)."""
    sess = onnx_export.session(path)
    reference = onnx_export.run_onnx(sess, x[: max(sizes)], batch_size=1)
    worst = 0.0
    for size in sizes:
        got = onnx_export.run_onnx(sess, x[: max(sizes)], batch_size=size)
        worst = max(worst, float(np.abs(got - reference).max()))
    return worst


def export_from_work(layout: WorkLayout, tracking_uri: str, ref: ModelRef, cfg: ExportConfig) -> ExportReport:
    """:func:`export_version` into the work directory's export folder, checked on the slabs of
    ``cfg.check_fold`` (:func:`check_data`). The export is the pipeline's last reader of the training
    slabs, so the process's slab cache is dropped afterwards, whatever the outcome."""
    calibration, validation = check_data(layout, ref.contract, cfg.check_fold)
    try:
        return export_version(layout.export_dir(ref.version), tracking_uri, ref, cfg, calibration, validation,
                              layout=layout)
    finally:
        forget_slabs()


def export_version(folder: Path, tracking_uri: str, ref: ModelRef, cfg: ExportConfig, calibration: SlabSet,
                   validation: SlabSet, threads: int = 2, layout: WorkLayout | None = None) -> ExportReport:
    """Export, check and package `ref` into `folder`: INT8 ranges calibrated on `calibration`, parity
    and the INT8 AUC checked on `validation`. Raise :class:`ExportCheckError` when a check of a file
    fails; an INT8 engine whose own check fails (a series check, OpenVINO's slab check) refuses the
    version instead, and the export stands.
    With ``cfg.int8_held_out``, also FP32, PTQ and QAT INT8 of each fold's model, and QAT's float
    control, on its held-out series (:func:`dicomops.export.qat.held_out`; `layout` is the training's
    work directory)."""
    folder = Path(folder)
    if folder.exists():
        shutil.rmtree(folder)  # a re-export starts clean: no stale engine or repository survives
    folder.mkdir(parents=True)
    report = ExportReport(ref.version, str(folder))
    weights, pre = weights_configs(tracking_uri, ref)
    ref = replace(ref, contract=checked_contract(ref, pre))
    contract = ref.contract
    model, train_cfg = load_torch_model(tracking_uri, ref)
    torch.save(model.state_dict(), folder / "torch_state.pt")  # makes the folder benchmarkable on its own

    parity_x, _ = _sample(validation, cfg.parity_samples, seed=1)
    calib_x, _ = _sample(calibration, cfg.calibration_samples, seed=2)
    val_x, val_y = validation.x.float().numpy(), validation.y.numpy()

    fp32 = onnx_export.export_onnx(model, contract, folder / "model.onnx", cfg.opset, cfg.max_batch)
    parity = onnx_export.check_parity(model, fp32, parity_x, cfg.parity_tolerance)
    batch_x = parity_x if len(parity_x) >= 32 else np.resize(parity_x, (32, *contract.input_shape))
    batch_spread = check_dynamic_batch(fp32, batch_x)
    if batch_spread > cfg.parity_tolerance:
        raise ExportCheckError(f"ONNX outputs differ by {batch_spread:.2e} across batch sizes 1, 7, 32")
    if cfg.int8 == "qat":
        from dicomops.export import qat

        if train_cfg.distill_from is not None and layout is None:
            raise ValueError("QAT of a distilled version learns from its teacher too, which needs the training's "
                             "work directory (its slabs and the teacher's targets); export it with --work")
        teacher = None if layout is None else qat.teacher_of(layout, tracking_uri, ref.run_id, train_cfg, calibration,
                                                             None)
        int8, _ = qat.quantize_qat(model, contract, calibration, folder, opset=cfg.opset, epochs=cfg.qat_epochs,
                                   learning_rate=cfg.qat_learning_rate, calibration=calib_x, teacher=teacher,
                                   flip_axes=train_cfg.flip_axes)
        int8 = int8.replace(folder / "model.int8.onnx")
    else:
        int8 = quantize.quantize_int8(fp32, folder / "model.int8.onnx", calib_x)
    head = quantize.float_head(int8, cfg.int8_float_head, contract.input_shape, cfg.max_batch, threads)
    int8_check = quantize.check_int8(fp32, int8, val_x, val_y, cfg.int8_max_auc_drop)
    series_checks, series_verdicts = (
        _series_check(layout, contract, fp32, int8, train_cfg, cfg, threads) if layout is not None
        else ({}, dict.fromkeys(quantize.SERIES_CHECK_TAGS.values(),
                                "not run: exported without the training's work directory")))
    report.metrics.update({
        "export.onnx.parity_max_abs_diff": parity.max_abs_diff, "export.onnx.parity_samples": parity.samples,
        "export.onnx.batch_spread": batch_spread, "export.int8.auc_fp32": int8_check.auc_fp32,
        "export.int8.auc_int8": int8_check.auc_int8, "export.int8.auc_drop": int8_check.auc_drop,
        "export.int8.max_abs_diff": int8_check.max_abs_diff, "export.int8.validation_samples": int8_check.samples,
    })
    for engine, check in series_checks.items():
        prefix = "export.int8" if engine == "ort-int8" else "export.ov_int8"
        report.metrics.update({"export.int8.series_auc_fp32": check.auc_fp32, "export.int8.series": float(check.samples),
                               f"{prefix}.series_auc_int8": check.auc_int8, f"{prefix}.series_auc_drop": check.auc_drop,
                               f"{prefix}.series_max_abs_diff": check.max_abs_diff})
    if not np.isnan(head.speedup):
        report.metrics["export.int8.float_head_speedup"] = head.speedup
    for label, path in (("ort_fp32", fp32), ("ort_int8", int8)):
        latency, throughput = _time_session(path, contract.input_shape, cfg.max_batch, threads)
        report.metrics[f"export.{label}.latency_ms_b1"] = latency
        report.metrics[f"export.{label}.throughput_b{cfg.max_batch}"] = throughput
    # The two throughputs above are timed one after the other, so load on the cores moves their
    # ratio; INT8's speed-up is also timed with the engines alternated, the firmer figure.
    report.metrics[f"export.ort_int8.speedup_b{cfg.max_batch}"] = quantize.relative_throughput(
        fp32, int8, contract.input_shape, cfg.max_batch, threads)

    report.openvino = "skipped (export.openvino is false)"
    if cfg.openvino:
        report.openvino, slab_refusal = _openvino(contract, cfg, fp32, int8, parity_x, (val_x, val_y), int8_check,
                                                  threads, report)
        if slab_refusal is not None:  # either check withholds OpenVINO's INT8; its tag quotes both
            series_verdicts[quantize.OV_SERIES_CHECK_TAG] = (
                f"{slab_refusal} (series check: {series_verdicts.get(quantize.OV_SERIES_CHECK_TAG, 'not run')})")

    if cfg.int8_held_out:
        report.metrics.update(_held_out(folder, tracking_uri, ref, cfg, layout, bool(head.kept)))

    repo = folder / "model_repository"
    triton.write_model(repo, ref.name, ref.version, "onnxruntime_onnx", fp32, contract, cfg.max_batch,
                       cfg.preferred_batch_sizes, cfg.max_queue_delay_us)
    report.tensorrt = _tensorrt(folder, ref, cfg, fp32, calib_x, parity_x, report)

    report.files, hashes = seal(folder, {"version": ref.version, "metrics": report.metrics,
                                         "tensorrt": report.tensorrt, "openvino": report.openvino, "contract": contract.as_dict(),
                                         "opset": cfg.opset}, weights)
    report.tags = {**hashes,
                   "export.int8.method": (f"qat ({cfg.qat_epochs} epoch(s) torchao PT2E"
                                           f"{', distilled from ' + train_cfg.distill_from if train_cfg.distill_from else ''}"
                                           "; its learnt ranges, float convolution outputs calibrated)"
                                          if cfg.int8 == "qat" else "ptq (ONNX Runtime static QDQ)"),
                   "export.int8.float_convolutions": ", ".join(head.kept) or "none",
                   **series_verdicts,
                   "export.onnx.opset": str(cfg.opset), "export.tensorrt": report.tensorrt,
                   "export.openvino": report.openvino,
                   "export.triton": f"{ref.name} (onnxruntime_onnx)" + (", " + ref.name + "-trt (tensorrt_plan)"
                                                                         if "model.fp16.plan" in report.files else ""),
                   **{k: f"{v:.6g}" for k, v in report.metrics.items()}}
    return report


def _series_check(layout: WorkLayout, contract: InputContract, fp32: Path, int8: Path, train_cfg: TrainConfig,
                  cfg: ExportConfig, threads: int) -> tuple[dict[str, quantize.SeriesCheck], dict[str, str]]:
    """INT8 against FP32 on the series scores of the check fold's validation series, every slab of
    each, by the version's own series rule (:class:`quantize.SeriesCheck`), for each INT8 engine that
    serves the file: ONNX Runtime's and, with ``cfg.openvino``, OpenVINO's, which computes the same
    file with other kernels and roundings. Returns the checks and each engine's verdict tag. A failed
    check is logged and tagged, and that engine then refuses the version (:func:`quantize.int8_refusal`);
    the export itself stands, since FP32 is what it serves by default. Series of one class have no
    AUC: the check is then not run, and says so."""
    from dicomops.training.data import load_volume
    from dicomops.training.scoring import SeriesRule

    labels = layout.labelled_series().set_index("SeriesInstanceUID").label
    uids = layout.read_folds().val(cfg.check_fold)
    if labels.loc[uids].nunique() < 2:
        why = f"not run: fold {cfg.check_fold}'s validation series are all of one class"
        return {}, dict.fromkeys(quantize.SERIES_CHECK_TAGS.values(), why)
    paths = layout.preprocessed.read_index().set_index("SeriesInstanceUID").path
    volumes = {uid: load_volume(layout.preprocessed.volume(paths[uid])) for uid in uids}
    y = {uid: int(labels.loc[uid]) for uid in uids}
    k, size, rule = contract.channels, contract.height, SeriesRule.of(train_cfg)
    start = time.perf_counter()
    reference = quantize.series_scores(fp32, volumes, k, size, rule, threads)
    checks = {"ort-int8": quantize.SeriesCheck.of(reference, quantize.series_scores(int8, volumes, k, size, rule,
                                                                                    threads), y, cfg.int8_max_auc_drop)}
    verdicts = {quantize.OV_SERIES_CHECK_TAG: "not run: export.openvino is false"}
    if cfg.openvino and (reason := openvino_engine.availability()) is not None:
        verdicts[quantize.OV_SERIES_CHECK_TAG] = f"not run: {reason}"
    elif cfg.openvino:
        runner = openvino_engine.OpenVinoRunner(int8, threads, cfg.max_batch)
        try:
            ov8 = quantize.series_scores_by(lambda x: openvino_engine.run_batches(runner, x, cfg.max_batch), volumes,
                                            k, size, rule)
        finally:
            runner.close()
        checks["ov-int8"] = quantize.SeriesCheck.of(reference, ov8, y, cfg.int8_max_auc_drop)
    for engine, check in checks.items():
        verdicts[quantize.SERIES_CHECK_TAGS[engine]] = check.verdict()
        (log.info if check.ok else log.warning)("%s INT8 series check %s", engine, check.verdict())
    log.info("INT8 series checks of %s on %d series: %.1f s", ", ".join(checks), len(uids), time.perf_counter() - start)
    return checks, verdicts


def _held_out(folder: Path, tracking_uri: str, ref: ModelRef, cfg: ExportConfig,
              layout: WorkLayout | None, float_head: bool) -> dict[str, float]:
    """The held-out INT8 comparison: per-series scores and the per-engine table in `folder`, metrics back.
    With `float_head` the folds' INT8 graphs keep their input-resolution convolutions in float, as the
    served one does."""
    from dicomops.export import qat
    from dicomops.training import plots

    if layout is None:
        raise ValueError("export.int8_held_out needs the training's work directory (its folds and slabs)")
    scratch = folder / "held_out"
    rows = qat.held_out(layout, tracking_uri, ref.run_id, ref.contract, scratch, opset=cfg.opset,
                        epochs=cfg.qat_epochs, learning_rate=cfg.qat_learning_rate,
                        calibration_samples=cfg.calibration_samples, float_head=float_head)
    shutil.rmtree(scratch)  # the fold models' files are not this version's
    table = qat.held_out_table(rows.to_dict("records"))
    io.write_csv(folder / "int8_held_out_scores.csv", rows)
    io.write_csv(folder / "int8_held_out.csv", table)
    plots.roc_by_engine(rows, folder / "int8_held_out.png")
    return {f"export.held_out.{row['engine']}.{column}": float(row[column])
            for row in table.to_dict("records") for column in table.columns
            if column != "engine" and not np.isnan(row[column])}


def _openvino(contract: InputContract, cfg: ExportConfig, fp32: Path, int8: Path, parity_x: np.ndarray,
              check: tuple[np.ndarray, np.ndarray], int8_check: quantize.Int8Check, threads: int,
              report: ExportReport) -> tuple[str, str | None]:
    """Compile the two exported files with OpenVINO, check them against ONNX Runtime as the export
    checked ONNX Runtime's (FP32: parity within ``parity_tolerance``; INT8: the validation AUC lost
    against FP32 within ``int8_max_auc_drop``), time them, and say what ran, or say exactly why not;
    with OpenVINO's INT8 verdict where its check failed, else None.

    A failed FP32 parity fails the export: the file or the runtime is wrong. A failed INT8 check
    does not: the INT8 file already passed on ONNX Runtime (:func:`quantize.check_int8`), and what
    lost accuracy is OpenVINO's arithmetic on this CPU (the demo's classifier of 2026-12-07 on an
    AVX2-only Zen 3: 0.9633 on ONNX Runtime, 0.9487 on OpenVINO), so, as for its series check
    (:func:`_series_check`), OpenVINO's INT8 refuses the version and the export stands."""
    reason = openvino_engine.availability()
    if reason is not None:
        log.warning("openvino: skipped (%s)", reason)
        return f"skipped ({reason})", None
    import openvino as ov

    val_x, val_y = check
    ort32 = onnx_export.session(fp32, threads)
    ov32, ov8 = (openvino_engine.OpenVinoRunner(path, threads, cfg.max_batch) for path in (fp32, int8))
    parity = onnx_export.compare(onnx_export.run_onnx(ort32, parity_x), openvino_engine.run_batches(ov32, parity_x),
                                 cfg.parity_tolerance)
    if not parity.ok:
        raise ExportCheckError(f"OpenVINO FP32 parity failed: max |Δp| {parity.max_abs_diff:.2e} against ONNX Runtime "
                               f"(tolerance {cfg.parity_tolerance}); set export.openvino: false to export without it")
    p8 = openvino_engine.run_batches(ov8, val_x)[:, 1]
    auc8 = float(roc_auc_score(val_y, p8))
    drop = int8_check.auc_fp32 - auc8
    refusal = None
    if drop > cfg.int8_max_auc_drop:
        refusal = (f"failed: validation slab AUC {int8_check.auc_fp32:.4f} -> {auc8:.4f} on {len(val_y)} slabs, a drop "
                   f"of {drop:.4f} over the allowed {cfg.int8_max_auc_drop} (ONNX Runtime's INT8 of the same file "
                   f"{int8_check.auc_int8:.4f}); OpenVINO's INT8 refuses the version: serve it with ov-fp32 or ort-fp32 "
                   "(or ort-int8 where its own check passed), or export it with --int8 qat")
        log.warning("openvino INT8 check %s", refusal)
    ort8 = onnx_export.run_onnx(onnx_export.session(int8, threads), val_x)[:, 1]
    integer = openvino_engine.layers(ov8.compiled)
    report.metrics.update({"export.ov_fp32.parity_max_abs_diff": parity.max_abs_diff,
                           "export.ov_int8.auc_int8": auc8, "export.ov_int8.auc_drop": drop,
                           "export.ov_int8.max_abs_diff_vs_ort_int8": float(np.abs(p8 - ort8).max()),
                           "export.ov_int8.integer_layers": float(integer.integer),
                           "export.ov_int8.arithmetic_layers": float(integer.arithmetic)})
    for label, runner in (("ov_fp32", ov32), ("ov_int8", ov8)):
        latency, throughput = _time_runner(runner, contract.input_shape, cfg.max_batch)
        report.metrics[f"export.{label}.latency_ms_b1"] = latency
        report.metrics[f"export.{label}.throughput_b{cfg.max_batch}"] = throughput
    name = ort32.get_inputs()[0].name

    def ort_run(x: np.ndarray) -> Any:
        return ort32.run(None, {name: x})

    for base, runner, key in ((ort_run, ov8, "ov_int8.speedup_vs_ort_fp32"), (ov32, ov8, "ov_int8.speedup"),
                              (ort_run, ov32, "ov_fp32.speedup_vs_ort_fp32")):
        report.metrics[f"export.{key}_b{cfg.max_batch}"] = quantize.alternated_speedup(
            base, runner, contract.input_shape, cfg.max_batch)
    log.info("openvino: FP32 parity %.1e; INT8 validation AUC %.4f (drop %.4f); INT8 layers %s; INT8 %.2fx ONNX Runtime "
             "FP32 at batch %d", parity.max_abs_diff, auc8, drop, integer.describe(),
             report.metrics[f"export.ov_int8.speedup_vs_ort_fp32_b{cfg.max_batch}"], cfg.max_batch)
    return (f"built fp32, int8 (OpenVINO {ov.__version__.split('-')[0]}; INT8 layers: {integer.describe()}"
            f"{'; INT8 refused: it lost validation AUC' if refusal else ''})", refusal)


def _tensorrt(folder: Path, ref: ModelRef, cfg: ExportConfig, fp32: Path, calibration: np.ndarray,
              samples: np.ndarray, report: ExportReport) -> str:
    """Build, check and time the TensorRT engines, or say exactly why not."""
    reason = tensorrt_engine.availability()
    if reason is not None:
        log.warning("tensorrt: skipped (%s)", reason)
        return f"skipped ({reason})"
    reference = onnx_export.run_onnx(onnx_export.session(fp32), samples)
    built = []
    for precision in cfg.tensorrt_precisions:
        source = tensorrt_engine.engine_input(precision, fp32, calibration, folder)
        plan = tensorrt_engine.build_engine(source, folder / f"model.{precision}.plan", ref.contract, cfg.max_batch)
        engine = tensorrt_engine.Engine(plan, ref.contract)
        parity = onnx_export.compare(reference, tensorrt_engine.run_batches(engine, samples, cfg.max_batch),
                                     cfg.tensorrt_parity_tolerance)
        if not parity.ok:
            raise ExportCheckError(
                f"TensorRT {precision} parity failed: max |Δp| {parity.max_abs_diff:.2e} against ONNX Runtime "
                f"(tolerance {cfg.tensorrt_parity_tolerance})")
        timing = tensorrt_engine.time_engine(engine, precision, cfg.max_batch)
        report.metrics.update({f"export.trt_{precision}.parity_max_abs_diff": parity.max_abs_diff,
                               f"export.trt_{precision}.latency_ms_b1": timing.latency_ms_b1,
                               f"export.trt_{precision}.throughput_b{cfg.max_batch}": timing.throughput_b})
        built.append(precision)
    if "fp16" in built:
        triton.write_model(folder / "model_repository", f"{ref.name}-trt", ref.version, "tensorrt_plan",
                           folder / "model.fp16.plan", ref.contract, cfg.max_batch, cfg.preferred_batch_sizes,
                           cfg.max_queue_delay_us)
    import tensorrt as trt

    return f"built {', '.join(built)} (TensorRT {trt.__version__})"


def attach(tracking_uri: str, ref: ModelRef, report: ExportReport) -> None:
    """Attach the files to the version's source run under ``export/`` and tag the version, replacing
    what an earlier export of it left: its files, its ``export.*`` tags, and its ``export.*`` metrics
    that this export did not measure (logged again as NaN, so the run's latest value is this
    export's; a re-export without the held-out comparison or without TensorRT would otherwise show
    the earlier export's figures beside this one's files)."""
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    client = runs.configure_mlflow(tracking_uri)
    if client.list_artifacts(ref.run_id, "export"):
        try:
            get_artifact_repository(client.get_run(ref.run_id).info.artifact_uri).delete_artifacts("export")
        except Exception as err:  # a store that cannot delete: say so, the new files still go up
            log.warning("could not remove the earlier export's files from run %s (%s); they stay beside this "
                        "export's under export/", ref.run_id, err)
    client.log_artifacts(ref.run_id, report.folder, "export")
    earlier = client.get_run(ref.run_id).data.metrics
    stale = {key: float("nan") for key, value in earlier.items()
             if key.startswith("export.") and key not in report.metrics and not np.isnan(value)}
    runs.log_metrics(tracking_uri, ref.run_id, {**report.metrics, **stale})
    for key in client.get_model_version(ref.name, ref.version).tags:
        if key.startswith("export.") and key not in report.tags:  # export.artifacts is set again below
            client.delete_model_version_tag(ref.name, ref.version, key)
    for key, value in report.tags.items():
        client.set_model_version_tag(ref.name, ref.version, key, value)
    artifacts = f"runs:/{ref.run_id}/export (sha256 in manifest.json)"
    client.set_model_version_tag(ref.name, ref.version, "export.artifacts", artifacts)
    registry.describe_export(tracking_uri, ref.name, ref.version, report.metrics, report.tensorrt, artifacts)


def summary_line(report: ExportReport) -> str:
    m = report.metrics
    series = ", ".join(f"{engine} {report.tags.get(tag, 'not run').split(':')[0]}"  # passed, failed, not run
                       for engine, tag in quantize.SERIES_CHECK_TAGS.items())
    return (f"export v{report.version}: ONNX parity {m['export.onnx.parity_max_abs_diff']:.1e}; INT8 AUC drop "
            f"{m['export.int8.auc_drop']:+.4f}; INT8 series check {series}; ORT FP32 "
            f"{m['export.ort_fp32.latency_ms_b1']:.1f} ms at batch 1; tensorrt: {report.tensorrt}; "
            f"openvino: {report.openvino}")


def describe(report: ExportReport) -> dict[str, Any]:
    return {"version": report.version, "folder": report.folder, "tensorrt": report.tensorrt,
            "openvino": report.openvino,
            "metrics": report.metrics, "files": report.files}
