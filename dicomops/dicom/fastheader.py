"""A narrow, fast reader for the common case: little-endian files whose header fits in 64 KB.

It walks the top-level elements of the header without building a pydicom Dataset, keeps the raw
bytes of the tags the index needs, skips everything else by its declared length (nested
sequences iteratively, never recursively), and stops at PixelData. Anything unusual (big endian,
deflate, a value past the buffer, odd nesting) returns None, and the caller falls back to the
pydicom path, which decides what is wrong with the file. Both paths feed the same row builder, and
a test checks that they agree.
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Iterable
from typing import Any

from pydicom.charset import convert_encodings, decode_bytes
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.valuerep import CUSTOMIZABLE_CHARSET_VR, TEXT_VR_DELIMS

HEADER_BYTES = 65536
MAX_DEPTH = 32
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
_BINARY = {"US": "H", "SS": "h", "UL": "I", "SL": "i", "FL": "f", "FD": "d"}
_IMPLICIT_LE = "1.2.840.10008.1.2"
_EXPLICIT_BE = "1.2.840.10008.1.2.2"
_DEFLATED = "1.2.840.10008.1.2.1.99"
_PIXEL_DATA = 0x7FE00010
_SPECIFIC_CHARACTER_SET = 0x00080005
_MEDIA_SOP_CLASS = 0x00020002
# Every VR a file may spell (PS3.5 Table 6.2-1): an explicit-VR walk meeting anything else is not reading
# the encoding it assumed (a dataset written implicit under an explicit file meta) and hands over to pydicom.
VR_BYTES = frozenset(b"AE AS AT CS DA DS DT FD FL IS LO LT OB OD OF OL OV OW PN SH SL SQ SS ST SV TM UC UI "
                     b"UL UN UR US UT UV".split())
# Text VRs whose bytes follow SpecificCharacterSet (PS3.5 6.1.2.3); the others are the default repertoire.
CHARSET_VRS = frozenset(str(vr) for vr in CUSTOMIZABLE_CHARSET_VR)
_ITEM, _ITEM_END, _SEQ_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_UNDEFINED = 0xFFFFFFFF


class FastHeader:
    """Raw values of the wanted top-level tags plus where PixelData starts."""

    def __init__(self, syntax: str, values: dict[int, tuple[str, bytes]],
                 pixel: tuple[int | None, int] | None, size: int, media_sop_class: str = "") -> None:
        self.syntax = syntax
        self.media_sop_class = media_sop_class  # (0002,0002) of the file meta: a DICOMDIR says so there
        self._values = values
        self.pixel = pixel  # (declared length or None when undefined, offset of the value)
        self.size = size
        self._decoded: dict[str, list[Any] | None] = {}

    def raw(self, keyword: str) -> list[Any] | None:
        """Decoded values of `keyword` (text split on backslashes, binary unpacked), or None."""
        if keyword not in self._decoded:
            self._decoded[keyword] = self._decode(keyword)
        return self._decoded[keyword]

    def has(self, keyword: str) -> bool:
        """Whether the element is present at the top level, even with an empty value."""
        return keyword_tag(keyword) in self._values

    def _decode(self, keyword: str) -> list[Any] | None:
        tag = keyword_tag(keyword)
        found = self._values.get(tag)
        if found is None:
            return None
        vr, value = found
        if vr == "UN":  # explicit VR UN (PS3.5 6.2.2): encoded as its dictionary VR
            vr = _vr(tag)
        rep = self._values.get(0x00280103)
        charset = self._values.get(_SPECIFIC_CHARACTER_SET) if vr in CHARSET_VRS else None
        return decode_value(vr, value, little_endian=True, signed=rep is not None and rep[1][:1] == b"\x01",
                            charset=charset[1] if charset is not None else None)


def decode_value(vr: str, value: bytes, little_endian: bool, signed: bool = False,
                 charset: bytes | None = None) -> list[Any] | None:
    """Raw element bytes as values: binary VRs unpacked, text split on backslashes; None if empty.

    ``US or SS`` (e.g. PixelPaddingValue) follows PixelRepresentation, given as `signed`. Text of
    the VRs that follow SpecificCharacterSet (LO, SH, PN, …) is decoded in the character set whose raw
    (0008,0005) value is `charset`, by pydicom's own decoder: the one pydicom applies when the
    de-identifier reads the file, so a PatientID ``MÜLLER`` in UTF-8 (``ISO_IR 192``) is the same
    text, hence the same pseudonym and date shift, in the index, the de-identified file and the labels.
    """
    if not value:
        return None
    if vr == "US or SS":
        vr = "SS" if signed else "US"
    if vr in _BINARY:
        fmt = _BINARY[vr]
        width = struct.calcsize(fmt)
        count = len(value) // width
        endian = "<" if little_endian else ">"
        return list(struct.unpack(f"{endian}{count}{fmt}", value[: count * width]))
    # ASCII without escape sequences reads the same in every character set DICOM allows
    encodings = text_encodings(charset) if charset and vr in CHARSET_VRS and not _plain_ascii(value) else None
    text = (decode_bytes(value, list(encodings), TEXT_VR_DELIMS) if encodings else value.decode("latin-1")).strip(" \x00")
    if not text:
        return None
    return [v.strip(" \x00") for v in text.split("\\")]


def _plain_ascii(value: bytes) -> bool:
    return value.isascii() and b"\x1b" not in value


@functools.lru_cache(maxsize=64)
def text_encodings(charset: bytes) -> tuple[str, ...] | None:
    """Python codecs for a raw SpecificCharacterSet value, as pydicom maps them (None: the default
    repertoire, read as latin-1 as pydicom does)."""
    terms = decode_value("CS", charset, little_endian=True)
    if not terms:
        return None
    encodings = tuple(convert_encodings(terms))
    return None if encodings == ("iso8859",) else encodings


@functools.lru_cache(maxsize=512)
def keyword_tag(keyword: str) -> int:
    """The tag number of a DICOM keyword (cached: the readers ask for the same few every file)."""
    tag = tag_for_keyword(keyword)
    if tag is None:
        raise ValueError(f"{keyword} is not a DICOM keyword")
    return int(tag)


@functools.lru_cache(maxsize=1024)
def _vr(tag: int) -> str:
    try:
        return str(dictionary_VR(tag))
    except KeyError:
        return "UN"


def read_fast(path: str, wanted: Iterable[str], size: int) -> FastHeader | None:
    """Read the header of `path` the fast way, or None when the file needs the careful path."""
    tags = frozenset(keyword_tag(k) for k in wanted)
    with open(path, "rb") as fh:
        buf = fh.read(HEADER_BYTES)
    parsed = _parse(buf, tags, size)
    if parsed is None:
        return None
    # Encapsulated pixel data is not checked here: the caller walks its items (reader._scan_encapsulated).
    syntax, values, pixel, _, media = parsed
    return FastHeader(syntax, values, pixel, size, media)


def _parse(buf: bytes, tags: frozenset[int], size: int
           ) -> tuple[str, dict[int, tuple[str, bytes]], tuple[int | None, int] | None, int, str] | None:
    n = len(buf)
    if n < 144 or buf[128:132] != b"DICM":
        return None
    pos = 132
    syntax = media = ""
    while pos + 8 <= n:  # file meta: explicit VR little endian, group 2
        group, elem = struct.unpack_from("<HH", buf, pos)
        if group != 2:
            break
        meta_vr = buf[pos + 4 : pos + 6]
        if meta_vr in _LONG_VRS:
            length = struct.unpack_from("<I", buf, pos + 8)[0]
            start = pos + 12
        else:
            length = struct.unpack_from("<H", buf, pos + 6)[0]
            start = pos + 8
        if length == _UNDEFINED or start + length > n:
            return None
        if elem == 0x0010:
            syntax = buf[start : start + length].decode("ascii", "replace").strip(" \x00")
        elif (group << 16) | elem == _MEDIA_SOP_CLASS:
            media = buf[start : start + length].decode("ascii", "replace").strip(" \x00")
        pos = start + length
    if not syntax or syntax in (_EXPLICIT_BE, _DEFLATED):
        return None
    implicit = syntax == _IMPLICIT_LE
    values: dict[int, tuple[str, bytes]] = {}
    last = 0
    while pos + 8 <= n:
        group, elem = struct.unpack_from("<HH", buf, pos)
        tag = (group << 16) | elem
        if tag <= last or group == 0xFFFE:
            return None  # out of order or a stray item: not the common case
        if not implicit and buf[pos + 4 : pos + 6] not in VR_BYTES:
            return None  # not explicit VR after all (pydicom tells which encoding it is)
        last = tag
        header = _element_header(buf, pos, implicit)
        if header is None:
            return None
        length, start = header
        vr = (_vr(tag) if tag != _PIXEL_DATA else "OW") if implicit else buf[pos + 4 : pos + 6].decode("latin-1")
        if tag == _PIXEL_DATA:
            if length == _UNDEFINED:
                return syntax, values, (None, start), start, media
            return syntax, values, (length, start), start, media
        if length == _UNDEFINED:
            end = _skip_sequence(buf, start, implicit)
            if end is None:
                return None
            pos = end
            continue
        if start + length > min(n, size):
            return None
        if tag in tags:
            values[tag] = (vr, bytes(buf[start : start + length]))
        pos = start + length
    if pos >= size:
        return syntax, values, None, pos, media  # ended without pixel data
    return None


def _element_header(buf: bytes, pos: int, implicit: bool) -> tuple[int, int] | None:
    """(value length, value offset) of the little-endian element whose tag starts at `pos`."""
    if implicit:
        return struct.unpack_from("<I", buf, pos + 4)[0], pos + 8
    if buf[pos + 4 : pos + 6] in _LONG_VRS:
        if pos + 12 > len(buf):
            return None
        return struct.unpack_from("<I", buf, pos + 8)[0], pos + 12
    return struct.unpack_from("<H", buf, pos + 6)[0], pos + 8


def _skip_sequence(buf: bytes, pos: int, implicit: bool) -> int | None:
    """Position after the sequence delimiter of an undefined-length sequence starting at `pos`."""
    n = len(buf)
    stack = ["seq"]
    while stack:
        if pos + 8 > n or len(stack) > MAX_DEPTH:
            return None
        group, elem = struct.unpack_from("<HH", buf, pos)
        tag = (group << 16) | elem
        if tag == _ITEM:
            length = struct.unpack_from("<I", buf, pos + 4)[0]
            if length == _UNDEFINED:
                stack.append("item")
                pos += 8
            else:
                pos += 8 + length
        elif tag == _ITEM_END:
            if stack.pop() != "item":
                return None
            pos += 8
        elif tag == _SEQ_END:
            if stack.pop() != "seq":
                return None
            pos += 8
        else:
            header = _element_header(buf, pos, implicit)
            if header is None:
                return None
            length, start = header
            if length == _UNDEFINED:
                stack.append("seq")
                pos = start
            else:
                pos = start + length
        if pos > n:
            return None
    return pos
