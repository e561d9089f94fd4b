"""The online service's decisions and its start, on the tiny exported champion and a real
redis-server: what ``dicomops online`` prints and refuses, how the Redis it starts is checked and
stopped, and what a replica answers to odd requests. Ray itself is stubbed out where it would only
make a test slow; the handlers run as the replica runs them, on an asyncio loop."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.responses import JSONResponse
from starlette.requests import Request
from typer.testing import CliRunner

from dicomops.cli import app
from dicomops.serving import ray_app, redis_server
from dicomops.serving.online import RequestError, Service, ServiceOptions
from tests.champion_fixture import CONFIG, TINY, ExportedChampion

TOKEN = "online-test-token"
PASSWORD = "online-test-redis-pw"
ROOT = Path(__file__).resolve().parents[2]
runner = CliRunner()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _said(result: Any) -> str:
    return " ".join(result.output.split())  # rich wraps long lines; the words are what count


@pytest.fixture(scope="module")
def service(exported_champion: ExportedChampion, tmp_path_factory: pytest.TempPathFactory) -> Service:
    """A replica's state on the tiny champion: no cache, no PACS (each test gives it what it needs)."""
    work = tmp_path_factory.mktemp("online-work")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DICOMOPS_MLFLOW_ARTIFACT_ROOT", str(exported_champion.artifacts))
        for name in ("DICOMOPS_REDIS_URL", "DICOMOPS_PACS_PASSWORD"):
            mp.delenv(name, raising=False)
        return Service(ServiceOptions(model_name=TINY.model_name, alias="champion", version=None, engine="ort-fp32",
                                      threads=1, work=work, staging=work / "staging", ingest=CONFIG.ingest,
                                      key=b"k" * 32, tracking_uri=exported_champion.uri, pacs_url=None,
                                      cache_ttl_s=3600))


def _fresh(service: Service) -> Service:
    """The fixture's service with counters of its own."""
    one = copy.copy(service)
    one.requests = dict.fromkeys(service.requests, 0)
    one.engine_batches, one.engine_slabs = 0, 0
    return one


@pytest.fixture()
def online_env(exported_champion: ExportedChampion, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The environment ``dicomops online`` runs in, pointed at the tiny champion's store."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", exported_champion.uri)
    monkeypatch.setenv("DICOMOPS_MLFLOW_ARTIFACT_ROOT", str(exported_champion.artifacts))
    monkeypatch.setenv("DICOMOPS_WORK_DIR", str(tmp_path / "work"))
    monkeypatch.setenv("DICOMOPS_SERVE_TOKEN", TOKEN)
    monkeypatch.setenv("COLUMNS", "200")
    for name in ("DICOMOPS_REDIS_URL", "DICOMOPS_REDIS_PASSWORD", "PREFECT_API_URL", "RAY_ADDRESS"):
        monkeypatch.delenv(name, raising=False)
    (tmp_path / "config.yaml").write_text(f"train:\n  model_name: {TINY.model_name}\n")
    return tmp_path


def _online(env: Path, *args: str) -> Any:
    """``dicomops online ARGS`` with the tiny champion's model name."""
    return runner.invoke(app, ["online", "--config", str(env / "config.yaml"), *args])


@pytest.fixture()
def ray_stub(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Ray's start replaced by one that records the options it was given; the service then 'runs'
    until its first wait, where a Ctrl-C stops it."""
    started: list[Any] = []
    real_sleep = time.sleep

    def start(options: Any, *args: Any, **kwargs: Any) -> str:
        started.append(options)
        return "http://127.0.0.1:8300"

    def interrupted(seconds: float) -> None:
        if started:
            raise KeyboardInterrupt
        real_sleep(seconds)

    monkeypatch.setattr(ray_app, "start", start)
    monkeypatch.setattr(ray_app, "stop", lambda: None)
    monkeypatch.setattr(time, "sleep", interrupted)  # the service's wait loop: Ctrl-C at once
    return started


@pytest.fixture()
def redis_url(monkeypatch: pytest.MonkeyPatch) -> None:
    """A cache named by DICOMOPS_REDIS_URL: nothing for ``dicomops online`` to start (and nothing it
    connects to: the replicas would)."""
    monkeypatch.setenv("DICOMOPS_REDIS_URL", f"redis://127.0.0.1:{_free_port()}/0")


# -- dicomops online: what it checks before Ray starts, and what it prints ---------------------------------------

def test_the_banner_names_the_cache_s_server_never_its_password(online_env: Path, ray_stub: list[Any],
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DICOMOPS_REDIS_URL", "redis://:S3cretRedisPw@10.0.0.5:6379/0")
    result = _online(online_env)
    assert result.exit_code == 0, result.output
    assert "S3cretRedisPw" not in result.output
    assert "Cache: Redis at redis://10.0.0.5:6379 (DICOMOPS_REDIS_URL)" in _said(result)


def test_the_version_is_resolved_before_ray_starts_and_every_replica_serves_it(
        online_env: Path, ray_stub: list[Any], redis_url: None) -> None:
    result = _online(online_env)
    assert result.exit_code == 0, result.output
    assert "serving pacs-classifier (champion: v1)" in _said(result)
    [options] = ray_stub
    assert (options.alias, options.version) == (None, "1")


def test_no_champion_is_said_in_one_line_before_ray_starts(online_env: Path, ray_stub: list[Any], redis_url: None,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{online_env / 'empty' / 'mlflow.db'}")
    result = _online(online_env)
    assert result.exit_code == 2, result.output
    assert "no version of pacs-classifier holds the alias 'champion'" in _said(result)
    assert ray_stub == []


def test_an_mlflow_server_that_does_not_answer_stops_it_at_once(online_env: Path, ray_stub: list[Any],
                                                               redis_url: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{_free_port()}")
    t0 = time.monotonic()
    result = _online(online_env)
    assert result.exit_code == 2, result.output
    assert "cannot start: MLflow tracking server" in _said(result)
    assert time.monotonic() - t0 < 30 and ray_stub == []


def test_alias_and_version_together_are_refused(online_env: Path, ray_stub: list[Any], redis_url: None) -> None:
    result = _online(online_env, "--alias", "challenger", "--version", "1")
    assert result.exit_code == 2
    assert "give --version or --alias, not both" in _said(result)
    assert ray_stub == []


def test_no_redis_serves_without_a_cache_and_says_so(online_env: Path, ray_stub: list[Any],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DICOMOPS_REDIS_URL", "redis://127.0.0.1:6390/0")  # off means off, whatever is set
    result = _online(online_env, "--no-redis")
    assert result.exit_code == 0, result.output
    assert "Cache: off (--no-redis)" in _said(result)
    [options] = ray_stub
    assert options.use_cache is False


@pytest.mark.parametrize("missing", ["password", "redis-server"])
def test_a_cache_that_cannot_start_names_the_way_to_serve_without_it(
        missing: str, online_env: Path, ray_stub: list[Any], monkeypatch: pytest.MonkeyPatch) -> None:
    if missing == "redis-server":
        monkeypatch.setenv("DICOMOPS_REDIS_PASSWORD", PASSWORD)
        monkeypatch.setenv("PATH", str(online_env))  # a PATH with no redis-server on it
    result = _online(online_env, "--redis-port", str(_free_port()))
    said = _said(result)
    assert result.exit_code == 2, result.output
    assert "dicomops online --no-redis" in said
    assert "leave DICOMOPS_REDIS_URL unset" not in said  # it is unset: that hint was never true here
    assert ("DICOMOPS_REDIS_PASSWORD" if missing == "password" else "redis-server is not installed") in said
    assert ray_stub == []


def test_a_stop_signal_while_starting_leaves_no_redis_behind(online_env: Path, exported_champion: ExportedChampion) -> None:
    """systemd's stop (SIGTERM) while Ray starts: the Redis started for the service stops with it."""
    marker = online_env / "redis.pid"
    script = textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from dicomops import cli
        from dicomops.serving import ray_app, redis_server

        real_start = redis_server.start

        def start(*args, **kwargs):
            server = real_start(*args, **kwargs)
            Path({str(marker)!r}).write_text(str(server.process.pid))
            return server

        def slow_ray(*args, **kwargs):  # a replica that takes long to start
            time.sleep(300)

        redis_server.start, ray_app.start = start, slow_ray
        sys.argv = ["dicomops", "online", "--config", {str(online_env / "config.yaml")!r}, "--redis-port",
                    "{_free_port()}"]
        cli.main()
    """)
    env = dict(os.environ, DICOMOPS_REDIS_PASSWORD=PASSWORD, PYTHONDONTWRITEBYTECODE="1")
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    pid = None
    try:
        deadline = time.monotonic() + 120
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert marker.exists(), proc.communicate(timeout=30)[0].decode()[-2000:]
        pid = int(marker.read_text())
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=60)[0].decode()
        assert proc.returncode == 1, out[-2000:]
        assert "stopped while starting" in out
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):  # there only when the test failed: the orphan
                os.kill(pid, signal.SIGKILL)


# -- the Redis dicomops online starts --------------------------------------------------------------------------

def test_a_port_another_process_holds_is_refused_and_it_is_sent_nothing() -> None:
    port = _free_port()
    with socket.socket() as squatter:
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        squatter.bind(("127.0.0.1", port))
        squatter.listen(8)
        try:
            started = redis_server.start(port, PASSWORD, maxmemory_mb=16)
        except RuntimeError as err:
            assert f"port {port} on 127.0.0.1 is in use" in str(err)
        else:
            started.stop()  # its redis-server may bind the port once the squatter has gone
            pytest.fail("redis_server.start() said it started on a port another process holds")
        squatter.settimeout(0.5)
        with pytest.raises(TimeoutError):  # nobody connected: no AUTH, no data went to it
            squatter.accept()


def test_a_started_redis_is_ours_and_answers_our_password_only(tmp_path: Path) -> None:
    import redis

    server = redis_server.start(_free_port(), PASSWORD, maxmemory_mb=16, workdir=tmp_path)
    try:
        assert server.process.poll() is None
        assert redis.Redis(port=server.port, password=PASSWORD).ping()
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=server.port, password="wrong").ping()
    finally:
        server.stop()
    assert server.process.poll() is not None


# -- what a replica answers -------------------------------------------------------------------------------------

def test_a_uid_with_a_trailing_newline_is_a_bad_request_not_a_pacs_outage(service: Service) -> None:
    from dicomops.pacs.client import PacsClient, PacsCredentials

    one = _fresh(service)
    one.pacs = PacsClient(f"http://127.0.0.1:{_free_port()}/dicom-web", PacsCredentials("u", "p"), timeout_s=2)
    with pytest.raises(RequestError) as refused:
        one.answer_study({"study_instance_uid": "1.2.840.1\n"}, None)
    assert refused.value.status == 400 and "study_instance_uid" in refused.value.message


def test_a_uid_the_dicomweb_client_will_not_send_is_422_not_a_retry(service: Service) -> None:
    from dicomops.pacs.client import translate_errors

    class RefusingPacs:
        def image_instances(self, study_uid: str) -> dict[str, str]:
            with translate_errors("listing the study's instances", "http://pacs:8042"):
                raise ValueError(f"not a valid UID: {study_uid}x")  # as dicomweb-client refuses one

    one = _fresh(service)
    one.pacs = RefusingPacs()
    with pytest.raises(RequestError) as refused:
        one.answer_study({"study_instance_uid": "1.2.840.1"}, None)
    assert (refused.value.status, refused.value.retry_after) == (422, None)
    assert "correct the study's UIDs in the PACS" in refused.value.message
    assert "1.2.840.1x" not in refused.value.message


def test_slabs_the_model_overflows_on_are_a_400_and_their_batch_neighbours_keep_their_score(service: Service) -> None:
    one = _fresh(service)
    shape = one.champion.contract.input_shape
    good, huge = np.zeros(shape, np.float32), np.full(shape, 3e38, np.float32)  # finite, far outside [0, 1]
    alone = one.champion.engine.probabilities(good[None])[0]
    together = one.score_batch_sync([good, huge])  # one engine batch, as two requests' slabs share one
    assert together[0] == alone and not np.isfinite(together[1])
    with pytest.raises(RequestError) as refused:
        one.slabs_answer(np.asarray([together[0], together[1]]))
    assert refused.value.status == 400
    assert "1 of the 2 slabs (the first: slab 1)" in refused.value.message
    assert "outside what it takes" in refused.value.message
    JSONResponse(one.slabs_answer(np.asarray([together[0]])))  # a finite answer is JSON


def test_slabs_get_a_series_score_only_when_the_caller_says_they_are_a_whole_series(service: Service) -> None:
    from dicomops.training.scoring import series_score

    one = _fresh(service)
    rule = one.champion.rule
    probs = np.asarray([0.1, 0.7, 0.2, 0.9, 0.3])
    part = one.slabs_answer(probs)
    assert "series_score" not in part and "present" not in part and "whole_series=true" in part["series"]
    whole = one.slabs_answer(probs, whole_series=True)
    assert whole["series_score"] == series_score(probs, rule)
    assert whole["present"] == (whole["series_score"] >= one.champion.threshold)
    assert [one.whole_series(v) for v in (None, "true", "1", "TRUE", "false", "0")] == [False, True, True, True,
                                                                                         False, False]
    with pytest.raises(RequestError) as unclear:
        one.whole_series("yes")
    assert unclear.value.status == 400 and "whole_series is true" in unclear.value.message
    shape = one.champion.contract.input_shape
    too_few = np.zeros((rule.top_k - 1, *shape), np.float32)
    one.check_series_length(too_few, whole_series=False)
    with pytest.raises(RequestError) as short:
        one.check_series_length(too_few, whole_series=True)
    assert short.value.status == 400 and f"reads its {rule.top_k} highest" in short.value.message
    one.check_series_length(np.zeros((rule.top_k, *shape), np.float32), whole_series=True)


def _replica(service: Service) -> Any:
    """The deployment's class as Ray builds it, without Ray: an instance holding `service`."""
    cls = ray_app.build_app(None, ray_app.Scaling())._bound_deployment.func_or_class
    replica = cls.__new__(cls)
    replica.service = service
    replica.probe_thread = ThreadPoolExecutor(1)
    replica.io_threads = ThreadPoolExecutor(1)
    return replica


def _get(path: str) -> Request:
    return Request({"type": "http", "method": "GET", "path": path, "query_string": b"",
                    "headers": [(b"authorization", f"Bearer {TOKEN}".encode())]})


def test_metrics_keep_a_count_and_a_sum_of_the_engine_s_batches(service: Service,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DICOMOPS_SERVE_TOKEN", TOKEN)
    one = _fresh(service)
    shape = one.champion.contract.input_shape
    for n in (1, 2, 6):
        one.score_batch_sync([np.zeros(shape, np.float32)] * n)
    replica = _replica(one)
    text = asyncio.run(replica.metrics(_get("/metrics"))).body.decode()
    assert "dicomops_engine_batches 3.0\n" in text
    assert "dicomops_engine_mean_batch_size 3.0\n" in text
    assert not [k for k, v in vars(replica).items() if isinstance(v, list)]  # nothing kept per batch


@pytest.fixture()
def hung_redis(tmp_path: Path) -> Iterator[redis_server.RedisServer]:
    """A Redis that accepts connections and never answers (SIGSTOP), as one swapped out or stuck is."""
    server = redis_server.start(_free_port(), PASSWORD, maxmemory_mb=16, workdir=tmp_path)
    os.kill(server.process.pid, signal.SIGSTOP)
    try:
        yield server
    finally:
        os.kill(server.process.pid, signal.SIGCONT)
        server.stop()


@pytest.mark.parametrize("route", ["readyz", "metrics"])
def test_probes_of_a_hung_redis_do_not_stall_the_replica_s_other_requests(
        route: str, service: Service, hung_redis: redis_server.RedisServer, monkeypatch: pytest.MonkeyPatch) -> None:
    from dicomops.serving.cache import VolumeCache

    monkeypatch.setenv("DICOMOPS_SERVE_TOKEN", TOKEN)
    one = _fresh(service)
    one.cache = VolumeCache(hung_redis.url, PASSWORD, timeout_s=1.0)
    replica = _replica(one)

    async def probe_while_ticking() -> tuple[float, float, Any]:
        gaps: list[float] = []
        done = asyncio.Event()

        async def tick() -> None:  # what every other request on the replica needs: the loop turning
            last = time.perf_counter()
            while not done.is_set():
                await asyncio.sleep(0.01)
                gaps.append(time.perf_counter() - last)
                last = time.perf_counter()

        ticker = asyncio.create_task(tick())
        await asyncio.sleep(0.05)
        t0 = time.perf_counter()
        answer = await getattr(replica, route)(_get(f"/{route}"))
        took = time.perf_counter() - t0
        done.set()
        await ticker
        return took, max(gaps), answer

    took, longest_stall, answer = asyncio.run(probe_while_ticking())
    assert took >= 0.8  # Redis was asked and hung until the cache's timeout
    assert longest_stall < 0.3, f"the event loop stood still for {longest_stall:.2f} s"
    if route == "readyz":
        assert b'"cache":"down (recomputing)"' in answer.body


def test_a_study_with_a_series_that_cannot_be_scored_is_answered_with_the_failed_series_listed(
        service: Service, tmp_path: Path) -> None:
    """One series whose pixels never decode: the whole study was a 422 and nothing went back for
    its good series (until 2026-12-06). Now the answer is ``partly_scored``: the good series scored
    and, with write_back, its SR stored; the failed one listed with its reason code by the UID the
    caller knows; not the watch's ``answered`` row (the watch answers it once itself). A study none
    of whose series can be scored stays a 422, and lists them."""
    from dicomops.pacs import watch
    from tests.unit.test_partial_study import (
        FolderPacs,
        evidence_series,
        partial_study,
        study_uid_of,
    )

    files, good, (bad,) = partial_study(tmp_path / "part", index=81)
    none_files, _, (alone,) = partial_study(tmp_path / "none", index=83, good=False)
    one = _fresh(service)
    pacs = FolderPacs([*files, *none_files])
    one.pacs = pacs
    answer = one.answer_study({"study_instance_uid": study_uid_of(files), "write_back": True}, one.champion.engine)
    assert (answer["status"], answer["accepted_series"], answer["results_stored"]) == ("partly_scored", 2, 1)
    assert [s["series_instance_uid"] for s in answer["series"]] == [good]
    assert answer["failed_series"] == [{"series_instance_uid": bad, "reason": "unreadable_pixels"}]
    assert answer["warning"].startswith("1 of its 2 series could not be scored (unreadable_pixels (1))")
    (report,) = pacs.stored
    assert evidence_series(report) == {good}
    token = watch.study_token(one.options.key, study_uid_of(files))
    assert token not in watch.handled_tokens(one.options.work)
    JSONResponse(answer)  # JSON as it is

    with pytest.raises(RequestError) as refused:
        one.answer_study({"study_instance_uid": study_uid_of(none_files), "write_back": True}, one.champion.engine)
    assert refused.value.status == 422
    assert "none of its series could be scored: unreadable_pixels (1)" in refused.value.message
    assert refused.value.extra == {"failed_series": [{"series_instance_uid": alone, "reason": "unreadable_pixels"}]}
    assert len(pacs.stored) == 1
