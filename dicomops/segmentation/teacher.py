"""The segmenter as the teacher of a slice classifier (:mod:`dicomops.training.distill`).

The segmenter does not score slices; it finds nodules and measures them, and its call on a series
is the best of its findings' actionable scores (:mod:`dicomops.segmentation.actionable`: the
finding's probability, weighed by how surely it is at least 6 mm and has a solid core). Read slice
by slice, the same call gives a slice target: the best actionable score of the findings whose
segmented voxels lie on the slice, and (nearly) 0 where none does. That is the question the
student's slice label asks (does this slice show an actionable nodule?), answered with the
teacher's certainty, so its softened form carries what the hard label does not: a 5.5 mm nodule is
almost actionable, a ground-glass nodule with a 3 mm core half so.

The teacher's fold-``i`` model scores the student's fold-``i`` training series (a sliding-window pass
over each whole volume), so neither saw fold ``i``'s validation series. Each series' slice scores
are kept under ``WORK/segment/teacher/<run>/<code>/``, one file per series and preprocessed volume: a
resumed or repeated training does not score again, and neither other segmentation code (a changed
rule for what a finding is) nor another volume reuses them.
"""

from __future__ import annotations

import functools
import io
import json
import tempfile
from pathlib import Path

import numpy as np
import torch

from dicomops import io as dio
from dicomops import stages
from dicomops.config import PreprocessConfig, SegmentConfig
from dicomops.layout import WorkLayout
from dicomops.progress import PROGRESS
from dicomops.segmentation import actionable
from dicomops.segmentation.cv import PREPROCESS_CONFIG_FILE, SEGMENT_CONFIG_FILE, WEIGHTS_FILE
from dicomops.segmentation.data import pad_to
from dicomops.segmentation.model import build_segmenter, for_inference, probability
from dicomops.tracking import registry, runs
from dicomops.training.data import load_volume
from dicomops.training.loop import choose_precision

# The target's floor and ceiling: a slice without a finding is "surely not", not "impossibly",
# so the softened target stays finite (log 1e-3 = -6.9, at T = 3 a probability of 0.09).
TARGET_FLOOR = 1e-3


def is_segmenter(tracking_uri: str, run_id: str) -> bool:
    """Whether run `run_id` logged a segmenter's ``weights/`` (its segment config beside the weights)."""
    client = runs.configure_mlflow(tracking_uri)
    return any(Path(a.path).name == SEGMENT_CONFIG_FILE for a in client.list_artifacts(run_id, registry.WEIGHTS_ARTIFACT))


def load_segmenter(tracking_uri: str, run_id: str) -> tuple[torch.nn.Module, SegmentConfig, PreprocessConfig]:
    """The eval-mode segmenter of run `run_id` (a fold run, or the parent run's final model), with the
    settings it trained with and the preprocessing its images had."""
    client = runs.configure_mlflow(tracking_uri)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(client.download_artifacts(run_id, registry.WEIGHTS_ARTIFACT, tmp))
        cfg = SegmentConfig.model_validate(json.loads((folder / SEGMENT_CONFIG_FILE).read_text()))
        pre = PreprocessConfig.model_validate(json.loads((folder / PREPROCESS_CONFIG_FILE).read_text()))
        model = build_segmenter(cfg)
        model.load_state_dict(torch.load(folder / WEIGHTS_FILE, weights_only=True))
    return model.eval(), cfg, pre


def series_slice_scores(model: torch.nn.Module, image: np.ndarray, cfg: SegmentConfig, level: float, *,
                        prepared: bool = False) -> np.ndarray:
    """The teacher's score of every slice (last axis) of one preprocessed (X, Y, Z) volume; with
    `prepared`, `model` is already its inference form (``model.for_inference``)."""
    padded = pad_to(image, cfg.patch)
    prob = probability(model, padded, cfg, choose_precision(cfg.precision).autocast(), prepared=prepared)
    scores = actionable.slice_scores(actionable.weighed(prob, padded, level, cfg), padded.shape[-1])
    return scores[: image.shape[-1]]


SCORES_MODULES = ("dicomops.segmentation", "dicomops.training.loop", "dicomops.training.data")


@functools.cache
def scores_code() -> str:
    """Hash of the code that turns a preprocessed volume into a segmenter's slice scores: the
    segmentation package, the precision it infers in (``training.loop.choose_precision``) and the
    volume's reader (``training.data.load_volume``). What the cached scores are keyed by besides the
    run; the segment stage's other modules (MLflow's helpers in ``dicomops.tracking``) change no
    score, and keying by them scored every series again after a change to ``dicomops compare``.

    Read once per process, as the code is: source changed on disk under a running process (an
    editable install being edited) would otherwise key what the old code computes with the new
    code's hash, and a later process would read it as its own (seen 2026-12-05: an export
    scored under a new key with the code it had imported before)."""
    return stages.code_hash(*SCORES_MODULES)


def as_logits(scores: np.ndarray) -> torch.Tensor:
    """(N, 2) logits whose softmax is (1 - p, p) for slice scores p, kept within the floor."""
    p = torch.as_tensor(np.clip(scores, TARGET_FLOOR, 1 - TARGET_FLOOR), dtype=torch.float32)
    return torch.stack([torch.log1p(-p), torch.log(p)], dim=1)


def slice_targets(layout: WorkLayout, tracking_uri: str, run_id: str, series: list[str], z: np.ndarray,
                  label: str) -> torch.Tensor:
    """The (N, 2) teacher logits of the segmenter of run `run_id` for the slices (`series`[i], `z`[i])
    of a slab set; `label` names the teacher in the progress lines."""
    if len(series) != len(z):
        raise ValueError(f"{len(series)} series for {len(z)} slices")
    cache = layout.segment.teacher_scores(run_id, scores_code())
    cache.mkdir(parents=True, exist_ok=True)
    paths = layout.preprocessed.read_index().set_index("SeriesInstanceUID").path
    ids = list(dict.fromkeys(series))
    files = {uid: layout.segment.teacher_score_file(cache, uid, str(paths[uid])) for uid in ids}
    todo = [uid for uid in ids if not files[uid].exists()]
    if todo:
        model, cfg, pre = load_segmenter(tracking_uri, run_id)
        level = actionable.solid_level(pre)
        if level is None:
            raise ValueError("the teacher segmenter was trained on images preprocessed with window 'header': it makes "
                             "no actionable call, so it cannot teach one; distil from a segmenter with a fixed window")
        net = for_inference(model)  # once, not per series (probability's copy takes ~17 ms)
        for done, uid in enumerate(todo, start=1):
            scores = series_slice_scores(net, load_volume(layout.preprocessed.volume(str(paths[uid]))), cfg, level,
                                         prepared=True)
            buffer = io.BytesIO()  # written whole or not at all: a file there is a whole series' scores
            np.save(buffer, scores)
            dio.write_bytes(files[uid], buffer.getvalue())
            if done % 10 == 0 or done == len(todo):
                PROGRESS.info(f"{label}: scored {done}/{len(todo)} series")
    by_series = {uid: np.load(files[uid]) for uid in ids}
    return as_logits(np.array([by_series[s][int(k)] for s, k in zip(series, z, strict=True)]))
