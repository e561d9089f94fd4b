"""De-identification of text the Annex E table does not list: removed unless the pipeline needs it.

A bug hunter found PatientBirthDateInAlternativeCalendar and PatientDeathDateInAlternativeCalendar
(LO, in no row of the table) in the de-identified corpus word for word, and with them every other
LO/SH the table leaves out (the retired order numbers, StorageMediaFileSetID, OwnerID, the breed
registration number): the net for unlisted text covered LT/ST/UT/UC only.
"""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from pydicom.datadict import DicomDictionary
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.tag import Tag

from dicomops import ingest
from dicomops.config import IngestConfig, SynthConfig
from dicomops.deid import Deidentifier, KeyedMapper, scan_for_phi
from dicomops.deid.profile import (
    KEEP_TEXT,
    REMOVED_MEANING,
    RETAIN_DEVICE_IDENTITY,
    RETAIN_PATIENT_CHARACTERISTICS,
)
from dicomops.synthetic import generate_corpus
from tests.hostile import ct_slice, to_bytes

KEY = b"deid-allowlist-key-0123456789abcd"
# What the hunter found kept, each with a value no other part of the file holds.
LEAKED = {"PatientBirthDateInAlternativeCalendar": "BIRTHALT19610203",
          "PatientDeathDateInAlternativeCalendar": "DEATHALT20240102",
          "PlacerOrderNumberProcedure": "PLACER1006", "FillerOrderNumberProcedure": "FILLER1007",
          "PlacerOrderNumberImagingServiceRequestRetired": "PLACER2006",
          "FillerOrderNumberImagingServiceRequestRetired": "FILLER2007",
          "StorageMediaFileSetID": "FILESET77", "OwnerID": "OWNER88",
          "PatientBreedDescription": "BREED-NEEDLE", "BreedRegistrationNumber": "BREEDREG99"}
TEXT_VRS = ("LO", "SH", "AE", "PN", "LT", "ST", "UT", "UC", "DA", "DT")


def test_alternative_calendar_dates_and_unlisted_identifiers_never_reach_the_corpus(tmp_path: Path) -> None:
    src = tmp_path / "src"
    generate_corpus(src, SynthConfig(patients=1, seed=3, fault_rate=0.0, matrix=128, slices=12, workers=1))
    files = [p for p in src.glob("case-*/*/*") if p.is_file()]
    assert len(files) == 12
    for path in files:
        ds = pydicom.dcmread(path)
        for keyword, value in LEAKED.items():
            setattr(ds, keyword, value)
        ds.save_as(path)
    work = tmp_path / "work"
    gate = ingest.run(src, work, IngestConfig(workers=1), KEY)
    assert gate.accepted_files == 12
    assert scan_for_phi(work, set(LEAKED.values())) == []
    written = pydicom.dcmread(next((work / "deid").rglob("*.dcm")))
    assert not any(keyword in written for keyword in LEAKED)
    # What the pipeline reads past the gate is still there.
    assert written.Manufacturer and written.ManufacturerModelName and written.ConvolutionKernel
    assert written.RescaleType == "HU"


def _needle(tag: int, vr: str) -> str:
    if vr == "DA":
        return "20010203"
    if vr == "DT":
        return "20010203040506"
    return f"N{tag:08X}"  # 9 characters: fits SH and AE (16)


def test_every_dictionary_text_element_is_removed_emptied_shifted_or_needed(tmp_path: Path) -> None:
    """Every LO, SH, AE, PN, LT, ST, UT, UC, DA and DT of the DICOM dictionary, retired ones too, top
    level and nested: after de-identification a value survives only where KEEP_TEXT or an option
    of the profile names the element."""
    base = ct_slice()
    ds = ct_slice()
    item = Dataset()
    needles: dict[str, str] = {}
    for tag, (vr, _vm, _name, _retired, keyword) in DicomDictionary.items():
        if vr not in TEXT_VRS or not keyword or Tag(tag).group in (0x0002, 0xFFFE) or keyword in base:
            continue
        value = _needle(tag, vr)
        ds.add_new(tag, vr, value)
        item.add_new(tag, vr, value)
        if vr not in ("DA", "DT"):
            needles[value] = keyword
    assert len(needles) > 700  # the whole dictionary (749 in pydicom 3.0), not a handful
    ds.ReferencedImageSequence = Sequence([item])  # cleaned, not removed: the same rule inside
    allowed = {pydicom.datadict.keyword_for_tag(t) for t in KEEP_TEXT | RETAIN_DEVICE_IDENTITY
               | RETAIN_PATIENT_CHARACTERISTICS}
    Deidentifier(KeyedMapper(KEY)).dataset(ds)
    values = {str(elem.value) for elem in ds.iterall()}
    kept = {needles[value] for value in needles if value in values}
    assert kept <= allowed, sorted(kept - allowed)
    ds.save_as(tmp_path / "out.dcm", enforce_file_format=True)
    assert {needles[hit.needle] for hit in scan_for_phi(tmp_path, set(needles))} == kept
    raw = (tmp_path / "out.dcm").read_bytes()
    back = pydicom.dcmread(tmp_path / "out.dcm")
    for keyword in ("PatientBirthDateInAlternativeCalendar", "PatientDeathDateInAlternativeCalendar", *LEAKED):
        assert keyword not in back and keyword not in back.ReferencedImageSequence[0], keyword
    # Dates are shifted wherever they stand (the option), never kept as they were.
    assert b"20010203" not in raw
    # The allow-list keeps what it names, the option what it names; a Type 2 attribute stays, empty.
    assert back.ManufacturerModelName == needles_value(needles, "ManufacturerModelName")
    # The item's coding scheme is a needle, no standard one: its code is local, kept valid with its
    # text replaced (the value a keyed name of scheme, version and value).
    code = back.ReferencedImageSequence[0]
    local = "\\".join(needles_value(needles, k) for k in ("CodingSchemeDesignator", "CodingSchemeVersion", "CodeValue"))
    assert (code.CodeValue, code.CodeMeaning) == (KeyedMapper(KEY).code("code", local), REMOVED_MEANING)
    assert code.CodingSchemeDesignator == "99" + KeyedMapper(KEY).code("scheme", needles_value(needles, "CodingSchemeDesignator"))[:14]
    assert back.StationName == needles_value(needles, "StationName")
    assert back.PositionReferenceIndicator == ""
    assert back.Manufacturer == "ACME"


def needles_value(needles: dict[str, str], keyword: str) -> str:
    return next(value for value, kw in needles.items() if kw == keyword)


@pytest.mark.parametrize(("value", "kept"), [("101500", "101500"), ("101500.25", "101500.25"), ("10:15:00", "10:15:00"),
                                             ("MRN554433", ""), ("DOE JANE", ""), ("554433", ""), ("2461", "")])
def test_a_time_is_kept_only_when_it_is_a_time(value: str, kept: str) -> None:
    """TM values stay (with shifted dates they identify no one), but a reader keeps a malformed TM
    as the text it was given, and text typed into a TM is not a time."""
    with pydicom.config.disable_value_validation():
        ds = pydicom.dcmread(pydicom.filebase.DicomBytesIO(to_bytes(ct_slice(StudyTime=value, AcquisitionTime=value))))
    Deidentifier(KeyedMapper(KEY)).dataset(ds)
    assert (ds.StudyTime, ds.AcquisitionTime) == (kept, kept)  # Z and X in the basic profile: one rule
