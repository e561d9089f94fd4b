"""Turn a rendered HU volume into the DICOM files a given scanner would write, faults included."""

from __future__ import annotations

import hashlib
import io
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    CTImageStorage,
    MRImageStorage,
    RLELossless,
)

from dicomops.synthetic.phi import PatientPHI
from dicomops.synthetic.vendors import VendorProfile

FILE_FAULTS = ("truncated", "missing_tag", "not_dicom", "duplicated_slice", "corrupt_pixel_data")
SERIES_FAULTS = ("missing_slice", "inconsistent_spacing", "wrong_modality")
FAULTS = FILE_FAULTS + SERIES_FAULTS
# Rotated through by `missing_tag` faults: each is required by the ingest gate.
MISSING_TAG_CHOICES = ("ImagePositionPatient", "PixelSpacing", "RescaleIntercept", "SliceThickness",
                       "SeriesInstanceUID")
PRIVATE_CREATOR = "DICOMOPS SYNTH 1.0"


@dataclass(frozen=True)
class Acquisition:
    """What the scanner stores: stored values plus the HU they encode."""

    stored: np.ndarray  # int16 or uint16, (slices, rows, cols), acquisition order
    hu: np.ndarray  # float32: stored * slope + intercept inside the FOV, NaN outside
    fov: np.ndarray  # bool (rows, cols)


def to_stored(hu: np.ndarray, profile: VendorProfile, fov: np.ndarray) -> Acquisition:
    """Quantise HU into the vendor's storage, with padding outside the field of view."""
    lo, hi = profile.stored_range
    stored = np.rint((hu - profile.rescale_intercept) / profile.rescale_slope)
    np.clip(stored, lo, hi, out=stored)
    dtype = np.int16 if profile.pixel_representation else np.uint16
    stored_i = stored.astype(dtype)
    outside = ~fov
    stored_i[:, outside] = profile.padding_value if profile.padding_value is not None else lo
    true_hu = stored_i.astype(np.float32) * profile.rescale_slope + profile.rescale_intercept
    true_hu[:, outside] = np.nan
    return Acquisition(stored=stored_i, hu=true_hu, fov=fov)


def _ds(value: float, digits: int = 6) -> str:
    text = f"{value:.{digits}f}".rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


@dataclass(frozen=True)
class SeriesIdentity:
    study_uid: str
    series_uid: str
    frame_uid: str
    sop_uids: tuple[str, ...]


def deterministic_uid(*parts: str) -> str:
    """A 2.25 UID (a UUID as an integer) derived from a hash of `parts`: same parts, same UID.

    ``pydicom.uid.generate_uid(None, ...)`` ignores its entropy sources and returns a random UUID,
    so it cannot be used for reproducible corpora.
    """
    digest = hashlib.sha256("\x1f".join(parts).encode()).digest()
    return f"2.25.{int.from_bytes(digest[:16], 'big')}"


def make_identity(entropy: list[str], n_slices: int) -> SeriesIdentity:
    """Deterministic UIDs for a series: the same entropy gives the same UIDs."""
    return SeriesIdentity(
        study_uid=deterministic_uid(*entropy, "study"),
        series_uid=deterministic_uid(*entropy, "series"),
        frame_uid=deterministic_uid(*entropy, "frame"),
        sop_uids=tuple(deterministic_uid(*entropy, "sop", str(k)) for k in range(n_slices)),
    )


def build_template(profile: VendorProfile, phi: PatientPHI, ident: SeriesIdentity, *,
                   rows: int, cols: int, row_spacing: float, col_spacing: float,
                   contrast: bool, series_number: int) -> Dataset:
    """The header every slice of the series shares."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = CTImageStorage
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = phi.study_date
    ds.InstanceCreationDate = phi.study_date
    ds.StudyTime = phi.study_time
    ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = phi.study_time
    ds.AccessionNumber = phi.accession_number
    ds.Modality = "CT"
    ds.Manufacturer = profile.manufacturer
    ds.InstitutionName = phi.institution
    ds.InstitutionAddress = phi.institution_address
    ds.ReferringPhysicianName = phi.referring_physician
    ds.StationName = profile.station_name
    ds.StudyDescription = "CT CHEST WITH CONTRAST" if contrast else "CT CHEST WITHOUT CONTRAST"
    ds.SeriesDescription = f"Chest {profile.slice_thickness:g}mm {profile.kernel}"
    ds.PerformingPhysicianName = phi.performing_physician
    ds.OperatorsName = phi.operator
    ds.ManufacturerModelName = profile.model_name
    ds.PatientName = phi.patient_name
    ds.PatientID = phi.patient_id
    ds.IssuerOfPatientID = phi.issuer_of_patient_id
    ds.PatientBirthDate = phi.birth_date
    ds.PatientSex = phi.sex
    other = Dataset()
    other.PatientID = phi.other_patient_id
    other.IssuerOfPatientID = phi.issuer_of_patient_id
    other.TypeOfPatientID = "TEXT"
    ds.OtherPatientIDsSequence = Sequence([other])
    ds.PatientAge = phi.age
    ds.PatientSize = _ds(phi.size_m)
    ds.PatientWeight = _ds(phi.weight_kg)
    ds.PatientAddress = phi.address
    ds.PatientTelephoneNumbers = phi.telephone
    ds.PatientComments = phi.comments
    ds.BodyPartExamined = "CHEST"
    ds.SliceThickness = _ds(profile.slice_thickness)
    if profile.write_spacing_between_slices:
        ds.SpacingBetweenSlices = _ds(profile.slice_spacing)
    ds.KVP = _ds(profile.kvp)
    ds.DeviceSerialNumber = f"{zlib.crc32(profile.station_name.encode()) % 10**6:06d}"
    ds.SoftwareVersions = profile.software_versions
    ds.ReconstructionDiameter = _ds(cols * col_spacing, 3)
    ds.GantryDetectorTilt = "0"
    ds.XRayTubeCurrent = profile.tube_current_ma
    ds.ConvolutionKernel = profile.kernel
    ds.PatientPosition = "HFS"
    if contrast:
        ds.ContrastBolusAgent = "IOHEXOL 350"
        ds.ContrastBolusRoute = "IV"
    ds.StudyInstanceUID = ident.study_uid
    ds.SeriesInstanceUID = ident.series_uid
    ds.StudyID = phi.study_id
    ds.SeriesNumber = series_number
    ds.AcquisitionNumber = 1
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    ds.FrameOfReferenceUID = ident.frame_uid
    ds.PositionReferenceIndicator = ""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = cols
    ds.PixelSpacing = [_ds(row_spacing), _ds(col_spacing)]
    ds.BitsAllocated = 16
    ds.BitsStored = profile.bits_stored
    ds.HighBit = profile.bits_stored - 1
    ds.PixelRepresentation = profile.pixel_representation
    if profile.padding_value is not None:
        ds.add_new(0x00280120, "SS" if profile.pixel_representation else "US", profile.padding_value)
    ds.WindowCenter = [_ds(c) for c, _ in profile.windows] if len(profile.windows) > 1 else _ds(profile.windows[0][0])
    ds.WindowWidth = [_ds(w) for _, w in profile.windows] if len(profile.windows) > 1 else _ds(profile.windows[0][1])
    ds.RescaleIntercept = _ds(profile.rescale_intercept)
    ds.RescaleSlope = _ds(profile.rescale_slope)
    ds.RescaleType = "HU"
    ds.BurnedInAnnotation = "NO"
    request = Dataset()
    request.RequestedProcedureID = phi.requested_procedure_id
    request.ScheduledProcedureStepID = phi.scheduled_step_id
    request.AccessionNumber = phi.accession_number
    issuer = Dataset()
    issuer.LocalNamespaceEntityID = phi.institution
    request.IssuerOfAccessionNumberSequence = Sequence([issuer])
    request.RequestedProcedureDescription = f"CT chest, referred by {phi.referring_physician}"
    ds.RequestAttributesSequence = Sequence([request])
    block = ds.private_block(0x0009, PRIVATE_CREATOR, create=True)
    block.add_new(0x01, "LO", phi.patient_name)
    block.add_new(0x02, "LO", phi.patient_id)
    block.add_new(0x03, "DA", phi.birth_date)

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.TransferSyntaxUID = profile.transfer_syntax
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = "DICOMOPS_SYNTH"
    ds.file_meta = meta
    return ds


def file_names(profile: VendorProfile, n: int, rng: np.random.Generator) -> list[str]:
    """Names the vendor gives slice k (acquisition order); never in slice order on disk."""
    if profile.file_naming == "hex":
        return [f"{int(v):08X}" for v in rng.choice(16**8 - 1, size=n, replace=False)]
    order = rng.permutation(n)
    if profile.file_naming == "im_shuffled":
        return [f"IM{int(i) + 1:04d}.dcm" for i in order]
    if profile.file_naming == "numbered_reversed":
        return [f"{n - k:05d}.dcm" for k in range(n)]
    return [f"I{int(i) + 1}0" for i in order]


def write_slice(ds: Dataset, pixels: np.ndarray, profile: VendorProfile) -> bytes:
    """Encode one slice as a DICOM Part 10 byte string in the vendor's transfer syntax."""
    if profile.transfer_syntax == RLELossless:
        ds.compress(RLELossless, pixels, encoding_plugin="pylibjpeg", generate_instance_uid=False)
    else:
        ds.PixelData = pixels.tobytes()
        ds["PixelData"].VR = "OW"
        ds.file_meta.TransferSyntaxUID = profile.transfer_syntax
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def apply_slice_fault(ds: Dataset, fault: str, detail: str) -> None:
    """Change one slice's header for a header-level fault (before encoding)."""
    if fault == "missing_tag":
        delattr(ds, detail)
    elif fault == "wrong_modality":
        ds.Modality = "MR"
        ds.SOPClassUID = MRImageStorage
        ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
    elif fault == "inconsistent_spacing":
        ds.PixelSpacing = [_ds(float(v) * 1.25) for v in ds.PixelSpacing]


def corrupt_pixel_data(data: bytes) -> bytes:
    """Keep a valid header but halve PixelData's value, with its length field rewritten to match.

    pydicom reads such a file without complaint; only a length check against
    Rows × Columns × BitsAllocated catches it.
    """
    # Native little-endian PixelData is the last element: tag (7FE0,0010), VR or not, then length.
    tag = b"\xe0\x7f\x10\x00"
    pos = data.rfind(tag)
    if pos < 0:
        raise ValueError("no PixelData element to corrupt")
    explicit = data[pos + 4 : pos + 6] in (b"OW", b"OB")
    length_at = pos + 8 if explicit else pos + 4
    length = int.from_bytes(data[length_at : length_at + 4], "little")
    short = length // 2
    head = data[:length_at] + short.to_bytes(4, "little")
    return head + data[length_at + 4 : length_at + 4 + short]


NOT_DICOM_PAYLOADS = (
    ("report.dcm", b"%PDF-1.4\n% radiology report placeholder\n1 0 obj << /Type /Catalog >> endobj\n"),
    ("DICOMDIR.txt", b"This folder was exported from a viewer; open with your DICOM software.\n"),
    ("thumbs.db", bytes(range(256)) * 8),
    ("scout.png", b"\x89PNG\r\n\x1a\n" + b"\x00" * 64),
)


def write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
