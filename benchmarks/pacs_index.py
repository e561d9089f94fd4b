"""Orthanc with its index in PostgreSQL against its default SQLite index, in one run.

Reproduce: ``.venv/bin/python benchmarks/pacs_index.py`` (``--studies 30 --slices 40``; ``--quick`` for
8 studies of 20 slices). Needs Debian's ``orthanc``, ``orthanc-dicomweb``, ``orthanc-postgresql`` and
``postgresql``; a throwaway PostgreSQL cluster and both Orthancs live in a temporary folder, removed at
the end, and are stopped even on Ctrl-C.

The same synthetic CT studies go to each Orthanc in turn (a fresh one per index, StableAge 1 s,
DICOMweb on loopback), one STOW-RS request per study. Timed per index: the uploads; the changes feed
until every study is reported stable, counted from the last upload (StableAge is the floor); a
QIDO-RS study search by StudyInstanceUID per study; a WADO-RS retrieval of each study, whole, into
staging (``PacsClient.retrieve_study``: the path pacs-watch takes). Printed: medians, totals and
the ratio PostgreSQL / SQLite (above 1: slower than SQLite). PostgreSQL runs on the same machine,
so the figures say what the index costs, not what a separate database server adds on a network.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom

from dicomops.pacs.changes import ChangesFeed
from dicomops.pacs.client import PacsClient, PacsCredentials
from dicomops.pacs.orthanc import INDEX_PLUGIN, OrthancIndex, start_orthanc
from dicomops.synthetic.corpus import SeriesPlan, write_series

VENDORS = ("siemens", "ge", "philips", "canon")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pg_bin(name: str) -> str:
    found = shutil.which(name) or next(iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))[-1:]), None)
    if found is None:
        raise SystemExit(f"{name} not found: apt-get install postgresql")
    return found


def as_postgres(cmd: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


@contextlib.contextmanager
def postgres_cluster(root: Path, password: str) -> Iterator[int]:
    """A throwaway PostgreSQL on loopback, user dicomops, database orthanc; yields its port."""
    root.mkdir(parents=True)
    pwfile = root / "pw"
    pwfile.write_text(password)
    if os.geteuid() == 0:
        shutil.chown(root, "postgres")
        shutil.chown(pwfile, "postgres")
    port = free_port()
    subprocess.run(as_postgres([pg_bin("initdb"), "-D", str(root / "data"), "-U", "dicomops", "--pwfile", str(pwfile),
                                "-A", "scram-sha-256"]), check=True, capture_output=True)
    ctl = pg_bin("pg_ctl")
    subprocess.run(as_postgres([ctl, "-D", str(root / "data"), "-l", str(root / "log"), "-w", "-o",
                                f"-p {port} -h 127.0.0.1 -k {root}", "start"]), check=True, capture_output=True)
    try:
        subprocess.run([pg_bin("createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "dicomops", "orthanc"],
                       check=True, env={**os.environ, "PGPASSWORD": password}, capture_output=True)
        yield port
    finally:
        subprocess.run(as_postgres([ctl, "-D", str(root / "data"), "-m", "fast", "stop"]), capture_output=True)


def write_studies(out: Path, count: int, slices: int) -> list[list[pydicom.Dataset]]:
    studies = []
    for i in range(count):
        folder = out / f"study-{i:03d}"
        plan = SeriesPlan(index=9000 + i, seed=20261205 + i, scenario="baseline", vendor=VENDORS[i % len(VENDORS)],
                          label=0, nodule_count=0, fault=None, fault_detail="", matrix=128, slices=slices)
        write_series(plan, folder)
        series = folder / plan.case / "series-1"
        studies.append([pydicom.dcmread(p) for p in sorted(series.iterdir()) if p.is_file()])
    return studies


def measure(studies: list[list[pydicom.Dataset]], root: Path, credentials: PacsCredentials,
            index: OrthancIndex | None) -> dict[str, list[float]]:
    t: dict[str, list[float]] = {"store": [], "search": [], "retrieve": [], "stable": []}
    uids = {str(s[0].StudyInstanceUID) for s in studies}
    with start_orthanc(root / "pacs", free_port(), credentials, stable_age_s=1, index=index) as pacs, \
            PacsClient(pacs.dicomweb_url, credentials) as client, ChangesFeed(pacs.url, credentials) as feed:
        for study in studies:
            t0 = time.perf_counter()
            client._web.store_instances(study)  # as a modality sends: no check of what it holds
            t["store"].append(time.perf_counter() - t0)
        t0, seen = time.perf_counter(), set()
        while not uids <= seen:
            if time.perf_counter() - t0 > 120:
                raise TimeoutError(f"{len(uids - seen)} studies not stable within 120 s")
            time.sleep(0.1)
            seen |= {s.study_uid for s in feed.stable_studies(0, 1000)}
        t["stable"].append(time.perf_counter() - t0)
        for i, uid in enumerate(sorted(uids)):
            t0 = time.perf_counter()
            assert len(client.search_studies(StudyInstanceUID=uid)) == 1
            t["search"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            client.retrieve_study(uid, root / "staging" / f"{i:03d}")
            t["retrieve"].append(time.perf_counter() - t0)
    return t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=30)
    parser.add_argument("--slices", type=int, default=40)
    parser.add_argument("--quick", action="store_true", help="8 studies of 20 slices.")
    args = parser.parse_args()
    if args.quick:
        args.studies, args.slices = 8, 20
    if not INDEX_PLUGIN.is_file():
        raise SystemExit(f"no PostgreSQL index plugin at {INDEX_PLUGIN}: apt-get install orthanc-postgresql")
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    root = Path(tempfile.mkdtemp(prefix="dicomops-bench-index-"))
    os.chmod(root, 0o755)  # the postgres user enters it for its cluster
    started = time.perf_counter()
    try:
        studies = write_studies(root / "send", args.studies, args.slices)
        credentials = PacsCredentials("bench", secrets.token_urlsafe(18))
        password = secrets.token_urlsafe(18)
        with postgres_cluster(root / "pg", password) as port:
            index = OrthancIndex("127.0.0.1", port, "orthanc", "dicomops", password)
            results = {"sqlite": measure(studies, root / "sqlite", credentials, None),
                       "postgresql": measure(studies, root / "postgresql", credentials, index)}
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"\n{args.studies} studies of {args.slices} slices (128x128), one STOW-RS each; {os.cpu_count()} cores; "
          "PostgreSQL on the same machine")
    print(f"{'step':<44}{'SQLite':>10}{'PostgreSQL':>12}{'ratio':>8}")
    for label, key, agg in (("STOW-RS per study, median s", "store", np.median),
                            ("all stable after the last upload, s", "stable", np.sum),
                            ("QIDO-RS study search, median ms", "search", np.median),
                            ("WADO-RS retrieval whole, median s", "retrieve", np.median)):
        scale = 1000.0 if "ms" in label else 1.0
        a, b = scale * float(agg(results["sqlite"][key])), scale * float(agg(results["postgresql"][key]))
        print(f"{label:<44}{a:>10.3f}{b:>12.3f}{b / a:>8.2f}")
    total = {k: sum(sum(v) for v in r.values()) for k, r in results.items()}
    print(f"whole path (upload, stable, search, retrieval): PostgreSQL / SQLite {total['postgresql'] / total['sqlite']:.2f}x;"
          f" run {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
