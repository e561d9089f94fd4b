"""Read one file's header safely and turn it into a de-identified index row, or a reason code.

Nothing in here trusts the file: sizes are checked before values are read, deflated data is
inflated under a bound, large values are never loaded, and every failure becomes a reason code
rather than an exception. The row that leaves this module carries no PHI: identifiers are keyed
pseudonyms, UIDs are remapped, dates are shifted.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import struct
import warnings
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import pydicom
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import _read_file_meta_info
from pydicom.tag import Tag
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from dicomops.deid.keys import KeyedMapper
from dicomops.dicom.fastheader import decode_value, keyword_tag, read_fast

PREAMBLE = 128
EXECUTABLE_MAGIC = (b"MZ", b"\x7fELF")
SEQUENCE_DELIMITER = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
PIXEL_DATA_TAG = b"\xe0\x7f\x10\x00"
PIXEL_DATA_TAG_BE = b"\x7f\xe0\x00\x10"
_DEFLATED = DeflatedExplicitVRLittleEndian.encode()
NATIVE_SYNTAXES = {ImplicitVRLittleEndian, ExplicitVRLittleEndian, ExplicitVRBigEndian,
                   DeflatedExplicitVRLittleEndian}

# Tags a file must carry to be usable at all; their absence is `missing_tag:<Keyword>`.
REQUIRED_TAGS = (
    "SOPInstanceUID", "SOPClassUID", "StudyInstanceUID", "SeriesInstanceUID", "PatientID", "StudyDate",
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
                               | set(FLOAT_COLUMNS) | {"ImageType", "WindowCenter", "WindowWidth"}))


@dataclass(frozen=True)
class ReadLimits:
    """Bounds that keep one hostile file from exhausting time or memory."""

    max_file_bytes: int = 2 * 1024**3
    max_inflated_bytes: int = 256 * 1024**2
    max_pixels: int = 4096 * 4096 * 2048
    max_rows_columns: int = 8192
    defer_size: int = 64 * 1024
    allowed_modalities: tuple[str, ...] = ("CT",)


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

    A quarantine row has ``reason`` set; an index row has ``reason`` None. No exception escapes.
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
        if len(head) < PREAMBLE + 4 or head[PREAMBLE:] != b"DICM":
            raise Rejected("not_dicom", "no DICM prefix after the 128-byte preamble")
        executable_preamble = head[:4].startswith(EXECUTABLE_MAGIC)
        fast = read_fast(str(path), WANTED_KEYWORDS, size)
        if fast is not None:
            syntax = UID(fast.syntax)
            if not syntax.is_transfer_syntax:
                raise Rejected("unsupported_transfer_syntax", "missing or unknown TransferSyntaxUID")
            if syntax.is_compressed and not _decoder_available(syntax):
                raise Rejected("unsupported_transfer_syntax", f"no decoder installed for {syntax.name}")
            pixel = None
            if fast.pixel is not None:
                length, start = fast.pixel
                pixel = PixelElement(length, size - start, True)
            return _index_row(fast, syntax, pixel, source_path, mapper, limits, executable_preamble, size)
        # The file meta group is small; a deflated dataset must be bounded before pydicom inflates it.
        if _DEFLATED in head + fh.read(1024):
            fh.seek(PREAMBLE + 4)
            try:
                meta = _read_file_meta_info(fh)  # leaves fh at the start of the dataset
            except Exception as err:
                raise Rejected("unreadable_header", f"file meta: {type(err).__name__}") from err
            if meta.get("TransferSyntaxUID") == DeflatedExplicitVRLittleEndian:
                _check_inflated_size(fh, limits)
        fh.seek(0)
        try:
            with _warnings_silenced():
                ds = pydicom.dcmread(fh, stop_before_pixels=True, defer_size=limits.defer_size)
        except InvalidDicomError as err:
            raise Rejected("not_dicom", "pydicom refused the file") from err
        syntax = UID(str(ds.file_meta.get("TransferSyntaxUID", "")))
        if not syntax or not syntax.is_transfer_syntax:
            raise Rejected("unsupported_transfer_syntax", "missing or unknown TransferSyntaxUID")
        if syntax.is_compressed and not _decoder_available(syntax):
            raise Rejected("unsupported_transfer_syntax", f"no decoder installed for {syntax.name}")
        header_end = fh.tell()
        if syntax != DeflatedExplicitVRLittleEndian:  # offsets there are into the inflated stream
            _check_declared_lengths(ds, size)
        pixel = _pixel_data_element(fh, header_end, size, syntax)
    return _index_row(_DatasetHeader(ds), syntax, pixel, source_path, mapper, limits, executable_preamble, size)


@functools.lru_cache(maxsize=64)
def _decoder_available(syntax: UID) -> bool:
    try:
        from pydicom.pixels import get_decoder

        return bool(get_decoder(syntax).is_available)
    except (NotImplementedError, ValueError, ImportError):  # pydicom knows no decoder for it
        return False


@contextlib.contextmanager
def _warnings_silenced() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _check_inflated_size(fh: Any, limits: ReadLimits) -> None:
    """Inflate the deflated dataset under a bound before pydicom inflates it without one."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    total = 0
    while True:
        pending = inflater.unconsumed_tail or fh.read(1 << 20)
        if not pending:
            return
        try:
            total += len(inflater.decompress(pending, 1 << 22))  # at most 4 MB in memory at once
        except zlib.error as err:
            raise Rejected("unreadable_header", "deflate stream is corrupt") from err
        if total > limits.max_inflated_bytes:
            raise Rejected("bad_value:deflate_size", f"inflates past {limits.max_inflated_bytes} bytes")


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
    delimited: bool  # encapsulated data ends with a sequence delimiter


def _pixel_data_element(fh: Any, at: int, size: int, syntax: UID) -> PixelElement | None:
    """Parse the PixelData element header where the header read stopped, without reading pixels."""
    fh.seek(at)
    head = fh.read(12)
    big = syntax == ExplicitVRBigEndian
    if len(head) < 8 or head[:4] != (PIXEL_DATA_TAG_BE if big else PIXEL_DATA_TAG):
        return None
    if syntax.is_implicit_VR and syntax != DeflatedExplicitVRLittleEndian:
        length = struct.unpack("<I", head[4:8])[0]
        header = 8
    elif head[4:6] in (b"OB", b"OW", b"UN", b"OV"):
        length = struct.unpack(">I" if big else "<I", head[8:12])[0]
        header = 12
    else:
        length = struct.unpack(">H" if big else "<H", head[6:8])[0]
        header = 8
    available = size - at - header
    if length == 0xFFFFFFFF:
        fh.seek(size - 8)
        return PixelElement(None, available, fh.read(8) == SEQUENCE_DELIMITER)
    return PixelElement(length, available, True)


class _DatasetHeader:
    """The pydicom path's accessor: same `raw(keyword)` as the fast reader's."""

    def __init__(self, ds: Dataset) -> None:
        self.ds = ds

    def raw(self, keyword: str) -> list[Any] | None:
        return _raw(self.ds, keyword)


class HeaderSource(Protocol):
    def raw(self, keyword: str) -> list[Any] | None: ...


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
    return decode_value(elem.VR or dictionary_VR(tag), value, little, signed)


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
               size: int) -> dict[str, Any]:
    modality = _text(ds, "Modality") or ""
    if modality and modality not in limits.allowed_modalities:
        # The value itself is not repeated: a hostile header can put anything there.
        raise Rejected("wrong_modality", f"Modality is not one of {', '.join(limits.allowed_modalities)}")
    for keyword in REQUIRED_TAGS:
        if ds.raw(keyword) is None:
            raise Rejected(f"missing_tag:{keyword}")
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
    if pixel is None:
        raise Rejected("missing_tag:PixelData")
    if pixel.length is None:
        if not syntax.is_compressed:
            raise Rejected("pixel_data_length", "undefined length in a native transfer syntax")
        if not pixel.delimited:
            raise Rejected("truncated", "encapsulated pixel data has no sequence delimiter")
    else:
        if pixel.length > pixel.available:
            raise Rejected("truncated", f"PixelData declares {pixel.length} bytes, {pixel.available} present")
        expected = (rows * cols * frames * samples * bits + 7) // 8
        expected += expected % 2
        if syntax.is_compressed or pixel.length != expected:
            raise Rejected("pixel_data_length", f"PixelData has {pixel.length} bytes, Rows x Columns x "
                           f"BitsAllocated x frames needs {expected}")

    patient = _text(ds, "PatientID") or ""
    row["PatientID"] = mapper.pseudonym(patient)
    for keyword in UID_COLUMNS:
        raw = _text(ds, keyword)
        row[keyword] = mapper.uid(raw) if raw else None
    row["StudyDate"] = mapper.shift_date(_text(ds, "StudyDate") or "", patient)
    return row


def list_files(src: Path) -> list[tuple[str, str]]:
    """Every regular file under `src` as (absolute path, path relative to `src`), sorted.

    Symlinks to regular files are followed; devices, sockets, FIFOs, dangling links and
    directories (even one named ``x.dcm``) are never opened.
    """
    src = Path(src)
    out: list[tuple[str, str]] = []
    for dirpath, dirnames, filenames in os.walk(src):
        dirnames.sort()
        for name in filenames:
            full = os.path.join(dirpath, name)
            try:
                if not os.path.isfile(full):  # follows symlinks; False for devices, sockets, FIFOs
                    continue
            except OSError:
                continue
            out.append((full, os.path.relpath(full, src)))
    out.sort(key=lambda item: item[1])
    return out
