"""Prefect's ephemeral API is a dependency, not the verdict: telemetry off, a lost API after the
flow's body finished is a warning, and the exit code follows the flow's own result."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml
from typer.testing import CliRunner

from dicomops.cli import TELEMETRY_OFF, app
from tests.hostile import ct_slice

ROOT = Path(__file__).resolve().parents[2]


def test_the_cli_turns_telemetry_off_before_prefect_is_imported() -> None:
    code = """
import os, sys
from dicomops import cli
assert "prefect" not in sys.modules and "mlflow" not in sys.modules
sys.argv = ["dicomops", "ingest", "/nonexistent-folder"]
try:
    cli.app()
except SystemExit as exit:
    assert exit.code == 2, exit.code
from prefect.settings import get_current_settings
from prefect._internal.analytics.enabled import is_telemetry_enabled
assert get_current_settings().server.analytics_enabled is False
assert not is_telemetry_enabled()
from mlflow.telemetry.utils import is_telemetry_disabled
assert is_telemetry_disabled()
print("ok")
"""
    env = {k: v for k, v in os.environ.items() if k not in TELEMETRY_OFF}
    env["PYTHONPATH"] = str(ROOT)
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_an_explicit_telemetry_setting_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    from dicomops.cli import _telemetry_off

    monkeypatch.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "true")
    monkeypatch.delenv("MLFLOW_DISABLE_TELEMETRY", raising=False)
    _telemetry_off()
    assert os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] == "true"
    assert os.environ["MLFLOW_DISABLE_TELEMETRY"] == "true"


def test_flows_started_by_a_worker_run_without_telemetry() -> None:
    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    envs = [spec.get("definitions", {}).get("job_env")] if "definitions" in spec else []
    for deployment in spec["deployments"]:
        env = deployment.get("work_pool", {}).get("job_variables", {}).get("env")
        assert env is not None, f"deployment {deployment['name']} sets no job env"
        envs.append(env)
    for env in envs:
        if env is not None:
            assert {k: str(v).lower() for k, v in env.items() if k in TELEMETRY_OFF} == {
                k: v.lower() for k, v in TELEMETRY_OFF.items()}
    docker = (ROOT / "Dockerfile").read_text()
    for name, value in TELEMETRY_OFF.items():
        assert f"{name}={value}" in docker


@pytest.fixture()
def small_series(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    src.mkdir()
    for i in range(10):
        ct_slice(z=float(i), SeriesInstanceUID="1.2.826.0.1.3680043.99.7").save_as(
            src / f"{i:02d}.dcm", enforce_file_format=True)
    return src


def _lose_the_api_at_the_final_state(monkeypatch: pytest.MonkeyPatch) -> None:
    """The ephemeral server gone just as the flow proposes its final state (seen after 531 files)."""
    from prefect.flow_engine import FlowRunEngine

    original = FlowRunEngine.set_state

    def set_state(self: FlowRunEngine, state: object, force: bool = False) -> object:
        if getattr(state, "is_final", lambda: False)():
            raise httpx.ConnectError("All connection attempts failed")
        return original(self, state, force)  # type: ignore[arg-type]

    monkeypatch.setattr(FlowRunEngine, "set_state", set_state)


@pytest.mark.usefixtures("prefect_harness", "mlflow_env")
def test_a_lost_api_after_a_finished_flow_is_not_a_failure(
        small_series: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _lose_the_api_at_the_final_state(monkeypatch)
    result = CliRunner().invoke(app, ["ingest", str(small_series), "--work", str(tmp_path / "w"), "--workers", "1"])
    assert result.exit_code == 0, result.output
    assert "did not record its final state" in result.output
    assert "ingest finished" in result.output and "1 series accepted" in result.output


@pytest.mark.usefixtures("prefect_harness", "mlflow_env")
def test_a_failed_log_shipment_does_not_change_the_exit_code(
        small_series: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from prefect.logging.handlers import APILogWorker

    shipped: list[int] = []

    async def lost(self: APILogWorker, items: list[bytes]) -> None:
        shipped.append(len(items))
        raise httpx.ConnectError("All connection attempts failed")

    monkeypatch.setattr(APILogWorker, "_handle_batch", lost)
    result = CliRunner().invoke(app, ["ingest", str(small_series), "--work", str(tmp_path / "w"), "--workers", "1"])
    APILogWorker.drain_all(timeout=5)
    assert result.exit_code == 0, result.output
    assert "ingest finished" in result.output and shipped  # the failure happened, and cost nothing


@pytest.mark.usefixtures("prefect_harness", "mlflow_env")
def test_a_failing_flow_still_fails_when_the_api_is_lost(
        small_series: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (small_series / "junk.txt").write_text("not dicom")
    (small_series / "junk2.txt").write_text("not dicom")
    _lose_the_api_at_the_final_state(monkeypatch)
    result = CliRunner().invoke(app, ["ingest", str(small_series), "--work", str(tmp_path / "w"), "--workers", "1",
                                      "--max-invalid-fraction", "0.1"])
    assert result.exit_code != 0
    assert "did not record its final state" not in result.output
