"""What one machine needs to run the deployments: the embedded PACS (Orthanc with DICOMweb, see
:mod:`dicomops.pacs.orthanc`), a local Prefect server, the deployments of ``prefect.yaml`` registered
with it, a process worker on the ``dicomops`` pool, and the ``incoming/`` folder the nightly monitor
reads.

The PACS starts first and stops last, so the pacs-watch deployment's runs never find it gone
mid-study. Its address reaches the worker, and so every flow run, as ``DICOMOPS_PACS_URL``, with the
credentials it was started with; the Prefect server and ``prefect deploy`` never receive the
password. Without the embedded PACS (and no ``DICOMOPS_PACS_URL`` of another one), the pacs-watch
schedule is paused rather than left to fail once a minute.

The server keeps its state where ``make run``'s ephemeral Prefect does: in ``PREFECT_HOME``, by
default ``<project>/.prefect`` (the Makefile's default), so the flow runs of ``make run`` show in the
UI ``dicomops serve`` opens. Two servers may use that SQLite file at once (WAL, busy timeout), but
while this one runs, ``PREFECT_API_URL`` pointed at it keeps a second one from starting at all.

Prefect is driven through its CLI in subprocesses (the library itself never imports Prefect).
Each of those processes leads its own process group, and stopping the stack stops the whole group
and every descendant: ``prefect server start`` runs the API in a uvicorn child, and the worker runs
each flow in a child of its own, so terminating only the direct children would orphan those.
Ctrl-C, SIGTERM (systemd, ``docker stop``, ``kill``) and SIGHUP (a closed terminal) all stop the
stack the same way; see :func:`run_until_signal`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO, Any, cast

from dicomops import preflight
from dicomops.pacs.client import PASSWORD_ENV, URL_ENV, USER_ENV, PacsCredentials, server_address
from dicomops.pacs.orthanc import DEFAULT_STABLE_AGE_S, OrthancProcess

log = logging.getLogger(__name__)

# The monitor deployment's ``src`` in prefect.yaml, relative to the project directory its runs start in.
INCOMING = "incoming"
# PREFECT_HOME when none is set, relative to the project directory: the Makefile's default.
PREFECT_HOME_DEFAULT = ".prefect"
# The embedded PACS's storage when none is given, relative to the project directory (it holds PHI:
# outside the work directory, and ignored by git).
PACS_STORAGE_DEFAULT = "pacs"
# Where pacs-watch runs stage a study (PHI) while they handle it: Settings.pacs_staging's default and variable.
STAGING_DEFAULT, STAGING_ENV = "staging", "DICOMOPS_PACS_STAGING"
# The deployment that watches the PACS: flow name and deployment name, as in prefect.yaml.
PACS_WATCH = ("dicomops-pacs-watch", "pacs-watch")
# Either names the server's database in place of the SQLite file under PREFECT_HOME.
DATABASE_URL_SETTINGS = ("PREFECT_SERVER_DATABASE_CONNECTION_URL", "PREFECT_API_DATABASE_CONNECTION_URL")

# The signals that mean "stop" besides Ctrl-C's SIGINT (SIGHUP does not exist on Windows).
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))


def _family(pid: int) -> list[int]:
    """Every other live process that `pid` started: its descendants and the members of the process
    group it leads; empty where /proc is not available.

    Both are needed. A child may start a session of its own (Prefect's worker does so for each flow
    run), and then only the parent links make it ours; a child whose parent died before us was
    re-parented, and then only its group does.
    """
    children: dict[int, list[int]] = {}
    members: list[int] = []
    with contextlib.suppress(OSError):
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit() or int(entry.name) == pid:
                continue
            try:
                with open(f"/proc/{entry.name}/stat", "rb") as stat:
                    # "pid (comm) state ppid pgrp ...": comm may hold spaces and parentheses
                    _, ppid, pgrp = stat.read().rsplit(b")", 1)[1].split()[:3]
            except (OSError, ValueError):
                continue  # exited meanwhile
            children.setdefault(int(ppid), []).append(int(entry.name))
            if int(pgrp) == pid:
                members.append(int(entry.name))
    found, queue = [], list(children.get(pid, []))
    while queue:
        child = queue.pop(0)
        found.append(child)
        queue.extend(children.get(child, []))
    return found + [m for m in members if m not in found]


def _signal_tree(process: subprocess.Popen[bytes], pids: Sequence[int], sig: int) -> None:
    """Send `sig` to the process group `process` leads and to each of `pids`."""
    try:
        if hasattr(os, "killpg"):
            os.killpg(process.pid, sig)  # the group outlives its leader while members remain
        elif process.poll() is None:
            process.send_signal(sig)
    except (ProcessLookupError, PermissionError):
        pass
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return stat.read().rsplit(b")", 1)[1].split()[0] != b"Z"  # a zombie has stopped
    except (OSError, IndexError):
        return True  # no /proc: alive as far as we can tell


@dataclass
class Stack:
    api_url: str
    ui_url: str
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    _stopped: set[int] = field(default_factory=set, repr=False)  # their group ids may be reused now
    incoming: Path | None = None  # the folder the nightly monitor reads
    database: str = ""  # where the server keeps flow runs, in words
    pacs: OrthancProcess | None = None  # the embedded PACS, when it runs
    pacs_watch: str = ""  # what the pacs-watch deployment watches, in words
    cache: str = ""  # the Redis cache pacs-watch fills, in words
    contexts: contextlib.ExitStack = field(default_factory=contextlib.ExitStack, repr=False)

    def __enter__(self) -> Stack:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def spawn(self, args: Sequence[str], env: dict[str, str] | None = None, cwd: Path | None = None,
              out: IO[bytes] | None = None) -> subprocess.Popen[bytes]:
        """Start `args` as the leader of a new session and process group, and add it to the stack.

        Its own group means a Ctrl-C in the terminal reaches only us, so the stack stops in order
        (worker first), and :meth:`stop` can signal everything the process started.
        """
        process = subprocess.Popen(list(args), env=env, cwd=cwd, stdout=out, stderr=out, start_new_session=True)
        self.processes.append(process)
        return process

    def describe_exit(self, process: subprocess.Popen[bytes]) -> str:
        """Why the stack stops when `process` has exited, in words."""
        if self.pacs is not None and process is self.pacs.process:
            return f"the PACS exited (Orthanc, code {process.returncode}; its log: {self.pacs.log})"
        command = " ".join(cast(list[str], process.args)[3:5])  # "server start" or "worker start"
        return f"a Prefect process exited (prefect {command}, code {process.returncode})"

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the processes, the last started first, each with everything it started; then leave
        the contexts entered for the stack (the PACS's).

        SIGTERM goes to the process's group and to each of its descendants; whatever still runs
        after `timeout` seconds gets SIGKILL. Safe to call more than once.
        """
        for process in reversed(self.processes):
            if process.pid in self._stopped:
                continue
            family = _family(process.pid)  # read first: orphans lose the link to us
            _signal_tree(process, family, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=timeout)
            while any(_running(pid) for pid in family) and time.monotonic() < deadline:
                time.sleep(0.05)
            if process.poll() is None or any(_running(pid) for pid in family):
                kill = getattr(signal, "SIGKILL", signal.SIGTERM)
                _signal_tree(process, family + _family(process.pid), kill)
                process.wait()
            self._stopped.add(process.pid)
        self.contexts.close()


class Interrupts:
    """A signal handler that raises KeyboardInterrupt, as Ctrl-C does, for the first signal only
    while `armed`; every signal is recorded in `received`."""

    def __init__(self) -> None:
        self.received: list[int] = []
        self.armed = True

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        self.received.append(signum)
        if self.armed:
            self.armed = False
            raise KeyboardInterrupt(signal.Signals(signum).name)


@contextlib.contextmanager
def interrupt_on(signals: Sequence[int] = STOP_SIGNALS) -> Iterator[Interrupts]:
    """Inside the block, the first of `signals` raises KeyboardInterrupt, as Ctrl-C does, so the
    clean-up a Ctrl-C runs (``finally``, ``except BaseException``) runs for it too; later ones are
    recorded and ignored, so they cannot cut that clean-up short. The previous handlers come back
    when the block ends.

    Only the main thread can install handlers; elsewhere the block changes nothing.
    """
    interrupts = Interrupts()
    previous: dict[int, Any] = {}
    try:
        for sig in signals:
            try:
                previous[sig] = signal.signal(sig, interrupts)
            except ValueError:  # not the main thread
                break
        yield interrupts
    finally:
        interrupts.armed = False
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def run_until_signal(stack: Stack, poll: float = 1.0) -> str:
    """Wait while every process of `stack` runs; then stop the stack and return why.

    It stops on Ctrl-C, on SIGTERM and SIGHUP (systemd, ``docker stop``, ``kill``, a closed
    terminal) alike, and when one of its processes exits. Signals that arrive while the stack
    stops are ignored; the handlers installed before come back before this returns.
    """
    with interrupt_on((signal.SIGINT, *STOP_SIGNALS)) as interrupts:
        try:
            while (exited := next((p for p in stack.processes if p.poll() is not None), None)) is None:
                time.sleep(poll)
            reason = stack.describe_exit(exited)
        except KeyboardInterrupt:
            reason = signal.Signals(interrupts.received[0]).name if interrupts.received else "SIGINT"
        finally:
            interrupts.armed = False
            stack.stop()
    return reason


def _prefect(*args: str) -> list[str]:
    return [sys.executable, "-m", "prefect", *args]


def wait_healthy(api_url: str, timeout: float = 180.0) -> None:
    preflight.wait_healthy(f"{api_url}/health", timeout, name="the Prefect server", poll_s=1.0,
                           fix="see its log above (is the port taken?)")


def server_env(project: Path, api_url: str, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of the server, ``prefect deploy`` and the worker.

    ``PREFECT_HOME`` defaults to ``<project>/.prefect`` as in the Makefile, so the server opens the
    database ``make run`` writes; one set in `environ` (default: this process's) wins, as it does
    for ``make``.
    """
    environ = os.environ if environ is None else environ
    project = project.resolve()
    home = Path(environ.get("PREFECT_HOME") or PREFECT_HOME_DEFAULT).expanduser()
    return {**environ, "PREFECT_HOME": str(home if home.is_absolute() else project / home),
            "PREFECT_API_URL": api_url, "DICOMOPS_PROJECT_DIR": str(project),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}


def describe_database(env: Mapping[str, str]) -> str:
    """Where a server started with `env` keeps its flow runs, in words (never a URL: it may hold a
    password)."""
    named = next((name for name in DATABASE_URL_SETTINGS if env.get(name)), None)
    if named:
        return f"the database {named} names"
    return str(Path(env["PREFECT_HOME"]) / "prefect.db")


def create_incoming(project: Path) -> Path:
    """The folder the monitor deployment checks nightly (its ``src``), created if absent."""
    incoming = project.resolve() / INCOMING
    incoming.mkdir(parents=True, exist_ok=True)
    return incoming


def create_private(folder: Path) -> Path:
    """A folder for PHI (the PACS's storage, the staging area): created mode 0700 if absent, with a
    ``.gitignore`` that keeps its contents out of git even where it sits inside a checkout."""
    folder = Path(folder).absolute()
    folder.mkdir(parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    ignore = folder / ".gitignore"
    if not ignore.exists():
        ignore.write_text("# PHI (studies from the PACS): never committed\n*\n")
    return folder


@dataclass(frozen=True)
class PacsOptions:
    """How `dicomops serve` runs the embedded PACS (see :func:`dicomops.pacs.orthanc.start_orthanc`)."""

    credentials: PacsCredentials = field(repr=False)
    storage: Path | None = None  # default: <project>/pacs
    http_port: int = 8042
    stable_age_s: int = DEFAULT_STABLE_AGE_S


def describe_tracking(tracking_uri: str) -> str:
    """Where MLflow keeps runs and models, in words: the embedded store's file, or a server's
    address without the credentials a URI may carry."""
    from dicomops.config import embedded_store_path

    try:
        path = embedded_store_path(tracking_uri)
    except ValueError:
        return "an in-memory store (MLFLOW_TRACKING_URI)"
    if path is not None:
        return str(path)
    parts = urllib.parse.urlsplit(tracking_uri)
    return f"the server {parts.scheme}://{parts.netloc.rpartition('@')[2]} (MLFLOW_TRACKING_URI)"


# What Prefect's own client retries on, and how often when PREFECT_CLIENT_MAX_RETRIES is not set
# (preflight.http_budget sets it for a command): its server answers 503 while its SQLite database
# is locked by the scheduler or a worker's heartbeat.
API_RETRY_CODES, PREFECT_DEFAULT_RETRIES, API_FIRST_DELAY_S = frozenset({408, 429, 502, 503}), 5, 1.0


def _api(method: str, url: str, body: Any = None) -> Any:
    import base64
    import urllib.error

    data = None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    if auth := os.environ.get("PREFECT_API_AUTH_STRING"):  # as Prefect's own client sends it
        headers["Authorization"] = "Basic " + base64.b64encode(auth.encode()).decode()
    retries = int(os.environ.get("PREFECT_CLIENT_MAX_RETRIES", PREFECT_DEFAULT_RETRIES))
    for attempt in range(retries + 1):
        request = urllib.request.Request(url, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                text = response.read()
            return json.loads(text) if text else None
        except urllib.error.HTTPError as err:
            if err.code not in API_RETRY_CODES or attempt == retries:
                raise
            after = err.headers.get("Retry-After", "")
            delay = float(after) if after.isdigit() else API_FIRST_DELAY_S * 2**attempt
            log.info("%s %s answered %d; trying again in %.0f s (%d of %d)", method, url, err.code, delay,
                     attempt + 1, retries)
            time.sleep(delay)
    raise AssertionError("unreachable")


def pause_schedules(api_url: str, flow: str, deployment: str) -> int:
    """Pause every active schedule of `flow`/`deployment` (its future scheduled runs go with them);
    return how many. The next ``prefect deploy`` makes them active again, as prefect.yaml says."""
    quoted = "/".join(urllib.parse.quote(name, safe="") for name in (flow, deployment))
    found = _api("GET", f"{api_url}/deployments/name/{quoted}")
    paused = 0
    for schedule in found.get("schedules", []):
        if schedule.get("active"):
            _api("PATCH", f"{api_url}/deployments/{found['id']}/schedules/{schedule['id']}", {"active": False})
            paused += 1
    return paused


def start_cache(stack: Stack, worker_env: dict[str, str], redis_port: int | None, maxmemory_mb: int) -> None:
    """The volume cache pacs-watch fills (and ``dicomops online`` reads): ``DICOMOPS_REDIS_URL`` when
    set; else, with `redis_port` and ``DICOMOPS_REDIS_PASSWORD``, a Redis started here, stopped with
    the stack (a cache that dies stops nothing: the flows recompute). Its address and password reach
    the worker only."""
    import shutil

    from dicomops.serving import redis_server
    from dicomops.serving.cache import PASSWORD_ENV as REDIS_PASSWORD_ENV
    from dicomops.serving.cache import URL_ENV as REDIS_URL_ENV

    if worker_env.get(REDIS_URL_ENV):
        stack.cache = f"the Redis at {server_address(worker_env[REDIS_URL_ENV])} ({REDIS_URL_ENV})"
        return
    password = worker_env.get(REDIS_PASSWORD_ENV, "")
    if redis_port is None or not password or shutil.which("redis-server") is None:
        why = ("no --redis-port" if redis_port is None else f"{REDIS_PASSWORD_ENV} is not set" if not password
               else "redis-server is not installed")
        stack.cache = f"none ({why}): studies are preprocessed again when asked for online"
        return
    redis = redis_server.start(redis_port, password, maxmemory_mb)
    stack.contexts.callback(redis.stop)
    worker_env[REDIS_URL_ENV] = redis.url
    stack.cache = (f"Redis at {redis.url} ({maxmemory_mb} MB, LRU); for dicomops online: "
                   f"export {REDIS_URL_ENV}={redis.url}")


def start(project: Path, host: str = "127.0.0.1", port: int = 4200, pool: str = "dicomops",
          worker: bool = True, log: Path | None = None, cpu_heavy_limit: int = 1,
          pacs: PacsOptions | None = None, redis_port: int | None = None, redis_maxmemory_mb: int = 1024) -> Stack:
    """Create ``incoming/``, start the PACS (unless `pacs` is None) and the cache (see
    :func:`start_cache`), start the server, register the deployments, start the worker; return the
    running stack.

    Raises:
        ValueError: Orthanc or its DICOMweb plugin is not installed, or a bad PACS option.
        RuntimeError, TimeoutError: a port is in use, or a server did not start.
    """
    from dicomops.pacs.orthanc import start_orthanc

    project = project.resolve()
    api_url, ui_url = f"http://{host}:{port}/api", f"http://{host}:{port}"
    env = server_env(project, api_url)
    # The passwords go to the worker (its flow runs talk to the PACS and the cache) and nowhere else.
    worker_env = dict(env)
    for secret in (PASSWORD_ENV, "DICOMOPS_REDIS_PASSWORD", "DICOMOPS_SERVE_TOKEN"):
        env.pop(secret, None)
    out = open(log, "ab") if log else None  # noqa: SIM115 (lives as long as the processes)
    stack = Stack(api_url, ui_url, incoming=create_incoming(project), database=describe_database(env))
    try:
        if pacs is not None:
            storage = create_private(pacs.storage or project / PACS_STORAGE_DEFAULT)
            stack.pacs = stack.contexts.enter_context(
                start_orthanc(storage, pacs.http_port, pacs.credentials, stable_age_s=pacs.stable_age_s))
            stack.processes.append(stack.pacs.process)  # watched like the others; stopped last
            worker_env.update({URL_ENV: stack.pacs.url, USER_ENV: pacs.credentials.user,
                               PASSWORD_ENV: pacs.credentials.password})
            stack.pacs_watch = f"the PACS at {stack.pacs.url}"
        elif worker_env.get(URL_ENV):
            stack.pacs_watch = f"the PACS at {server_address(worker_env[URL_ENV])} ({URL_ENV})"
        start_cache(stack, worker_env, redis_port, redis_maxmemory_mb)
        if stack.pacs_watch:  # where its runs stage studies (Settings.pacs_staging, from the project folder)
            create_private(project / Path(env.get(STAGING_ENV) or STAGING_DEFAULT).expanduser())
        stack.spawn(_prefect("server", "start", "--host", host, "--port", str(port)), env, project, out)
        wait_healthy(api_url)
        # One CPU-heavy task (training, preprocessing) at a time on this machine, whatever the flows.
        subprocess.run(_prefect("concurrency-limit", "create", "cpu-heavy", str(cpu_heavy_limit)), env=env, cwd=project,
                       capture_output=True, text=True)
        for args in (("work-pool", "create", pool, "--type", "process", "--overwrite"),
                     ("--no-prompt", "deploy", "--all")):
            result = subprocess.run(_prefect(*args), env=env, cwd=project, capture_output=True, text=True)
            if result.returncode != 0:
                raise RuntimeError(f"prefect {' '.join(args)} failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
        if not stack.pacs_watch:
            stack.pacs_watch = f"nothing: no PACS runs here and {URL_ENV} is not set, so its schedule is paused"
            try:
                pause_schedules(api_url, *PACS_WATCH)
            except OSError as err:  # the stack still serves the other deployments
                stack.pacs_watch = (f"nothing: no PACS runs here and {URL_ENV} is not set, and its schedule could "
                                    f"not be paused ({err}): pause it in the UI, or its runs fail every minute")
        if worker:
            stack.spawn(_prefect("worker", "start", "--pool", pool), worker_env, project, out)
    except BaseException:
        stack.stop()
        raise
    return stack
