"""Model results as DICOM objects the PACS files next to the images they describe.

The clinical side answers the original study, so these objects carry the original patient and
study identity. That identity is copied from the source datasets into the returned object and
nowhere else: this module logs no header value (when a source holds one the result cannot carry as
it is, such as a date in a scanner's own format, an age without its unit or a character set named
as a programming language names it, the warning names the attribute and what was done), and what
highdicom would log (its INFO records quote source SOP Instance UIDs) and the libraries' warnings
(pydicom's quote values) are held back for the whole process (``dicomops/__init__.py``).

Two objects per analysed series:

* :func:`structured_report` — a Comprehensive 3D SR holding a TID 1500 Measurement Report: the
  series-level finding (nodule present or absent), the model's score and operating point, and one
  volumetric group per nodule with its centre as a 3D point and its diameter.
* :func:`segmentation` — a binary SEG of the nodule voxels, only when there is something to show.

:func:`encode` turns either into Part 10 bytes for STOW-RS.
"""

from __future__ import annotations

import codecs
import datetime
import hashlib
import io
import logging
import math
import re
from collections.abc import MutableSequence, Sequence
from dataclasses import dataclass
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
from pydicom.charset import convert_encodings, python_encoding
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from dicomops.dicom.forms import TIME_FRACTION, time_pattern

log = logging.getLogger(__name__)

MANUFACTURER = "dicomops"
SR_SERIES_DESCRIPTION = "dicomops lung nodule report"
SEG_SERIES_DESCRIPTION = "dicomops lung nodule segmentation"
# What the result's UIDs are derived from (:func:`result_uids`): the descriptions each kind of object
# was first written with, kept when the descriptions a reader sees change, so that a study answered
# before gets the same UIDs when answered again and the PACS keeps one copy of each object.
SR_KIND, SEG_KIND = SR_SERIES_DESCRIPTION, SEG_SERIES_DESCRIPTION
SEGMENT_LABEL = "Lung nodule"

# Coded concepts, named once so readers of the SR and the tests agree on them.
FINDING_CATEGORY = codes.SCT.MorphologicallyAbnormalStructure  # CID 7150 / TID 1501 category
FINDING_TYPE = codes.SCT.Nodule  # CID 7151 "Nodule"; the finding site says where
FINDING_SITE = codes.SCT.Lung
PRESENT = codes.SCT.Present  # CID 241 Present-Absent Only
ABSENT = codes.SCT.Absent
SCORE = codes.DCM.Probability
OPERATING_POINT = codes.DCM.CADOperatingPoint
DIAMETER = codes.SCT.Diameter
NO_UNITS = codes.UCUM.NoUnits  # UCUM "1": a probability and a threshold on it have no unit
MILLIMETER = codes.UCUM.Millimeter
PROCEDURE = codes.LN.CTUnspecifiedBodyRegion  # CID 100; the finding site narrows it to the lung
SERIES_TRACKING_ID = "Lung nodule finding"
# No standard concept names the width of a nodule's solid part or a score for "an actionable
# nodule" (a national lung-screening guide in FHIR uses local codes for the solid part's size too),
# so these two live in a private coding scheme, which every SR that uses them declares in its
# Coding Scheme Identification Sequence.
PRIVATE_SCHEME = "99DICOMOPS"
PRIVATE_SCHEME_NAME = "dicomops lung nodule measurements"
SOLID_PART_WIDTH = hd.sr.CodedConcept("SOLIDW", PRIVATE_SCHEME, "Solid part width")
ACTIONABLE_SCORE = hd.sr.CodedConcept("ACTSCORE", PRIVATE_SCHEME, "Actionable nodule score")
# A series score that is not a probability (the classifier's series rule top_k_contrast: how far the
# best slices stand above the series' own): DCM "Probability" would tell a reader that 0.62 means
# 62 %. How it is computed goes with it, as the algorithm's parameter (Finding.score_rule).
SERIES_SCORE = hd.sr.CodedConcept("SERSCORE", PRIVATE_SCHEME, "Nodule series score")

# Type 2 patient and study attributes highdicom reads from the first source image as attributes
# (highdicom/sr/sop.py, seg/sop.py): a header can lack them and pass the ingest gate, and a result
# may carry them empty. highdicom takes Patient's Sex only as M, F or O.
_TYPE2_IDENTITY = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                   "ReferringPhysicianName", "StudyID", "AccessionNumber")
_PATIENT_SEX = frozenset(value.value for value in hd.PatientSexValues)
# PS3.3 C.12.1.1.2: each single-byte set has a term without code extensions, for a Specific
# Character Set of one value, and one with them, for several values; the multi-byte sets with code
# extensions follow the default repertoire; the stand-alone sets take no others.
_DEFAULT_REPERTOIRE = "ISO 2022 IR 6"
_SINGLE_BYTE = ("100", "101", "109", "110", "144", "127", "126", "138", "148", "203", "13", "166")
_MULTI_BYTE = ("ISO 2022 IR 87", "ISO 2022 IR 159", "ISO 2022 IR 149", "ISO 2022 IR 58")
_STAND_ALONE = ("ISO_IR 192", "GB18030", "GBK")
_CODE_EXTENSIONS = frozenset({_DEFAULT_REPERTOIRE, *_MULTI_BYTE, *(f"ISO 2022 IR {n}" for n in _SINGLE_BYTE)})
_HIGHDICOM_CHARSETS = frozenset(value.value for value in hd.SpecificCharacterSetValues)
# The single-value terms by the Python codec pydicom decodes them with: a source that names the codec
# ("UTF-8", "latin1") was decoded with exactly the term's codec. Not ISO_IR 13: pydicom reads it as
# Shift JIS, which holds far more than JIS X 0201.
_TERM_FOR_CODEC = {codecs.lookup(python_encoding[term]).name: term
                   for term in (*(f"ISO_IR {n}" for n in _SINGLE_BYTE if n != "13"), *_STAND_ALONE)
                   if term in python_encoding}
_PLAIN_TEXT = re.compile(r"[\x20-\x7e\t\n\r\f]*")
_TEXT_VRS = frozenset({"SH", "LO", "ST", "LT", "UT", "UC", "PN"})

# Values of a fixed form (PS3.5 6.2) that highdicom copies from the first source image into the
# result: the Patient, General Study and Patient Study modules' dates, times, age and measurements,
# and the Acquisition DateTime it writes as the acquisition equipment's Contribution DateTime. A
# value not of its VR's form is not copied: a Type 2 one is written empty, the others left out.
_COPIED_FORMATTED = ("PatientBirthDate", "PatientBirthTime", "StudyDate", "StudyTime", "LastMenstrualDate",
                     "PatientAge", "PatientSize", "PatientWeight", "PatientBodyMassIndex", "MeasuredAPDimension",
                     "MeasuredLateralDimension", "AcquisitionDateTime")
_TIME = time_pattern()
_FORMS = {
    "DA": re.compile(r"\d{8}"),
    "TM": re.compile(_TIME),
    "DT": re.compile(rf"\d{{4}}((0[1-9]|1[0-2])((0[1-9]|[12]\d|3[01])({_TIME})?)?)?([+-]\d{{4}})?"),
    "AS": re.compile(r"\d{3}[DWMY]"),
    "DS": re.compile(r"[+-]?(\d+|\d+\.\d*|\.\d+)([eE][+-]?\d+)?"),
}
# The forms PS3.5 6.2 names as ACR-NEMA 300's for DA and TM, each with one reading; and an age
# with its unit but not its leading zeros. Nothing else is read as a date, time or age: "14/03/2019"
# is a day first or a month first, and "45" has no unit.
_LEGACY = {
    "DA": re.compile(r"(\d{4})\.(\d{2})\.(\d{2})"),
    "TM": re.compile(rf"(\d{{2}}):(\d{{2}}):(\d{{2}}{TIME_FRACTION})"),
    "AS": re.compile(r"(\d{1,3})([DWMY])"),
}


@dataclass(frozen=True)
class Nodule:
    """One detected nodule.

    Attributes:
        center_mm: Centre in patient coordinates (x, y, z) of the series' frame of reference, mm.
        diameter_mm: Largest diameter, mm.
        score: The model's probability that this is a nodule, in [0, 1].
        solid_width_mm: Width of its solid part, mm (0 for pure ground glass); None when not measured.
    """

    center_mm: tuple[float, float, float]
    diameter_mm: float
    score: float
    solid_width_mm: float | None = None

    def __post_init__(self) -> None:
        if len(self.center_mm) != 3 or not all(math.isfinite(float(v)) for v in self.center_mm):
            raise ValueError(f"center_mm must be three finite numbers (x, y, z), got {self.center_mm!r}")
        if not (math.isfinite(self.diameter_mm) and self.diameter_mm > 0):
            raise ValueError(f"diameter_mm must be a positive number, got {self.diameter_mm!r}")
        _check_probability("score", self.score)
        if self.solid_width_mm is not None and not (math.isfinite(self.solid_width_mm) and self.solid_width_mm >= 0):
            raise ValueError(f"solid_width_mm must be a non-negative number or None, got {self.solid_width_mm!r}")


@dataclass(frozen=True)
class Finding:
    """The model's answer for one series.

    Attributes:
        present: Whether the model calls a nodule present at its operating point.
        score: Series-level probability of a nodule, in [0, 1].
        threshold: The operating point the decision was taken at, in [0, 1].
        model_name: Registered model name (the algorithm name in the SR and SEG).
        model_version: Registered model version (the algorithm version).
        nodules: Localised nodules; empty when absent or when the model only classifies.
        actionable: Score of an actionable nodule (solid or part-solid, at least 6 mm) read off
            the nodules' sizes and solid parts, in [0, 1]; None when the model does not make it.
        score_rule: How `score` is computed when it is not a probability (a classifier's series
            rule, ``SeriesRule.describe()``): the SR then names it :data:`SERIES_SCORE` instead of
            "Probability", and gives this text as the algorithm's parameter. None: a probability.
    """

    present: bool
    score: float
    threshold: float
    model_name: str
    model_version: str
    nodules: tuple[Nodule, ...] = ()
    actionable: float | None = None
    score_rule: str | None = None

    def __post_init__(self) -> None:
        _check_probability("score", self.score)
        if self.score_rule is not None and not self.score_rule.strip():
            raise ValueError("score_rule must say how the score is computed, or be None for a probability")
        if self.actionable is not None:
            _check_probability("actionable", self.actionable)
        _check_probability("threshold", self.threshold)
        for name in ("model_name", "model_version"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"{name} must be a non-empty string, got {value!r}")
            if len(value) > 64:
                raise ValueError(f"{name} must fit a DICOM LO (64 characters), got {len(value)}")
        if not self.present and self.nodules:
            raise ValueError("a finding with present=False cannot list nodules; set present=True "
                             "or drop the nodules")


def result_uids(source_images: Sequence[pydicom.Dataset], finding: Finding, kind: str,
                series_number: int, content: str = "") -> tuple[str, str]:
    """The (series, instance) UIDs of a result, derived rather than drawn: from the analysed images,
    the model version, the object's kind (:data:`SR_KIND`, :data:`SEG_KIND`) and place, and what it
    says (`finding`, and `content` for what the finding does not hold, such as a SEG's voxels).

    The same result for the same images gets the same UIDs, so a store retried after the PACS went
    away mid-request (having kept what it received) finds the instance already there and the study
    holds one copy, not two; a different result, or the same model on other images, gets new ones.
    pydicom's ``generate_uid`` hashes the sources (SHA-512): nothing of the source UIDs can be read
    back from the result's.
    """
    sources = [MANUFACTURER, finding.model_name, finding.model_version, kind, str(series_number),
               repr(finding), content, *sorted(str(ds.SOPInstanceUID) for ds in source_images)]
    return (str(generate_uid(entropy_srcs=[*sources, "series"])),
            str(generate_uid(entropy_srcs=[*sources, "instance"])))


def _new_object(source_images: Sequence[pydicom.Dataset], finding: Finding, series_number: int,
                instance_number: int, description: str, kind: str, content: str = "") -> dict[str, Any]:
    """What every object dicomops writes says of itself: its UIDs (:func:`result_uids`), its place in
    the series, and the model that made it as the device (manufacturer dicomops)."""
    series_uid, sop_uid = result_uids(source_images, finding, kind, series_number, content)
    return {"series_instance_uid": series_uid, "series_number": series_number, "sop_instance_uid": sop_uid,
            "instance_number": instance_number, "manufacturer": MANUFACTURER,
            "manufacturer_model_name": finding.model_name, "software_versions": finding.model_version,
            "device_serial_number": _device_uid(finding), "series_description": description}


def _report_description(finding: Finding) -> str:
    """The SR's Series Description: the report's kind and the model that made it, so that the
    classifier's report and the segmenter's, which go to one study, read apart in a series list
    (an LO: the name is cut to fit 64 characters)."""
    room = 64 - len(SR_SERIES_DESCRIPTION) - len(" ()")
    return f"{SR_SERIES_DESCRIPTION} ({finding.model_name[:room].strip()})"


def _tracking_uid(sop_instance_uid: str, index: int) -> str:
    """The tracking UID of item `index` of a result (0: the series finding, then the nodules; a
    SEG's segment number), derived like :func:`result_uids` from the result's own UID: the same
    SOP Instance UID always comes with the same tracking UIDs, which a reader's correction cites."""
    return str(generate_uid(entropy_srcs=[sop_instance_uid, "tracking", str(index)]))


def structured_report(
    source_images: Sequence[pydicom.Dataset],
    finding: Finding,
    *,
    series_number: int = 9001,
    instance_number: int = 1,
) -> hd.sr.Comprehensive3DSR:
    """Build the TID 1500 measurement report for one analysed series.

    The report joins the source study (same Study Instance UID, patient and study modules copied
    from the source) in a new series, lists every source image as evidence, and says what the
    model found in terms a PACS viewer and a downstream reader can both decode: a coded
    present/absent evaluation, the score and operating point as unitless measurements, and each
    nodule as a 3D point with its diameter (and, from the segmenter, the width of its solid part
    and the series' actionable score, in a private scheme the SR declares; a series score that is
    not a probability is named in that scheme too, with how it is computed as the algorithm's
    parameter). The model name and
    version appear twice on purpose: as the device observer (who made the observations) and as
    the algorithm identification of every measurement group (what produced each number).

    Args:
        source_images: The series the model analysed, all with one Study and Series UID, and
            one Frame of Reference UID when the finding has nodules (their centres are in it);
            pixel data is not needed. They are not changed: highdicom gets copies
            (:func:`_result_headers`).
        finding: The model's result for that series.
        series_number: Series Number of the new SR series.
        instance_number: Instance Number of the SR in it.

    Returns:
        The SR document, not yet written anywhere.

    Raises:
        ValueError: When the source images are empty or do not form one series, or declare a
            character set PS3.3 neither defines nor names while their text is not plain ASCII
            (:func:`_source_character_set`).
    """
    _check_series(source_images, frame_of_reference=bool(finding.nodules))
    headers = _result_headers(source_images)
    identity = _new_object(headers, finding, series_number, instance_number, _report_description(finding), SR_KIND)
    sop_uid = identity["sop_instance_uid"]
    algorithm = _algorithm(finding)
    groups: list[
        hd.sr.MeasurementsAndQualitativeEvaluations
        | hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations
    ] = [_series_group(headers, finding, algorithm, _tracking_uid(sop_uid, 0))]
    groups.extend(
        _nodule_group(index, nodule, headers[0], algorithm, _tracking_uid(sop_uid, index))
        for index, nodule in enumerate(finding.nodules, start=1)
    )
    report = hd.sr.MeasurementReport(
        observation_context=_observation_context(finding),
        procedure_reported=PROCEDURE,
        imaging_measurements=groups,
    )
    sr = hd.sr.Comprehensive3DSR(
        evidence=headers,
        content=report[0],
        **identity,
        # Complete: the model has nothing more to add. Unverified and preliminary: no
        # radiologist has signed it; a reader's correction supersedes it.
        is_complete=True,
        is_verified=False,
        is_final=False,
    )
    if (finding.actionable is not None or finding.score_rule is not None
            or any(n.solid_width_mm is not None for n in finding.nodules)):
        scheme = pydicom.Dataset()
        scheme.CodingSchemeDesignator = PRIVATE_SCHEME
        scheme.CodingSchemeName = PRIVATE_SCHEME_NAME
        scheme.CodingSchemeResponsibleOrganization = MANUFACTURER
        sr.CodingSchemeIdentificationSequence = [scheme]
    _declare_character_set(sr, source_images[0])
    return sr


def segmentation(
    source_images: Sequence[pydicom.Dataset],
    mask: np.ndarray,
    finding: Finding,
    *,
    series_number: int = 9002,
    instance_number: int = 1,
) -> hd.seg.Segmentation:
    """Build a binary SEG of the nodule voxels over the analysed series.

    Args:
        source_images: The analysed series, with one Study, Series and Frame of Reference UID;
            frame ``k`` of `mask` lies on ``source_images[k]``. They are not changed.
        mask: Boolean or 0/1 array shaped (frames, rows, columns), in `source_images` order.
        finding: The model's result; its name and version identify the algorithm.
        series_number: Series Number of the new SEG series.
        instance_number: Instance Number of the SEG in it.

    Returns:
        The SEG, one segment "Lung nodule", frames only where the mask is set.

    Raises:
        ValueError: When the mask is empty or the finding is absent (a SEG with no segment
            content is not a result to send), or the mask does not match the images, or these
            declare a character set PS3.3 neither defines nor names while their text is not
            plain ASCII.
    """
    _check_series(source_images, frame_of_reference=True)
    first = source_images[0]
    expected = (len(source_images), int(first.Rows), int(first.Columns))
    if mask.shape != expected:
        raise ValueError(f"mask shape {mask.shape} does not match the source images: expected "
                         f"(frames, rows, columns) = {expected}, in source_images order")
    if mask.dtype != np.bool_:
        if not np.isin(mask, (0, 1)).all():
            raise ValueError("mask must be boolean or hold only 0 and 1 (a binary segmentation)")
        mask = mask.astype(np.bool_)
    if not mask.any():
        raise ValueError("mask is empty: no SEG is made for a series without nodule voxels; "
                         "send the structured report alone")
    if not finding.present:
        raise ValueError("finding.present is False but the mask marks voxels; make them agree "
                         "before sending a segmentation")
    # highdicom lays a SEG on one orientation exactly; the gate accepts cosines a rounding apart (a
    # scanner writing 6 digits): the copies take the first slice's.
    headers = _result_headers(source_images, one_orientation=True)
    identity = _new_object(headers, finding, series_number, instance_number, SEG_SERIES_DESCRIPTION, SEG_KIND,
                           content=hashlib.sha256(np.packbits(mask).tobytes()).hexdigest())
    description = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label=SEGMENT_LABEL,
        segmented_property_category=FINDING_CATEGORY,
        segmented_property_type=FINDING_TYPE,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=hd.AlgorithmIdentificationSequence(
            name=finding.model_name,
            family=codes.cid7162.ArtificialIntelligence,
            version=finding.model_version,
        ),
        tracking_uid=_tracking_uid(identity["sop_instance_uid"], 1),
        tracking_id=SEGMENT_LABEL,
        anatomic_regions=[FINDING_SITE],
    )
    seg = hd.seg.Segmentation(
        source_images=headers,
        pixel_array=mask,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[description],
        **identity,
    )
    _declare_character_set(seg, source_images[0])
    return seg


def encode(ds: pydicom.Dataset) -> bytes:
    """Serialise `ds` as DICOM Part 10 bytes (preamble, file meta), the body STOW-RS expects."""
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


# --- SR content -----------------------------------------------------------------------------


def _series_group(
    source_images: Sequence[pydicom.Dataset],
    finding: Finding,
    algorithm: hd.sr.AlgorithmIdentification,
    tracking_uid: str,
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """TID 1501 group for the series: the present/absent call, the score and the operating point.

    The source images are listed in the group so a reader of the content tree, not only of the
    evidence sequence, sees which images the decision rests on.
    """
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=tracking_uid, identifier=SERIES_TRACKING_ID),
        finding_category=FINDING_CATEGORY,
        finding_type=FINDING_TYPE,
        finding_sites=[hd.sr.FindingSite(FINDING_SITE)],
        algorithm_id=algorithm,
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(name=FINDING_TYPE, value=PRESENT if finding.present else ABSENT),
        ],
        measurements=[
            hd.sr.Measurement(name=SCORE if finding.score_rule is None else SERIES_SCORE, value=finding.score,
                              unit=NO_UNITS),
            hd.sr.Measurement(name=OPERATING_POINT, value=finding.threshold, unit=NO_UNITS),
            *([hd.sr.Measurement(name=ACTIONABLE_SCORE, value=finding.actionable, unit=NO_UNITS)]
              if finding.actionable is not None else []),
        ],
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(ds)
                       for ds in source_images],
    )


def _nodule_group(
    index: int,
    nodule: Nodule,
    reference: pydicom.Dataset,
    algorithm: hd.sr.AlgorithmIdentification,
    tracking_uid: str,
) -> hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations:
    """TID 1411 group for one nodule: its centre as a SCOORD3D POINT, its diameter and score.

    TID 1411's Volume Surface is the template row that admits a single 3D point; it refers to
    the source series, whose frame of reference the point is in.
    """
    surface = hd.sr.VolumeSurface(
        graphic_type=hd.sr.GraphicTypeValues3D.POINT,
        graphic_data=np.asarray([nodule.center_mm], dtype=np.float64),
        frame_of_reference_uid=reference.FrameOfReferenceUID,
        source_series=hd.sr.SourceSeriesForSegmentation(reference.SeriesInstanceUID),
    )
    return hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=tracking_uid, identifier=f"Nodule {index}"),
        referenced_volume_surface=surface,
        finding_category=FINDING_CATEGORY,
        finding_type=FINDING_TYPE,
        finding_sites=[hd.sr.FindingSite(FINDING_SITE)],
        algorithm_id=algorithm,
        measurements=[
            hd.sr.Measurement(name=DIAMETER, value=nodule.diameter_mm, unit=MILLIMETER),
            hd.sr.Measurement(name=SCORE, value=nodule.score, unit=NO_UNITS),
            *([hd.sr.Measurement(name=SOLID_PART_WIDTH, value=nodule.solid_width_mm, unit=MILLIMETER)]
              if nodule.solid_width_mm is not None else []),
        ],
    )


def _observation_context(finding: Finding) -> hd.sr.ObservationContext:
    """Device observer (TID 1004): dicomops running this model version made the observations."""
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=_device_uid(finding),
        name=f"{finding.model_name} {finding.model_version}"[:64],
        manufacturer_name=MANUFACTURER,
        model_name=finding.model_name,
    )
    return hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.DCM.Device,
            observer_identifying_attributes=device,
        ),
    )


def _algorithm(finding: Finding) -> hd.sr.AlgorithmIdentification:
    return hd.sr.AlgorithmIdentification(
        name=finding.model_name, version=finding.model_version, manufacturer=MANUFACTURER,
        parameters=None if finding.score_rule is None else [f"series score: {finding.score_rule}"],
    )


def _device_uid(finding: Finding) -> str:
    """A UID fixed by model name and version, so every report from one model version names the
    same device (a PACS can group by it); the SOP and series UIDs depend on the result too."""
    return str(generate_uid(entropy_srcs=[MANUFACTURER, finding.model_name, finding.model_version]))


# --- checks and output containment ------------------------------------------------------------


def _check_probability(name: str, value: float) -> None:
    if not (isinstance(value, int | float) and math.isfinite(value) and 0.0 <= value <= 1.0):
        raise ValueError(f"{name} must be a probability in [0, 1], got {value!r}")


def _check_series(source_images: Sequence[pydicom.Dataset], *, frame_of_reference: bool) -> None:
    """One study, one series and, where the object places anything in space, one frame of
    reference: what both objects reference as a unit. A report without coordinates (the
    classifier's) needs no frame of reference, and a header without one still gets its answer.

    Messages name the attribute, never its value: the values are original identifiers.
    """
    if len(source_images) == 0:
        raise ValueError("source_images is empty: pass the datasets of the analysed series")
    keywords = ["StudyInstanceUID", "SeriesInstanceUID"]
    if frame_of_reference:
        keywords.append("FrameOfReferenceUID")
    for keyword in keywords:
        values = {ds.get(keyword) for ds in source_images}
        if None in values:
            why = (" (the SEG and the nodules' 3D points are placed in it; without it, send a report "
                   "without nodules)" if keyword == "FrameOfReferenceUID" else "")
            raise ValueError(f"a source image lacks {keyword}; every image needs it{why}")
        if len(values) > 1:
            raise ValueError(f"source_images hold {len(values)} different {keyword} values; "
                             f"pass one series at a time")


# --- source headers as highdicom takes them ---------------------------------------------------


def _result_headers(source_images: Sequence[pydicom.Dataset], one_orientation: bool = False) -> list[pydicom.Dataset]:
    """Copies of the source headers that highdicom builds a result from; the caller's are untouched.

    A copy holds the source's own elements, read with the source's character set, in a dataset of
    its own (``copy.copy`` of a pydicom dataset shares its element dictionary), so what is set on
    the copy is set there alone, as new elements. On it, the Type 2 patient and study attributes
    the source lacks are present and empty, a Patient's Sex outside M, F, O is empty, the values
    highdicom copies into the result are of their VR's form (:func:`_formatted`), and the Specific
    Character Set names the source's repertoires the way highdicom accepts
    (:func:`_source_character_set`); one highdicom does not know is left off and
    :func:`_declare_character_set` puts it on the result. With `one_orientation`, every copy has
    the first image's Image Orientation (Patient).

    What was changed is logged once, by attribute name: the values may identify the patient.
    """
    headers = []
    changed: dict[str, str] = {}
    for ds in source_images:
        header = pydicom.Dataset()
        for element in ds:  # read here with the source's character set, whatever the copy declares
            header.add(element)
        for keyword in _TYPE2_IDENTITY:
            if keyword not in header:
                _set_new(header, keyword, "")
        if header.PatientSex and header.PatientSex not in _PATIENT_SEX:
            _set_new(header, "PatientSex", "")
        for keyword in _COPIED_FORMATTED:
            if keyword in header:
                changed.update(_formatted(header, keyword))
        if one_orientation and "ImageOrientationPatient" in header:
            _set_new(header, "ImageOrientationPatient", list(source_images[0].ImageOrientationPatient))
        charset, note = _source_character_set(ds)
        if note:
            changed["SpecificCharacterSet"] = note
        if "SpecificCharacterSet" in header:
            del header.SpecificCharacterSet
        if charset is not None and set(_values(charset)) <= _HIGHDICOM_CHARSETS:
            _set_new(header, "SpecificCharacterSet", charset)
        headers.append(header)
    if changed:
        log.warning("source header values the result does not carry as they are (values withheld: they may "
                    "identify the patient): %s", "; ".join(f"{k} {v}" for k, v in sorted(changed.items())))
    return headers


def _formatted(header: pydicom.Dataset, keyword: str) -> dict[str, str]:
    """Make `keyword` on `header` a value of its VR's form (PS3.5 6.2), or take it off; return what
    was done, by attribute name, when anything was.

    Padding spaces are not part of a value. A date in ACR-NEMA's ``yyyy.mm.dd`` or a time in its
    ``hh:mm:ss.frac`` (the forms PS3.5 6.2 names for DA and TM, with one reading each) is written
    as DA or TM writes it, and an age with its unit as three digits and the unit (``45Y`` is
    ``045Y``). Any other value not of its form, such as a date that is a day first or a month
    first, an age without a unit or a date that is not in the calendar, is not copied: a Type 2
    attribute is written empty, others are left out. Everything else stays as the source wrote it.
    """
    vr = dictionary_VR(keyword)
    value = header[keyword].value
    if value is None or value == "":
        return {}
    written = [str(v) for v in _values(value)]
    if len(written) == 1:  # each of these attributes holds one value
        text = written[0].strip()
        if _of_form(vr, text):
            if text != written[0]:
                _set_new(header, keyword, text)
            return {}
        legacy = _legacy(vr, text)
        if legacy is not None:
            _set_new(header, keyword, legacy)
            return {keyword: f"is in a legacy or unpadded form of {vr}: written in the standard one"}
    if keyword in _TYPE2_IDENTITY:
        _set_new(header, keyword, "")
        return {keyword: f"is not a valid {vr} (PS3.5 6.2): written empty"}
    del header[keyword]
    return {keyword: f"is not a valid {vr} (PS3.5 6.2): left out"}


def _of_form(vr: str, value: str) -> bool:
    """Whether `value` is written as PS3.5 6.2 has its VR written, for the VRs of :data:`_FORMS`: of
    its length, and for a date, a day in the calendar."""
    if len(value) > {"DA": 8, "TM": 14, "DT": 26, "AS": 4, "DS": 16}[vr] or not _FORMS[vr].fullmatch(value):
        return False
    date = value[:8] if vr == "DA" or (vr == "DT" and len(value) >= 8 and value[:8].isdigit()) else None
    if date is not None:
        try:
            datetime.date(int(date[:4]), int(date[4:6]), int(date[6:]))
        except ValueError:
            return False
    return True


def _legacy(vr: str, value: str) -> str | None:
    """`value` as its VR writes it, when it is in a form :data:`_LEGACY` reads; None otherwise."""
    form = _LEGACY.get(vr)
    match = form.fullmatch(value) if form is not None else None
    if match is None:
        return None
    parts = match.groups()
    written = f"{int(parts[0]):03d}{parts[1]}" if vr == "AS" else "".join(parts[:3])
    return written if _of_form(vr, written) else None


def _declare_character_set(result: pydicom.Dataset, source: pydicom.Dataset) -> None:
    """Declare on `result` the source's character set as :func:`_source_character_set` writes it.

    highdicom 0.28 does not know ISO 2022 IR 149 (Korean) and refuses it; the result then gets it
    here, where highdicom put the others already. The copied text was read with the source's own
    set, so it is written in the same repertoires.
    """
    charset, _ = _source_character_set(source)
    if charset is not None:
        result.SpecificCharacterSet = charset


def _source_character_set(source: pydicom.Dataset) -> tuple[str | list[str] | None, str]:
    """The Specific Character Set the result declares for text read from `source`, and what was done
    when the source's own is not as PS3.3 C.12.1.1.2 writes it ("" when it is).

    A source that declares a term PS3.3 defines gets it in its written form (:func:`_character_set`).
    One that names a defined term another way, as a Python codec ("UTF-8", "latin1") or misspelt
    ("ISO IR 100"), was read by pydicom with that term's codec, so the text is what it says: the
    result declares the term. Otherwise pydicom read it with a codec of its choosing; if that codec
    reads ASCII as ASCII and every text value is plain ASCII, the text is the same under any
    reading and the result declares the default repertoire. Text that could read otherwise under
    the term the source meant is not copied into a result.

    Raises:
        ValueError: When the source's term is neither defined nor named, and its text is not plain
            ASCII (or its codec would not read ASCII as ASCII). The message names the attribute,
            never its value.
    """
    value = source.get("SpecificCharacterSet")
    try:
        return _character_set(value), ""
    except ValueError as err:
        refused = err
    named = _named_character_set(value)
    if named is not None:
        return named, "is not a term PS3.3 C.12.1.1.2 defines but names one: the result declares that term"
    if _plain_ascii(source, value):
        return None, ("is not a term PS3.3 C.12.1.1.2 defines and the text is plain ASCII: the result "
                      "declares none (the default repertoire)")
    raise ValueError("the source images' SpecificCharacterSet is not a term PS3.3 C.12.1.1.2 defines, nor a name "
                     "of one, and their text is not plain ASCII, so how it is written is not certain: correct it "
                     "in their headers (one value such as 'ISO_IR 100' or 'ISO_IR 192', or several with code "
                     "extensions such as '\\ISO 2022 IR 87')") from refused


def _named_character_set(value: str | Sequence[str] | None) -> str | list[str] | None:
    """The defined term(s) `value` names as pydicom reads it: a term with pydicom's spelling
    corrections ("ISO IR 100", "ISO-2022-IR 87"), or one value naming the Python codec of a single
    defined term. None when it names none."""
    values = [str(v).strip() for v in _values(value)]
    patched = [("ISO_IR" + v[6:] if re.match("^ISO[^_]IR", v) else
                "ISO 2022 IR " + v[12:] if re.match("^(?=ISO.2022.IR.)(?!ISO 2022 IR )", v) else v)
               for v in values]
    if patched != values:
        try:
            return _character_set(patched)
        except ValueError:
            pass
    if len(values) == 1:
        try:
            return _TERM_FOR_CODEC.get(codecs.lookup(values[0]).name)
        except LookupError:
            return None
    return None


def _plain_ascii(source: pydicom.Dataset, value: str | Sequence[str] | None) -> bool:
    """Whether every standard text value of `source` is printable ASCII (or tab, line and page
    breaks) as pydicom read it, with codecs that read those bytes as ASCII: then its bytes were those."""
    probe = bytes(range(0x20, 0x7F)) + b"\t\n\r\f"
    try:
        encodings = convert_encodings([str(v) for v in _values(value)] or None)
        if any(probe.decode(encoding) != probe.decode("ascii") for encoding in encodings):
            return False
    except (LookupError, UnicodeError):
        return False

    def plain(ds: pydicom.Dataset) -> bool:
        for element in ds:
            if element.tag.is_private:
                continue
            if element.VR == "SQ":
                if not all(plain(item) for item in element.value):
                    return False
            elif element.VR in _TEXT_VRS and not all(
                    _PLAIN_TEXT.fullmatch(str(v)) for v in _values(element.value) if v is not None):
                return False
        return True

    return plain(source)


def _character_set(value: str | Sequence[str] | None) -> str | list[str] | None:
    """A Specific Character Set as PS3.3 C.12.1.1.2 writes it; None for the default repertoire.

    Names the same repertoires as `value`: an empty first value of several is ISO 2022 IR 6
    (PS3.5 6.1.2.5.3), the default repertoire, which alone needs no value; one value takes the
    term without code extensions ("ISO 2022 IR 100" alone is "ISO_IR 100") and several the terms
    with them; a multi-byte set with code extensions follows the default repertoire.

    Raises:
        ValueError: When `value` holds a term PS3.3 does not define, or combines a stand-alone set
            (UTF-8, GB18030, GBK) with others. The message does not quote the value.
    """
    values = [str(v).strip() for v in _values(value)]
    if len(values) > 1 and not values[0]:
        values[0] = _DEFAULT_REPERTOIRE
    values = [v for v in values if v]
    if values and values[0] in _MULTI_BYTE:
        values.insert(0, _DEFAULT_REPERTOIRE)
    if not values or values in ([_DEFAULT_REPERTOIRE], ["ISO_IR 6"]):
        return None
    numbers = [v.removeprefix("ISO 2022 IR ").removeprefix("ISO_IR ") for v in values]
    if len(values) == 1:
        if numbers[0] in _SINGLE_BYTE:
            return f"ISO_IR {numbers[0]}"
        if values[0] in _STAND_ALONE:
            return values[0]
    else:
        terms = [f"ISO 2022 IR {n}" if n in _SINGLE_BYTE else v for v, n in zip(values, numbers, strict=True)]
        if set(terms) <= _CODE_EXTENSIONS:
            return terms
    raise ValueError("SpecificCharacterSet is not a term PS3.3 C.12.1.1.2 defines, or combines a stand-alone "
                     "set with others")


def _values(value: Any) -> list[Any]:
    """The values of an element's value: none, one, or those of a multi-valued one."""
    if value is None:
        return []
    return list(value) if isinstance(value, MutableSequence | tuple) else [value]


def _set_new(header: pydicom.Dataset, keyword: str, value: Any) -> None:
    """Set `keyword` as a new element: setting a keyword the header has would change the element
    in place, and a header copy shares its elements with the caller's dataset."""
    header[keyword] = DataElement(keyword, dictionary_VR(keyword), value)
