"""The served segmenter's report of one volume: findings by the cross-validation's rule, centres in
DICOM patient coordinates (LPS) through the preprocessing's affine, diameters in mm, only the
findings' voxels in the mask. The network is a two-node ONNX graph run by ONNX Runtime (a voxel's
logit grows with its density, :mod:`tests.segmenter_fixture`), so the expected answer is known exactly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dicomops.config import PreprocessConfig, SegmentConfig
from dicomops.export.onnx_export import session
from dicomops.segmentation.metrics import equivalent_diameter_mm, solid_width_mm
from dicomops.serving.segmenter import Segmenter, localise
from tests.segmenter_fixture import GAIN, LEVEL, density_graph


@pytest.fixture
def segmenter(tmp_path: Path) -> Segmenter:
    cfg = SegmentConfig(channels=(4, 8), strides=(2,), patch=(16, 16, 16), roi=(16, 16, 16), model_name="density")
    return Segmenter("density", "3", "run", PreprocessConfig(), cfg, session(density_graph(tmp_path / "d.onnx")))


def ball(shape: tuple[int, int, int], centre: tuple[float, float, float], radius: float,
         spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)) -> np.ndarray:
    """Voxels within `radius` mm of `centre` (voxel indices) on a grid of `spacing` mm."""
    grid = np.indices(shape, dtype=float)
    return sum(((g - c) * d) ** 2 for g, c, d in zip(grid, centre, spacing, strict=True)) <= radius**2  # type: ignore[no-any-return]


def test_a_nodule_is_reported_in_lps_millimetres_with_its_diameter_and_voxels(segmenter: Segmenter) -> None:
    shape = (48, 48, 40)
    image = np.full(shape, 0.4, np.float32)  # body, under LEVEL
    nodule = ball(shape, (20, 25, 15), 4.0, (0.8, 0.8, 1.5))  # round in mm (a ball in voxels is not a finding here)
    image[nodule] = 1.0
    speck = ball(shape, (40, 10, 30), 0.9)  # 7 voxels, 1.4 mm: a candidate, never a finding
    image[speck] = 1.0
    image[:, :, 36:] = 0.0  # air: nothing there is nodule whatever the network says
    # i runs right-to-left (RAS x falls), j anterior, k superior, 0.8 x 0.8 x 1.5 mm.
    affine = np.array([[-0.8, 0, 0, 100.0], [0, 0.8, 0, -50.0], [0, 0, 1.5, -200.0], [0, 0, 0, 1]])
    found = localise(segmenter, image, affine)
    (only,) = found.nodules
    # RAS (100 - 16, -50 + 20, -200 + 22.5) is LPS (-84, 30, -177.5).
    assert only.center_mm == pytest.approx((-84.0, 30.0, -177.5), abs=1e-6)
    assert only.diameter_mm == pytest.approx(equivalent_diameter_mm(int(nodule.sum()), (0.8, 0.8, 1.5)), abs=0.05)
    assert only.score == pytest.approx(1 / (1 + np.exp(-GAIN * (1.0 - LEVEL))), abs=5e-5)  # 4 decimals, as written
    assert np.array_equal(found.mask, nodule) and np.array_equal(found.affine, affine)
    assert found.score == only.score
    # All of it is solid (the network marks only voxels above -300 HU): its solid part is the
    # nodule, measured at the series' spacing, and the series' actionable score is the
    # actionable module's for that finding.
    assert only.solid_width_mm == pytest.approx(solid_width_mm(nodule, (0.8, 0.8, 1.5)), abs=0.05)
    assert 7.0 <= only.solid_width_mm <= 9.0  # about twice the ball's 4 mm radius
    sigmoid = lambda x: 1 / (1 + np.exp(-x))  # noqa: E731
    expected = only.score * sigmoid(only.diameter_mm - 6.0) * sigmoid((only.solid_width_mm - 3.5) / 0.5)
    assert found.actionable == pytest.approx(expected, abs=0.02)


def test_nothing_found_is_an_empty_report(segmenter: Segmenter) -> None:
    found = localise(segmenter, np.full((32, 32, 16), 0.4, np.float32), np.eye(4))
    assert found.nodules == () and not found.mask.any() and found.score < 0.01 and found.actionable == 0.0
    with pytest.raises(ValueError, match="4x4"):
        localise(segmenter, np.zeros((32, 32, 16), np.float32), np.eye(3))


def test_a_high_scoring_candidate_that_is_no_finding_does_not_score_the_series(segmenter: Segmenter) -> None:
    """A vessel's piece: a dense streak one voxel across scores high and is no finding (under 3 mm).
    The series' score was the highest voxel anywhere, and the SR read "probability 0.98, operating
    point 0.75, absent"; now it is its best finding's, 0 without one."""
    image = np.full((32, 32, 16), 0.4, np.float32)
    image[16, 16, 2:14] = 1.0  # 12 mm along k, one voxel across
    found = localise(segmenter, image, np.eye(4))
    assert found.nodules == () and found.score == 0.0


def test_without_a_fixed_window_there_are_no_solid_parts_and_no_call(segmenter: Segmenter) -> None:
    import dataclasses

    per_series = dataclasses.replace(segmenter, preprocess=PreprocessConfig(window="header"))
    image = np.full((48, 48, 40), 0.4, np.float32)
    image[ball(image.shape, (20, 25, 15), 4)] = 1.0
    found = localise(per_series, image, np.eye(4))
    assert len(found.nodules) == 1 and found.nodules[0].solid_width_mm is None and found.actionable is None


def test_what_the_segmenter_served_is_recorded_beside_the_results_and_found_by_feedback(
        segmenter: Segmenter, tmp_path: Path) -> None:
    """The results table carries the segmenter's call for each series it answered and names the mask
    it served (saved beside it in the readers' mask format, slices in order of position);
    feedback finds the newest such answer, past later results that carry none."""
    import time
    from types import SimpleNamespace

    import pandas as pd

    from dicomops.feedback.review import latest_localisation
    from dicomops.feedback.seg import _voxels
    from dicomops.serving.batch import record
    from dicomops.serving.predict import Answer, SeriesFinding
    from dicomops.serving.segmenter import Served, served

    shape = (32, 32, 16)
    image = np.full(shape, 0.4, np.float32)
    image[ball(shape, (12, 14, 8), 3.5)] = 1.0
    found = localise(segmenter, image, np.eye(4))
    assert len(found.nodules) == 1
    images = [SimpleNamespace(ImagePositionPatient=[0.0, 0.0, float(z)]) for z in (3, 1, 2, 0)]  # file order
    grid = SimpleNamespace(order=np.array([3, 1, 2, 0]))  # geometric slice k lies on images[order[k]]
    native = np.zeros((6, 5, 4), bool)  # (columns, rows, slices)
    native[1:3, 2:4, 1:3] = True
    answer = served(segmenter, "2.25.42", found, images, grid, native)
    assert answer.columns() == {"segmenter": "density", "segmenter_version": "3", "segmenter_present": True,
                                "segmenter_score": pytest.approx(found.score, abs=1e-6),
                                "segmenter_actionable": pytest.approx(found.actionable, abs=1e-6),
                                "segmenter_nodules": 1}
    champion = SimpleNamespace(threshold=0.5, name="classifier", version="7", engine=SimpleNamespace(
        choice=SimpleNamespace(kind="onnxruntime")), describe=lambda: {"model": "classifier"})
    finding = SeriesFinding("2.25.42", "SIEMENS", 4, 0.9, True, 2, "off")
    scored = Answer("tok", "scored", [finding, SeriesFinding("2.25.43", "GE", 4, 0.1, False, 0, "off")], 2,
                    localised=[answer])
    folder, _ = record(tmp_path, "batch-1", [scored], champion, None)  # type: ignore[arg-type]
    table = pd.read_csv(folder / "results.csv", keep_default_na=False, dtype={"segmenter_version": str})
    assert list(table.segmenter) == ["density", ""] and list(table.segmenter_mask) == ["segments/2.25.42.npz", ""]
    time.sleep(0.01)
    record(tmp_path, "batch-2", [Answer("tok", "scored", [finding], 1)], champion, None)  # type: ignore[arg-type]
    got = latest_localisation(tmp_path, "2.25.42")
    assert got is not None and (got.model, got.version, got.present) == ("density", "3", True)
    assert got.mask == folder / "segments/2.25.42.npz"
    with np.load(got.mask) as npz:
        assert npz["ipp_z"].tolist() == [0.0, 1.0, 2.0, 3.0]
        assert np.array_equal(_voxels(npz), native.transpose(2, 1, 0))
        assert npz["box"].shape == (2, 2, 2)  # the box around the voxels, not the series' whole grid
    assert latest_localisation(tmp_path, "2.25.43") is None
    # Another version of the segmenter answered it later: a reader's SEG cannot say whose mask it
    # corrects, so none is credited.
    time.sleep(0.01)
    other = Served("2.25.42", "density", "4", True, 0.9, 0.9, 1, answer.mask)
    record(tmp_path, "batch-3", [Answer("tok", "scored", [finding], 1, localised=[other])], champion,  # type: ignore[arg-type]
           None)
    assert latest_localisation(tmp_path, "2.25.42") is None
    # Nothing found: no grid is needed (a series the SEG writer could not lay out still gets its
    # SR), and the mask kept is empty on the slices in order of position, for a reader's to be
    # compared with (Dice 0 where the reader draws one).
    nothing = localise(segmenter, np.full(shape, 0.4, np.float32), np.eye(4))
    plain = [SimpleNamespace(ImagePositionPatient=[0.0, 0.0, float(z)], Rows=5, Columns=6) for z in (3, 1, 2, 0)]
    empty = served(segmenter, "2.25.44", nothing, plain)
    assert (empty.present, empty.nodules) == (False, 0)
    assert empty.mask.shape == (4, 5, 6) and empty.mask.box.size == 0 and empty.mask.ipp_z.tolist() == [0, 1, 2, 3]
    # Findings that could not be laid onto the acquired slices: the call is recorded, no mask.
    unlaid = served(segmenter, "2.25.45", found, plain, laid_out=False)
    assert unlaid.present and unlaid.mask is None
    record(tmp_path, "batch-4", [Answer("tok", "scored", [SeriesFinding("2.25.45", "GE", 4, 0.9, True, 1, "off")], 1,
                                        localised=[unlaid])], champion, None)  # type: ignore[arg-type]
    got = latest_localisation(tmp_path, "2.25.45")
    assert got is not None and got.present and not got.mask.is_file()


def test_a_seg_highdicom_cannot_build_leaves_the_srs_to_go_back(monkeypatch: pytest.MonkeyPatch,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    """Only a grid the SEG cannot lie on was caught; highdicom refusing the SEG itself failed the
    whole study, its two SRs unsent. A full disk still stops the study (an outage)."""
    import errno
    import logging
    import types

    import dicomops.segmentation.native as native
    import dicomops.serving.predict as predict
    import dicomops.serving.segmenter as seg
    from dicomops.pacs import results, watch

    nodule = results.Nodule(center_mm=(1.0, 2.0, 3.0), diameter_mm=8.0, score=0.9)
    monkeypatch.setattr(predict, "preprocessed", lambda *a: (np.zeros((4, 4, 3), np.float32), np.eye(4)))
    monkeypatch.setattr(seg, "localise", lambda *a: seg.Localisation((nodule,), np.ones((4, 4, 3), bool), np.eye(4),
                                                                     0.9, 0.9))
    monkeypatch.setattr(native, "native_grid", lambda images: native.NativeGrid(np.eye(4), (4, 4, 3), np.arange(3)))
    monkeypatch.setattr(native, "to_native_mask", lambda *a: np.ones((4, 4, 3), bool))
    monkeypatch.setattr(results, "structured_report", lambda images, finding, **k: f"SR of {finding.model_name}")
    monkeypatch.setattr(seg, "served", lambda *a, **k: "served")
    segmenter = types.SimpleNamespace(name="seg", version="1", preprocess=None,
                                      cfg=types.SimpleNamespace(finding_threshold=0.75))

    def refuses(*a: object, **k: object) -> None:
        raise ValueError("Source images must have a shared orientation")

    monkeypatch.setattr(native, "series_segmentation", refuses)
    with caplog.at_level(logging.WARNING, logger="dicomops.pacs.watch"):
        out, answer = watch.localisation_reports([object()], None, Path("."), segmenter, True, "S")
    assert out == ["SR of seg"] and answer == "served" and "no SEG over this series (ValueError" in caplog.text

    def full(*a: object, **k: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(native, "series_segmentation", full)
    with pytest.raises(OSError):
        watch.localisation_reports([object()], None, Path("."), segmenter, True, "S")
