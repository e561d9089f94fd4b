"""A study from the PACS, start to finish: retrieved whole into staging, through the same ingest gate
as a folder, scored by the champion, its results stored back in the PACS as DICOM SR, staging removed.

Identity. The work directory, the ledger, logs and events name a study by its *token*, a keyed hash
of its StudyInstanceUID (:meth:`dicomops.deid.keys.KeyedMapper.token`), never by a UID. The original
UIDs a result must reference are read from the staged files into memory, matched to the work
directory's pseudonymised series with the same keyed mapping the gate used, and leave the process
only inside the DICOM objects stored back into the PACS. Staging holds the PACS's own files (PHI) for
as long as one study takes and lives outside the work directory.

What happens to each study is one row of ``WORK/pacs/studies.csv``: ``ingested`` (with how many
series were accepted and how many results were stored back), ``refused`` by the gate (with its
reason), ``failed`` when scoring or writing its report failed (the step and the error's type),
``answered`` when a batch (``predict --pacs``) or the online service wrote its results back in full
first (the watch then gates it without scoring it again, so that drift monitoring and readers'
feedback find its de-identified files, and records it ``ingested`` saying so), or ``duplicate``
for a study already handled. A study whose results the PACS will not keep (some of them, whenever
asked) stays ``ingested`` with how many it kept and why the rest were not, and is not retried.

A series that cannot be scored (its pixels do not decode, preprocessing or the model raises on it)
fails alone: the study's other series are answered, and the study is ``ingested`` with
``series_failed`` (how many) and ``failed_series`` (each one's pseudonym, as the study's gate and
results table name it, and its reason code: ``2.25.…:unreadable_pixels``) and a reason that says
so. Like any study handled, it is not answered again unless its images change (the series repaired
and sent again): the same images fail the same way. Only a study none of whose series could be
scored is ``failed``, with nothing stored back. A study is never dropped silently, and one that
fails does not hold back the studies behind it.

The segmenter (when the champion carries one) fails alone in the same way: a series it cannot
answer (a volume it cannot take, an SR or SEG it cannot write, a model error) goes back with its
classifier's SR and none of the segmenter's objects, and is named in ``failed_series`` with the code
``segmenter_failed:<the error's type>``; the study is ``ingested`` and its reason says so. So does a
scored series whose classifier's SR cannot be written (highdicom refusing one of its header values,
say), except that nothing goes back for it, the segmenter's objects neither: it is named with the code
``report_failed:<the error's type>``, and a study none of whose SRs could be written is ``failed``
with nothing stored. Only this machine running out of something
(:func:`dicomops.errors.local_outage`) stops a study whole.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import pandas as pd

from dicomops import io
from dicomops.config import IngestConfig
from dicomops.deid.keys import KeyedMapper
from dicomops.errors import GateFailedError, local_outage
from dicomops.layout import WorkLayout
from dicomops.pacs.client import PacsRequestRefused, PacsStoreRefused
from dicomops.pacs.staging import held_study

log = logging.getLogger(__name__)

NOT_ALL_STORED = "not every result was stored"  # how a study's reason begins when the PACS did not keep them all
LEDGER_COLUMNS = ["token", "status", "accepted_series", "quarantined_files", "results_stored", "reason",
                  "handled_at", "images", "series_failed", "failed_series"]


class Pacs(Protocol):
    """What the watch needs of a PACS (:class:`dicomops.pacs.client.PacsClient` over DICOMweb)."""

    def retrieve_study(self, study_uid: str, dest: Path) -> list[Path]: ...

    def store(self, datasets: Sequence[Any]) -> Any: ...

    def image_instances(self, study_uid: str) -> dict[str, str]: ...


@dataclass(frozen=True)
class StudyOutcome:
    token: str
    status: str  # ingested | refused | failed | answered | duplicate
    accepted_series: int = 0
    quarantined_files: int = 0
    results_stored: int = 0
    reason: str = ""
    images: str = ""  # the keyed digest of the image instances handled (images_digest)
    series_failed: int = 0  # accepted series not scored, or scored and the segmenter failed on (the others answered)
    failed_series: str = ""  # each as "<the gate's pseudonym>:<reason code>", ";"-separated (failed_series_text)


def study_token(key: bytes, study_uid: str) -> str:
    return KeyedMapper(key).token("study", study_uid)


def failed_series_text(failures: Iterable[Any]) -> str:
    """The series of a study that could not be scored, whose SR could not be written, or that the
    segmenter failed on (:class:`dicomops.serving.predict.SeriesFailure`), as the ledger's
    ``failed_series`` says them: ``<pseudonym>:<reason code>``, ``;``-separated
    (``2.25.…:unreadable_pixels``, ``2.25.…:report_failed:ValueError``,
    ``2.25.…:segmenter_failed:ValueError``). The pseudonym is the gate's
    (``WORK/pacs/studies/<token>/ingest/accepted.parquet``, the study's results table); the code a
    reason code or an error's type, never a message."""
    return ";".join(f"{f.series}:{f.reason}" for f in failures)


def images_digest(key: bytes, sop_uids: Iterable[str]) -> str:
    """A keyed digest of a study's image instances (:meth:`PacsClient.image_instances`: not its
    SR and SEG): what the ledger says a study was when it was handled, so that a study that gained
    images since (a series that arrived after the study was first stable, a later reconstruction)
    is answered again rather than taken for one already handled. No UID can be read back from it."""
    return KeyedMapper(key).token("images", "\n".join(sorted(str(u) for u in sop_uids)))


def handled_tokens(work: Path) -> set[str]:
    """The studies already handled: ingested, refused, failed or answered (a duplicate is not a
    handling)."""
    ledger = WorkLayout(work).pacs.ledger
    if not ledger.exists():
        return set()
    table = pd.read_csv(ledger, keep_default_na=False)
    return set(table[table.status != "duplicate"].token)


def _handled_here(work: Path, token: str, images: str = "") -> tuple[bool, str, bool]:
    """Whether the watch itself handled `token` as it is now (its `images`, :func:`images_digest`);
    if not, who answered it so ('' for nobody); and whether the watch handled it before, as it was
    then. A row of the study with other images is of an earlier state of it: not handled as it is
    now. A row without a digest (a ledger written before 2026-12-05) counts for any."""
    ledger = WorkLayout(work).pacs.ledger
    if not ledger.exists():
        return False, "", False
    rows = pd.read_csv(ledger, keep_default_na=False, dtype=str)
    rows = rows[rows.token == token]
    before = bool((~rows.status.isin(["answered", "duplicate"])).any())
    if images and "images" in rows:
        rows = rows[rows["images"].isin(["", images])]
    if (~rows.status.isin(["answered", "duplicate"])).any():
        return True, "", before
    answered = rows[rows.status == "answered"]
    return False, str(answered.reason.iloc[-1]).removeprefix("answered by ") if len(answered) else "", before


def _record(work: Path, outcome: StudyOutcome) -> None:
    from filelock import FileLock

    ledger = WorkLayout(work).pacs.ledger
    ledger.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{ledger}.lock", thread_local=False):  # the watch, batches and the online service write it
        rows = pd.read_csv(ledger, keep_default_na=False) if ledger.exists() else pd.DataFrame(columns=LEDGER_COLUMNS)
        row = asdict(outcome) | {"handled_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        io.write_csv(ledger, pd.concat([rows, pd.DataFrame([row])], ignore_index=True)[LEDGER_COLUMNS])


def record_answered(work: Path, answer: Any, by: str) -> bool:
    """Record in the watch's ledger a study a batch or the online service (`by`) answered with its
    results all kept by the PACS (an :class:`dicomops.serving.predict.Answer`), so that the watch does
    not answer it again once it is stable; True if recorded. One answered in part (results the PACS
    did not keep, a series not scored, not reported or that the segmenter failed on), or not at all,
    is not: the watch answers it as it would any other, once, and its own row says what was not
    answered."""
    if answer.status != "scored" or answer.results_stored < 1 or answer.reason or answer.failed_series:
        return False
    _record(work, StudyOutcome(answer.study, "answered", answer.accepted_series, answer.quarantined_files,
                               answer.results_stored, reason=f"answered by {by}", images=answer.images))
    return True


def handle_study(study_uid: str, pacs: Pacs, staging: Path, work: Path, cfg: IngestConfig, key: bytes,
                 champion: Any | None = None, cache: Any | None = None) -> StudyOutcome:
    """Retrieve, gate, score and answer one study; record and return what happened.

    A retrieval that fails (an outage), or a study another handler holds past the wait
    (:class:`~dicomops.pacs.staging.StudyBusyError`), raises and records nothing, so the caller does
    not advance its cursor and the study is tried again whole; one that never can be retrieved (a
    UID no DICOMweb request can name: :class:`~dicomops.pacs.client.PacsRequestRefused`) is
    recorded as refused. `champion` is a :class:`dicomops.serving.champion.Champion`; without one
    the study is ingested and no result is written (the ledger says so). `cache` is the :class:`dicomops.serving.cache.VolumeCache` the
    preprocessed volumes go to, so the online service finds the study warm.
    """
    token = study_token(key, study_uid)
    study_work = WorkLayout(work).pacs.study(token)
    images = ""
    try:
        listed = pacs.image_instances(study_uid)
        images = images_digest(key, listed)
        handled, _, changed = _handled_here(work, token, images)  # changed: handled before, with other images
        if handled:
            outcome = StudyOutcome(token, "duplicate", reason="already handled (its first row says how)",
                                   images=images)
            _record(work, outcome)
            return outcome
        digest = None
        if cache is not None and champion is not None:  # so that the study asked for online is warm
            from dicomops.serving.predict import answer_identity, study_digest

            digest = study_digest(key, listed, answer_identity(champion, cfg))
        with held_study(staging, token) as staged:
            handled, answered_by, _ = _handled_here(work, token, images)  # again: a batch may have held it meanwhile
            if handled:
                outcome = StudyOutcome(token, "duplicate", reason="already handled (its first row says how)",
                                       images=images)
                _record(work, outcome)
                return outcome
            pacs.retrieve_study(study_uid, staged)
            if answered_by:  # answered elsewhere: gated only, for drift monitoring and readers' feedback
                outcome = _gate_score_answer(token, staged, study_work, pacs, cfg, key, None, work=work)
                if outcome.status == "ingested":
                    outcome = dataclasses.replace(outcome, reason=f"answered by {answered_by}; gated here, not "
                                                                  "scored again")
            else:
                outcome = _gate_score_answer(token, staged, study_work, pacs, cfg, key, champion, cache, digest,
                                             work)
        if changed and not answered_by:
            outcome = dataclasses.replace(outcome, reason="; ".join(filter(None, [
                "its images changed since it was handled: answered again (unchanged series' results keep "
                "their UIDs: the PACS holds one copy)", outcome.reason])))
        outcome = dataclasses.replace(outcome, images=images)
    except PacsRequestRefused as err:  # never retrievable as it is: recorded, and the watch moves on
        outcome = StudyOutcome(token, "refused", reason=str(err), images=images)
    _record(work, outcome)
    log.info("PACS study %s: %s (%d series accepted, %d files quarantined, %d results stored)%s%s", token,
             outcome.status, outcome.accepted_series, outcome.quarantined_files, outcome.results_stored,
             f"; {outcome.reason}" if outcome.reason else "",
             f"; series not answered in full: {outcome.failed_series}" if outcome.failed_series else "")
    return outcome


def _gate_score_answer(token: str, staged: Path, study_work: Path, pacs: Pacs, cfg: IngestConfig, key: bytes,
                       champion: Any | None, cache: Any | None = None, digest: str | None = None,
                       work: Path | None = None) -> StudyOutcome:
    """The gate, the score and the answer, through the one path every prediction takes
    (:func:`dicomops.serving.predict.answer_staged`). A series the model cannot take fails alone: the
    others are answered and the study is ``ingested``, its failed series counted and named
    (:func:`failed_series_text`); so does a series the segmenter fails on, answered by its
    classifier's SR alone, and one whose classifier's SR cannot be written, answered with nothing
    (:func:`build_reports`). A study that fails here for a reason of its own (none of its series
    could be scored, the report writer can take none of them) is recorded as ``failed``
    and the watch moves on: it must not block every study behind it. Only talking to the PACS, or this machine
    running out of disk space (:func:`dicomops.errors.local_outage`), may raise (an outage: retried)."""
    from dicomops import ingest

    if champion is None:
        try:
            gate = ingest.run(staged, study_work, cfg, key)
        except GateFailedError as err:
            summary = io.read_json(WorkLayout(study_work).ingest.summary)
            return StudyOutcome(token, "refused", 0, int(summary.get("quarantined_files", 0)), 0, err.brief)
        except Exception as err:  # the message may quote a header value: only its type is kept
            if local_outage(err):  # a full disk is not the study's doing: an outage
                raise
            return StudyOutcome(token, "failed", reason=f"{type(err).__name__} during the ingest gate; not answered")
        return StudyOutcome(token, "ingested", gate.accepted_series, gate.quarantined_files, 0,
                            "no champion model: ingested, not scored")
    from dicomops.serving.batch import record
    from dicomops.serving.predict import (
        SeriesFailure,
        answer_staged,
        findings_frame,
        remember,
        said_failures,
    )

    answer, entries = answer_staged(token, staged, study_work, cfg, key, champion, cache)
    if answer.status == "refused":
        return StudyOutcome(token, "refused", 0, answer.quarantined_files, 0, answer.reason)
    n_failed, failed = len(answer.failed_series), failed_series_text(answer.failed_series)
    if answer.status == "failed":
        reason = answer.reason.replace(" (the message", "; not answered (the message") \
            if " (the message" in answer.reason else f"{answer.reason}; not answered"
        return StudyOutcome(token, "failed", answer.accepted_series, answer.quarantined_files, reason=reason,
                            series_failed=n_failed, failed_series=failed)
    failure = ""
    unanswered: list[SeriesFailure] = []  # scored series whose SR, or the segmenter's part, failed
    try:
        reports, answer.localised = build_reports(staged, study_work, findings_frame(answer.findings, champion),
                                                  champion, key, unanswered)
    except Exception as err:
        if local_outage(err):
            raise
        reports, failure = [], (f"{type(err).__name__} during writing the reports; not answered "
                                f"(the message is withheld: it may quote identifiers)")
    else:
        answer.failed_series.extend(unanswered)
        if not reports:  # no scored series' SR could be written: nothing to send, the study failed
            n_failed, failed = len(answer.failed_series), failed_series_text(answer.failed_series)
            failure = (f"no report could be written: {said_failures(unanswered)}; not answered "
                       "(the messages are withheld: they may quote identifiers)")
    if cache is not None and digest is not None:  # after the segmenter: a series it failed on keeps no manifest
        remember(cache, digest, answer, entries)
    if work is not None:  # de-identified, like a batch's: what readers' reviews meet
        record(WorkLayout(work).pacs.root, token, [answer], champion, None)
    if failure:  # the gate accepted its series and they were scored: the ledger says how many, as for the others
        return StudyOutcome(token, "failed", answer.accepted_series, answer.quarantined_files, reason=failure,
                            series_failed=n_failed, failed_series=failed)
    stored, refusal = store_results(pacs, reports)
    return StudyOutcome(token, "ingested", answer.accepted_series, answer.quarantined_files, stored,
                        "; ".join(filter(None, [refusal, _failed_series_reason(answer)])),
                        series_failed=len(answer.failed_series), failed_series=failed_series_text(answer.failed_series))


def _failed_series_reason(answer: Any) -> str:
    """What a scored study's reason says of its failed series ('' without one): those not scored,
    those scored whose classifier's SR could not be written (nothing went back for them), and those
    the segmenter failed on, whose classifier's SR went back."""
    from dicomops.serving.predict import by_step, said_failures

    if not answer.failed_series:
        return ""
    not_scored, unwritten, unlocalised = by_step(answer.failed_series)
    of = f"of its {answer.accepted_series} series"
    said = [f"{len(not_scored)} {of} not scored: {said_failures(not_scored)}, the others answered" if not_scored
            else "",
            f"{len(unwritten)} {of} scored and not answered, their classifier's SR could not be written: "
            f"{said_failures(unwritten)}, nothing went back for them" if unwritten else "",
            f"{len(unlocalised)} {of} answered without the segmenter's results: {said_failures(unlocalised)}, "
            "their classifier's SR went back" if unlocalised else ""]
    broken = " and the ".join(filter(None, ["report writer" if unwritten else "", "segmenter" if unlocalised else ""]))
    fixed = f"; once the {broken} {'are' if ' and ' in broken else 'is'} fixed, answer it with dicomops predict " \
            "--pacs StudyInstanceUID=<the study's UID>" if broken else ""
    return "; ".join(filter(None, said)) + "; not answered again unless its images change (repair the series at " \
        f"its source and send it again{fixed})"


def store_results(pacs: Pacs, reports: Sequence[Any]) -> tuple[int, str]:
    """Store a study's results in the PACS: how many it kept, and why not all ('' when all). A PACS
    that will not keep some of them whenever asked (:class:`~dicomops.pacs.client.PacsStoreRefused`:
    a SOP class it refuses, a filter) makes that part of the study's outcome, which stays scored
    (the results it kept are there to review), so one study's objects never stop every pass behind
    them; any other failure to store is an outage and raises."""
    if not reports:
        return 0, ""
    try:
        return len(pacs.store(reports)), ""
    except PacsStoreRefused as err:
        return err.stored, f"{NOT_ALL_STORED}: {err}"


def original_series(staged: Path, key: bytes, accepted: set[str] | None = None) -> dict[str, list[Any]]:
    """The staged study's image headers grouped by series, keyed by the pseudonym the gate gave each
    series: how a result finds the original UIDs it must reference. In memory only. With
    `accepted` (paths relative to `staged`), only the files the gate accepted: a report's evidence
    is the images the model saw."""
    import pydicom

    mapper = KeyedMapper(key)
    series: dict[str, list[Any]] = {}
    for path in sorted(p for p in Path(staged).rglob("*") if p.is_file()):
        if accepted is not None and path.relative_to(staged).as_posix() not in accepted:
            continue
        try:  # (pydicom's warnings quote the odd value they found: dicomops/__init__.py keeps them in)
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception:  # the gate has already quarantined and recorded what cannot be read
            continue
        if "SeriesInstanceUID" in ds and "ImagePositionPatient" in ds:
            series.setdefault(mapper.uid(str(ds.SeriesInstanceUID)), []).append(ds)
    for images in series.values():
        images.sort(key=lambda ds: float(ds.ImagePositionPatient[2]))
    return series


def build_reports(staged: Path, study_work: Path, scores: pd.DataFrame, champion: Any,
                  key: bytes, failures: list[Any] | None = None) -> tuple[list[Any], list[Any]]:
    """The results for every scored series, referencing the original study and series and the images
    the gate accepted: the classifier's Comprehensive 3D SR; with a segmenter on the champion, also
    the segmenter's SR (each nodule's centre and diameter) and, when it found a nodule and the
    champion writes SEGs (``serve.write_seg``), a SEG of the nodules' voxels on the acquired slices.
    Returns the objects and, for each series the segmenter answered, what it answered
    (:class:`dicomops.serving.segmenter.Served`, de-identified: the results table keeps it).

    With `failures`, a series the segmenter fails on (a volume it cannot take, an object it cannot
    write, a model error) fails alone: none of the segmenter's objects for it is returned (they are
    built whole or not at all), its classifier's SR still is, and a
    :class:`~dicomops.serving.predict.SeriesFailure` is appended there
    (:func:`~dicomops.serving.predict.segmenter_failure_code`: its type, never its message, which
    may quote a header value). A series whose classifier's SR cannot be written (highdicom refusing
    one of its header values, its staged images gone) fails alone too, with nothing returned for it,
    the segmenter not run on it (:func:`~dicomops.serving.predict.report_failure_code`); when every
    series fails so, nothing is returned. Without `failures`, either raises. This machine running
    out of something (:func:`dicomops.errors.local_outage`) always raises."""
    from dicomops.pacs.results import Finding, structured_report
    from dicomops.serving.predict import SeriesFailure, report_failure_code, segmenter_failure_code

    layout = WorkLayout(study_work)
    accepted_table = pd.read_parquet(layout.ingest.accepted)
    originals = original_series(staged, key, set(accepted_table.source_path))
    reports, localised = [], []

    def fail_alone(err: Exception, series: str, manufacturer: str, code: str, said: str) -> None:
        """Record `series` as failed with `code`, or raise where it may not fail alone."""
        if failures is None or local_outage(err):
            raise err
        log.warning(said, series, code, "; the message is withheld, it may quote header values")
        failures.append(SeriesFailure(series, manufacturer, code))

    for row in scores.itertuples():
        series = str(row.SeriesInstanceUID)
        group = accepted_table[accepted_table.SeriesInstanceUID == row.SeriesInstanceUID]
        manufacturer = str(group.Manufacturer.iloc[0]) if "Manufacturer" in group and len(group) else ""
        try:
            images = originals.get(series)
            if not images:  # accepted by the gate but unreadable here: cannot happen unless staging changed
                raise RuntimeError("a scored series has no staged images to reference")
            finding = Finding(present=bool(row.present), score=float(row.score),
                              threshold=float(champion.threshold), model_name=champion.name,
                              model_version=str(champion.version),
                              score_rule=None if champion.rule.is_probability else champion.rule.describe())
            report = structured_report(images, finding)
        except Exception as err:
            fail_alone(err, series, manufacturer, report_failure_code(err),
                       "the classifier's SR of series %s could not be written (%s%s): nothing goes back for it, "
                       "the segmenter's objects neither")
            continue
        reports.append(report)
        if champion.segmenter is not None:
            try:
                objects, answer = localisation_reports(images, group, layout.ingest.deid, champion.segmenter,
                                                       champion.write_seg, series)
            except Exception as err:
                fail_alone(err, series, manufacturer, segmenter_failure_code(err),
                           "the segmenter failed on series %s (%s%s): its classifier's SR goes back, none of the "
                           "segmenter's objects")
                continue
            reports.extend(objects)
            localised.append(answer)
    return reports, localised


SEGMENTER_SR_SERIES, SEG_SERIES = 9003, 9002


def localisation_reports(images: list[Any], group: pd.DataFrame, deid_root: Path, segmenter: Any,
                         write_seg: bool = True, series: str = "") -> tuple[list[Any], Any]:
    """The segmenter's SR for one series, and its SEG when it found a nodule (unless `write_seg`
    is off), with what it answered (:class:`dicomops.serving.segmenter.Served` under the pseudonym
    `series`). `group` is the series' rows of the gate's accepted table (de-identified files under
    `deid_root`), preprocessed as the segmenter was trained; `images` are the original headers the
    objects reference."""
    import tempfile

    from dicomops.pacs.results import Finding, structured_report
    from dicomops.segmentation.native import native_grid, series_segmentation, to_native_mask
    from dicomops.serving.predict import preprocessed
    from dicomops.serving.segmenter import localise, served

    with tempfile.TemporaryDirectory(prefix="dicomops-seg-") as scratch:
        image, affine = preprocessed(group, deid_root, segmenter.preprocess, Path(scratch))
    found = localise(segmenter, image, affine)
    finding = Finding(present=bool(found.nodules), score=found.score, threshold=segmenter.cfg.finding_threshold,
                      model_name=segmenter.name, model_version=segmenter.version, nodules=found.nodules,
                      actionable=found.actionable)
    out: list[Any] = [structured_report(images, finding, series_number=SEGMENTER_SR_SERIES)]
    if not found.nodules:
        return out, served(segmenter, series, found, images)
    try:
        grid = native_grid(images)
    except ValueError as err:  # slices a SEG cannot lie on, that a gate configured looser than the default accepted
        log.warning("segmenter findings not laid onto the acquired slices (%s): its SR goes back with the nodules' "
                    "positions, no SEG and no mask is kept; keep ingest.geometry.orientation at its default to have "
                    "them", err)
        return out, served(segmenter, series, found, images, laid_out=False)
    mask = to_native_mask(found.mask, found.affine, grid.affine, grid.shape)
    if write_seg and mask.any():  # findings thinner than the acquired slices can vanish at their centres
        try:
            out.append(series_segmentation(images, mask, finding, series_number=SEG_SERIES))
        except Exception as err:  # highdicom cannot build it over these images: the SRs still go back
            if local_outage(err):
                raise
            log.warning("no SEG over this series (%s while building it; the message is withheld, it may quote "
                        "header values): its SRs go back with the nodules' positions", type(err).__name__)
    return out, served(segmenter, series, found, images, grid, mask)


MAX_PASSES = 3  # passes one study may fail in, while the PACS answers, before it is set aside


def _failed_passes(work: Path, token: str, failed: bool) -> int:
    """Passes the study `token` has failed in so far, this one counted when `failed`; a study that
    went through is forgotten (``WORK/pacs/attempts.json``: tokens and counts)."""
    path = WorkLayout(work).pacs.attempts
    counts: dict[str, int] = io.read_json(path) if path.exists() else {}
    if failed:
        counts[token] = counts.get(token, 0) + 1
    elif token not in counts:
        return 0
    else:
        counts.pop(token)
    io.write_json(path, counts)
    return counts.get(token, 0)


def _set_aside(work: Path, token: str, err: Exception, passes: int, images: str = "") -> StudyOutcome:
    """A study that failed in `passes` passes while the PACS answered the feed: recorded as failed,
    so the studies behind it are answered, with what happened and what to do. With its `images`
    digest (:func:`images_digest`), a study repaired with other images is answered again by the
    watch; without one (the PACS could not list them either) it stays set aside."""
    outcome = StudyOutcome(token, "failed", images=images, reason=f"{err} (in {passes} passes, while the PACS answered its changes "
                                                   "feed: set aside so that the studies behind it are answered; "
                                                   "repair the study in the PACS, then answer it with dicomops "
                                                   "predict --pacs StudyInstanceUID=<the study's UID>)")
    _record(work, outcome)
    log.warning("PACS study %s: set aside after failing in %d passes; %s", token, passes, err)
    return outcome


def _images_now(pacs: Pacs, key: bytes, study_uid: str) -> str:
    """The digest of the study's images as the PACS lists them now; '' where it cannot list them."""
    from dicomops.pacs.client import PacsError

    try:
        return images_digest(key, pacs.image_instances(study_uid))
    except PacsError:
        return ""


def watch_once(feed: Any, pacs: Pacs, staging: Path, work: Path, cfg: IngestConfig, key: bytes,
               champion: Any | None = None, limit: int = 100,
               on_study: Any = None, cache: Any | None = None) -> list[StudyOutcome]:
    """Handle every study that became stable since the cursor (``WORK/pacs/cursor.json``), page
    after page, advancing the cursor after each study is recorded; `on_study(outcome)` is called for
    each (the flow emits its event there). A failure (an outage) stops the pass with the cursor on
    the last study handled, so the next pass starts with the one that failed. A study that fails in
    :data:`MAX_PASSES` passes while the PACS still answers its changes feed is not an outage but a
    study the PACS cannot serve (a lost file, an answer it always cuts short): it is recorded as
    failed and the pass goes on, so one study never holds back every study behind it."""
    from dicomops.pacs.changes import Cursor
    from dicomops.pacs.client import PacsAuthError, PacsError

    cursor = Cursor(WorkLayout(work).pacs.cursor)
    outcomes = []
    cursor.follow(feed)  # a feed that starts again below the cursor is read from its start
    while True:
        since = cursor.value
        page = feed.poll(since, limit)
        for study in page.studies:
            token = study_token(key, study.study_uid)
            try:
                outcome = handle_study(study.study_uid, pacs, staging, work, cfg, key, champion, cache)
            except PacsAuthError:
                raise
            except PacsError as err:
                passes = _failed_passes(work, token, failed=True)
                if passes < MAX_PASSES:
                    raise
                feed.poll(since, 1)  # the PACS still answers (else this raises: an outage, and the count stays)
                outcome = _set_aside(work, token, err, passes, _images_now(pacs, key, study.study_uid))
            _failed_passes(work, token, failed=False)
            cursor.advance(study.seq)
            outcomes.append(outcome)
            if on_study is not None:
                on_study(outcome)
        cursor.advance(page.last)  # past the changes that were not stable studies
        if page.done or page.last <= since:
            return outcomes


STATUSES = ("ingested", "refused", "failed", "duplicate")


def watch_pacs(orthanc_url: str | None, work: Path, staging: Path, cfg: IngestConfig, key: bytes,
               tracking_uri: str, model_name: str | None, http_budget_s: float, limit: int = 100,
               on_study: Any = None, segmenter_name: str | None = None, write_seg: bool = True,
               artifact_root: Path | None = None, serve: Any = None) -> list[StudyOutcome]:
    """One pass of :func:`watch_once` against the Orthanc at `orthanc_url` (default
    ``DICOMOPS_PACS_URL``), with credentials from the environment, the champion of `model_name` on
    its exported engine (None: ingest without scoring), the champion of `segmenter_name` adding
    nodule locations and (with `write_seg`) a SEG to the results (None, or no champion: the
    classifier's SR alone) and the volume cache at ``DICOMOPS_REDIS_URL`` when one is set. A pass
    that handled a study (not only met one already handled) is logged (:func:`log_pass`), one that
    an outage stopped too. `serve` (a :class:`dicomops.config.ServeConfig`) says which version
    scores, on which engine and threads, and how long cached volumes live, as for a batch."""
    from dicomops.config import ServeConfig
    from dicomops.serving.cache import VolumeCache

    serve = serve or ServeConfig()
    champion = None
    if model_name is not None:
        from dicomops.serving.champion import load_champion
        from dicomops.serving.segmenter import with_segmenter

        models = WorkLayout(work).serving
        champion = with_segmenter(load_champion(tracking_uri, model_name, alias=serve.alias, engine=serve.engine,
                                                models_dir=models, threads=serve.threads),
                                  tracking_uri, segmenter_name, models, serve.threads, write_seg=write_seg)
    cache = VolumeCache.from_env(ttl_s=serve.cache_ttl_s)
    handled: list[StudyOutcome] = []

    def seen(outcome: StudyOutcome) -> None:
        handled.append(outcome)
        if on_study is not None:
            on_study(outcome)

    stopped = ""
    try:
        with pacs_and_feed(orthanc_url, http_budget_s) as (pacs, feed):
            return watch_once(feed, pacs, staging, work, cfg, key, champion, limit, on_study=seen, cache=cache)
    except BaseException as err:
        stopped = type(err).__name__
        raise
    finally:
        if cache is not None:
            cache.close()
        if any(o.status != "duplicate" for o in handled):  # a study seen again after its answer: no run
            try:
                log_pass(tracking_uri, artifact_root, handled, champion, stopped)
            except Exception as err:  # the ledger is the record; the run is how people look at it
                log.warning("pacs-watch: the pass was not logged to MLflow (%s); WORK/pacs/studies.csv has it",
                            type(err).__name__)


def log_pass(tracking_uri: str, artifact_root: Path | None, outcomes: Sequence[StudyOutcome],
             champion: Any | None, stopped: str = "") -> str:
    """One ``pacs-watch`` run in ``dicomops-inference`` for a pass: how many studies ended in each
    status, the results stored back, the version and engine that answered, and the pass's rows of
    the ledger (tokens, statuses and reasons: no identifier) as ``studies.csv``. `stopped` names the
    error an outage stopped the pass with (the run is then FAILED)."""
    import tempfile

    from dicomops.serving.batch import EXPERIMENT
    from dicomops.tracking import runs

    described = champion.describe() if champion is not None else {"model": "none (ingested, not scored)"}
    tags = {"dicomops.source": "pacs-watch", **({"dicomops.model": champion.name,
                                                 "dicomops.model_version": champion.version,
                                                 "dicomops.engine": champion.engine.choice.kind}
                                                if champion is not None else {})}
    if stopped:
        tags["dicomops.stopped_by"] = f"{stopped} (the next pass starts with the study it stopped at)"
    metrics = {(name if name in ("results_stored", "series_failed") else f"studies_{name}"): float(value)
               for name, value in summarise(outcomes).items()} | {"studies": float(len(outcomes))}
    run_id = runs.start_run(tracking_uri, EXPERIMENT, artifact_root, run_name="pacs-watch", tags=tags,
                            params={**described, "source": "pacs-watch"})
    runs.log_metrics(tracking_uri, run_id, metrics)
    with tempfile.TemporaryDirectory(prefix="dicomops-pass-") as tmp:
        table = pd.DataFrame([asdict(o) for o in outcomes], columns=[c for c in LEDGER_COLUMNS if c != "images"])
        runs.configure_mlflow(tracking_uri).log_artifact(run_id, str(io.write_csv(Path(tmp) / "studies.csv", table)))
    runs.end_run(tracking_uri, run_id, "FAILED" if stopped else "FINISHED")
    return run_id


@contextmanager
def pacs_and_feed(orthanc_url: str | None, http_budget_s: float) -> Iterator[tuple[Any, Any]]:
    """A DICOMweb client and the changes feed of the Orthanc at `orthanc_url` (default
    ``DICOMOPS_PACS_URL``), credentials from the environment, both closed after the block."""
    import os

    from dicomops.pacs.changes import ChangesFeed
    from dicomops.pacs.client import (
        DEFAULT_URL,
        DICOMWEB_ROOT,
        URL_ENV,
        PacsClient,
        credentials_from_env,
        read_timeout_s,
    )

    root = (orthanc_url or os.environ.get(URL_ENV) or DEFAULT_URL).rstrip("/")
    credentials, timeout = credentials_from_env(), read_timeout_s(http_budget_s)
    with PacsClient(root + DICOMWEB_ROOT, credentials, timeout_s=timeout) as pacs, \
            ChangesFeed(root, credentials, timeout_s=timeout) as feed:
        yield pacs, feed


def summarise(outcomes: Sequence[StudyOutcome]) -> dict[str, int]:
    """How many studies ended in each status, how many results were stored back, and how many
    series could not be scored or reported, or the segmenter failed on (``series_failed``;
    ``partly_scored``: the ingested studies answered for their other series, or without the segmenter's
    results for those)."""
    counts = {status: sum(o.status == status for o in outcomes) for status in STATUSES}
    partly = sum(o.status == "ingested" and NOT_ALL_STORED in o.reason for o in outcomes)
    return {**counts, "partly_answered": partly, "results_stored": sum(o.results_stored for o in outcomes),
            "partly_scored": sum(o.status == "ingested" and o.series_failed > 0 for o in outcomes),
            "series_failed": sum(o.series_failed for o in outcomes)}


def describe(summary: Any) -> str:
    """One line for the log: what a pass did with its studies (a :func:`summarise`)."""
    total = sum(summary[status] for status in STATUSES)
    partly, some = summary.get("partly_answered", 0), summary.get("partly_scored", 0)
    notes = [f"{partly} not answered in full: the PACS did not keep every result" if partly else "",
             f"{some} answered for some of their series only" if some else ""]
    ingested = f"{summary['ingested']} ingested" + (f" ({'; '.join(filter(None, notes))})" if any(notes) else "")
    series = summary.get("series_failed", 0)
    not_scored = f"{series} series could not be scored, reported or localised (failed_series names them); " \
        if series else ""
    return (f"{total} stable studies: {ingested}, {summary['refused']} refused by the gate, "
            f"{summary['failed']} failed (see WORK/pacs/studies.csv), {summary['duplicate']} already handled; "
            f"{not_scored}{summary['results_stored']} results stored back")
