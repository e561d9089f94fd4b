"""The training loop: AdamW, cosine schedule, class weights, an exponential moving average of the
weights, early stopping on validation AUC, an atomic checkpoint every epoch, and resumption from the
last complete one."""

from __future__ import annotations

import logging
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from torch.utils.data import DataLoader

from dicomops.config import TrainConfig
from dicomops.training.data import AugmentedSlabs, SlabSet
from dicomops.training.model import (
    VOLUME_ARCHITECTURES,
    NoduleMapHead,
    build_loss,
    build_model,
    channels_last,
    class_weights,
)

EpochLogger = Callable[[int, dict[str, float]], None]
logger = logging.getLogger(__name__)


@dataclass
class FitResult:
    model: torch.nn.Module
    best_epoch: int
    best_auc: float
    epochs_run: int
    resumed_from: int  # 0 for a fresh start, else the epoch the checkpoint had completed
    history: list[dict[str, float]] = field(default_factory=list)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass(frozen=True)
class Precision:
    """Where and in which precision the loop runs."""

    device: torch.device
    autocast_dtype: torch.dtype | None  # None: full float32

    @property
    def name(self) -> str:
        kind = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.autocast_dtype]
        return f"{self.device.type}-{kind}"

    def autocast(self) -> torch.autocast:
        return torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.float32,
                              enabled=self.autocast_dtype is not None)

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """On the device, channels-last (oneDNN and cuDNN convolutions run faster in NHWC)."""
        return x.to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last)


def choose_precision(setting: str) -> Precision:
    """CUDA with mixed precision when present; on CPU, bfloat16 autocast where the CPU has native
    bf16 matrix units (AMX or AVX-512 BF16), else float32. ``fp32`` forces full precision."""
    if torch.cuda.is_available():
        device = torch.device("cuda")
        dtype = None if setting == "fp32" else (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
        return Precision(device, dtype)
    native_bf16 = torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()
    if setting == "bf16" or (setting == "auto" and native_bf16):
        return Precision(torch.device("cpu"), torch.bfloat16)
    return Precision(torch.device("cpu"), None)


def loader_workers(cfg: TrainConfig, precision: Precision) -> int:
    """``cfg.num_workers``, or unset: none on the CPU (augmenting beside the step only takes cores from
    it), one per spare core, at most four, on CUDA (they augment while the GPU computes)."""
    if cfg.num_workers is not None:
        return cfg.num_workers
    return 0 if precision.device.type == "cpu" else max(1, min(4, (os.cpu_count() or 2) - 1))


def train_precision(cfg: TrainConfig) -> Precision:
    """The precision the slab classifier's loop runs `cfg` in: :func:`choose_precision`'s, except
    that ``auto`` keeps a 3-D network (``model.VOLUME_ARCHITECTURES``) in float32 on CPU; ``bf16``
    still forces bfloat16. In bfloat16 autocast the 3-D teacher's one-epoch training gave a NaN
    loss or NaN scores in 2 of 3 full test-suite runs on a Zen 5 EPYC with AVX-512 BF16 (never in
    over 50 trainings of it alone), while the 2-D networks and the segmenter's own loop never did."""
    precision = choose_precision(cfg.precision)
    if cfg.precision == "auto" and cfg.architecture in VOLUME_ARCHITECTURES and precision.device.type == "cpu":
        return Precision(precision.device, None)
    return precision


def generator_states(loader: torch.Generator, device: torch.device) -> dict[str, Any]:
    """Every generator the loop draws from, for the checkpoint: the loader's (shuffle order, and the
    workers' base seed), torch's global one (augmentation seeds, dropout), CUDA's, numpy's and
    Python's. As tensors and plain lists, which ``weights_only`` loading accepts."""
    numpy_state: Any = np.random.get_state(legacy=True)  # a tuple: legacy
    kind, keys, pos, has_gauss, cached = numpy_state
    version, internal, gauss = random.getstate()
    states: dict[str, Any] = {
        "loader": loader.get_state(), "torch": torch.get_rng_state(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "python": [version, list(internal), gauss]}
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    return states


def restore_generators(states: dict[str, Any], loader: torch.Generator, device: torch.device) -> None:
    """Put back what :func:`generator_states` saved: the resumed epochs draw what an uninterrupted run would."""
    loader.set_state(states["loader"])
    torch.set_rng_state(states["torch"])
    kind, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in states and device.type == "cuda":
        torch.cuda.set_rng_state(states["cuda"], device)


def save_checkpoint(path: Path, state: dict[str, object]) -> None:
    """Write atomically: a reader sees the previous checkpoint or this one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict[str, object] | None:
    if not path.exists():
        return None
    state: dict[str, object] = torch.load(path, weights_only=True)
    return state


def _per_slab(model: torch.nn.Module, x: torch.Tensor, batch_size: int, precision: Precision | None,
              read: Callable[[torch.Tensor], torch.Tensor]) -> np.ndarray:
    """`read` of the model's float32 logits of each batch of slabs, in eval mode without gradients
    (in `precision`, default float32 on the model's device), as one array."""
    precision = precision or Precision(next(model.parameters()).device, None)
    model.eval()
    out = []
    with torch.no_grad(), precision.autocast():
        for i in range(0, len(x), batch_size):
            out.append(read(model(precision.prepare(x[i : i + batch_size].float())).float()).cpu())
    return torch.cat(out).numpy() if out else np.zeros(0)


def predict(model: torch.nn.Module, x: torch.Tensor, batch_size: int = 128,
            precision: Precision | None = None) -> np.ndarray:
    """Probability of the positive class for each slab (in `precision`, default float32 on CPU)."""
    return _per_slab(model, x, batch_size, precision, lambda logits: torch.softmax(logits, dim=1)[:, 1])


def predict_log_odds(model: torch.nn.Module, x: torch.Tensor, batch_size: int = 128,
                     precision: Precision | None = None) -> np.ndarray:
    """The positive class's log-odds for each slab, the difference of its two logits, in float32.

    They rank slabs as :func:`predict`'s probabilities do, except where those round to 1 (or 0):
    float32's softmax does beyond a difference of about 17, and a model whose every validation slab
    sits there (fold 0 of the demo at epoch 4: log-odds 14 to 45) scores a slice AUC of 0.50 on
    probabilities and 0.83 on log-odds."""
    return _per_slab(model, x, batch_size, precision, lambda logits: logits[:, 1] - logits[:, 0])


def recompute_batch_norm(model: torch.nn.Module, x: torch.Tensor, precision: Precision, batch_size: int) -> None:
    """Batch norm's running statistics, recomputed over the slabs `x` with the current weights
    (torch's ``update_bn``: "precise BN", a plain average instead of the training's momentum 0.1).

    The running statistics that a training step leaves are those of its last few augmented batches.
    On the demo they moved every validation slab's log-odds by as much as +26 from one epoch to the
    next (median 8.0, -2.4, 1.1, 26.3, -2.3, -0.1 over fold 0's six epochs; -0.5 to -2.3 recomputed)."""
    if not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return
    batches = (precision.prepare(x[i : i + batch_size].float()) for i in range(0, len(x), batch_size))
    with precision.autocast():
        torch.optim.swa_utils.update_bn(batches, model)


Tensors = list[torch.Tensor] | tuple[torch.Tensor, ...]


def ema_update(decay: float) -> Callable[[Tensors, Tensors, torch.Tensor | int], None]:
    """`AveragedModel`'s ``multi_avg_fn`` for an exponential moving average with warm-up.

    The weight of the average is ``min(decay, (1 + n) / (10 + n))`` after n updates (TensorFlow's
    ``ExponentialMovingAverage`` with ``num_updates``), so a short training is not dominated by its
    first steps' weights. Integer buffers (batch norm's counters) are copied, not averaged.
    """

    @torch.no_grad()
    def update(averaged: Tensors, current: Tensors, n: torch.Tensor | int) -> None:
        if not torch.is_floating_point(averaged[0]):
            torch._foreach_copy_(averaged, current)
            return
        steps = float(n)
        torch._foreach_lerp_(averaged, current, 1.0 - min(decay, (1.0 + steps) / (10.0 + steps)))

    return update


def _diverged(what: str, epoch: int, precision: Precision) -> str:
    return (f"training diverged at epoch {epoch} ({precision.name}): {what}. Lower train.learning_rate, or set "
            "train.precision: fp32 if it ran in bf16; nothing of this training was registered.")


def _aux_head(model: torch.nn.Module, train: SlabSet, cfg: TrainConfig, precision: Precision) -> NoduleMapHead | None:
    """With ``cfg.aux_mask_weight``, the auxiliary localisation head on `model`."""
    if cfg.aux_mask_weight <= 0:
        return None
    if train.masks is None:
        raise ValueError("train.aux_mask_weight needs the slabs' nodule masks: build the training set with "
                         "build_slab_set(..., masks=True)")
    return NoduleMapHead(model, actionable_only=cfg.aux_mask_target == "actionable").to(precision.device)


def fit(train: SlabSet, val: SlabSet | None, cfg: TrainConfig, checkpoint: Path, *, seed: int,
        epochs: int | None = None, log: EpochLogger | None = None,
        stop_after: int | None = None, teacher: torch.Tensor | None = None) -> FitResult:
    """Train a fresh model (or resume the one in `checkpoint`) on `train`.

    With `teacher`, (N, 2) logits of a teacher for the slabs of `train`, the loss is
    :func:`dicomops.training.distill.distillation_loss` with the config's alpha and temperature
    (class-weighted cross-entropy as its label term, whatever ``cfg.loss`` says).

    With `val`, stops early when the validation slice AUC (of the slabs' log-odds,
    :func:`predict_log_odds`) has not improved for ``cfg.patience`` epochs and returns the best
    epoch's weights; without, trains ``epochs`` epochs. With ``cfg.precise_bn``, batch norm's
    statistics are recomputed before each epoch's validation (:func:`recompute_batch_norm`). With
    ``cfg.ema_decay`` above 0 the weights validated and returned are the moving average of every
    step's weights (buffers included), not the last step's. With ``cfg.aux_mask_weight`` above 0,
    a :class:`NoduleMapHead` learns the centre slices' nodule maps (``train.masks``) beside the label,
    its loss added at that weight; it is kept in the checkpoint and dropped from the returned model.
    `stop_after` ends the call after that many epochs of this call (a simulated interruption, for
    tests); the checkpoint then lets the next call continue.
    """
    seed_everything(seed)
    precision = train_precision(cfg)
    model = channels_last(build_model(cfg, train.x.shape[1]).to(precision.device), cfg.architecture)
    criterion = build_loss(cfg, train.y).to(precision.device)
    # foreach: the same updates bit for bit as the per-tensor loop torch picks on CPU (0.97 ms a step instead of 1.41)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay,
                                  foreach=True)
    total = epochs or cfg.epochs
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
    ema = (torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=ema_update(cfg.ema_decay), use_buffers=True)
           if cfg.ema_decay > 0 else None)
    # After the average's copy of the model, which must not carry the head's hooks.
    head = _aux_head(model, train, cfg, precision)
    if head is not None:
        optimizer.add_param_group({"params": list(head.parameters())})
    start, best_auc, best_epoch, bad, history = 0, -1.0, 0, 0, []
    best_state = None
    state = load_checkpoint(checkpoint)
    if state is not None:
        model.load_state_dict(state["model"])  # type: ignore[arg-type]
        if head is not None:
            if "aux_head" not in state:
                raise ValueError(f"{checkpoint} was written without train.aux_mask_weight; delete it to train afresh, "
                                 "or resume with the settings it was written with")
            head.load_state_dict(state["aux_head"])  # type: ignore[arg-type]
        optimizer.load_state_dict(state["optimizer"])  # type: ignore[arg-type]
        scheduler.load_state_dict(state["scheduler"])  # type: ignore[arg-type]
        if ema is not None:
            if "ema" not in state:
                raise ValueError(f"{checkpoint} was written without train.ema_decay; delete it to train afresh, "
                                 "or resume with the settings it was written with")
            ema.load_state_dict(state["ema"])  # type: ignore[arg-type]
        start = int(state["epoch"])  # type: ignore[call-overload]
        best_auc, best_epoch, bad = float(state["best_auc"]), int(state["best_epoch"]), int(state["bad"])  # type: ignore[arg-type, call-overload]
        history = list(state["history"])  # type: ignore[call-overload]
        best_state = state.get("best_model")
    resumed_from = start
    # Loss scaling is needed for float16 only (CUDA without bf16); a disabled scaler is a no-op.
    scaler = torch.amp.GradScaler(precision.device.type, enabled=precision.autocast_dtype == torch.float16)
    generator = torch.Generator().manual_seed(seed)
    if state is not None and "generators" in state:
        restore_generators(state["generators"], generator, precision.device)  # type: ignore[arg-type]
    elif state is not None:
        # A checkpoint from before the generators were kept: it resumes, on another batch order.
        torch.set_rng_state(state["rng"])  # type: ignore[arg-type]
        generator.manual_seed(seed + start)
        logger.warning("%s holds no generator states (written by an older dicomops): training resumes from "
                       "epoch %d, but its result will differ from an uninterrupted run's", checkpoint, start)
    # A fold that stopped early, killed before its state said done, must not train on when resumed.
    stopped = state is not None and val is not None and bad >= cfg.patience
    if teacher is not None and len(teacher) != len(train.y):
        raise ValueError(f"{len(teacher)} teacher outputs for {len(train.y)} training slabs")
    distil = None
    if teacher is not None:
        from dicomops.training.distill import distillation_loss

        weight = class_weights(train.y).to(precision.device)
        distil = partial(distillation_loss, alpha=cfg.distill_alpha, temperature=cfg.distill_temperature,
                         weight=weight)
    # A fixed subset, drawn from its own generator: the global one's state is the checkpoint's.
    bn_slabs = (train.x[torch.randperm(len(train.y), generator=torch.Generator().manual_seed(seed))[:cfg.precise_bn]]
                if cfg.precise_bn else None)
    dataset = AugmentedSlabs(train, train=True, teacher=teacher, flip_axes=cfg.flip_axes)
    workers = loader_workers(cfg, precision)
    # Not persistent: workers started each epoch take their seeds from `generator`, whose state the
    # checkpoint keeps; persistent ones would carry on from seeds a resumed run cannot restore.
    loader = DataLoader(dataset, batch_size=cfg.batch_size, collate_fn=dataset.collate,
                        shuffle=True, generator=generator, num_workers=workers,
                        persistent_workers=False, drop_last=len(train.y) > cfg.batch_size,
                        multiprocessing_context="fork" if workers > 0 else None,
                        pin_memory=precision.device.type == "cuda")
    epoch = start
    for epoch in range(start + 1, start + 1 if stopped else total + 1):
        model.train()
        if head is not None:
            head.train()
        wait = step = 0.0
        seen, loss_sum = 0, 0.0
        tick = time.perf_counter()
        for x, y, *extra in loader:
            got = time.perf_counter()
            wait += got - tick
            x = precision.prepare(x)
            y = y.to(precision.device, non_blocking=True)
            optimizer.zero_grad(set_to_none=True)
            with precision.autocast():
                logits = model(x)
            # The loss in float32 whatever the forward ran in.
            if distil is not None:
                loss = distil(logits.float(), y, extra[0].to(precision.device))
            else:
                loss = criterion(logits.float(), y)
            if head is not None:
                loss = loss + cfg.aux_mask_weight * head.loss(extra[-1].to(precision.device), y)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            if ema is not None:
                ema.update_parameters(model)
            value = float(loss.detach())
            if not math.isfinite(value):
                raise FloatingPointError(_diverged(f"the training loss became {value}", epoch, precision))
            loss_sum += value * len(y)
            seen += len(y)
            tick = time.perf_counter()
            step += tick - got
        scheduler.step()
        judged = model if ema is None else ema.module
        if bn_slabs is not None:
            recompute_batch_norm(judged, bn_slabs, precision, cfg.batch_size)
        metrics: dict[str, float] = {"train_loss": loss_sum / max(seen, 1), "data_wait_share": wait / max(wait + step, 1e-9),
                   "samples_per_second": seen / max(wait + step, 1e-9), "lr": float(scheduler.get_last_lr()[0])}
        improved = False
        if val is not None and len(val.y):
            scores = predict_log_odds(judged, val.x, precision=precision)
            if not np.isfinite(scores).all():
                raise FloatingPointError(_diverged(f"{int((~np.isfinite(scores)).sum())} of {len(scores)} validation "
                                                   "scores are not finite", epoch, precision))
            auc = float(roc_auc_score(val.y.numpy(), scores)) if len(np.unique(val.y.numpy())) == 2 else float("nan")
            metrics["val_slice_auc"] = auc
            improved = auc > best_auc
        else:
            improved = True
        if improved:
            best_auc = metrics.get("val_slice_auc", best_auc)
            best_epoch, bad = epoch, 0
            best_state = {k: v.detach().clone() for k, v in judged.state_dict().items()}
        else:
            bad += 1
        history.append({"epoch": float(epoch), **metrics})
        if log:
            log(epoch, metrics)
        save_checkpoint(checkpoint, {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "epoch": epoch, "best_auc": best_auc, "best_epoch": best_epoch, "bad": bad, "history": history,
            "best_model": best_state, "generators": generator_states(generator, precision.device),
            "in_channels": int(train.x.shape[1]), **({"ema": ema.state_dict()} if ema is not None else {}),
            **({"aux_head": head.state_dict()} if head is not None else {})})
        if val is not None and bad >= cfg.patience:
            break
        if stop_after is not None and epoch - resumed_from >= stop_after:
            raise InterruptedError(f"stopped after epoch {epoch} as asked")
    if head is not None:
        head.remove()
    if best_state is not None:
        model.load_state_dict(best_state)  # type: ignore[arg-type]
    model = model.cpu()
    model.to(memory_format=torch.contiguous_format)  # type: ignore[call-overload]
    return FitResult(model, best_epoch, best_auc, epoch, resumed_from, history)
