"""Batch inference: a folder, or the studies a PACS query finds, scored by one model version; a
de-identified result table in the work directory and one MLflow run in ``dicomops-inference``.

The run holds counts, latency percentiles, the engine and why, the model version and the cache's
figures; its only artifact is the result table, which names studies by token and series by
pseudonym. Nothing a patient could be found by reaches MLflow: not the folder's path, not the query.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dicomops import io
from dicomops.config import IngestConfig
from dicomops.errors import GateFailedError, local_outage
from dicomops.layout import WorkLayout
from dicomops.serving.cache import VolumeCache
from dicomops.serving.champion import Champion
from dicomops.serving.predict import (
    Answer,
    SeriesFailure,
    Timer,
    answer_pacs_study,
    failure_code,
    result_table,
    score_gated,
    scored_answer,
)

log = logging.getLogger(__name__)

EXPERIMENT = "dicomops-inference"
REFUSED_BATCH = "(batch)"  # the answer's name when the gate refused the whole folder
UNREAD_FILES = "(quarantined files)"  # the answer's name for quarantined files whose study could not be read
STUDY_UID = "StudyInstanceUID"
DEFLATED = b"1.2.840.10008.1.2.1.99"  # Deflated Explicit VR Little Endian, as it stands in a file's meta
Progress = Callable[[int, int], None] | None


def new_batch_id() -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + f"-{time.time_ns() % 1_000_000:06d}"


@dataclass(frozen=True)
class StudyGate:
    """One study's share of a folder's gate, judged as pacs-watch judges a study it retrieved."""

    study: str  # the gate's pseudonym of its StudyInstanceUID (KeyedMapper.uid), as accepted.parquet names it
    files: int
    quarantined: int
    reasons: dict[str, int]  # the gate's reason codes of its quarantined files
    accepted_series: int
    refusal: str  # why the study is refused; empty when its accepted series are to be scored


def _top(reasons: Mapping[str, int], n: int = 3) -> str:
    return ", ".join(f"{k} ({v})" for k, v in sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0]))[:n])


def study_of_file(path: str, source_path: str, key: bytes) -> str:
    """Worker: the gate's pseudonym of a file's StudyInstanceUID (:meth:`KeyedMapper.uid` of the
    value as the header index reads it), or "" when its header does not say. For files the gate
    quarantined while reading their header (a truncated file, a PET image): the index has no row
    for them. Only the header is read: by the gate's narrow reader, else by pydicom up to the
    pixels, never a deflated file (inflating one is what the gate bounds)."""
    import pydicom
    from pydicom.dataelem import RawDataElement

    from dicomops.deid.keys import KeyedMapper
    from dicomops.dicom.fastheader import decode_value, read_fast

    try:
        fast = read_fast(path, (STUDY_UID,), os.path.getsize(path))
        if fast is not None:
            values = fast.raw(STUDY_UID)
        else:
            with open(path, "rb") as fh:
                if DEFLATED in fh.read(2048):
                    return ""
            elem = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=[STUDY_UID], force=True,
                                   defer_size=1024).get_item(STUDY_UID)
            if isinstance(elem, RawDataElement):
                values = decode_value("UI", bytes(elem.value or b""), bool(elem.is_little_endian))
            else:
                values = [str(elem.value)] if elem is not None and elem.value else None
    except Exception as err:  # the gate has said what is wrong with the file; here only its study is wanted
        if local_outage(err):
            raise
        return ""
    return KeyedMapper(key).uid("\\".join(str(v) for v in values)) if values else ""


def gate_by_study(src: Path, gate_work: Path, cfg: IngestConfig, key: bytes) -> tuple[list[StudyGate], dict[str, int]]:
    """Each study of a folder the gate has run over (with 1.0 as its share), judged on its own files
    as pacs-watch judges a study it retrieved: a study whose quarantined share is above
    ``cfg.max_invalid_fraction``, or with no accepted series, is refused with its reasons. Returns
    the studies (sorted by pseudonym) and the reasons of the quarantined files whose study could not
    be read (no header at all, not DICOM)."""
    import pandas as pd

    from dicomops.dicom.parallel import map_isolated
    from dicomops.dicom.reader import source_file

    paths = WorkLayout(gate_work).ingest
    index = pd.read_parquet(paths.index)
    study_of: dict[str, str] = {rel: study for rel, study in zip(index.source_path, index.StudyInstanceUID,
                                                                 strict=True) if study} \
        if "StudyInstanceUID" in index else {}  # an index without a readable file has no such column
    quarantine = io.read_table(paths.quarantine)
    unread = sorted(set(quarantine.source_path) - set(study_of))
    found = map_isolated(study_of_file, [(source_file(src, rel), rel) for rel in unread], args=(key,),
                         on_failure=lambda item, why: "", workers=cfg.workers, chunk_size=128,
                         seconds_per_item=cfg.seconds_per_file, dask_address=cfg.dask_address)
    study_of |= {rel: study for rel, study in zip(unread, found, strict=True) if study}
    files = Counter(study_of.values())
    reasons: defaultdict[str, Counter[str]] = defaultdict(Counter)
    for rel, reason in zip(quarantine.source_path, quarantine.reason, strict=True):
        reasons[study_of.get(rel, "")][str(reason)] += 1
    accepted = pd.read_parquet(paths.accepted) if paths.accepted.exists() else pd.DataFrame()  # none: the gate refused
    series = accepted.groupby("StudyInstanceUID").SeriesInstanceUID.nunique().to_dict() if len(accepted) else {}
    studies = []
    for study in sorted(files):
        own = dict(reasons.get(study, {}))
        quarantined, n = sum(own.values()), files[study]
        refusal = ""
        if quarantined / n > cfg.max_invalid_fraction:
            refusal = (f"{quarantined} of the study's {n} files quarantined ({quarantined / n:.1%}), above the allowed "
                       f"{cfg.max_invalid_fraction:.1%}. Top reasons: {_top(own)}; fix the study at its source, or "
                       "raise ingest.max_invalid_fraction if it is acceptable")
        elif not series.get(study):
            refusal = f"no series passed the ingest gate. Top reasons: {_top(own)}"
        studies.append(StudyGate(study, n, quarantined, own, int(series.get(study, 0)), refusal))
    return studies, dict(reasons.get("", {}))


def predict_folder(src: Path, work: Path, cfg: IngestConfig, key: bytes, champion: Champion,
                   cache: VolumeCache | None = None, progress: Progress = None,
                   answers: list[Answer] | None = None) -> list[Answer]:
    """Every study of a DICOM folder, each judged on its own as pacs-watch judges a study: the
    folder goes through the gate's checks once, then each study's share of quarantined files is
    held against ``cfg.max_invalid_fraction`` (:func:`gate_by_study`). A study over it is refused
    with its reasons; the others' accepted series are scored, series by series: one that cannot be
    scored is a ``failed`` series of its study (its reason code), the others keep their scores.
    Quarantined files whose study could not be read are one ``(quarantined files)`` answer; a folder
    with no file to ingest, or none naming its study, is refused whole (``(batch)``).

    The answers name studies by their pseudonymised StudyInstanceUID. `answers`: the list to append
    each study's answer to as it comes (returned), so that a caller still holds the answers given
    before an outage (:func:`dicomops.errors.local_outage`) stopped the batch. The gate's work
    directory is removed afterwards."""
    from dicomops import ingest

    gate_work = Path(work) / "gate"
    shutil.rmtree(gate_work, ignore_errors=True)
    answers = [] if answers is None else answers
    try:
        timer = Timer()
        with timer("gate_s"):
            try:  # the share is judged per study below: over the folder, only a folder with no file stops the gate
                ingest.run(Path(src), gate_work, cfg.model_copy(update={"max_invalid_fraction": 1.0}), key)
            except GateFailedError as err:  # nothing to ingest
                answers.append(Answer(REFUSED_BATCH, "refused", reason=err.brief, timings=timer.timings))
                return answers
            studies, unread = gate_by_study(Path(src), gate_work, cfg, key)  # every file quarantined: each study refused
        if not studies:
            files = int(io.read_json(WorkLayout(gate_work).ingest.files)["files"])
            quarantined = sum(unread.values())
            answers.append(Answer(REFUSED_BATCH, "refused", quarantined_files=quarantined, timings=timer.timings,
                                  reason=f"{quarantined} of {files} files quarantined and none names its study: "
                                         f"nothing to score. Top reasons: {_top(unread)}; fix the source"))
            return answers
        gate_s = timer.timings["gate_s"]
        for i, study in enumerate(studies, 1):
            t = Timer()
            t0 = time.perf_counter()
            answer = _score_study(study, champion, gate_work, cache, t)
            answer.timings["total_s"] = time.perf_counter() - t0 + gate_s / len(studies)
            answers.append(answer)
            if progress is not None:
                progress(i, len(studies))
        if unread:
            quarantined = sum(unread.values())
            answers.append(Answer(UNREAD_FILES, "refused", quarantined_files=quarantined,
                                  reason=f"{quarantined} files quarantined by the gate whose study could not be read "
                                         f"({', '.join(f'{k}: {v}' for k, v in sorted(unread.items()))})"))
        return answers
    finally:
        shutil.rmtree(gate_work, ignore_errors=True)


def _score_study(study: StudyGate, champion: Champion, gate_work: Path, cache: VolumeCache | None,
                 timer: Timer) -> Answer:
    """A study's answer: refused as the gate judged it, else each accepted series scored; failed
    when none of its series could be. Only an outage of this machine raises."""
    if study.refusal:
        return Answer(study.study, "refused", quarantined_files=study.quarantined, reason=study.refusal,
                      timings=timer.timings)
    failures: list[SeriesFailure] = []
    try:
        findings, _ = score_gated(champion, gate_work, cache, timer, study=study.study, failures=failures)
    except Exception as err:
        if local_outage(err):  # the machine's, not the study's: stops the batch
            raise
        return Answer(study.study, "failed", accepted_series=study.accepted_series,
                      quarantined_files=study.quarantined, timings=timer.timings,
                      reason=f"{failure_code(err)} during scoring (the message is withheld: it may quote identifiers)")
    return scored_answer(study.study, findings, failures, study.accepted_series, study.quarantined, timer)


def predict_pacs(query: Mapping[str, str], pacs: Any, staging: Path, work: Path, cfg: IngestConfig, key: bytes,
                 champion: Champion, cache: VolumeCache | None = None, write_back: bool = True,
                 progress: Progress = None, prefetch: Any = None,
                 answered: Callable[[Answer], Any] | None = None,
                 answers: list[Answer] | None = None) -> list[Answer]:
    """Every study the QIDO-RS `query` finds (DICOM keywords: ``StudyDate="20261130"``,
    ``ModalitiesInStudy="CT"``), scored and, with `write_back`, answered with SR in the PACS. The
    UIDs the search returns live in this function's memory only.

    With `prefetch` (a second PACS client: a session per thread), the next study is retrieved while
    this one is gated, preprocessed and scored, so the PACS transfer and the CPU work overlap; not
    when studies may come warm from the cache (a retrieval would be wasted). `answered(answer)`: as
    :func:`~dicomops.serving.predict.answer_pacs_study` takes it, for each study written back.
    `answers`: the list to append each study's answer to as it comes (returned), so that a caller
    still holds the answers given before an outage stopped the batch.

    A study the PACS cannot serve while it answers for the others (a file lost from its storage: an
    HTTP 500 for that study alone) is failed with the PACS's error and the batch goes on; a PACS that
    does not answer at all (or refuses the credentials) stops it."""
    from concurrent.futures import ThreadPoolExecutor

    from dicomops.pacs.client import PacsAuthError, PacsError, PacsRequestRefused
    from dicomops.pacs.staging import StudyBusyError
    from dicomops.pacs.watch import study_token

    def answer_or_refuse(uid: str, *args: Any, **kwargs: Any) -> Answer:
        """The study's answer; one the PACS holds under a UID no request can name is refused, with
        what to do; one another handler holds past the wait, or one the PACS cannot serve while it
        still answers a search for it, is failed; the batch goes on."""
        try:
            return answer_pacs_study(uid, *args, **kwargs)
        except PacsRequestRefused as err:
            return Answer(study_token(key, uid), "refused", reason=str(err))
        except StudyBusyError as err:
            return Answer(study_token(key, uid), "failed", reason=str(err))
        except PacsAuthError:
            raise
        except PacsError as err:
            pacs.search_studies(StudyInstanceUID=uid)  # the PACS still answers (else this raises: an outage)
            return Answer(study_token(key, uid), "failed",
                          reason=f"the PACS answers, but not for this study: {err}; repair the study in the PACS "
                                 "and run the batch again")

    from dicomops.serving.predict import retrieve_ahead

    found = pacs.search_studies(**dict(query))
    uids = [str(ds.StudyInstanceUID) for ds in found if "StudyInstanceUID" in ds]
    scratch = Path(work) / "studies"
    answers = [] if answers is None else answers
    if prefetch is None or (cache is not None and not write_back):
        for i, uid in enumerate(uids, 1):
            answers.append(answer_or_refuse(uid, pacs, staging, scratch, cfg, key, champion, cache, write_back,
                                            answered=answered))
            if progress is not None:
                progress(i, len(uids))
        return answers

    with ThreadPoolExecutor(1, thread_name_prefix="retrieve") as pool:

        def ahead_of(i: int) -> Any:
            return pool.submit(retrieve_ahead, prefetch, uids[i], staging, study_token(key, uids[i])) \
                if i < len(uids) else None

        current, ahead = None, ahead_of(0)
        try:
            for i, uid in enumerate(uids):
                current, ahead = ahead, ahead_of(i + 1)
                answers.append(answer_or_refuse(uid, pacs, staging, scratch, cfg, key, champion, cache, write_back,
                                                 prefetched=current, answered=answered))
                if progress is not None:
                    progress(i + 1, len(uids))
        finally:  # a study retrieved and never answered (an outage mid-batch) is let go, its folder removed
            for fetched in (current, ahead):
                if fetched is not None and fetched.exception() is None:
                    fetched.result().release()  # a second release does nothing
    return answers


def percentiles(values: Sequence[float]) -> dict[str, float]:
    if not values:
        return {}
    arr = np.asarray(values, dtype=float)
    return {"latency_p50_s": float(np.percentile(arr, 50)), "latency_p95_s": float(np.percentile(arr, 95)),
            "latency_max_s": float(arr.max())}


def summarise(answers: Sequence[Answer]) -> dict[str, float]:
    """Counts and latencies of a batch; no identifier."""
    scored = [a for a in answers if a.status == "scored"]
    findings = [f for a in scored for f in a.findings]
    out: dict[str, float] = {
        "studies": float(sum(not a.study.startswith("(") for a in answers)),
        "studies_scored": float(len(scored)),
        "studies_refused": float(sum(a.status == "refused" and not a.study.startswith("(") for a in answers)),
        "studies_failed": float(sum(a.status == "failed" for a in answers)),
        "series_scored": float(len(findings)),
        "series_positive": float(sum(f.present for f in findings)),
        "series_failed": float(sum(len(a.failed_series) for a in answers)),
        "results_stored": float(sum(a.results_stored for a in answers)),
        "studies_partly_answered": float(sum(a.status == "scored" and bool(a.reason) for a in answers)),
        "studies_warm": float(sum(a.warm for a in answers)),
        "quarantined_files": float(sum(a.quarantined_files for a in answers)),
        "batch_refused": float(any(a.study == REFUSED_BATCH and a.status == "refused" for a in answers)),
    }
    out |= percentiles([a.timings["total_s"] for a in scored if "total_s" in a.timings])
    for step in ("retrieve_s", "gate_s", "preprocess_s", "score_s", "write_s"):
        values = [a.timings[step] for a in scored if step in a.timings]
        if values:
            out[f"{step.removesuffix('_s')}_p50_s"] = float(np.median(values))
    return out


def record(work: Path, batch_id: str, answers: Sequence[Answer], champion: Champion,
           cache: VolumeCache | None) -> tuple[Path, dict[str, float]]:
    """``WORK/predict/<batch>/results.csv``, ``summary.json`` and the masks the segmenter served
    (``segments/``); return the folder and the metrics."""
    folder = WorkLayout(work).predictions(batch_id)
    folder.mkdir(parents=True, exist_ok=True)
    for served in (s for a in answers for s in a.localised if s.mask is not None):  # before the table naming them
        served.mask.save(folder / WorkLayout.served_mask(served.series))
    io.write_csv(folder / "results.csv", result_table(answers, champion))
    metrics = summarise(answers) | (cache.metrics() if cache is not None else {})
    io.write_json(folder / "summary.json", {"batch": batch_id, **champion.describe(), "metrics": metrics,
                                            "cache": "redis" if cache is not None else "off"})
    return folder, metrics


def log_batch(tracking_uri: str, artifact_root: Path | None, batch_id: str, folder: Path, metrics: dict[str, float],
              champion: Champion, source: str, cache: VolumeCache | None, stopped: str = "") -> str:
    """One run in ``dicomops-inference``; `source` says which kind (folder, pacs, pacs-watch), never
    where; `stopped`: the error type an outage stopped the batch with (the run then ends FAILED,
    with the studies answered before it)."""
    from dicomops.tracking import runs

    params = {**champion.describe(), "source": source, "cache": "redis" if cache is not None else "off",
              "batch": batch_id}
    run_id = runs.start_run(tracking_uri, EXPERIMENT, artifact_root, run_name="predict",
                            tags={"dicomops.model": champion.name, "dicomops.model_version": champion.version,
                                  "dicomops.engine": champion.engine.choice.kind,
                                  **({"dicomops.batch.stopped": stopped} if stopped else {})}, params=params)
    client = runs.configure_mlflow(tracking_uri)
    runs.log_metrics(tracking_uri, run_id, metrics)
    client.log_artifact(run_id, str(folder / "results.csv"))
    client.log_artifact(run_id, str(folder / "summary.json"))
    runs.end_run(tracking_uri, run_id, "FAILED" if stopped else "FINISHED")
    return run_id


def parse_query(text: str) -> dict[str, str]:
    """``"StudyDate=20261130,ModalitiesInStudy=CT"`` → QIDO-RS filters; ``"all"`` → no filter."""
    if text.strip().lower() == "all":
        return {}
    filters = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition("=")
        if not sep or not name.strip().isidentifier():
            raise ValueError(f"'{part}' is not KEYWORD=VALUE; write the query as DICOM keywords, e.g. "
                             f"StudyDate=20261130,ModalitiesInStudy=CT (or 'all')")
        filters[name.strip()] = value.strip()
    return filters


def run_batch(*, src: Path | None, query: Mapping[str, str] | None, work: Path, ingest_cfg: IngestConfig,
              serve_cfg: Any, model_name: str, version: str | None, key: bytes, tracking_uri: str,
              artifact_root: Path | None, staging: Path, orthanc_url: str | None = None, http_budget_s: float = 120.0,
              progress: Progress = None, segmenter_name: str | None = None) -> dict[str, Any]:
    """Load the version (with the champion of `segmenter_name` for what is written back to a PACS),
    score the folder or the PACS query, record the results, log the run. An outage that stops the
    batch part-way (a PACS that stops answering, a full disk) is raised after the studies answered
    before it are recorded, in a run that ends FAILED with the error's type in its tags."""

    from dicomops.serving.champion import load_champion
    from dicomops.tracking.registry import sync_reviews

    if (src is None) == (query is None):
        raise ValueError("give a folder or a PACS query, not both and not neither")
    for change in sync_reviews(tracking_uri, model_name):  # a decision made on the MLflow page counts
        log.info("registry: %s", change)
    champion = load_champion(tracking_uri, model_name, alias=serve_cfg.alias, version=version,
                             engine=serve_cfg.engine, models_dir=WorkLayout(work).serving, threads=serve_cfg.threads)
    if query is not None and serve_cfg.write_back:
        from dicomops.serving.segmenter import with_segmenter

        champion = with_segmenter(champion, tracking_uri, segmenter_name, WorkLayout(work).serving, serve_cfg.threads,
                                  serve_cfg.write_seg)
    cache = VolumeCache.from_env(ttl_s=serve_cfg.cache_ttl_s)
    batch_id = new_batch_id()
    scratch = WorkLayout(work).predictions(batch_id) / "scratch"
    answers: list[Answer] = []
    source = "folder" if src is not None else "pacs"
    try:
        try:
            if src is not None:
                predict_folder(src, scratch, ingest_cfg, key, champion, cache, progress, answers=answers)
            else:
                from dicomops.pacs.client import PacsClient
                from dicomops.pacs.watch import record_answered

                # Two clients: a requests session per thread (the second retrieves ahead).
                with PacsClient.from_env(http_budget_s, url=orthanc_url) as pacs, \
                        PacsClient.from_env(http_budget_s, url=orthanc_url) as prefetch:
                    predict_pacs(  # pacs-watch leaves a study answered here once it is stable
                        query or {}, pacs, staging, scratch, ingest_cfg, key, champion, cache, serve_cfg.write_back,
                        progress, prefetch, answers=answers,
                        answered=lambda a: record_answered(work, a, f"predict --pacs (batch {batch_id})"))
        except Exception as err:  # an outage (a PACS, a full disk): what was answered before it is recorded, then it stops
            if answers:
                try:
                    folder, metrics = record(work, batch_id, answers, champion, cache)
                    log_batch(tracking_uri, artifact_root, batch_id, folder, metrics, champion, source, cache,
                              stopped=type(err).__name__)
                except Exception as also:  # a disk still full: the outage is what is raised, this is said
                    log.error("the %d studies answered before %s could not be recorded either (%s)", len(answers),
                              type(err).__name__, type(also).__name__)
            raise
        folder, metrics = record(work, batch_id, answers, champion, cache)
        run_id = log_batch(tracking_uri, artifact_root, batch_id, folder, metrics, champion, source, cache)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        if cache is not None:
            cache.close()
    refused = next((a.reason for a in answers if a.study == REFUSED_BATCH and a.status == "refused"), "")
    return {"batch": batch_id, "results": str(folder / "results.csv"), "mlflow_run_id": run_id,
            **champion.describe(), **metrics, **({"refused": refused} if refused else {})}
