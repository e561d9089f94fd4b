"""The online service on a real Ray Serve, with a real Orthanc and a real Redis: a study sent to the
PACS is answered by pacs-watch with no one acting and comes back online warm from the cache it
filled; a study scored by the batch flow comes back online warm with exactly the same finding as the flow and
the library; pre-cut slabs are scored as the engine scores them; no token, a bad body, an unknown
study or a study the gate refuses each get a clear error and nothing is written back; Redis gone,
the service keeps answering the same; every Ray server listens on loopback only; nothing
identifying reaches Redis, the work directory or MLflow."""

from __future__ import annotations

import contextlib
import http.client
import io
import json
import logging
import secrets
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import psutil
import pydicom
import pytest
from pydantic import SecretStr

from dicomops.config import FeedbackConfig
from dicomops.deid import scan_for_phi
from dicomops.deid.keys import KeyedMapper
from dicomops.feedback.store import FeedbackStore
from dicomops.pacs.client import PASSWORD_ENV, URL_ENV, USER_ENV, PacsClient
from dicomops.pacs.orthanc import OrthancProcess
from dicomops.serving import ray_app, redis_server
from dicomops.serving.cache import PASSWORD_ENV as REDIS_PASSWORD_ENV
from dicomops.serving.cache import URL_ENV as REDIS_URL_ENV
from dicomops.serving.cache import VolumeCache
from dicomops.serving.champion import load_champion
from dicomops.serving.online import TOKEN_ENV, ServiceOptions
from dicomops.serving.predict import answer_pacs_study
from dicomops.training.scoring import SeriesRule, series_score
from flows.predict import predict
from tests.champion_fixture import CONFIG, KEY, TINY, ExportedChampion
from tests.flows.test_ingest_flow import _prefect_database
from tests.hostile import ct_slice
from tests.unit.test_real_files import _needles

from .conftest import free_port
from .orthanc_fixture import orthanc, synthetic_study  # noqa: F401  (orthanc is a fixture)
from .test_pacs_watch import _reports, _send, _wait_stable
from .test_serving_cache import require_redis

pytest.importorskip("ray.serve", reason="the online extra is not installed (pip install -e '.[online]')")
pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("prefect_harness")]
TOKEN = secrets.token_urlsafe(24)
READER_TOKEN = secrets.token_urlsafe(24)
REVIEWERS = FeedbackConfig(reviewers={"ada": "senior", "bo": "reader"})


@pytest.fixture(scope="module")
def service(exported_champion: ExportedChampion, orthanc: OrthancProcess,  # noqa: F811
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, redis_server.RedisServer, Path]]:
    """Redis, then the service on Ray Serve, with the environment a site would give them."""
    require_redis()
    root = tmp_path_factory.mktemp("online")
    password = secrets.token_urlsafe(18)
    redis = redis_server.start(free_port(), password, maxmemory_mb=64, workdir=root)
    with pytest.MonkeyPatch.context() as mp:
        env = {"MLFLOW_TRACKING_URI": exported_champion.uri, "DICOMOPS_MLFLOW_ARTIFACT_ROOT":
               str(exported_champion.artifacts), "DICOMOPS_DEID_KEY": KEY.decode(), URL_ENV: orthanc.url,
               USER_ENV: orthanc.credentials.user, PASSWORD_ENV: orthanc.credentials.password,
               REDIS_URL_ENV: redis.url, REDIS_PASSWORD_ENV: password, TOKEN_ENV: TOKEN,
               "DICOMOPS_REVIEWER_TOKENS": f"ada={READER_TOKEN}"}
        for k, v in env.items():
            mp.setenv(k, v)
        options = ServiceOptions(model_name=TINY.model_name, alias="champion", version=None, engine="auto",
                                 threads=1, work=root / "work", staging=root / "staging", ingest=CONFIG.ingest,
                                 key=b"", tracking_uri=exported_champion.uri, pacs_url=None, cache_ttl_s=3600,
                                 feedback=REVIEWERS)
        # Ray's own wait for its HTTP proxy cut to nothing, as on a host too busy for the proxy to start
        # within Ray's fixed 60 s (CI, 2026-12-05): the service must wait for itself, and every test
        # of this module then runs on a service started that way.
        mp.setattr("ray.serve._private.client.HTTP_PROXY_TIMEOUT", 0)
        with _recording(ray_app.log):
            launched = ray_app.launch(options, ray_app.Scaling(max_batch=32, batch_wait_s=0.005), "127.0.0.1",
                                      free_port(), None, 64, ready_timeout_s=120)
        try:
            yield launched.url, redis, root
        finally:
            launched.stop()
            redis.stop()


START_LOG: list[str] = []


@contextlib.contextmanager
def _recording(logger: logging.Logger) -> Iterator[list[str]]:
    """The messages `logger` emits inside the block, in the module's ``START_LOG``."""
    START_LOG.clear()

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            START_LOG.append(record.getMessage())

    handler, level = Keep(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield START_LOG
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def test_a_proxy_slower_than_rays_own_wait_still_gives_a_service(
        service: tuple[str, redis_server.RedisServer, Path]) -> None:
    url, _, _ = service
    assert any("Proxies not available after 0s" in m and "waiting up to 120 s" in m for m in START_LOG), START_LOG
    assert any(m.startswith(f"online service answering at {url}") for m in START_LOG), START_LOG
    assert httpx.get(f"{url}/healthz", timeout=10).json() == {"alive": True}


def _auth(token: str = TOKEN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _ask(url: str, body: object, token: str = TOKEN) -> httpx.Response:
    return httpx.post(f"{url}/v1/studies", json=body, headers=_auth(token), timeout=120)


def test_every_ray_server_listens_on_loopback_only(service: tuple[str, redis_server.RedisServer, Path]) -> None:
    ray_pids = {p.pid for p in psutil.process_iter(["name", "cmdline"])
                if "ray" in (p.info["name"] or "") or any("ray" in c for c in (p.info["cmdline"] or [])[:3])}
    listening = [c for c in psutil.net_connections("tcp") if c.status == psutil.CONN_LISTEN and c.pid in ray_pids]
    assert len(listening) >= 5  # GCS, raylet, controller, proxy, replica: not vacuous
    exposed = [(c.laddr, c.pid) for c in listening if c.laddr.ip not in ("127.0.0.1", "::ffff:127.0.0.1", "::1")]
    assert exposed == []


def test_requests_without_the_token_or_with_a_bad_body_are_refused(
        service: tuple[str, redis_server.RedisServer, Path]) -> None:
    url = service[0]
    assert httpx.get(f"{url}/healthz").status_code == 200
    assert httpx.get(f"{url}/readyz").status_code == 401
    ready = httpx.get(f"{url}/readyz", headers=_auth()).json()
    assert ready["ready"] and ready["cache"] == "up" and ready["model"]["engine"] == "ort-fp32"
    refused = httpx.post(f"{url}/v1/studies", json={"study_instance_uid": "1.2.3"})
    assert refused.status_code == 401 and TOKEN_ENV in refused.json()["error"]
    assert _ask(url, {"study_instance_uid": "1.2.3"}, token="wrong").status_code == 401
    bad = _ask(url, {"study": "x"})
    assert bad.status_code == 400 and "study_instance_uid" in bad.json()["error"]
    unknown = _ask(url, {"study_instance_uid": "1.2.826.0.1.3680043.10.999.1"})
    assert unknown.status_code == 404 and "no image" in unknown.json()["error"]
    slabs = io.BytesIO()
    np.save(slabs, np.zeros((2, 1, 8, 8), np.float32))
    wrong_shape = httpx.post(f"{url}/v1/slabs", content=slabs.getvalue(), headers=_auth())
    assert wrong_shape.status_code == 400 and "input contract" in wrong_shape.json()["error"]
    # A scalar for slabs, and JSON nested past what the parser can follow: client errors, said so.
    scalar = io.BytesIO()
    np.save(scalar, np.float32(1))
    no_slabs = httpx.post(f"{url}/v1/slabs", content=scalar.getvalue(), headers=_auth())
    assert no_slabs.status_code == 400 and "(N, C, H, W)" in no_slabs.json()["error"]
    deep = httpx.post(f"{url}/v1/studies", content=b"[" * 50_000, headers={**_auth(), "content-type": "application/json"})
    assert deep.status_code == 400 and "study_instance_uid" in deep.json()["error"]
    # Bodies past the cap: one declared a terabyte long and never sent (answered before a byte is
    # read, through Ray's proxy), and one that streams past 64 KiB without a length (chunked).
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.putrequest("POST", "/v1/slabs")
    for name, value in {**_auth(), "Content-Length": str(10**12)}.items():
        conn.putheader(name, value)
    conn.endheaders()
    huge = conn.getresponse()
    assert huge.status == 413 and "at most 4096 slabs" in json.loads(huge.read())["error"]
    conn.close()
    streamed = httpx.post(f"{url}/v1/studies", content=(b" " * 1024 for _ in range(100)),
                          headers={**_auth(), "content-type": "application/json"}, timeout=30)
    assert streamed.status_code == 413 and "65536" in streamed.json()["error"]
    assert httpx.get(f"{url}/healthz", timeout=10).status_code == 200  # and the service goes on


def test_a_study_sent_to_the_pacs_is_answered_by_pacs_watch_and_comes_back_warm_online(
        service: tuple[str, redis_server.RedisServer, Path], orthanc: OrthancProcess,  # noqa: F811
        tmp_path: Path) -> None:
    """The issue's "done when": no one acts between the PACS receiving a study and its SR, and the
    study asked for online comes from the cache pacs-watch filled."""
    from flows.pacs_watch import pacs_watch

    url = service[0]
    files = synthetic_study(tmp_path / "send", slices=12, matrix=128, index=21, vendor="canon")
    study = _send(orthanc, files)
    _wait_stable(orthanc, {study})
    result = pacs_watch(work=tmp_path / "work", staging=tmp_path / "staging", config=CONFIG)
    assert result["ingested"] >= 1 and len(_reports(orthanc, study)) == 1
    online = _ask(url, {"study_instance_uid": study})
    assert online.status_code == 200 and online.json()["warm"], online.text
    assert online.json()["series"][0]["series_instance_uid"] == str(pydicom.dcmread(files[0]).SeriesInstanceUID)


def test_online_batch_and_library_agree_warm_from_the_cache_and_after_redis_dies(
        service: tuple[str, redis_server.RedisServer, Path], exported_champion: ExportedChampion,
        orthanc: OrthancProcess, tmp_path: Path) -> None:  # noqa: F811
    url, redis, root = service
    # The service fixture's environment (MLflow, PACS, Redis, key, token) holds for the whole module.
    files = synthetic_study(tmp_path / "send", slices=12, matrix=128, index=11, vendor="ge")
    study = _send(orthanc, files)
    _wait_stable(orthanc, {study})

    batch = predict(pacs_query=SecretStr(f"StudyInstanceUID={study}"), work=tmp_path / "work", config=CONFIG)
    assert (batch["studies_scored"], batch["results_stored"]) == (1, 1)
    table = pd.read_csv(batch["results"], keep_default_na=False, float_precision="round_trip")

    online = _ask(url, {"study_instance_uid": study})
    assert online.status_code == 200, online.text
    answer = online.json()
    assert answer["warm"] and not {"retrieve_s", "gate_s", "preprocess_s"} & set(answer["timings_s"])
    series_uid = str(pydicom.dcmread(files[0]).SeriesInstanceUID)
    (finding,) = answer["series"]
    assert finding["series_instance_uid"] == series_uid  # the caller's own UID, in memory only
    assert KeyedMapper(KEY).uid(series_uid) == table.series[0]
    assert (finding["score"], finding["present"]) == (table.score[0], bool(table.present[0]))  # exactly

    champion = load_champion(exported_champion.uri, TINY.model_name, models_dir=tmp_path / "models")
    cache = VolumeCache.from_env()
    with PacsClient(orthanc.dicomweb_url, orthanc.credentials) as pacs:
        library = answer_pacs_study(study, pacs, tmp_path / "staging", tmp_path / "scratch", CONFIG.ingest, KEY,
                                    champion, cache)
    assert [(f.score, f.present) for f in library.findings] == [(finding["score"], finding["present"])]

    # Pre-cut slabs: the engine's own probabilities, through the batcher.
    x = np.random.default_rng(3).random((9, *champion.contract.input_shape), dtype=np.float32)
    body = io.BytesIO()
    np.save(body, x)
    slabs = httpx.post(f"{url}/v1/slabs", content=body.getvalue(), headers=_auth(), timeout=60).json()
    assert np.array_equal(np.asarray(slabs["probabilities"]), champion.engine.probabilities(x))
    assert "series_score" not in slabs  # not said to be a whole series
    two = io.BytesIO()
    np.save(two, x[:2])
    short = httpx.post(f"{url}/v1/slabs", params={"whole_series": "true"}, content=two.getvalue(), headers=_auth())
    assert short.status_code == 400 and "cannot be a whole series" in short.json()["error"]
    unclear = httpx.post(f"{url}/v1/slabs", params={"whole_series": "maybe"}, content=two.getvalue(), headers=_auth())
    assert unclear.status_code == 400 and "whole_series is true" in unclear.json()["error"]
    slabs = httpx.post(f"{url}/v1/slabs", params={"whole_series": "true"}, content=body.getvalue(), headers=_auth(),
                       timeout=60).json()
    assert np.array_equal(np.asarray(slabs["probabilities"]), champion.engine.probabilities(x))
    # Its series score by the champion's own rule (the contrast since 2026-12-06), not the top-k mean.
    assert champion.rule.kind == "top_k_contrast"
    assert slabs["series_score"] == series_score(champion.engine.probabilities(x), champion.rule)
    assert slabs["series_score"] != series_score(champion.engine.probabilities(x), SeriesRule(champion.rule.top_k))

    # Nothing identifying in Redis, the work directories or MLflow.
    needles = _needles(files)
    for k in cache.client.scan_iter("dicomops:*"):
        text = k.decode() + cache.client.get(k).decode("latin-1")
        assert not [n for n in needles if len(n) >= 4 and n in text]
    for place in (tmp_path / "work", root / "work", exported_champion.artifacts, _prefect_database()):
        assert scan_for_phi(place, needles) == [], place  # the database holds the batch's query, masked

    # Redis gone: the service recomputes and answers the same.
    redis.stop()
    cold = _ask(url, {"study_instance_uid": study})
    assert cold.status_code == 200 and not cold.json()["warm"]
    assert cold.json()["series"][0]["score"] == finding["score"]
    metrics = httpx.get(f"{url}/metrics", headers=_auth()).text
    assert "dicomops_cache_errors" in metrics and "dicomops_engine_mean_batch_size" in metrics
    assert len(_reports(orthanc, study)) == 1  # online answers wrote nothing back


def test_a_study_the_gate_refuses_is_a_clear_error_and_nothing_is_written_back(
        service: tuple[str, redis_server.RedisServer, Path], orthanc: OrthancProcess,  # noqa: F811
        tmp_path: Path) -> None:
    url = service[0]
    ids = {"StudyInstanceUID": pydicom.uid.generate_uid(), "SeriesInstanceUID": pydicom.uid.generate_uid(),
           "PatientID": "ONLINE-REFUSED-7", "PatientName": "REFUSED^ONLINE", "Modality": "MR"}
    files = []
    for i in range(4):
        path = tmp_path / f"mr{i}.dcm"
        ct_slice(z=float(i), rows=64, cols=64, **ids).save_as(path, enforce_file_format=True)
        files.append(path)
    study = _send(orthanc, files)
    _wait_stable(orthanc, {study})
    answer = _ask(url, {"study_instance_uid": study, "write_back": True})
    assert answer.status_code == 422 and "nothing was written back" in answer.json()["error"]
    assert study not in answer.text and "ONLINE-REFUSED-7" not in answer.text
    assert _reports(orthanc, study) == []



def test_a_reader_reviews_a_result_online_and_only_configured_readers_are_heard(
        service: tuple[str, redis_server.RedisServer, Path], orthanc: OrthancProcess,  # noqa: F811
        tmp_path: Path) -> None:
    """The review endpoint for sites without an SR-writing viewer: the reader's judgement reaches the
    feedback store with provenance under the pseudonymous series UID; anyone else, or a bad body, is
    refused with a clear error and nothing is stored."""
    url, _, root = service
    files = synthetic_study(tmp_path / "send", slices=12, matrix=128, index=31, vendor="siemens")
    study = _send(orthanc, files)
    _wait_stable(orthanc, {study})
    answer = _ask(url, {"study_instance_uid": study})
    assert answer.status_code == 200, answer.text
    (finding,) = answer.json()["series"]
    series_uid = finding["series_instance_uid"]
    body = {"reader": "ada", "series_instance_uid": series_uid, "verdict": "reject"}

    def review(request: object, token: str = READER_TOKEN) -> httpx.Response:
        return httpx.post(f"{url}/v1/feedback", json=request, headers=_auth(token), timeout=60)

    store = FeedbackStore(root / "work")
    before = len(store.items())
    assert review(body, token=TOKEN).status_code == 401  # the service token is not a reader's
    bo = review({**body, "reader": "bo"})  # configured, but holds no token
    assert bo.status_code == 401 and "unknown reviewer or wrong token" in bo.json()["error"]
    assert review({**body, "reader": "mallory"}).status_code == 401
    bad = review({**body, "verdict": "maybe"})
    assert bad.status_code == 400 and '"verdict"' in bad.json()["error"]
    unknown = review({**body, "series_instance_uid": "1.2.826.0.1.3680043.10.999.7"})
    assert unknown.status_code == 404
    assert len(store.items()) == before  # nothing stored by any refusal

    stored = review(body)
    assert stored.status_code == 200, stored.text
    assert stored.json()["model_label"] == int(finding["present"])
    assert stored.json()["reader_label"] == 1 - int(finding["present"])
    item = store.items().iloc[-1]
    assert (item.reader, item.role, item.source, item.verdict) == ("ada", "senior", "endpoint", "reject")
    assert item.series == KeyedMapper(KEY).uid(series_uid) and item.version == str(answer.json()["model"]["version"])
    assert series_uid not in stored.text
    assert scan_for_phi(root / "work", _needles(files)) == []
