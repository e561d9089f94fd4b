"""A study with one series that cannot be scored, through the one path pacs-watch, ``predict --pacs``
and the online service share (:func:`dicomops.serving.predict.answer_staged`, the watch's
:func:`~dicomops.pacs.watch.handle_study`): the whole study failed and nothing went back to the PACS
for its good series (until 2026-12-06). Now the good series is scored and answered, the other is a
failed series of its study with its reason code, named by the gate's pseudonym; a study none of
whose series can be scored still fails with nothing stored; a full disk still stops it. On the tiny
exported champion and synthetic studies (fixed seeds); ``tests/integration/test_pacs_partial.py``
runs the same through a real Orthanc."""

from __future__ import annotations

import errno
import logging
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pandas as pd
import pydicom
import pytest
from pydicom.uid import JPEGBaseline8Bit, generate_uid

from dicomops.deid import scan_for_phi
from dicomops.deid.keys import KeyedMapper
from dicomops.layout import WorkLayout
from dicomops.pacs import watch
from dicomops.serving import predict
from dicomops.serving.champion import Champion, load_champion
from dicomops.serving.predict import Answer, SeriesFailure, answer_staged, remember
from dicomops.synthetic.corpus import SeriesPlan, write_series
from tests.champion_fixture import CONFIG, KEY, TINY, ExportedChampion
from tests.unit.test_real_files import _needles


def partial_study(out: Path, index: int, good: bool = True, bad: int = 1) -> tuple[list[Path], str, list[str]]:
    """A synthetic Philips study (RLE Lossless pixels, fake PHI) under ``out/study``: its series
    (with `good`) and `bad` copies of it, each a series of the same study whose transfer syntax says
    JPEG Baseline over the RLE fragments: the gate accepts them (it reads headers), their pixels never
    decode (``unreadable_pixels``). Returns the study's files, the good series' UID ('' without one)
    and the bad series' UIDs."""
    plan = SeriesPlan(index=index, seed=17, scenario="baseline", vendor="philips", label=0, nodule_count=0,
                      fault=None, fault_detail="", matrix=128, slices=12)
    write_series(plan, out / "src")
    source = sorted(p for p in (out / "src" / plan.case / "series-1").iterdir() if p.is_file())
    study = out / "study"
    good_uid = ""
    if good:
        (study / "series-1").mkdir(parents=True)
        for f in source:
            shutil.copy(f, study / "series-1" / f.name)
        good_uid = str(pydicom.dcmread(source[0], stop_before_pixels=True).SeriesInstanceUID)
    bad_uids = []
    for i in range(bad):
        series = generate_uid(entropy_srcs=[f"partial-{index}-bad-{i}"])
        bad_uids.append(series)
        for k, f in enumerate(source):
            ds = pydicom.dcmread(f)
            ds.SeriesInstanceUID, ds.SeriesNumber = series, 3 + i
            ds.SOPInstanceUID = generate_uid(entropy_srcs=[f"partial-{index}-bad-{i}-{k}"])
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
            path = study / f"series-bad-{i}" / f.name
            path.parent.mkdir(parents=True, exist_ok=True)
            ds.save_as(path, enforce_file_format=False)
    shutil.rmtree(out / "src")
    return sorted(p for p in study.rglob("*") if p.is_file()), good_uid, bad_uids


class FolderPacs:
    """What the watch and the online service ask of a PACS (list a study's images, retrieve it
    whole, store results), over files in memory's reach; results stored are kept in `stored`."""

    def __init__(self, files: list[Path]) -> None:
        self.files, self.stored = list(files), []  # type: ignore[var-annotated]

    def _study(self, study_uid: str) -> list[tuple[Path, Any]]:
        headers = ((f, pydicom.dcmread(f, stop_before_pixels=True)) for f in self.files)
        return [(f, ds) for f, ds in headers if str(ds.StudyInstanceUID) == study_uid]

    def image_instances(self, study_uid: str) -> dict[str, str]:
        return {str(ds.SOPInstanceUID): str(ds.SeriesInstanceUID) for _, ds in self._study(study_uid)}

    def retrieve_study(self, study_uid: str, dest: Path) -> list[Path]:
        Path(dest).mkdir(parents=True)
        out = []
        for i, (f, _) in enumerate(self._study(study_uid)):
            out.append(Path(shutil.copy(f, Path(dest) / f"{i:05d}.dcm")))
        return out

    def store(self, datasets: Any) -> list[str]:
        self.stored.extend(datasets)
        return [str(ds.SOPInstanceUID) for ds in datasets]


def study_uid_of(files: list[Path]) -> str:
    return str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)


def evidence_series(report: Any) -> set[str]:
    """The series an SR says it answers (its evidence)."""
    return {str(s.SeriesInstanceUID) for e in report.CurrentRequestedProcedureEvidenceSequence
            for s in e.ReferencedSeriesSequence}


@pytest.fixture(scope="module")
def champion(exported_champion: ExportedChampion, tmp_path_factory: pytest.TempPathFactory) -> Champion:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DICOMOPS_MLFLOW_ARTIFACT_ROOT", str(exported_champion.artifacts))
        return load_champion(exported_champion.uri, TINY.model_name, models_dir=tmp_path_factory.mktemp("models"))


def test_one_series_that_cannot_be_scored_fails_alone_and_the_other_is_scored(champion: Champion,
                                                                              tmp_path: Path) -> None:
    files, good, (bad,) = partial_study(tmp_path, index=61)
    answer, entries = answer_staged("ST-PARTIAL", tmp_path / "study", tmp_path / "w", CONFIG.ingest, KEY, champion)
    mapper = KeyedMapper(KEY)
    assert (answer.status, answer.accepted_series, answer.reason) == ("scored", 2, ""), answer
    (finding,) = answer.findings
    assert finding.series == mapper.uid(good) and 0.0 <= finding.score <= 1.0 and finding.slices > 0
    assert [(f.series, f.reason) for f in answer.failed_series] == [(mapper.uid(bad), "unreadable_pixels")]
    assert [e["series"] for e in entries] == [mapper.uid(good)]
    # A warm answer would name only the manifest's series: a study with a failed one keeps none.
    kept: list[Any] = []
    remember(SimpleNamespace(put_manifest=lambda digest, manifest: kept.append(manifest)), "d", answer, entries)
    assert kept == []
    needles = _needles(files)
    assert {good, bad} <= needles and not [n for n in needles if n in repr(answer.as_dict())]


def test_the_watch_answers_the_good_series_and_records_the_failed_one_once(
        champion: Champion, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    files, good, (bad,) = partial_study(tmp_path, index=63)
    pacs, work, staging = FolderPacs(files), tmp_path / "work", tmp_path / "staging"
    study = study_uid_of(files)
    mapper = KeyedMapper(KEY)
    with caplog.at_level(logging.INFO, logger="dicomops"):
        outcome = watch.handle_study(study, pacs, staging, work, CONFIG.ingest, KEY, champion)
    assert (outcome.status, outcome.accepted_series, outcome.results_stored, outcome.series_failed) == \
        ("ingested", 2, 1, 1), outcome
    assert outcome.failed_series == f"{mapper.uid(bad)}:unreadable_pixels"
    assert outcome.reason.startswith("1 of its 2 series not scored: unreadable_pixels (1), the others answered")
    (report,) = pacs.stored  # the good series' SR; nothing for the other
    assert report.Modality == "SR" and evidence_series(report) == {good}
    ledger = pd.read_csv(WorkLayout(work).pacs.ledger, keep_default_na=False)
    (row,) = ledger.to_dict("records")
    assert (row["status"], row["series_failed"], row["failed_series"]) == \
        ("ingested", 1, f"{mapper.uid(bad)}:unreadable_pixels")
    results = pd.read_csv(WorkLayout(WorkLayout(work).pacs.root).predictions(outcome.token) / "results.csv",
                          keep_default_na=False).set_index("series")
    assert results.loc[mapper.uid(good)].status == "scored"
    assert results.loc[mapper.uid(bad)].reason == "series not scored: unreadable_pixels"
    summary = watch.summarise([outcome])
    assert (summary["ingested"], summary["partly_scored"], summary["series_failed"]) == (1, 1, 1)
    said = watch.describe(summary)
    assert "1 ingested (1 answered for some of their series only)" in said and "1 series could not be scored" in said
    # Seen again as it is (its SR stored makes it change in a real PACS): handled, not answered again.
    again = watch.handle_study(study, pacs, staging, work, CONFIG.ingest, KEY, champion)
    assert again.status == "duplicate" and len(pacs.stored) == 1
    needles = _needles(files)
    assert scan_for_phi(work, needles) == [] and not [n for n in needles if n in caplog.text]
    assert f"series not answered in full: {mapper.uid(bad)}:unreadable_pixels" in caplog.text
    assert list(staging.glob("*")) == []


def test_a_study_none_of_whose_series_can_be_scored_fails_and_nothing_is_stored(champion: Champion,
                                                                                tmp_path: Path) -> None:
    files, good, bad = partial_study(tmp_path, index=65, good=False, bad=2)
    assert good == "" and len(bad) == 2
    answer, entries = answer_staged("ST-NONE", tmp_path / "study", tmp_path / "w", CONFIG.ingest, KEY, champion)
    mapper = KeyedMapper(KEY)
    assert (answer.status, answer.findings, entries) == ("failed", [], [])
    assert answer.reason == "none of its series could be scored: unreadable_pixels (2)"
    assert sorted(f.series for f in answer.failed_series) == sorted(mapper.uid(b) for b in bad)
    pacs, work = FolderPacs(files), tmp_path / "work"
    outcome = watch.handle_study(study_uid_of(files), pacs, tmp_path / "staging", work, CONFIG.ingest, KEY, champion)
    assert (outcome.status, outcome.results_stored, outcome.series_failed) == ("failed", 0, 2)
    assert outcome.reason == "none of its series could be scored: unreadable_pixels (2); not answered"
    assert pacs.stored == [] and watch.handled_tokens(work) == {outcome.token}
    assert scan_for_phi(work, _needles(files)) == []


def test_a_full_disk_while_a_series_is_preprocessed_still_stops_the_study_as_an_outage(
        champion: Champion, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Not the series' doing: failed alone, every series behind it would fail the same way."""
    files, _, _ = partial_study(tmp_path, index=67)

    def full(*args: Any, **kwargs: Any) -> Any:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(predict, "preprocess_series", full)
    with pytest.raises(OSError, match="No space left"):
        answer_staged("ST-FULL", tmp_path / "study", tmp_path / "w", CONFIG.ingest, KEY, champion)
    pacs, work = FolderPacs(files), tmp_path / "work"
    with pytest.raises(OSError, match="No space left"):
        watch.handle_study(study_uid_of(files), pacs, tmp_path / "staging", work, CONFIG.ingest, KEY, champion)
    assert watch.handled_tokens(work) == set() and pacs.stored == []


def test_a_study_answered_in_part_elsewhere_is_left_for_the_watch_to_answer_once(tmp_path: Path) -> None:
    """A batch's or the online service's answer with a series not scored is not the watch's
    ``answered`` row: the watch answers it itself, once, and its own row names the failed series."""
    partial = Answer("ST-X", "scored", [], 2, results_stored=1,
                     failed_series=[SeriesFailure("2.25.1", "Philips", "unreadable_pixels")])
    assert not watch.record_answered(tmp_path, partial, "the online service")
    assert not WorkLayout(tmp_path).pacs.ledger.exists()
