"""Names of the non-image files that sit beside the DICOM folders of a corpus.

The generator writes them, the ingest gate lists them instead of ingesting them and re-keys the
labels and masks into the de-identified corpus under the same names, preprocessing and retraining
read them. Every one of those spells the names through these constants. This module imports
nothing heavy (numpy only inside :func:`mask_slices`), so the config and the worker processes can
import it cheaply.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

LABELS_CSV = "labels.csv"  # one row per series: truth, vendor, series folder, mask path
FAULTS_CSV = "faults.csv"  # one row per injected fault (file or series)
PHI_CSV = "phi.csv"  # the fake PHI the corpus carries, for leak tests
CORPUS_JSON = "corpus.json"  # generator version and options
MASKS_DIR = "masks"  # one ``<name>.npz`` per series: nodule mask and slice positions
MASK_SUFFIX = ".npz"
MASK_ARRAY = "mask"  # in a mask file: (slices, rows, columns) uint8, 0 outside, k + 1 inside nodule k
IPP_Z_ARRAY = "ipp_z"  # in a mask file: the z position (mm) of each slice of the mask, in its order
MASK_Z_TOLERANCE_MM = 1e-3  # a mask slice lies on an image whose z (ImagePositionPatient[2]) is this close

SIDECAR_FILES = (LABELS_CSV, FAULTS_CSV, PHI_CSV, CORPUS_JSON)
"""The sidecar files at the corpus root."""
SIDECAR_PATTERNS = (*SIDECAR_FILES, f"{MASKS_DIR}/*{MASK_SUFFIX}")
"""Globs, relative to the corpus root, of every sidecar (``IngestConfig.sidecars``)."""


def mask_path(name: str) -> str:
    """The relative path (POSIX) of the mask of series `name`, as ``labels.csv`` records it."""
    if not name or "/" in name or "\\" in name:
        raise ValueError(f"a mask name is a plain file stem such as 'case-00001', got {name!r}")
    return f"{MASKS_DIR}/{name}{MASK_SUFFIX}"


def recorded_nodules(nodules: Any, nodule_count: Any) -> list[int]:
    """The nodule counts a ``labels.csv`` row gives: the records of its ``nodules`` cell (what
    preprocessing and the segmenter read; an empty cell records none) and its ``nodule_count``, each
    where it is readable. The gate bounds a mask's ids by the fewer; preprocessing withholds the label
    of a series without a mask where either records one."""
    counts = []
    if nodules is not None:
        try:
            parsed = json.loads(str(nodules).strip() or "[]")
        except (ValueError, RecursionError):
            parsed = None
        if isinstance(parsed, list):
            counts.append(len(parsed))
    count = str(nodule_count if nodule_count is not None else "").strip()
    if count.isdigit():
        counts.append(int(count))
    return counts


def mask_slices(ipp_z: np.ndarray, z: np.ndarray) -> np.ndarray:
    """For each slice position of a series, `z`, the mask slice (an index into `ipp_z`) within
    :data:`MASK_Z_TOLERANCE_MM` of it, -1 where there is none: how a mask is laid on its series, at
    the gate that checks it and in preprocessing that uses it."""
    import numpy as np

    near = np.abs(np.asarray(ipp_z, float)[None, :] - np.asarray(z, float)[:, None]) < MASK_Z_TOLERANCE_MM
    return np.where(near.any(axis=1), near.argmax(axis=1), -1)
