"""A series a site would send whose classifier's SR cannot be written, with nothing patched: its
images declare their Specific Character Set by a codec's name (``windows-1252``: no term PS3.3
defines, and it names none) over an operator's name that is not ASCII. The ingest gate accepts it
(pydicom reads it with that codec) and the model scores it; the SR writer refuses it, for that
series alone (:func:`dicomops.pacs.results._source_character_set`: how its text is written is not
certain), so the watch answers the study's other series and names this one
``report_failed:ValueError``. A study none of whose SRs could be written is ``failed``; its ledger
row said 0 series accepted (until 2026-12-07) while its ``series_failed`` said 2 and the gate had
accepted and the model scored both: it says 2 now, as the row of a study none of whose series
could be scored does. ``tests/integration/test_pacs_report_failure.py`` runs the same through a
real Orthanc."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pydicom
import pytest

from dicomops.deid.keys import KeyedMapper
from dicomops.layout import WorkLayout
from dicomops.pacs import watch
from dicomops.pacs.results import Finding, structured_report
from dicomops.serving.champion import Champion
from tests.champion_fixture import CONFIG, KEY, TINY
from tests.unit.test_partial_study import FolderPacs, study_uid_of
from tests.unit.test_segmenter_failure import SEGMENTER, by_kind, champion, two_series_study  # noqa: F401

UNDEFINED_CHARSET = "windows-1252"  # a codec's name, as some consoles write it: no term PS3.3 defines
OPERATOR = "Müller^Jürgen"  # not ASCII: under the term the scanner meant it could read otherwise
CODE = "report_failed:ValueError"


def refusing_study(out: Path, index: int, refused: int) -> tuple[list[Path], list[str]]:
    """:func:`two_series_study` (siemens, two nodules the density segmenter finds in each series)
    whose first `refused` series declare :data:`UNDEFINED_CHARSET` over :data:`OPERATOR`, as a
    console that writes its codec's name would. Returns the study's files and its two series' UIDs
    (the refused first)."""
    files, series = two_series_study(out, index)
    for path in files:
        ds = pydicom.dcmread(path)
        if str(ds.SeriesInstanceUID) in series[:refused]:
            ds.SpecificCharacterSet, ds.OperatorsName = UNDEFINED_CHARSET, OPERATOR
            ds.save_as(path, enforce_file_format=False)
    return files, series


def test_the_header_value_is_what_the_writer_refuses_and_only_for_its_series(tmp_path: Path) -> None:
    """Not vacuous: the writer refuses exactly the changed series, and reads the name as written."""
    files, (refused, other) = refusing_study(tmp_path, index=119, refused=1)
    images: dict[str, list[pydicom.Dataset]] = {}
    for path in files:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        images.setdefault(str(ds.SeriesInstanceUID), []).append(ds)
    assert str(images[refused][0].OperatorsName) == OPERATOR
    finding = Finding(present=False, score=0.2, threshold=0.5, model_name=TINY.model_name, model_version="1")
    assert structured_report(images[other], finding).SOPInstanceUID
    with pytest.raises(ValueError, match=r"SpecificCharacterSet is not a term PS3\.3") as refusal:
        structured_report(images[refused], finding)
    assert "Müller" not in str(refusal.value) and UNDEFINED_CHARSET not in str(refusal.value)


def test_the_watch_answers_the_other_series_and_names_the_refused_one(champion: Champion,  # noqa: F811
                                                                      tmp_path: Path) -> None:
    files, (refused, other) = refusing_study(tmp_path, index=121, refused=1)
    pacs, work = FolderPacs(files), tmp_path / "work"
    outcome = watch.handle_study(study_uid_of(files), pacs, tmp_path / "staging", work, CONFIG.ingest, KEY, champion)
    assert (outcome.status, outcome.accepted_series, outcome.results_stored, outcome.series_failed,
            outcome.failed_series) == ("ingested", 2, 3, 1, f"{KeyedMapper(KEY).uid(refused)}:{CODE}"), outcome
    assert by_kind(pacs.stored) == {("SR", TINY.model_name): {other}, ("SR", SEGMENTER): {other},
                                    ("SEG", SEGMENTER): {other}}


def test_a_study_none_of_whose_srs_can_be_written_is_recorded_with_the_series_the_gate_accepted(
        champion: Champion, tmp_path: Path) -> None:  # noqa: F811
    files, series = refusing_study(tmp_path, index=123, refused=2)
    pacs, work = FolderPacs(files), tmp_path / "work"
    outcome = watch.handle_study(study_uid_of(files), pacs, tmp_path / "staging", work, CONFIG.ingest, KEY, champion)
    assert (outcome.status, outcome.accepted_series, outcome.quarantined_files, outcome.results_stored,
            outcome.series_failed) == ("failed", 2, 0, 0, 2), outcome
    assert outcome.reason.startswith(f"no report could be written: {CODE} (2); not answered")
    assert sorted(outcome.failed_series.split(";")) == sorted(f"{KeyedMapper(KEY).uid(s)}:{CODE}" for s in series)
    (row,) = pd.read_csv(WorkLayout(work).pacs.ledger, keep_default_na=False).to_dict("records")
    assert (row["status"], row["accepted_series"], row["series_failed"]) == ("failed", 2, 2)
    assert pacs.stored == []
