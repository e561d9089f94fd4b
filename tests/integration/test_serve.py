"""`dicomops serve` for real, as an operator starts it: the embedded PACS (Orthanc with DICOMweb,
auth on) beside a Prefect server on a loopback port, the deployments of prefect.yaml registered
with their schedules, trigger and concurrency limit, and a process worker polling the pool; the
automation named after its event, incoming/ and staging/ created, and a flow run `make run` made
beforehand in ephemeral mode visible in the server's API (one database). A study sent to the PACS
over STOW-RS is taken by a pacs-watch run the worker starts (the PACS's address reaches it, the
password reaches nobody else), a second run started beside it is cancelled, and SIGTERM stops it
all. The banner never prints the password."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import secrets
import signal
import socket
import stat
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pandas as pd
import pydicom
import pytest

from dicomops import stack as serving
from dicomops.monitoring.alerts import EVENT
from dicomops.pacs.client import PASSWORD_ENV, URL_ENV, USER_ENV, PacsClient, PacsCredentials

from .orthanc_fixture import require_orthanc, synthetic_study

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
STUDY_EVENT = "dicomops.study.stable"
BANNER_END = "Ctrl-C or SIGTERM stops everything."

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


def _call(url: str, body: dict | None = None) -> Any:
    """The Prefect API as the stack calls it (retrying the 503 of a locked SQLite database)."""
    return serving._api("GET" if body is None else "POST", url, body)


def _post(url: str, body: dict) -> list[dict]:
    return list(_call(url, body))


def _status(url: str, credentials: PacsCredentials | None) -> int:
    headers = {}
    if credentials is not None:
        token = base64.b64encode(f"{credentials.user}:{credentials.password}".encode()).decode()
        headers["Authorization"] = f"Basic {token}"
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as err:
        return err.code


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


def _wait_for_banner(serve: subprocess.Popen[bytes], log: Path, timeout: float = 300.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace")
        if BANNER_END in text:
            return text
        assert serve.poll() is None, f"dicomops serve exited with {serve.returncode}:\n{text[-4000:]}"
        time.sleep(1)
    raise AssertionError(f"no banner within {timeout:.0f} s:\n{log.read_text(errors='replace')[-4000:]}")


def _processes(root: int) -> dict[str, list[int]]:
    """The stack's processes under `root` by role, from their command lines."""
    roles: dict[str, list[int]] = {"server": [], "worker": [], "orthanc": []}
    for pid in serving._family(root):
        with contextlib.suppress(OSError):
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            if Path(argv[0].decode()).name == "Orthanc":
                roles["orthanc"].append(pid)
            elif argv[1:3] == [b"-m", b"prefect"] and argv[4:5] == [b"start"] and argv[3] in (b"server", b"worker"):
                roles[argv[3].decode()].append(pid)
    return roles


def _environ(pid: int) -> dict[str, str]:
    pairs = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(p.decode(errors="replace").split("=", 1) for p in pairs if b"=" in p)


def _wait_final(api: str, run_ids: list[str], timeout: float = 300.0) -> dict[str, dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        runs = {r["id"]: r for r in _post(f"{api}/flow_runs/filter", {"flow_runs": {"id": {"any_": run_ids}}})}
        if all(runs[i]["state_type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") for i in run_ids):
            return runs
        time.sleep(2)
    raise AssertionError(f"flow runs not final within {timeout:.0f} s: {[runs[i]['state_name'] for i in run_ids]}")


def _busy_runs(api: str, deployment_id: str) -> list[dict]:
    return _post(f"{api}/flow_runs/filter", {"flow_runs": {
        "deployment_id": {"any_": [deployment_id]}, "state": {"type": {"any_": ["PENDING", "RUNNING"]}}}})


def test_serve_runs_the_pacs_beside_prefect_and_a_study_sent_to_it_is_taken(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    require_orthanc()
    project = _project(tmp_path)
    # Neither sets where Prefect keeps its state: serve's default must be the Makefile's.
    monkeypatch.delenv("PREFECT_HOME", raising=False)
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    flow_run_id = _run_as_make_run_does(project, tmp_path)
    assert not (project / "incoming").exists()

    credentials = PacsCredentials("integration", secrets.token_urlsafe(18))
    port, pacs_port, redis_port = _free_port(), _free_port(), _free_port()
    redis_password = secrets.token_urlsafe(18)
    api, pacs_url = f"http://127.0.0.1:{port}/api", f"http://127.0.0.1:{pacs_port}"
    env = {k: v for k, v in os.environ.items()
           if k not in (URL_ENV, "DICOMOPS_PACS_STORAGE", "DICOMOPS_PACS_STAGING", "DICOMOPS_WORK_DIR")}
    env.pop("DICOMOPS_REDIS_URL", None)
    env.update({USER_ENV: credentials.user, PASSWORD_ENV: credentials.password, "COLUMNS": "300",
                "DICOMOPS_REDIS_PASSWORD": redis_password,
                "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}",
                "DICOMOPS_MLFLOW_ARTIFACT_ROOT": str(tmp_path / "mlflow" / "artifacts")})
    log = tmp_path / "serve.log"
    started = time.monotonic()
    with open(log, "wb") as out:
        serve = subprocess.Popen([sys.executable, "-m", "dicomops.cli", "serve", "--port", str(port), "--pacs-port",
                                  str(pacs_port), "--pacs-stable-age", "1", "--redis-port", str(redis_port)], cwd=project, env=env, stdout=out,
                                 stderr=subprocess.STDOUT, start_new_session=True)
    family: list[int] = []
    try:
        banner = " ".join(_wait_for_banner(serve, log).split())
        print(f"serve ready in {time.monotonic() - started:.0f} s")
        family = serving._family(serve.pid)

        # The PACS: on the port given, auth on, DICOMweb below it, storage private and ignored by git.
        assert _status(f"{pacs_url}/system", None) == 401
        assert _status(f"{pacs_url}/system", PacsCredentials(credentials.user, "wrong-password")) == 401
        assert _status(f"{pacs_url}/system", credentials) == 200
        assert _status(f"{pacs_url}/dicom-web/studies", credentials) == 200
        storage = project.resolve() / "pacs"
        assert (storage / "db").is_dir() and stat.S_IMODE(storage.stat().st_mode) == 0o700
        assert (storage / ".gitignore").read_text().splitlines()[-1] == "*"
        assert stat.S_IMODE((project / "staging").stat().st_mode) == 0o700
        assert f"PACS (Orthanc): {pacs_url} (loopback clients only; user integration" in banner
        assert f"DICOMweb root: {pacs_url}/dicom-web/" in banner
        assert f"pacs-watch watches the PACS at {pacs_url}" in banner
        assert f"MLflow store: {tmp_path / 'mlflow' / 'mlflow.db'}" in banner
        redis_url = f"redis://127.0.0.1:{redis_port}/0"
        assert f"volume cache: Redis at {redis_url}" in banner and redis_password not in banner

        # The PACS's address and password reach the worker (and so its flow runs); the password
        # reaches neither the Prefect server nor anything it started.
        roles = _processes(serve.pid)
        assert all(roles.values()), roles
        (worker,) = roles["worker"]
        assert _environ(worker)[URL_ENV] == pacs_url and _environ(worker)[PASSWORD_ENV] == credentials.password
        assert _environ(worker)["DICOMOPS_REDIS_URL"] == redis_url
        for pid in roles["server"] + [p for s in roles["server"] for p in serving._family(s)]:
            with contextlib.suppress(OSError):
                server_environ = Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace")
                assert credentials.password not in server_environ and redis_password not in server_environ

        # Prefect: what serve has always set up.
        assert (project / "incoming").is_dir()
        assert f"Prefect database: {project.resolve() / '.prefect' / 'prefect.db'}" in banner
        deployments = {d["name"]: d for d in _post(f"{api}/deployments/filter", {})}
        assert set(deployments) == {"pipeline", "monitor", "monitor-pacs", "retrain", "pacs-watch", "feedback", "predict"}
        assert all(d["description"].startswith("Started ") for d in deployments.values())
        (schedule,) = deployments["monitor"]["schedules"]
        assert schedule["schedule"]["cron"] == "0 2 * * *" and schedule["active"]
        assert schedule["schedule"]["timezone"] == "UTC" and schedule["slug"] == "nightly-0200-UTC"
        limits = _post(f"{api}/concurrency_limits/filter", {})
        assert {(c["tag"], c["concurrency_limit"]) for c in limits} == {("cpu-heavy", 1)}
        automations = _post(f"{api}/automations/filter", {})
        (automation,) = [a for a in automations if EVENT in json.dumps(a["trigger"])]
        assert automation["name"] == f"retrain on {EVENT}"
        assert EVENT in automation["description"] and "monitor deployment" in automation["description"]
        assert automation["trigger"]["expect"] == [EVENT]
        (action,) = automation["actions"]
        assert action["type"] == "run-deployment" and action["deployment_id"] == deployments["retrain"]["id"]
        runs = _post(f"{api}/flow_runs/filter", {"flow_runs": {"id": {"any_": [flow_run_id]}}})
        assert [(r["id"], r["state_type"]) for r in runs] == [(flow_run_id, "COMPLETED")]
        deadline, workers = time.monotonic() + 60, []
        while time.monotonic() < deadline and not workers:
            workers = _post(f"{api}/work_pools/dicomops/workers/filter", {})
            time.sleep(2)
        assert workers, log.read_text()[-3000:]

        # The pacs-watch deployment: every 60 s in UTC, one run at a time.
        watch = deployments["pacs-watch"]
        (schedule,) = watch["schedules"]
        assert schedule["schedule"]["interval"] == 60.0 and schedule["schedule"]["timezone"] == "UTC"
        assert schedule["slug"] == "every-60s-UTC" and schedule["active"]
        assert watch["global_concurrency_limit"]["limit"] == 1
        assert watch["concurrency_options"]["collision_strategy"] == "CANCEL_NEW"

        # From here on the runs are the test's own: the schedule paused (as serve does without a
        # PACS), and whatever run it had started finished.
        assert serving.pause_schedules(api, *serving.PACS_WATCH) == 1
        assert not _call(f"{api}/deployments/{watch['id']}")["schedules"][0]["active"]
        deadline = time.monotonic() + 240
        while _busy_runs(api, watch["id"]) and time.monotonic() < deadline:
            time.sleep(2)
        assert not _busy_runs(api, watch["id"])

        # A study sent over STOW-RS, stable after 1 s; two runs started together: one takes the
        # study, the other is cancelled by the deployment's concurrency limit.
        files = synthetic_study(tmp_path / "send", slices=12, matrix=128)
        with PacsClient(f"{pacs_url}/dicom-web/", credentials) as pacs:
            assert len(pacs.store([pydicom.dcmread(f) for f in files])) == len(files)
        time.sleep(2)
        sent = time.monotonic()
        run_ids = [str(_call(f"{api}/deployments/{watch['id']}/create_flow_run", {})["id"])
                   for _ in range(2)]
        final = _wait_final(api, run_ids)
        print(f"pacs-watch runs final in {time.monotonic() - sent:.0f} s")
        states = sorted((final[i]["state_type"], final[i]["state"]["message"] or "") for i in run_ids)
        assert [s for s, _ in states] == ["CANCELLED", "COMPLETED"], states
        assert "Deployment concurrency limit reached" in states[0][1]
        ledger = pd.read_csv(project / "work" / "pacs" / "studies.csv", keep_default_na=False)
        assert list(ledger.status) == ["ingested"] and list(ledger.accepted_series) == [1]
        assert ledger.reason.item() == "no champion model: ingested, not scored"
        (token,) = ledger.token
        assert [p.name for p in (project / "staging").iterdir()] == [".gitignore"]  # the study is gone
        deadline, events = time.monotonic() + 60, []
        while time.monotonic() < deadline and not events:
            events = _call(f"{api}/events/filter", {"filter": {"event": {"name": [STUDY_EVENT]}}})["events"]
            time.sleep(2)
        assert [e["resource"]["prefect.resource.id"] for e in events] == [f"dicomops.study.{token}"]

        serve.send_signal(signal.SIGTERM)
        assert serve.wait(timeout=120) == 0, log.read_text()[-3000:]
    finally:
        if serve.poll() is None:
            serve.send_signal(signal.SIGTERM)
            try:
                serve.wait(timeout=60)
            except subprocess.TimeoutExpired:
                for pid in [serve.pid, *family]:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
    output = log.read_text(errors="replace")
    assert "stopped (SIGTERM)" in output
    assert credentials.password not in output
    assert not [pid for pid in family if serving._running(pid)]  # Orthanc, the server, the worker: all gone
    for closed in (pacs_port, port, redis_port):  # the cache stops with the stack
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", closed), timeout=5).close()
