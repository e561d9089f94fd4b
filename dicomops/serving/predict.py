"""A study scored by a served model: the one code path behind the batch flow, the PACS watch and
the online endpoint, so the three cannot disagree.

Cold, a study goes through the ingest gate (:func:`dicomops.ingest.run`, the same checks as
training), each accepted series through the training's own per-series preprocessing
(:func:`dicomops.preprocessing.stage.preprocess_one`, with the preprocessing the model was trained
with), and its slabs through the exported engine; the series score is the training's
:func:`dicomops.training.scoring.series_score` at the model's operating point. With a cache
(:class:`dicomops.serving.cache.VolumeCache`), each preprocessed volume is stored under the
preprocessing's cache key, and the study's *manifest* (its series' keys and the gate's verdict) under
a keyed digest of its instance list and the preprocessing; warm, a study asked for again is scored
from the cached volumes without being retrieved, gated or preprocessed.

Every answer is de-identified by construction: a study is named by its token (keyed hash), a series
by the gate's pseudonym. The original UIDs stay with the caller (and in the SR the PACS receives).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import hmac
import json
import logging
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from dicomops.config import IngestConfig, PreprocessConfig
from dicomops.errors import GateFailedError, local_outage
from dicomops.layout import WorkLayout
from dicomops.pacs.staging import WAIT_S, Prefetched, held_study, retrieve_held
from dicomops.serving.cache import VolumeCache
from dicomops.serving.champion import Champion

log = logging.getLogger(__name__)

RESULT_COLUMNS = ["study", "series", "manufacturer", "slices", "score", "present", "best_z", "threshold",
                  "model", "version", "engine", "cache"]
# Counts and indices: whole numbers in results.csv, empty (never NaN, never 119.0) on a row without a score.
INTEGER_COLUMNS = ("slices", "best_z", "segmenter_nodules")


class SeriesNotPreprocessed(ValueError):
    """A series whose pixels training's preprocessing could not turn into a volume; `code` is the
    preprocessing's own reason (``unreadable_pixels``, ``transform_error``): no header value in it."""

    def __init__(self, code: str) -> None:
        super().__init__(f"the series' pixels could not be preprocessed ({code})")
        self.code = code


def failure_code(err: BaseException) -> str:
    """What may be said of a failure without quoting an identifier: the library's own reason code,
    else the exception's type (its message may quote a header value)."""
    return err.code if isinstance(err, SeriesNotPreprocessed) else type(err).__name__


SEGMENTER_FAILED = "segmenter_failed"  # how the reason code of a series the segmenter failed on begins


def segmenter_failure_code(err: BaseException) -> str:
    """The reason code of a series the classifier scored and the segmenter failed on:
    ``segmenter_failed:<failure_code>`` (``segmenter_failed:ValueError``), never a message."""
    return f"{SEGMENTER_FAILED}:{failure_code(err)}"


REPORT_FAILED = "report_failed"  # how the reason code of a scored series whose classifier's SR failed begins


def report_failure_code(err: BaseException) -> str:
    """The reason code of a series the classifier scored and whose SR could not be written (highdicom
    refusing one of its header values, say): ``report_failed:<failure_code>`` (``report_failed:ValueError``),
    never a message. Nothing went back for it, the segmenter's objects neither."""
    return f"{REPORT_FAILED}:{failure_code(err)}"


@dataclass
class SeriesFinding:
    series: str  # the gate's pseudonym
    manufacturer: str
    slices: int
    score: float
    present: bool
    best_z: int
    cache: str  # hit | miss | off


@dataclass
class SeriesFailure:
    """A series of a study that could not be scored while the study's other series were; or, its
    reason :func:`report_failure_code`, one the classifier scored whose SR could not be written
    (:attr:`by_report`): nothing went back for it; or, its reason :func:`segmenter_failure_code`,
    one the classifier scored and the segmenter failed on (:attr:`by_segmenter`): its classifier's SR
    went back, none of the segmenter's objects did."""

    series: str  # the gate's pseudonym
    manufacturer: str
    # failure_code (report_failure_code, segmenter_failure_code): a reason code or an exception type, never a message
    reason: str

    @property
    def by_report(self) -> bool:
        return self.reason.startswith(f"{REPORT_FAILED}:")

    @property
    def by_segmenter(self) -> bool:
        return self.reason.startswith(f"{SEGMENTER_FAILED}:")


def by_step(failures: Sequence[SeriesFailure]) -> tuple[list[SeriesFailure], list[SeriesFailure], list[SeriesFailure]]:
    """The failed series by the step they failed at: not scored; scored, whose classifier's SR could
    not be written (:attr:`SeriesFailure.by_report`: nothing went back for either); and scored, that
    the segmenter failed on (:attr:`SeriesFailure.by_segmenter`: their classifier's SR went back)."""
    return ([f for f in failures if not f.by_report and not f.by_segmenter], [f for f in failures if f.by_report],
            [f for f in failures if f.by_segmenter])


@dataclass
class Answer:
    """What happened to one study; `status` is scored | refused | failed."""

    study: str  # token or pseudonym, never a UID
    status: str
    findings: list[SeriesFinding] = field(default_factory=list)
    accepted_series: int = 0
    quarantined_files: int = 0
    results_stored: int = 0
    reason: str = ""  # why refused or failed; for a scored study, why the PACS did not keep every result
    warm: bool = False
    timings: dict[str, float] = field(default_factory=dict)
    images: str = ""  # from a PACS: the keyed digest of the image instances answered (watch.images_digest)
    # What the segmenter answered for each series it wrote back (dicomops.serving.segmenter.Served).
    localised: list[Any] = field(default_factory=list, repr=False)
    # Series not scored, the others were; scored series whose SR could not be written (SeriesFailure.by_report);
    # and scored series the segmenter failed on (SeriesFailure.by_segmenter).
    failed_series: list[SeriesFailure] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "localised"}


class Timer:
    def __init__(self) -> None:
        self.timings: dict[str, float] = {}

    def __call__(self, name: str) -> _Lap:
        return _Lap(self.timings, name)


class _Lap:
    def __init__(self, timings: dict[str, float], name: str) -> None:
        self.timings, self.name = timings, name

    def __enter__(self) -> None:
        self.t0 = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        self.timings[self.name] = self.timings.get(self.name, 0.0) + time.perf_counter() - self.t0


# --------------------------------------------------------------------------------------------------
# keys
# --------------------------------------------------------------------------------------------------
@functools.cache
def _code_hash() -> str:
    """The preprocessing code's hash, once per process: a running process's modules do not change."""
    from dicomops.preprocessing.stage import code_hash

    return code_hash()


# Gate settings that never change an answer: where it runs, what it releases under differential
# privacy, where a re-identification table goes.
GATE_PLACEMENT: dict[str, Any] = dict(workers=True, dask_address=True, privacy=True, deid={"reid_key_path"})


def answer_identity(champion: Champion, gate: IngestConfig) -> str:
    """The settings and code a cached answer depends on besides the study's content: the
    preprocessing's (its volume settings and code: what the preprocessing's cache key hashes) and
    the gate's (every setting but :data:`GATE_PLACEMENT`), so that a study a gate configured otherwise would
    refuse, or accept otherwise, is never answered from a manifest the first gate wrote."""
    from dicomops.preprocessing.stage import VOLUME_FIELDS

    settings = champion.preprocess.model_dump(mode="json", include=set(VOLUME_FIELDS))
    return json.dumps({"config": settings, "code": _code_hash(),
                       "gate": gate.model_dump(mode="json", exclude=GATE_PLACEMENT)}, sort_keys=True)


def study_digest(key: bytes, instance_uids: Iterable[str], identity: str) -> str:
    """A keyed digest of a study's instance list and the preprocessing: the manifest's cache key.
    Keyed, so the cache never holds a hash an outsider could compute from known UIDs."""
    blob = "\n".join(sorted(instance_uids)) + "\n" + identity
    return hmac.new(key, blob.encode(), hashlib.sha256).hexdigest()[:40]


# --------------------------------------------------------------------------------------------------
# series → volume → score
# --------------------------------------------------------------------------------------------------
def preprocess_series(group: pd.DataFrame, deid_root: Path, champion: Champion, scratch: Path) -> np.ndarray:
    """One accepted series preprocessed exactly as training did (its worker function, its config)."""
    return preprocessed(group, deid_root, champion.preprocess, scratch)[0]


def preprocessed(group: pd.DataFrame, deid_root: Path, preprocess: PreprocessConfig,
                 scratch: Path) -> tuple[np.ndarray, np.ndarray]:
    """One accepted series through training's per-series preprocessing with `preprocess`: the
    image and its voxel → RAS affine."""
    from dicomops.preprocessing.stage import preprocess_one

    out = Path(scratch) / "volume.npz"
    meta = preprocess_one(group.to_dict("records"), str(deid_root), "", preprocess.model_dump_json(), str(out))
    if meta.get("reason"):
        raise SeriesNotPreprocessed(str(meta["reason"]))
    with np.load(out) as npz:
        return np.asarray(npz["image"]), np.asarray(npz["affine"], dtype=float)


def score_volume(champion: Champion, volume: np.ndarray) -> tuple[float, int]:
    """The series score and its best slice, from every slab of a preprocessed volume."""
    from dicomops.training.data import all_slabs
    from dicomops.training.scoring import series_score

    slabs = all_slabs(volume, champion.contract.channels, champion.contract.height).numpy()
    probs = champion.engine.probabilities(slabs)
    return series_score(probs, champion.rule), int(np.argmax(probs))


def _finding(champion: Champion, series: str, manufacturer: str, volume: np.ndarray, cache: str) -> SeriesFinding:
    score, best_z = score_volume(champion, volume)
    return SeriesFinding(series, manufacturer, int(volume.shape[-1]), score, bool(score >= champion.threshold),
                         best_z, cache)


def score_gated(champion: Champion, study_work: Path, cache: VolumeCache | None, timer: Timer,
                study: str = "", failures: list[SeriesFailure] | None = None
                ) -> tuple[list[SeriesFinding], list[dict[str, Any]]]:
    """Score every accepted series of a gated work directory (of `study` only, when given); also
    return the manifest entries. With `failures`, a series that cannot be scored is appended there
    (:func:`failure_code` says why) and the others are still scored; without, it raises. This
    machine running out of something (:func:`dicomops.errors.local_outage`) always raises."""
    from dicomops.preprocessing.stage import cache_key, series_content_hash

    layout = WorkLayout(study_work)
    accepted = pd.read_parquet(layout.ingest.accepted)
    if study:
        accepted = accepted[accepted.StudyInstanceUID == study]
    code = _code_hash()
    findings, entries = [], []
    with tempfile.TemporaryDirectory(prefix="dicomops-pre-") as scratch:
        for uid, group in accepted.groupby("SeriesInstanceUID", sort=True):
            manufacturer = str(group.Manufacturer.iloc[0]) if "Manufacturer" in group else ""
            try:
                key = cache_key(series_content_hash(group), champion.preprocess, code)
                volume = cache.get_volume(key) if cache is not None else None
                state = "off" if cache is None else ("hit" if volume is not None else "miss")
                if volume is None:
                    with timer("preprocess_s"):
                        volume = preprocess_series(group, layout.ingest.deid, champion, Path(scratch))
                    if cache is not None:
                        cache.put_volume(key, volume)
                with timer("score_s"):
                    finding = _finding(champion, str(uid), manufacturer, volume, state)
            except Exception as err:
                if failures is None or local_outage(err):
                    raise
                failures.append(SeriesFailure(str(uid), manufacturer, failure_code(err)))
                continue
            findings.append(finding)
            entries.append({"series": str(uid), "manufacturer": manufacturer, "key": key})
    return findings, entries


# --------------------------------------------------------------------------------------------------
# a staged study (files on disk, PHI) → answer
# --------------------------------------------------------------------------------------------------
def said_failures(failures: Sequence[SeriesFailure]) -> str:
    """The failures' reason codes with their counts, most frequent first: ``unreadable_pixels (2)``."""
    counts: dict[str, int] = {}
    for failure in failures:
        counts[failure.reason] = counts.get(failure.reason, 0) + 1
    return ", ".join(f"{k} ({v})" for k, v in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def scored_answer(study: str, findings: list[SeriesFinding], failures: list[SeriesFailure], accepted_series: int,
                  quarantined_files: int, timer: Timer) -> Answer:
    """A gated study's answer once its series were scored one by one: ``scored`` with the series that
    could not be in ``failed_series``, or ``failed`` when none could (every prediction path: a
    folder's batch, pacs-watch, the online service)."""
    if not findings:
        return Answer(study, "failed", accepted_series=accepted_series, quarantined_files=quarantined_files,
                      reason=f"none of its series could be scored: {said_failures(failures)}", timings=timer.timings,
                      failed_series=failures)
    return Answer(study, "scored", findings, accepted_series, quarantined_files, timings=timer.timings,
                  failed_series=failures)


def answer_staged(study: str, staged: Path, study_work: Path, cfg: IngestConfig, key: bytes, champion: Champion,
                  cache: VolumeCache | None = None, timer: Timer | None = None) -> tuple[Answer, list[dict[str, Any]]]:
    """Gate and score a study's files. A study the gate refuses, or none of whose series the model
    can take, is an answer (refused / failed) with its reason, never an exception: one bad study
    must not stop a batch. Series by series, as a folder's batch scores them: one that cannot be
    scored (its pixels do not decode, preprocessing or the engine raises) is a
    :class:`SeriesFailure` of a ``scored`` study (its pseudonym and :func:`failure_code`) and the
    others keep their scores; only when every series failed is the study ``failed``. The error's
    message is withheld (it may quote a header value), its type kept. This machine running out of
    something (a full disk: :func:`dicomops.errors.local_outage`) is not the study's doing: it
    raises, and stops the batch or the pass like an outage."""
    from dicomops import ingest
    from dicomops import io as dio

    timer = timer or Timer()
    step = "the ingest gate"
    try:
        with timer("gate_s"):
            try:
                gate = ingest.run(staged, study_work, cfg, key)
            except GateFailedError as err:
                summary = dio.read_json(WorkLayout(study_work).ingest.summary)
                return Answer(study, "refused", quarantined_files=int(summary.get("quarantined_files", 0)),
                              reason=err.brief, timings=timer.timings), []
        if gate.accepted_series == 0:
            return Answer(study, "refused", quarantined_files=gate.quarantined_files,
                          reason="no series passed the ingest gate", timings=timer.timings), []
        step = "scoring"
        failures: list[SeriesFailure] = []
        findings, entries = score_gated(champion, study_work, cache, timer, failures=failures)
    except Exception as err:
        if local_outage(err):
            raise
        said = failure_code(err)
        withheld = "" if isinstance(err, SeriesNotPreprocessed) else " (the message is withheld: it may quote identifiers)"
        return Answer(study, "failed", reason=f"{said} during {step}{withheld}", timings=timer.timings), []
    answer = scored_answer(study, findings, failures, gate.accepted_series, gate.quarantined_files, timer)
    return answer, entries if answer.status == "scored" else []


def remember(cache: VolumeCache, digest: str, answer: Answer, entries: list[dict[str, Any]]) -> None:
    """Store a scored study's manifest (its series' volume keys and the gate's counts) under `digest`.
    Not for a study with a series that could not be scored, whose SR could not be written, or that the
    segmenter failed on (called once its reports are built): a warm answer names only the series its
    manifest holds and says nothing of a failure, so such a study is answered cold each time, its
    failed series said again (the volumes of the others still come from the cache)."""
    if answer.status == "scored" and entries and not answer.failed_series:
        cache.put_manifest(digest, {"series": entries, "accepted_series": answer.accepted_series,
                                    "quarantined_files": answer.quarantined_files})


def answer_from_cache(study: str, digest: str, champion: Champion, cache: VolumeCache, timer: Timer) -> Answer | None:
    """The warm path: the study's manifest and every volume it names, or None (go cold)."""
    manifest = cache.get_manifest(digest)
    if manifest is None:
        return None
    findings = []
    for entry in manifest["series"]:
        volume = cache.get_volume(entry["key"])
        if volume is None:
            return None
        with timer("score_s"):
            findings.append(_finding(champion, entry["series"], entry.get("manufacturer", ""), volume, "hit"))
    return Answer(study, "scored", findings, int(manifest.get("accepted_series", len(findings))),
                  int(manifest.get("quarantined_files", 0)), warm=True, timings=timer.timings)


def answer_pacs_study(study_uid: str, pacs: Any, staging: Path, scratch: Path, cfg: IngestConfig, key: bytes,
                      champion: Champion, cache: VolumeCache | None = None, write_back: bool = False,
                      study: str | None = None, images: Mapping[str, str] | None = None,
                      prefetched: Future[Prefetched] | None = None, wait_s: float = WAIT_S,
                      answered: Callable[[Answer], Any] | None = None) -> Answer:
    """One study of the PACS, by its StudyInstanceUID (held in memory only): warm from the cache when
    it can and nothing is to be written back; otherwise retrieved, gated, scored and, with
    `write_back`, answered with one SR per scored series stored in the PACS (a series that could
    not be scored has none: the answer's ``failed_series`` names it, :func:`answer_staged`), and the
    segmenter's objects where the champion carries one (a series it fails on has none of them, its
    classifier's SR still goes back, and ``failed_series`` names it: :func:`segmenter_failure_code`).
    A scored series whose SR cannot be written has nothing stored, the others do, and
    ``failed_series`` names it (:func:`report_failure_code`); when none can be, the study is
    ``failed`` with nothing stored. The
    study is held (:func:`dicomops.pacs.staging.held_study`) while it is staged; staging and the
    study's scratch work directory are removed before returning. Only talking to the PACS, or a study another
    handler holds past the wait (:class:`~dicomops.pacs.staging.StudyBusyError`), raises. `images`:
    the study's image instances (:meth:`dicomops.pacs.client.PacsClient.image_instances`), when the
    caller has listed them already. `prefetched`: the caller's retrieval of this study ahead
    (:func:`retrieve_ahead`), a future. `wait_s`: how long to wait for another handler of the study.
    `answered(answer)`: called once its results are stored, while the study is still held (so that
    pacs-watch, waiting for it, finds it answered: :func:`dicomops.pacs.watch.record_answered`)."""
    from dicomops.pacs.watch import build_reports, images_digest, store_results, study_token

    timer = Timer()
    t0 = time.perf_counter()
    token = study or study_token(key, study_uid)
    digest = None
    with timer("lookup_s"):
        listed = images if images is not None else pacs.image_instances(study_uid)
    answered_images = images_digest(key, listed)
    if cache is not None:
        with timer("lookup_s"):
            digest = study_digest(key, listed, answer_identity(champion, cfg))
        if not write_back and prefetched is None:
            warm = answer_from_cache(token, digest, champion, cache, timer)
            if warm is not None:
                warm.images = answered_images
                warm.timings["total_s"] = time.perf_counter() - t0
                return warm
    study_work = Path(scratch) / token
    with contextlib.ExitStack() as hold:
        if prefetched is not None:
            fetched = prefetched.result()  # a failed retrieval raises here, its hold released
            hold.callback(fetched.release)
            staged, timer.timings["retrieve_s"] = fetched.folder, fetched.seconds
        else:
            staged = hold.enter_context(held_study(staging, token, wait_s))
            with timer("retrieve_s"):
                pacs.retrieve_study(study_uid, staged)
        hold.callback(shutil.rmtree, study_work, ignore_errors=True)
        answer, entries = answer_staged(token, staged, study_work, cfg, key, champion, cache, timer)
        answer.images = answered_images
        reports: list[Any] | None = None
        failure = ""
        if answer.status == "scored" and write_back:
            unanswered: list[SeriesFailure] = []  # scored series whose SR, or the segmenter's part, failed
            try:
                with timer("write_s"):
                    table = findings_frame(answer.findings, champion)
                    reports, localised = build_reports(staged, study_work, table, champion, key, unanswered)
            except Exception as err:
                if local_outage(err):
                    raise
                failure = f"{type(err).__name__} while writing the reports; nothing stored"
            else:
                answer.localised = localised
                answer.failed_series.extend(unanswered)
                if not reports:  # no scored series' SR could be written: nothing to store, as a failed study
                    failure = f"no report could be written: {said_failures(unanswered)}; nothing stored"
        if cache is not None and digest is not None:  # after the segmenter: a series it failed on keeps no manifest
            remember(cache, digest, answer, entries)
        if failure:
            answer = Answer(token, "failed", answer.findings, answer.accepted_series, answer.quarantined_files,
                            reason=failure, timings=timer.timings, failed_series=answer.failed_series)
        elif reports is not None:
            with timer("write_s"):  # a scored study whose results the PACS did not all keep says why
                answer.results_stored, answer.reason = store_results(pacs, reports)
            if answered is not None:
                answered(answer)
    answer.timings["total_s"] = time.perf_counter() - t0
    return answer


def retrieve_ahead(pacs: Any, study_uid: str, staging: Path, token: str) -> Prefetched:
    """Hold the study and retrieve it whole into its staging folder (in a worker thread, while
    another study is answered); :func:`answer_pacs_study` answers it and lets it go."""

    def retrieve(folder: Path) -> float:
        t0 = time.perf_counter()
        pacs.retrieve_study(study_uid, folder)
        return time.perf_counter() - t0

    return retrieve_held(retrieve, staging, token)


def findings_frame(findings: Sequence[SeriesFinding], champion: Champion) -> pd.DataFrame:
    """The scores as :func:`dicomops.pacs.watch.build_reports` takes them."""
    return pd.DataFrame({"SeriesInstanceUID": [f.series for f in findings], "score": [f.score for f in findings],
                         "present": [f.present for f in findings], "best_z": [f.best_z for f in findings]})


def result_table(answers: Sequence[Answer], champion: Champion) -> pd.DataFrame:
    """One row per scored series, one per series that failed while its study's others were scored
    (status ``failed``, its reason code), plus one per study that was not scored (with its status
    and reason); where the segmenter answered the series in the PACS, its call (``segmenter*``
    columns) and where its mask is kept (``segmenter_mask``, :meth:`WorkLayout.served_mask`); where
    it failed on a scored series, that series' row says so in ``reason`` (its code) and stays scored.
    A scored series whose SR could not be written keeps its score in a ``failed`` row (nothing went
    back: no reader can review it), its code in ``reason``.
    ``slices`` counts the slices of the volume the model scored (resampled to the preprocessing's
    spacing, not the acquired images), ``best_z`` is the highest-scoring one; both stay whole numbers
    (empty on a row without a score). De-identified: tokens and pseudonyms only."""
    from dicomops.serving.segmenter import Served

    rows = []
    meta = {"threshold": champion.threshold, "model": champion.name, "version": champion.version,
            "engine": champion.engine.choice.kind}
    for a in answers:
        common = {"study": a.study, "status": a.status, "reason": a.reason, "warm": a.warm,
                  "total_s": round(a.timings.get("total_s", 0.0), 4)}
        if not a.findings and not a.failed_series:
            rows.append(common | meta)
        localised = {s.series: s for s in a.localised}
        not_scored, unreported, unlocalised = by_step(a.failed_series)
        segmenter_failed = {f.series: f.reason for f in unlocalised}
        unwritten = {f.series: f.reason for f in unreported}
        for f in a.findings:
            served = localised.get(f.series)
            segmenter = {} if served is None else served.columns() | {
                "segmenter_mask": WorkLayout.served_mask(f.series) if served.mask is not None else ""}
            note: dict[str, str] = {}
            if f.series in segmenter_failed:  # scored, its SR went back: the row stays scored
                note = {"reason": "; ".join(filter(None, [
                    a.reason, f"the segmenter's results not written back: {segmenter_failed[f.series]}"]))}
            elif f.series in unwritten:  # scored, nothing went back for it
                note = {"status": "failed", "reason": "; ".join(filter(None, [
                    a.reason, f"scored, no result written back: {unwritten[f.series]}"]))}
            rows.append(common | meta | {"series": f.series, "manufacturer": f.manufacturer, "slices": f.slices,
                                         "score": f.score, "present": f.present, "best_z": f.best_z,
                                         "cache": f.cache} | segmenter | note)
        for failed in not_scored:  # those scored have their row above
            rows.append(common | meta | {"series": failed.series, "manufacturer": failed.manufacturer,
                                         "status": "failed", "reason": f"series not scored: {failed.reason}"})
    columns = [*RESULT_COLUMNS, "status", "reason", "warm", "total_s", *Served.COLUMNS, "segmenter_mask"]
    table = pd.DataFrame(rows).reindex(columns=columns)
    return table.astype({c: "Int64" for c in INTEGER_COLUMNS})
