"""The online service on Ray Serve: dynamic batching by Ray's ``@serve.batch``, replicas by Ray's
deployment config, a site's cluster by ``RAY_ADDRESS``.

Why Ray Serve (measured side by side with LitServe, BentoML and PyTriton by
``benchmarks/serving_engines.py``, see the README): its batcher is an in-process coroutine API, so
the slabs of *concurrent studies* meet in one engine call while each study's retrieval and
preprocessing run in worker threads; LitServe, BentoML and PyTriton batch whole HTTP requests, which
would serialise a study's I/O behind the engine. It is the only one of the four whose replicas scale
onto a cluster unchanged (``ray start`` on more machines, or KubeRay), and it installs without
changing any of the project's packages (BentoML and PyTriton downgrade some). It costs more memory
(measured by ``benchmarks/serving.py``: the replica about 1.2 GB resident, every Ray process
together 1.7 GB PSS) and about 15 s to start.

Everything the service decides is in :mod:`dicomops.serving.online`; this module only wires it to
HTTP: ``POST /v1/studies``, ``POST /v1/slabs``, ``GET /healthz`` (alive), ``GET /readyz`` (model
loaded; cache and PACS state), ``GET /metrics`` (Prometheus text). Secrets (the token, the
de-identification key, the PACS and Redis passwords) are read by each replica from its own
environment and never pass through Ray's object store.
"""

# No ``from __future__ import annotations`` here: FastAPI reads the handlers' annotations at
# definition, and they name classes imported inside build_app.
import asyncio
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

APP_NAME = "dicomops-inference"
HEALTH_PERIOD_S = 10.0


@dataclass(frozen=True)
class Scaling:
    replicas: int = 1
    max_batch: int = 32
    batch_wait_s: float = 0.005
    max_ongoing_requests: int = 128  # per replica: enough concurrent slabs to fill a batch
    io_threads: int = 4  # per replica: studies retrieved and preprocessed at once


def keep_replica_grpc_on_loopback() -> None:
    """Ray Serve starts each replica's inter-deployment gRPC server on ``[::]:0`` (every interface),
    whatever the node's address. On a single-node (loopback) Ray, bind it to 127.0.0.1 like the rest;
    called in the replica before Serve starts that server. On a cluster (``RAY_ADDRESS``) it stays."""
    if os.environ.get("RAY_ADDRESS"):
        return
    from ray.serve._private import replica

    original = replica.add_port_to_grpc_server
    if getattr(original, "dicomops_loopback", False):
        return

    def on_loopback(server: Any, address: str) -> int:
        return int(original(server, "127.0.0.1:0" if address == "[::]:0" else address))

    on_loopback.dicomops_loopback = True  # type: ignore[attr-defined]
    replica.add_port_to_grpc_server = on_loopback


def build_app(options: Any, scaling: Scaling) -> Any:
    """The Ray Serve application: one deployment, `scaling.replicas` replicas. `options` is a
    :class:`dicomops.serving.online.ServiceOptions` without secrets (its key is read per replica)."""
    from fastapi import FastAPI, Request, Response
    from fastapi.responses import JSONResponse, PlainTextResponse
    from ray import serve

    from dicomops.serving.online import (
        MAX_JSON_BYTES,
        MAX_SLABS,
        STUDY_BODY,
        BatchedEngine,
        RequestError,
        Service,
        check_token,
        read_capped,
        unexpected_error,
    )

    api = FastAPI(title="dicomops inference", docs_url=None, redoc_url=None, openapi_url=None)

    def error(err: RequestError) -> JSONResponse:
        headers = {"Retry-After": str(err.retry_after)} if err.retry_after is not None else None
        return JSONResponse({"error": err.message, **err.extra}, status_code=err.status, headers=headers)

    @serve.deployment(name=APP_NAME, num_replicas=scaling.replicas, max_ongoing_requests=scaling.max_ongoing_requests,
                      health_check_period_s=HEALTH_PERIOD_S, ray_actor_options={"num_cpus": 0})
    @serve.ingress(api)
    class InferenceService:
        def __init__(self, options: Any, scaling: Scaling) -> None:
            from dataclasses import replace

            from dicomops.deid.keys import key_from_settings

            logging.getLogger("dicomops").setLevel(logging.INFO)
            keep_replica_grpc_on_loopback()
            self.service = Service(replace(options, key=key_from_settings()))
            self.engine_thread = ThreadPoolExecutor(1, thread_name_prefix="engine")  # one engine call at a time
            self.io_threads = ThreadPoolExecutor(scaling.io_threads, thread_name_prefix="study")
            # /readyz and /metrics ask Redis, which may hang up to the cache's timeout: off the event
            # loop, and not queued behind the studies.
            self.probe_thread = ThreadPoolExecutor(1, thread_name_prefix="probe")
            self.score.set_max_batch_size(scaling.max_batch)  # type: ignore[attr-defined]
            self.score.set_batch_wait_timeout_s(scaling.batch_wait_s)  # type: ignore[attr-defined]

        @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
        async def score(self, slabs: list[np.ndarray]) -> list[float]:
            """Ray's dynamic batcher hands over every slab that arrived within the wait, up to the
            batch size; the engine runs them as one batch in its own thread."""
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self.engine_thread, self.service.score_batch_sync, slabs)

        async def _score_slab(self, slab: np.ndarray) -> float:
            return float(await self.score(slab))

        def _batched(self) -> BatchedEngine:
            return BatchedEngine(self.service.champion.engine, asyncio.get_running_loop(), self._score_slab)

        def _internal_error(self, err: Exception, doing: str) -> Response:
            self.service.requests["errors"] += 1
            return error(unexpected_error(err, doing))

        @api.post("/v1/studies")
        async def studies(self, request: Request) -> Response:
            try:
                check_token(request.headers.get("authorization"))
                raw = await read_capped(request.headers.get("content-length"), request.stream(), MAX_JSON_BYTES,
                                        STUDY_BODY)
                try:
                    body = json.loads(raw)
                except (ValueError, RecursionError):  # RecursionError: JSON nested too deep to parse
                    raise RequestError(400, STUDY_BODY) from None
                batched = self._batched()
                loop = asyncio.get_running_loop()
                answer = await loop.run_in_executor(self.io_threads, self.service.answer_study, body, batched)
                self.service.requests["studies"] += 1
                return JSONResponse(answer)
            except RequestError as err:
                self.service.requests["errors"] += 1
                return error(err)
            except Exception as err:
                return self._internal_error(err, "answering a study")

        @api.post("/v1/slabs")
        async def slabs(self, request: Request) -> Response:
            try:
                check_token(request.headers.get("authorization"))
                whole = self.service.whole_series(request.query_params.get("whole_series"))
                x = self.service.parse_slabs(await read_capped(
                    request.headers.get("content-length"), request.stream(), self.service.slab_bytes,
                    f"at most {MAX_SLABS} slabs of the model's input, float32, per request"))
                self.service.check_series_length(x, whole)
                probs = await asyncio.gather(*(self._score_slab(s) for s in x))
                self.service.requests["slabs"] += 1
                return JSONResponse(self.service.slabs_answer(np.asarray(probs, dtype=np.float64), whole))
            except RequestError as err:
                self.service.requests["errors"] += 1
                return error(err)
            except Exception as err:
                return self._internal_error(err, "scoring slabs")

        @api.post("/v1/feedback")
        async def feedback(self, request: Request) -> Response:
            """A reader's review; authenticated by the reader's own token, not the service token."""
            try:
                raw = await read_capped(request.headers.get("content-length"), request.stream(), MAX_JSON_BYTES,
                                        "send one review as JSON")
                try:
                    body = json.loads(raw)
                except (ValueError, RecursionError):
                    body = None
                loop = asyncio.get_running_loop()
                stored = await loop.run_in_executor(self.io_threads, self.service.review, body,
                                                    request.headers.get("authorization"))
                self.service.requests["feedback"] += 1
                return JSONResponse(stored)
            except RequestError as err:
                self.service.requests["errors"] += 1
                return error(err)
            except Exception as err:
                return self._internal_error(err, "storing a review")

        @api.get("/healthz")
        async def healthz(self) -> Response:
            return JSONResponse({"alive": True})

        @api.get("/readyz")
        async def readyz(self, request: Request) -> Response:
            try:
                check_token(request.headers.get("authorization"))
            except RequestError as err:
                return error(err)
            ready = await asyncio.get_running_loop().run_in_executor(self.probe_thread, self.service.ready)
            return JSONResponse(ready)

        @api.get("/metrics")
        async def metrics(self, request: Request) -> Response:
            try:
                check_token(request.headers.get("authorization"))
            except RequestError as err:
                return error(err)
            values = await asyncio.get_running_loop().run_in_executor(self.probe_thread, self.service.metrics)
            lines = [f"dicomops_{k.replace('.', '_')} {v}" for k, v in sorted(values.items())]
            return PlainTextResponse("\n".join(lines) + "\n")

        def check_health(self) -> None:
            """Ray restarts a replica whose engine stops answering."""
            self.service.champion.engine.runner(np.zeros((1, *self.service.champion.contract.input_shape),
                                                         np.float32))

    return InferenceService.bind(options, scaling)  # type: ignore[attr-defined]


def wait_until_serving(url: str, timeout_s: float, poll_s: float = 0.5) -> float:
    """Wait until ``GET url/healthz`` answers 200 (:func:`dicomops.preflight.wait_healthy`); return
    the seconds waited. Raises ``RuntimeError``, which ``dicomops online`` reports, saying what to change."""
    from dicomops import preflight

    try:
        return preflight.wait_healthy(f"{url}/healthz", timeout_s, name="the online service", poll_s=poll_s,
                                      fix="on a busy host raise serve.ready_timeout_s, or see Ray's logs under "
                                          "/tmp/ray/session_latest/logs")
    except TimeoutError as err:
        raise RuntimeError(str(err)) from None


def start(options: Any, scaling: Scaling, host: str = "127.0.0.1", port: int = 8300,
          ready_timeout_s: float = 300.0) -> str:
    """Start (or join, with ``RAY_ADDRESS``) a Ray cluster, run the application and return its URL
    once it answers. A local cluster binds to loopback and runs no dashboard.

    Ray waits a fixed 60 s for its HTTP proxy (``HTTP_PROXY_TIMEOUT``, not configurable) and then
    raises ``TimeoutError`` while the proxy goes on starting: in CI on 2 cores shared with two
    trainings it needed longer. So that wait's failure is only logged, and the service waits for
    its own ``/healthz`` through the proxy, up to `ready_timeout_s` (``serve.ready_timeout_s``).
    """
    address = os.environ.get("RAY_ADDRESS")
    if not address:
        # A single-node Ray whose every server (GCS, raylet, workers) listens on loopback only: the
        # switch Ray reads at import to run without a cluster network. Ray's token authentication
        # is on either way. With RAY_ADDRESS, the site's cluster decides.
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    import ray
    from ray import serve
    from ray._private import ray_constants

    if not address:  # Ray imported before this function ran read the switch already
        ray_constants.ENABLE_RAY_CLUSTER = False

    if not ray.is_initialized():
        if address:
            ray.init(address=address, logging_level=logging.WARNING)
        else:
            # Replica logs (Serve's access log: method, route, status, latency; never a body) stay
            # in Ray's session folder instead of being echoed to this terminal per request.
            ray.init(include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False,
                     num_cpus=max(os.cpu_count() or 1, scaling.replicas))
    url = f"http://{host}:{port}"
    # The health probe goes to loopback when the service listens on every interface.
    probe = {"0.0.0.0": f"http://127.0.0.1:{port}", "::": f"http://[::1]:{port}"}.get(host, url)
    try:
        serve.start(http_options={"host": host, "port": port}, detached=False)
        try:
            serve.run(build_app(options, scaling), name=APP_NAME, route_prefix="/", blocking=False)
        except TimeoutError as err:  # Ray's own 60 s for its proxy; the application is deployed
            log.warning("Ray Serve: %s; waiting up to %.0f s for %s/healthz", err, ready_timeout_s, probe)
        waited = wait_until_serving(probe, ready_timeout_s)
    except BaseException:
        stop()
        raise
    log.info("online service answering at %s, %.1f s after Ray Serve returned", url, waited)
    return url


def stop() -> None:
    """Stop the application and the Ray this process started (safe to call twice)."""
    import ray
    from ray import serve

    if not ray.is_initialized():
        return
    try:
        serve.shutdown()
    finally:
        ray.shutdown()


class CacheStartError(RuntimeError):
    """The Redis ``dicomops online`` was asked to start did not start; the message says why."""


@dataclass
class Launched:
    """A running online service and the Redis it started, if any."""

    url: str
    cache: str  # what the cache is, for the banner
    redis: Any = None

    def stop(self) -> None:
        try:
            stop()
        finally:
            if self.redis is not None:
                self.redis.stop()


def launch(options: Any, scaling: Scaling, host: str, port: int, redis_port: int | None,
           redis_maxmemory_mb: int, ready_timeout_s: float = 300.0) -> Launched:
    """The service with its cache: none when `options.use_cache` is off; else ``DICOMOPS_REDIS_URL``
    when set; else, with `redis_port`, a Redis started here (needs ``DICOMOPS_REDIS_PASSWORD``);
    else none. The replicas inherit the environment, so they find the same Redis. The cache's
    description (for the banner) names its server only: the URL may carry the password.

    Raises:
        CacheStartError: the Redis asked for did not start (no password, no redis-server, its port
            in use).
    """
    from dicomops.pacs.client import server_address
    from dicomops.serving import redis_server
    from dicomops.serving.cache import PASSWORD_ENV, URL_ENV

    redis, cache = None, "off (no DICOMOPS_REDIS_URL, and no local Redis asked for)"
    if not options.use_cache:
        cache = "off (--no-redis)"
    elif os.environ.get(URL_ENV):
        cache = f"Redis at {server_address(os.environ[URL_ENV])} ({URL_ENV})"
    elif redis_port is not None:
        password = os.environ.get(PASSWORD_ENV, "")
        try:
            redis = redis_server.start(redis_port, password, redis_maxmemory_mb, bind="127.0.0.1")
        except (ValueError, FileNotFoundError, RuntimeError, TimeoutError) as err:
            raise CacheStartError(str(err)) from err
        os.environ[URL_ENV] = redis.url
        cache = f"Redis at {redis.url} (started here, {redis_maxmemory_mb} MB, LRU)"
    try:
        url = start(options, scaling, host, port, ready_timeout_s)
    except BaseException:
        if redis is not None:
            redis.stop()
        raise
    return Launched(url, cache, redis)
