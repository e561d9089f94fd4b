"""The segmenter's resume key holds what it learns from besides the images (series labels, nodule
records, masks), as the classifier's holds its labels, and not the gate's settings."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from dicomops import io
from dicomops.config import PreprocessConfig, SegmentConfig
from dicomops.layout import WorkLayout
from dicomops.segmentation import cv

PRE = PreprocessConfig()
CFG = SegmentConfig()


def _nodules(diameter: float) -> str:
    return json.dumps([{"diameter_mm": diameter, "kind": "solid", "attachment": "none"}])


def _work(root: Path) -> WorkLayout:
    """Four labelled series, two with a nodule and its mask, as ingest and preprocessing leave them."""
    layout = WorkLayout(root)
    index = pd.DataFrame([{"SeriesInstanceUID": f"S{i}", "PatientID": f"P{i}", "vendor": "ge", "label": i % 2,
                           "path": f"volumes/v{i}.npz"} for i in range(4)])
    layout.preprocessed.root.mkdir(parents=True, exist_ok=True)
    io.write_parquet(layout.preprocessed.index, index)
    deid = layout.ingest.deid
    (deid / "masks").mkdir(parents=True)
    labels = []
    for i in range(4):
        mask = f"masks/case-{i}.npz" if i % 2 else ""
        if mask:
            block = np.zeros((4, 8, 8), np.uint8)
            block[1:3, 2:5, 2:5] = 1
            io.write_npz(deid / mask, mask=block, ipp_z=np.arange(4.0))
        labels.append({"SeriesInstanceUID": f"S{i}", "label": i % 2, "nodules": _nodules(6.0) if i % 2 else "[]",
                       "mask_path": mask})
    io.write_csv(deid / "labels.csv", pd.DataFrame(labels))
    return layout


def _key(layout: WorkLayout, cfg: SegmentConfig = CFG) -> str:
    return cv.run_key(layout, cfg, PRE, "split", "data")


def test_a_readers_correction_of_a_mask_a_nodule_record_or_a_label_changes_the_resume_key(tmp_path: Path) -> None:
    layout = _work(tmp_path)
    key = _key(layout)
    assert _key(layout) == key  # nothing changed: the run resumes
    deid = layout.ingest.deid

    # A reader redraws a mask (same file name, same records, same DICOM files).
    corrected = np.zeros((4, 8, 8), np.uint8)
    corrected[1:3, 2:6, 2:6] = 1
    io.write_npz(deid / "masks/case-1.npz", mask=corrected, ipp_z=np.arange(4.0))
    masked = _key(layout)
    assert masked != key

    # A nodule's record corrected.
    labels = pd.read_csv(deid / "labels.csv", keep_default_na=False)
    labels.loc[labels.SeriesInstanceUID == "S3", "nodules"] = _nodules(8.0)
    io.write_csv(deid / "labels.csv", labels)
    recorded = _key(layout)
    assert recorded not in (key, masked)

    # A series' label corrected (what preprocessing puts in the index).
    index = pd.read_parquet(layout.preprocessed.index)
    index.loc[index.SeriesInstanceUID == "S2", "label"] = 1
    io.write_parquet(layout.preprocessed.index, index)
    assert _key(layout) not in (key, masked, recorded)


def test_the_gate_settings_are_not_in_the_resume_key_and_the_model_settings_are(tmp_path: Path) -> None:
    layout = _work(tmp_path)
    key = _key(layout)
    gate = CFG.model_copy(update={"promotion_margin": 0.02, "min_cpm": 0.5, "min_dice": 0.1, "min_series_kappa": 0.0,
                                  "vendor_tolerance": 0.2})
    assert _key(layout, gate) == key
    assert _key(layout, CFG.model_copy(update={"epochs": CFG.epochs + 1})) != key
