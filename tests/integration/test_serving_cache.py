"""Batch inference over a real Orthanc with a real Redis: SRs stored back under the original study;
the same study scored again comes warm from the cache (no retrieval, gate or preprocessing) with the
same finding; a corrupt entry and a Redis that is gone both leave the answer exactly the same; a
study the gate refuses writes nothing back; nothing identifying reaches Redis, the work directory
or MLflow."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pydicom
import pytest
from pydantic import SecretStr

from dicomops.deid import scan_for_phi
from dicomops.pacs.client import PASSWORD_ENV, URL_ENV, USER_ENV, PacsClient
from dicomops.pacs.orthanc import OrthancProcess
from dicomops.serving import redis_server
from dicomops.serving.cache import PASSWORD_ENV as REDIS_PASSWORD_ENV
from dicomops.serving.cache import URL_ENV as REDIS_URL_ENV
from dicomops.serving.cache import VolumeCache
from dicomops.serving.champion import load_champion
from dicomops.serving.predict import answer_pacs_study
from flows.predict import predict
from tests.champion_fixture import CONFIG, KEY, TINY, ExportedChampion
from tests.flows.test_ingest_flow import _prefect_database
from tests.hostile import ct_slice
from tests.unit.test_real_files import _needles

from .conftest import free_port
from .orthanc_fixture import orthanc, synthetic_study  # noqa: F401  (orthanc is a fixture)
from .test_pacs_watch import _reports, _send, _wait_stable

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("prefect_harness")]


def require_redis() -> None:
    import shutil

    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (make integration installs the Debian package redis-server)")


@pytest.fixture()
def redis(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[redis_server.RedisServer]:
    require_redis()
    password = secrets.token_urlsafe(18)
    server = redis_server.start(free_port(), password, maxmemory_mb=64, workdir=tmp_path)
    monkeypatch.setenv(REDIS_URL_ENV, server.url)
    monkeypatch.setenv(REDIS_PASSWORD_ENV, password)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture()
def env(exported_champion: ExportedChampion, orthanc: OrthancProcess,  # noqa: F811
        monkeypatch: pytest.MonkeyPatch) -> ExportedChampion:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", exported_champion.uri)
    monkeypatch.setenv("DICOMOPS_MLFLOW_ARTIFACT_ROOT", str(exported_champion.artifacts))
    monkeypatch.setenv("DICOMOPS_DEID_KEY", KEY.decode())
    monkeypatch.setenv(URL_ENV, orthanc.url)
    monkeypatch.setenv(USER_ENV, orthanc.credentials.user)
    monkeypatch.setenv(PASSWORD_ENV, orthanc.credentials.password)
    return exported_champion


def _scores(answer) -> list[tuple[str, float, bool]]:  # type: ignore[no-untyped-def]
    return [(f.series, f.score, f.present) for f in answer.findings]


def test_batch_over_the_pacs_then_warm_then_corrupt_then_redis_gone(
        env: ExportedChampion, orthanc: OrthancProcess, redis: redis_server.RedisServer,  # noqa: F811
        tmp_path: Path) -> None:
    files = synthetic_study(tmp_path / "send", slices=12, matrix=128, index=7, vendor="siemens")
    other = synthetic_study(tmp_path / "send-2", slices=12, matrix=128, index=8, vendor="philips")
    study, second = _send(orthanc, files), _send(orthanc, other)
    _wait_stable(orthanc, {study, second})
    work, staging = tmp_path / "work", tmp_path / "staging"

    # Two studies: the second is retrieved while the first is gated and scored.
    result = predict(pacs_query=SecretStr("all"), work=work, config=CONFIG)
    assert (result["studies_scored"], result["results_stored"], result["studies_warm"]) == (2, 2, 0)
    assert result["cache.misses"] >= 2 and result["cache.bytes_written"] > 0
    for uid in (study, second):
        (report,) = _reports(orthanc, uid)
        assert report.StudyInstanceUID == uid
    # pacs-watch, once the studies are stable, does not answer them again (the batch answered them
    # in full): it gates them, so that drift monitoring and readers' feedback find their files.
    ledger = pd.read_csv(work / "pacs/studies.csv", keep_default_na=False)
    assert list(ledger.status) == ["answered"] * 2 and list(ledger.results_stored) == [1, 1]
    assert all(r.startswith("answered by predict --pacs (batch ") for r in ledger.reason)
    from dicomops.layout import WorkLayout
    from dicomops.pacs import watch

    with PacsClient(orthanc.dicomweb_url, orthanc.credentials) as pacs:
        champion = load_champion(env.uri, TINY.model_name, models_dir=tmp_path / "models")
        gated = watch.handle_study(study, pacs, staging, work, CONFIG.ingest, KEY, champion)
        again = watch.handle_study(study, pacs, staging, work, CONFIG.ingest, KEY, champion)
    assert (gated.status, gated.results_stored, gated.accepted_series) == ("ingested", 0, 1)
    assert gated.reason.startswith("answered by predict --pacs (batch ") and "not scored again" in gated.reason
    assert list(WorkLayout(WorkLayout(work).pacs.study(gated.token)).ingest.deid.rglob("*.dcm"))
    assert again.status == "duplicate"
    (report,) = _reports(orthanc, study)  # still the one report
    table = pd.read_csv(result["results"], keep_default_na=False, float_precision="round_trip")
    from dicomops.deid.keys import KeyedMapper

    table = table[table.series == KeyedMapper(KEY).uid(str(pydicom.dcmread(files[0]).SeriesInstanceUID))]
    assert len(table) == 1

    champion = load_champion(env.uri, TINY.model_name, models_dir=tmp_path / "models")
    cache = VolumeCache.from_env()
    assert cache is not None
    with PacsClient(orthanc.dicomweb_url, orthanc.credentials) as pacs:
        # Warm, although the PACS now holds the SR as well: the digest covers the images only.
        warm = answer_pacs_study(study, pacs, staging, tmp_path / "scratch", CONFIG.ingest, KEY, champion, cache)
        assert warm.warm and warm.status == "scored"
        assert not {"retrieve_s", "gate_s", "preprocess_s"} & set(warm.timings)
        assert [(s, sc) for s, sc, _ in _scores(warm)] == list(zip(table.series, table.score, strict=True))
        # A gate configured otherwise is never answered from the first gate's manifest (this one
        # refuses the study); where the gate runs is not what it decides (still warm).
        strict = CONFIG.ingest.model_copy(update={"geometry": CONFIG.ingest.geometry.model_copy(
            update={"min_slices": 10_000})})
        refused = answer_pacs_study(study, pacs, staging, tmp_path / "scratch", strict, KEY, champion, cache)
        assert (refused.status, refused.warm) == ("refused", False), refused
        elsewhere = CONFIG.ingest.model_copy(update={"workers": 1})
        assert answer_pacs_study(study, pacs, staging, tmp_path / "scratch", elsewhere, KEY, champion, cache).warm

        # A corrupt entry: refused by its checksum, deleted, recomputed; the same answer.
        keys = [k for k in cache.client.scan_iter("dicomops:volume:*")]
        assert keys
        for k in keys:
            cache.client.set(k, b"DOV1" + b"\x00\x00\x00\x02{}" + b"garbage")
        corrupt = answer_pacs_study(study, pacs, staging, tmp_path / "scratch", CONFIG.ingest, KEY, champion, cache)
        assert not corrupt.warm and _scores(corrupt) == _scores(warm)
        assert cache.stats.corrupt >= 1 and "preprocess_s" in corrupt.timings

        # Nothing identifying in Redis: keys are hashes, values pixels and pseudonyms.
        needles = _needles([*files, *other])
        for k in cache.client.scan_iter("dicomops:*"):
            text = k.decode() + cache.client.get(k).decode("latin-1")
            assert not [n for n in needles if len(n) >= 4 and n in text], k

        # Redis gone mid-run: answered all the same, the outage counted.
        redis.stop()
        gone = answer_pacs_study(study, pacs, staging, tmp_path / "scratch", CONFIG.ingest, KEY, champion, cache)
        assert _scores(gone) == _scores(warm) and not gone.warm
        assert cache.stats.errors >= 1
    assert list(staging.glob("*")) == []  # staging (PHI) emptied after every study
    assert not (tmp_path / "scratch").exists() or list((tmp_path / "scratch").glob("*")) == []
    for place in (work, env.artifacts):
        assert scan_for_phi(place, needles) == [], place


def test_a_study_the_gate_refuses_gets_nothing_written_back(env: ExportedChampion, orthanc: OrthancProcess,  # noqa: F811
                                                            redis: redis_server.RedisServer, tmp_path: Path) -> None:
    ids = {"StudyInstanceUID": pydicom.uid.generate_uid(), "SeriesInstanceUID": pydicom.uid.generate_uid(),
           "PatientID": "REFUSED-0042", "PatientName": "REFUSED^PAT", "Modality": "MR"}
    files = []
    for i in range(4):  # MR slices: stored by the PACS, refused by the CT gate
        path = tmp_path / f"mr{i}.dcm"
        ct_slice(z=float(i), rows=64, cols=64, **ids).save_as(path, enforce_file_format=True)
        files.append(path)
    study = _send(orthanc, files)
    _wait_stable(orthanc, {study})
    result = predict(pacs_query=SecretStr(f"StudyInstanceUID={study}"), work=tmp_path / "work", config=CONFIG)
    assert (result["studies_scored"], result["studies_refused"], result["results_stored"]) == (0, 1, 0)
    table = pd.read_csv(result["results"], keep_default_na=False)
    assert table.status.tolist() == ["refused"] and table.reason[0]
    assert study not in table.reason[0]
    assert _reports(orthanc, study) == []
    # The query named the study; Prefect keeps the flow run's parameters: masked there.
    assert scan_for_phi(_prefect_database(), {study, "REFUSED-0042"}) == []
    assert scan_for_phi(_prefect_database(), ["dicomops-predict"])  # the run is in it
    assert pydicom.dcmread(files[0]).StudyInstanceUID == study
