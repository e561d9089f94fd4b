"""De-identification of coded items: a local coding scheme's text never passes the gate.

The allow-list kept the Code Sequence Macro (Code Value, Coding Scheme Designator, Code Meaning)
word for word wherever a sequence was kept, so a site's local procedure code went through with the
meaning its RIS typed ("CT chest follow-up for Jane Doe, MRN 12345") and a value that was an
accession number. A standard scheme's code is the standard's term and stays.
"""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from dicomops.deid import Deidentifier, KeyedMapper, scan_for_phi
from dicomops.deid.profile import REMOVED_MEANING
from tests.hostile import ct_slice

KEY = b"deid-codes-key-0123456789abcdef0"
NAME, MRN, ACCESSION, SITE = "Jane Doe", "MRN 12345", "ACC998877", "99STALDRIC"
PHI = {NAME, MRN, "12345", ACCESSION, SITE, "STALDRIC-V7"}
LUNG = ("39607008", "SCT", "Lung")
LOCALIZER = ("121311", "DCM", "Localizer")


def _code(value: str, scheme: str, meaning: str, **more: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    for keyword, text in more.items():
        setattr(item, keyword, text)
    return item


def _local(value: str = ACCESSION, scheme: str = SITE) -> Dataset:
    return _code(value, scheme, f"CT chest follow-up for {NAME}, {MRN}", CodingSchemeVersion="STALDRIC-V7")


def _slice_with_codes() -> Dataset:
    """Local and standard codes at the top level and in sequences the profile keeps and cleans,
    two and three levels down."""
    ds = ct_slice()
    ds.ProcedureCodeSequence = Sequence([_local(), _code(*LUNG)])
    anatomic = _code(*LUNG)
    anatomic.AnatomicRegionModifierSequence = Sequence([_local(f"{MRN}", "L")])
    ds.AnatomicRegionSequence = Sequence([anatomic])
    reference = Dataset()  # ReferencedImageSequence is X/Z/U* in Annex E: kept and cleaned
    reference.ReferencedSOPClassUID = pydicom.uid.CTImageStorage
    reference.ReferencedSOPInstanceUID = "1.2.3.4.777"
    reference.PurposeOfReferenceCodeSequence = Sequence([_local(), _code(*LOCALIZER)])
    ds.ReferencedImageSequence = Sequence([reference])
    long_local = _local()
    del long_local.CodeValue
    long_local.LongCodeValue = f"{ACCESSION} {NAME} order 7"  # UC: more than Code Value's 16
    protocol = _code("CTCHEST", "L", "Chest routine")
    protocol.ProtocolContextSequence = Sequence([Dataset()])
    protocol.ProtocolContextSequence[0].ConceptNameCodeSequence = Sequence([long_local])
    ds.PerformedProtocolCodeSequence = Sequence([protocol])
    return ds


def _codes(ds: Dataset) -> list[Dataset]:
    """Every item of `ds`, nested ones included, that holds a coded entry."""
    found = [ds] if "CodingSchemeDesignator" in ds else []
    for elem in ds:
        if elem.VR == "SQ":
            for item in elem.value:
                found += _codes(item)
    return found


@pytest.fixture()
def deid() -> Deidentifier:
    return Deidentifier(KeyedMapper(KEY))


def test_a_local_code_carries_no_name_mrn_accession_or_site_however_deep(deid: Deidentifier, tmp_path: Path) -> None:
    ds = deid.dataset(_slice_with_codes())
    ds.save_as(tmp_path / "out.dcm", enforce_file_format=True)
    assert scan_for_phi(tmp_path, PHI) == []
    back = pydicom.dcmread(tmp_path / "out.dcm")
    codes = _codes(back)
    assert len(codes) == 8 + 4  # every item is kept (a Type 1 code sequence keeps its item), + the method's
    local = [c for c in codes if c.CodeMeaning == REMOVED_MEANING]
    assert len(local) == 5
    for item in local:  # still a valid code (PS3.3 8.8): value, local scheme, meaning, all present
        assert len(item.CodeValue) == 16 and item.CodingSchemeDesignator.startswith("99")
        assert len(item.CodingSchemeDesignator) == 16
        assert not {"LongCodeValue", "URNCodeValue", "CodingSchemeVersion"} & set(item.dir())
    mapper = KeyedMapper(KEY)
    assert back.ProcedureCodeSequence[0].CodeValue == mapper.code("code", f"{SITE}\\STALDRIC-V7\\{ACCESSION}")
    concept = back.PerformedProtocolCodeSequence[0].ProtocolContextSequence[0].ConceptNameCodeSequence[0]
    assert concept.CodeValue == mapper.code("code", f"{SITE}\\STALDRIC-V7\\{ACCESSION} {NAME} order 7")
    # The standard codes are the standard's terms: kept exactly, wherever they stand.
    for item in (back.ProcedureCodeSequence[1], back.AnatomicRegionSequence[0]):
        assert (item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning) == LUNG
    purpose = back.ReferencedImageSequence[0].PurposeOfReferenceCodeSequence[1]
    assert (purpose.CodeValue, purpose.CodingSchemeDesignator, purpose.CodeMeaning) == LOCALIZER


def test_a_local_code_maps_alike_in_every_batch_and_apart_from_every_other_code() -> None:
    def value(key: bytes, code: Dataset) -> str:
        ds = ct_slice()
        ds.ProcedureCodeSequence = Sequence([code])
        return str(Deidentifier(KeyedMapper(key)).dataset(ds).ProcedureCodeSequence[0].CodeValue)

    first = value(KEY, _local())
    assert first != ACCESSION
    assert value(KEY, _local()) == first  # one key, one name: codes still count and compare
    assert value(KEY, _local("ACC998878")) != first
    assert value(KEY, _local(scheme="99OTHERSITE")) != first  # the same value in another scheme
    assert value(b"another-key-0123456789abcdef0123", _local()) != first


def test_the_scheme_identification_names_the_local_scheme_as_its_codes_do(deid: Deidentifier) -> None:
    ds = ct_slice()
    ds.ProcedureCodeSequence = Sequence([_local()])
    scheme = Dataset()
    scheme.CodingSchemeDesignator = SITE
    scheme.CodingSchemeName = "Saint Aldric procedure codes"  # ST, not listed: the text net removes it
    ds.CodingSchemeIdentificationSequence = Sequence([scheme])
    deid.dataset(ds)
    named = ds.CodingSchemeIdentificationSequence[0]
    assert named.CodingSchemeDesignator == ds.ProcedureCodeSequence[0].CodingSchemeDesignator != SITE
    assert "CodingSchemeName" not in named and "CodeValue" not in named and "CodeMeaning" not in named


@pytest.mark.parametrize("scheme", ["99STALDRIC", "L", "ICD10", "sct", ["SCT", "99X"], ""])
def test_a_scheme_no_standard_names_is_local(deid: Deidentifier, scheme: str | list[str]) -> None:
    """Local by PS3.3 8.2: "L" and "99..."; a made-up, miscased or multi-valued designator is no
    standard's either, and an item without one cannot say whose meaning it holds."""
    ds = ct_slice()
    ds.ProcedureCodeSequence = Sequence([_code("39607008", "SCT", f"Lung, {NAME}")])
    ds.ProcedureCodeSequence[0].CodingSchemeDesignator = scheme
    item = deid.dataset(ds).ProcedureCodeSequence[0]
    assert item.CodeMeaning == REMOVED_MEANING and item.CodeValue not in ("39607008", "")


def test_a_local_code_held_as_a_long_or_urn_value_gets_a_code_value(deid: Deidentifier) -> None:
    ds = ct_slice()
    long_item, urn_item = _local(), _local()
    del long_item.CodeValue, urn_item.CodeValue
    long_item.LongCodeValue = f"{ACCESSION}-{NAME}-long"
    urn_item.URNCodeValue = f"urn:site:staldric:{ACCESSION}"
    ds.ProcedureCodeSequence = Sequence([long_item, urn_item])
    deid.dataset(ds)
    values = [item.CodeValue for item in ds.ProcedureCodeSequence]
    assert len(set(values)) == 2 and all(len(v) == 16 for v in values)
    assert not any({"LongCodeValue", "URNCodeValue"} & set(item.dir()) for item in ds.ProcedureCodeSequence)


@pytest.mark.parametrize(("code", "meaning"), [
    (("39607008", "SCT", f"Lung of {NAME} {MRN}"), "Lung"),  # a known code: its standard meaning
    (("T-28000", "SRT", f"{NAME}"), "Lung"),  # SNOMED-RT, through pydicom's map to SNOMED CT
    (("39607008", "SCT", "LUNG"), "LUNG"),  # the standard's term in other case: as written
    (("39607008", "SCT", "Lung structure (body structure)"), "Lung structure (body structure)"),
    (("121311", "DCM", f"Localizer for {NAME}"), "Localizer"),
    (("1234567", "SCT", f"Follow-up of {NAME}"), REMOVED_MEANING),  # a code pydicom does not know
])
def test_a_standard_code_keeps_its_value_and_only_a_meaning_the_standard_gives_it(
        deid: Deidentifier, code: tuple[str, str, str], meaning: str) -> None:
    ds = ct_slice()
    ds.ProcedureCodeSequence = Sequence([_code(*code)])
    item = deid.dataset(ds).ProcedureCodeSequence[0]
    assert (item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning) == (code[0], code[1], meaning)
