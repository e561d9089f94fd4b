"""Readers' corrected segmentations from the PACS.

A viewer that edits segmentations (OHIF's segmentation mode, 3D Slicer's Segment Editor through
dcmqi) stores a reader's corrected nodule mask as a new DICOM SEG in the study, laid over the same
source series, with the reader as its Content Creator (ContentCreatorName). :func:`read_correction`
says whether a SEG is such a correction (dicomops's own SEGs are not; a SEG without a content
creator or over several series is refused with a reason), and :func:`reader_mask` turns its pixels
into the training pool's mask format: one volume of nodule instance ids (each connected component
of the reader's voxels is a nodule, ``1..n``), in the order of the slices' positions, with those
positions (``ipp_z``) and one record per nodule (centre, diameter, ``actionable``), as the
generator writes masks. Only the mask and the records leave this module; the source UIDs stay in
memory.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset

from dicomops.pacs.client import SEGMENTATION_CLASS
from dicomops.pacs.results import MANUFACTURER
from dicomops.synthetic.sidecars import IPP_Z_ARRAY, MASK_ARRAY

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Correction:
    """A reader's SEG: who made it, when, and which series it lies over (original UID: memory only)."""

    reader: str
    series_uid: str
    at: dt.datetime | None


@dataclass(frozen=True)
class ReaderMask:
    """A reader's mask in the pool's format: ``mask`` (slices, rows, columns) of nodule ids in the order
    of ``ipp_z``, and one record per nodule id."""

    mask: np.ndarray
    ipp_z: np.ndarray
    nodules: list[dict[str, object]]

    def save(self, path: Path) -> Path:
        from dicomops import io

        arrays: dict[str, Any] = {MASK_ARRAY: self.mask, IPP_Z_ARRAY: self.ipp_z,
                                  "nodules": np.array([json.dumps(self.nodules)])}
        return io.write_npz(path, **arrays)

    @staticmethod
    def nodules_of(path: Path) -> list[dict[str, object]]:
        with np.load(path) as npz:
            return list(json.loads(str(npz["nodules"][0])))


@dataclass(frozen=True)
class ServedMask:
    """The mask the segmenter served for a series, kept as the box around its voxels: a series' whole
    mask is 10^7 to 10^8 voxels (79 MB at 300 x 512 x 512), its findings 10^3, and a batch holds
    every study's answer until it is recorded.

    Attributes:
        shape: (slices, rows, columns) of the whole mask, slices in order of ``ipp_z``.
        origin: Where `box` starts in it.
        box: The voxels within the box (uint8; empty when nothing was found).
        ipp_z: The slices' positions.
        nodules: One record per finding (centre, diameter, score).
    """

    shape: tuple[int, int, int]
    origin: tuple[int, int, int]
    box: np.ndarray
    ipp_z: np.ndarray
    nodules: list[dict[str, object]]

    @classmethod
    def of(cls, mask: np.ndarray | None, ipp_z: np.ndarray, shape: tuple[int, int, int],
           nodules: list[dict[str, object]]) -> ServedMask:
        """From a whole (slices, rows, columns) `mask` (None: empty, of `shape`)."""
        whole = (int(shape[0]), int(shape[1]), int(shape[2]))
        if mask is None or not mask.any():
            return cls(whole, (0, 0, 0), np.zeros((0, 0, 0), np.uint8), np.asarray(ipp_z, float), nodules)
        spans = [np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis))) for axis in range(3)]
        lo, hi = [int(s[0]) for s in spans], [int(s[-1]) + 1 for s in spans]
        box = np.ascontiguousarray(mask[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]).astype(np.uint8)
        return cls(whole, (lo[0], lo[1], lo[2]), box, np.asarray(ipp_z, float), nodules)

    def save(self, path: Path) -> Path:
        from dicomops import io

        arrays: dict[str, Any] = {"box": self.box, "origin": np.asarray(self.origin), "shape": np.asarray(self.shape),
                                  IPP_Z_ARRAY: self.ipp_z, "nodules": np.array([json.dumps(self.nodules)])}
        return io.write_npz(path, **arrays)


def _voxels(npz: Any) -> np.ndarray:
    """The whole boolean mask of a saved :class:`ReaderMask` or :class:`ServedMask`."""
    if "box" not in npz:
        return np.asarray(npz[MASK_ARRAY]) > 0
    mask = np.zeros(tuple(int(n) for n in npz["shape"]), bool)
    box, (s, r, c) = npz["box"], (int(n) for n in npz["origin"])
    mask[s:s + box.shape[0], r:r + box.shape[1], c:c + box.shape[2]] = box > 0
    return mask


def mask_dice(served: Path, drawn: Path) -> float:
    """The Dice coefficient of two masks of one series (a :class:`ReaderMask` or a
    :class:`ServedMask`; any non-zero voxel is nodule), their slices matched by position: the mask
    the segmenter served and a reader's corrected one, over the slices both lie on. The gate may
    have left out a file the PACS still holds, or the series may have gained slices since it was
    answered: the segmenter is judged where it answered, and the log says how many of the reader's
    slices were left out. 0 when one is empty there and the other not; NaN when both are, or when
    they share no slice or not the matrix (not over the same series), or one repeats a position."""
    with np.load(served) as a, np.load(drawn) as b:
        mask_a, z_a, mask_b, z_b = _voxels(a), np.round(a[IPP_Z_ARRAY], 2), _voxels(b), np.round(b[IPP_Z_ARRAY], 2)
    common = np.intersect1d(z_a, z_b)
    if mask_a.shape[1:] != mask_b.shape[1:] or not len(common) or len(np.unique(z_a)) < len(z_a) \
            or len(np.unique(z_b)) < len(z_b):
        log.warning("a served mask (%d slices of %s) and a reader's (%d of %s) share no slice or matrix, "
                    "or repeat a position: no Dice", len(z_a), mask_a.shape[1:], len(z_b), mask_b.shape[1:])
        return math.nan
    if len(common) < max(len(z_a), len(z_b)):
        log.warning("Dice over the %d slices both masks lie on: the served mask has %d, the reader's %d",
                    len(common), len(z_a), len(z_b))
    # each mask's slices at the common positions, in their order (positions repeat in neither)
    order_a, order_b = np.argsort(z_a), np.argsort(z_b)
    mask_a = mask_a[order_a[np.searchsorted(z_a, common, sorter=order_a)]]
    mask_b = mask_b[order_b[np.searchsorted(z_b, common, sorter=order_b)]]
    total = int(mask_a.sum()) + int(mask_b.sum())
    return math.nan if total == 0 else 2.0 * int((mask_a & mask_b).sum()) / total


def is_ours(ds: Dataset) -> bool:
    """A SEG dicomops wrote: its Manufacturer, and no Content Creator (a reader's correction names
    one, whatever Manufacturer a viewer that copied ours left in it)."""
    return str(ds.get("Manufacturer", "")) == MANUFACTURER and not str(ds.get("ContentCreatorName", "")).strip()


def read_correction(ds: Dataset) -> Correction | str:
    """A reader's corrected SEG, or why this SEG is not one (a reason to record)."""
    if str(ds.get("SOPClassUID", "")) != SEGMENTATION_CLASS:
        return "not_a_segmentation"
    reader = str(ds.get("ContentCreatorName", "")).strip()
    if not reader:
        return "no_content_creator"
    series = ds.get("ReferencedSeriesSequence")
    if not series or len(series) != 1:
        return "not_over_one_series"
    from dicomops.feedback.pacs import dicom_time

    when = dicom_time(f"{ds.ContentDate}{ds.ContentTime}", ds) if ds.get("ContentDate") and ds.get("ContentTime") else None
    return Correction(reader, str(series[0].SeriesInstanceUID), when)


def _normal(header: Dataset) -> np.ndarray:
    orientation = np.asarray(header.ImageOrientationPatient, dtype=np.float64)
    return np.cross(orientation[:3], orientation[3:])


def reader_mask(ds: Dataset, headers: Sequence[Dataset]) -> ReaderMask:
    """The nodule instance map of a reader's SEG over its source series (`headers`: every instance's
    header, any order; pixel data not needed).

    Raises:
        ValueError: the SEG references no instance of `headers`, or its frames do not fit them.
    """
    import highdicom as hd
    from scipy import ndimage

    if not headers:
        raise ValueError("no source headers: the SEG's series holds no instance in the PACS")
    normal = _normal(headers[0])
    ordered = sorted(headers, key=lambda h: float(np.dot(normal, np.asarray(h.ImagePositionPatient, float))))
    seg = hd.seg.Segmentation.from_dataset(ds, copy=False)
    referenced = {str(sop) for _, _, sop in seg.get_source_image_uids()}
    uids = [str(h.SOPInstanceUID) for h in ordered]
    if not referenced & set(uids):
        raise ValueError("the SEG references none of its series' instances")
    pixels = seg.get_pixels_by_source_instance(uids, combine_segments=True, relabel=True,
                                               assert_missing_frames_are_empty=True, skip_overlap_checks=True)
    binary = pixels > 0  # (slices, rows, columns), slices in geometric order
    plane = np.asarray(binary.any(axis=0))
    crop, count, origin = np.zeros((0, 0, 0), dtype=np.int32), 0, (0, 0, 0)
    if plane.any():  # label the box around the drawn voxels only: a whole CT is 10^7 voxels, a nodule 10^3
        (s0, s1), (r0, r1), (c0, c1) = ((int(i[0]), int(i[-1]) + 1) for i in (
            np.flatnonzero(binary.any(axis=(1, 2))), np.flatnonzero(plane.any(axis=1)), np.flatnonzero(plane.any(axis=0))))
        crop, count = ndimage.label(binary[s0:s1, r0:r1, c0:c1])
        origin = (s0, r0, c0)
    rows_mm, cols_mm = (float(v) for v in ordered[0].PixelSpacing)
    positions = np.array([np.asarray(h.ImagePositionPatient, float) for h in ordered])
    steps = np.diff(positions @ normal)
    slice_mm = float(np.median(np.abs(steps))) if len(steps) else float(ordered[0].get("SliceThickness", 1.0))
    orientation = np.asarray(ordered[0].ImageOrientationPatient, dtype=np.float64)
    nodules: list[dict[str, object]] = []
    for k, box in enumerate(ndimage.find_objects(crop, max_label=count), start=1):
        s, r, c = np.nonzero(crop[box] == k)
        s, r, c = (s + box[0].start + origin[0], r + box[1].start + origin[1], c + box[2].start + origin[2])
        points = positions[s] + (c * cols_mm)[:, None] * orientation[:3] + (r * rows_mm)[:, None] * orientation[3:]
        volume = len(s) * rows_mm * cols_mm * slice_mm
        nodules.append({"center_mm": [round(float(v), 2) for v in points.mean(axis=0)],
                        "diameter_mm": round(float((6 * volume / math.pi) ** (1 / 3)), 2),
                        "kind": "solid", "attachment": "none", "actionable": True, "source": "reader"})
    mask = np.zeros(binary.shape, dtype=np.uint8 if count < 256 else np.uint16)
    if count:
        mask[origin[0]:origin[0] + crop.shape[0], origin[1]:origin[1] + crop.shape[1],
             origin[2]:origin[2] + crop.shape[2]] = crop
    return ReaderMask(mask, positions[:, 2].astype(np.float64), nodules)


def corrected_segmentation(source_images: Sequence[Dataset], mask: np.ndarray, reader: str,
                           viewer: str = "dicomops review") -> Dataset:
    """A reader's corrected nodule SEG over `source_images` (frame ``k`` of the boolean `mask`, shaped
    (frames, rows, columns), on ``source_images[k]``), as a segmentation viewer stores it: a new
    series of the same study, a manual segment, the reader as content creator. The tests and the
    demo's simulated readers use it."""
    import highdicom as hd

    from dicomops.pacs.results import FINDING_CATEGORY, FINDING_SITE, FINDING_TYPE, SEGMENT_LABEL

    description = hd.seg.SegmentDescription(
        segment_number=1, segment_label=SEGMENT_LABEL, segmented_property_category=FINDING_CATEGORY,
        segmented_property_type=FINDING_TYPE, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
        tracking_uid=hd.UID(), tracking_id=SEGMENT_LABEL, anatomic_regions=[FINDING_SITE])
    return hd.seg.Segmentation(
        source_images=list(source_images), pixel_array=np.asarray(mask, dtype=bool),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY, segment_descriptions=[description],
        series_instance_uid=hd.UID(), series_number=9101, sop_instance_uid=hd.UID(), instance_number=1,
        manufacturer=viewer, manufacturer_model_name=viewer, software_versions="1", device_serial_number="1",
        content_creator_name=reader, content_label="READER", series_description=f"Reader segmentation ({viewer})"[:64])
