"""Batch inference: a folder, or the studies a PACS query finds, scored by one model version; a
de-identified result table in the work directory and one MLflow run in ``dicomops-inference``.

The run holds counts, latency percentiles, the engine and why, the model version and the cache's
figures; its only artifact is the result table, which names studies by token and series by
pseudonym. Nothing a patient could be found by reaches MLflow: not the folder's path, not the query.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dicomops import io
from dicomops.config import IngestConfig
from dicomops.errors import GateFailedError, local_outage
from dicomops.layout import WorkLayout
from dicomops.serving.cache import VolumeCache
from dicomops.serving.champion import Champion
from dicomops.serving.predict import Answer, Timer, answer_pacs_study, result_table, score_gated

log = logging.getLogger(__name__)

EXPERIMENT = "dicomops-inference"
REFUSED_BATCH = "(batch)"  # the answer's name when the gate refused the whole folder
Progress = Callable[[int, int], None] | None


def new_batch_id() -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + f"-{time.time_ns() % 1_000_000:06d}"


def predict_folder(src: Path, work: Path, cfg: IngestConfig, key: bytes, champion: Champion,
                   cache: VolumeCache | None = None, progress: Progress = None) -> list[Answer]:
    """Every study of a DICOM folder: the folder goes through the gate as one batch (as training's
    ingest does), then each study's accepted series are scored. The gate's work directory is
    removed afterwards; the answers name studies by their pseudonymised StudyInstanceUID."""
    import pandas as pd

    from dicomops import ingest

    gate_work = Path(work) / "gate"
    shutil.rmtree(gate_work, ignore_errors=True)
    try:
        timer = Timer()
        with timer("gate_s"):
            try:
                gate = ingest.run(Path(src), gate_work, cfg, key)
            except GateFailedError as err:
                summary = WorkLayout(gate_work).ingest.summary
                quarantined = int(io.read_json(summary).get("quarantined_files", 0)) if summary.exists() else 0
                return [Answer(REFUSED_BATCH, "refused", quarantined_files=quarantined, reason=err.brief,
                               timings=timer.timings)]
        gate_s = timer.timings["gate_s"]
        studies = sorted(pd.read_parquet(WorkLayout(gate_work).ingest.accepted,
                                         columns=["StudyInstanceUID"]).StudyInstanceUID.unique())
        answers = []
        for i, study in enumerate(studies, 1):
            t = Timer()
            t0 = time.perf_counter()
            try:
                findings, _ = score_gated(champion, gate_work, cache, t, study=str(study))
                answer = Answer(str(study), "scored", findings, len(findings), timings=t.timings)
            except Exception as err:
                if local_outage(err):  # the machine's, not the study's: stops the batch
                    raise
                answer = Answer(str(study), "failed", reason=f"{type(err).__name__} during scoring (the message is "
                                                             f"withheld: it may quote identifiers)", timings=t.timings)
            answer.timings["total_s"] = time.perf_counter() - t0 + gate_s / max(len(studies), 1)
            answers.append(answer)
            if progress is not None:
                progress(i, len(studies))
        if gate.quarantined_files:
            answers.append(Answer("(quarantined files)", "refused", quarantined_files=gate.quarantined_files,
                                  reason=f"{gate.quarantined_files} files quarantined by the gate "
                                         f"({', '.join(f'{k}: {v}' for k, v in sorted(gate.reasons.items()))})"))
        return answers
    finally:
        shutil.rmtree(gate_work, ignore_errors=True)


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
    score the folder or the PACS query, record the results, log the run."""

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
    try:
        if src is not None:
            answers = predict_folder(src, scratch, ingest_cfg, key, champion, cache, progress)
            source = "folder"
        else:
            from dicomops.pacs.client import PacsClient

            # Two clients: a requests session per thread (the second retrieves ahead).
            with PacsClient.from_env(http_budget_s, url=orthanc_url) as pacs, \
                    PacsClient.from_env(http_budget_s, url=orthanc_url) as prefetch:
                from dicomops.pacs.watch import record_answered

                try:
                    predict_pacs(  # pacs-watch leaves a study answered here once it is stable
                        query or {}, pacs, staging, scratch, ingest_cfg, key, champion, cache, serve_cfg.write_back,
                        progress, prefetch, answers=answers,
                        answered=lambda a: record_answered(work, a, f"predict --pacs (batch {batch_id})"))
                except Exception as err:  # an outage: what was answered before it is recorded, then it stops
                    if answers:
                        folder, metrics = record(work, batch_id, answers, champion, cache)
                        log_batch(tracking_uri, artifact_root, batch_id, folder, metrics, champion, "pacs", cache,
                                  stopped=type(err).__name__)
                    raise
            source = "pacs"
        folder, metrics = record(work, batch_id, answers, champion, cache)
        run_id = log_batch(tracking_uri, artifact_root, batch_id, folder, metrics, champion, source, cache)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        if cache is not None:
            cache.close()
    refused = next((a.reason for a in answers if a.study == REFUSED_BATCH and a.status == "refused"), "")
    return {"batch": batch_id, "results": str(folder / "results.csv"), "mlflow_run_id": run_id,
            **champion.describe(), **metrics, **({"refused": refused} if refused else {})}
