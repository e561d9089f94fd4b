"""De-identification of coded items: a local coding scheme's text never passes the gate.

The allow-list kept the Code Sequence Macro (Code Value, Coding Scheme Designator, Code Meaning)
word for word wherever a sequence was kept, so a site's local procedure code went through with the
meaning its RIS typed ("CT chest follow-up for Jane Doe, MRN 12345") and a value that was an
accession number. A standard scheme's code is the standard's term and stays; until 2026-12-06 so
did any text typed where a standard scheme's code belongs (SCT "JaneDoe 1234567", UCUM
"{Jane Doe}"), a standard item's version, long and URN values, and a local item's context group
attributes.
"""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from dicomops.deid import Deidentifier, KeyedMapper, scan_for_phi
from dicomops.deid.profile import REMOVED_MEANING, standard_meanings
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
    (("44054006", "SCT", f"Follow-up of {NAME}"), REMOVED_MEANING),  # a code pydicom does not know
])
def test_a_standard_code_keeps_its_value_and_only_a_meaning_the_standard_gives_it(
        deid: Deidentifier, code: tuple[str, str, str], meaning: str) -> None:
    ds = ct_slice()
    ds.ProcedureCodeSequence = Sequence([_code(*code)])
    item = deid.dataset(ds).ProcedureCodeSequence[0]
    assert (item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning) == (code[0], code[1], meaning)


# Text a site typed where a standard scheme's code belongs, each missing its scheme's form: letters
# under SNOMED CT, LOINC and DICOM, a UCUM annotation (free text by UCUM's grammar), a SNOMED-RT
# shape without a digit, an MDC code of words, a RadLex identifier with a name, and IBSI's four
# characters (a scheme with no form to check: only the codes pydicom knows stay).
TYPED = (("JaneDoe 1234567", "SCT"), ("MRN 0012345", "LN"), ("smith", "DCM"), ("{Jane Doe}", "UCUM"),
         ("mg{JaneDoe}", "UCUM"), ("T-JANED", "SRT"), ("Jane:Doe", "MDC"), ("RIDJaneDoe", "RADLEX"), ("JDOE", "IBSI"))
TYPED_PHI = {"JaneDoe", NAME, "0012345", "1234567", "smith", "JANED", "JDOE"}
LONG_SCT = f"{NAME} MRN 0012345 order text"  # UC: typed where an 18-digit SNOMED CT identifier goes
URN = "urn:staldric:JaneDoe:0012345"


def _slice_with_typed_codes() -> Dataset:
    """The typed codes at the top level and two and three levels down, with a long value, a URN
    and a version a site typed into standard codes."""
    ds = ct_slice()
    typed = [_code(value, scheme, f"{NAME}, {MRN}") for value, scheme in TYPED]
    long_sct = _code("", "SCT", f"Order for {NAME}")
    del long_sct.CodeValue
    long_sct.LongCodeValue = LONG_SCT
    urn = _code("", "RADELEMENT", f"Finding of {NAME}")
    del urn.CodeValue
    urn.URNCodeValue = URN
    ds.ProcedureCodeSequence = Sequence([*typed[:3], long_sct, _code(*LUNG, CodingSchemeVersion="JaneDoe")])
    anatomic = _code(*LUNG)
    anatomic.AnatomicRegionModifierSequence = Sequence([typed[3], urn])
    ds.AnatomicRegionSequence = Sequence([anatomic])
    reference = Dataset()
    reference.ReferencedSOPClassUID = pydicom.uid.CTImageStorage
    reference.ReferencedSOPInstanceUID = "1.2.3.4.777"
    reference.PurposeOfReferenceCodeSequence = Sequence(typed[4:6])
    ds.ReferencedImageSequence = Sequence([reference])
    protocol = _code(*LOCALIZER)
    protocol.ProtocolContextSequence = Sequence([Dataset()])
    protocol.ProtocolContextSequence[0].ConceptNameCodeSequence = Sequence(typed[6:])
    ds.PerformedProtocolCodeSequence = Sequence([protocol])
    return ds


def _keyed(item: Dataset, scheme: str, value: str) -> None:
    """`item` is a local code: the keyed name of its scheme and value, no trace of either."""
    mapper = KeyedMapper(KEY)
    assert item.CodeValue == mapper.code("code", f"{scheme}\\\\{value}")
    assert item.CodingSchemeDesignator == ("99" + mapper.code("scheme", scheme))[:16]
    assert item.CodeMeaning == REMOVED_MEANING
    assert not {"LongCodeValue", "URNCodeValue", "CodingSchemeVersion"} & set(item.dir())


def test_text_typed_as_a_standard_schemes_code_leaves_no_trace_however_deep(deid: Deidentifier, tmp_path: Path) -> None:
    deid.dataset(_slice_with_typed_codes()).save_as(tmp_path / "out.dcm", enforce_file_format=True)
    assert scan_for_phi(tmp_path, PHI | TYPED_PHI | {URN, LONG_SCT}) == []
    raw = (tmp_path / "out.dcm").read_bytes().lower()
    assert not [text for text in (*TYPED_PHI, "doe") if text.lower().encode() in raw]
    back = pydicom.dcmread(tmp_path / "out.dcm")
    procedure = back.ProcedureCodeSequence
    modifiers = back.AnatomicRegionSequence[0].AnatomicRegionModifierSequence
    purposes = back.ReferencedImageSequence[0].PurposeOfReferenceCodeSequence
    concepts = back.PerformedProtocolCodeSequence[0].ProtocolContextSequence[0].ConceptNameCodeSequence
    for item, (value, scheme) in zip([*procedure[:3], modifiers[0], *purposes, *concepts], TYPED, strict=True):
        _keyed(item, scheme, value)
    _keyed(procedure[3], "SCT", LONG_SCT)
    _keyed(modifiers[1], "RADELEMENT", URN)
    # A known code keeps its value, scheme and meaning; only the version typed into it goes.
    lung = procedure[4]
    assert (lung.CodeValue, lung.CodingSchemeDesignator, lung.CodeMeaning) == LUNG
    assert "CodingSchemeVersion" not in lung


@pytest.mark.parametrize(("code", "meaning"), [
    (("39607008", "SCT", "Lung"), "Lung"),
    (("T-28000", "SRT", "Lung"), "Lung"),
    (("8867-4", "LN", "Heart rate"), "Heart rate"),
    (("121311", "DCM", "Localizer"), "Localizer"),
    (("CT", "DCM", "Computed Tomography"), "Computed Tomography"),  # lettered: known, so kept
    (("mm[Hg]", "UCUM", "mmHg"), "mmHg"),
    (("g/ml{SUVbw}", "UCUM", "Standardized Uptake Value body weight"), "Standardized Uptake Value body weight"),
    (("RID10312", "RADLEX", f"{NAME}"), REMOVED_MEANING),
    # Not known to pydicom but of the scheme's form: the value stays, the meaning no one vetted goes.
    (("44054006", "SCT", f"Diabetes of {NAME}"), REMOVED_MEANING),  # partition 00, Verhoeff digit 6
    (("123456789012345107", "SCT", f"{NAME}"), REMOVED_MEANING),  # 18 digits: an extension's long form
    (("12345-5", "LN", f"{NAME}"), REMOVED_MEANING),  # LOINC's Mod 10 check digit
    (("mg/dL", "UCUM", f"{NAME}"), REMOVED_MEANING),
    (("10*3/uL", "UCUM", f"{NAME}"), REMOVED_MEANING),
    (("2:16770", "MDC", f"{NAME}"), REMOVED_MEANING),
    (("C0011860", "UMLS", f"{NAME}"), REMOVED_MEANING),
])
def test_a_standard_code_of_its_schemes_form_is_kept_exactly(
        deid: Deidentifier, code: tuple[str, str, str], meaning: str) -> None:
    ds = ct_slice()
    ds.ProcedureCodeSequence = Sequence([_code(*code)])
    item = deid.dataset(ds).ProcedureCodeSequence[0]
    assert (item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning) == (code[0], code[1], meaning)


@pytest.mark.parametrize(("value", "scheme"), [
    ("39607009", "SCT"),  # Lung with its check digit wrong
    ("1234567", "SCT"), ("0012345", "SCT"), ("12345678", "SCT"),  # numbers, not identifiers
    ("39607018", "SCT"),  # partition 01: a description, not a concept
    ("8867-5", "LN"), ("MRN-1", "LN"), ("1234567", "DCM"), ("CHEST", "DCM"), ("Jane", "UCUM"),
    ("[JaneDoe]", "UCUM"), ("mg Jane", "UCUM"), ("T-SMITH", "SRT"), ("C12345 JD", "NCIt"), ("C123", "UMLS"),
    ("1.2.3.4.5.666", "DCMUID"), ("4624 Doe", "PUBCHEM_CID"),
    # Numbers of a scheme's shape that are a date or an MRN as well: DCM and SNOMED-RT keep known
    # codes only, a UCUM unit needs a unit.
    ("555123", "DCM"), ("130999", "DCM"), ("MR-12345", "SRT"), ("R-FFFF0", "SRT"), ("ID-00123", "SNM3"),
    ("19800101", "UCUM"), ("0012345", "UCUM"), ("10*5551234", "UCUM"),
])
def test_a_standard_code_not_of_its_schemes_form_is_keyed_as_a_local_one(
        deid: Deidentifier, value: str, scheme: str) -> None:
    ds = ct_slice()
    ds.ProcedureCodeSequence = Sequence([_code(value, scheme, f"{NAME}")])
    _keyed(deid.dataset(ds).ProcedureCodeSequence[0], scheme, value)


def test_every_code_pydicoms_dictionaries_know_is_kept_exactly(deid: Deidentifier) -> None:
    """Every code of PS3.16's context groups as pydicom holds them, SNOMED-RT's through its map to
    SNOMED CT, keeps its value, scheme and standard meaning, whatever its scheme's form says (PS3.16
    prints a few that miss it: SCT 115347700's check digit, LN 11524-0's, UCUM "ppm"). The 23,000
    codes go through the coded-item rule on one item: building as many items and running the whole
    profile over them takes twice as long, and the tests above run the whole profile."""
    known = {(scheme, value): meanings[0] for (scheme, value), meanings in standard_meanings().items() if value}
    assert len(known) > 23_000 and sum(scheme == "SRT" for scheme, _ in known) > 7_900
    item = _code("", "", "")
    changed = []
    for (scheme, value), meaning in known.items():
        item["CodeValue"].value, item["CodingSchemeDesignator"].value = value, scheme
        item["CodeMeaning"].value = meaning
        deid._clean_code(item)
        if (item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning) != (value, scheme, meaning):
            changed.append((scheme, value, item.CodeMeaning))
    assert changed == []


@pytest.mark.parametrize(("version", "kept"), [("1.4", True), ("01", True), ("20230131", False), ("2.73", True),
                                               (NAME, False), ("v2 JaneDoe", False), ("", False)])
def test_a_standard_codes_version_is_kept_only_when_it_is_a_short_number(deid: Deidentifier, version: str, kept: bool) -> None:
    ds = ct_slice()
    ds.ProcedureCodeSequence = Sequence([_code(*LUNG, CodingSchemeVersion=version)])
    item = deid.dataset(ds).ProcedureCodeSequence[0]
    assert (item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning) == LUNG
    assert item.get("CodingSchemeVersion") == (version if kept else None)


# The Enhanced Encoding Mode of the Code Sequence Macro, as a site might fill it.
SITE_CONTEXT = {"MappingResource": "99STALDRIC", "MappingResourceName": f"Saint Aldric, {NAME}",
                "MappingResourceUID": "1.2.826.0.1.3680043.99.31", "ContextIdentifier": "JANEDOE",
                "ContextUID": "1.2.826.0.1.3680043.99.32", "ContextGroupVersion": "20190101",
                "ContextGroupExtensionFlag": "Y", "ContextGroupLocalVersion": "20200304050607",
                "ContextGroupExtensionCreatorUID": "1.2.826.0.1.3680043.99.33"}
CONTEXT_PHI = {"99STALDRIC", "Saint Aldric", "JANEDOE", "1.2.826.0.1.3680043.99.31", "1.2.826.0.1.3680043.99.32",
               "1.2.826.0.1.3680043.99.33", "20190101", "20200304050607"}


def test_a_local_codes_context_and_mapping_attributes_carry_no_text(deid: Deidentifier, tmp_path: Path) -> None:
    local = _local()
    for keyword, value in SITE_CONTEXT.items():
        setattr(local, keyword, value)
    local.EquivalentCodeSequence = Sequence([_local("ACC998878"), _code(*LUNG)])
    standard = _code(*LOCALIZER, **SITE_CONTEXT)  # a standard code in a site's "context group"
    ds = ct_slice()
    ds.ProcedureCodeSequence = Sequence([local, standard])
    deid.dataset(ds).save_as(tmp_path / "out.dcm", enforce_file_format=True)
    assert scan_for_phi(tmp_path, PHI | CONTEXT_PHI) == []
    raw = (tmp_path / "out.dcm").read_bytes()
    assert not [text for text in CONTEXT_PHI | {"ACC998878"} if text.encode() in raw]
    back = pydicom.dcmread(tmp_path / "out.dcm")
    local, standard = back.ProcedureCodeSequence
    assert not set(SITE_CONTEXT) & set(local.dir()) and not set(SITE_CONTEXT) & set(standard.dir())
    assert (standard.CodeValue, standard.CodingSchemeDesignator, standard.CodeMeaning) == LOCALIZER
    # The equivalent codes are coded items like any other: the local one keyed, the standard one kept.
    equivalent, lung = local.EquivalentCodeSequence
    assert equivalent.CodeMeaning == REMOVED_MEANING and equivalent.CodeValue not in (ACCESSION, "ACC998878")
    assert (lung.CodeValue, lung.CodingSchemeDesignator, lung.CodeMeaning) == LUNG


def test_a_standard_codes_context_group_stays_when_its_coded_values_are_the_standards(deid: Deidentifier) -> None:
    ds = ct_slice()
    context = {"MappingResource": "DCMR", "ContextIdentifier": "4031", "ContextGroupExtensionFlag": "N",
               "MappingResourceName": f"DICOM Content Mapping Resource for {NAME}",
               "ContextGroupVersion": "20220101", "ContextUID": "1.2.826.0.1.3680043.99.32"}
    ds.ProcedureCodeSequence = Sequence([_code(*LUNG, **context)])
    item = deid.dataset(ds).ProcedureCodeSequence[0]
    assert (item.MappingResource, item.ContextIdentifier, item.ContextGroupExtensionFlag) == ("DCMR", "4031", "N")
    # What the nets do to the rest: the name (LO) removed, the version shifted, a UID remapped.
    assert "MappingResourceName" not in item
    assert item.ContextGroupVersion not in ("20220101", "")
    assert item.ContextUID == KeyedMapper(KEY).uid(context["ContextUID"])


def test_a_code_without_a_designator_gets_a_local_one(deid: Deidentifier) -> None:
    """A code value with no CodingSchemeDesignator is a local code whose item PS3.3 8.8 does not
    allow: it is keyed as one, and gets the keyed designator of the empty scheme."""
    ds = ct_slice()
    item = Dataset()
    item.CodeValue, item.CodeMeaning = "MRN 0012345", f"{NAME}"
    ds.ProcedureCodeSequence = Sequence([item])
    _keyed(deid.dataset(ds).ProcedureCodeSequence[0], "", "MRN 0012345")
