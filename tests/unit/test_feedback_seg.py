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
from dicomops.feedback.seg import (
    ReaderMask,
    corrected_segmentation,
    is_ours,
    read_correction,
    reader_mask,
)
from dicomops.feedback.stage import apply_to_pool, write_labels
from dicomops.feedback.store import FeedbackStore
from dicomops.pacs.results import Finding, encode, segmentation
from dicomops.preprocessing.stage import _aligned_mask
from dicomops.synthetic.corpus import SeriesPlan, write_series

ADA = "Lovelace^Ada"


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
    with pytest.raises(ValueError, match="no source headers"):
        reader_mask(_round_trip(corrected_segmentation(series, frames, ADA)), [])


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

    from dicomops.feedback.stage import apply_to_retrain
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

    tags = apply_to_retrain(feedback, pool, FeedbackConfig(reviewers={ADA: "senior"}), site / "readers")
    assert sorted(p.relative_to(site / "readers").as_posix() for p in (site / "readers").rglob("*") if p.is_file()) \
        == ["labels.csv", "masks/t9.npz"]
    assert tags["feedback.dvc_md5"] == read_dvc_pointer(site / "readers.dvc")["md5"] == dvc_directory_hash(site / "readers")
    assert tags["retrain.reader_labels"] == "1"
    out = pd.read_csv(deid / "labels.csv", keep_default_na=False)
    assert out.mask_path.tolist() == ["masks/reader-t9.npz"] and out.label.tolist() == [1]
    assert (deid / "masks/reader-t9.npz").read_bytes() == (site / "readers/masks/t9.npz").read_bytes()
