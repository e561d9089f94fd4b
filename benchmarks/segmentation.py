"""Segmenter speed and memory: training throughput of our patch pipeline against MONAI's tutorial
``Dataset`` (and ``CacheDataset``) pipeline in the same run, and sliding-window inference per series.

Reproduce: ``.venv/bin/python benchmarks/segmentation.py --work work`` (after ``make run``; ``--quick``
is a smoke check of under two minutes).

1. Training: the real model, loss, AdamW and autocast of ``dicomops.segmentation.loop`` for
   ``--steps`` steps (after warm-up steps that are not timed) on patches of ``--volumes`` volumes,
   with DataLoader workers 0 and 1, fed by
   - ours: ``PatchSet`` over ``SegVolume``s read once per process, foreground/background indices
     precomputed, numpy flips and turns;
   - MONAI ``Dataset``, the tutorial form: a list of dicts of file paths, each sample loads its npz,
     ``RandCropByPosNegLabeld`` scans the whole volume for its indices, ``RandFlipd`` ×3,
     ``RandRotate90d``, ``EnsureTyped``;
   - MONAI ``CacheDataset`` (cache rate 1): load and ``FgBgToIndicesd`` cached, the random part as above.
   Every pipeline cuts patches from the same sequence of volumes; the wait is the time the loop
   spends blocked on the DataLoader, its share is of the timed steps' total.
2. Inference: ``probability`` (Gaussian sliding windows of ``roi``) on whole volumes in the automatic
   precision against float32 (not with ``--quick``), seconds per series after one warm-up volume; its
   inference form (``for_inference``: sub-pixel up-sampling where it pays) against the network as
   trained, in the same precision; its crop (the lungs' box, ``data.lung_box``) against the body's
   box it replaced; and the peak RSS of a fresh spawned process that builds the
   model, reads one volume and scores it (targets: ≤ 10 s per series, ≤ 3 GB).
3. The actionable call (``dicomops.segmentation.actionable``) on fold 0's out-of-fold probability
   maps (after ``dicomops segment``): what it adds per series (the findings with their solid parts,
   every candidate's too, the score) against what the SR needed before it, ``findings`` alone.
4. Reading a volume: the lung border (``lung_border``, the hard negatives' centres), by numpy's
   shifted ORs and ANDs against SciPy's ``minimum_filter``/``maximum_filter`` on the same volumes,
   checked voxel for voxel, alternated per volume.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import tempfile
import time
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import torch
from monai.data import CacheDataset, Dataset, MetaTensor
from monai.data import DataLoader as MonaiLoader
from monai.transforms import (
    Compose,
    EnsureChannelFirstd,
    EnsureTyped,
    FgBgToIndicesd,
    MapTransform,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandRotate90d,
    SpatialPadd,
)
from torch.utils.data import DataLoader

from dicomops.config import PreprocessConfig, SegmentConfig
from dicomops.layout import WorkLayout
from dicomops.segmentation import actionable, data
from dicomops.segmentation import model as segmentation_model
from dicomops.segmentation.cv import PREDICTION_SCALE
from dicomops.segmentation.data import (
    BODY_LEVEL,
    PatchSet,
    SegVolume,
    forget_volumes,
    load_volumes,
    series_table,
)
from dicomops.segmentation.metrics import findings
from dicomops.segmentation.model import (
    build_loss,
    build_segmenter,
    crop_margin,
    probability,
    window_probability,
)
from dicomops.training.loop import choose_precision, seed_everything

KEYS = ["image", "label"]
OLD_BODY_MARGIN = 8  # the segmenter's crop before the lungs' box
THREADS = 2


class LoadNpzd(MapTransform):
    """The tutorial's ``LoadImaged`` for our cache: the npz's image (float32) and its mask as a binary
    label, both (X, Y, Z); ``LoadImaged`` has no reader for ``.npz``."""

    def __call__(self, data: dict[str, Any]) -> dict[str, Any]:
        d = dict(data)
        with np.load(d["image"]) as npz:
            d["image"] = npz["image"].astype(np.float32)
            d["label"] = (npz["mask"] > 0).astype(np.float32)
        return d


def _random_part(cfg: SegmentConfig, indices: bool) -> list[Any]:
    extra = {"fg_indices_key": "label_fg_indices", "bg_indices_key": "label_bg_indices"} if indices else {}
    return [RandCropByPosNegLabeld(keys=KEYS, label_key="label", spatial_size=cfg.patch, pos=cfg.positive_share,
                                   neg=1.0 - cfg.positive_share, num_samples=1, image_key="image",
                                   image_threshold=BODY_LEVEL, allow_smaller=False, **extra),
            RandFlipd(keys=KEYS, prob=0.5, spatial_axis=0),
            RandFlipd(keys=KEYS, prob=0.5, spatial_axis=1),
            RandFlipd(keys=KEYS, prob=0.5, spatial_axis=2),
            RandRotate90d(keys=KEYS, prob=0.5, max_k=3, spatial_axes=(0, 1)),
            EnsureTyped(keys=KEYS)]


def monai_pipeline(cfg: SegmentConfig, cached: bool) -> Compose:
    """The tutorial's transforms; with `cached`, the deterministic head ends in ``FgBgToIndicesd``."""
    head = [LoadNpzd(keys=KEYS), EnsureChannelFirstd(keys=KEYS, channel_dim="no_channel"),
            SpatialPadd(keys=KEYS, spatial_size=cfg.patch, mode="edge")]
    if cached:
        head.append(FgBgToIndicesd(keys="label", image_key="image", image_threshold=BODY_LEVEL))
    pipeline = Compose(head + _random_part(cfg, indices=cached))
    pipeline.set_random_state(seed=0)
    return pipeline


def _plain(x: torch.Tensor) -> torch.Tensor:
    return x.as_tensor() if isinstance(x, MetaTensor) else x


def train_steps(batches: Iterable[Any], cfg: SegmentConfig, steps: int, warmup: int) -> dict[str, float]:
    """What ``loop.fit`` does per batch, timed over `steps` batches after `warmup` untimed ones."""
    seed_everything(0)
    precision = choose_precision(cfg.precision)
    model = build_segmenter(cfg).to(precision.device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    criterion = build_loss(cfg)
    wait = step = 0.0
    seen = 0
    tick = time.perf_counter()
    for done, batch in enumerate(batches, start=1):
        got = time.perf_counter()
        x, y = (batch["image"], batch["label"]) if isinstance(batch, dict) else batch
        x, y = _plain(x).to(precision.device), _plain(y).to(precision.device)
        optimizer.zero_grad(set_to_none=True)
        with precision.autocast():
            logits = model(x)
        loss = criterion(logits.float(), y.float())
        loss.backward()
        optimizer.step()
        float(loss.detach())
        now = time.perf_counter()
        if done > warmup:
            wait += got - tick
            step += now - got
            seen += len(y)
        tick = now
        if done == warmup + steps:
            break
    total = max(wait + step, 1e-9)
    return {"patches_per_second": seen / total, "data_wait_share": wait / total,
            "wait_per_batch": wait / max(steps, 1), "seconds": total}


def _loader_kwargs(workers: int) -> dict[str, Any]:
    # loop.fit forks its workers; the baselines get the same context
    return {"num_workers": workers, "multiprocessing_context": "fork" if workers else None,
            "persistent_workers": False}


def training(layout: WorkLayout, ids: list[str], cfg: SegmentConfig, steps: int, warmup: int,
             cache: bool) -> list[dict[str, Any]]:
    samples = (steps + warmup) * cfg.batch_size
    rows: list[dict[str, Any]] = []

    start = time.perf_counter()
    volumes = load_volumes(layout, ids, cfg.patch, cfg.border_share)
    ours_load = time.perf_counter() - start
    patches = PatchSet(volumes, cfg.patch, cfg.positive_share, samples, seed=cfg.seed)
    plan = [int(i) for i in patches.plan]  # every pipeline cuts from this sequence of volumes
    print(f"  ours: {len(volumes)} volumes read with indices in {ours_load:.1f} s")
    for workers in (0, 1):
        loader = DataLoader(patches, batch_size=cfg.batch_size, shuffle=False, **_loader_kwargs(workers))
        rows.append({"pipeline": "ours PatchSet", "workers": workers, **train_steps(loader, cfg, steps, warmup)})
        print(f"  done: ours, {workers} workers")
    del volumes, patches
    forget_volumes()

    table = series_table(layout).set_index("SeriesInstanceUID")
    files = [{"image": str(layout.preprocessed.volume(str(table.loc[uid].path))),
              "label": str(layout.preprocessed.volume(str(table.loc[uid].path)))} for uid in ids]
    plain = Dataset(files, transform=monai_pipeline(cfg, cached=False))
    for workers in (0, 1):
        loader = MonaiLoader(plain, batch_size=cfg.batch_size, sampler=plan, **_loader_kwargs(workers))
        rows.append({"pipeline": "MONAI Dataset", "workers": workers, **train_steps(loader, cfg, steps, warmup)})
        print(f"  done: MONAI Dataset, {workers} workers")

    if cache:
        start = time.perf_counter()
        cached = CacheDataset(files, transform=monai_pipeline(cfg, cached=True), cache_rate=1.0, num_workers=1,
                              progress=False)
        build = time.perf_counter() - start
        print(f"  MONAI CacheDataset: {len(files)} volumes cached (load + FgBgToIndicesd) in {build:.1f} s")
        for workers in (0, 1):
            loader = MonaiLoader(cached, batch_size=cfg.batch_size, sampler=plan, **_loader_kwargs(workers))
            rows.append({"pipeline": "MONAI CacheDataset", "workers": workers,
                         **train_steps(loader, cfg, steps, warmup)})
            print(f"  done: MONAI CacheDataset, {workers} workers")
        del cached
    return rows


def print_training(rows: list[dict[str, Any]]) -> None:
    by = {(r["pipeline"], r["workers"]): r for r in rows}
    has_cache = any(r["pipeline"] == "MONAI CacheDataset" for r in rows)
    header = (f"{'pipeline':20s} {'workers':>7s} {'patches/s':>9s} {'data wait':>9s} {'wait s/batch':>12s} "
              f"{'ours vs Dataset':>15s}")
    print(header + (f" {'ours vs Cache':>13s}" if has_cache else ""))
    for r in rows:
        ours = by[("ours PatchSet", r["workers"])]["patches_per_second"]
        line = (f"{r['pipeline']:20s} {r['workers']:7d} {r['patches_per_second']:9.2f} {r['data_wait_share']:9.1%} "
                f"{r['wait_per_batch']:12.3f}")
        if r["pipeline"] == "ours PatchSet":  # the ratios belong to our rows, each against the same workers
            line += f" {ours / by[('MONAI Dataset', r['workers'])]['patches_per_second']:14.2f}x"
            if has_cache:
                line += f" {ours / by[('MONAI CacheDataset', r['workers'])]['patches_per_second']:12.2f}x"
        print(line)


def peak_rss_gb() -> float:
    """This process's peak resident memory in GB: ``VmHWM``, which starts afresh at ``exec``, where
    ``ru_maxrss`` keeps the forking parent's resident size (a spawned child of a big parent would report
    the parent)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def peak_child(work: Path, uid: str, weights: Path, setting: str) -> dict[str, float]:
    """In a fresh process: build the model, read one volume, score it; RSS figures in GB."""
    torch.set_num_threads(THREADS)
    cfg = SegmentConfig(precision=setting)  # type: ignore[arg-type]
    model = build_segmenter(cfg)
    model.load_state_dict(torch.load(weights, weights_only=True))
    volume = load_volumes(WorkLayout(work), [uid], (1, 1, 1))[0]
    before = peak_rss_gb()
    start = time.perf_counter()
    probability(model, volume.image, cfg, choose_precision(setting).autocast())
    seconds = time.perf_counter() - start
    return {"setup_gb": before, "peak_gb": peak_rss_gb(),
            "seconds": seconds}


def seconds_per_series(volumes: list[SegVolume], score: Any) -> list[float]:
    """Wall seconds of `score` (a function of the image) on each volume."""
    seconds = []
    for v in volumes:
        start = time.perf_counter()
        score(v.image)
        seconds.append(time.perf_counter() - start)
    return seconds


def inference(layout: WorkLayout, ids: list[str], cfg: SegmentConfig, tmp: Path, reference: bool) -> None:
    seed_everything(0)
    model = build_segmenter(cfg).eval()  # weights do not change the arithmetic
    weights = tmp / "segmenter.pt"
    torch.save(model.state_dict(), weights)
    volumes = load_volumes(layout, ids, (1, 1, 1))
    shapes = sorted({v.shape for v in volumes})
    print(f"\n2. sliding-window inference on {len(volumes)} whole volumes {shapes}, roi {cfg.roi}, "
          f"overlap {cfg.overlap}, {THREADS} threads")
    times = {}
    for setting in ("fp32", cfg.precision) if reference else (cfg.precision,):
        precision = choose_precision(setting)
        probability(model, volumes[0].image, cfg, precision.autocast())  # warm-up: oneDNN builds its kernels
        times[setting] = seconds_per_series(volumes, lambda image, p=precision: probability(model, image, cfg, p.autocast()))
    # The baseline of the inference form: the network as trained, MONAI's UNet with its
    # transposed convolutions, through the same sliding windows, in the same precision.
    precision = choose_precision(cfg.precision)

    def as_trained(image: np.ndarray) -> np.ndarray:
        with torch.inference_mode(), precision.autocast():
            return window_probability(model, image, cfg)

    plain = seconds_per_series(volumes, as_trained)
    print(f"inference form (sub-pixel up-sampling where it pays, {cfg.precision}): {np.mean(times[cfg.precision]):.2f} "
          f"s per series against {np.mean(plain):.2f} s for the network as trained: "
          f"{np.mean(plain) / np.mean(times[cfg.precision]):.2f}x")
    # The baseline of the crop: the same inference form over the body's box grown by 8 voxels, as
    # before 2026-12-05.
    def body_box(image: np.ndarray, margin: int, minimum: tuple[int, int, int]) -> tuple[slice, slice, slice]:
        return data.body_box(image, OLD_BODY_MARGIN, minimum)

    with mock.patch.object(segmentation_model, "lung_box", body_box):
        body = seconds_per_series(volumes, lambda image: probability(model, image, cfg, precision.autocast()))
    share = np.median([np.prod([s.stop - s.start for s in data.lung_box(v.image, crop_margin(cfg), cfg.roi)])
                       / np.prod([s.stop - s.start for s in body_box(v.image, 0, cfg.roi)]) for v in volumes])
    print(f"over the lungs' box ({share:.0%} of the body's box, median): {np.mean(times[cfg.precision]):.2f} s per "
          f"series against {np.mean(body):.2f} s over the body's box: {np.mean(body) / np.mean(times[cfg.precision]):.2f}x")
    base = float(np.mean(times.get("fp32", [np.nan])))
    print(f"{'precision':24s} {'s/series mean':>13s} {'max':>6s} {'speed vs fp32':>13s}")
    for setting, seconds in times.items():
        name = f"{setting} ({choose_precision(setting).name})"
        print(f"{name:24s} {np.mean(seconds):13.2f} {np.max(seconds):6.2f} {base / np.mean(seconds):12.2f}x")
    mean = float(np.mean(times[cfg.precision]))
    print(f"{cfg.precision}: {mean:.2f} s per series (target <= 10 s): {'ok' if mean <= 10.0 else 'MISSED'}")
    largest = max(volumes, key=lambda v: int(np.prod(v.shape)))
    del volumes
    forget_volumes()
    with mp.get_context("spawn").Pool(1) as pool:
        peak = pool.apply(peak_child, (layout.root, largest.series, weights, cfg.precision))
    print(f"fresh process, largest volume {largest.shape}, {cfg.precision}, cold: peak RSS {peak['setup_gb']:.2f} GB "
          f"with model + volume, {peak['peak_gb']:.2f} GB after inference ({peak['seconds']:.2f} s) "
          f"(target <= 3 GB): {'ok' if peak['peak_gb'] <= 3.0 else 'MISSED'}")


def actionable_cost(layout: WorkLayout, cfg: SegmentConfig, count: int) -> None:
    maps = sorted((layout.segment.fold(0) / "probabilities").glob("*.npz"))[:count]
    if not maps:
        print("\n3. actionable call: skipped, no out-of-fold probability maps (run 'dicomops segment' first)")
        return
    volumes = load_volumes(layout, [p.stem for p in maps], cfg.patch, cfg.border_share)
    level = actionable.solid_level(PreprocessConfig())
    plain, call = [], []
    for path, v in zip(maps, volumes, strict=True):
        with np.load(path) as npz:
            prob = npz["prob"].astype(np.float32) / PREDICTION_SCALE
        image = v.image.astype(np.float32)
        start = time.perf_counter()
        findings(prob, threshold=cfg.threshold, candidate_threshold=cfg.candidate_threshold,
                 finding_threshold=cfg.finding_threshold)
        plain.append(time.perf_counter() - start)
        start = time.perf_counter()
        findings(prob, threshold=cfg.threshold, candidate_threshold=cfg.candidate_threshold,
                 finding_threshold=cfg.finding_threshold, image=image, solid_level=level)
        every, _ = findings(prob, threshold=cfg.threshold, candidate_threshold=cfg.candidate_threshold,
                            finding_threshold=cfg.candidate_threshold, image=image, solid_level=level)
        actionable.series_score(every)
        call.append(time.perf_counter() - start)
    print(f"\n3. actionable call on {len(maps)} out-of-fold maps of fold 0: findings alone "
          f"{1000 * np.mean(plain):.0f} ms per series, with solid parts and the call {1000 * np.mean(call):.0f} ms "
          f"({np.mean(call) / np.mean(plain):.2f}x)")


def scipy_cube(mask: np.ndarray, size: int, grow: bool) -> np.ndarray:
    """``data._cube`` by SciPy's filters (the lung border's form until 2026-12-04)."""
    from scipy import ndimage

    return (ndimage.maximum_filter if grow else ndimage.minimum_filter)(mask.view(np.uint8), size).view(bool)


def border_cost(layout: WorkLayout, ids: list[str], cfg: SegmentConfig) -> None:
    table = series_table(layout).set_index("SeriesInstanceUID")
    ours, scipy = [], []
    for uid in ids:
        with np.load(layout.preprocessed.volume(str(table.loc[uid].path))) as npz:
            image = data.pad_to(npz["image"], cfg.patch)
        body = image > BODY_LEVEL
        start = time.perf_counter()
        mine = data.lung_border(image, body)
        ours.append(time.perf_counter() - start)
        with mock.patch.object(data, "_cube", scipy_cube):  # the same band, only the filters differ
            start = time.perf_counter()
            theirs = data.lung_border(image, body)
            scipy.append(time.perf_counter() - start)
        if not np.array_equal(mine, theirs):
            raise AssertionError(f"series {uid}: lung_border differs from SciPy's filters")
    print(f"\n4. lung border of {len(ids)} volumes (the same voxels): numpy shifts {1000 * np.median(ours):.0f} ms, "
          f"SciPy filters {1000 * np.median(scipy):.0f} ms per volume (median; {np.median(scipy) / np.median(ours):.2f}x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("work"), help="A work directory with preprocessed data.")
    parser.add_argument("--volumes", type=int, default=24, help="Training volumes patches are cut from.")
    parser.add_argument("--steps", type=int, default=30, help="Timed optimiser steps per pipeline.")
    parser.add_argument("--inference-volumes", type=int, default=5)
    parser.add_argument("--no-cache", action="store_true", help="Skip the MONAI CacheDataset reference.")
    parser.add_argument("--quick", action="store_true", help="Tiny numbers: a smoke check of under two minutes.")
    args = parser.parse_args()
    volumes, steps, warmup, n_inference = args.volumes, args.steps, 3, args.inference_volumes
    if args.quick:
        volumes, steps, warmup, n_inference = min(volumes, 2), min(steps, 2), 1, min(n_inference, 1)
    torch.set_num_threads(THREADS)
    # series without nodules have no foreground: MONAI warns per crop and then takes background ones
    warnings.filterwarnings("ignore", message="Num foregrounds 0")
    layout = WorkLayout(args.work)
    if not layout.preprocessed.index.exists():
        parser.error(f"{layout.preprocessed.index} is missing: run 'make run' or pass --work with preprocessed data")
    if layout.folds_file.exists():
        folds = layout.read_folds()
        train_ids, other_ids = list(folds.train(0)), list(folds.val(0))
    else:
        ids = sorted(layout.labelled_series().SeriesInstanceUID)
        train_ids, other_ids = ids[: len(ids) * 3 // 4], ids[len(ids) * 3 // 4:]
    cfg = SegmentConfig()
    load = os.getloadavg()[0]
    print(f"1. training on {min(volumes, len(train_ids))} volumes, patch {cfg.patch}, batch {cfg.batch_size}, "
          f"{steps} timed steps after {warmup}, {choose_precision(cfg.precision).name}, {THREADS} threads, "
          f"{os.cpu_count()} cores, load average {load:.2f} at start")
    rows = training(layout, train_ids[:volumes], cfg, steps, warmup, cache=not args.no_cache)
    print_training(rows)
    with tempfile.TemporaryDirectory() as tmp:
        inference(layout, other_ids[:n_inference], cfg, Path(tmp), reference=not args.quick)
    actionable_cost(layout, cfg, n_inference if args.quick else 30)
    border_cost(layout, train_ids[: 2 if args.quick else 12], cfg)
    print(f"load average {os.getloadavg()[0]:.2f} at end (above {os.cpu_count()} means other work shared the cores)")


if __name__ == "__main__":
    main()
