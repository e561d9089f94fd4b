"""Hand-made hostile files for the ingest gate: each one is a way real folders go wrong."""

from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian


def ct_slice(z: float = 0.0, rows: int = 16, cols: int = 16, **overrides: object) -> Dataset:
    """A minimal valid CT slice with every tag the gate requires."""
    ds = Dataset()
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.StudyInstanceUID = "1.2.3.4"
    ds.SeriesInstanceUID = "1.2.3.4.5"
    ds.PatientID = "HOSTILE-001"
    ds.PatientName = "DOE^JANE"
    ds.StudyDate = "20240102"
    ds.Modality = "CT"
    ds.Manufacturer = "ACME"
    ds.PixelSpacing = [0.7, 0.7]
    ds.SliceThickness = 1.0
    ds.ImagePositionPatient = [0, 0, z]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
    ds.KVP = 120
    ds.PixelData = np.zeros((rows, cols), np.uint16).tobytes()
    for k, v in overrides.items():
        setattr(ds, k, v)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    return ds


def to_bytes(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _meta_bytes(syntax: str) -> bytes:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = "1.2.3.9"
    meta.TransferSyntaxUID = syntax
    buf = io.BytesIO()
    pydicom.filewriter.write_file_meta_info(buf, meta, enforce_standard=True)
    return b"\x00" * 128 + b"DICM" + buf.getvalue()


def huge_declared_length() -> bytes:
    """A header element (PatientComments, LT) that claims 4 GB."""
    good = to_bytes(ct_slice())
    head = _meta_bytes(ExplicitVRLittleEndian)
    return head + struct.pack("<HH2sHI", 0x0010, 0x4000, b"UT", 0, 0xFFFFFFF0) + b"x" * 64 + good[-64:]


def deflate_bomb(inflated_mb: int = 300) -> bytes:
    """A deflated dataset whose body inflates to `inflated_mb` MB of zeros (kilobytes on disk)."""
    body = struct.pack("<HH2sHI", 0x0010, 0x4000, b"UT", 0, inflated_mb * 1024 * 1024)
    compressor = zlib.compressobj(1, zlib.DEFLATED, -zlib.MAX_WBITS)
    data = compressor.compress(body)
    chunk = b"\x00" * (1024 * 1024)
    for _ in range(inflated_mb):
        data += compressor.compress(chunk)
    data += compressor.flush()
    return _meta_bytes(DeflatedExplicitVRLittleEndian) + data


def deep_nesting(depth: int = 3000) -> bytes:
    """Sequences nested far deeper than Python's recursion limit."""
    body = io.BytesIO()
    # Written by hand: pydicom itself would recurse while writing it.
    data = to_bytes(ct_slice())
    pixel_at = data.rfind(b"\xe0\x7f\x10\x00")
    item = b"\x08\x00\x00\x01SH\x02\x00X "
    nested = item
    for _ in range(depth):
        seq = struct.pack("<HH2sHI", 0x0040, 0xA730, b"SQ", 0, 0xFFFFFFFF)
        wrapped = struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF) + nested + struct.pack("<HHI", 0xFFFE, 0xE00D, 0)
        nested = seq + wrapped + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
    body.write(data[:pixel_at] + nested + data[pixel_at:])
    return body.getvalue()


def huge_matrix() -> bytes:
    return to_bytes(ct_slice(Rows=60000, Columns=60000))


def bad_pixel_spacing() -> bytes:
    """PixelSpacing "abc\\0.7": written as bytes, since pydicom refuses to set such a value."""
    data = to_bytes(ct_slice())
    assert data.count(b"0.7\\0.7 ") == 1
    return data.replace(b"0.7\\0.7 ", b"abc\\0.7 ")


def executable_preamble() -> bytes:
    data = bytearray(to_bytes(ct_slice()))
    data[:4] = b"MZ\x90\x00"
    return bytes(data)


def write_hostile_folder(root: Path) -> dict[str, str]:
    """Write every hostile file into `root`; return {relative path: expected reason}."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    good = to_bytes(ct_slice())
    cases: dict[str, tuple[bytes, str]] = {
        "zero.dcm": (b"", "not_dicom"),
        "random.dcm": (rng.bytes(5000), "not_dicom"),
        "truncated.dcm": (good[: len(good) - 200], "truncated"),
        "huge_length.dcm": (huge_declared_length(), "truncated"),
        "bomb.dcm": (deflate_bomb(), "bad_value:deflate_size"),
        "deep.dcm": (deep_nesting(), "unreadable_header"),
        "huge_matrix.dcm": (huge_matrix(), "bad_value:Rows"),
        "bad_spacing.dcm": (bad_pixel_spacing(), "bad_value:PixelSpacing"),
        "mr.dcm": (to_bytes(ct_slice(Modality="MR")), "wrong_modality"),
        "burned.dcm": (to_bytes(ct_slice(BurnedInAnnotation="YES")), "burned_in_annotation"),
        "no_pixels.dcm": (to_bytes(_without_pixels()), "missing_tag:PixelData"),
    }
    for name, (data, _) in cases.items():
        (root / name).write_bytes(data)
    (root / "folder.dcm").mkdir()  # a directory named like a file: never opened
    os.mkfifo(root / "pipe.dcm")  # reading a FIFO would block forever
    return {name: reason for name, (_, reason) in cases.items()}


def _without_pixels() -> Dataset:
    ds = ct_slice()
    del ds.PixelData
    return ds
