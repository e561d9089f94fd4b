"""Orthanc with its index in PostgreSQL (the Debian plugin ``orthanc-postgresql``), as the Compose
stack runs it: a study stored over STOW-RS is indexed in the database, not in a SQLite file beside
the DICOM files; the changes feed reports it stable; a restarted Orthanc finds it there and serves
it whole."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import psycopg
import pydicom
import pytest

from dicomops.pacs.changes import ChangesFeed
from dicomops.pacs.client import PacsClient
from dicomops.pacs.orthanc import DB, INDEX_PLUGIN, OrthancIndex, start_orthanc

from .conftest import PG_PASSWORD, Postgres, _pg_bin, free_port
from .orthanc_fixture import (
    STABLE_AGE_S,
    pacs_credentials,
    pacs_start,
    require_orthanc,
    stop_by_sigterm,
    synthetic_study,
)

pytestmark = pytest.mark.integration


def test_orthanc_keeps_its_index_in_postgresql_and_a_restart_finds_the_study_there(
        postgres: Postgres, tmp_path: Path) -> None:
    require_orthanc()
    if not INDEX_PLUGIN.is_file():
        pytest.skip("the PostgreSQL index plugin is not installed (make integration installs the Debian package "
                    "orthanc-postgresql)")
    subprocess.run([_pg_bin("createdb"), "-h", "127.0.0.1", "-p", str(postgres.port), "-U", "dicomops", "orthanc"],
                   check=True, env={**os.environ, "PGPASSWORD": PG_PASSWORD}, capture_output=True)
    index = OrthancIndex("127.0.0.1", postgres.port, "orthanc", "dicomops", PG_PASSWORD)
    assert PG_PASSWORD not in repr(index)
    credentials, storage = pacs_credentials(), tmp_path / "pacs"
    sent = [pydicom.dcmread(f) for f in synthetic_study(tmp_path / "send", slices=3)]
    study_uid = str(sent[0].StudyInstanceUID)

    with start_orthanc(storage, free_port(), credentials, stable_age_s=STABLE_AGE_S, index=index) as pacs, \
            PacsClient(pacs.dicomweb_url, credentials) as client, ChangesFeed(pacs.url, credentials) as feed:
        assert len(client.store(sent)) == 3
        deadline = time.monotonic() + 20
        while study_uid not in [s.study_uid for s in feed.stable_studies(0)]:
            assert time.monotonic() < deadline, "no StableStudy change from the PostgreSQL index within 20 s"
            time.sleep(0.3)
    assert (storage / DB).is_dir() and not (storage / DB / "index").exists()  # no SQLite index beside the files
    with psycopg.connect(postgres.url("orthanc")) as con:
        tables = {r[0] for r in con.execute("select tablename from pg_tables where schemaname = 'public'")}
        assert {"resources", "changes"} <= tables
        assert con.execute("select count(*) from resources where resourcetype = 3").fetchone() == (3,)  # instances

    with start_orthanc(storage, free_port(), credentials, stable_age_s=STABLE_AGE_S, index=index) as again, \
            PacsClient(again.dicomweb_url, credentials) as client:
        assert [str(s.StudyInstanceUID) for s in client.search_studies(StudyInstanceUID=study_uid)] == [study_uid]
        back = client.retrieve_study(study_uid, tmp_path / "staging" / "study")
    assert sorted(str(pydicom.dcmread(p).SOPInstanceUID) for p in back) == sorted(str(ds.SOPInstanceUID) for ds in sent)
    assert PG_PASSWORD not in again.log.read_text(errors="replace")



def test_pacs_start_with_an_index_url_serves_from_postgresql_and_never_prints_its_password(
        postgres: Postgres, tmp_path: Path) -> None:
    from dicomops.pacs.client import PASSWORD_ENV, USER_ENV
    from dicomops.pacs.orthanc import INDEX_PASSWORD_ENV

    require_orthanc()
    if not INDEX_PLUGIN.is_file():
        pytest.skip("the PostgreSQL index plugin is not installed (make integration installs orthanc-postgresql)")
    subprocess.run([_pg_bin("createdb"), "-h", "127.0.0.1", "-p", str(postgres.port), "-U", "dicomops",
                    "orthanc_cli"], check=True, env={**os.environ, "PGPASSWORD": PG_PASSWORD}, capture_output=True)
    credentials, port = pacs_credentials(), free_port()
    env = {**os.environ, USER_ENV: credentials.user, PASSWORD_ENV: credentials.password, "COLUMNS": "200",
           INDEX_PASSWORD_ENV: PG_PASSWORD}
    with pacs_start(["--storage", str(tmp_path / "pacs"), "--index-url",
                     f"postgresql://dicomops@127.0.0.1:{postgres.port}/orthanc_cli"], env, port, credentials) as proc:
        with psycopg.connect(postgres.url("orthanc_cli")) as con:  # Orthanc made its tables there
            assert con.execute("select count(*) from pg_tables where tablename = 'resources'").fetchone() == (1,)
        output = stop_by_sigterm(proc)
    assert proc.returncode == 0, output
    text = " ".join(output.split())
    assert f"index in PostgreSQL: database orthanc_cli on 127.0.0.1:{postgres.port} as dicomops" in text
    assert PG_PASSWORD not in output and credentials.password not in output
    assert not (tmp_path / "pacs" / DB / "index").exists()


def test_an_orthanc_killed_mid_way_releases_its_postgresql_index_and_the_next_one_takes_it_whole(
        postgres: Postgres, tmp_path: Path) -> None:
    """Orthanc locks its database against a second Orthanc; a crash (SIGKILL, as an OOM kill) ends its
    session and so the lock: the next Orthanc starts on the same index, finds what the first stored,
    and stores again."""
    require_orthanc()
    if not INDEX_PLUGIN.is_file():
        pytest.skip("the PostgreSQL index plugin is not installed (make integration installs orthanc-postgresql)")
    subprocess.run([_pg_bin("createdb"), "-h", "127.0.0.1", "-p", str(postgres.port), "-U", "dicomops",
                    "orthanc_crash"], check=True, env={**os.environ, "PGPASSWORD": PG_PASSWORD}, capture_output=True)
    index = OrthancIndex("127.0.0.1", postgres.port, "orthanc_crash", "dicomops", PG_PASSWORD)
    credentials, storage = pacs_credentials(), tmp_path / "pacs"
    first = [pydicom.dcmread(f) for f in synthetic_study(tmp_path / "a", slices=3, index=5)]
    second = [pydicom.dcmread(f) for f in synthetic_study(tmp_path / "b", slices=3, index=6)]
    with start_orthanc(storage, free_port(), credentials, index=index) as pacs, \
            PacsClient(pacs.dicomweb_url, credentials) as client:
        assert len(client.store(first)) == 3
        pacs.kill()
    with start_orthanc(storage, free_port(), credentials, index=index, startup_timeout_s=60) as again, \
            PacsClient(again.dicomweb_url, credentials) as client:
        assert len(client.store(second)) == 3
        held = {str(s.StudyInstanceUID) for s in client.search_studies()}
    assert held == {str(first[0].StudyInstanceUID), str(second[0].StudyInstanceUID)}
