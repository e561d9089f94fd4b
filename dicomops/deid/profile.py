"""DICOM PS3.15 Annex E de-identification with the options this platform needs.

The attribute table (which action applies to which of the ~650 attributes) is the standard's own,
as maintained in the ``dicom-anonymizer`` package (Kitware); this module decides how each action
is carried out and applies three options of Table E.1-1:

- Retain Longitudinal Temporal Information with Modified Dates: every DA is shifted by a
  per-patient offset, DT keeps its shifted date and its time; TM values are kept.
- Retain Patient Characteristics: age, sex, size, weight and similar are kept.
- Retain Device Identity: station name, device serial number and similar are kept.

On top of the table, safety nets apply everywhere, nested sequences included: private tags,
overlay/curve groups, URLs and elements no dictionary knows are removed, every person name is
emptied, every non-standard UID is remapped, every text value the table does not mention (LO, SH,
AE and the free-text VRs) is removed unless :data:`KEEP_TEXT` names it, a time that is not a time
is emptied, and the file meta is made again from what a reader needs. A coded item keeps its
text only where a standard coding scheme vouches for it (:meth:`Deidentifier._clean_code`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from functools import lru_cache
from typing import cast

from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag, Tag
from pydicom.uid import UID, UID_dictionary

from dicomops import __version__
from dicomops.config import DeidConfig
from dicomops.deid.keys import KeyedMapper, patient_id_text
from dicomops.dicom.forms import time_pattern

TABLE_VERSION: str = DeidConfig().table_version  # the config holds the one default
# Code values of CID 7050 (De-identification Method) for the profile and the options applied: the
# one definition of the profile. The header's DeidentificationMethod and code sequence, and the
# name that lineage tags record under PROFILE_TAG, are all derived from it.
METHOD_CODES = (("113100", "Basic Application Confidentiality Profile"),
                ("113107", "Retain Longitudinal Temporal Information Modified Dates Option"),
                ("113108", "Retain Patient Characteristics Option"),
                ("113109", "Retain Device Identity Option"))
PROFILE_NAME = "PS3.15 E.1 " + "; ".join(meaning for _, meaning in METHOD_CODES)
PROFILE_TAG = "deid.profile"  # the MLflow tag whose value is PROFILE_NAME
# DeidentificationMethod is LO: at most 64 characters, hence the code values rather than the name.
METHOD_TEXT = f"PS3.15 E.1 {' '.join(code for code, _ in METHOD_CODES)}; dicomops {__version__}"[:64]

# What the option keeps (K in its column of Table E.1-1). Allergies, SpecialNeeds and PatientState
# are C (clean) there, and AdditionalPatientHistory is not in the option at all (X): free text a
# site types an MRN into. Until 2026-12-05 all four were kept word for word; the table removes them.
RETAIN_PATIENT_CHARACTERISTICS = frozenset(Tag(k) for k in (
    "PatientAge", "PatientSex", "PatientSize", "PatientWeight", "EthnicGroup", "SmokingStatus",
    "PregnancyStatus", "PatientSexNeutered"))
RETAIN_DEVICE_IDENTITY = frozenset(Tag(k) for k in (
    "StationName", "DeviceSerialNumber", "DetectorID", "GantryID", "PlateID", "CassetteID",
    "GeneratorID", "DeviceDescription", "SourceSerialNumber", "DeviceLabel"))
# Text the table does not mention is removed unless listed here: an allow-list, because the
# dictionary holds hundreds of LO/SH elements the table leaves out, and a site may put anything in
# them (until 2026-12-06 every LO/SH such as PatientBirthDateInAlternativeCalendar, OwnerID or the
# retired PlacerOrderNumberProcedure went through word for word). Kept: what the pipeline reads
# past the gate (Manufacturer: the vendor of every fold and the gate's required column;
# ManufacturerModelName and ConvolutionKernel: drift features); what says how to read the pixels
# (RescaleType, 1C in the CT Image module); the Code Sequence Macro, which keeps a coded item valid
# once Deidentifier._clean_code has made its text safe; and the method this module writes.
KEEP_TEXT = frozenset(Tag(k) for k in (
    "DeidentificationMethod", "Manufacturer", "ManufacturerModelName", "ConvolutionKernel", "RescaleType",
    "CodeValue", "LongCodeValue", "CodingSchemeDesignator", "CodingSchemeVersion", "CodeMeaning"))
# Type 2 in the CT Image IOD, not in the table: present with zero length rather than removed.
EMPTIED_TEXT = frozenset(Tag(k) for k in ("PositionReferenceIndicator",))
TEXT_VRS = frozenset({"LO", "SH", "AE", "LT", "ST", "UT", "UC"})
# Removed wherever they stand: a URL (UR: RetrieveURL and the like) names a host and, often, the
# original study and series UIDs in its path; an element no dictionary knows (UN, group even) may
# hold anything. Until 2026-12-05 both went through with their values.
REMOVED_VRS = frozenset({"UR", "UN"})
# The file meta a reader needs; the instance UID is set to the dataset's remapped one.
FILE_META_KEPT = ("FileMetaInformationVersion", "MediaStorageSOPClassUID", "TransferSyntaxUID",
                  "ImplementationClassUID", "ImplementationVersionName")
REMOVED_GROUPS = (0x5000, 0x6000)
# The alternative-calendar birth and death dates are LO, not DA: the text net removes them.
NEVER_SHIFT = frozenset(Tag(k) for k in ("PatientBirthDate",))
REMOVE_TIMES = frozenset(Tag(k) for k in ("PatientBirthTime",))  # curves and overlays: may carry text and drawings
# A valid time, or one in the ACR-NEMA HH:MM:SS form PS3.5 still lets a reader accept.
_TIME = re.compile(time_pattern(separator=":?"))
# Coding schemes whose codes have published, fixed meanings: the designators of PS3.16 Table 8-1
# (with every scheme pydicom's concept dictionaries hold, see standard_schemes). Case matters, as in
# the standard. Not here: "L" and every designator beginning with "99", which PS3.3 8.2 reserves
# for private or local schemes (99SDM, the retired SNOMED DICOM Microglossary, among them), and any
# designator a site made up (ICD10 for I10, say): a scheme this list does not name is local.
STANDARD_SCHEMES = frozenset({
    "ACR", "ASTM-sigpurpose", "BARI", "C4", "C5", "caDSR", "CD2", "CTV3", "DC", "DCM", "DCMUID", "FMA",
    "HPC", "I10", "I10C", "I10P", "I11", "I9", "I9C", "IBSI", "ICDO3", "ISO3166_1", "ISO639_1", "ISO639_2",
    "ITIS_TSN", "LN", "MA", "MAYOASRG", "MDC", "MGI", "MSH", "NCIt", "NDC", "NEU", "NICIP", "NYUMCCG",
    "PATHLEX", "POS", "PUBCHEM_CID", "RADELEMENT", "RADLEX", "RFC3066", "RFC5646", "RO", "RRID", "RXNORM",
    "SCT", "SNM3", "SRT", "UBERON", "UCUM", "UMLS", "UNS", "UPC"})
CODE_VALUES = ("CodeValue", "LongCodeValue", "URNCodeValue")
CODE_ATTRIBUTES = (*CODE_VALUES, "CodingSchemeDesignator", "CodingSchemeVersion", "CodeMeaning")
# Code Meaning is Type 1 in the Code Sequence Macro (PS3.3 8.8): a meaning that cannot stay is
# replaced by this text, never emptied or removed.
REMOVED_MEANING = "meaning removed by de-identification"


@lru_cache(maxsize=4)
def attribute_actions(version: str = TABLE_VERSION) -> tuple[dict[int, str], tuple[tuple[int, int, int, int, str], ...]]:
    """The Annex E table as {tag: action} plus masked (repeating group) entries.

    Combined actions are resolved to the stricter one that keeps the IOD usable: Z/D → Z,
    X/Z, X/D, X/Z/D → X, X/Z/U* → U for UIDs and reference sequences (cleaned, UIDs
    remapped) and X otherwise.
    """
    from dicomanonymizer.dicomfields_selector import dicom_anonymization_database_selector

    table = dicom_anonymization_database_selector(version)
    resolve = {"D_TAGS": "D", "Z_TAGS": "Z", "X_TAGS": "X", "U_TAGS": "U", "Z_D_TAGS": "Z",
               "X_Z_TAGS": "X", "X_D_TAGS": "X", "X_Z_D_TAGS": "X", "X_Z_U_STAR_TAGS": "XU"}
    exact: dict[int, str] = {}
    masked: list[tuple[int, int, int, int, str]] = []
    for category, action in resolve.items():
        for entry in table[category]:
            if len(entry) == 2:
                exact[int(Tag(entry[0], entry[1]))] = action
            else:
                group, elem, gmask, emask = entry
                masked.append((group, elem, gmask, emask, action))
    return exact, tuple(masked)


@lru_cache(maxsize=1)
def standard_schemes() -> frozenset[str]:
    """:data:`STANDARD_SCHEMES` and the schemes of pydicom's concept dictionaries (made from PS3.16)."""
    from pydicom.sr.codedict import codes

    return STANDARD_SCHEMES | frozenset(codes.schemes())


@lru_cache(maxsize=1)
def standard_meanings() -> dict[tuple[str, str], tuple[str, ...]]:
    """{(scheme, code value): the meanings PS3.16 gives the code, shortest first}, from pydicom's
    concept dictionaries; a SNOMED-RT code has the meanings of the SNOMED CT concept pydicom maps it to.

    These are the codes DICOM's context groups use (about 15,000), not whole terminologies.
    """
    from pydicom.sr._snomed_dict import mapping
    from pydicom.sr.codedict import CONCEPTS, ConceptsType

    found: dict[tuple[str, str], set[str]] = {}
    for scheme, by_keyword in cast("dict[str, ConceptsType]", CONCEPTS).items():
        for by_value in by_keyword.values():
            for value, (meaning, _cids) in by_value.items():
                found.setdefault((scheme, value), set()).add(meaning)
    for srt, sct in mapping["SRT"].items():
        if ("SCT", sct) in found:
            found[("SRT", srt)] = found[("SCT", sct)]
    return {key: tuple(sorted(meanings, key=lambda m: (len(m), m))) for key, meanings in found.items()}


def _action_for(tag: BaseTag, exact: dict[int, str],
                masked: Iterable[tuple[int, int, int, int, str]]) -> str | None:
    action = exact.get(int(tag))
    if action is not None:
        return action
    for group, elem, gmask, emask, masked_action in masked:
        if (tag.group & gmask) == group and (tag.elem & emask) == elem:
            return masked_action
    return None


class Deidentifier:
    """Applies the profile to datasets with one key, so every batch maps identically."""

    def __init__(self, mapper: KeyedMapper, table_version: str = TABLE_VERSION) -> None:
        self.mapper = mapper
        self.exact, self.masked = attribute_actions(table_version)

    def dataset(self, ds: Dataset) -> Dataset:
        """De-identify `ds` in place (file meta included) and return it."""
        patient = patient_id_text(ds.get("PatientID"))
        ds.remove_private_tags()
        self._clean(ds, patient)
        pseudonym = self.mapper.pseudonym(patient)
        ds.PatientID = pseudonym
        ds.PatientName = pseudonym
        ds.PatientIdentityRemoved = "YES"
        ds.LongitudinalTemporalInformationModified = "MODIFIED"
        ds.DeidentificationMethod = METHOD_TEXT
        codes = []
        for value, meaning in METHOD_CODES:
            item = Dataset()
            item.CodeValue = value
            item.CodingSchemeDesignator = "DCM"
            item.CodeMeaning = meaning
            codes.append(item)
        ds.DeidentificationMethodCodeSequence = Sequence(codes)
        meta = getattr(ds, "file_meta", None)
        if isinstance(meta, FileMetaDataset):
            ds.file_meta = self._file_meta(meta, ds)
        ds.preamble = b"\x00" * 128
        return ds

    def _file_meta(self, meta: FileMetaDataset, ds: Dataset) -> FileMetaDataset:
        """The file meta made again from what a reader needs (:data:`FILE_META_KEPT`), the instance
        UID remapped as the dataset's: everything else a writer put there goes (the sending and
        receiving AE titles, its network address, the instance UIDs of RTV communication, private
        information), whatever the keyword, rather than the few a list of removals named."""
        kept = FileMetaDataset()
        for keyword in FILE_META_KEPT:
            if keyword in meta:
                kept[keyword] = meta[keyword]
        if "SOPInstanceUID" in ds:
            kept.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        elif "MediaStorageSOPInstanceUID" in meta:
            kept.MediaStorageSOPInstanceUID = UID(self.mapper.uid(str(meta.MediaStorageSOPInstanceUID).strip()))
        return kept

    def _clean_code(self, ds: Dataset) -> None:
        """Make the text of one coded item (a Code Sequence Macro) safe before the item is cleaned.

        A code of a standard scheme is the standard's term: its value and scheme stay. Its meaning
        stays when it is one PS3.16 gives that code (case aside), is set to that one when the code
        is known with another (a site that wrote a name into it), and is replaced by
        :data:`REMOVED_MEANING` when the code is not one pydicom knows: such a meaning is text no one
        vetted, the Clean Descriptors Option's case (PS3.15 E.3.5), and a reader that needs it looks
        the code up.

        A local scheme's code (PS3.3 8.2: "L", "99..."; here any scheme not standard) is the site's
        own text: its meaning may be a sentence ("CT chest follow-up for Jane Doe"), its value an
        accession number, its designator and version may name the site. The item is kept, so that
        a Type 1 sequence keeps its item and the code stays valid (PS3.3 8.8), with its meaning
        replaced, its value a keyed name of the scheme, version and value (16 characters, the
        Code Value it then needs; the same code gets the same name in every batch, so codes can
        still be counted and compared), its designator a keyed local one ("99" and 14 characters),
        and its version removed (the keyed value already tells versions apart).
        """
        if not any(keyword in ds for keyword in CODE_ATTRIBUTES):
            return
        # str() of several values lists them: no scheme is called that, so they read as local.
        scheme = str(ds.get("CodingSchemeDesignator") or "")
        if scheme in standard_schemes():
            if "CodeMeaning" in ds:
                value = str(ds.get("CodeValue") or ds.get("LongCodeValue") or "")
                meanings = standard_meanings().get((scheme, value))
                if meanings is None:
                    ds.CodeMeaning = REMOVED_MEANING
                elif str(ds.CodeMeaning).casefold() not in {m.casefold() for m in meanings}:
                    ds.CodeMeaning = meanings[0]
            return
        value = next((str(ds.get(keyword)) for keyword in CODE_VALUES if ds.get(keyword)), "")
        version = str(ds.get("CodingSchemeVersion") or "")
        for keyword in ("LongCodeValue", "URNCodeValue", "CodingSchemeVersion"):
            if keyword in ds:
                del ds[keyword]
        if value:
            ds.CodeValue = self.mapper.code("code", "\\".join((scheme, version, value)))
        if scheme:
            ds.CodingSchemeDesignator = ("99" + self.mapper.code("scheme", scheme))[:16]
        if "CodeMeaning" in ds:
            ds.CodeMeaning = REMOVED_MEANING

    def _clean(self, ds: Dataset, patient: str) -> None:
        self._clean_code(ds)
        for elem in list(ds):
            tag = elem.tag
            if tag.is_private or (tag.group & 0xFF00) in REMOVED_GROUPS:
                del ds[tag]
                continue
            vr = elem.VR
            if vr in REMOVED_VRS:
                del ds[tag]
                continue
            if tag in RETAIN_PATIENT_CHARACTERISTICS or tag in RETAIN_DEVICE_IDENTITY:
                continue
            action = _action_for(tag, self.exact, self.masked)
            if vr in ("DA", "DT") and tag not in NEVER_SHIFT:
                # The option modifies every date (C in its column of Table E.1-1), even those
                # the basic profile would remove.
                self._shift(elem, patient)
                continue
            if vr == "TM" and tag not in REMOVE_TIMES:
                # Times stay: with shifted dates they identify no one. A value that is not a time
                # (a reader keeps a malformed TM as the text it was given) is not a time to keep.
                values = list(elem.value) if elem.VM > 1 else [elem.value]
                if not all(_TIME.fullmatch(str(v).strip()) for v in values if str(v).strip()):
                    elem.value = ""
                continue
            if action == "XU":  # X/Z/U*: keep references, with every UID inside remapped
                action = "U" if vr in ("UI", "SQ") else "X"
            if action == "X":
                del ds[tag]
                continue
            if vr == "SQ":
                if action == "Z":
                    elem.value = Sequence()
                else:
                    for item in elem.value:
                        self._clean(item, patient)
                continue
            if action == "Z":
                elem.value = ""  # zero length
            elif action == "D":
                elem.value = self._dummy(vr)
            elif action == "U" or vr == "UI":
                self._remap(elem)
            elif vr == "PN" or tag in EMPTIED_TEXT:  # any name; Type 2 text: present, empty
                elem.value = ""
            elif vr in TEXT_VRS and tag not in KEEP_TEXT:
                del ds[tag]

    def _remap(self, elem: DataElement) -> None:
        def one(uid: str) -> str:
            uid = str(uid).strip()
            return uid if (not uid or uid in UID_dictionary) else self.mapper.uid(uid)

        if elem.VM > 1:
            elem.value = [one(v) for v in elem.value]
        elif elem.value:
            elem.value = one(elem.value)

    def _shift(self, elem: DataElement, patient: str) -> None:
        shift = self.mapper.shift_date if elem.VR == "DA" else self.mapper.shift_datetime
        values = list(elem.value) if elem.VM > 1 else [elem.value]
        shifted = [shift(str(v), patient) if str(v).strip() else "" for v in values]
        # A value that is not a date cannot be shifted, so it cannot be kept either.
        shifted = ["" if v == "malformed" else v for v in shifted]
        elem.value = shifted if elem.VM > 1 else shifted[0]

    @staticmethod
    def _dummy(vr: str) -> object:
        if vr in ("US", "SS", "UL", "SL", "FL", "FD", "IS", "DS", "UV", "SV"):
            return 0
        if vr == "TM":
            return "000000"
        if vr in ("OB", "OW", "UN"):
            return b"\x00\x00"
        return "ANONYMIZED"
