"""What one machine needs to run the deployments: a local Prefect server, the deployments of
``prefect.yaml`` registered with it, and a process worker on the ``dicomops`` pool.

Prefect is driven through its CLI in subprocesses (the library itself never imports Prefect).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Stack:
    api_url: str
    ui_url: str
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def stop(self) -> None:
        for process in reversed(self.processes):
            if process.poll() is None:
                process.terminate()
        for process in reversed(self.processes):
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()


def _prefect(*args: str) -> list[str]:
    return [sys.executable, "-m", "prefect", *args]


def wait_healthy(api_url: str, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{api_url}/health", timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1.0)
    raise TimeoutError(f"the Prefect server at {api_url} did not become healthy within {timeout:.0f} s; "
                       "see its log above (is the port taken?)")


def start(project: Path, host: str = "127.0.0.1", port: int = 4200, pool: str = "dicomops",
          worker: bool = True, log: Path | None = None, cpu_heavy_limit: int = 1) -> Stack:
    """Start the server, register the deployments, start the worker; return the running stack."""
    api_url, ui_url = f"http://{host}:{port}/api", f"http://{host}:{port}"
    env = {**os.environ, "PREFECT_API_URL": api_url, "DICOMOPS_PROJECT_DIR": str(project.resolve()),
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    out = open(log, "ab") if log else None  # noqa: SIM115 (lives as long as the processes)
    stack = Stack(api_url, ui_url)
    try:
        stack.processes.append(subprocess.Popen(_prefect("server", "start", "--host", host, "--port", str(port)),
                                                env=env, cwd=project, stdout=out, stderr=out))
        wait_healthy(api_url)
        # One CPU-heavy task (training, preprocessing) at a time on this machine, whatever the flows.
        subprocess.run(_prefect("concurrency-limit", "create", "cpu-heavy", str(cpu_heavy_limit)), env=env, cwd=project,
                       capture_output=True, text=True)
        for args in (("work-pool", "create", pool, "--type", "process", "--overwrite"),
                     ("--no-prompt", "deploy", "--all")):
            result = subprocess.run(_prefect(*args), env=env, cwd=project, capture_output=True, text=True)
            if result.returncode != 0:
                raise RuntimeError(f"prefect {' '.join(args)} failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
        if worker:
            stack.processes.append(subprocess.Popen(_prefect("worker", "start", "--pool", pool), env=env,
                                                    cwd=project, stdout=out, stderr=out))
    except BaseException:
        stack.stop()
        raise
    return stack
