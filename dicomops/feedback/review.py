"""The review endpoint's logic: a configured reader accepts, rejects or corrects a result.

For sites without a viewer that writes SR or SEG back to the PACS. The reader names the series by
its own (original) SeriesInstanceUID, as their worklist shows it; the service turns it into the
training side's pseudonymous UID with the de-identification key, finds the result the platform gave
for that series (:meth:`WorkLayout.result_tables`: batches, the online service, pacs-watch), and
stores the judgement with its provenance. The original UID is never stored, logged or echoed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from dicomops.deid.keys import KeyedMapper
from dicomops.feedback.store import (
    VERDICTS,
    FeedbackStore,
    Reviewers,
    UnknownReaderError,
    make_item,
)
from dicomops.layout import WorkLayout

UID = re.compile(r"[0-9]+(\.[0-9]+)*")  # whole string: fullmatch (a `$` lets a final newline through)
BODY = ('send JSON {"reader": "<your reviewer id>", "series_instance_uid": "<the series UID>", '
        '"verdict": "accept" | "reject" | "correct", "label": 0 | 1 (with correct), '
        '"version": "<n>" (the version on the report you read; needed when several versions scored the series)}')


class ReviewError(Exception):
    """A refused review: its HTTP status and what the reader should change. Nothing was stored."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


@dataclass(frozen=True)
class ServedResult:
    model: str
    version: str
    score: float
    present: bool
    manufacturer: str


@dataclass(frozen=True)
class ServedLocalisation:
    """The segmenter's answer for a series in the PACS: its call and the mask it served."""

    model: str
    version: str
    score: float
    present: bool
    mask: Path  # the served mask (dicomops.feedback.seg.ServedMask); not a file where none was kept


def latest_localisation(work: Path, series: str) -> ServedLocalisation | None:
    """The segmenter's newest answer for `series` (pseudonymous UID) in the results tables, or None
    where it never answered it (no segmenter then, or its results not written back), or where
    several of its versions did: a reader's SEG names the images it lies over, not the SEG it
    corrects, so it cannot say which version's mask it corrects (the review endpoint asks; a
    SEG cannot be asked)."""
    found: list[ServedLocalisation] = []
    for path in reversed(WorkLayout(work).result_tables()):
        table = pd.read_csv(path, keep_default_na=False, dtype={"segmenter_version": str})
        if "segmenter" not in table:
            continue
        hit = table[(table.get("series", pd.Series(dtype=str)) == series) & (table.segmenter != "")]
        found += [ServedLocalisation(str(row.segmenter), str(row.segmenter_version), float(row.segmenter_score),
                                     str(row.segmenter_present).lower() in ("true", "1"),
                                     path.parent / str(row.segmenter_mask)) for row in hit.iloc[::-1].itertuples()]
    if not found or len({(f.model, f.version) for f in found}) > 1:
        return None
    return found[0]


def served_results(work: Path, series: str, newest_only: bool = False) -> list[ServedResult]:
    """Every result any batch or the online service gave for `series` (pseudonymous UID), newest
    first (`newest_only`: the first table that holds one is read, none after it)."""
    found = []
    for path in reversed(WorkLayout(work).result_tables()):
        table = pd.read_csv(path, keep_default_na=False, dtype={"version": str})
        hit = table[(table.get("series", pd.Series(dtype=str)) == series) & (table.status == "scored")]
        found += [ServedResult(str(row.model), str(row.version), float(row.score),
                               str(row.present).lower() in ("true", "1"), str(row.manufacturer))
                  for row in hit.iloc[::-1].itertuples()]
        if newest_only and found:
            break
    return found


def latest_result(work: Path, series: str) -> ServedResult | None:
    """The newest result any batch or the online service gave for `series` (pseudonymous UID)."""
    results = served_results(work, series, newest_only=True)
    return results[0] if results else None


def submit(body: Any, bearer: str, reviewers: Reviewers, work: Path, key: bytes) -> dict[str, Any]:
    """Check, link and store one reader's judgement; return what was stored (no original UID).

    The judgement is of the result the reader read: the one version that scored the series, or the
    version the body names (``version``) when several did; an accept or a reject means nothing
    without it.

    Raises:
        ReviewError: 400 a malformed body, 401 an unknown reader or a wrong token, 404 a series this
            service never scored (or never with the version named), 409 a series several versions
            scored and a body that does not say which. Nothing is stored on any of them.
    """
    if not isinstance(body, dict):
        raise ReviewError(400, BODY)
    reader, uid, verdict = body.get("reader"), body.get("series_instance_uid"), body.get("verdict")
    if not isinstance(reader, str) or not isinstance(uid, str) or not UID.fullmatch(uid) or len(uid) > 64 \
            or verdict not in VERDICTS:
        raise ReviewError(400, BODY)
    label = body.get("label")
    if label is not None and (isinstance(label, bool) or label not in (0, 1)):
        raise ReviewError(400, "label must be 0 (no nodule) or 1 (nodule)")
    version = body.get("version")
    if version is not None and (isinstance(version, bool) or not isinstance(version, str | int)
                                or not str(version).strip().isdigit()):
        raise ReviewError(400, 'version must be the number of the model version whose result you judge, e.g. "3"')
    try:
        role = reviewers.authenticate(reader, bearer)
    except UnknownReaderError as err:
        raise ReviewError(401, f"{err}: send 'Authorization: Bearer <your reviewer token>' and your reviewer id "
                               "(feedback.reviewers and DICOMOPS_REVIEWER_TOKENS where the service runs)") from None
    series = KeyedMapper(key).uid(uid)
    results = served_results(work, series)
    if not results:
        raise ReviewError(404, "this service has no result for that series; review a series it has scored")
    versions = sorted({r.version for r in results}, key=lambda v: (len(v), v))
    if version is not None:
        results = [r for r in results if r.version == str(version).strip()]
        if not results:
            raise ReviewError(404, f"no result of version {str(version).strip()} for that series; the versions that "
                                   f"scored it: {', '.join(versions)}")
    elif len(versions) > 1:
        raise ReviewError(409, f"versions {', '.join(versions)} scored that series; say which result you judge: add "
                               f'"version": "<n>" (the version on the report you read)')
    result = results[0]
    try:
        item = make_item(reader=reader, role=role, source="endpoint", verdict=str(verdict), series=series,
                         vendor=result.manufacturer, model=result.model, version=result.version,
                         model_label=int(result.present), model_score=result.score, reader_label=label)
    except ValueError as err:
        raise ReviewError(400, str(err)) from None
    FeedbackStore(work).add([item])
    return {"stored": True, "item": item["item"], "model": result.model, "version": result.version,
            "model_label": item["model_label"], "reader_label": item["reader_label"], "changed": item["changed"]}
