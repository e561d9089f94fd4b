"""`dicomops serve`'s stack for real: a Prefect server on a loopback port, the deployments of
prefect.yaml registered with their schedule and trigger, and a process worker polling the pool."""

from __future__ import annotations

import json
import socket
import time
import urllib.request
from pathlib import Path

import pytest

from dicomops.serving import start

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _post(url: str, body: dict) -> list[dict]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return list(json.loads(response.read()))


def test_serve_registers_scheduled_and_triggered_deployments_and_a_worker(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect-home"))
    stack = start(ROOT, port=_free_port(), log=tmp_path / "serve.log")
    try:
        deployments = {d["name"]: d for d in _post(f"{stack.api_url}/deployments/filter", {})}
        assert set(deployments) == {"pipeline", "monitor", "retrain"}
        (schedule,) = deployments["monitor"]["schedules"]
        assert schedule["schedule"]["cron"] == "0 2 * * *" and schedule["active"]
        limits = _post(f"{stack.api_url}/concurrency_limits/filter", {})
        assert {(c["tag"], c["concurrency_limit"]) for c in limits} == {("cpu-heavy", 1)}
        automations = _post(f"{stack.api_url}/automations/filter", {})
        assert any("dicomops.drift.detected" in json.dumps(a["trigger"]) for a in automations)
        deadline, workers = time.monotonic() + 60, []
        while time.monotonic() < deadline and not workers:
            workers = _post(f"{stack.api_url}/work_pools/dicomops/workers/filter", {})
            time.sleep(2)
        assert workers, (tmp_path / "serve.log").read_text()[-3000:]
    finally:
        stack.stop()
