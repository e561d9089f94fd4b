"""Simulated readers for the demo: each judges the champion's out-of-fold calls on the labelled
corpus, agreeing with the truth except on a chosen share of series, as a reader who sometimes
disagrees would. Their judgements are stored like any reader's (source ``simulated``), so the
agreement figures, the retrain trigger and the gate can be watched on the demo without a PACS."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from dicomops import io
from dicomops.feedback.store import FeedbackStore, make_item
from dicomops.layout import WorkLayout
from dicomops.training.state import load_state


def reader_ids(n: int) -> dict[str, str]:
    """``sim-reader-1`` (senior), ``sim-reader-2`` ... (readers)."""
    return {f"sim-reader-{i + 1}": "senior" if i == 0 else "reader" for i in range(n)}


def simulate(work: Path, model: str, version: str, readers: int, disagree: float, share: float = 1.0,
             seed: int = 0) -> int:
    """Store `readers` simulated readers' judgements of a `share` of the series in the training work
    directory's out-of-fold predictions (the version's calls at its CV threshold); each reader's label
    is the truth flipped on a random `disagree` share. Returns how many items were new.

    Raises:
        ValueError: no training in `work`, one of another version, or a share outside [0, 1].
    """
    if not (0 <= disagree <= 1 and 0 < share <= 1 and readers >= 1):
        raise ValueError("readers must be at least 1, disagree in [0, 1] and share in (0, 1]")
    paths = WorkLayout(work).train
    if not paths.oof_predictions.exists():
        raise ValueError(f"{paths.oof_predictions} does not exist: train first ('dicomops train --work {work}')")
    trained = str(load_state(WorkLayout(work)).get("version", ""))
    if trained != str(version):
        raise ValueError(f"the out-of-fold calls in {paths.root} are version {trained or '(none registered)'}'s, "
                         f"not version {version}'s; simulate on the work directory that trained it")
    preds = pd.read_parquet(paths.oof_predictions)
    threshold = float(io.read_json(paths.summary)["threshold"])
    rng = np.random.default_rng(seed)
    picked = preds.sample(frac=share, random_state=seed).sort_values("SeriesInstanceUID")
    now = dt.datetime.now(dt.UTC)
    items: list[dict[str, Any]] = []
    for reader, role in reader_ids(readers).items():
        flips = rng.random(len(picked)) < disagree
        for row, flip in zip(picked.itertuples(), flips, strict=True):
            said = int(row.score >= threshold)
            label = 1 - int(row.label) if flip else int(row.label)
            items.append(make_item(reader=reader, role=role, source="simulated",
                                   verdict="accept" if label == said else "correct", series=str(row.SeriesInstanceUID),
                                   vendor=str(row.vendor), model=model, version=str(version), model_label=said,
                                   model_score=float(row.score), reader_label=label, ref=f"sim-{seed}", at=now))
    return FeedbackStore(work).add(items)
