"""A small pipeline against real servers: PostgreSQL, an MLflow server with basic auth on it, and
a Prefect server with an API auth string and CSRF protection on it. Runs, the model version and
the flow runs must land there, and the servers must refuse clients without credentials."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from dicomops.config import SynthConfig
from dicomops.synthetic import generate_corpus

from .conftest import ROOT, Service

pytestmark = pytest.mark.integration
MODEL = "integration-model"
TINY = {
    "preprocess": {"spacing_mm": [2.0, 2.0, 2.0], "crop_xy": 160, "workers": 1},
    "ingest": {"workers": 1},
    "train": {"epochs": 1, "input_size": 32, "batch_size": 16, "num_workers": 0, "model_name": MODEL, "min_auc": 0.0},
    "export": {"parity_samples": 16, "calibration_samples": 16, "max_batch": 8, "preferred_batch_sizes": [8],
               "int8_max_auc_drop": 1.0},
    # The segmenter at toy size: what is checked here is that it trains, registers and exports
    # against the real servers, not how well.
    "segment": {"channels": [4, 8], "strides": [2], "patch": [16, 16, 16], "roi": [48, 48, 16], "batch_size": 4,
                "patches_per_epoch": 8, "epochs": 1, "model_name": f"{MODEL}-segmenter"},
    "experiment": "integration",
}


def _post(service: Service, path: str, body: dict, auth: str | None, csrf: bool = True) -> list[dict]:
    """POST to the Prefect API as a browser would: basic auth, then a CSRF token for this client."""
    headers = {"Content-Type": "application/json"}
    if auth:
        headers["Authorization"] = "Basic " + base64.b64encode(auth.encode()).decode()
    if csrf:
        request = urllib.request.Request(f"{service.url}/csrf-token?client=integration-test", headers=headers)
        with urllib.request.urlopen(request, timeout=30) as response:
            token = json.loads(response.read())["token"]
        headers.update({"Prefect-Csrf-Token": token, "Prefect-Csrf-Client": "integration-test"})
    request = urllib.request.Request(service.url + path, data=json.dumps(body).encode(), headers=headers)
    with urllib.request.urlopen(request, timeout=30) as response:
        return list(json.loads(response.read()))


def test_pipeline_against_postgres_mlflow_and_prefect_servers(mlflow_server: Service, prefect_server: Service,
                                                              tmp_path: Path) -> None:
    src = tmp_path / "src"
    generate_corpus(src, SynthConfig(patients=16, seed=29, fault_rate=0.0, matrix=96, slices=12, workers=1))
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(TINY))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "DICOMOPS_"))}
    env.update({**mlflow_server.env, **prefect_server.env, "DICOMOPS_DEID_KEY": "integration-deid-key-0123456789"})
    result = subprocess.run([sys.executable, "-m", "dicomops.cli", "run", str(src), "--work", str(tmp_path / "work"),
                             "--config", str(tmp_path / "config.yaml")], env=env, cwd=ROOT, capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    import mlflow

    os.environ.update(mlflow_server.env)
    try:
        client = mlflow.tracking.MlflowClient(mlflow_server.url)
        experiment = client.get_experiment_by_name("integration")
        names = {r.info.run_name for r in client.search_runs([experiment.experiment_id])}
        assert {"pipeline", "ingest", "preprocess", "train", "fold-0", "fold-3", "segment", "segment-fold-3"} <= names
        version = client.get_model_version(MODEL, "1")
        assert version.tags["export.onnx.sha256"] and version.tags["monitoring.reference"]
        segmenter = client.get_model_version(f"{MODEL}-segmenter", "1")
        assert segmenter.tags["export.onnx.sha256"] and segmenter.tags["cv.mean_cpm"]
        # Exported again with other settings: the earlier export's files go from the run through the
        # server's artifact proxy, with its credentials (dicomops.export.stage.attach).
        client.log_text(version.run_id, "from an earlier export", "export/earlier.txt")
        again = {**TINY, "export": {**TINY["export"], "parity_samples": 15}}
        (tmp_path / "again.yaml").write_text(yaml.safe_dump(again))
        exported = subprocess.run([sys.executable, "-m", "dicomops.cli", "export", "--work", str(tmp_path / "work"),
                                   "--version", "1", "--model-name", MODEL, "--config", str(tmp_path / "again.yaml")],
                                  env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert exported.returncode == 0, exported.stdout[-3000:] + exported.stderr[-3000:]
        files = {a.path for a in client.list_artifacts(version.run_id, "export")}
        assert "export/model.onnx" in files and "export/earlier.txt" not in files
        assert "could not remove" not in exported.stdout + exported.stderr
    finally:
        for key in mlflow_server.env:
            os.environ.pop(key, None)

    auth = prefect_server.env["PREFECT_API_AUTH_STRING"]
    flow_runs = _post(prefect_server, "/flow_runs/filter", {}, auth)
    assert {"COMPLETED"} == {r["state_type"] for r in flow_runs if r["name"]} and len(flow_runs) >= 5
    with pytest.raises(urllib.error.HTTPError) as refused:  # no credentials, no API
        urllib.request.urlopen(f"{prefect_server.url}/admin/version", timeout=30)
    assert refused.value.code == 401
    with pytest.raises(urllib.error.HTTPError) as no_token:  # credentials but no CSRF token
        _post(prefect_server, "/flow_runs/filter", {}, auth, csrf=False)
    assert no_token.value.code == 403
    with pytest.raises(urllib.error.HTTPError) as refused_mlflow:
        urllib.request.urlopen(f"{mlflow_server.url}/api/2.0/mlflow/experiments/search?max_results=5", timeout=30)
    assert refused_mlflow.value.code == 401
