"""The nodule segmenter as serving runs it, and what it adds to a study's answer in the PACS.

A registered version of the segmenter (``dicomops segment`` registers and exports it) is loaded
like the classifier's champion: its exported ONNX file, checked against the sha256 its version
carries, the :class:`~dicomops.config.SegmentConfig` and the preprocessing it was trained with.
:func:`localise` runs the export's sliding window over one preprocessed series and reports the
findings by the rule the cross-validation judged (:func:`dicomops.segmentation.metrics.findings`):
each nodule's centre in DICOM patient coordinates (LPS, mm), its diameter and the width of its
solid part for the SR, the series' actionable score (:mod:`dicomops.segmentation.actionable`), and the
findings' voxels carried back onto the acquired slices for the SEG
(:mod:`dicomops.segmentation.native`).

Nothing here sees an identifier: the segmenter reads the de-identified preprocessing of a series,
and the original UIDs only meet its output inside the DICOM objects
:func:`dicomops.pacs.watch.build_reports` writes.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dicomops.config import PreprocessConfig, SegmentConfig
from dicomops.export import onnx_export
from dicomops.pacs import results
from dicomops.serving.champion import EXPORT_ARTIFACT, PREPROCESS_CONFIG, fetch, resolve
from dicomops.tracking.registry import CHAMPION, WEIGHTS_ARTIFACT, alias_version
from dicomops.tracking.runs import configure_mlflow

log = logging.getLogger(__name__)

SEGMENT_CONFIG = "segment_config.json"
ONNX_FILE = "segmenter.onnx"
SHA_TAG = "export.onnx.sha256"
# DICOM patient coordinates are LPS; the preprocessing's affines map to RAS.
RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])


@dataclass(frozen=True)
class Segmenter:
    """A registered segmenter version on ONNX Runtime."""

    name: str
    version: str
    run_id: str
    preprocess: PreprocessConfig
    cfg: SegmentConfig
    session: Any = field(repr=False)

    def describe(self) -> dict[str, Any]:
        return {"segmenter": self.name, "segmenter_version": self.version,
                "finding_threshold": self.cfg.finding_threshold}


@dataclass(frozen=True)
class Localisation:
    """The segmenter's answer for one series, on the preprocessing grid.

    Attributes:
        nodules: The findings, best first: centre in LPS mm, equivalent diameter, score.
        mask: Boolean (I, J, K) mask of the findings' voxels (nothing else the network marked).
        affine: 4x4 voxel → RAS mm of `mask` (the preprocessing's).
        score: The best finding's score (0 with no finding), so that ``score >= finding_threshold``
            exactly when ``nodules`` is not empty; 4 decimals, as the SR writes it.
        actionable: The series' actionable score from every candidate's size and solid part
            (:func:`dicomops.segmentation.actionable.series_score`, the rule the cross-validation
            judged by); None when the preprocessing has no fixed window (``window='header'``).
    """

    nodules: tuple[results.Nodule, ...]
    mask: np.ndarray
    affine: np.ndarray
    score: float
    actionable: float | None = None


@dataclass(frozen=True)
class Served:
    """What the segmenter answered for one series as it went to the PACS: its call and scores for the
    results table (:meth:`columns`), and the findings' voxels on the acquired slices, in the readers'
    mask format, for a reader's corrected segmentation to be compared with
    (:func:`dicomops.feedback.seg.mask_dice`). De-identified: the gate's pseudonym, slice positions."""

    series: str  # the gate's pseudonym
    name: str
    version: str
    present: bool
    score: float
    actionable: float | None
    nodules: int
    mask: Any = field(repr=False)  # a dicomops.feedback.seg.ServedMask (empty: nothing found; None: not laid out)

    COLUMNS = ("segmenter", "segmenter_version", "segmenter_present", "segmenter_score", "segmenter_actionable",
               "segmenter_nodules")

    def columns(self) -> dict[str, Any]:
        return dict(zip(self.COLUMNS, (self.name, self.version, self.present, round(self.score, 6),
                                       math.nan if self.actionable is None else round(self.actionable, 6),
                                       self.nodules), strict=True))


def served(segmenter: Segmenter, series: str, found: Localisation, images: list[Any], grid: Any = None,
           native_mask: np.ndarray | None = None, laid_out: bool = True) -> Served:
    """The record of `found` for `series`: `native_mask` is its (columns, rows, slices) mask on the
    acquired `grid` of `images` (:func:`dicomops.segmentation.native.native_grid`); without them
    (nothing found), an empty mask on the slices in order of position. `laid_out` False: the
    findings could not be carried onto the acquired slices; no mask is kept (no Dice)."""
    from dicomops.feedback.seg import ServedMask

    records: list[dict[str, object]] = [
        {"center_mm": [round(v, 2) for v in n.center_mm], "diameter_mm": n.diameter_mm, "score": n.score}
        for n in found.nodules]
    mask = None
    if not laid_out:
        pass
    elif grid is None or native_mask is None:
        positions = np.sort([float(ds.ImagePositionPatient[2]) for ds in images])
        mask = ServedMask.of(None, positions, (len(images), int(images[0].Rows), int(images[0].Columns)), records)
    else:
        positions = np.array([float(images[i].ImagePositionPatient[2]) for i in grid.order])
        voxels = np.asarray(native_mask, bool).transpose(2, 1, 0)  # a view: (slices, rows, columns)
        mask = ServedMask.of(voxels, positions, voxels.shape, records)
    return Served(series, segmenter.name, segmenter.version, bool(found.nodules), float(found.score),
                  found.actionable, len(found.nodules), mask)


def load_segmenter(tracking_uri: str, name: str, alias: str | None = CHAMPION, version: str | None = None,
                   models_dir: Path | None = None, threads: int = 2) -> Segmenter:
    """The version of `name` holding `alias` (or number `version`), on ONNX Runtime with `threads`."""
    client = configure_mlflow(tracking_uri)
    mv = resolve(client, name, None if version is not None else alias, version)
    root = fetch(client, mv, Path(models_dir or tempfile.mkdtemp(prefix="dicomops-models-")) / f"{name}-v{mv.version}",
                 configs=(PREPROCESS_CONFIG, SEGMENT_CONFIG), marker=ONNX_FILE, export_hint="dicomops segment",
                 expected={ONNX_FILE: (mv.tags or {}).get(SHA_TAG)})
    onnx_path = root / EXPORT_ARTIFACT / ONNX_FILE
    expected = (mv.tags or {}).get(SHA_TAG)
    if not expected:
        raise ValueError(f"{name} version {mv.version} carries no {SHA_TAG} tag; export it again (dicomops segment)")
    if onnx_export.sha256(onnx_path) != expected:
        raise ValueError(f"{ONNX_FILE} of {name} version {mv.version} does not match its registered sha256 "
                         f"({SHA_TAG}); export it again (dicomops segment)")
    weights = root / WEIGHTS_ARTIFACT
    preprocess = PreprocessConfig.model_validate(json.loads((weights / PREPROCESS_CONFIG).read_text()))
    cfg = SegmentConfig.model_validate(json.loads((weights / SEGMENT_CONFIG).read_text()))
    return Segmenter(name, str(mv.version), str(mv.run_id), preprocess, cfg,
                     onnx_export.session(onnx_path, threads=threads))


def optional_segmenter(tracking_uri: str, name: str, alias: str = CHAMPION, models_dir: Path | None = None,
                       threads: int = 2) -> Segmenter | None:
    """The segmenter holding `alias`, or None when no version holds it: results then carry the
    classifier's answer alone, and the log says so. A version that holds it but cannot be loaded
    (not exported, tampered with) raises: a promoted model that silently does nothing is worse."""
    mv = alias_version(configure_mlflow(tracking_uri), name, alias)
    if mv is None:
        log.warning("no version of %s holds the alias '%s': results carry no nodule locations and no SEG "
                    "(train one with 'dicomops segment' and promote it)", name, alias)
        return None
    return load_segmenter(tracking_uri, name, version=str(mv.version), models_dir=models_dir, threads=threads)


def localise(segmenter: Segmenter, image: np.ndarray, affine: np.ndarray) -> Localisation:
    """Run the segmenter over one preprocessed (I, J, K) volume with its voxel → RAS `affine`."""
    from dicomops.segmentation import actionable
    from dicomops.segmentation.export import onnx_probability
    from dicomops.segmentation.metrics import findings

    cfg = segmenter.cfg
    affine = np.asarray(affine, dtype=float)
    if affine.shape != (4, 4):
        raise ValueError(f"affine must be 4x4, got shape {affine.shape}")
    prob = onnx_probability(segmenter.session, image, cfg)
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    level = actionable.solid_level(segmenter.preprocess)
    solid_image = image if level is not None else None  # no fixed window: no solid parts, no call
    found, mask = findings(prob, threshold=cfg.threshold, candidate_threshold=cfg.candidate_threshold,
                           finding_threshold=cfg.finding_threshold, spacing=spacing, image=solid_image,
                           solid_level=level)
    call = None
    if level is not None:
        call = min(max(actionable.series_score(actionable.weighed(prob, image, level, cfg, spacing)), 0.0), 1.0)
    nodules = []
    for f in found:
        ras = affine[:3, :3] @ np.asarray(f.centre) + affine[:3, 3]
        lps = RAS_TO_LPS @ ras
        nodules.append(results.Nodule(center_mm=(float(lps[0]), float(lps[1]), float(lps[2])),
                                      diameter_mm=round(f.diameter_mm, 1), score=round(min(max(f.score, 0.0), 1.0), 4),
                                      solid_width_mm=None if f.solid_core_mm is None else round(f.solid_core_mm, 1)))
    # The series' score is its best finding's, so that the SR's probability and its operating point
    # agree with its present/absent call; a candidate too small or too elongated to be a finding is
    # not one, however high its voxels (the highest voxel anywhere said "0.98, absent").
    score = round(max((n.score for n in nodules), default=0.0), 4)
    return Localisation(tuple(nodules), mask, affine, score, None if call is None else round(call, 4))


def with_segmenter(champion: Any, tracking_uri: str, name: str | None, models_dir: Path | None = None,
                   threads: int = 2, write_seg: bool = True) -> Any:
    """`champion` (a :class:`dicomops.serving.champion.Champion`) with the segmenter of `name`
    holding the champion alias attached (:func:`optional_segmenter`), its SEG written back unless
    `write_seg` is off (``serve.write_seg``); unchanged when `name` is None (localisation switched
    off) or no version holds the alias."""
    import dataclasses

    if name is None:
        return champion
    segmenter = optional_segmenter(tracking_uri, name, models_dir=models_dir, threads=threads)
    return champion if segmenter is None else dataclasses.replace(champion, segmenter=segmenter, write_seg=write_seg)
