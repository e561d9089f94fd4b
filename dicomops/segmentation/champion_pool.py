"""The segmenter's champion on the challenger's pool: what its promotion gate compares (the
classifier's counterpart is :mod:`dicomops.training.champion_pool`, whose docstring says why).

A segmenter's CPM is judged nodule by nodule against the reference masks, which readers can
correct, so the champion is judged again, by the challenger's references and series: each series
its cross-validation held out is scored by the fold model that held it out (the fold runs keep
their weights, the version's run its split as ``cv/folds.json``), every other series by its final
model, which never trained on it. Each model keeps its own sliding-window and finding settings;
both CPMs, pooled and per vendor, are computed as ``cv.mean_cpm`` and ``cv.cpm.<vendor>`` are.
"""

from __future__ import annotations

import json
import tempfile
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import numpy as np

from dicomops import io
from dicomops.layout import WorkLayout
from dicomops.preprocessing.stage import VOLUME_FIELDS
from dicomops.progress import PROGRESS
from dicomops.segmentation import metrics as m
from dicomops.segmentation.cv import evaluate, load_evals
from dicomops.segmentation.data import load_volumes
from dicomops.tracking.promotion import ModelScore, PoolComparison
from dicomops.tracking.runs import configure_mlflow


def split_artifact(work: Path) -> str:
    """Where a segmentation run keeps the split its folds held out (``summarise`` logs it under ``cv/``)."""
    return f"cv/{WorkLayout(work).folds_file.name}"


def champion_on_pool(work: Path, tracking_uri: str, name: str, champion_version: str) -> PoolComparison:
    """Both segmenters on the series, references and folds the challenger in `work` was
    cross-validated on (module docstring); ``unavailable`` with the reason where the champion cannot
    be judged there (its split not stored, other preprocessing)."""
    from dicomops.segmentation.teacher import load_segmenter
    from dicomops.training.distill import fold_run

    layout = WorkLayout(work)
    client = configure_mlflow(tracking_uri)
    parent = str(client.get_model_version(name, champion_version).run_id)

    def unavailable(why: str) -> PoolComparison:
        return PoolComparison(str(champion_version), unavailable=why)

    with tempfile.TemporaryDirectory() as tmp:
        try:
            split = json.loads(Path(client.download_artifacts(parent, split_artifact(work), tmp)).read_text())
        except Exception as err:  # MLflow raises its own, OSError or a missing-file error by store
            return unavailable(f"its split is not stored with it ({split_artifact(work)}: {type(err).__name__}); "
                               "it was trained before 2026-12-06")
    ours = [e for i in range(layout.read_folds().n_splits) for e in load_evals(layout.segment.fold(i) / "evals.json")]
    held_out = {uid: i for i, part in enumerate(split["folds"]) for uid in part["val"]}
    by_model: dict[int | None, list[str]] = defaultdict(list)  # a fold's model, or None: the final model
    for e in ours:
        by_model[held_out.get(e.series)].append(e.series)
    ours_pre = io.read_json(layout.segment.final_preprocess_config)
    theirs: list[m.SeriesEval] = []
    for fold, series in sorted(by_model.items(), key=lambda item: -1 if item[0] is None else item[0]):
        model, cfg, pre = load_segmenter(tracking_uri, parent if fold is None else fold_run(tracking_uri, parent, fold))
        if differs := [k for k in VOLUME_FIELDS if ours_pre.get(k) != pre.model_dump(mode="json").get(k)]:
            return unavailable(f"it was trained on other preprocessing ({', '.join(differs)})")
        which = "its final model" if fold is None else f"its fold-{fold} model"
        PROGRESS.info(f"segmenter gate: champion v{champion_version}, {which} on {len(series)} series")
        judged, _ = evaluate(model, load_volumes(layout, series, cfg.patch, cfg.border_share), cfg, pre)
        theirs.extend(judged)
    unseen = len(by_model.get(None, []))
    return PoolComparison(str(champion_version), _cpm(ours), _cpm(theirs), len(ours),
                          cross_validated=len(ours) - unseen, unseen=unseen)


def _cpm(evals: list[m.SeriesEval]) -> ModelScore:
    vendors = {v: m.froc([e for e in evals if e.vendor == v]).cpm for v in sorted({e.vendor for e in evals})}
    return ModelScore(m.froc(evals).cpm, {v: c for v, c in vendors.items() if np.isfinite(c)})


def pool_for(work: Path, tracking_uri: str, name: str) -> Callable[[str], PoolComparison]:
    """What the segmenter's promotion gate asks (``pool(champion_version)``) of the training in `work`."""
    return lambda champion_version: champion_on_pool(work, tracking_uri, name, champion_version)
