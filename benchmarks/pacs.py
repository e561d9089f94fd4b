"""Study arrival to "staged and gated" through a real Orthanc, against a plain dcmtk C-FIND + C-MOVE, in one run.

Reproduce: ``.venv/bin/python benchmarks/pacs.py`` (``--studies 20 --backlog 100 --slices 60 --matrix 256``;
``--quick`` for 3 studies, a backlog of 10 and 20 slices). Needs Debian's ``orthanc``, ``orthanc-dicomweb``
and ``dcmtk``; everything lives in a temporary folder, removed at the end, and Orthanc and storescp are
stopped even on Ctrl-C.

Synthetic CT studies (one series each, vendors in turn, so some are stored RLE-compressed) are written
once, then sent to a fresh Orthanc with STOW-RS (StableAge ``--stable-age``, default 1 s).

- Per study, one at a time: the moment the STOW-RS upload returns is the study's *arrival*; the changes
  feed is polled every 0.1 s until Orthanc reports the study stable; then ``handle_study`` (WADO-RS
  retrieval, whole, into staging, then the ingest gate; no champion, so nothing is scored) must return
  ``ingested``. Printed: arrival → stable (StableAge's share), stable → staged and gated, and the sum.
- Baseline on the same studies, in the same run: dcmtk ``findscu`` (study-level C-FIND by AccessionNumber,
  as a RIS order would know it, for the StudyInstanceUID) + ``movescu`` (study-level C-MOVE) to a local
  ``storescp`` writing into a folder; and our WADO-RS retrieval alone (``retrieve_study``, no gate), so
  the gate's share is visible. These two alternate in order from study to study (Orthanc keeps recently
  read files in a RAM cache). dcmtk has no notion of stable: its clock starts when it is asked.
- Answering, per study: one SR stored back through ``PacsClient.store`` (STOW-RS, then QIDO-RS of the
  stored series: a PACS may answer "stored" for what a filter dropped), against dicomweb-client's
  ``store_instances`` alone, the library it wraps, in alternating order.
- Backlog: ``--backlog`` more studies are uploaded, and once all are stable, ``watch_once`` drains them
  (feed, retrieval, gate, ledger and cursor); then the same studies by retrieval alone, and by one
  ``findscu`` listing plus a ``movescu`` per study. Reported as studies/min and slices/s.

dcmtk runs with ``TCP_NODELAY=1`` in its environment (storescp, findscu, movescu, and Orthanc, whose
DICOM layer is dcmtk): Debian's build otherwise keeps Nagle's algorithm on, which with delayed ACKs on
loopback costs about 50 ms per instance, some 20x on a study; ``--dcmtk-nagle`` keeps that default.

Differences that favour dcmtk: ``retrieve_study`` fsyncs every file and checks the study is whole against
a QIDO-RS listing before renaming it into place; storescp writes without fsync and checks nothing.

Network exposure. The DICOM port is needed for dcmtk only, and Orthanc 1.10 binds it on every interface
(storescp 3.6.7 likewise cannot choose its address). This benchmark turns Orthanc's DICOM port on, on a
free port, for its own duration only, with every client addressed over loopback; and narrows it: C-ECHO
and C-STORE from anyone are off, and C-FIND / C-MOVE are allowed to one registered AE title from
127.0.0.1 alone (``DicomCheckModalityHost``). Run it on a machine whose firewall keeps other hosts off.
"""

from __future__ import annotations

import argparse
import contextlib
import json
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

from dicomops.config import IngestConfig
from dicomops.layout import WorkLayout
from dicomops.pacs.changes import ChangesFeed, Cursor
from dicomops.pacs.client import PacsClient, PacsCredentials
from dicomops.pacs.orthanc import LOOPBACK, TEMPLATE, start_orthanc
from dicomops.pacs.watch import handle_study, watch_once
from dicomops.synthetic import VENDORS, SeriesPlan, write_series

KEY = b"pacs-benchmark-key-0123456789abcdef"
ORTHANC_AET = "DICOMOPS"  # the template's DicomAet
BENCH_AET = "DICOMOPSBENCH"  # findscu / movescu call as this, and storescp answers to it
POLL_S = 0.1


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def write_studies(out: Path, count: int, first_index: int, slices: int, matrix: int) -> list[Path]:
    """`count` one-series studies, vendors in turn; returns each study's series folder."""
    vendors = list(VENDORS)
    folders = []
    for i in range(count):
        index = first_index + i
        plan = SeriesPlan(index=index, seed=29, scenario="baseline", vendor=vendors[index % len(vendors)], label=0,
                          nodule_count=0, fault=None, fault_detail="", matrix=matrix, slices=slices)
        write_series(plan, out)
        folders.append(out / plan.case / "series-1")
    return folders


def bench_template(path: Path, scp_port: int) -> Path:
    """The project's Orthanc template plus what dcmtk needs: one known AE (the benchmark's, on
    loopback) allowed C-FIND and C-MOVE, with C-MOVE sent to storescp on `scp_port`; nothing else
    may use the DICOM port."""
    config = json.loads(TEMPLATE.read_text())
    config.update({
        "DicomAlwaysAllowEcho": False,
        "DicomAlwaysAllowStore": False,
        "DicomAlwaysAllowFind": False,
        "DicomAlwaysAllowGet": False,
        "DicomAlwaysAllowMove": False,
        "DicomCheckModalityHost": True,
        "DicomModalities": {"bench": {
            "AET": BENCH_AET, "Host": LOOPBACK, "Port": scp_port,
            "AllowEcho": False, "AllowStore": False, "AllowFind": True, "AllowFindWorklist": False,
            "AllowGet": False, "AllowMove": True, "AllowStorageCommitment": False,
        }},
    })
    path.write_text(json.dumps(config, indent=2))
    return path


@contextlib.contextmanager
def run_storescp(out: Path, port: int, log: Path) -> Iterator[None]:
    """storescp accepting every transfer syntax it knows (files arrive as stored), writing into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as handle:
        proc = subprocess.Popen(["storescp", "-aet", BENCH_AET, "+xa", "-od", str(out), str(port)],
                                stdin=subprocess.DEVNULL, stdout=handle, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + 10
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"storescp exited with code {proc.returncode}:\n{log.read_text()[-2000:]}")
            with contextlib.suppress(OSError), socket.create_connection((LOOPBACK, port), timeout=1):
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"storescp did not listen on {port} within 10 s")
            time.sleep(0.05)
        yield
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def findscu(dicom_port: int, dest: Path, **keys: str) -> list[str]:
    """Study-level C-FIND with `keys` as matching keys; the StudyInstanceUIDs of the answers."""
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    command = ["findscu", "-S", "-aet", BENCH_AET, "-aec", ORTHANC_AET, "-X", "-od", str(dest),
               "-k", "QueryRetrieveLevel=STUDY", "-k", "StudyInstanceUID"]
    for keyword, value in keys.items():
        command += ["-k", f"{keyword}={value}"]
    subprocess.run([*command, LOOPBACK, str(dicom_port)], check=True, capture_output=True)
    return [str(pydicom.dcmread(f).StudyInstanceUID) for f in sorted(dest.glob("rsp*.dcm"))]


def movescu(dicom_port: int, study_uid: str) -> None:
    """Study-level C-MOVE to storescp; returns when Orthanc reports every sub-operation done."""
    subprocess.run(["movescu", "-S", "-aet", BENCH_AET, "-aec", ORTHANC_AET, "-aem", BENCH_AET,
                    "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study_uid}",
                    LOOPBACK, str(dicom_port)], check=True, capture_output=True)


def take_received(folder: Path, expected: int) -> None:
    """Check storescp wrote `expected` files, then empty its folder for the next study."""
    files = [p for p in folder.iterdir() if p.is_file()]
    if len(files) != expected:
        raise RuntimeError(f"storescp received {len(files)} files, expected {expected}")
    for p in files:
        p.unlink()


def send(pacs: PacsClient, folder: Path) -> tuple[str, str]:
    """STOW-RS the study in `folder` as a modality would (no check of what the PACS holds: the clock of
    arrival starts when the upload returns); returns its StudyInstanceUID and AccessionNumber."""
    datasets = [pydicom.dcmread(p) for p in sorted(folder.iterdir())]
    pacs._web.store_instances(datasets)
    return str(datasets[0].StudyInstanceUID), str(datasets[0].AccessionNumber)


def wait_stable(feed: ChangesFeed, since: int, uids: set[str], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    seen: set[str] = set()
    while not uids <= seen:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(uids - seen)} of {len(uids)} studies did not become stable in {timeout_s:.0f} s")
        time.sleep(POLL_S)
        seen |= {s.study_uid for s in feed.stable_studies(since, 1000)}


def interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=20, help="Studies timed one at a time (at least 20 for p95).")
    parser.add_argument("--backlog", type=int, default=100, help="Studies in the backlog drained by watch_once.")
    parser.add_argument("--slices", type=int, default=60)
    parser.add_argument("--matrix", type=int, default=256)
    parser.add_argument("--stable-age", type=int, default=1, help="Orthanc's StableAge, seconds.")
    parser.add_argument("--workers", type=int, default=IngestConfig().workers, help="Ingest gate workers.")
    parser.add_argument("--quick", action="store_true", help="3 studies, a backlog of 10, 20 slices.")
    parser.add_argument("--dcmtk-nagle", action="store_true",
                        help="Leave dcmtk's TCP_NODELAY unset (Nagle on: ~50 ms per instance on loopback).")
    args = parser.parse_args()
    if args.quick:
        args.studies, args.backlog, args.slices = 3, 10, 20
    for tool in ("Orthanc", "findscu", "movescu", "storescp"):
        if shutil.which(tool) is None:
            parser.error(f"{tool} is not on PATH: install the Debian packages orthanc, orthanc-dicomweb and dcmtk")
    # Orthanc and storescp run in sessions of their own, out of reach of the terminal's signals: a
    # SIGTERM takes the same way out as Ctrl-C, through the blocks that stop them.
    signal.signal(signal.SIGTERM, interrupt)
    if not args.dcmtk_nagle:
        os.environ["TCP_NODELAY"] = "1"  # read by dcmtk: storescp, findscu, movescu and Orthanc inherit it
    cfg = IngestConfig(workers=args.workers)
    credentials = PacsCredentials("bench", secrets.token_urlsafe(18))
    run_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="dicomops-bench-pacs-") as tmp:
        root = Path(tmp)
        start = time.perf_counter()
        total = args.studies + args.backlog
        studies = write_studies(root / "src", args.studies, 1, args.slices, args.matrix)
        backlog = write_studies(root / "src", args.backlog, args.studies + 1, args.slices, args.matrix)
        print(f"wrote {total} studies of {args.slices} slices {args.matrix}x{args.matrix} "
              f"({', '.join(VENDORS)} in turn) in {time.perf_counter() - start:.0f} s", flush=True)
        dicom_port, scp_port = free_port(), free_port()
        received = root / "storescp"
        template = bench_template(root / "orthanc-template.json", scp_port)
        with start_orthanc(root / "pacs", free_port(), credentials, stable_age_s=args.stable_age,
                           dicom_port=dicom_port, template=template) as server, \
                run_storescp(received, scp_port, root / "storescp.log"), \
                PacsClient(server.dicomweb_url, credentials) as pacs, ChangesFeed(server.url, credentials) as feed:
            print(f"Orthanc {server.url} (DICOM port {dicom_port}, StableAge {args.stable_age} s), storescp on "
                  f"{scp_port}; gate workers {args.workers}", flush=True)
            per_study = measure_per_study(pacs, feed, studies, root, cfg, dicom_port, received, args.slices)
            drain = measure_backlog(pacs, feed, backlog, root, cfg, dicom_port, received, args.slices)
    report(args, per_study, drain, time.perf_counter() - run_start)


def time_retrieval(pacs: PacsClient, uid: str, dest: Path, slices: int) -> float:
    """Seconds for WADO-RS to bring the study whole into `dest` (removed afterwards)."""
    start = time.perf_counter()
    files = pacs.retrieve_study(uid, dest)
    seconds = time.perf_counter() - start
    if len(files) != slices:
        raise RuntimeError(f"WADO-RS retrieved {len(files)} files, expected {slices}")
    shutil.rmtree(dest)
    return seconds


def time_dcmtk(dicom_port: int, uid: str, accession: str, find_dir: Path, received: Path, slices: int) -> float:
    """Seconds for findscu to find the study by its AccessionNumber and movescu to move it to storescp."""
    start = time.perf_counter()
    found = findscu(dicom_port, find_dir, AccessionNumber=accession)
    if found != [uid]:
        raise RuntimeError(f"findscu found {len(found)} studies for one AccessionNumber, expected this one")
    movescu(dicom_port, found[0])
    seconds = time.perf_counter() - start
    take_received(received, slices)
    return seconds


def time_store_back(pacs: PacsClient, folder: Path, i: int) -> tuple[float, float]:
    """Seconds to store one SR back under the study: ours (STOW-RS, then QIDO-RS of the stored series
    to see that the PACS holds it) and dicomweb-client's ``store_instances`` alone, two SRs of other
    model versions (new UIDs), in alternating order."""
    from dicomops.pacs.results import Finding, structured_report

    images = [pydicom.dcmread(p, stop_before_pixels=True) for p in sorted(folder.iterdir())]
    images.sort(key=lambda ds: float(ds.ImagePositionPatient[2]))
    report = {name: structured_report(images, Finding(True, 0.7, 0.5, "bench", f"{name}-{i}"))
              for name in ("checked", "library")}
    seconds = {}
    for name in ("checked", "library") if i % 2 else ("library", "checked"):
        start = time.perf_counter()
        if name == "checked":
            pacs.store([report[name]])
        else:
            pacs._web.store_instances([report[name]])
        seconds[name] = time.perf_counter() - start
    return seconds["checked"], seconds["library"]


def measure_per_study(pacs: PacsClient, feed: ChangesFeed, studies: list[Path], root: Path,
                      cfg: IngestConfig, dicom_port: int, received: Path, slices: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {"to_stable": [], "gated": [], "from_arrival": [], "retrieve": [], "dcmtk": [],
                                     "store_checked": [], "store_library": []}
    work, staging, scratch = root / "work", root / "staging", root / "retrieved"
    for i, folder in enumerate(studies, 1):
        since = feed.last()
        uid, accession = send(pacs, folder)
        arrival = time.perf_counter()
        wait_stable(feed, since, {uid}, timeout_s=60 + 10 * len(studies))
        stable = time.perf_counter()
        outcome = handle_study(uid, pacs, staging, work, cfg, KEY)
        done = time.perf_counter()
        if outcome.status != "ingested":
            raise RuntimeError(f"study {i}: {outcome.status} ({outcome.reason})")
        times["to_stable"].append(stable - arrival)
        times["gated"].append(done - stable)
        times["from_arrival"].append(done - arrival)

        for measure in ("retrieve", "dcmtk") if i % 2 else ("dcmtk", "retrieve"):
            if measure == "retrieve":
                times["retrieve"].append(time_retrieval(pacs, uid, scratch / str(i), slices))
            else:
                times["dcmtk"].append(time_dcmtk(dicom_port, uid, accession, root / "findscu", received, slices))
        before_store = feed.last()
        checked, library = time_store_back(pacs, folder, i)
        times["store_checked"].append(checked)
        times["store_library"].append(library)
        if i == len(studies):  # stable again once answered: before the backlog's watch starts after it
            wait_stable(feed, before_store, {uid}, timeout_s=60)
        print(f"  study {i}/{len(studies)}: stable after {times['to_stable'][-1]:.2f} s, staged and gated "
              f"{times['gated'][-1]:.2f} s later; WADO-RS alone {times['retrieve'][-1]:.2f} s, "
              f"findscu+movescu {times['dcmtk'][-1]:.2f} s", flush=True)
    return times


def measure_backlog(pacs: PacsClient, feed: ChangesFeed, backlog: list[Path], root: Path,
                    cfg: IngestConfig, dicom_port: int, received: Path, slices: int) -> dict[str, float]:
    work, staging, scratch = root / "backlog-work", root / "staging", root / "retrieved"
    since = feed.last()
    Cursor(WorkLayout(work).pacs.cursor).advance(since)  # the watch starts after the per-study phase
    start = time.perf_counter()
    sent = [send(pacs, folder) for folder in backlog]
    uids = [uid for uid, _ in sent]
    print(f"backlog: {len(sent)} studies uploaded in {time.perf_counter() - start:.0f} s; waiting until stable",
          flush=True)
    wait_stable(feed, since, set(uids), timeout_s=120 + 2 * len(uids))
    done = 0

    def on_study(outcome: object) -> None:
        nonlocal done
        done += 1
        if done % max(1, len(uids) // 10) == 0 or done == len(uids):
            print(f"  watch_once: {done}/{len(uids)} staged and gated", flush=True)

    start = time.perf_counter()
    outcomes = watch_once(feed, pacs, staging, work, cfg, KEY, on_study=on_study)
    watch_s = time.perf_counter() - start
    statuses = [o.status for o in outcomes]
    if statuses != ["ingested"] * len(uids):
        raise RuntimeError(f"watch_once: {len(statuses)} outcomes, {statuses.count('ingested')} ingested; "
                           f"expected {len(uids)} ingested")
    start = time.perf_counter()
    for i, uid in enumerate(uids):
        pacs.retrieve_study(uid, scratch / f"backlog-{i}")
        shutil.rmtree(scratch / f"backlog-{i}")
    retrieve_s = time.perf_counter() - start
    print(f"  WADO-RS retrieval alone: {len(uids)} studies in {retrieve_s:.1f} s", flush=True)
    start, pending = time.perf_counter(), set(uids)
    counted = 0.0
    for uid in findscu(dicom_port, root / "findscu"):  # every study, then keep the new ones
        if uid in pending:
            movescu(dicom_port, uid)
            mark = time.perf_counter()
            take_received(received, slices)
            counted += time.perf_counter() - mark
            pending.discard(uid)
    dcmtk_s = time.perf_counter() - start - counted
    if pending:
        raise RuntimeError(f"findscu did not list {len(pending)} of the backlog's studies")
    print(f"  findscu + movescu: {len(uids)} studies in {dcmtk_s:.1f} s", flush=True)
    return {"studies": len(uids), "watch": watch_s, "retrieve": retrieve_s, "dcmtk": dcmtk_s}


def report(args: argparse.Namespace, t: dict[str, list[float]], backlog: dict[str, float], run_s: float) -> None:
    n = len(t["gated"])
    print(f"\nper study: {n} studies, {args.slices} slices {args.matrix}x{args.matrix}, one at a time; "
          f"StableAge {args.stable_age} s, gate workers {args.workers}, {os.cpu_count()} cores; dcmtk "
          f"TCP_NODELAY={os.environ.get('TCP_NODELAY', 'unset')}")
    print(f"{'path':<62}{'p50 s':>8}{'p95 s':>8}")
    rows = (("ours: STOW-RS done -> Orthanc reports stable (StableAge)", "to_stable"),
            ("ours: stable -> staged and gated (handle_study)", "gated"),
            ("ours: STOW-RS done -> staged and gated", "from_arrival"),
            ("ours: WADO-RS retrieval alone (retrieve_study, no gate)", "retrieve"),
            ("baseline: dcmtk findscu + movescu -> storescp", "dcmtk"),
            ("ours: one SR stored back, checked (STOW-RS + QIDO-RS)", "store_checked"),
            ("baseline: dicomweb-client store_instances alone", "store_library"))
    for label, key in rows:
        print(f"{label:<62}{pct(t[key], 50):>8.2f}{pct(t[key], 95):>8.2f}")
    m, slices = backlog["studies"], backlog["studies"] * args.slices
    print(f"\nbacklog: {m} studies ({slices} slices), all stable before the clock starts")
    print(f"{'path':<62}{'s':>8}{'st/min':>8}{'slices/s':>10}")
    for label, key in (("ours: watch_once (feed + WADO-RS + gate + ledger)", "watch"),
                       ("ours: WADO-RS retrieval alone", "retrieve"),
                       ("baseline: dcmtk findscu (one listing) + movescu each", "dcmtk")):
        s = backlog[key]
        print(f"{label:<62}{s:>8.1f}{60 * m / s:>8.1f}{slices / s:>10.0f}")
    p50 = {key: pct(t[key], 50) for key in t}
    print("\nratios (ours / dcmtk; above 1 is slower than dcmtk):")
    print(f"  retrieval alone:        p50 {p50['retrieve'] / p50['dcmtk']:.2f}x, "
          f"p95 {pct(t['retrieve'], 95) / pct(t['dcmtk'], 95):.2f}x, backlog {backlog['retrieve'] / backlog['dcmtk']:.2f}x")
    print(f"  staged and gated:       p50 {p50['gated'] / p50['dcmtk']:.2f}x from stable, "
          f"{p50['from_arrival'] / p50['dcmtk']:.2f}x from arrival; backlog {backlog['watch'] / backlog['dcmtk']:.2f}x")
    print(f"  an SR stored back:      p50 {p50['store_checked'] / p50['store_library']:.2f}x dicomweb-client's "
          f"store alone (the check that the PACS holds it: a filter may drop what it answered 'stored')")
    share = 1 - p50["retrieve"] / p50["gated"]
    print(f"  the gate's share of stable -> staged and gated (p50): {share:.0%}; "
          f"backlog {1 - backlog['retrieve'] / backlog['watch']:.0%}")
    print(f"\nwhole run {run_s:.0f} s")


if __name__ == "__main__":
    main()
