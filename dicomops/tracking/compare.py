"""Registered versions side by side: the lightweight-model comparison (teacher, student with and
without distillation, INT8 after training and quantisation-aware) as one table, written to the
page of every version in it.

Every figure is one the version's own training or export recorded, read back from the registry:
a classifier's cross-validated series AUC and its per-vendor AUC (version tags), its ONNX Runtime
latency and throughput and its INT8 file's throughput on OpenVINO, and the held-out AUC of its INT8 engines (export metrics on its run); a
segmenter's actionable-call AUC, mean over folds and per vendor (its run's ``cv.actionable_auc``
metrics), and its ONNX Runtime time per volume. Nothing is measured again here, so the table says
what each version was judged by, and "–" where a version was never exported or judged so.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from dicomops.tracking import model_card, registry, runs

ARTIFACT = "comparison"
SECTION = model_card.COMPARISON


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _fmt(value: Any, digits: int = 3) -> str:
    return "–" if _missing(value) else f"{float(value):.{digits}f}"


def _num(raw: Mapping[str, Any], key: str) -> float | None:
    value = raw.get(key)
    return None if value is None else float(value)


def _cv(metrics: Mapping[str, Any], tags: Mapping[str, Any], key: str) -> float | None:
    """A cross-validation figure from the run's metric; the version's tag, rounded to four decimals
    for the registry's page, only where the run has none (rounding it again to three would move
    0.17148 to 0.172)."""
    return _num(metrics, key) if key in metrics else _num(tags, key)


QAT_VS_FP32 = ("vs_fp32", "vs_fp32_low", "vs_fp32_high")  # dicomops.export.qat.held_out_table's columns


def version_row(tracking_uri: str, name: str, version: str) -> dict[str, Any]:
    """One version's figures, as its training and export recorded them."""
    client = runs.configure_mlflow(tracking_uri)
    try:
        mv = client.get_model_version(name, version)
    except Exception as err:
        raise ValueError(f"no version {version} of {name}: {err}") from err
    tags = dict(mv.tags)  # a metric an export no longer measured is NaN (dicomops.export.stage.attach)
    metrics = {k: v for k, v in client.get_run(str(mv.run_id)).data.metrics.items() if not math.isnan(v)}
    row: dict[str, Any] = {"version": f"{name}/{version}", "run_id": str(mv.run_id)}
    if "cv.mean_cpm" in tags:  # a segmenter: its actionable call is what compares with a classifier
        row |= {"network": "3-D U-Net segmenter, actionable call", "distilled_from": None,
                "auc": _num(metrics, "cv.actionable_auc"), "auc_std": None,
                "latency": _num(tags, "export.onnx_s_per_volume"), "latency_unit": "s per volume",
                "batch": None, "fp32_per_s": None, "int8_per_s": None, "int8_speedup": None, "ov_int8_per_s": None,
                "ov_int8_speedup": None, "ptq_auc": None,
                "qat_auc": None, **dict.fromkeys(QAT_VS_FP32)}
        row |= {f"auc.{k.rsplit('.', 1)[1]}": v for k, v in metrics.items() if k.startswith("cv.actionable_auc.")}
        return row
    latency = _num(metrics, "export.ort_fp32.latency_ms_b1")
    # Throughput at the export's batch (export.max_batch), whichever that was.
    batch = next((k.rsplit("_b", 1)[1] for k in sorted(metrics) if k.startswith("export.ort_fp32.throughput_b")), None)
    row |= {"network": tags.get("architecture", "resnet-slim"), "distilled_from": tags.get("distilled_from"),
            "auc": _cv(metrics, tags, "cv.mean_auc"), "auc_std": _cv(metrics, tags, "cv.std_auc"),
            "latency": latency, "latency_unit": "ms per slab",
            "batch": batch, "fp32_per_s": _num(metrics, f"export.ort_fp32.throughput_b{batch}"),
            "int8_per_s": _num(metrics, f"export.ort_int8.throughput_b{batch}"),
            "int8_speedup": _num(metrics, f"export.ort_int8.speedup_b{batch}"),  # exports since 2026-12-03
            # exports since 2026-12-07: the INT8 file on OpenVINO, over ONNX Runtime FP32 timed in turns
            "ov_int8_per_s": _num(metrics, f"export.ov_int8.throughput_b{batch}"),
            "ov_int8_speedup": _num(metrics, f"export.ov_int8.speedup_vs_ort_fp32_b{batch}"),
            "ptq_auc": _num(metrics, "export.held_out.int8-ptq.mean_fold_auc"),
            "qat_auc": _num(metrics, "export.held_out.int8-qat.mean_fold_auc"),
            # exports since 2026-12-05: QAT's difference from FP32 on the held-out folds, with its interval
            **{key: _num(metrics, f"export.held_out.int8-qat.{key}") for key in QAT_VS_FP32}}
    row |= {f"auc.{k.split('.', 2)[2]}": float(v) for k, v in (tags | metrics).items() if k.startswith("cv.auc.")}
    return row


def comparison(tracking_uri: str, refs: Sequence[tuple[str, str]]) -> pd.DataFrame:
    """The rows of `refs` (model, version), in that order."""
    if not refs:
        raise ValueError("name at least one version to compare")
    return pd.DataFrame([version_row(tracking_uri, name, version) for name, version in refs])


def vendors(table: pd.DataFrame) -> list[str]:
    return sorted(c.split(".", 1)[1] for c in table.columns if c.startswith("auc."))


def markdown(table: pd.DataFrame) -> str:
    """The table as a version page shows it."""
    vs = vendors(table)
    header = ("version", "network", "distilled from", "CV AUC", *vs, "ORT FP32, batch 1",
              "ORT FP32 / INT8 throughput", "held-out INT8 AUC, PTQ / QAT")
    rows = []
    for r in table.to_dict("records"):
        auc = _fmt(r["auc"]) + ("" if _missing(r["auc_std"]) else f" ± {_fmt(r['auc_std'])}")
        latency = "–" if _missing(r["latency"]) else f"{r['latency']:.2f} {r['latency_unit']}"
        rate = "–" if _missing(r["fp32_per_s"]) else (
            f"{r['fp32_per_s']:.0f} / {_fmt(r['int8_per_s'], 0)} slabs/s at batch {r['batch']}"
            + ("" if _missing(r.get("int8_speedup")) else f"; INT8 {r['int8_speedup']:.2f}× alternated")
            + ("" if _missing(r.get("ov_int8_per_s")) else f"; OpenVINO INT8 {r['ov_int8_per_s']:.0f} slabs/s, "
               f"{_fmt(r.get('ov_int8_speedup'), 2)}× ORT FP32 alternated"))
        int8 = "–" if _missing(r["ptq_auc"]) and _missing(r["qat_auc"]) else f"{_fmt(r['ptq_auc'])} / {_fmt(r['qat_auc'])}"
        if not _missing(r.get("vs_fp32")):
            int8 += f"; QAT − FP32 {r['vs_fp32']:+.3f} ({r['vs_fp32_low']:+.3f} to {r['vs_fp32_high']:+.3f})"
        rows.append([r["version"], str(r["network"]), "–" if _missing(r["distilled_from"]) else r["distilled_from"],
                     auc, *[_fmt(r.get(f"auc.{v}")) for v in vs], latency, rate, int8])
    lines = model_card.table(header, "lll" + "r" * (len(header) - 3), rows)
    return "\n".join([*lines, "", "CV AUC: series AUC of each fold's model on its validation series, mean ± sd over "
                      "folds; by vendor as each training reports it. A segmenter's is its actionable call's. "
                      "INT8 × alternated: INT8 over FP32 throughput with the two engines timed in turns, "
                      "which load on the cores moves less than the two throughputs' ratio; OpenVINO INT8: the "
                      "same INT8 file on OpenVINO's CPU plugin (--engine ov-int8). QAT − FP32: the "
                      "difference of the held-out mean fold AUCs, with its 95 % paired bootstrap interval."])


def publish(tracking_uri: str, table: pd.DataFrame) -> None:
    """The table on every compared version's page (section *Compared with*) and as
    ``comparison/comparison.csv`` in its run."""
    client = runs.configure_mlflow(tracking_uri)
    body = markdown(table)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "comparison.csv"
        table.drop(columns=["run_id"]).to_csv(path, index=False)
        for r in table.to_dict("records"):
            name, version = str(r["version"]).rsplit("/", 1)
            registry.describe_comparison(tracking_uri, name, version, body)
            client.log_artifact(str(r["run_id"]), str(path), ARTIFACT)
