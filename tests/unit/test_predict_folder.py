"""The folder path of batch prediction without a model: each study of a folder judged on its own
share of the gate (the header of a quarantined file still names its study), a folder whose every
file is quarantined still answered study by study, result counts kept whole, and the command's exit
status when a study was refused or failed."""

from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pandas as pd
import pydicom
import pytest
from pydicom.dataset import FileMetaDataset
from typer.testing import CliRunner

from dicomops import ingest
from dicomops.cli import app
from dicomops.config import IngestConfig, SynthConfig
from dicomops.deid import scan_for_phi
from dicomops.deid.keys import KeyedMapper
from dicomops.serving.batch import REFUSED_BATCH, gate_by_study, predict_folder, study_of_file
from dicomops.serving.predict import Answer, SeriesFailure, SeriesFinding, result_table
from dicomops.synthetic import generate_corpus
from tests.conftest import SMALL

KEY = b"predict-folder-key-0123456789abcdef"
CFG = IngestConfig(workers=1, max_invalid_fraction=0.2)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("predict-folder") / "corpus"
    generate_corpus(out, SynthConfig(patients=4, seed=23, fault_rate=0.0, **SMALL))
    return out


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def _study(case: Path) -> str:
    return str(pydicom.dcmread(_files(case)[0], stop_before_pixels=True).StudyInstanceUID)


def _needles(corpus: Path) -> set[str]:
    phi = pd.read_csv(corpus / "phi.csv", keep_default_na=False)
    labels = pd.read_csv(corpus / "labels.csv", keep_default_na=False)
    return set(phi.value) | set(labels.SeriesInstanceUID) | set(labels.StudyInstanceUID)


def _truncated(case: Path, dest: Path, preamble: bool = True) -> None:
    """Every file of the study cut to a third; without `preamble`, first written as a bare dataset
    (no preamble, no file meta), so that only pydicom, not the gate's narrow reader, reads its header."""
    for f in _files(case):
        out = dest / f.relative_to(case)
        out.parent.mkdir(parents=True, exist_ok=True)
        if not preamble:
            ds = pydicom.dcmread(f)
            if ds.file_meta.TransferSyntaxUID.is_compressed:
                ds.decompress()
            ds.preamble, ds.file_meta = None, FileMetaDataset()
            ds.save_as(out, enforce_file_format=False, implicit_vr=True, little_endian=True)
            data = out.read_bytes()
        else:
            data = f.read_bytes()
        out.write_bytes(data[: len(data) // 3])


def test_each_study_is_held_to_the_gate_share_on_its_own_files(corpus: Path, tmp_path: Path) -> None:
    """A folder with two good studies, a study of truncated files (one with, one without preamble),
    a PET study and two files that are not DICOM: 50 of 62 files are quarantined, far above the
    share, yet the good studies pass; each bad study is refused with its own reasons under the
    gate's pseudonym of its UID; the files that name no study are counted apart."""
    cases = sorted(corpus.glob("case-*"))
    folder = tmp_path / "in"
    for case in cases[:2]:
        shutil.copytree(case, folder / case.name)
    _truncated(cases[2], folder / "cut")
    _truncated(cases[3], folder / "bare", preamble=False)
    pet = folder / "pet"
    for f in _files(cases[0] / "series-1"):
        ds = pydicom.dcmread(f)
        ds.Modality, ds.StudyInstanceUID = "PT", "1.2.826.0.1.3680043.8.498.4242"
        ds.SeriesInstanceUID, ds.SOPInstanceUID = "1.2.826.0.1.3680043.8.498.4243", pydicom.uid.generate_uid()
        pet.mkdir(parents=True, exist_ok=True)
        ds.save_as(pet / f.name)
    for i in range(2):
        (folder / f"junk-{i}.txt").write_bytes(b"not DICOM " * 30)
    work = tmp_path / "work"
    gate = ingest.run(folder, work, CFG.model_copy(update={"max_invalid_fraction": 1.0}), KEY)
    assert gate.quarantined_share > CFG.max_invalid_fraction  # the folder as one batch would be refused
    studies, unread = gate_by_study(folder, work, CFG, KEY)
    mapper = KeyedMapper(KEY)
    verdicts = {s.study: s for s in studies}
    assert set(verdicts) == {mapper.uid(u) for u in (*map(_study, cases), "1.2.826.0.1.3680043.8.498.4242")}
    for case in cases[:2]:
        good = verdicts[mapper.uid(_study(case))]
        assert (good.refusal, good.quarantined, good.accepted_series, good.files) == ("", 0, 1, 12)
    for case, reason in ((cases[2], "truncated"), (cases[3], "truncated")):
        bad = verdicts[mapper.uid(_study(case))]
        assert (bad.files, bad.quarantined, bad.accepted_series, bad.reasons) == (12, 12, 0, {reason: 12})
        assert f"12 of the study's 12 files quarantined (100.0%), above the allowed 20.0%. Top reasons: {reason} (12)" \
            in bad.refusal
    assert verdicts[mapper.uid("1.2.826.0.1.3680043.8.498.4242")].reasons == {"wrong_modality": 12}
    assert unread == {"not_dicom": 2}
    # The worker reads what the gate's index reads: the same pseudonym for a file the gate accepted.
    index = pd.read_parquet(work / "ingest" / "index.parquet").set_index("source_path")
    rel = str(_files(folder / cases[0].name)[0].relative_to(folder))
    assert study_of_file(str(folder / rel), rel, KEY) == index.loc[rel, "StudyInstanceUID"]
    assert study_of_file(str(folder / "junk-0.txt"), "junk-0.txt", KEY) == ""
    needles = _needles(corpus) | {"1.2.826.0.1.3680043.8.498.4242"}
    assert not [n for n in needles if n in repr((studies, unread))]


@pytest.mark.parametrize(("share", "why"), [(0.2, "12 of the study's 12 files quarantined (100.0%)"),
                                            (1.0, "no series passed the ingest gate")])
def test_a_folder_whose_every_file_is_quarantined_is_answered_study_by_study(share: float, why: str, corpus: Path,
                                                                             tmp_path: Path) -> None:
    """Nothing to score (the model is never asked), but each study says why, under its pseudonym,
    even where the setting allows every file to be quarantined; the gate's scratch, which holds the
    source paths, is gone."""
    cases = sorted(corpus.glob("case-*"))
    folder = tmp_path / "in"
    for case in cases[:2]:
        _truncated(case, folder / case.name)
    work = tmp_path / "work"
    cfg = CFG.model_copy(update={"max_invalid_fraction": share})
    answers = predict_folder(folder, work, cfg, KEY, champion=None)  # type: ignore[arg-type]
    mapper = KeyedMapper(KEY)
    assert [(a.study, a.status, a.quarantined_files) for a in answers] == sorted(
        (mapper.uid(_study(c)), "refused", 12) for c in cases[:2])
    assert all(why in a.reason and "Top reasons: truncated (12)" in a.reason for a in answers)
    assert not (work / "gate").exists()
    assert not [n for n in _needles(corpus) if n in repr(answers)]
    assert scan_for_phi(work, _needles(corpus)) == []


def test_a_folder_with_nothing_to_score_is_refused_whole(tmp_path: Path) -> None:
    """No file at all, or only files that name no study: one ``(batch)`` answer that says which."""
    empty = tmp_path / "empty"
    empty.mkdir()
    [answer] = predict_folder(empty, tmp_path / "work", CFG, KEY, champion=None)  # type: ignore[arg-type]
    assert (answer.study, answer.status) == (REFUSED_BATCH, "refused") and "holds no files to ingest" in answer.reason
    junk = tmp_path / "junk"
    junk.mkdir()
    for i in range(2):
        (junk / f"junk-{i}.txt").write_bytes(b"not DICOM " * 30)
    [answer] = predict_folder(junk, tmp_path / "work", CFG, KEY, champion=None)  # type: ignore[arg-type]
    assert (answer.study, answer.status, answer.quarantined_files) == (REFUSED_BATCH, "refused", 2)
    assert "2 of 2 files quarantined and none names its study" in answer.reason
    assert "not_dicom (2)" in answer.reason and not (tmp_path / "work/gate").exists()


def test_counts_stay_whole_numbers_beside_a_row_without_a_score(tmp_path: Path) -> None:
    """``slices`` (the resampled volume's) and ``best_z`` were written 119.0 and 0.0 as soon as one
    row had no score (until 2026-12-06)."""
    champion: Any = SimpleNamespace(threshold=0.5, name="m", version="3", engine=SimpleNamespace(
        choice=SimpleNamespace(kind="ort-fp32")))
    answers = [Answer("2.25.1", "scored", [SeriesFinding("2.25.2", "GE", 119, 0.75, True, 0, "off")],
                      failed_series=[SeriesFailure("2.25.3", "GE", "unreadable_pixels")]),
               Answer("2.25.4", "refused", reason="12 of the study's 12 files quarantined")]
    table = result_table(answers, champion)
    assert str(table.slices.dtype) == str(table.best_z.dtype) == "Int64"
    table.to_csv(tmp_path / "results.csv", index=False)
    back = pd.read_csv(tmp_path / "results.csv", keep_default_na=False, dtype=str)
    assert back.slices.tolist() == ["119", "", ""] and back.best_z.tolist() == ["0", "", ""]
    assert back.status.tolist() == ["scored", "failed", "refused"]
    assert back.reason[1] == "series not scored: unreadable_pixels" and back.series[1] == "2.25.3"


RESULT = {"studies_scored": 2.0, "studies_refused": 0.0, "studies_failed": 0.0, "series_failed": 0.0,
          "engine": "ort-fp32", "engine_reason": "test", "results": "r.csv", "mlflow_run_id": "x"}


@pytest.mark.parametrize(("counts", "code"), [({}, 0), ({"studies_refused": 1.0}, 1), ({"studies_failed": 1.0}, 1),
                                              ({"series_failed": 1.0}, 1)])
def test_predict_exits_1_when_a_study_or_series_was_not_scored(counts: dict[str, float], code: int, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """As `dicomops ingest` does when the gate fails; it said "predict finished" and exited 0 (until 2026-12-06)."""
    import dicomops.cli as cli

    def flows(name: str, dask_address: str | None = None) -> Any:
        return lambda **parameters: {**RESULT, **counts}

    monkeypatch.setattr(cli, "_flow", flows)
    result = CliRunner().invoke(app, ["predict", str(tmp_path)], env={"COLUMNS": "200"})
    said = " ".join(result.output.split())
    assert result.exit_code == code, result.output
    assert ("not everything was answered" in said) == bool(code)
    assert "2 studies scored" in said
