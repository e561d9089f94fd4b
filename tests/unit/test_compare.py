"""Versions side by side (`dicomops compare`): read back from a real MLflow registry as training
and export recorded them, and written on every compared version's page."""

from __future__ import annotations

from pathlib import Path

import pytest

import mlflow
from dicomops.tracking import compare, model_card
from dicomops.tracking.registry import parse_ref


def _version(client: mlflow.tracking.MlflowClient, name: str, tags: dict[str, str], metrics: dict[str, float],
             tmp_path: Path) -> str:
    experiment = client.get_experiment_by_name("compare") or client.get_experiment(
        client.create_experiment("compare", artifact_location=str(tmp_path / "artifacts")))
    run = client.create_run(experiment.experiment_id)
    for key, value in metrics.items():
        client.log_metric(run.info.run_id, key, value)
    client.set_terminated(run.info.run_id)
    if not client.search_registered_models(f"name = '{name}'"):
        client.create_registered_model(name)
    card = model_card.section(model_card.DECISION, "pending") + "\n" + model_card.section(model_card.REVIEW, "how")
    mv = client.create_model_version(name, f"runs:/{run.info.run_id}/model", run.info.run_id, tags=tags,
                                     description=card)
    return str(mv.version)


def test_versions_compare_as_their_training_and_export_recorded_them(mlflow_env: str, tmp_path: Path) -> None:
    client = mlflow.tracking.MlflowClient(mlflow_env)
    seg = _version(client, "seg", {"cv.mean_cpm": "0.9590", "export.onnx_s_per_volume": "2.40"},
                   {"cv.actionable_auc": 1.0, "cv.actionable_auc.ge": 1.0, "cv.actionable_auc.philips": 0.986}, tmp_path)
    plain = _version(client, "clf", {"architecture": "mobilenet-v3-small", "cv.mean_auc": "0.7000",
                                     "cv.std_auc": "0.1715", "cv.auc.ge": "0.8000", "cv.auc.philips": "0.6000"},
                     # The training run's figures win over the version's tags and are rounded once: 0.17148
                     # reads 0.171, where its tag "0.1715" would read 0.172.
                     {"cv.std_auc": 0.17148, "cv.auc.philips": 0.625}, tmp_path)
    student = _version(client, "clf", {"architecture": "mobilenet-v3-small", "distilled_from": f"seg/{seg}",
                                       "cv.mean_auc": "0.8000", "cv.std_auc": "0.0200", "cv.auc.ge": "0.9000",
                                       "cv.auc.philips": "0.7000"},
                       {"export.ort_fp32.latency_ms_b1": 0.96, "export.ort_fp32.throughput_b32": 1625.0,
                        "export.ort_int8.throughput_b32": 1225.0, "export.ort_int8.speedup_b32": 0.81,
                        "export.ov_int8.throughput_b32": 3400.0, "export.ov_int8.speedup_vs_ort_fp32_b32": 2.1,
                        "export.held_out.int8-ptq.mean_fold_auc": 0.79,
                        "export.held_out.int8-qat.mean_fold_auc": 0.795, "export.held_out.int8-qat.vs_fp32": -0.005,
                        "export.held_out.int8-qat.vs_fp32_low": -0.031, "export.held_out.int8-qat.vs_fp32_high": 0.02},
                       tmp_path)

    table = compare.comparison(mlflow_env, [parse_ref(f"seg/{seg}", "clf"), parse_ref(plain, "clf"),
                                            parse_ref(student, "clf")])
    assert list(table.version) == [f"seg/{seg}", f"clf/{plain}", f"clf/{student}"]
    assert compare.vendors(table) == ["ge", "philips"]
    text = compare.markdown(table).replace(model_card.PAD, "")
    rows = [line for line in text.splitlines() if line.startswith("| ") and "/" in line.split("|")[1]]
    assert "| 1.000 |" in rows[0] and "0.986" in rows[0] and "2.40 s per volume" in rows[0]
    assert "0.700 ± 0.171" in rows[1] and "| 0.625 |" in rows[1] and rows[1].count("–") >= 4  # never exported
    assert f"seg/{seg}" in rows[2] and "0.800 ± 0.020" in rows[2] and "0.96 ms per slab" in rows[2]
    assert "1625 / 1225 slabs/s at batch 32; INT8 0.81× alternated" in rows[2] and "0.790 / 0.795" in rows[2]
    assert "OpenVINO INT8 3400 slabs/s, 2.10× ORT FP32 alternated" in rows[2] and "OpenVINO" not in rows[0] + rows[1]
    assert "QAT − FP32 -0.005 (-0.031 to +0.020)" in rows[2] and "QAT − FP32" not in rows[1]

    compare.publish(mlflow_env, table)
    for name, version in (("seg", seg), ("clf", plain), ("clf", student)):
        mv = client.get_model_version(name, version)
        sections = list(model_card.split_sections(mv.description))
        assert sections == [model_card.DECISION, model_card.COMPARISON, model_card.REVIEW], sections
        assert "0.800 ± 0.020" in mv.description
        assert [a.path for a in client.list_artifacts(mv.run_id, compare.ARTIFACT)] == ["comparison/comparison.csv"]
    compare.publish(mlflow_env, table)  # again: the section is replaced, not repeated
    assert client.get_model_version("clf", plain).description.count(f"## {model_card.COMPARISON}") == 1

    # From the command line, as the README says; a version that does not exist is refused with its name.
    from typer.testing import CliRunner

    from dicomops.cli import app

    shown = CliRunner().invoke(app, ["compare", f"seg/{seg}", student, "--model-name", "clf", "--no-publish"])
    assert shown.exit_code == 0, shown.output
    assert "0.800 ± 0.020" in shown.output and "2.40 s per volume" in shown.output
    refused = CliRunner().invoke(app, ["compare", "99", "--model-name", "clf"])
    assert refused.exit_code == 2 and "no version 99 of clf" in refused.output
    with pytest.raises(ValueError, match="no version 99 of clf"):
        compare.comparison(mlflow_env, [("clf", "99")])
    with pytest.raises(ValueError, match="names no version"):
        parse_ref("seg/latest", "clf")


def test_a_re_export_replaces_what_the_earlier_export_recorded(mlflow_env: str, tmp_path: Path) -> None:
    import math

    from dicomops.export.contract import InputContract
    from dicomops.export.stage import ExportReport, ModelRef, attach

    client = mlflow.tracking.MlflowClient(mlflow_env)
    version = _version(client, "clf", {"cv.mean_auc": "0.8000"}, {}, tmp_path)
    run_id = client.get_model_version("clf", version).run_id
    contract = InputContract(channels=3, height=32, width=32, spacing_mm=(1.0, 1.0, 1.0), orientation="RAS",
                             window="lung", window_center=None, window_width=None, crop_xy=320, resize="area",
                             value_range=(0.0, 1.0), threshold=0.5, series_score="mean of the 3 highest")
    ref = ModelRef("clf", version, run_id, contract)

    def report(folder: str, metrics: dict[str, float], files: tuple[str, ...]) -> ExportReport:
        (tmp_path / folder).mkdir()
        for name in files:
            (tmp_path / folder / name).write_text(name)
        return ExportReport(version, str(tmp_path / folder), metrics=metrics,
                            tags={key: f"{value:.6g}" for key, value in metrics.items()})

    measured = {"export.onnx.parity_max_abs_diff": 1e-6, "export.int8.auc_fp32": 0.9, "export.int8.auc_int8": 0.89,
                "export.int8.auc_drop": 0.01, "export.ort_fp32.latency_ms_b1": 0.5,
                "export.ort_fp32.throughput_b32": 1000.0, "export.ort_int8.throughput_b32": 1200.0}
    held_out = {"export.held_out.int8-ptq.mean_fold_auc": 0.79, "export.held_out.int8-qat.mean_fold_auc": 0.795}
    attach(mlflow_env, ref, report("first", {**measured, **held_out}, ("model.onnx", "int8_held_out.csv")))
    assert compare.version_row(mlflow_env, "clf", version)["qat_auc"] == 0.795
    # Again without the held-out comparison: its figures and file are the earlier export's, so they go.
    attach(mlflow_env, ref, report("second", {**measured, "export.ort_fp32.throughput_b32": 900.0}, ("model.onnx",)))
    tags = client.get_model_version("clf", version).tags
    assert not [key for key in tags if key.startswith("export.held_out")]
    assert tags["export.ort_fp32.throughput_b32"] == "900" and "export.artifacts" in tags
    metrics = client.get_run(run_id).data.metrics
    assert all(math.isnan(metrics[key]) for key in held_out) and metrics["export.ort_fp32.throughput_b32"] == 900.0
    row = compare.version_row(mlflow_env, "clf", version)
    assert row["qat_auc"] is None and row["ptq_auc"] is None and row["fp32_per_s"] == 900.0
    assert [a.path for a in client.list_artifacts(run_id, "export")] == ["export/model.onnx"]
