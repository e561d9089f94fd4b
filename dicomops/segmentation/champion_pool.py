"""The segmenter's champion on the challenger's pool: what its promotion gate compares (the
classifier's counterpart, :mod:`dicomops.training.champion_pool`, says why, and owns the rule of
which champion model scores which series).

A segmenter's CPM is judged nodule by nodule against the reference masks, which readers can
correct, so the champion is judged again, on the challenger's series and references: each series
by the fold model of its cross-validation that never trained on its patient (the fold runs keep
their weights, the version's run its split as ``cv/folds.json``), with that model's own
sliding-window and finding settings. Both CPMs, pooled and per vendor, are computed as
``cv.mean_cpm`` and ``cv.cpm.<vendor>`` are. On the demo that is a sliding-window pass over every
series of the pool, in the gate of every segmenter training that has a champion to meet.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from dicomops.layout import WorkLayout
from dicomops.progress import PROGRESS
from dicomops.segmentation import metrics as m
from dicomops.segmentation.cv import evaluate, load_evals, parent_run
from dicomops.segmentation.data import load_volumes
from dicomops.tracking.promotion import ModelScore, PoolComparison
from dicomops.tracking.runs import configure_mlflow
from dicomops.training.champion_pool import champion_folds, other_preprocessing, split_artifact

# Volumes judged at once: a whole fold's would hold as much memory as training does.
CHUNK = 8


def champion_on_pool(work: Path, tracking_uri: str, name: str, champion_version: str) -> PoolComparison:
    """Both segmenters on the series, references and folds the challenger in `work` was
    cross-validated on (module docstring); ``unavailable`` with the reason where the champion cannot
    be judged there (its split not kept, other preprocessing). Any other failure raises."""
    from dicomops.segmentation.teacher import load_segmenter
    from dicomops.training.distill import fold_run

    layout = WorkLayout(work)
    client = configure_mlflow(tracking_uri)
    parent = str(client.get_model_version(name, champion_version).run_id)
    if split_artifact(work) not in {a.path for a in client.list_artifacts(parent, "cv")}:
        return PoolComparison(str(champion_version), unavailable=f"its run keeps no {split_artifact(work)} (it was "
                                                                  "trained before 2026-12-06)")
    with tempfile.TemporaryDirectory() as tmp:
        split = json.loads(Path(client.download_artifacts(parent, split_artifact(work), tmp)).read_text())["folds"]
    folds = layout.read_folds()
    ours = {e.series: e for i in range(folds.n_splits) for e in load_evals(layout.segment.fold(i) / "evals.json")}
    own_fold = {uid: i for i in range(folds.n_splits) for uid in folds.val(i)}
    pool = layout.labelled_series().set_index("SeriesInstanceUID").loc[list(ours)].reset_index()
    pool["fold"] = pool.SeriesInstanceUID.map(own_fold)
    pool["champion_fold"] = champion_folds(pool, split)
    groups = {int(f): list(part.SeriesInstanceUID) for f, part in pool.dropna(subset=["champion_fold"])
              .groupby("champion_fold")}
    if changed := other_preprocessing(tracking_uri, parent, parent_run(layout)):  # before any model runs
        return PoolComparison(str(champion_version), unavailable=f"it was trained on other preprocessing ({changed})")
    models = {f: load_segmenter(tracking_uri, fold_run(tracking_uri, parent, f)) for f in groups}
    theirs: list[m.SeriesEval] = []
    for fold, series in groups.items():
        model, cfg, pre = models[fold]
        PROGRESS.info(f"segmenter gate: champion v{champion_version}, its fold-{fold} model on {len(series)} series")
        for start in range(0, len(series), CHUNK):
            volumes = load_volumes(layout, series[start:start + CHUNK], cfg.patch, cfg.border_share, keep=False)
            theirs.extend(evaluate(model, volumes, cfg, pre)[0])
    compared = [ours[e.series] for e in theirs]
    return PoolComparison(str(champion_version), _cpm(compared), _cpm(theirs), len(theirs), rescored=len(theirs))


def _cpm(evals: list[m.SeriesEval]) -> ModelScore:
    vendors = {v: m.froc([e for e in evals if e.vendor == v]).cpm for v in sorted({e.vendor for e in evals})}
    return ModelScore(m.froc(evals).cpm, {v: c for v, c in vendors.items() if np.isfinite(c)})


def pool_for(work: Path, tracking_uri: str, name: str) -> Callable[[str], PoolComparison]:
    """What the segmenter's promotion gate asks (``pool(champion_version)``) of the training in `work`."""
    return lambda champion_version: champion_on_pool(work, tracking_uri, name, champion_version)

