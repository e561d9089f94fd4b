"""The segmenter's training loop, for one process or many under ``torchrun``.

AdamW with a cosine schedule over a fixed number of epochs; an atomic checkpoint after each epoch
(written by rank 0) and resumption from the last complete one. Under ``torch.distributed`` (gloo on
CPU, NCCL on GPU) the model is wrapped in ``DistributedDataParallel`` and each rank takes its share
of every global batch (:func:`dicomops.segmentation.data.rank_positions`), so the run is the same
optimisation as one process with the whole batch, up to floating-point summation order.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from dicomops.config import SegmentConfig
from dicomops.segmentation.data import PatchSet, SegVolume, rank_positions
from dicomops.segmentation.model import build_loss, build_segmenter
from dicomops.training.loop import (
    choose_precision,
    load_checkpoint,
    save_checkpoint,
    seed_everything,
)

EpochLogger = Callable[[int, dict[str, float]], None]


@dataclass
class SegFit:
    model: torch.nn.Module
    epochs_run: int
    resumed_from: int
    history: list[dict[str, float]] = field(default_factory=list)


def world() -> tuple[int, int]:
    """(rank, world size): (0, 1) outside ``torch.distributed``."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def fit(volumes: list[SegVolume], cfg: SegmentConfig, checkpoint: Path, *, seed: int,
        epochs: int | None = None, log: EpochLogger | None = None, stop_after: int | None = None,
        num_workers: int = 0) -> SegFit:
    """Train a fresh segmenter (or resume the one in `checkpoint`) on patches of `volumes`.

    `stop_after` ends the call after that many epochs of this call (a simulated interruption, for
    tests); the checkpoint lets the next call continue.
    """
    from monai.data import ThreadDataLoader

    rank, size = world()
    seed_everything(seed)
    precision = choose_precision(cfg.precision)
    device = precision.device if size == 1 or precision.device.type == "cpu" else \
        torch.device("cuda", rank % torch.cuda.device_count())
    # NDHWC (channels-last-3d) weights and batches while training: oneDNN's 3-D convolutions train a
    # step of 8 patches in 40 ms instead of 64 on a Zen 4 in bfloat16 (alternated in one process).
    # Inference gains nothing from it (20 ms per 16 windows either way), so the model is returned
    # in the default layout, and checkpoints hold the same values in either.
    model = build_segmenter(cfg).to(device)
    model.to(memory_format=torch.channels_last_3d)  # type: ignore[call-overload]
    # foreach: the same updates bit for bit as the per-tensor loop torch picks on CPU, 1.86 ms a step instead of 2.10
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay,
                                  foreach=True)
    total = epochs or cfg.epochs
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
    start, history = 0, []
    state = load_checkpoint(checkpoint)
    if state is not None:
        model.load_state_dict(state["model"])  # type: ignore[arg-type]
        optimizer.load_state_dict(state["optimizer"])  # type: ignore[arg-type]
        scheduler.load_state_dict(state["scheduler"])  # type: ignore[arg-type]
        start = int(state["epoch"])  # type: ignore[call-overload]
        history = list(state["history"])  # type: ignore[call-overload]
    resumed_from = start
    net: torch.nn.Module = model
    if size > 1:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    criterion = build_loss(cfg)
    scaler = torch.amp.GradScaler(device.type, enabled=precision.autocast_dtype == torch.float16)
    patches = PatchSet(volumes, cfg.patch, cfg.positive_share, cfg.patches_per_epoch, seed, cfg.thick_slice_share,
                       cfg.balance_nodules, cfg.scale_share, cfg.scale_range)
    positions = rank_positions(cfg.patches_per_epoch, cfg.batch_size, rank, size)
    epoch = start
    for epoch in range(start + 1, total + 1):
        patches.set_epoch(epoch)
        # MONAI's ThreadDataLoader cuts the next batch in a thread while this one trains, with the
        # same batches: data wait 7-8 % of step time in a fresh clone's make run instead of 11-15 %;
        # 4 epochs of the demo's fold 0 alone took 11.3-12.2 s instead of 12.0-12.7 s, the same loss.
        loader = ThreadDataLoader(patches,  # type: ignore[arg-type]  # typed for MONAI's Dataset; any torch one works
                                  buffer_size=2, batch_size=cfg.batch_size // size, sampler=positions,
                                  num_workers=num_workers, multiprocessing_context="fork" if num_workers else None,
                                  pin_memory=device.type == "cuda")
        net.train()
        wait = step = 0.0
        seen, loss_sum = 0, 0.0
        tick = time.perf_counter()
        for x, y in loader:
            got = time.perf_counter()
            wait += got - tick
            x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last_3d)
            y = y.to(device, non_blocking=True)
            optimizer.zero_grad(set_to_none=True)
            with precision.autocast():
                logits = net(x)
            loss = criterion(logits.float(), y)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            loss_sum += float(loss.detach()) * len(y)
            seen += len(y)
            tick = time.perf_counter()
            step += tick - got
        scheduler.step()
        totals = torch.tensor([loss_sum, float(seen)], dtype=torch.float64)
        if size > 1:
            dist.all_reduce(totals)
        metrics = {"train_loss": float(totals[0]) / max(float(totals[1]), 1.0),
                   "data_wait_share": wait / max(wait + step, 1e-9),
                   "samples_per_second": float(totals[1]) / max(wait + step, 1e-9),
                   "lr": float(scheduler.get_last_lr()[0])}
        history.append({"epoch": float(epoch), **metrics})
        if rank == 0:
            if log:
                log(epoch, metrics)
            save_checkpoint(checkpoint, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                         "scheduler": scheduler.state_dict(), "epoch": epoch, "history": history})
        if size > 1:
            dist.barrier()
        if stop_after is not None and epoch - resumed_from >= stop_after:
            raise InterruptedError(f"stopped after epoch {epoch} as asked")
    model = model.cpu().eval()
    model.to(memory_format=torch.contiguous_format)  # type: ignore[call-overload]
    return SegFit(model, epoch, resumed_from, history)


def mean_history(result: SegFit, key: str) -> float:
    values = [h[key] for h in result.history if key in h]
    return float(np.mean(values)) if values else float("nan")
