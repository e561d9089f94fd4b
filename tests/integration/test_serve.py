"""`dicomops serve`'s stack for real: a Prefect server on a loopback port, the deployments of
prefect.yaml registered with their schedule and trigger, and a process worker polling the pool; the
automation named after its event, incoming/ created, and a flow run `make run` made beforehand in
ephemeral mode visible in the server's API (one database)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import pytest

from dicomops.monitoring.alerts import EVENT
from dicomops.serving import start

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]

# A flow that records its run's id: run in ephemeral mode, as `make run` runs the pipeline.
EPHEMERAL_FLOW = textwrap.dedent("""
    import pathlib, sys
    from prefect import flow
    from prefect.runtime import flow_run

    @flow(name="made-in-ephemeral-mode")
    def made() -> str:
        return str(flow_run.id)

    pathlib.Path(sys.argv[1]).write_text(made())
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _post(url: str, body: dict) -> list[dict]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return list(json.loads(response.read()))


def _project(tmp_path: Path) -> Path:
    """A project folder without incoming/ or .prefect/: the repository's deployments and flows."""
    project = tmp_path / "project"
    project.mkdir()
    for name in ("prefect.yaml", "flows", "tasks"):
        (project / name).symlink_to(ROOT / name)
    return project


def _run_as_make_run_does(project: Path, tmp_path: Path) -> str:
    """Run a flow in ephemeral mode in the environment the Makefile exports, from the project folder;
    return the flow run's id."""
    script, out = tmp_path / "ephemeral.py", tmp_path / "flow-run-id"
    script.write_text(EPHEMERAL_FLOW)
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_HOME", "PREFECT_API_URL")}
    recipe = "ephemeral: ; @$(FLOW_PY) $(FLOW_SCRIPT) $(FLOW_OUT)"
    made = subprocess.run(["make", "-s", "-f", str(ROOT / "Makefile"), "--eval", recipe, "ephemeral",
                           f"FLOW_PY={sys.executable}", f"FLOW_SCRIPT={script}", f"FLOW_OUT={out}"],
                          cwd=project, env=env, capture_output=True, text=True, timeout=300)
    assert made.returncode == 0 and out.exists(), made.stdout[-2000:] + made.stderr[-3000:]
    return out.read_text()


def test_serve_registers_scheduled_and_triggered_deployments_and_a_worker(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    project = _project(tmp_path)
    # Neither sets where Prefect keeps its state: serve's default must be the Makefile's.
    monkeypatch.delenv("PREFECT_HOME", raising=False)
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    flow_run_id = _run_as_make_run_does(project, tmp_path)
    assert not (project / "incoming").exists()
    stack = start(project, port=_free_port(), log=tmp_path / "serve.log")
    try:
        assert (project / "incoming").is_dir() and stack.incoming == project.resolve() / "incoming"
        assert stack.database == str(project.resolve() / ".prefect" / "prefect.db")
        deployments = {d["name"]: d for d in _post(f"{stack.api_url}/deployments/filter", {})}
        assert set(deployments) == {"pipeline", "monitor", "retrain"}
        assert all(d["description"].startswith("Started ") for d in deployments.values())
        (schedule,) = deployments["monitor"]["schedules"]
        assert schedule["schedule"]["cron"] == "0 2 * * *" and schedule["active"]
        assert schedule["schedule"]["timezone"] == "UTC" and schedule["slug"] == "nightly-0200-UTC"
        limits = _post(f"{stack.api_url}/concurrency_limits/filter", {})
        assert {(c["tag"], c["concurrency_limit"]) for c in limits} == {("cpu-heavy", 1)}
        automations = _post(f"{stack.api_url}/automations/filter", {})
        (automation,) = [a for a in automations if EVENT in json.dumps(a["trigger"])]
        assert automation["name"] == f"retrain on {EVENT}"
        assert EVENT in automation["description"] and "monitor deployment" in automation["description"]
        assert automation["trigger"]["expect"] == [EVENT]
        (action,) = automation["actions"]
        assert action["type"] == "run-deployment" and action["deployment_id"] == deployments["retrain"]["id"]
        # The flow run made in ephemeral mode before the server started is in the server's database.
        runs = _post(f"{stack.api_url}/flow_runs/filter", {"flow_runs": {"id": {"any_": [flow_run_id]}}})
        assert [(r["id"], r["state_type"]) for r in runs] == [(flow_run_id, "COMPLETED")]
        deadline, workers = time.monotonic() + 60, []
        while time.monotonic() < deadline and not workers:
            workers = _post(f"{stack.api_url}/work_pools/dicomops/workers/filter", {})
            time.sleep(2)
        assert workers, (tmp_path / "serve.log").read_text()[-3000:]
    finally:
        stack.stop()
