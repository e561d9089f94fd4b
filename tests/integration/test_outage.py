"""A tracking server that is down before or during a run: the command says which setting to fix
within seconds, and an outage mid-run ends the flow within the configured budget, with nothing
half-written, so that the next run resumes."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from dicomops.config import SynthConfig
from dicomops.synthetic import generate_corpus

from .conftest import ROOT, free_port, wait_for

pytestmark = pytest.mark.integration
BUDGET_S = 40

RUN_INGEST = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    from dicomops import ingest as library
    from dicomops.config import IngestConfig
    from flows.ingest import ingest

    real = library.validate_headers
    def validate_then_lose_the_server(*args, **kwargs):
        out = real(*args, **kwargs)
        if os.environ.get("KILL_PGID"):  # the tracking server dies mid-run, its workers with it
            os.killpg(int(os.environ["KILL_PGID"]), signal.SIGKILL)
            print("server killed", flush=True)
        return out
    library.validate_headers = validate_then_lose_the_server
    result = ingest(src=Path(sys.argv[1]), work=Path(sys.argv[2]), config=IngestConfig(workers=1))
    print("accepted", result["accepted_series"], "skipped", result["skipped"], flush=True)
""")


def _mlflow(root: Path, port: int) -> subprocess.Popen:
    env = {**os.environ, "MLFLOW_BACKEND_STORE_URI": f"sqlite:///{root / 'mlflow.db'}",
           "MLFLOW_ARTIFACT_ROOT": str(root / "art"), "MLFLOW_PORT": str(port), "MLFLOW_AUTH": "basic",
           "MLFLOW_AUTH_ADMIN_PASSWORD": "outage-admin-pw", "MLFLOW_FLASK_SERVER_SECRET_KEY": "outage-secret",
           "MLFLOW_AUTH_DATABASE_URI": f"sqlite:///{root / 'auth.db'}"}
    log = root / f"log-{time.monotonic_ns()}"
    with open(log, "wb") as handle:  # its own process group: the test kills the server and its workers
        proc = subprocess.Popen(["bash", str(ROOT / "mlflow" / "server.sh")], env=env, stdout=handle,
                                stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)
    wait_for(f"http://127.0.0.1:{port}/health", proc=proc, log=log)
    return proc


def _kill(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def test_a_closed_port_is_named_in_seconds(tmp_path: Path) -> None:
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{free_port()}"}
    start = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "dicomops.cli", "train", "--work", str(tmp_path)], env=env,
                         capture_output=True, text=True, timeout=60)
    assert time.monotonic() - start < 15
    assert out.returncode == 2, out.stderr
    assert "MLflow tracking server at http://127.0.0.1:" in out.stderr and "(from MLFLOW_TRACKING_URI)" in out.stderr
    assert not (tmp_path / ".stages").exists()


def test_a_server_killed_mid_flow_ends_it_within_the_budget_and_the_next_run_resumes(tmp_path: Path) -> None:
    corpus, work, root = tmp_path / "corpus", tmp_path / "work", tmp_path / "mlflow"
    root.mkdir()
    generate_corpus(corpus, SynthConfig(patients=4, seed=3, fault_rate=0.0, matrix=128, slices=12, workers=1))
    port = free_port()
    server = _mlflow(root, port)
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{port}", "MLFLOW_TRACKING_USERNAME": "admin",
           "MLFLOW_TRACKING_PASSWORD": "outage-admin-pw", "DICOMOPS_HTTP_BUDGET_S": str(BUDGET_S),
           "PREFECT_HOME": str(tmp_path / "prefect"), "PYTHONPATH": str(ROOT), "KILL_PGID": str(server.pid)}
    try:
        lost = subprocess.Popen([sys.executable, "-c", RUN_INGEST, str(corpus), str(work)], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert lost.stdout is not None
        lines = []
        for line in lost.stdout:
            lines.append(line)
            if "server killed" in line:
                killed_at = time.monotonic()
                break
        else:
            pytest.fail("the flow never reached the point where the server dies:\n" + "".join(lines)[-3000:])
        rest = lost.communicate(timeout=BUDGET_S + 60)[0]
        elapsed = time.monotonic() - killed_at
        print(f"the outage ended the run {elapsed:.1f} s after the server died (budget {BUDGET_S} s)")
        assert lost.returncode != 0, rest[-3000:]
        assert elapsed < BUDGET_S + 10, f"the outage took {elapsed:.0f} s to end the run (budget {BUDGET_S} s)"
        assert f"MLflow at http://127.0.0.1:{port} does not answer" in rest
        assert not (work / ".stages" / "ingest.json").exists()  # no completion record: the next run redoes it
        assert not list(work.rglob("*.tmp"))  # and nothing half-written
    finally:
        _kill(server)

    server = _mlflow(root, port)  # the server is back
    try:
        env.pop("KILL_PGID")
        again = subprocess.run([sys.executable, "-c", RUN_INGEST, str(corpus), str(work)], env=env,
                               capture_output=True, text=True, timeout=300)
        assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
        assert "accepted 4 skipped False" in again.stdout
        assert (work / ".stages" / "ingest.json").exists()
    finally:
        _kill(server)
