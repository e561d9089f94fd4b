"""Servers a command needs, checked in seconds before any work starts, and one budget for how long
an HTTP client may retry once work is under way.

A mistyped port or a server not started yet must not cost minutes of silent back-off: the
preflight answers within a few seconds with the server, the URI, the setting it came from and how
to start it. Mid-run, every HTTP client retries within :func:`http_budget`, so an outage ends the
run within ``DICOMOPS_HTTP_BUDGET_S`` (default 2 minutes), Prefect's task retries included.
"""

from __future__ import annotations

import os
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

from dicomops.config import Settings
from dicomops.errors import ServerUnreachableError

PROBE_TIMEOUT_S = 3.0
# Our I/O tasks retry at most twice, after 2 and 10 s (tasks/*.py): the budget leaves room for both.
TASK_ATTEMPTS, TASK_RETRY_DELAYS_S = 3, 12.0
CLIENT_RETRIES, BACKOFF_FACTOR, BACKOFF_JITTER = 2, 1, 1.0  # MLflow reads the factor as an int
MIN_BUDGET_S = 40.0  # three attempts of three 1 s requests with their back-off, the task delays, a probe


@dataclass(frozen=True)
class Server:
    """A server a command talks to, and what to tell a person when it does not answer."""

    name: str
    url: str
    health: str  # the path that answers without credentials
    setting: str  # the environment variable the URL came from
    fix: str


def required_servers(settings: Settings, prefect_api_url: str | None = None) -> list[Server]:
    """The servers the current settings point at: MLflow when the tracking URI is HTTP, the Prefect
    API when ``PREFECT_API_URL`` is set. The embedded defaults (SQLite, ephemeral Prefect) need none."""
    servers = []
    uri = settings.mlflow_tracking_uri
    if uri.startswith(("http://", "https://")):
        servers.append(Server("MLflow tracking server", uri.rstrip("/"), "/health", "MLFLOW_TRACKING_URI",
                              "start it with 'bash mlflow/server.sh', or unset MLFLOW_TRACKING_URI to use the "
                              "embedded SQLite store"))
    api = prefect_api_url if prefect_api_url is not None else os.environ.get("PREFECT_API_URL", "")
    if api:
        servers.append(Server("Prefect API", api.rstrip("/"), "/health", "PREFECT_API_URL",
                              "start it with 'dicomops serve' (or 'prefect server start'), or unset "
                              "PREFECT_API_URL to run on Prefect's ephemeral API"))
    return servers


def probe(server: Server, timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """None when `server` answers HTTP at all (any status: it is up), else why not."""
    try:
        with urllib.request.urlopen(server.url + server.health, timeout=timeout):
            return None
    except urllib.error.HTTPError:
        return None  # it answered; credentials and paths are the client's business
    except (OSError, ValueError) as err:
        reason = getattr(err, "reason", err)
        return f"{type(reason).__name__}: {reason}" if not isinstance(reason, str) else reason


def check_servers(servers: list[Server], timeout: float = PROBE_TIMEOUT_S) -> None:
    """Raise :class:`ServerUnreachableError` naming the first server that does not answer."""
    for server in servers:
        why = probe(server, timeout)
        if why is not None:
            raise ServerUnreachableError(f"{server.name} at {server.url} (from {server.setting}) does not answer "
                                         f"({why}); {server.fix}")


def wait_healthy(url: str, timeout_s: float, *, name: str, fix: str, poll_s: float = 0.5) -> float:
    """Poll ``GET url`` until it answers 200 (a server this process just started); return the
    seconds waited. Never through the environment's HTTP proxy: these servers are on loopback.

    Raises:
        TimeoutError: no 200 within `timeout_s`; the message names `name`, the last answer or
            error, and `fix`.
    """
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    start = time.monotonic()
    last = "no answer"
    while True:
        try:
            with opener.open(url, timeout=max(poll_s, 1.0)) as answer:
                if answer.status == 200:
                    return time.monotonic() - start
                last = f"HTTP {answer.status}"
        except urllib.error.HTTPError as err:
            last = f"HTTP {err.code}"
        except OSError as err:  # URLError included
            last = str(getattr(err, "reason", err))
        if time.monotonic() - start >= timeout_s:
            raise TimeoutError(f"{name} did not answer at {url} within {timeout_s:.0f} s (last: {last}); {fix}")
        time.sleep(poll_s)


def reachable(url: str, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Whether an HTTP tracking URI answers now (always True for a local store)."""
    if not url.startswith(("http://", "https://")):
        return True
    return probe(Server("", url.rstrip("/"), "/health", "", ""), timeout) is None


def http_budget(bound_s: float) -> dict[str, str]:
    """Client settings under which one failing call, retried by its client and then by Prefect's task
    retries, gives up within `bound_s` seconds: ``attempts × (requests × timeout + back-off) +
    task retry delays + one probe <= bound_s``."""
    if bound_s < MIN_BUDGET_S:
        raise ValueError(f"DICOMOPS_HTTP_BUDGET_S={bound_s:g} is too short for one retried call; use "
                         f"{MIN_BUDGET_S:g} or more")
    backoff = sum(BACKOFF_FACTOR * 2**i for i in range(1, CLIENT_RETRIES)) + CLIENT_RETRIES * BACKOFF_JITTER
    per_call = (bound_s - TASK_RETRY_DELAYS_S - PROBE_TIMEOUT_S) / TASK_ATTEMPTS
    timeout = max(1, int((per_call - backoff) / (CLIENT_RETRIES + 1)))
    return {
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(CLIENT_RETRIES),
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": str(BACKOFF_FACTOR),
        "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": str(BACKOFF_JITTER),
        "MLFLOW_HTTP_REQUEST_TIMEOUT": str(timeout),
        "PREFECT_CLIENT_MAX_RETRIES": str(CLIENT_RETRIES),
        "PREFECT_API_REQUEST_TIMEOUT": str(float(timeout)),
    }


def apply_http_budget(settings: Settings) -> dict[str, str]:
    """Set the clients' retry and timeout budget for this process and the ones it starts. A value
    the environment already sets is kept: an operator's explicit choice wins."""
    budget = http_budget(settings.http_budget_s)
    for key, value in budget.items():
        os.environ.setdefault(key, value)
    return {key: os.environ[key] for key in budget}


def preflight(settings: Settings) -> None:
    """What every command and flow does first: bound the clients, then check the servers."""
    apply_http_budget(settings)
    check_servers(required_servers(settings))
