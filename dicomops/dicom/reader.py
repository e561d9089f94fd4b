"""Read one file's header safely and turn it into a de-identified index row, or a reason code.

Nothing in here trusts the file: sizes are checked before values are read, deflated data is
inflated under a bound, large values are never loaded, and every failure becomes a reason code
rather than an exception. The row that leaves this module carries no PHI: identifiers are keyed
pseudonyms, UIDs are remapped, dates are shifted.
"""

from __future__ import annotations

import errno
import functools
import math
import os
import re
import stat
import struct
import zlib
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any, Protocol

import pydicom
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.encaps import parse_basic_offsets, parse_fragments
from pydicom.errors import InvalidDicomError
from pydicom.filereader import _read_file_meta_info, read_dataset
from pydicom.tag import Tag
from pydicom.uid import (
    UID,
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    MediaStorageDirectoryStorage,
)

from dicomops.deid.keys import KeyedMapper
from dicomops.dicom.fastheader import VR_BYTES, decode_value, keyword_tag, read_fast
from dicomops.errors import local_outage
from dicomops.validation.dates import STUDY_DATE_VERDICT, da_verdict

PREAMBLE = 128
EXECUTABLE_MAGIC = (b"MZ", b"\x7fELF")
SEQUENCE_DELIMITER = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
TRAILING_PADDING_TAG = b"\xfc\xff\xfc\xff"  # (FFFC,FFFC) Data Set Trailing Padding, PS3.5 7.1
# Groups a dataset without preamble may start with: file meta, or the SOP Common/General Study group.
FIRST_GROUPS = (0x0002, 0x0008)
# Storage SOP classes the gate turns into volumes: single-frame CT Image Storage. Multi-frame
# Enhanced CT would need per-frame functional groups for geometry, which the index does not read.
SUPPORTED_SOP_CLASSES = (CTImageStorage,)
PIXEL_DATA_TAG = b"\xe0\x7f\x10\x00"
PIXEL_DATA_TAG_BE = b"\x7f\xe0\x00\x10"
_DEFLATED = DeflatedExplicitVRLittleEndian.encode()
NATIVE_SYNTAXES = {ImplicitVRLittleEndian, ExplicitVRLittleEndian, ExplicitVRBigEndian,
                   DeflatedExplicitVRLittleEndian}

# Tags a file must carry to be usable at all; their absence is `missing_tag:<Keyword>`. StudyDate is
# Type 2 (may be empty, as in the CQ500 files): its verdict column says whether it is valid or empty.
REQUIRED_TAGS = (
    "SOPInstanceUID", "SOPClassUID", "StudyInstanceUID", "SeriesInstanceUID", "PatientID",
    "Modality", "Manufacturer", "PixelSpacing", "SliceThickness", "Rows", "Columns", "BitsAllocated",
    "BitsStored", "PixelRepresentation", "RescaleSlope", "RescaleIntercept", "ImagePositionPatient",
    "ImageOrientationPatient",
)
UID_COLUMNS = ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID")
TEXT_COLUMNS = ("Modality", "Manufacturer", "ManufacturerModelName", "ConvolutionKernel",
                "BodyPartExamined", "PhotometricInterpretation", "PatientSex", "PatientAge",
                "PatientPosition", "BurnedInAnnotation")
INT_COLUMNS = ("Rows", "Columns", "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation",
               "SamplesPerPixel", "NumberOfFrames", "InstanceNumber", "PixelPaddingValue")
FLOAT_COLUMNS = ("SliceThickness", "SpacingBetweenSlices", "KVP", "RescaleSlope", "RescaleIntercept",
                 "XRayTubeCurrent", "GantryDetectorTilt", "PatientSize", "PatientWeight")
# Every tag the index row reads; the fast reader keeps exactly these.
WANTED_KEYWORDS = tuple(sorted(set(REQUIRED_TAGS) | set(UID_COLUMNS) | set(TEXT_COLUMNS) | set(INT_COLUMNS)
                               | set(FLOAT_COLUMNS) | {"ImageType", "WindowCenter", "WindowWidth", "StudyDate",
                                                      "InstitutionName", "SpecificCharacterSet", "RescaleType",
                                                      "LossyImageCompression"}))
# The CT Image Module (PS3.3 C.8.2.1) allows one grey sample per pixel, shown either way up.
CT_PHOTOMETRIC = ("MONOCHROME2", "MONOCHROME1")
# Defined terms of PhotometricInterpretation (PS3.3 C.7.6.3.1.2) and RescaleType (C.11.1.1.2): only
# these are ever repeated in a detail (a hostile header can put anything in a CS value).
PHOTOMETRIC_TERMS = frozenset({"MONOCHROME1", "MONOCHROME2", "PALETTE COLOR", "RGB", "HSV", "ARGB", "CMYK",
                               "YBR_FULL", "YBR_FULL_422", "YBR_PARTIAL_422", "YBR_PARTIAL_420", "YBR_ICT",
                               "YBR_RCT", "XYB"})
RESCALE_TYPE_TERMS = frozenset({"OD", "HU", "US", "MGML", "Z_EFF", "ED", "EDW", "HU_MOD", "PCT"})
# The columns of an index row (:func:`_index_row`), with a dtype for the index of a batch in which no
# file could be read: that empty index keeps every column, so later steps see an empty table.
INDEX_SCHEMA: dict[str, str] = {
    "source_path": "object", "file_bytes": "Int64", "TransferSyntaxUID": "object", "executable_preamble": "bool",
    **dict.fromkeys(INT_COLUMNS, "Int64"), **dict.fromkeys(FLOAT_COLUMNS, "float64"),
    **dict.fromkeys(TEXT_COLUMNS, "object"),
    "SOPClassUID": "object", "ImageType": "object", "WindowCenter": "object", "WindowWidth": "object",
    **{f"PixelSpacing_{i}": "float64" for i in range(2)}, **{f"ImagePositionPatient_{i}": "float64" for i in range(3)},
    **{f"ImageOrientationPatient_{i}": "float64" for i in range(6)},
    "warnings": "object", "PatientID": "object", **dict.fromkeys(UID_COLUMNS, "object"), "Site": "object",
    STUDY_DATE_VERDICT: "object", "StudyDate": "object",
}


@dataclass(frozen=True)
class ReadLimits:
    """Bounds that keep one hostile file from exhausting time or memory."""

    max_file_bytes: int = 2 * 1024**3
    max_inflated_bytes: int = 256 * 1024**2
    max_pixels: int = 4096 * 4096 * 2048
    max_rows_columns: int = 8192
    defer_size: int = 64 * 1024
    allowed_modalities: tuple[str, ...] = ("CT",)
    supported_sop_classes: tuple[str, ...] = SUPPORTED_SOP_CLASSES


class Rejected(Exception):
    """Internal: stop reading this file and quarantine it with `reason`."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.detail = detail


def _quarantine(source_path: str, reason: str, detail: str = "") -> dict[str, Any]:
    return {"source_path": source_path, "reason": reason, "detail": detail}


def inspect_file(path: str, source_path: str, key: bytes, limits: ReadLimits) -> dict[str, Any]:
    """Read `path`'s header and return a de-identified index row, or a quarantine row.

    A quarantine row has ``reason`` set; an index row has ``reason`` None. Only the machine
    running out of something (:func:`dicomops.errors.local_outage`: no file handles, a full disk)
    escapes: that is no file's fault.
    """
    try:
        row = _inspect(Path(path), source_path, KeyedMapper(key), limits)
    except Rejected as rejected:
        return _quarantine(source_path, rejected.reason, rejected.detail)
    except RecursionError:
        return _quarantine(source_path, "unreadable_header", "sequences nested too deep")
    except MemoryError:
        return _quarantine(source_path, "unreadable_header", "value too large to read")
    except Exception as err:
        if local_outage(err):
            raise
        return _quarantine(source_path, "unreadable_header", type(err).__name__)
    row["reason"] = None
    return row


def _inspect(path: Path, source_path: str, mapper: KeyedMapper, limits: ReadLimits) -> dict[str, Any]:
    size = path.stat().st_size
    if size == 0:
        raise Rejected("not_dicom", "empty file")
    if size > limits.max_file_bytes:
        raise Rejected("bad_value:file_size", f"{size} bytes exceeds {limits.max_file_bytes}")
    with path.open("rb") as fh:
        head = fh.read(PREAMBLE + 4)
        preamble = len(head) == PREAMBLE + 4 and head[PREAMBLE:] == b"DICM"
        warned: list[str] = []
        if not preamble:
            # PS3.10 requires the preamble in files, but pydicom reads datasets without one
            # (force=True); accept them only when they start like a dataset.
            if not _starts_like_dataset(head, size):
                raise Rejected("not_dicom", "no DICM prefix after the 128-byte preamble, and the file "
                               "does not start with a DICOM data element")
            warned.append("no_preamble")
        executable_preamble = preamble and head[:4].startswith(EXECUTABLE_MAGIC)
        fast = read_fast(str(path), WANTED_KEYWORDS, size) if preamble else None
        if fast is not None:
            _refuse_media_directory(fast.media_sop_class, False)
            syntax = UID(fast.syntax)
            if not syntax.is_transfer_syntax:
                raise Rejected("unsupported_transfer_syntax", "missing or unknown TransferSyntaxUID")
            if syntax.is_compressed and not _decoder_available(syntax):
                raise Rejected("unsupported_transfer_syntax", f"no decoder installed for {syntax.name}")
            pixel = None
            if fast.pixel is not None:
                pixel = _pixel_element(fh, fast.pixel[0], fast.pixel[1], size)
            return _index_row(fast, syntax, pixel, source_path, mapper, limits, executable_preamble, size,
                              warned)
        dataset_start = PREAMBLE + 4 if preamble else 0
        # The file meta group is small; a deflated dataset is inflated here, under a bound, and read
        # from memory: pydicom would inflate it without one, and offsets in it are the inflated stream's.
        if _DEFLATED in head + fh.read(1024):
            fh.seek(dataset_start)
            try:
                meta = _read_file_meta_info(fh)  # leaves fh at the start of the dataset
            except Exception as err:
                raise Rejected("unreadable_header", f"file meta: {type(err).__name__}") from err
            if meta.get("TransferSyntaxUID") == DeflatedExplicitVRLittleEndian:
                _refuse_media_directory(str(meta.get("MediaStorageSOPClassUID", "")), False)
                stream = _inflate(fh, limits)
                inflated_size = stream.seek(0, 2)
                stream.seek(0)
                ds = read_dataset(stream, is_implicit_VR=False, is_little_endian=True, stop_when=_at_pixel_data,
                                  defer_size=limits.defer_size)
                _refuse_media_directory("", Tag(0x00041220) in ds._dict)
                implicit, little = _read_encoding(ds, implicit=False, little=True)
                if implicit:
                    warned.append("vr_encoding_mismatch:implicit")
                _check_declared_lengths(ds, inflated_size)
                pixel = _pixel_data_element(stream, stream.tell(), inflated_size, implicit, little)
                return _index_row(_DatasetHeader(ds), DeflatedExplicitVRLittleEndian, pixel, source_path, mapper,
                                  limits, executable_preamble, size, warned)
        fh.seek(0)
        try:
            ds = pydicom.dcmread(fh, stop_before_pixels=True, defer_size=limits.defer_size,
                                 force=not preamble)
        except InvalidDicomError as err:
            raise Rejected("not_dicom", "pydicom refused the file") from err
        _refuse_media_directory(str(ds.file_meta.get("MediaStorageSOPClassUID", "")) if hasattr(ds, "file_meta")
                                else "", Tag(0x00041220) in ds._dict)
        syntax = UID(str(ds.file_meta.get("TransferSyntaxUID", ""))) if preamble else guessed_syntax(ds)
        if not syntax or not syntax.is_transfer_syntax:
            raise Rejected("unsupported_transfer_syntax", "missing or unknown TransferSyntaxUID")
        if syntax.is_compressed and not _decoder_available(syntax):
            raise Rejected("unsupported_transfer_syntax", f"no decoder installed for {syntax.name}")
        header_end = fh.tell()
        _check_declared_lengths(ds, size)
        # pydicom reads a dataset in the VR encoding it finds when the file meta names the other one
        # (an explicit-VR syntax over implicit-VR elements): the pixel data is where pydicom's encoding puts it.
        implicit, little = _read_encoding(ds, syntax.is_implicit_VR, syntax.is_little_endian)
        if implicit != syntax.is_implicit_VR:
            warned.append(f"vr_encoding_mismatch:{'implicit' if implicit else 'explicit'}")
        pixel = _pixel_data_element(fh, header_end, size, implicit, little)
    return _index_row(_DatasetHeader(ds), syntax, pixel, source_path, mapper, limits, executable_preamble,
                      size, warned)


def _at_pixel_data(tag: Any, vr: str | None, length: int) -> bool:
    """pydicom's stop_when for reading up to the pixel data (stop_before_pixels)."""
    return int(tag) == 0x7FE00010


def _refuse_media_directory(media_sop_class: str, has_directory_records: bool) -> None:
    """A DICOMDIR indexes the files of a medium (PS3.10 8.6); it holds no image of its own."""
    if media_sop_class == MediaStorageDirectoryStorage or has_directory_records:
        raise Rejected("dicomdir", "a DICOMDIR (Media Storage Directory) is the index of an exported medium, not an "
                       "image; the images it lists are read as files of their own. Leave it out of the batch, or "
                       "list it under ingest.sidecars (e.g. '*DICOMDIR')")


def _read_encoding(ds: Dataset, implicit: bool, little: bool) -> tuple[bool, bool]:
    """(implicit VR, little endian) as pydicom read the dataset's elements (its first raw element
    says), else the declared encoding given."""
    for elem in ds._dict.values():
        if isinstance(elem, RawDataElement):
            return bool(elem.is_implicit_VR), bool(elem.is_little_endian)
    return implicit, little


def _starts_like_dataset(head: bytes, size: int) -> bool:
    """Whether a file without preamble begins with a plausible little-endian data element.

    Text, random bytes and other formats fail here, so they stay ``not_dicom`` without pydicom
    guessing a dataset out of noise.
    """
    if len(head) < 12:
        return False
    group, _ = struct.unpack_from("<HH", head)
    if group not in FIRST_GROUPS:
        return False
    if head[4:6] in VR_BYTES:  # explicit VR
        return True
    length = struct.unpack_from("<I", head, 4)[0]  # implicit VR: a short first value
    return group != 0x0002 and length <= min(size - 8, 1024)


def guessed_syntax(ds: Dataset) -> UID:
    """The transfer syntax of a dataset read with force=True: its file meta's, else pydicom's guess."""
    declared = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    if declared:
        return UID(str(declared))
    implicit, little = ds.original_encoding
    if little:
        return ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
    return ExplicitVRBigEndian if not implicit else UID("")


@functools.lru_cache(maxsize=64)
def _decoder_available(syntax: UID) -> bool:
    try:
        from pydicom.pixels import get_decoder

        return bool(get_decoder(syntax).is_available)
    except (NotImplementedError, ValueError, ImportError):  # pydicom knows no decoder for it
        return False


def _inflate(fh: Any, limits: ReadLimits) -> BytesIO:
    """The deflated dataset from `fh`'s position, inflated under ``limits.max_inflated_bytes``, as a
    stream at its start."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    inflated = BytesIO()  # written part by part: no joined copy, the bound is about what a worker holds
    while True:
        pending = inflater.unconsumed_tail or fh.read(1 << 20)
        if not pending:
            break
        try:
            part = inflater.decompress(pending, 1 << 22)  # at most 4 MB more at a time
        except zlib.error as err:
            raise Rejected("unreadable_header", "deflate stream is corrupt") from err
        if inflated.tell() + len(part) > limits.max_inflated_bytes:
            raise Rejected("bad_value:deflate_size", f"inflates past {limits.max_inflated_bytes} bytes")
        inflated.write(part)
        if inflater.eof:
            break
    inflated.seek(0)
    return inflated


def _check_declared_lengths(ds: Dataset, size: int) -> None:
    """Every top-level value must end inside the file (deferred values were never read)."""
    for elem in ds._dict.values():
        tell = getattr(elem, "value_tell", None)
        length = getattr(elem, "length", 0)
        if tell is not None and length not in (0xFFFFFFFF, None) and tell + length > size:
            raise Rejected("truncated", f"({elem.tag.group:04X},{elem.tag.elem:04X}) declares "
                           f"{length} bytes past the end of the file")


@dataclass(frozen=True)
class PixelElement:
    length: int | None  # None: undefined length (encapsulated)
    available: int  # bytes of the file after the element header
    fragments: int = 0  # encapsulated: fragment items after the Basic Offset Table
    problem: tuple[str, str] | None = None  # encapsulated: (reason, detail) when the items are unsound
    trailing: int = 0  # bytes after the sequence delimiter that are not Data Set Trailing Padding


def _pixel_data_element(fh: Any, at: int, size: int, implicit: bool, little: bool) -> PixelElement | None:
    """Parse the PixelData element header where the header read stopped, without reading pixels.

    `implicit` and `little`: the encoding pydicom read the dataset in (:func:`_read_encoding`).
    """
    fh.seek(at)
    head = fh.read(12)
    big = not little
    if len(head) < 8 or head[:4] != (PIXEL_DATA_TAG_BE if big else PIXEL_DATA_TAG):
        return None
    if implicit:
        length = struct.unpack(">I" if big else "<I", head[4:8])[0]
        header = 8
    elif head[4:6] in (b"OB", b"OW", b"UN", b"OV"):
        length = struct.unpack(">I" if big else "<I", head[8:12])[0]
        header = 12
    else:
        length = struct.unpack(">H" if big else "<H", head[6:8])[0]
        header = 8
    return _pixel_element(fh, None if length == 0xFFFFFFFF else length, at + header, size)


def _pixel_element(fh: Any, length: int | None, start: int, size: int) -> PixelElement:
    """Describe the PixelData value starting at `start`; encapsulated items are walked, not read."""
    if length is not None:
        return PixelElement(length, size - start)
    fragments, problem, trailing = _scan_encapsulated(fh, start, size)
    return PixelElement(None, size - start, fragments, problem, trailing)


def _scan_encapsulated(fh: Any, start: int, size: int) -> tuple[int, tuple[str, str] | None, int]:
    """Walk the item headers of encapsulated pixel data (PS3.5 A.4) with pydicom's parsers.

    Returns (fragment count, (reason, detail) or None, bytes after the sequence delimiter that are
    not a Data Set Trailing Padding element). Only item headers are read, never the compressed
    frames, so this costs a few reads per file whatever the image size.
    """
    fh.seek(start)
    bot = fh.read(8)
    if len(bot) < 8:
        return 0, ("truncated", "encapsulated pixel data ends before its Basic Offset Table item"), 0
    tag, bot_length = struct.unpack("<II", bot)
    if tag != 0xE000FFFE:
        return 0, ("bad_value:PixelData", "encapsulated pixel data does not start with the Basic "
                   "Offset Table item (FFFE,E000)"), 0
    if bot_length == 0xFFFFFFFF or start + 8 + bot_length > size:
        return 0, ("truncated", f"the Basic Offset Table declares {bot_length} bytes, "
                   f"{size - start - 8} present"), 0
    fh.seek(start)
    try:
        parse_basic_offsets(fh)  # leaves fh at the first fragment item
        count, offsets = parse_fragments(fh)
    except (ValueError, struct.error) as err:
        return 0, ("bad_value:PixelData", f"malformed encapsulated pixel data: {err}"), 0
    if count == 0:
        return 0, ("truncated", "encapsulated pixel data has no fragment items"), 0
    last = offsets[-1]
    fh.seek(last + 4)
    last_length = struct.unpack("<I", fh.read(4))[0]
    end = last + 8 + last_length
    if end > size:
        return count, ("truncated", f"fragment item {count} declares {last_length} bytes, "
                       f"{size - last - 8} present, and no sequence delimiter follows"), 0
    fh.seek(end)
    if fh.read(8) != SEQUENCE_DELIMITER:
        if end + 8 > size:
            return count, ("truncated", f"the file ends after fragment item {count} without the "
                           "sequence delimiter (FFFE,E0DD)"), 0
        return count, ("bad_value:PixelData", f"the sequence delimiter after fragment item {count} "
                       "has a non-zero length"), 0
    trailing = size - end - 8
    if trailing and fh.read(4) == TRAILING_PADDING_TAG:
        trailing = 0  # Data Set Trailing Padding is legal after the last element
    return count, None, trailing


class _DatasetHeader:
    """The pydicom path's accessor: same `raw(keyword)` as the fast reader's."""

    def __init__(self, ds: Dataset) -> None:
        self.ds = ds

    def raw(self, keyword: str) -> list[Any] | None:
        return _raw(self.ds, keyword)

    def has(self, keyword: str) -> bool:
        return Tag(keyword_tag(keyword)) in self.ds._dict


class HeaderSource(Protocol):
    def raw(self, keyword: str) -> list[Any] | None: ...

    def has(self, keyword: str) -> bool: ...


def _raw(ds: Dataset, keyword: str) -> list[Any] | None:
    """Values of a top-level element straight from its raw bytes, or None when absent or empty.

    Reading the raw element avoids pydicom's per-element conversion machinery, which dominates
    header-only reading; text values are split on backslashes, binary ones unpacked.
    """
    tag = Tag(keyword_tag(keyword))
    elem = ds._dict.get(tag)
    if elem is None:
        return None
    value = elem.value
    if not isinstance(elem, RawDataElement):
        if value is None or value == "":
            return None
        return list(value) if isinstance(value, pydicom.multival.MultiValue | list | tuple) else [value]
    if value is None or len(value) == 0:
        return None
    little = bool(elem.is_little_endian)
    rep = ds._dict.get(Tag(0x00280103))
    signed = (rep is not None and isinstance(rep.value, bytes) and len(rep.value) >= 2
              and int.from_bytes(rep.value[:2], "little" if little else "big") == 1)
    # Explicit VR UN (PS3.5 6.2.2): the value is encoded as its dictionary VR would be, so decode it so.
    vr = elem.VR if elem.VR and elem.VR != "UN" else dictionary_VR(tag)
    return decode_value(vr, value, little, signed, charset=_charset(ds) if tag != 0x00080005 else None)


def _charset(ds: Dataset) -> bytes | None:
    """SpecificCharacterSet as raw bytes, for :func:`decode_value` (pydicom decodes it while reading)."""
    elem = ds._dict.get(Tag(0x00080005))
    if elem is None or not elem.value:
        return None
    if isinstance(elem.value, bytes):
        return elem.value
    values = [elem.value] if isinstance(elem.value, str) else list(elem.value)
    return "\\".join(str(v) for v in values).encode("ascii", "replace")


def _text(h: HeaderSource, keyword: str) -> str | None:
    values = h.raw(keyword)
    return None if values is None else "\\".join(str(v) for v in values)


def _number(h: HeaderSource, keyword: str, cast: type) -> float | int | None:
    values = h.raw(keyword)
    if values is None or values[0] == "":
        return None
    try:
        number = float(values[0])
    except (TypeError, ValueError) as err:
        raise Rejected(f"bad_value:{keyword}", "not a number") from err
    if not math.isfinite(number):
        raise Rejected(f"bad_value:{keyword}", "not finite")
    return int(number) if cast is int else number


def _vector(h: HeaderSource, keyword: str, n: int) -> list[float] | None:
    values = h.raw(keyword)
    if values is None:
        return None
    try:
        numbers = [float(v) for v in values]
    except (TypeError, ValueError) as err:
        raise Rejected(f"bad_value:{keyword}", "not a number") from err
    if len(numbers) != n or not all(math.isfinite(v) for v in numbers):
        raise Rejected(f"bad_value:{keyword}", f"expected {n} finite values, got {len(numbers)}")
    return numbers


def _index_row(ds: HeaderSource, syntax: UID, pixel: PixelElement | None, source_path: str,
               mapper: KeyedMapper, limits: ReadLimits, executable_preamble: bool,
               size: int, warned: list[str]) -> dict[str, Any]:
    """Check the header and build the row; `warned` collects legal-but-odd findings (``warnings``)."""
    modality = _text(ds, "Modality") or ""
    if modality and modality not in limits.allowed_modalities:
        # The value itself is not repeated: a hostile header can put anything there.
        raise Rejected("wrong_modality", f"Modality is not one of {', '.join(limits.allowed_modalities)}")
    sop_class = _text(ds, "SOPClassUID")
    if sop_class and sop_class not in limits.supported_sop_classes:
        raise Rejected(*_unsupported_sop_class(sop_class, limits))
    for keyword in REQUIRED_TAGS:
        if ds.raw(keyword) is None:
            tag = keyword_tag(keyword)
            state = "present but empty" if ds.has(keyword) else "absent"
            raise Rejected(f"missing_tag:{keyword}", f"{keyword} ({tag >> 16:04X},{tag & 0xFFFF:04X}) is "
                           f"{state}; the gate needs a value")
    image_type = (_text(ds, "ImageType") or "").upper()
    if "LOCALIZER" in image_type:
        raise Rejected("bad_value:ImageType", "localizer image")
    if (_text(ds, "BurnedInAnnotation") or "").upper() == "YES":
        raise Rejected("burned_in_annotation", "BurnedInAnnotation is YES")

    row: dict[str, Any] = {"source_path": source_path, "file_bytes": size,
                           "TransferSyntaxUID": str(syntax),
                           "executable_preamble": executable_preamble}
    for keyword in INT_COLUMNS:
        row[keyword] = _number(ds, keyword, int)
    for keyword in FLOAT_COLUMNS:
        row[keyword] = _number(ds, keyword, float)
    for keyword in TEXT_COLUMNS:
        row[keyword] = _text(ds, keyword)
    row["SOPClassUID"] = _text(ds, "SOPClassUID")
    row["ImageType"] = image_type or None
    row["WindowCenter"] = _text(ds, "WindowCenter")
    row["WindowWidth"] = _text(ds, "WindowWidth")
    spacing = _vector(ds, "PixelSpacing", 2)
    position = _vector(ds, "ImagePositionPatient", 3)
    orientation = _vector(ds, "ImageOrientationPatient", 6)
    for name, values in (("PixelSpacing", spacing), ("ImagePositionPatient", position),
                         ("ImageOrientationPatient", orientation)):
        for i, v in enumerate(values or []):
            row[f"{name}_{i}"] = v

    rows, cols = int(row["Rows"] or 0), int(row["Columns"] or 0)
    if not (0 < rows <= limits.max_rows_columns and 0 < cols <= limits.max_rows_columns):
        raise Rejected("bad_value:Rows" if not 0 < rows <= limits.max_rows_columns else "bad_value:Columns",
                       f"{rows}x{cols} outside 1..{limits.max_rows_columns}")
    frames = int(row["NumberOfFrames"] or 1)
    samples = int(row["SamplesPerPixel"] or 1)
    bits = int(row["BitsAllocated"] or 0)
    if bits not in (1, 8, 16, 32, 64) or frames < 1 or rows * cols * frames > limits.max_pixels:
        raise Rejected("bad_value:BitsAllocated" if bits not in (1, 8, 16, 32, 64) else "bad_value:NumberOfFrames",
                       "pixel geometry out of bounds")
    if frames > 1:  # read as one slice, the others would be dropped; preprocessing refuses it too, later
        raise Rejected("bad_value:NumberOfFrames", f"NumberOfFrames is {frames}; a CT Image Storage instance holds "
                                                   "one slice: split the frames into single-frame instances")
    _check_ct_image_pixels(ds, samples, warned)
    if pixel is None:
        raise Rejected("missing_tag:PixelData", "no PixelData (7FE0,0010) element after the header")
    if pixel.length is None:
        if not syntax.is_compressed:
            raise Rejected("pixel_data_length", f"undefined length in a native transfer syntax ({syntax.name})")
        if pixel.problem is not None:
            raise Rejected(*pixel.problem)
        if pixel.fragments < frames:
            raise Rejected("pixel_data_length", f"{pixel.fragments} fragment items for {frames} frames "
                           "(each frame needs at least one)")
        if pixel.trailing:
            warned.append(f"trailing_bytes:{pixel.trailing}")
    else:
        if pixel.length > pixel.available:
            raise Rejected("truncated", f"PixelData declares {pixel.length} bytes, {pixel.available} present")
        if syntax.is_compressed:
            raise Rejected("pixel_data_length", f"{syntax.name} needs encapsulated (undefined-length) "
                           f"PixelData, found a defined length of {pixel.length} bytes")
        expected = (rows * cols * frames * samples * bits + 7) // 8
        expected += expected % 2
        if pixel.length < expected:
            raise Rejected("pixel_data_length", f"PixelData has {pixel.length} bytes, Rows x Columns x "
                           f"SamplesPerPixel x BitsAllocated x frames needs {expected} "
                           f"({expected - pixel.length} missing)")
        if pixel.length > expected:  # padding: pydicom and other readers ignore the excess
            warned.append(f"pixel_data_excess:{pixel.length - expected}_bytes")
    row["warnings"] = ";".join(warned)

    patient = _text(ds, "PatientID") or ""
    row["PatientID"] = mapper.pseudonym(patient)
    for keyword in UID_COLUMNS:
        raw = _text(ds, keyword)
        row[keyword] = mapper.uid(raw) if raw else None
    institution = (_text(ds, "InstitutionName") or "").strip()
    # The site as a keyed token (SI-…): released counts per site never name the institution.
    row["Site"] = mapper.token("site", institution.upper()) if institution else ""
    study_date = _text(ds, "StudyDate") or ""
    row[STUDY_DATE_VERDICT] = da_verdict(study_date)  # judged before the shift; only the verdict travels
    row["StudyDate"] = mapper.shift_date(study_date, patient) if study_date.strip() else ""
    return row


def _check_ct_image_pixels(ds: HeaderSource, samples: int, warned: list[str]) -> None:
    """What the CT Image Module (PS3.3 C.8.2.1) requires of the pixels, and HU for the windowing.

    One grey sample per pixel: a colour (RGB, YBR) rendering of a CT read as grey values comes out
    scrambled. RescaleType is present only when the rescaled values are not Hounsfield units, and
    every later step windows in HU. MONOCHROME1 (bright is low) only changes how a viewer shows the
    values, not the HU they rescale to: a warning. Lossy compression in the file's history: a warning.
    """
    photometric = (_text(ds, "PhotometricInterpretation") or "").strip().upper()
    if photometric and photometric not in CT_PHOTOMETRIC:
        named = f"is {photometric}" if photometric in PHOTOMETRIC_TERMS else "is not a defined term"
        raise Rejected("bad_value:PhotometricInterpretation",
                       f"PhotometricInterpretation {named}; CT Image Storage needs MONOCHROME2 or MONOCHROME1 "
                       "(one grey sample per pixel): send the scanner's original series, not a colour rendering")
    if samples != 1:
        raise Rejected("bad_value:SamplesPerPixel",
                       f"SamplesPerPixel is {samples}; CT Image Storage needs 1 (one grey sample per pixel): "
                       "send the scanner's original series, not a colour rendering")
    if photometric == "MONOCHROME1":
        warned.append("monochrome1")
    rescale_type = (_text(ds, "RescaleType") or "").strip().upper()
    if rescale_type and rescale_type != "HU":
        named = f"says {rescale_type}" if rescale_type in RESCALE_TYPE_TERMS else "is not HU (nor a defined term)"
        raise Rejected("rescale_type_not_hu",
                       f"RescaleType {named}: the rescaled values are not Hounsfield units, and preprocessing "
                       "windows in HU; send the series rescaled to HU, or leave it out of the batch")
    if (_text(ds, "LossyImageCompression") or "").strip() == "01":
        warned.append("lossy_compressed")


def _unsupported_sop_class(uid: str, limits: ReadLimits) -> tuple[str, str]:
    """Reason and detail for a SOP class the gate does not turn into volumes.

    Only registered UIDs are named: a private or garbled value could carry anything.
    """
    known = UID(uid)
    supported = ", ".join(UID(u).name for u in limits.supported_sop_classes)
    if known.keyword:
        return (f"unsupported_sop_class:{known.keyword}",
                f"SOPClassUID is {known.name} ({uid}); the gate accepts {supported}")
    return ("unsupported_sop_class:unknown",
            f"SOPClassUID is not a registered DICOM SOP class; the gate accepts {supported}")


@dataclass(frozen=True)
class SourceListing:
    """What :func:`list_source` found under a folder."""

    files: list[tuple[str, str]]  # (absolute path, name relative to the folder), sorted by name
    unreadable: list[dict[str, Any]]  # quarantine rows of the folders and files it could not look into


# os.stat of a listed name fails with these when it is a dangling link (or a link loop), or the file was
# removed after its folder was listed: no file to quarantine.
_NO_FILE = frozenset({errno.ENOENT, errno.ENOTDIR, errno.ELOOP})


def list_files(src: Path, skip: Path | None = None) -> list[tuple[str, str]]:
    """The files of :func:`list_source`, without what could not be listed."""
    return list_source(src, skip).files


def list_source(src: Path, skip: Path | None = None) -> SourceListing:
    """Every regular file under `src` as (absolute path, name relative to `src`), sorted by name;
    nothing under the folder `skip` (the work directory, when it lies inside `src`: its own files are no data).

    Symlinks are followed, to files and to folders: a series folder linked in from elsewhere is read
    like any other. A folder reached twice (two links to one folder, a link back up the tree) is
    walked once, under the name met first, so a loop ends. A file is listed under every name it has
    (a link to it, a hard link: a DVC checkout links files of equal content to one cache object), so
    that each name ends in exactly one place: the gate quarantines the second as
    ``duplicate_instance``. Devices, sockets, FIFOs, dangling links and directories (even one named
    ``x.dcm``) are never opened.

    A folder that cannot be listed (permission denied, removed during the walk) is a quarantine row
    ``unreadable_folder``, and a file that cannot be looked at (for a reason other than being a dangling
    link) one ``unreadable_file``: the files they hold would otherwise be left out without a word.

    A name that is not valid UTF-8 (a file copied from an old Windows share: ``caf\\xe9.dcm`` in
    latin-1) cannot be written to the gate's tables as it is: its undecodable bytes are written as
    ``\\xNN`` (:func:`display_name`), and :func:`source_file` finds the file again from that name.

    Raises:
        ValueError: `src` itself cannot be listed.
        OSError: this machine is out of a resource (:func:`dicomops.errors.local_outage`), not the input at fault.
    """
    src = Path(src)
    skipped = os.path.realpath(skip) if skip is not None else None
    out: list[tuple[str, str]] = []
    unreadable: list[dict[str, Any]] = []
    try:
        top = os.stat(src)
    except OSError:
        return SourceListing(out, unreadable)

    def refuse(err: OSError, path: str, reason: str, what: str) -> None:
        if local_outage(err):
            raise err
        why = err.strerror or type(err).__name__
        name = os.path.relpath(path, src)
        if name == os.curdir:
            raise ValueError(f"{src} cannot be listed ({why}); give this user read access to the folder") from err
        unreadable.append(_quarantine(display_name(name), reason,
                                      f"the {what} ({why}); give the gate's user read access to it, or take it "
                                      "out of the source folder"))

    seen_dirs = {(top.st_dev, top.st_ino)}
    walk = os.walk(src, followlinks=True,
                   onerror=lambda err: refuse(err, err.filename, "unreadable_folder", "folder could not be listed"))
    for dirpath, dirnames, filenames in walk:
        kept = []
        for d in sorted(dirnames):
            full_dir = os.path.join(dirpath, d)
            if skipped is not None and os.path.realpath(full_dir) == skipped:
                continue
            try:
                info = os.stat(full_dir)
            except OSError as err:  # listed as a folder a moment ago
                refuse(err, full_dir, "unreadable_folder", "folder could not be looked at")
                continue
            if (info.st_dev, info.st_ino) in seen_dirs:  # a loop, or a folder already listed by another name
                continue
            seen_dirs.add((info.st_dev, info.st_ino))
            kept.append(d)
        dirnames[:] = kept
        for name in sorted(filenames):
            full = os.path.join(dirpath, name)
            try:
                info = os.stat(full)  # follows symlinks; fails on a dangling one
            except OSError as err:
                if err.errno not in _NO_FILE:
                    refuse(err, full, "unreadable_file", "file could not be looked at")
                continue
            if not stat.S_ISREG(info.st_mode):
                continue
            out.append((full, display_name(os.path.relpath(full, src))))
    out.sort(key=lambda item: item[1])
    unreadable.sort(key=lambda row: row["source_path"])
    return SourceListing(out, unreadable)


def display_name(name: str) -> str:
    """`name` (as ``os`` returns it: undecodable bytes as surrogates) with those bytes written ``\\xNN``,
    so that a CSV or Parquet table can hold it; a valid UTF-8 name is returned unchanged."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return os.fsencode(name).decode("utf-8", "backslashreplace")
    return name


_ESCAPED_BYTE = re.compile(rb"\\x([89a-f][0-9a-f])")


def source_file(src: Path | str, source_path: str) -> str:
    """The file under `src` that a table's `source_path` names (the inverse of :func:`display_name`:
    a name whose undecodable bytes were written ``\\xNN`` opens the file with those bytes)."""
    literal = os.path.join(src, source_path)
    if "\\x" not in source_path or os.path.lexists(literal):
        return literal
    raw = _ESCAPED_BYTE.sub(lambda m: bytes([int(m.group(1), 16)]), source_path.encode("utf-8"))
    return os.fsdecode(os.path.join(os.fsencode(src), raw))
