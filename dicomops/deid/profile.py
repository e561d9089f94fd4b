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
text only where a standard coding scheme vouches for it and its code has that scheme's form
(:meth:`Deidentifier._clean_code`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
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
# Coding Scheme Version is 1C (PS3.3 8.8: "if necessary to resolve ambiguity"), which no standard
# designator needs: a scheme whose codes change meaning between editions has a designator for each
# (I9, I10, I11; SNM3, SRT, SCT). Its values are numbers: "01" (DCM), "1.4" (SRT), "2.73" (LN),
# anything else is text a site typed, and goes. Short ones only: an eight-digit edition date
# ("20230131" for SCT) could as well be a birth date, and goes too.
_VERSION = re.compile(r"\d{1,3}(?:\.\d{1,3}){0,2}", re.ASCII)
# The Enhanced Encoding Mode of the Code Sequence Macro (PS3.3 8.8): the context group a code was
# chosen from. A local code's item loses them all (its keyed code is in no one's context group, and
# every one of them is Type 3 or required only beside another); a standard code keeps them when
# the CS values among them have their defined form (the names and UIDs are left to the text and
# UID nets, the versions, DT, to the date shift): MappingResource's defined terms (DCMR; SDM,
# retired), a CID number, Y or N. Otherwise a CS value could carry any text word for word.
CONTEXT_ATTRIBUTES = ("MappingResource", "MappingResourceName", "MappingResourceUID", "ContextIdentifier",
                      "ContextUID", "ContextGroupVersion", "ContextGroupExtensionFlag", "ContextGroupLocalVersion",
                      "ContextGroupExtensionCreatorUID")
_CONTEXT_FORMS = {"MappingResource": re.compile(r"DCMR|SDM"), "ContextIdentifier": re.compile(r"\d{1,6}", re.ASCII),
                  "ContextGroupExtensionFlag": re.compile(r"[YN]")}

# The form of a standard scheme's codes, where a published one tells a code from text. A code
# pydicom's concept dictionaries know stays whatever its form; any other code of a standard
# scheme stays only when it has its scheme's form, and is keyed as a local code when it has not,
# so that text typed under a standard designator (SCT "JaneDoe 1234567", LN "MRN 0012345", UCUM
# "{Jane Doe}") does not pass. A standard scheme not named here has no form that tells its codes
# from a site's text (IBSI's four characters, a bare number): only the codes pydicom knows stay.
# SNOMED CT Technical Implementation Guide, "SCTID": 6 to 18 digits, no leading zero, the
# partition identifier of a concept (00, or 10 in an extension's long format) before a Verhoeff
# check digit. The tables are Verhoeff's (1969): the dihedral group D5 and its permutation.
_SCTID = re.compile(r"[1-9]\d{2,14}[01]0\d", re.ASCII)
_VERHOEFF_D = ("0123456789", "1234067895", "2340178956", "3401289567", "4012395678", "5987604321",
               "6598710432", "7659821043", "8765932104", "9876543210")
_VERHOEFF_P = ("0123456789", "1576283094", "5803796142", "8916043527", "9453126870", "4286573901",
               "2793806415", "7046913258")
# LOINC Users' Guide, "Calculating Mod 10 check digits": the number, a dash, its check digit.
_LOINC = re.compile(r"(\d{1,7})-(\d)", re.ASCII)
# SNOMED-RT and SNOMED International 3.x (SRT, SNM3), and DICOM's own codes (DCM): no form tells
# their codes from a site's text ("MR-12345" is of SNOMED-RT's shape, a six-digit MRN of DCM's),
# and their code lists are closed (SNOMED-RT retired, DCM in PS3.16, both in pydicom's dictionaries):
# the codes pydicom knows stay, any other is keyed.
# UCUM 2.2 (ucum-essence.xml, 2024-06-17), case-sensitive codes: its prefixes and unit atoms. A
# unit is atoms (each with an optional prefix and exponent) and integers joined by "." and "/",
# with parentheses; an annotation ("{...}", free text by UCUM's grammar) or a space is not kept.
_UCUM_PREFIXES = "Y Z E P T G M k h da d c m u n p f a z y Ki Mi Gi Ti"
_UCUM_ATOMS = """
m s g rad K C cd 10* 10^ % mol sr Hz N Pa J W A V F Ohm S Wb Cel T H lm lx Bq Gy Sv gon deg ' ''
l L ar min h d a_t a_j a_g a wk mo_s mo_j mo_g mo t bar u eV AU pc atm gf Ky Gal dyn erg P Bi St
Mx G Oe Gb sb Lmb ph Ci R RAD REM cal_m cal_IT cal_th cal tex eq osm g% kat U Np B st Ao b att
mho circ sph bit_s bit By Bd
[pi] [ppth] [ppm] [ppb] [pptr] [c] [h] [k] [eps_0] [mu_0] [e] [m_e] [m_p] [G] [g] [ly] [lbf_av]
[in_i] [ft_i] [yd_i] [mi_i] [fth_i] [nmi_i] [kn_i] [sin_i] [sft_i] [syd_i] [cin_i] [cft_i]
[cyd_i] [bf_i] [cr_i] [mil_i] [cml_i] [hd_i] [ft_us] [yd_us] [in_us] [rd_us] [ch_us] [lk_us]
[rch_us] [rlk_us] [fth_us] [fur_us] [mi_us] [acr_us] [srd_us] [smi_us] [sct] [twp] [mil_us]
[in_br] [ft_br] [rd_br] [ch_br] [lk_br] [fth_br] [pc_br] [yd_br] [mi_br] [nmi_br] [kn_br]
[acr_br] [gal_us] [bbl_us] [qt_us] [pt_us] [gil_us] [foz_us] [fdr_us] [min_us] [crd_us] [bu_us]
[gal_wi] [pk_us] [dqt_us] [dpt_us] [tbs_us] [tsp_us] [cup_us] [foz_m] [cup_m] [tsp_m] [tbs_m]
[gal_br] [pk_br] [bu_br] [qt_br] [pt_br] [gil_br] [foz_br] [fdr_br] [min_br] [gr] [lb_av]
[oz_av] [dr_av] [scwt_av] [lcwt_av] [ston_av] [lton_av] [stone_av] [pwt_tr] [oz_tr] [lb_tr]
[sc_ap] [dr_ap] [oz_ap] [lb_ap] [oz_m] [lne] [pnt] [pca] [pnt_pr] [pca_pr] [pied] [pouce]
[ligne] [didot] [cicero] [degF] [degR] [degRe] cal_[15] cal_[20] [Cal] [Btu_39] [Btu_59]
[Btu_60] [Btu_m] [Btu_IT] [Btu_th] [Btu] [HP] [den] m[H2O] m[Hg] [in_i'H2O] [in_i'Hg] [PRU]
[wood'U] [diop] [p'diop] %[slope] [mesh_i] [Ch] [drp] [hnsf'U] [MET] [hp'_X] [hp'_C] [hp'_M]
[hp'_Q] [hp_X] [hp_C] [hp_M] [hp_Q] [kp_X] [kp_C] [kp_M] [kp_Q] [pH] [S] [HPF] [LPF] [iU] [IU]
[arb'U] [USP'U] [GPL'U] [MPL'U] [APL'U] [beth'U] [anti'Xa'U] [todd'U] [dye'U] [smgy'U] [bdsk'U]
[ka'U] [knk'U] [mclg'U] [tb'U] [CCID_50] [TCID_50] [EID_50] [PFU] [FFU] [CFU] [IR] [BAU] [AU]
[Amb'a'1'U] [PNU] [Lf] [D'ag'U] [FEU] [ELU] [EU] B[SPL] B[V] B[mV] B[uV] B[10.nV] B[W] B[kW]
[psi] [car_m] [car_Au] [smoot] [m/s2/Hz^(1/2)] [NTU] [FNU]
"""


def _alternatives(symbols: str) -> str:
    return "|".join(re.escape(s) for s in sorted(symbols.split(), key=len, reverse=True))


# One token of a UCUM unit: a prefixed atom with its exponent, an integer, an operator, a parenthesis.
_UCUM_TOKEN = re.compile(rf"(?P<unit>(?:{_alternatives(_UCUM_PREFIXES)})?(?:{_alternatives(_UCUM_ATOMS)})"
                         rf"(?:[+-]?\d{{1,2}})?)|(?P<factor>\d{{1,4}})|(?P<operator>[./])|(?P<open>\()|(?P<close>\))", re.ASCII)


def _is_sctid(value: str) -> bool:
    if not _SCTID.fullmatch(value):
        return False
    check = 0
    for position, digit in enumerate(reversed(value)):
        check = int(_VERHOEFF_D[check][int(_VERHOEFF_P[position % 8][int(digit)])])
    return check == 0


def _is_loinc(value: str) -> bool:
    match = _LOINC.fullmatch(value)
    if match is None:
        return False
    total = 0
    for position, digit in enumerate(reversed(match[1])):
        doubled = int(digit) * (2 if position % 2 == 0 else 1)
        total += doubled // 10 + doubled % 10
    return (10 - total % 10) % 10 == int(match[2])


def _is_ucum(value: str) -> bool:
    """Whether `value` is a UCUM unit without annotations: every character in a token, operands (a
    unit, an integer, a parenthesised term) and operators in turn, parentheses balanced, and at
    least one unit ("1", the unity, aside): a number alone is a date or an MRN as well. Exponents
    of two digits, integers of four at most. A term may begin with "/" ("/min")."""
    if value == "1":
        return True
    depth, end, operand_next, units = 0, 0, True, 0
    for token in _UCUM_TOKEN.finditer(value):
        units += token.lastgroup == "unit"
        if token.start() != end:
            return False
        kind, leading = token.lastgroup, value[end - 1:end] in ("", "(")
        end = token.end()
        if kind in ("unit", "factor") and operand_next:
            operand_next = False
        elif kind == "operator" and (not operand_next or (token[0] == "/" and leading)):
            operand_next = True
        elif kind == "open" and operand_next:
            depth += 1
        elif kind == "close" and not operand_next and depth > 0:
            depth -= 1
        else:
            return False
    return end == len(value) and not operand_next and depth == 0 and units > 0


def _form(pattern: str) -> Callable[[str], bool]:
    compiled = re.compile(pattern, re.ASCII)
    return lambda value: compiled.fullmatch(value) is not None


_CODE_FORMS: dict[str, Callable[[str], bool]] = {
    "SCT": _is_sctid,
    "LN": _is_loinc,
    "UCUM": _is_ucum,
    # ISO/IEEE 11073-10101: a partition and a term code, each a 16-bit number, written "2:33792".
    "MDC": _form(r"\d{1,5}:\d{1,5}"),
    # RSNA: RadLex term identifiers are "RID" and a number (Playbook procedures "RPID").
    "RADLEX": _form(r"RP?ID\d{1,7}"),
    # UMLS Reference Manual: a concept unique identifier is "C" and seven digits.
    "UMLS": _form(r"C\d{7}"),
    # NCI Thesaurus: a concept code is "C" and a number.
    "NCIt": _form(r"C\d{1,7}"),
    # PS3.16 Table 8-1: DICOM UIDs used as codes; a UID pydicom names is the standard's.
    "DCMUID": lambda value: value in UID_dictionary,
}


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


_TAGS = {keyword: Tag(keyword) for keyword in (*CODE_ATTRIBUTES, *CONTEXT_ATTRIBUTES)}


def _texts(ds: Dataset, keywords: Iterable[str]) -> dict[str, str]:
    """{keyword: its value as text, "" when empty} for each of `keywords` that `ds` holds. By tag,
    not by keyword: this runs on every item of every sequence."""
    texts: dict[str, str] = {}
    for keyword in keywords:
        elem = ds.get(_TAGS[keyword])
        if elem is not None:
            texts[keyword] = "" if elem.value is None else str(elem.value)
    return texts


def _remove(ds: Dataset, keywords: Iterable[str]) -> None:
    for keyword in keywords:
        if _TAGS[keyword] in ds:
            del ds[_TAGS[keyword]]


def is_standard_code(scheme: str, value: str) -> bool:
    """Whether `value` is a code of the standard scheme `scheme`: one pydicom's concept dictionaries
    know, or one of the scheme's published form (a scheme without one: none other)."""
    if value and (scheme, value) in standard_meanings():
        return True
    form = _CODE_FORMS.get(scheme)
    return form is not None and form(value)


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

        A code of a standard scheme is the standard's term: its value and scheme stay, when the
        value is one pydicom knows or has the scheme's form (:func:`is_standard_code`); a version
        stays when it is a number (``1.4``). Its meaning stays when it is one PS3.16 gives that code
        (case aside), is set to that one when the code is known with another (a site that wrote a
        name into it), and is replaced by :data:`REMOVED_MEANING` when the code is not one pydicom
        knows: such a meaning is text no one vetted, the Clean Descriptors Option's case (PS3.15
        E.3.5), and a reader that needs it looks the code up. Its context group attributes stay
        when their coded values have their defined form.

        A local scheme's code (PS3.3 8.2: "L", "99..."; here any scheme not standard), and a
        standard scheme's code that is not of its form (text a site typed under "SCT", a URN), is
        the site's own text: its meaning may be a sentence ("CT chest follow-up for Jane Doe"), its
        value an accession number, its designator and version may name the site. The item is kept,
        so that a Type 1 sequence keeps its item and the code stays valid (PS3.3 8.8), with its
        meaning replaced, its value a keyed name of the scheme, version and value (16 characters,
        the Code Value it then needs; the same code gets the same name in every batch, so codes can
        still be counted and compared), its designator a keyed local one ("99" and 14 characters),
        and its version and context group attributes removed (the keyed value already tells
        versions apart, and the code is in no one's context group).
        """
        code = _texts(ds, CODE_ATTRIBUTES)
        if not code:
            return
        # str() of several values lists them: no scheme is called that, so they read as local.
        scheme = code.get("CodingSchemeDesignator", "")
        values = [code[keyword] for keyword in CODE_VALUES if code.get(keyword)]
        if scheme in standard_schemes() and all(is_standard_code(scheme, value) for value in values):
            if "CodingSchemeVersion" in code and not _VERSION.fullmatch(code["CodingSchemeVersion"]):
                _remove(ds, ("CodingSchemeVersion",))
            context = _texts(ds, _CONTEXT_FORMS)
            if not all(_CONTEXT_FORMS[keyword].fullmatch(text) for keyword, text in context.items()):
                _remove(ds, CONTEXT_ATTRIBUTES)
            if "CodeMeaning" in code:
                meanings = standard_meanings().get((scheme, values[0])) if values else None
                if meanings is None:
                    ds.CodeMeaning = REMOVED_MEANING
                elif code["CodeMeaning"].casefold() not in {m.casefold() for m in meanings}:
                    ds.CodeMeaning = meanings[0]
            return
        _remove(ds, ("LongCodeValue", "URNCodeValue", "CodingSchemeVersion", *CONTEXT_ATTRIBUTES))
        if values:
            ds.CodeValue = self.mapper.code("code", "\\".join((scheme, code.get("CodingSchemeVersion", ""), values[0])))
        if scheme or values:  # a code value needs its designator (PS3.3 8.8): a keyed local one, even for none
            ds.CodingSchemeDesignator = ("99" + self.mapper.code("scheme", scheme))[:16]
        if "CodeMeaning" in code:
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
