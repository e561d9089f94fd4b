"""Results back to the PACS: the TID 1500 SR and the binary SEG, read back and validated."""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.sr.codedict import codes
from pydicom.tag import Tag
from pydicom.uid import Comprehensive3DSRStorage, SegmentationStorage

from dicomops.feedback.pacs import read_report
from dicomops.pacs.results import (
    ACTIONABLE_SCORE,
    PRIVATE_SCHEME,
    SERIES_SCORE,
    SOLID_PART_WIDTH,
    Finding,
    Nodule,
    encode,
    result_uids,
    segmentation,
    structured_report,
)
from dicomops.synthetic.corpus import SeriesPlan, write_series
from dicomops.training.scoring import SeriesRule

MODEL = "dicomops-ct-classifier"
VERSION = "17"
# Values a wrong wiring would not reproduce by accident (score and threshold swapped, a default).
SCORE, THRESHOLD, NODULE_SCORES = 0.8125, 0.375, (0.9375, 0.625)


@dataclasses.dataclass(frozen=True)
class SyntheticSeries:
    images: list[pydicom.Dataset]
    mask: np.ndarray
    nodules: list[dict]
    phi: list[str]


@pytest.fixture(scope="module")
def series(tmp_path_factory: pytest.TempPathFactory) -> SyntheticSeries:
    """One 12-slice synthetic GE series with two nodules, its truth mask and its fake PHI."""
    out = tmp_path_factory.mktemp("pacs-results")
    plan = SeriesPlan(index=1, seed=5, scenario="baseline", vendor="ge", label=1, nodule_count=2,
                      fault=None, fault_detail="", matrix=64, slices=12)
    result = write_series(plan, out)
    row = result.label_row
    files = (out / str(row["series_dir"])).iterdir()
    images = sorted((pydicom.dcmread(p) for p in files), key=lambda ds: float(ds.ImagePositionPatient[2]))
    truth = np.load(out / str(row["mask_path"]))
    assert np.allclose(truth["ipp_z"], [float(ds.ImagePositionPatient[2]) for ds in images])
    nodules = json.loads(str(row["nodules"]))
    assert len(nodules) == 2 and truth["mask"].any()
    return SyntheticSeries(images, truth["mask"].astype(bool), nodules,
                           [r["value"] for r in result.phi_rows])


def _finding(series: SyntheticSeries) -> Finding:
    nodules = tuple(Nodule(center_mm=tuple(n["center_mm"]), diameter_mm=n["diameter_mm"], score=s)
                    for n, s in zip(series.nodules, NODULE_SCORES, strict=True))
    return Finding(present=True, score=SCORE, threshold=THRESHOLD, model_name=MODEL,
                   model_version=VERSION, nodules=nodules)


SOLID_WIDTHS, ACTIONABLE = (4.5, 0.0), 0.6875


def _segmenter_finding(series: SyntheticSeries) -> Finding:
    """The segmenter's answer: each nodule's solid part and the series' actionable score too."""
    nodules = tuple(dataclasses.replace(n, solid_width_mm=w)
                    for n, w in zip(_finding(series).nodules, SOLID_WIDTHS, strict=True))
    return dataclasses.replace(_finding(series), nodules=nodules, actionable=ACTIONABLE)


def _absent() -> Finding:
    return Finding(present=False, score=0.0625, threshold=THRESHOLD, model_name=MODEL,
                   model_version=VERSION)


def _write(ds: pydicom.Dataset, path: Path) -> Path:
    path.write_bytes(encode(ds))
    return path


def _items(ds: pydicom.Dataset):
    """Every SR content item, depth first."""
    for item in ds.get("ContentSequence", []):
        yield item
        yield from _items(item)


def _named(ds: pydicom.Dataset, code: str) -> list[pydicom.Dataset]:
    return [i for i in _items(ds) if i.ConceptNameCodeSequence[0].CodeValue == code]


# --- the SR ---------------------------------------------------------------------------------


def test_sr_joins_the_source_study_in_a_new_series(series: SyntheticSeries, tmp_path: Path) -> None:
    src = series.images[0]
    sr = pydicom.dcmread(_write(structured_report(series.images, _finding(series)), tmp_path / "sr.dcm"))
    assert sr.SOPClassUID == Comprehensive3DSRStorage and sr.Modality == "SR"
    assert sr.StudyInstanceUID == src.StudyInstanceUID
    assert sr.SeriesInstanceUID != src.SeriesInstanceUID
    assert sr.SOPInstanceUID not in {ds.SOPInstanceUID for ds in series.images}
    assert (sr.SeriesNumber, sr.InstanceNumber) == (9001, 1)
    # The PACS files it with the patient's images only if the identity is the original one.
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber",
                    "StudyID", "StudyDate"):
        assert sr.get(keyword) == src.get(keyword), keyword
    (evidence,) = sr.CurrentRequestedProcedureEvidenceSequence
    assert evidence.StudyInstanceUID == src.StudyInstanceUID
    (ref_series,) = evidence.ReferencedSeriesSequence
    assert ref_series.SeriesInstanceUID == src.SeriesInstanceUID
    referenced = [i.ReferencedSOPInstanceUID for i in ref_series.ReferencedSOPSequence]
    assert sorted(referenced) == sorted(ds.SOPInstanceUID for ds in series.images)
    in_tree = {i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
               for i in _items(sr) if i.ValueType == "IMAGE"}
    assert in_tree == set(referenced)
    assert sr.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    assert (sr.Manufacturer, sr.ManufacturerModelName, sr.SoftwareVersions) == ("dicomops", MODEL, VERSION)
    assert (sr.CompletionFlag, sr.VerificationFlag) == ("COMPLETE", "UNVERIFIED")


def test_sr_values_read_back_with_pydicom(series: SyntheticSeries, tmp_path: Path) -> None:
    sr = pydicom.dcmread(_write(structured_report(series.images, _finding(series)), tmp_path / "sr.dcm"))
    probabilities = sorted(float(i.MeasuredValueSequence[0].NumericValue)
                           for i in _named(sr, codes.DCM.Probability.value))
    assert probabilities == sorted([SCORE, *NODULE_SCORES])
    (op,) = _named(sr, codes.DCM.CADOperatingPoint.value)
    assert float(op.MeasuredValueSequence[0].NumericValue) == THRESHOLD
    assert op.MeasuredValueSequence[0].MeasurementUnitsCodeSequence[0].CodeValue == "1"
    # Algorithm identification on the series group and on each nodule group.
    assert [i.TextValue for i in _named(sr, codes.DCM.AlgorithmVersion.value)] == [VERSION] * 3
    assert [i.TextValue for i in _named(sr, codes.DCM.AlgorithmName.value)] == [MODEL] * 3
    (device_model,) = _named(sr, codes.DCM.DeviceObserverModelName.value)
    assert device_model.TextValue == MODEL
    (device_maker,) = _named(sr, codes.DCM.DeviceObserverManufacturer.value)
    assert device_maker.TextValue == "dicomops"
    (device_name,) = _named(sr, codes.DCM.DeviceObserverName.value)
    assert VERSION in device_name.TextValue


def test_segmenter_sr_adds_solid_parts_and_the_actionable_score_in_a_declared_private_scheme(
        series: SyntheticSeries, tmp_path: Path) -> None:
    sr = pydicom.dcmread(_write(structured_report(series.images, _segmenter_finding(series)), tmp_path / "sr.dcm"))
    widths = _named(sr, SOLID_PART_WIDTH.value)
    assert sorted(float(i.MeasuredValueSequence[0].NumericValue) for i in widths) == sorted(SOLID_WIDTHS)
    assert {i.ConceptNameCodeSequence[0].CodingSchemeDesignator for i in widths} == {PRIVATE_SCHEME}
    assert {i.MeasuredValueSequence[0].MeasurementUnitsCodeSequence[0].CodeValue for i in widths} == {"mm"}
    (score,) = _named(sr, ACTIONABLE_SCORE.value)
    assert float(score.MeasuredValueSequence[0].NumericValue) == ACTIONABLE
    (scheme,) = sr.CodingSchemeIdentificationSequence
    assert scheme.CodingSchemeDesignator == PRIVATE_SCHEME and scheme.CodingSchemeResponsibleOrganization
    # The classifier's SR uses no private concept and declares none.
    plain = structured_report(series.images, _finding(series))
    assert "CodingSchemeIdentificationSequence" not in plain
    assert not _named(plain, SOLID_PART_WIDTH.value) and not _named(plain, ACTIONABLE_SCORE.value)


def test_a_series_score_that_is_not_a_probability_is_not_called_one_and_says_how_it_is_computed(
        series: SyntheticSeries, tmp_path: Path) -> None:
    rule = SeriesRule(3, "top_k_contrast")
    finding = dataclasses.replace(_finding(series), nodules=(), score_rule=rule.describe())
    sr = pydicom.dcmread(_write(structured_report(series.images, finding), tmp_path / "contrast.dcm"))
    (score,) = _named(sr, SERIES_SCORE.value)
    assert float(score.MeasuredValueSequence[0].NumericValue) == SCORE
    assert score.ConceptNameCodeSequence[0].CodingSchemeDesignator == PRIVATE_SCHEME
    assert not _named(sr, codes.DCM.Probability.value)
    (parameter,) = _named(sr, codes.DCM.AlgorithmParameters.value)
    assert parameter.TextValue == f"series score: {rule.describe()}"
    (scheme,) = sr.CodingSchemeIdentificationSequence
    assert scheme.CodingSchemeDesignator == PRIVATE_SCHEME
    # The feedback loop reads the score back whichever concept names it.
    report = read_report(sr)
    assert report is not None and report.score == SCORE
    plain = read_report(pydicom.dcmread(_write(structured_report(series.images, _finding(series)), tmp_path / "p.dcm")))
    assert plain is not None and plain.score == SCORE
    # A probability keeps DCM's concept and has no parameter.
    assert SeriesRule(3, "top_k_mean").is_probability and not rule.is_probability
    probability = structured_report(series.images, dataclasses.replace(finding, score_rule=None))
    assert not _named(probability, SERIES_SCORE.value) and not _named(probability, codes.DCM.AlgorithmParameters.value)
    with pytest.raises(ValueError, match="score_rule"):
        dataclasses.replace(finding, score_rule=" ")


def test_sr_content_parses_back_with_highdicom(series: SyntheticSeries, tmp_path: Path) -> None:
    src = series.images[0]
    sr = hd.sr.srread(_write(structured_report(series.images, _finding(series)), tmp_path / "sr.dcm"))
    report = hd.sr.MeasurementReport.from_sequence(sr.content)

    (group,) = report.get_image_measurement_groups()
    assert group.finding_type == codes.SCT.Nodule
    assert [s.value for s in group.finding_sites] == [codes.SCT.Lung]
    (call,) = group.get_qualitative_evaluations(name=codes.SCT.Nodule)
    assert call.value == codes.SCT.Present
    (score,) = group.get_measurements(name=codes.DCM.Probability)
    (threshold,) = group.get_measurements(name=codes.DCM.CADOperatingPoint)
    assert (score.value, threshold.value) == (SCORE, THRESHOLD)
    assert score.unit == codes.UCUM.NoUnits
    assert {img.referenced_sop_instance_uid for img in group.source_images} == {
        ds.SOPInstanceUID for ds in series.images}

    nodules = report.get_volumetric_roi_measurement_groups()
    assert [g.tracking_identifier for g in nodules] == ["Nodule 1", "Nodule 2"]
    for g, truth, nodule_score in zip(nodules, series.nodules, NODULE_SCORES, strict=True):
        surface = g.roi
        assert isinstance(surface, hd.sr.VolumeSurface)
        assert surface.graphic_type == hd.sr.GraphicTypeValues3D.POINT
        assert surface.frame_of_reference_uid == src.FrameOfReferenceUID
        assert not surface.has_source_images()
        series_ref = surface.source_series_for_segmentation
        assert series_ref is not None and series_ref.value == src.SeriesInstanceUID
        np.testing.assert_allclose(np.ravel(surface.graphic_data), truth["center_mm"], atol=1e-3)
        (diameter,) = g.get_measurements(name=codes.SCT.Diameter)
        assert diameter.unit == codes.UCUM.Millimeter
        assert diameter.value == pytest.approx(truth["diameter_mm"])
        (own_score,) = g.get_measurements(name=codes.DCM.Probability)
        assert own_score.value == nodule_score

    (observer,) = report.get_observer_contexts()
    assert observer.observer_type == codes.DCM.Device


def test_absent_finding_gives_a_report_without_nodules(series: SyntheticSeries, tmp_path: Path) -> None:
    sr = hd.sr.srread(_write(structured_report(series.images, _absent()), tmp_path / "sr.dcm"))
    report = hd.sr.MeasurementReport.from_sequence(sr.content)
    (group,) = report.get_image_measurement_groups()
    (call,) = group.get_qualitative_evaluations(name=codes.SCT.Nodule)
    assert call.value == codes.SCT.Absent
    assert group.get_measurements(name=codes.DCM.Probability)[0].value == 0.0625
    assert report.get_volumetric_roi_measurement_groups() == []
    assert not [i for i in _items(sr) if i.ValueType == "SCOORD3D"]


def test_a_result_made_again_has_the_same_uids_and_another_result_new_ones(series: SyntheticSeries) -> None:
    # The same result for the same images (a store retried after the PACS went away): the same
    # UIDs, so the PACS keeps one copy. Anything else that differs: new ones.
    a, b = structured_report(series.images, _absent()), structured_report(series.images, _absent())
    assert (a.SOPInstanceUID, a.SeriesInstanceUID) == (b.SOPInstanceUID, b.SeriesInstanceUID)
    uids = {(a.SOPInstanceUID, a.SeriesInstanceUID)}
    others = [structured_report(series.images, dataclasses.replace(_absent(), score=0.0626)),
              structured_report(series.images, dataclasses.replace(_absent(), model_version="99")),
              structured_report(series.images[1:], _absent()),
              structured_report(series.images, _absent(), series_number=9003)]
    for other in others:
        assert other.SOPInstanceUID not in {u for u, _ in uids} and other.SeriesInstanceUID not in {s for _, s in uids}
        uids.add((other.SOPInstanceUID, other.SeriesInstanceUID))
    originals = {str(ds.SOPInstanceUID) for ds in series.images} | {str(series.images[0].SeriesInstanceUID)}
    assert not {u for pair in uids for u in pair} & originals
    one = segmentation(series.images, series.mask, _finding(series))
    assert one.SOPInstanceUID == segmentation(series.images, series.mask, _finding(series)).SOPInstanceUID
    fewer = series.mask.copy()
    fewer[0] = False
    assert segmentation(series.images, fewer, _finding(series)).SOPInstanceUID != one.SOPInstanceUID


# --- the SEG --------------------------------------------------------------------------------


def test_seg_reads_back_to_the_same_mask(series: SyntheticSeries, tmp_path: Path) -> None:
    src = series.images[0]
    # The nodules reach every slice of this thin series; blank three so that empty frames are
    # left out of the SEG and must come back as zeros in the right places.
    mask = series.mask.copy()
    mask[[0, 1, 7]] = False
    path = _write(segmentation(series.images, mask, _finding(series)), tmp_path / "seg.dcm")
    seg = hd.seg.segread(path)
    assert seg.SOPClassUID == SegmentationStorage and seg.SegmentationType == "BINARY"
    assert seg.StudyInstanceUID == src.StudyInstanceUID
    assert seg.SeriesInstanceUID != src.SeriesInstanceUID
    assert seg.PatientID == src.PatientID
    # Frames without nodule voxels are omitted; reading by source instance fills them back.
    assert seg.NumberOfFrames == len(series.images) - 3
    pixels = seg.get_pixels_by_source_instance(
        [ds.SOPInstanceUID for ds in series.images], segment_numbers=[1],
    )
    np.testing.assert_array_equal(pixels[..., 0].astype(bool), mask)
    description = seg.get_segment_description(1)
    assert description.segment_label == "Lung nodule"
    assert description.segmented_property_type == codes.SCT.Nodule
    assert description.algorithm_type == hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC
    algorithm = description.algorithm_identification[0]
    assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion) == (MODEL, VERSION)


def test_seg_accepts_a_0_1_integer_mask(series: SyntheticSeries) -> None:
    seg = segmentation(series.images, series.mask.astype(np.uint8), _finding(series))
    assert seg.NumberOfFrames == int(series.mask.any(axis=(1, 2)).sum())


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda m: np.zeros_like(m), "mask is empty"),
        (lambda m: m[:-1], "does not match the source images"),
        (lambda m: m.astype(np.uint8) * 2, "only 0 and 1"),
    ],
)
def test_seg_refuses_a_mask_it_cannot_honour(series: SyntheticSeries, change, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        segmentation(series.images, change(series.mask), _finding(series))


def test_seg_refuses_an_absent_finding(series: SyntheticSeries) -> None:
    with pytest.raises(ValueError, match="present is False"):
        segmentation(series.images, series.mask, _absent())


# --- validation at the boundary ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(score=1.5), "score must be a probability"),
        (dict(threshold=float("nan")), "threshold must be a probability"),
        (dict(model_version=" "), "model_version must be a non-empty"),
        (dict(present=False, nodules=(Nodule((0.0, 0.0, 0.0), 5.0, 0.5),)), "cannot list nodules"),
        (dict(actionable=-0.25), "actionable must be a probability"),
    ],
)
def test_finding_names_the_bad_argument(kwargs: dict, message: str) -> None:
    base = dict(present=True, score=0.5, threshold=0.5, model_name=MODEL, model_version=VERSION)
    with pytest.raises(ValueError, match=message):
        Finding(**{**base, **kwargs})


def test_nodule_rejects_a_non_positive_diameter() -> None:
    with pytest.raises(ValueError, match="diameter_mm"):
        Nodule((1.0, 2.0, 3.0), 0.0, 0.5)
    with pytest.raises(ValueError, match="solid_width_mm"):
        Nodule((1.0, 2.0, 3.0), 5.0, 0.5, solid_width_mm=-1.0)


def test_mixed_series_are_refused_without_quoting_uids(series: SyntheticSeries) -> None:
    other = copy.deepcopy(series.images[1])
    other.SeriesInstanceUID = pydicom.uid.generate_uid()
    with pytest.raises(ValueError, match="SeriesInstanceUID") as err:
        structured_report([series.images[0], other], _absent())
    assert series.images[0].SeriesInstanceUID not in str(err.value)
    with pytest.raises(ValueError, match="empty"):
        structured_report([], _absent())


def test_encode_gives_part10_bytes(series: SyntheticSeries) -> None:
    sr = structured_report(series.images, _absent())
    data = encode(sr)
    assert data[128:132] == b"DICM"
    assert pydicom.dcmread(pydicom.filebase.DicomBytesIO(data)).SOPInstanceUID == sr.SOPInstanceUID


# --- nothing identifying leaves through logs or warnings ---------------------------------------


def test_nothing_identifying_is_logged_or_warned(series: SyntheticSeries, caplog: pytest.LogCaptureFixture,
                                                 recwarn: pytest.WarningsRecorder) -> None:
    caplog.set_level(logging.DEBUG)  # highdicom logs source SOP Instance UIDs at INFO
    finding = _finding(series)
    encode(structured_report(series.images, finding))
    encode(structured_report(series.images, _absent()))
    encode(segmentation(series.images, series.mask, finding))

    src = series.images[0]
    secrets = {str(src.PatientName), src.PatientID, src.AccessionNumber, src.StudyInstanceUID,
               src.SeriesInstanceUID, src.FrameOfReferenceUID, src.PatientBirthDate,
               *(ds.SOPInstanceUID for ds in series.images), *series.phi}
    secrets.discard("")
    said = [r.getMessage() for r in caplog.records] + [str(w.message) for w in recwarn]
    leaks = [(s, line) for line in said for s in secrets if s in line]
    assert not leaks


def test_the_libraries_that_log_identifiers_say_nothing_under_error() -> None:
    """Their modules' loggers (highdicom's SEG reader warns with the SOP Instance UIDs of odd
    references; dicomweb-client logs each request's path) inherit the level the package sets."""
    for name in ("highdicom.seg.sop", "highdicom.sr.templates", "dicomweb_client.web"):
        logger = logging.getLogger(name)
        assert not logger.isEnabledFor(logging.WARNING) and logger.isEnabledFor(logging.ERROR), name


def test_library_warnings_that_quote_values_are_not_issued_in_any_thread() -> None:
    """pydicom warns with the value in the text (an invalid UID when it is set, written and read; a
    malformed date in a PACS's JSON), highdicom with a person name it finds odd. In a process that
    imported dicomops, with Python's default filters, none reaches stderr, from four threads at
    once, and the process's filters are those it started with (no per-call swap that threads undo)."""
    script = textwrap.dedent("""
        import io, threading, warnings
        import dicomops
        import highdicom as hd
        import pydicom
        from pydicom.dataset import Dataset, FileMetaDataset
        from pydicom.uid import ExplicitVRLittleEndian
        from dicomops.pacs.client import _from_json

        UID = "1.2.826.0.1.3680043.2.1125.01.4711"
        before = list(warnings.filters)

        def work():
            for _ in range(20):
                ds = Dataset()
                ds.SOPInstanceUID = UID
                ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
                ds.file_meta = FileMetaDataset()
                ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
                buffer = io.BytesIO()
                ds.save_as(buffer, enforce_file_format=True)
                pydicom.dcmread(io.BytesIO(buffer.getvalue()))
                _from_json({"00080020": {"vr": "DA", "Value": ["2024-01-01"]},
                            "00080018": {"vr": "UI", "Value": [UID]}})
                hd.sr.PersonObserverIdentifyingAttributes(name="WHITFIELD FREDERICK")

        threads = [threading.Thread(target=work) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        print("same filters" if warnings.filters == before else "filters changed")
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, env=env,
                         timeout=120)
    assert out.stdout.strip() == "same filters"
    for secret in ("1.2.826.0.1.3680043.2.1125.01.4711", "2024-01-01", "WHITFIELD"):
        assert secret not in out.stderr, out.stderr[-2000:]


# --- dciodvfy (dicom3tools) -----------------------------------------------------------------

DCIODVFY = shutil.which("dciodvfy")


# CI installs dicom3tools first (.ci/run) and must not skip this; elsewhere it is optional.
requires_dciodvfy = pytest.mark.skipif(DCIODVFY is None and not os.environ.get("CI"),
                                       reason="dciodvfy not installed: apt-get install -y dicom3tools")


def _dciodvfy(ds: pydicom.Dataset, path: Path) -> list[str]:
    """dciodvfy's errors and warnings on `ds`, less those about the private scheme (declared)."""
    run = subprocess.run([str(DCIODVFY), str(_write(ds, path))], capture_output=True, text=True, timeout=60)
    lines = (run.stdout + run.stderr).splitlines()
    assert run.returncode == 0, "\n".join(lines)
    return [line for line in lines if line.startswith(("Error", "Warning")) and PRIVATE_SCHEME not in line]


@requires_dciodvfy
@pytest.mark.parametrize("kind", ["sr-present", "sr-contrast", "sr-segmenter", "sr-absent", "seg"])
def test_dciodvfy_finds_no_errors(series: SyntheticSeries, tmp_path: Path, kind: str) -> None:
    if kind == "sr-present":
        ds: pydicom.Dataset = structured_report(series.images, _finding(series))
    elif kind == "sr-contrast":
        ds = structured_report(series.images, dataclasses.replace(
            _finding(series), nodules=(), score_rule=SeriesRule(3, "top_k_contrast").describe()))
    elif kind == "sr-segmenter":
        ds = structured_report(series.images, _segmenter_finding(series))
    elif kind == "sr-absent":
        ds = structured_report(series.images, _absent())
    else:
        ds = segmentation(series.images, series.mask, _finding(series))
    path = _write(ds, tmp_path / f"{kind}.dcm")
    run = subprocess.run([str(DCIODVFY), str(path)], capture_output=True, text=True, timeout=60)
    lines = (run.stdout + run.stderr).splitlines()
    errors = [line for line in lines if line.startswith("Error")]
    warnings_left = [line for line in lines if line.startswith("Warning")]
    print(f"dciodvfy {kind}: {len(warnings_left)} warnings", *warnings_left, sep="\n")
    assert not errors, "\n".join(lines)
    assert run.returncode == 0, "\n".join(lines)


# --- source headers the ingest gate lets through ------------------------------------------------

# Type 2 patient and study attributes a source image may lack (the gate accepts it) and that
# highdicom reads from it.
TYPE2_GAPS = ("PatientName", "PatientID", "PatientBirthDate", "StudyDate", "StudyTime", "StudyID",
              "AccessionNumber", "ReferringPhysicianName")


def _variant(series: SyntheticSeries, change) -> list[pydicom.Dataset]:
    """The series with `change` applied to each header, written and read back as a file would be."""
    out = []
    for ds in series.images:
        ds = copy.deepcopy(ds)
        change(ds)
        out.append(pydicom.dcmread(pydicom.filebase.DicomBytesIO(encode(ds))))
    return out


@requires_dciodvfy
def test_results_are_made_for_headers_lacking_type2_attributes_or_with_sex_u(
        series: SyntheticSeries, tmp_path: Path) -> None:
    def gaps(ds: pydicom.Dataset) -> None:
        for keyword in TYPE2_GAPS:
            delattr(ds, keyword)
        ds.PatientSex = "U"  # not one of highdicom's M, F, O

    images = _variant(series, gaps)
    finding = _segmenter_finding(series)
    for kind, result in (("sr", structured_report(images, finding)),
                         ("seg", segmentation(images, series.mask, finding))):
        path = tmp_path / f"{kind}.dcm"
        # Empty as the source left them: a DICOMDIR would want values, the IOD does not.
        findings = [line for line in _dciodvfy(result, path) if "needed to build DICOMDIR" not in line]
        assert not findings, kind
        back = pydicom.dcmread(path)
        for keyword in (*TYPE2_GAPS, "PatientSex"):
            assert keyword in back and back[keyword].value in ("", None), (kind, keyword)
        assert back.StudyInstanceUID == images[0].StudyInstanceUID
    # Built from copies: the caller's headers still lack them and still say "U".
    assert not [keyword for ds in images for keyword in TYPE2_GAPS if keyword in ds]
    assert {ds.PatientSex for ds in images} == {"U"}


@requires_dciodvfy
def test_only_results_with_coordinates_need_a_frame_of_reference(series: SyntheticSeries, tmp_path: Path) -> None:
    images = _variant(series, lambda ds: delattr(ds, "FrameOfReferenceUID"))
    classifier = Finding(present=True, score=SCORE, threshold=THRESHOLD, model_name=MODEL, model_version=VERSION)
    for finding in (classifier, _absent()):
        sr = structured_report(images, finding)
        assert "FrameOfReferenceUID" not in sr and not [i for i in _items(sr) if i.ValueType == "SCOORD3D"]
        assert not _dciodvfy(sr, tmp_path / "sr.dcm")
    with pytest.raises(ValueError, match="lacks FrameOfReferenceUID"):
        structured_report(images, _finding(series))
    with pytest.raises(ValueError, match="lacks FrameOfReferenceUID"):
        segmentation(images, series.mask, _finding(series))


JAPANESE = "Yamada^Tarou=山田^太郎=やまだ^たろう"


@requires_dciodvfy
@pytest.mark.parametrize(
    ("charset", "name", "written"),
    [
        # PS3.5 H.3.1's form: value 1 empty means the default repertoire, ISO 2022 IR 6.
        (["", "ISO 2022 IR 87"], JAPANESE, ["ISO 2022 IR 6", "ISO 2022 IR 87"]),
        # A single value needs no code extensions: its form without them.
        ("ISO 2022 IR 100", "Müller^Jürgen", "ISO_IR 100"),
        ("ISO 2022 IR 6", "Plain^Name", None),
        # highdicom 0.28 refuses ISO 2022 IR 149 (Korean), a defined term all the same.
        (["", "ISO 2022 IR 149"], "Hong^Gildong=洪^吉洞=홍^길동", ["ISO 2022 IR 6", "ISO 2022 IR 149"]),
        ("ISO_IR 192", "Ωmega^Jürgen=山田^太郎", "ISO_IR 192"),
    ],
)
def test_source_character_sets_are_normalised_and_the_name_round_trips(
        series: SyntheticSeries, tmp_path: Path, charset, name: str, written) -> None:
    def encoded(ds: pydicom.Dataset) -> None:
        ds.SpecificCharacterSet = charset
        ds.PatientName = name

    images = _variant(series, encoded)
    assert str(images[0].PatientName) == name
    finding = _finding(series)
    for kind, result in (("sr", structured_report(images, finding)),
                         ("seg", segmentation(images, series.mask, finding))):
        path = tmp_path / f"{kind}.dcm"
        assert not _dciodvfy(result, path), kind
        back = pydicom.dcmread(path)
        assert back.get("SpecificCharacterSet") == written, kind
        assert str(back.PatientName) == name, kind
    assert images[0].SpecificCharacterSet == charset


@requires_dciodvfy
@pytest.mark.parametrize(
    ("charset", "name", "written"),
    [
        # Named as the Python codec pydicom read them with: the text is what the source meant.
        ("UTF-8", "Ωmega^Jürgen=山田^太郎", "ISO_IR 192"),
        ("latin1", "Müller^Jürgen", "ISO_IR 100"),
        ("ISO-8859-1", "Müller^Jürgen", "ISO_IR 100"),
        ("ISO-8859-5", "Иванов^Иван", "ISO_IR 144"),
        # Misspelt as pydicom corrects it.
        ("ISO IR 100", "Müller^Jürgen", "ISO_IR 100"),
        # Not a term, not a name of one, but every text value is plain ASCII: the default repertoire.
        ("windows-1252", "Plain^Name", None),
        ("FOO 1", "Plain^Name", None),
        (["ISO_IR 192", "ISO 2022 IR 87"], "Plain^Name", None),
    ],
)
def test_a_character_set_named_otherwise_or_over_plain_ascii_text_is_answered(
        series: SyntheticSeries, tmp_path: Path, caplog: pytest.LogCaptureFixture, charset, name: str,
        written) -> None:
    def encoded(ds: pydicom.Dataset) -> None:
        ds.SpecificCharacterSet = charset
        ds.PatientName = name

    images = _variant(series, encoded)
    assert str(images[0].PatientName) == name
    finding = _finding(series)
    caplog.set_level(logging.WARNING, logger="dicomops.pacs.results")
    for kind, result in (("sr", structured_report(images, finding)),
                         ("seg", segmentation(images, series.mask, finding))):
        path = tmp_path / f"{kind}.dcm"
        assert not _dciodvfy(result, path), kind
        back = pydicom.dcmread(path)
        assert back.get("SpecificCharacterSet") == written, kind
        assert str(back.PatientName) == name, kind
    said = [r.getMessage() for r in caplog.records if r.name == "dicomops.pacs.results"]
    assert said and all("SpecificCharacterSet" in line for line in said)
    assert not [line for line in said for v in _values_of(charset) if v in line]
    assert images[0].SpecificCharacterSet == charset


def _values_of(charset) -> list[str]:
    return [charset] if isinstance(charset, str) else list(charset)


@pytest.mark.parametrize(
    ("charset", "name"),
    [
        # A codec no defined term reads as: the accented letters may be others under the set meant.
        ("windows-1252", "Müller^Jürgen"),
        ("FOO 1", "Müller^Jürgen"),
        # A stand-alone set with others: which one the text is in is a guess.
        (["GB18030", "ISO 2022 IR 100"], "Ωmega^Jürgen"),
    ],
)
def test_a_character_set_ps3_3_does_not_define_over_other_text_is_refused_saying_what_to_change(
        series: SyntheticSeries, charset, name: str) -> None:
    def encoded(ds: pydicom.Dataset) -> None:
        ds.SpecificCharacterSet = charset
        ds.PatientName = name

    images = _variant(series, encoded)
    with pytest.raises(ValueError, match=r"SpecificCharacterSet .* correct it in their headers") as err:
        structured_report(images, _absent())
    assert not [v for v in _values_of(charset) if v in str(err.value)]


def test_a_result_made_again_has_the_same_tracking_uids(series: SyntheticSeries) -> None:
    # The same SOP Instance UID must mean the same object: a store retried with a rebuilt result
    # carries the tracking UIDs a reader's correction may already reference.
    def tracking(sr: pydicom.Dataset) -> list[str]:
        return [i.UID for i in _named(sr, codes.DCM.TrackingUniqueIdentifier.value)]

    finding = _finding(series)
    first, again = structured_report(series.images, finding), structured_report(series.images, finding)
    assert first.SOPInstanceUID == again.SOPInstanceUID
    assert len(set(tracking(first))) == 3 and tracking(first) == tracking(again)
    other = structured_report(series.images, dataclasses.replace(finding, score=0.8126))
    assert not set(tracking(other)) & set(tracking(first))

    one, twice = (segmentation(series.images, series.mask, finding) for _ in range(2))
    assert one.SOPInstanceUID == twice.SOPInstanceUID
    assert one.SegmentSequence[0].TrackingUID == twice.SegmentSequence[0].TrackingUID
    assert one.SegmentSequence[0].TrackingUID not in tracking(first)
    fewer = series.mask.copy()
    fewer[0] = False
    assert segmentation(series.images, fewer, finding).SegmentSequence[0].TrackingUID != \
        one.SegmentSequence[0].TrackingUID


# --- values a scanner writes in its own form ----------------------------------------------------


def _raw_variant(series: SyntheticSeries, keyword: str, raw: bytes) -> list[pydicom.Dataset]:
    """The series with `keyword` holding the bytes `raw` as a scanner wrote them, read back."""
    tag = Tag(tag_for_keyword(keyword))

    def change(ds: pydicom.Dataset) -> None:
        ds[tag] = RawDataElement(tag, dictionary_VR(keyword), len(raw), raw, 0, False, True)

    return _variant(series, change)


def _copied(back: pydicom.Dataset, keyword: str):
    """`keyword` as the result carries it (None when absent); the Acquisition DateTime is the
    Contribution DateTime of the acquisition equipment."""
    if keyword == "AcquisitionDateTime":
        (item,) = [i for i in back.ContributingEquipmentSequence
                   if i.PurposeOfReferenceCodeSequence[0].CodeValue == codes.DCM.AcquisitionEquipment.value]
        return item.get("ContributionDateTime")
    return back.get(keyword)


def _answered_without_the_value(series: SyntheticSeries, tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                keyword: str, raw: bytes, expected) -> None:
    """Both objects are made, valid to dciodvfy, with `expected` where the source said `raw`, and a
    warning that names `keyword` and quotes neither."""
    images = _raw_variant(series, keyword, raw)
    before = copy.deepcopy(images[0][keyword].value)
    caplog.set_level(logging.WARNING, logger="dicomops.pacs.results")
    finding = _segmenter_finding(series)
    for kind, result in (("sr", structured_report(images, finding)),
                         ("seg", segmentation(images, series.mask, finding))):
        path = tmp_path / f"{kind}.dcm"
        # A Type 2 attribute written empty: a DICOMDIR would want a value, the IOD does not.
        assert not [line for line in _dciodvfy(result, path) if "needed to build DICOMDIR" not in line], kind
        back = pydicom.dcmread(path)
        assert _copied(back, keyword) == expected, kind
        assert back.StudyInstanceUID == images[0].StudyInstanceUID and back.PatientID == images[0].PatientID
    said = [r.getMessage() for r in caplog.records if r.name == "dicomops.pacs.results"]
    assert len(said) == 2 and all(keyword in line for line in said), said
    quoted = {raw.decode().strip(), *raw.decode().strip().split("\\"), *([expected] if expected else [])}
    assert not [line for line in said for v in quoted if v in line]
    assert images[0][keyword].value == before  # the caller's headers are not changed


@requires_dciodvfy
@pytest.mark.parametrize(
    ("keyword", "raw", "expected"),
    [
        # ACR-NEMA 300's forms, which PS3.5 6.2 names for DA and TM: one reading each.
        ("StudyDate", b"2019.03.14", "20190314"),
        ("PatientBirthDate", b"1970.01.02", "19700102"),
        ("StudyTime", b"12:30:00.5 ", "123000.5"),
        # Anything else not of the form: Type 2 empty, Type 3 left out.
        ("StudyDate", b"14/03/2019", ""),
        ("StudyDate", b"03/14/2019", ""),
        ("StudyDate", b"2019-03-14", ""),
        ("StudyDate", b"20190314 1200", ""),
        ("StudyDate", b"20190231", ""),
        ("PatientBirthDate", b"19700102\\19700103", ""),
        ("StudyTime", b"12h30", ""),
        ("StudyTime", b"12:30", ""),
        ("PatientBirthTime", b"25:00", None),
        ("LastMenstrualDate", b"2019/03/01", None),
        ("AcquisitionDateTime", b"2019-03-14T10:00:00", None),
        ("AcquisitionDateTime", b"20190314103000+01:00", None),
    ],
)
def test_dates_and_times_not_of_their_vr_form_are_written_in_it_or_not_copied(
        series: SyntheticSeries, tmp_path: Path, caplog: pytest.LogCaptureFixture, keyword: str, raw: bytes,
        expected) -> None:
    _answered_without_the_value(series, tmp_path, caplog, keyword, raw, expected)


@requires_dciodvfy
@pytest.mark.parametrize(
    ("keyword", "raw", "expected"),
    [
        # The unit given, the leading zeros missing: one reading.
        ("PatientAge", b"45Y ", "045Y"),
        ("PatientAge", b"7M", "007M"),
        # No unit, or one in words: not read (Patient's Age is Type 3: left out).
        ("PatientAge", b"45", None),
        ("PatientAge", b"045 ", None),
        ("PatientAge", b"45 Years", None),
        ("PatientAge", b"45y ", None),
        # Patient Study's measurements are DS: a unit or a decimal comma is not one.
        ("PatientWeight", b"70kg", None),
        ("PatientSize", b"1,75", None),
    ],
)
def test_ages_and_measurements_not_of_their_vr_form_are_written_in_it_or_not_copied(
        series: SyntheticSeries, tmp_path: Path, caplog: pytest.LogCaptureFixture, keyword: str, raw: bytes,
        expected) -> None:
    _answered_without_the_value(series, tmp_path, caplog, keyword, raw, expected)


def test_values_of_their_form_are_copied_as_they_are(series: SyntheticSeries, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="dicomops.pacs.results")
    for keyword, raw in (("PatientAge", b"045Y"), ("StudyTime", b"123000.25 "), ("PatientWeight", b"70.5"),
                         ("AcquisitionDateTime", b"20190314103000.5+0100")):
        sr = structured_report(_raw_variant(series, keyword, raw), _segmenter_finding(series))
        assert str(_copied(sr, keyword)) == raw.decode().strip(), keyword
    assert not [r for r in caplog.records if r.name == "dicomops.pacs.results"]


def test_every_formatted_value_highdicom_copies_is_checked() -> None:
    """The patient and study attributes highdicom copies from a CT image (its module tables) whose
    VR has a fixed form are all among those checked before they are copied."""
    from highdicom._standard_utils import (
        get_iod_module_map,
        get_module_attribute_map,
        get_sop_class_iod_map,
    )

    from dicomops.pacs import results

    iod = get_sop_class_iod_map()[pydicom.uid.CTImageStorage]
    attributes = get_module_attribute_map()
    copied = {item["keyword"] for module in get_iod_module_map()[iod] if module["ie"] in ("Patient", "Study")
              for item in attributes[module["key"]] if not item["path"]}
    formatted = {k for k in copied if dictionary_VR(k) in ("DA", "TM", "DT", "AS", "DS")}
    assert formatted and formatted <= set(results._COPIED_FORMATTED)


# --- telling the results apart in the PACS ------------------------------------------------------


SEGMENTER = "dicomops-ct-nodule-seg"


@requires_dciodvfy
def test_each_kind_of_result_has_its_own_series_description_and_keeps_its_uids(
        series: SyntheticSeries, tmp_path: Path) -> None:
    classifier = dataclasses.replace(_finding(series), nodules=())
    segmenter = dataclasses.replace(_segmenter_finding(series), model_name=SEGMENTER)
    # A segmenter that found nothing says as little as the classifier: it still reads apart.
    nothing = dataclasses.replace(_absent(), model_name=SEGMENTER)
    made = {"classifier": structured_report(series.images, classifier),
            "segmenter": structured_report(series.images, segmenter, series_number=9003),
            "segmenter-absent": structured_report(series.images, nothing, series_number=9003),
            "seg": segmentation(series.images, series.mask, segmenter, series_number=9002)}
    descriptions = {kind: ds.SeriesDescription for kind, ds in made.items()}
    assert len({descriptions["classifier"], descriptions["segmenter"], descriptions["seg"]}) == 3
    assert descriptions["segmenter"] == descriptions["segmenter-absent"]
    assert MODEL in descriptions["classifier"] and SEGMENTER in descriptions["segmenter"]
    for kind, ds in made.items():
        assert not _dciodvfy(ds, tmp_path / f"{kind}.dcm"), kind
    # The UIDs are derived from each kind's first description, not from the one shown: a study
    # answered before gets the same objects again, not a second SR.
    for kind, finding, number in (("classifier", classifier, 9001), ("segmenter", segmenter, 9003)):
        assert (made[kind].SeriesInstanceUID, made[kind].SOPInstanceUID) == result_uids(
            series.images, finding, "dicomops lung nodule report", number), kind
    # A registered name as long as an LO allows still leaves a description that fits.
    long_name = dataclasses.replace(classifier, model_name="m" * 64)
    sr = structured_report(series.images, long_name)
    assert len(sr.SeriesDescription) <= 64 and not _dciodvfy(sr, tmp_path / "long.dcm")
