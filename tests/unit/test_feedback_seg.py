"""A reader's corrected SEG becomes a nodule mask in the pool's format, on the right slices whatever
order the series comes in; it reaches the pool in place of the generator's mask, with its records."""

from __future__ import annotations

import datetime as dt
import json
import math
from io import BytesIO
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest

from dicomops.config import FeedbackConfig
from dicomops.feedback import store
from dicomops.feedback.pacs import read_assessment, read_report, revise
from dicomops.feedback.seg import (
    ReaderMask,
    corrected_segmentation,
    is_ours,
    read_correction,
    reader_mask,
)
from dicomops.feedback.stage import apply_to_pool, write_labels
from dicomops.feedback.store import FeedbackStore
from dicomops.pacs.results import Finding, encode, segmentation, structured_report
from dicomops.preprocessing.stage import _aligned_mask
from dicomops.synthetic.corpus import SeriesPlan, write_series

ADA = "Lovelace^Ada"
KEY = b"unit-test-key-0123456789abcdef0123"


@pytest.fixture(scope="module")
def series(tmp_path_factory: pytest.TempPathFactory) -> list[pydicom.Dataset]:
    out = tmp_path_factory.mktemp("seg-source")
    plan = SeriesPlan(index=3, seed=17, scenario="baseline", vendor="siemens", label=0, nodule_count=0,
                      fault=None, fault_detail="", matrix=64, slices=12)
    write_series(plan, out)
    return [pydicom.dcmread(p) for p in sorted((out / plan.case / "series-1").iterdir())]


def _round_trip(ds: pydicom.Dataset) -> pydicom.Dataset:
    return pydicom.dcmread(BytesIO(encode(ds)))


def _z(ds: pydicom.Dataset) -> float:
    return float(ds.ImagePositionPatient[2])


def test_a_readers_seg_becomes_instance_ids_on_the_right_slices(series: list[pydicom.Dataset]) -> None:
    frames = np.zeros((len(series), 64, 64), dtype=bool)  # frame k lies on series[k] (file order)
    by_z = np.argsort([_z(s) for s in series])
    for k in by_z[4:7]:  # a 5 x 5 x 3 nodule on three neighbouring slices
        frames[k, 20:25, 30:35] = True
    frames[by_z[10], 50:52, 10:12] = True  # and a second, small one, far from it
    seg = _round_trip(corrected_segmentation(series, frames, ADA))

    correction = read_correction(seg)
    assert not isinstance(correction, str) and not is_ours(seg)
    assert (correction.reader, correction.series_uid) == (ADA, str(series[0].SeriesInstanceUID))
    assert correction.at is not None and abs(correction.at - dt.datetime.now(dt.UTC)) < dt.timedelta(hours=1)

    shuffled = [series[i] for i in np.random.default_rng(0).permutation(len(series))]
    drawn = reader_mask(seg, shuffled)
    assert drawn.mask.shape == (12, 64, 64) and list(drawn.ipp_z) == sorted(_z(s) for s in series)
    for k, z in enumerate(drawn.ipp_z):  # each slice's voxels are the ones drawn on the image at that z
        source = next(i for i, s in enumerate(series) if _z(s) == z)
        assert np.array_equal(drawn.mask[k] > 0, frames[source])
    assert sorted(np.unique(drawn.mask).tolist()) == [0, 1, 2] and len(drawn.nodules) == 2
    big = next(n for n in drawn.nodules if n["diameter_mm"] > 3)
    spacing = [float(v) for v in series[0].PixelSpacing]
    thickness = float(np.median(np.diff(sorted(_z(s) for s in series))))
    expected = (6 * 75 * spacing[0] * spacing[1] * thickness / math.pi) ** (1 / 3)
    assert big["diameter_mm"] == pytest.approx(expected, rel=0.01) and big["actionable"] is True
    origin = np.asarray(series[0].ImagePositionPatient, float)
    assert big["center_mm"][0] == pytest.approx(origin[0] + 32 * spacing[1], abs=0.01)  # columns 30..34
    assert big["center_mm"][1] == pytest.approx(origin[1] + 22 * spacing[0], abs=0.01)  # rows 20..24


def test_segs_that_are_not_a_readers_correction_say_why(series: list[pydicom.Dataset]) -> None:
    frames = np.zeros((len(series), 64, 64), dtype=bool)
    frames[5, 10:14, 10:14] = True
    unsigned = corrected_segmentation(series, frames, ADA)
    del unsigned.ContentCreatorName
    assert read_correction(_round_trip(unsigned)) == "no_content_creator"
    ours = segmentation(series, frames, Finding(present=True, score=0.9, threshold=0.5,
                                                model_name="dicomops-nodule", model_version="2"))
    assert is_ours(_round_trip(ours))
    # A viewer that builds the reader's SEG from ours may keep our Manufacturer: still the reader's.
    copied = corrected_segmentation(series, frames, ADA)
    copied.Manufacturer = ours.Manufacturer
    assert not is_ours(_round_trip(copied)) and not isinstance(read_correction(_round_trip(copied)), str)
    with pytest.raises(ValueError, match="no source headers"):
        reader_mask(_round_trip(corrected_segmentation(series, frames, ADA)), [])


def test_a_readers_revision_that_kept_our_manufacturer_is_read_as_the_readers(series: list[pydicom.Dataset]) -> None:
    """A viewer that builds the reader's revision by copying our SR may keep our General Equipment:
    it is still a revision (it names its predecessor and is verified), never our report."""
    report = _round_trip(structured_report(series, Finding(present=True, score=0.9, threshold=0.5,
                                                           model_name="dicomops-nodule", model_version="2")))
    assert read_report(report) is not None
    revision = revise(report, present=False, reader=ADA)
    revision.Manufacturer = report.Manufacturer
    revision = _round_trip(revision)
    assert read_report(revision) is None
    assessment = read_assessment(revision)
    assert not isinstance(assessment, str) and assessment.present is False
    assert assessment.predecessor == str(report.SOPInstanceUID)


def test_a_readers_mask_replaces_the_pools_and_can_be_applied_again(series: list[pydicom.Dataset],
                                                                    tmp_path: Path) -> None:
    frames = np.zeros((len(series), 64, 64), dtype=bool)
    for k in np.argsort([_z(s) for s in series])[3:6]:
        frames[k, 30:36, 30:36] = True
    drawn = reader_mask(_round_trip(corrected_segmentation(series, frames, ADA)), series)
    feedback = tmp_path / "work"
    drawn.save(feedback / "feedback/masks/t1.npz")
    item = store.make_item(reader=ADA, role="senior", source="pacs-seg", verdict="correct", series="2.25.7",
                           vendor="SIEMENS", model="m", version="3", model_label=0, model_score=0.2,
                           reader_label=1, ref="t1", mask="masks/t1.npz")
    FeedbackStore(feedback).add([item])
    resolved = write_labels(feedback, FeedbackConfig(reviewers={ADA: "senior"}))
    assert resolved["mask"].tolist() == ["masks/t1.npz"]

    pool = tmp_path / "pool"
    labels = pool / "labels.csv"
    pool.mkdir()
    pd.DataFrame({"SeriesInstanceUID": ["2.25.7", "2.25.8"], "label": [0, 0], "nodules": ["[]", "[]"],
                  "nodule_count": [0, 0], "actionable_count": [0, 0], "nodule_diameters_mm": ["", ""],
                  "mask_path": ["masks/a.npz", "masks/b.npz"]}).to_csv(labels, index=False)
    for _ in range(2):  # applied twice: the same pool
        assert apply_to_pool(resolved, labels, feedback / "feedback") == 1
        out = pd.read_csv(labels, keep_default_na=False).set_index("SeriesInstanceUID")
        assert out.mask_path.to_dict() == {"2.25.7": "masks/reader-t1.npz", "2.25.8": "masks/b.npz"}
        assert out.mask_path_before["2.25.7"] == "masks/a.npz" and out.label["2.25.7"] == 1
        assert json.loads(out.nodules["2.25.7"]) == ReaderMask.nodules_of(feedback / "feedback/masks/t1.npz")
        assert out.actionable_count["2.25.7"] == 1
    # Preprocessing lays the reader's mask on the volume's slices by position, as it does the generator's.
    z = np.array(sorted(_z(s) for s in series))[::-1]  # the volume's own slice order
    aligned = _aligned_mask(pool / "masks/reader-t1.npz", z, (64, 64, 12))
    assert aligned.sum() == 6 * 6 * 3 and set(np.flatnonzero(aligned.any(axis=(0, 1)))) == {6, 7, 8}


def test_a_retrain_versions_the_readers_masks_with_their_labels_and_learns_from_that_version(
        series: list[pydicom.Dataset], tmp_path: Path) -> None:
    import subprocess
    import sys

    from dicomops.feedback.stage import apply_to_retrain, readers_source
    from dicomops.layout import WorkLayout
    from dicomops.tracking import dvc_directory_hash, read_dvc_pointer

    frames = np.zeros((len(series), 64, 64), dtype=bool)
    frames[2:4, 8:12, 8:12] = True
    feedback = tmp_path / "work"
    reader_mask(_round_trip(corrected_segmentation(series, frames, ADA)), series).save(
        feedback / "feedback/masks/t9.npz")
    FeedbackStore(feedback).add([store.make_item(
        reader=ADA, role="senior", source="pacs-seg", verdict="correct", series="2.25.9", vendor="GE", model="m",
        version="3", model_label=0, model_score=0.1, reader_label=1, ref="t9", mask="masks/t9.npz")])
    pool = tmp_path / "pool"
    deid = WorkLayout(pool).ingest.deid
    deid.mkdir(parents=True)
    pd.DataFrame({"SeriesInstanceUID": ["2.25.9"], "label": [0], "nodules": ["[]"],
                  "mask_path": ["masks/x.npz"]}).to_csv(deid / "labels.csv", index=False)
    site = tmp_path / "site"
    site.mkdir()
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q", "--no-scm"], cwd=site, check=True)

    snapshot = tmp_path / "retrain-readers"
    cfg = FeedbackConfig(reviewers={ADA: "senior"})
    version = readers_source(feedback, cfg, site / "readers", [], KEY, snapshot)
    assert sorted(p.relative_to(site / "readers").as_posix() for p in (site / "readers").rglob("*") if p.is_file()) \
        == ["labels.csv", "masks/t9.npz"]  # no PACS study in this work directory: no clinical series
    assert version.md5 == read_dvc_pointer(site / "readers.dvc")["md5"] == dvc_directory_hash(site / "readers")
    assert version.folder == snapshot and dvc_directory_hash(snapshot) == version.md5
    # A feedback pass meanwhile writes the next version (Ada takes it back): the retrain keeps its copy.
    FeedbackStore(feedback).add([store.make_item(
        reader=ADA, role="senior", source="endpoint", verdict="accept", series="2.25.9", vendor="GE", model="m",
        version="3", model_label=0, model_score=0.1, at=dt.datetime.now(dt.UTC) + dt.timedelta(minutes=1))])
    assert readers_source(feedback, cfg, site / "readers", [], KEY).md5 != version.md5
    assert apply_to_retrain(version.folder, pool, KEY) == 1
    out = pd.read_csv(deid / "labels.csv", keep_default_na=False)
    assert out.mask_path.tolist() == ["masks/reader-t9.npz"] and out.label.tolist() == [1]
    assert (deid / "masks/reader-t9.npz").read_bytes() == (snapshot / "masks/t9.npz").read_bytes()


def test_a_reviewed_clinical_series_becomes_a_labelled_source_and_keeps_its_label_through_the_gate(
        tmp_path: Path) -> None:
    """A PACS study the platform answered (its de-identified copy in WORK/pacs/studies) that a reader
    labelled and no labelled source holds: the readers' source lays it out as a corpus, a retrain's
    gate takes it in (remapping its UIDs once more), and the reader's label and mask follow it."""
    from dicomops import ingest
    from dicomops.config import IngestConfig, SynthConfig
    from dicomops.feedback.clinical import known_series
    from dicomops.feedback.gate import reader_agreement
    from dicomops.feedback.stage import apply_to_retrain, readers_source
    from dicomops.layout import WorkLayout
    from dicomops.synthetic import generate_corpus

    clinic = tmp_path / "clinic"  # what the PACS sent: PHI, in staging only
    generate_corpus(clinic, SynthConfig(patients=1, seed=5, fault_rate=0.0, matrix=256, slices=8, workers=1))
    work = tmp_path / "work"
    study = WorkLayout(work).pacs.study("st-1")
    ingest.run(clinic, study, IngestConfig(workers=1), KEY)  # as pacs-watch gates a study
    (labels_file := WorkLayout(study).ingest.deid / "labels.csv").unlink()  # a clinical study has no labels
    accepted = pd.read_parquet(WorkLayout(study).ingest.accepted)
    series = str(accepted.SeriesInstanceUID.iloc[0])
    headers = [pydicom.dcmread(WorkLayout(study).ingest.deid / p) for p in accepted.deid_path]
    frames = np.zeros((len(headers), 256, 256), dtype=bool)
    frames[2:5, 100:110, 120:130] = True
    reader_mask(_round_trip(corrected_segmentation(headers, frames, ADA)), headers).save(
        work / "feedback/masks/t5.npz")
    FeedbackStore(work).add([store.make_item(
        reader=ADA, role="senior", source="pacs-seg", verdict="correct", series=series, vendor="GE", model="m",
        version="3", model_label=0, model_score=0.2, reader_label=1, ref="t5", mask="masks/t5.npz")])
    cfg = FeedbackConfig(reviewers={ADA: "senior"}, min_cases=1)

    # A study that a labelled source holds already is not copied: its reader label goes to that source.
    readers_source(work, cfg, tmp_path / "readers", [clinic], KEY)
    assert known_series([clinic], KEY) == {series} and not (tmp_path / "readers/clinical").exists()

    version = readers_source(work, cfg, tmp_path / "readers", [], KEY)
    corpus = version.folder / "clinical"
    table = pd.read_csv(corpus / "labels.csv", keep_default_na=False)
    assert table[["SeriesInstanceUID", "label", "mask_path", "scenario"]].values.tolist() == [
        [series, 1, f"masks/{series}.npz", "reviewed"]]
    assert len(list((corpus / series).iterdir())) == len(accepted)

    pool = tmp_path / "retrain"
    ingest.run(corpus, pool, IngestConfig(workers=1), KEY)  # the retrain's gate, on de-identified files
    assert apply_to_retrain(version.folder, pool, KEY) == 1
    out = pd.read_csv(WorkLayout(pool).ingest.deid / "labels.csv", keep_default_na=False)
    assert out[["label", "label_source", "actionable_count"]].values.tolist() == [[1, "reader", 1]]
    assert out.SeriesInstanceUID.iloc[0] != series  # remapped once more, and followed
    # The promotion gate finds the series under its retrained UID.
    oof = pd.DataFrame({"SeriesInstanceUID": out.SeriesInstanceUID, "score": [0.9]})
    agreement = reader_agreement(work, oof, 0.5, "m", "3", cfg, KEY)
    assert agreement is not None and (agreement.series, agreement.champion, agreement.challenger) == (1, 0.0, 1.0)
    assert not labels_file.exists()
    # Nothing of the clinic's PHI or original UIDs in the readers' source or the feedback.
    from dicomops.deid import scan_for_phi

    truth = pd.read_csv(clinic / "labels.csv", keep_default_na=False)
    needles = set(pd.read_csv(clinic / "phi.csv", keep_default_na=False).value) | set(truth.SeriesInstanceUID) \
        | set(truth.StudyInstanceUID)
    for place in (version.folder, work / "feedback"):
        assert scan_for_phi(place, needles) == [], place
    assert scan_for_phi(clinic, needles)  # the scan is not vacuous


def test_the_dice_of_a_served_mask_and_a_readers_matches_their_slices_by_position(tmp_path: Path) -> None:
    from dicomops.feedback.seg import ServedMask, mask_dice

    z = np.array([10.0, 12.0, 14.0, 16.0])
    served = np.zeros((4, 8, 8), np.uint8)
    served[1, 2:6, 2:6] = 1  # 16 voxels on z = 12
    drawn = np.zeros((4, 8, 8), np.uint8)
    drawn[1, 2:6, 2:4] = 2  # 8 of them, on z = 12 (instance id 2: any id is nodule) ...
    drawn[3, 0:2, 0:2] = 1  # ... and 4 elsewhere
    order = np.array([3, 1, 0, 2])  # the reader's slices in another order
    ReaderMask(served, z, []).save(tmp_path / "served.npz")
    ReaderMask(drawn[order], z[order], []).save(tmp_path / "drawn.npz")
    assert mask_dice(tmp_path / "served.npz", tmp_path / "drawn.npz") == pytest.approx(2 * 8 / (16 + 12))
    ReaderMask(np.zeros_like(served), z, []).save(tmp_path / "empty.npz")
    assert mask_dice(tmp_path / "empty.npz", tmp_path / "drawn.npz") == 0.0  # found nothing, the reader drew
    assert math.isnan(mask_dice(tmp_path / "empty.npz", tmp_path / "empty.npz"))
    ReaderMask(served, z + 1, []).save(tmp_path / "elsewhere.npz")  # not the same slices: not comparable
    assert math.isnan(mask_dice(tmp_path / "elsewhere.npz", tmp_path / "drawn.npz"))
    # The segmenter's mask as kept, the box around its voxels: the same figure.
    ServedMask.of(served > 0, z, served.shape, []).save(tmp_path / "boxed.npz")
    with np.load(tmp_path / "boxed.npz") as npz:
        assert npz["box"].shape == (1, 4, 4)
    assert mask_dice(tmp_path / "boxed.npz", tmp_path / "drawn.npz") == pytest.approx(2 * 8 / (16 + 12))
    ServedMask.of(None, z, served.shape, []).save(tmp_path / "none.npz")
    assert mask_dice(tmp_path / "none.npz", tmp_path / "drawn.npz") == 0.0
    # The gate left out the file at z = 16 (the PACS still holds it, and the reader drew there):
    # the segmenter is judged on the slices it answered, not NaN and not charged for the fourth.
    ServedMask.of(served[:3] > 0, z[:3], (3, 8, 8), []).save(tmp_path / "three.npz")
    assert mask_dice(tmp_path / "three.npz", tmp_path / "drawn.npz") == pytest.approx(2 * 8 / (16 + 8))
    ReaderMask(drawn[[1, 0, 2]], z[[1, 0, 2]], []).save(tmp_path / "drawn3.npz")  # and the other way round
    assert mask_dice(tmp_path / "served.npz", tmp_path / "drawn3.npz") == pytest.approx(2 * 8 / (16 + 8))
    ReaderMask(np.zeros((4, 8, 9), np.uint8), z, []).save(tmp_path / "wider.npz")  # another matrix
    assert math.isnan(mask_dice(tmp_path / "served.npz", tmp_path / "wider.npz"))


def test_a_judgements_time_is_taken_in_utc_from_its_offset_or_the_objects() -> None:
    from pydicom.dataset import Dataset

    from dicomops.feedback.pacs import dicom_time

    utc = dt.UTC
    plain = Dataset()
    assert dicom_time("20261205103000+0500", plain) == dt.datetime(2026, 12, 5, 5, 30, tzinfo=utc)
    assert dicom_time("20261205103000.250000-0130", plain) == dt.datetime(2026, 12, 5, 12, 0, 0, 250000, tzinfo=utc)
    zoned = Dataset()
    zoned.TimezoneOffsetFromUTC = "-0300"  # the object's own offset, for a time without one
    assert dicom_time("20261205103000", zoned) == dt.datetime(2026, 12, 5, 13, 30, tzinfo=utc)
    assert dicom_time("20261205103000+0100", zoned) == dt.datetime(2026, 12, 5, 9, 30, tzinfo=utc)  # its own first
    assert dicom_time("20261205103000", plain) == dt.datetime(2026, 12, 5, 10, 30, tzinfo=utc)
    assert dicom_time("not a time", plain) is None and dicom_time("", plain) is None
