"""With a promoted segmenter, a study from a real Orthanc is answered by the PACS watch with three
objects under the original study: the classifier's SR, the segmenter's SR (each nodule's centre in
patient coordinates and its diameter) and a SEG of the nodules' voxels on the acquired slices. The
segmenter here marks every voxel denser than -300 HU (:mod:`tests.segmenter_fixture`), so the SEG is
checked voxel by voxel against the acquired pixels and the SR's centres against the generator's
nodules. What the segmenter answered is in the results table with the mask it served, and a
reader's corrected SEG judges it on its own version's page (kappa, the Dice of the two masks). A
segmenter that fails leaves the classifier's SR alone in the PACS, the study ingested with the
series named (``segmenter_failed:<type>``). Batch
prediction over the PACS writes the same three objects; nothing identifying reaches the work
directory, MLflow or Prefect."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pandas as pd
import pydicom
import pytest
from pydantic import SecretStr
from pydicom.sr.codedict import codes

import mlflow
from dicomops.config import FeedbackConfig, MonitorConfig
from dicomops.deid import scan_for_phi
from dicomops.deid.keys import KeyedMapper, key_from_settings
from dicomops.feedback.review import latest_result
from dicomops.feedback.seg import _voxels, corrected_segmentation
from dicomops.feedback.store import FeedbackStore
from dicomops.layout import WorkLayout
from dicomops.pacs import watch
from dicomops.pacs.changes import ChangesFeed
from dicomops.pacs.client import PacsClient
from dicomops.pacs.orthanc import TEMPLATE, OrthancProcess, start_orthanc
from dicomops.pacs.results import ACTIONABLE_SCORE, SOLID_PART_WIDTH
from dicomops.serving.champion import load_champion
from dicomops.serving.segmenter import with_segmenter
from dicomops.synthetic.corpus import SeriesPlan, write_series
from flows.feedback import feedback
from flows.pacs_watch import pacs_watch
from flows.predict import predict
from tests.champion_fixture import CONFIG, PRE, TINY, ExportedChampion
from tests.flows.test_ingest_flow import _prefect_database
from tests.segmenter_fixture import register_density_segmenter
from tests.unit.test_real_files import _needles

from .conftest import free_port
from .orthanc_fixture import STABLE_AGE_S, orthanc, pacs_credentials, require_orthanc  # noqa: F401  (a fixture)
from .test_pacs_feedback import _stable_again
from .test_pacs_watch import _objects, _pacs_env, _send, _wait_stable

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("prefect_harness")]

SEGMENTER = "pacs-segmenter"
READER = "Lovelace^Ada"
SEG_CONFIG = CONFIG.model_copy(update={"segment": CONFIG.segment.model_copy(update={"model_name": SEGMENTER})})
NO_SEG_CONFIG = SEG_CONFIG.model_copy(update={"serve": SEG_CONFIG.serve.model_copy(update={"write_seg": False})})
DENSE_HU = -300.0  # the fixture's LEVEL 0.7 of the lung window [-1350, 150]


@pytest.fixture(scope="module")
def store(exported_champion: ExportedChampion) -> str:
    """The champion's store, with the density segmenter promoted beside the classifier."""
    register_density_segmenter(exported_champion.uri, SEGMENTER, PRE)
    return exported_champion.uri


def _study(out: Path, index: int) -> tuple[list[Path], list[dict[str, Any]]]:
    """A 16-slice siemens study with two solid nodules; its files and the generator's nodules."""
    plan = SeriesPlan(index=index, seed=41, scenario="baseline", vendor="siemens", label=1, nodule_count=2,
                      fault=None, fault_detail="", matrix=128, slices=16)
    result = write_series(plan, out)
    files = sorted(p for p in (out / str(result.label_row["series_dir"])).iterdir() if p.is_file())
    return files, json.loads(str(result.label_row["nodules"]))


def _seg_mask(seg: pydicom.Dataset, images: list[pydicom.Dataset]) -> np.ndarray:
    """The SEG's segment 1 as a (slices, rows, cols) mask in the order of `images`."""
    position = {str(ds.SOPInstanceUID): k for k, ds in enumerate(images)}
    mask = np.zeros((len(images), int(images[0].Rows), int(images[0].Columns)), bool)
    frames = seg.pixel_array.reshape(-1, *mask.shape[1:])
    for frame, group in zip(frames, seg.PerFrameFunctionalGroupsSequence, strict=True):
        source = group.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        mask[position[str(source)]] |= frame.astype(bool)
    return mask


class _Failing:
    """An ONNX session that fails on this study's volume."""

    def get_inputs(self) -> Any:
        raise RuntimeError("a segmenter that cannot run")


def test_a_promoted_segmenter_adds_its_report_and_a_seg_and_a_failing_one_leaves_nothing(
        orthanc: OrthancProcess, store: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    from tests.conftest import PREFECT_HOME

    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    _pacs_env(monkeypatch, orthanc)
    work, staging = tmp_path / "work", tmp_path / "staging"
    files, truth = _study(tmp_path / "send-a", index=7)
    study = _send(orthanc, files)
    _wait_stable(orthanc, {study})

    result = pacs_watch(work=work, staging=staging, config=SEG_CONFIG)
    assert (result["ingested"], result["failed"], result["results_stored"]) == (1, 0, 3)
    images = sorted((pydicom.dcmread(f) for f in files), key=lambda ds: float(ds.ImagePositionPatient[2]))
    series_uid = str(images[0].SeriesInstanceUID)

    reports = {str(ds.ManufacturerModelName): ds for ds in _objects(orthanc, study, "SR")}
    assert set(reports) == {TINY.model_name, SEGMENTER}
    localised = hd.sr.MeasurementReport.from_sequence(hd.sr.Comprehensive3DSR.from_dataset(reports[SEGMENTER]).content)
    (series_group,) = localised.get_image_measurement_groups()
    assert series_group.get_qualitative_evaluations(name=codes.SCT.Nodule)[0].value == codes.SCT.Present
    groups = localised.get_volumetric_roi_measurement_groups()
    assert groups
    centres = np.array([np.ravel(g.roi.graphic_data) for g in groups])
    for g in groups:
        assert g.roi.source_series_for_segmentation.value == series_uid
        assert g.get_measurements(name=codes.SCT.Diameter)[0].value >= 3.0
        # This segmenter marks only solid tissue, so every finding has a solid part.
        assert g.get_measurements(name=SOLID_PART_WIDTH)[0].value > 0.0
    (actionable,) = series_group.get_measurements(name=ACTIONABLE_SCORE)
    assert 0.0 <= actionable.value <= 1.0
    # Each of the generator's nodules is found where it is (LPS mm; the segmenter works at 2 mm),
    # unless it touches denser tissue (chest wall, a vessel) and merged into a larger finding.
    isolated = [n for n in truth if n.get("attachment", "none") == "none"]
    assert isolated, "the plan should hold a free-standing nodule"
    for n in isolated:
        assert np.linalg.norm(centres - np.asarray(n["center_mm"]), axis=1).min() <= 2.5, (n, centres)

    (seg,) = _objects(orthanc, study, "SEG")
    assert seg.StudyInstanceUID == study and seg.PatientID == images[0].PatientID
    assert seg.SegmentSequence[0].SegmentAlgorithmName == SEGMENTER
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == series_uid
    got = _seg_mask(seg, images)
    hu = np.stack([ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept) for ds in images])
    dense = hu > DENSE_HU
    # The SEG is the findings' voxels the segmenter saw at 2 mm, carried back by nearest neighbour:
    # dense tissue, but only its round parts (the body's dense wall is a slab, not a finding), so
    # it lies on dense pixels but for edges, and holds about the volume of the reported findings.
    assert got.any()
    precision = (got & dense).sum() / got.sum()
    assert precision > 0.85, precision
    voxel_mm3 = float(np.prod([float(v) for v in images[0].PixelSpacing])) * abs(
        float(images[1].ImagePositionPatient[2]) - float(images[0].ImagePositionPatient[2]))
    reported_mm3 = sum(np.pi / 6 * g.get_measurements(name=codes.SCT.Diameter)[0].value ** 3 for g in groups)
    assert 0.5 < got.sum() * voxel_mm3 / reported_mm3 < 2.0, (got.sum() * voxel_mm3, reported_mm3)

    # What the segmenter answered is in the watch's results table, with the mask it served beside it
    # (de-identified: the series' pseudonym, slice positions), voxel for voxel the SEG's.
    series = KeyedMapper(key_from_settings()).uid(series_uid)
    (table_path,) = WorkLayout(work).result_tables()
    row = pd.read_csv(table_path, keep_default_na=False, dtype={"segmenter_version": str}).set_index("series").loc[series]
    segmenter_version = str(mlflow.tracking.MlflowClient(store).get_model_version_by_alias(SEGMENTER, "champion").version)
    assert (row.segmenter, row.segmenter_version, row.segmenter_nodules) == (SEGMENTER, segmenter_version, len(groups))
    assert bool(row.segmenter_present) and row.segmenter_actionable == pytest.approx(actionable.value, abs=1e-5)
    with np.load(table_path.parent / row.segmenter_mask) as npz:
        assert np.array_equal(_voxels(npz), got)
        assert npz["ipp_z"].tolist() == [float(ds.ImagePositionPatient[2]) for ds in images]

    # A reader corrects the SEG in a viewer: trims its top slice and draws a nodule it missed. The
    # feedback pass judges the segmenter by it (present/absent, and the Dice of the two masks) on
    # its own version's page, apart from the classifier, whose item carries no Dice.
    corrected = got.copy()
    corrected[np.flatnonzero(got.any(axis=(1, 2)))[-1]] = False
    corrected[1, 4:8, 4:8] = True
    expected = 2 * int((got & corrected).sum()) / int(got.sum() + corrected.sum())
    assert 0.3 < expected < 0.99
    with ChangesFeed(orthanc.url, orthanc.credentials) as feed:
        last = feed.poll(0).last
    with PacsClient(orthanc.dicomweb_url, orthanc.credentials) as pacs:
        pacs.store([corrected_segmentation(images, corrected, READER)])
    _stable_again(orthanc, study, last)
    monkeypatch.setenv("DICOMOPS_READER_LABELS", str(tmp_path / "readers"))
    config = SEG_CONFIG.model_copy(update={
        "feedback": FeedbackConfig(reviewers={READER: "senior"}, min_cases=1),
        "monitor": MonitorConfig(training_source=tmp_path / "no-source", retrain="off")})
    assert feedback(work=work, config=config)["stored"] == 1
    items = FeedbackStore(work).items().set_index("model")
    judged = items.loc[SEGMENTER]
    assert (judged.version, judged.source, judged.model_label, judged.reader_label) == (
        segmenter_version, "pacs-seg", 1, 1)
    assert judged.dice == pytest.approx(expected)
    assert np.isnan(items.loc[TINY.model_name].dice) and items.loc[TINY.model_name].version != ""
    client = mlflow.tracking.MlflowClient(store)
    page = client.get_model_version(SEGMENTER, segmenter_version)
    assert float(page.tags["feedback.dice"]) == round(expected, 2)  # as people see it: two decimals
    assert "Dice (corrected masks)" in page.description
    assert "feedback.dice" not in client.get_model_version_by_alias(TINY.model_name, "champion").tags

    # A segmenter that fails: the classifier's SR still goes back, none of the segmenter's objects,
    # and the study is ingested with the series named by its code (not its message).
    files_b, _ = _study(tmp_path / "send-b", index=8)
    study_b = _send(orthanc, files_b)
    _wait_stable(orthanc, {study_b})
    champion = with_segmenter(load_champion(store, TINY.model_name, models_dir=tmp_path / "models"), store, SEGMENTER,
                              models_dir=tmp_path / "models")
    broken = dataclasses.replace(champion, segmenter=dataclasses.replace(champion.segmenter, session=_Failing()))
    with PacsClient(orthanc.dicomweb_url, orthanc.credentials) as pacs:
        failed = watch.handle_study(study_b, pacs, staging, work, SEG_CONFIG.ingest, key_from_settings(), broken)
    assert (failed.status, failed.results_stored, failed.series_failed) == ("ingested", 1, 1)
    assert failed.failed_series.endswith(":segmenter_failed:RuntimeError") and study_b not in failed.reason
    (kept,) = _objects(orthanc, study_b, "SR")
    assert kept.ManufacturerModelName == TINY.model_name and _objects(orthanc, study_b, "SEG") == []
    ledger = pd.read_csv(work / "pacs/studies.csv", keep_default_na=False)
    assert list(ledger.status) == ["ingested", "ingested"] and list(ledger.results_stored) == [3, 1]

    # Batch prediction over the PACS answers through the same path: three objects again.
    files_c, _ = _study(tmp_path / "send-c", index=9)
    study_c = _send(orthanc, files_c)
    predicted = predict(pacs_query=SecretStr(f"StudyInstanceUID={study_c}"), work=work, config=SEG_CONFIG)
    assert (predicted["studies_scored"], predicted["results_stored"]) == (1, 3)
    assert predicted["segmenter"] == SEGMENTER
    assert len(_objects(orthanc, study_c, "SR")) == 2 and len(_objects(orthanc, study_c, "SEG")) == 1

    needles = _needles([*files, *files_b, *files_c])
    assert study in needles and series_uid in needles
    for place in (work, Path(store.removeprefix("sqlite:///")).parent, PREFECT_HOME, _prefect_database()):
        hits = scan_for_phi(place, needles)
        assert hits == [], f"PHI found under {place}: {hits[:5]}"
    assert list(staging.glob("*")) == []


def test_a_pacs_that_keeps_the_reports_and_drops_the_seg_is_seen_and_the_study_says_what_it_kept(
        store: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Orthanc with a ``ReceivedInstanceFilter`` that refuses SEGs (a site whose viewers cannot show
    them) answers STOW-RS "stored" for the SEG and does not keep it. The watch sees it, records the
    study as ingested with the two reports it kept and why not the SEG (no UID), the reports' series
    is there to review, and the next pass does not take the study again; a batch over the PACS says
    the same. With ``serve.write_seg`` off, as such a site sets it, a study is answered in full by
    the two reports. Nothing identifying reaches the work directory."""
    require_orthanc()
    lua = tmp_path / "no-seg.lua"
    lua.write_text('function ReceivedInstanceFilter(dicom, origin, info)\n'
                   '  return dicom.Modality ~= "SEG"\nend\n')
    template = tmp_path / "orthanc.json"
    template.write_text(json.dumps(json.loads(TEMPLATE.read_text()) | {"LuaScripts": [str(lua)]}))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    work, staging = tmp_path / "work", tmp_path / "staging"
    with start_orthanc(tmp_path / "pacs", free_port(), pacs_credentials(), stable_age_s=STABLE_AGE_S,
                       template=template) as server:
        _pacs_env(monkeypatch, server)
        files, _ = _study(tmp_path / "send-a", index=11)
        study = _send(server, files)
        _wait_stable(server, {study})
        result = pacs_watch(work=work, staging=staging, config=SEG_CONFIG)
        assert (result["ingested"], result["partly_answered"], result["results_stored"]) == (1, 1, 2)
        assert len(_objects(server, study, "SR")) == 2 and _objects(server, study, "SEG") == []
        ledger = pd.read_csv(work / "pacs/studies.csv", keep_default_na=False)
        (row,) = ledger.itertuples()
        assert (row.status, row.results_stored, row.accepted_series) == ("ingested", 2, 1)
        assert "kept 2 of them" in row.reason and "Segmentation Storage: reported stored, not found" in row.reason
        assert "dicomops predict --pacs StudyInstanceUID=<the study's UID>" in row.reason
        # Stable again once the reports were stored: seen as handled, not taken again.
        again = pacs_watch(work=work, staging=staging, config=SEG_CONFIG)
        assert again["ingested"] == 0 and again["results_stored"] == 0
        assert list(pd.read_csv(work / "pacs/studies.csv").status).count("ingested") == 1

        # Such a site turns the SEG off (serve.write_seg): its studies are answered in full, by both reports.
        files_c, _ = _study(tmp_path / "send-c", index=13)
        study_c = _send(server, files_c)
        _wait_stable(server, {study_c})
        result = pacs_watch(work=work, staging=staging, config=NO_SEG_CONFIG)
        assert (result["ingested"], result["partly_answered"], result["results_stored"]) == (1, 0, 2)
        assert len(_objects(server, study_c, "SR")) == 2 and _objects(server, study_c, "SEG") == []
        row_c = pd.read_csv(work / "pacs/studies.csv", keep_default_na=False).iloc[-1]
        assert (row_c.status, row_c.results_stored, row_c.reason) == ("ingested", 2, "")

        files_b, _ = _study(tmp_path / "send-b", index=12)
        study_b = _send(server, files_b)
        predicted = predict(pacs_query=SecretStr(f"StudyInstanceUID={study_b}"), work=work, config=SEG_CONFIG)
        assert (predicted["studies_scored"], predicted["studies_partly_answered"], predicted["results_stored"]) == (
            1, 1, 2)
        # The reports the PACS kept are the studies' results: their series are there to review.
        mapper = KeyedMapper(key_from_settings())
        for sent in (files, files_b):
            assert latest_result(work, mapper.uid(str(pydicom.dcmread(sent[0]).SeriesInstanceUID))) is not None

    needles = _needles([*files, *files_b, *files_c])
    assert study in needles
    hits = scan_for_phi(work, needles)
    assert hits == [], f"PHI found under {work}: {hits[:5]}"
    assert list(staging.glob("*")) == []
