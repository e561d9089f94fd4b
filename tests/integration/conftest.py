"""Real services on loopback ports for the integration tests: PostgreSQL (from the distribution's
packages, run as the `postgres` user when the tests run as root), an MLflow server with basic auth
on it, and a Prefect server with an API auth string and CSRF protection on it; for the UI tests, a
headless Chromium from the distribution's packages driven by Playwright."""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
PG_PASSWORD = "integration-only-password"  # a throwaway cluster in tmp, reachable on loopback only


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(url: str, timeout: float = 180.0, proc: subprocess.Popen | None = None, log: Path | None = None,
             headers: dict[str, str] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{url}: the server exited ({proc.returncode}):\n" + (log.read_text()[-3000:] if log else ""))
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=5) as r:
                if r.status < 500:
                    return
        except urllib.error.HTTPError as err:
            if err.code < 500:
                return
        except OSError:
            pass
        time.sleep(1)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f} s" + (f":\n{log.read_text()[-3000:]}" if log else ""))


def _pg_bin(name: str) -> str:
    found = shutil.which(name) or next(iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))[-1:]), None)
    if not found:
        pytest.skip(f"PostgreSQL's {name} is not installed (make integration installs it with apt-get)")
    return found


def _as_postgres(cmd: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


@dataclass(frozen=True)
class Postgres:
    port: int

    def url(self, database: str, driver: str = "postgresql") -> str:
        return f"{driver}://dicomops:{PG_PASSWORD}@127.0.0.1:{self.port}/{database}"


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    import tempfile

    # Not under pytest's tmp: that is private to root, and PostgreSQL refuses to run as root.
    root = Path(tempfile.mkdtemp(prefix="dicomops-pg-"))
    data, pwfile = root / "data", root / "pw"
    pwfile.write_text(PG_PASSWORD)
    if os.geteuid() == 0:
        shutil.chown(root, "postgres")
        shutil.chown(pwfile, "postgres")
    port = free_port()
    subprocess.run(_as_postgres([_pg_bin("initdb"), "-D", str(data), "-U", "dicomops", "--pwfile", str(pwfile),
                                 "-A", "scram-sha-256", "--no-sync"]), check=True, capture_output=True)
    ctl = _pg_bin("pg_ctl")
    subprocess.run(_as_postgres([ctl, "-D", str(data), "-l", str(root / "log"), "-w", "-o",
                                 f"-p {port} -h 127.0.0.1 -k {root}", "start"]), check=True, capture_output=True)
    try:
        env = {**os.environ, "PGPASSWORD": PG_PASSWORD}
        for db in ("mlflow", "mlflow_auth", "prefect"):
            subprocess.run([_pg_bin("createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "dicomops", db],
                           check=True, env=env, capture_output=True)
        yield Postgres(port)
    finally:
        subprocess.run(_as_postgres([ctl, "-D", str(data), "-m", "fast", "stop"]), capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


@dataclass(frozen=True)
class Service:
    url: str
    env: dict[str, str]  # what a client needs (URL and credentials)


def _start(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    handle = open(log, "wb")  # noqa: SIM115
    return subprocess.Popen(cmd, env=env, stdout=handle, stderr=subprocess.STDOUT, cwd=ROOT)


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="session")
def mlflow_server(postgres: Postgres, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    root, port = tmp_path_factory.mktemp("mlflow"), free_port()
    env = {**os.environ, "MLFLOW_BACKEND_STORE_URI": postgres.url("mlflow"), "MLFLOW_ARTIFACT_ROOT": str(root / "art"),
           "MLFLOW_PORT": str(port), "MLFLOW_AUTH": "basic", "MLFLOW_AUTH_ADMIN_PASSWORD": "integration-admin-pw",
           "MLFLOW_FLASK_SERVER_SECRET_KEY": "integration-secret", "MLFLOW_AUTH_DATABASE_URI": postgres.url("mlflow_auth")}
    proc = _start(["bash", str(ROOT / "mlflow" / "server.sh")], env, root / "log")
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(f"{url}/health", proc=proc, log=root / "log")
        yield Service(url, {"MLFLOW_TRACKING_URI": url, "MLFLOW_TRACKING_USERNAME": "admin",
                            "MLFLOW_TRACKING_PASSWORD": "integration-admin-pw"})
    finally:
        _stop(proc)


@contextlib.contextmanager
def _prefect_service(postgres: Postgres, root: Path, database: str) -> Iterator[Service]:
    """A Prefect server on database `database` of `postgres`, with its auth string and CSRF on."""
    port = free_port()
    auth = "dicomops:integration-prefect-pw"
    env = {**os.environ, "PREFECT_HOME": str(root / "home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_API_DATABASE_CONNECTION_URL": postgres.url(database, "postgresql+asyncpg"),
           "PREFECT_SERVER_API_AUTH_STRING": auth, "PREFECT_SERVER_API_CSRF_PROTECTION_ENABLED": "true"}
    env.pop("PREFECT_API_URL", None)
    url = f"http://127.0.0.1:{port}/api"
    env["PREFECT_UI_API_URL"] = url  # else the UI calls port 4200: `--port` does not reach its settings
    proc = _start([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                  env, root / "log")
    try:
        wait_for(f"{url}/health", proc=proc, log=root / "log")
        yield Service(url, {"PREFECT_API_URL": url, "PREFECT_API_AUTH_STRING": auth,
                            "PREFECT_HOME": str(root / "client-home")})
    finally:
        _stop(proc)


@pytest.fixture(scope="session")
def prefect_server(postgres: Postgres, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    with _prefect_service(postgres, tmp_path_factory.mktemp("prefect"), "prefect") as service:
        yield service


# --- Browser checks of the UIs (tests/integration/test_ui.py) ---------------------------------------

@pytest.fixture(scope="session")
def prefect_deployments(postgres: Postgres, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """A Prefect server of its own with prefect.yaml's deployments registered, as `dicomops serve`
    registers them (work pool, then ``prefect deploy --all``), but with auth and CSRF on.

    Its own server and database: the monitor deployment's schedule creates scheduled flow runs,
    which the pipeline test on the shared server must not see.
    """
    subprocess.run([_pg_bin("createdb"), "-h", "127.0.0.1", "-p", str(postgres.port), "-U", "dicomops", "prefect_ui"],
                   check=True, env={**os.environ, "PGPASSWORD": PG_PASSWORD}, capture_output=True)
    root = tmp_path_factory.mktemp("prefect-ui")
    with _prefect_service(postgres, root, "prefect_ui") as service:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
        env.update({**service.env, "DICOMOPS_PROJECT_DIR": str(ROOT), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"})
        for args in (("work-pool", "create", "dicomops", "--type", "process", "--overwrite"),
                     ("--no-prompt", "deploy", "--all")):
            result = subprocess.run([sys.executable, "-m", "prefect", *args], env=env, cwd=ROOT, capture_output=True,
                                    text=True, timeout=300)
            assert result.returncode == 0, f"prefect {' '.join(args)}:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
        yield service


def _chromium_executable() -> str:
    for candidate in (os.environ.get("DICOMOPS_CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if candidate and (found := shutil.which(candidate)):
            return found
    pytest.skip("no Chromium found (make integration installs Debian's chromium with apt-get; "
                "or set DICOMOPS_CHROMIUM to a Chromium binary)")


@pytest.fixture(scope="session")
def chromium() -> Iterator[Any]:
    """Headless Chromium from the system's packages, driven by Playwright (no browser download)."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is in the dev extra: pip install -e '.[dev]'")
    executable = _chromium_executable()
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, headless=True)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture(scope="session")
def ui_screenshots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the UI tests keep their screenshots: $DICOMOPS_UI_ARTIFACTS/ui-screenshots (CI keeps
    that folder as an artifact), else a pytest tmp folder."""
    base = os.environ.get("DICOMOPS_UI_ARTIFACTS")
    folder = (Path(base) if base else tmp_path_factory.mktemp("ui")) / "ui-screenshots"
    folder.mkdir(parents=True, exist_ok=True)
    return folder
