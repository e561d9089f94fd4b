"""Slab tensors for training and evaluation, built from the preprocessing cache.

Every sampled slab of the training series is extracted once, resized to ``input_size`` and held in
one float16 tensor, so an epoch is pure indexing plus augmentation: the DataLoader never waits on
disk or decompression. Evaluation scores every slice of a series.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from dicomops.layout import WorkLayout
from dicomops.preprocessing.slabs import slab_index
from dicomops.training.augment import FLIP_SPATIAL_AXIS, SlabAugmentation, draw_seed


def load_volume(path: Path) -> np.ndarray:
    """The image of one cached volume (``WorkLayout.preprocessed.volume(...)``), as stored."""
    with np.load(path) as npz:
        return npz["image"]


def _planes(volume: np.ndarray, size: int) -> torch.Tensor:
    """The slices of a (X, Y, Z) volume as a (Z, size, size) float32 tensor, each resized on its own
    (area). torch converts the cache's float16 while it moves the slice axis first, in one pass: a
    demo volume's slabs in 20 ms instead of 27 with numpy's transposed copy."""
    planes = torch.from_numpy(volume).permute(2, 0, 1).to(torch.float32, memory_format=torch.contiguous_format)
    if planes.shape[-1] != size or planes.shape[-2] != size:
        planes = F.interpolate(planes[:, None], size=(size, size), mode="area")[:, 0]
    return planes


def slabs_at(volume: np.ndarray, zs: np.ndarray, k: int, size: int) -> torch.Tensor:
    """The slabs of a (X, Y, Z) volume centred on slices `zs`, as a (len(zs), k, size, size) float
    tensor: each slice they use resized once, then stacked. Bit-identical to resizing every slab
    (:func:`slab`), since area resizing treats each plane on its own, and up to k times less work."""
    idx = slab_index(zs, k, volume.shape[-1])
    used, where = np.unique(idx, return_inverse=True)
    return _planes(volume[..., used], size)[torch.from_numpy(where.reshape(idx.shape))]


def masks_at(mask: np.ndarray, zs: np.ndarray, size: int) -> torch.Tensor:
    """The nodule masks (any nonzero value of an instance mask) of slices `zs` of a (X, Y, Z) mask, as a
    (len(zs), size, size) bool tensor in the slabs' orientation (:func:`slabs_at`): a pixel is set where
    the resize's window holds any nodule voxel, so a nodule smaller than a pixel still shows."""
    planes = torch.from_numpy(mask[..., np.asarray(zs, dtype=np.int64)] > 0).permute(2, 0, 1).to(torch.float32)
    if planes.shape[-1] != size or planes.shape[-2] != size:
        planes = F.interpolate(planes[:, None], size=(size, size), mode="area")[:, 0]
    return planes > 0


def all_slabs(volume: np.ndarray, k: int, size: int) -> torch.Tensor:
    """Every slice of a (X, Y, Z) volume as a (Z, k, size, size) float tensor: the slab of each
    slice (:func:`slab`, edges repeated), resized (:func:`slabs_at`)."""
    depth = volume.shape[-1]
    return _planes(volume, size)[torch.from_numpy(slab_index(np.arange(depth), k, depth))]


@dataclass
class SlabSet:
    x: torch.Tensor  # (N, k, S, S) float16
    y: torch.Tensor  # (N,) int64 slice labels
    series: list[str]
    z: np.ndarray
    masks: torch.Tensor | None = None  # (N, S, S) bool nodule masks of the centre slices (build_slab_set(masks=True))

    def taken(self, rows: np.ndarray) -> SlabSet:
        """The set of the slabs at `rows`, in that order (a row may come more than once)."""
        at = torch.from_numpy(np.asarray(rows, dtype=np.int64))
        return SlabSet(self.x[at], self.y[at], [self.series[i] for i in rows], self.z[rows],
                       None if self.masks is None else self.masks[at])


# Each series' sampled slabs, resized, kept per process: the four folds and the final model of one
# cross-validation, the export's calibration and a student's teacher targets all read the same ones.
# Building them reads and decompresses every volume: on the demo, most of the 14-16 s each fold spent
# before its first epoch (5 s with the cache; a fresh clone's classifier stage 5:29 instead of 6:10,
# its export 7 s instead of 17, at about 0.8 GB held). An entry is keyed by the volume file with its
# size and modification time, so a rewritten file is read again. One preprocessing folder at a time,
# so a process that works on several (the tests) holds one corpus, not all of them.
_SLABS: dict[tuple[str, int, int, int, int, tuple[int, ...]], torch.Tensor] = {}
_SLABS_ROOT: list[Path] = []


def forget_slabs() -> None:
    """Drop the per-process slab cache (the pipeline does once the export has read its slabs)."""
    _SLABS.clear()
    _SLABS_ROOT.clear()


def _cached(pre_root: Path, path: Path, zs: tuple[int, ...], k: int, size: int) -> torch.Tensor:
    """The slabs (depth `k`) or, for `k` 0, the nodule masks of slices `zs` of the volume at `path`."""
    if [pre_root] != _SLABS_ROOT:
        forget_slabs()
        _SLABS_ROOT.append(pre_root)
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns, k, size, zs)
    if key not in _SLABS:
        if k:
            _SLABS[key] = slabs_at(load_volume(path), np.asarray(zs), k, size).half()
        else:
            with np.load(path) as npz:
                _SLABS[key] = masks_at(npz["mask"], np.asarray(zs), size)
    return _SLABS[key]


def build_slab_set(layout: WorkLayout, series_ids: list[str], k: int, size: int, masks: bool = False,
                   repeats: bool = False) -> SlabSet:
    """The sampled slabs of `series_ids`, extracted and resized once per process; with `masks`, the
    nodule masks of their centre slices too (:func:`masks_at`). With `repeats` (a training set), a
    slab the slab table marks with ``repeat`` n (``preprocess.wall_positive_repeat``) is in the set n
    times, each copy then augmented on its own; a validation set takes each slab once."""
    pre = layout.preprocessed
    index, slabs = pre.read_index(), pre.read_slabs()
    paths = index.set_index("SeriesInstanceUID").path
    chosen = slabs[slabs.SeriesInstanceUID.isin(set(series_ids))].sort_values(["SeriesInstanceUID", "z"])
    xs, series, zs, ms = [], [], [], []
    for uid, group in chosen.groupby("SeriesInstanceUID", sort=True):
        at = tuple(int(z) for z in group.z)
        xs.append(_cached(pre.root.resolve(), pre.volume(paths[uid]), at, k, size))
        if masks:
            ms.append(_cached(pre.root.resolve(), pre.volume(paths[uid]), at, 0, size))
        series += [str(uid)] * len(group)
        zs.append(group.z.to_numpy())
    x = torch.cat(xs) if xs else torch.zeros((0, k, size, size), dtype=torch.float16)
    mask_set = (torch.cat(ms) if ms else torch.zeros((0, size, size), dtype=torch.bool)) if masks else None
    data = SlabSet(x, torch.as_tensor(chosen.slice_label.to_numpy(), dtype=torch.long), series,
                   np.concatenate(zs) if zs else np.zeros(0, int), mask_set)
    times = chosen["repeat"].to_numpy() if repeats and "repeat" in chosen else None  # tables before 2026-12-07: once
    return data if times is None or (times == 1).all() else data.taken(np.repeat(np.arange(len(times)), times))


class AugmentedSlabs(Dataset):
    """Indexing into a :class:`SlabSet`, with the training augmentation (:mod:`.augment`) if `train`;
    with `teacher` (a teacher's logits per slab), each item carries its row of them too.

    Load it with ``collate_fn=dataset.collate``: an item is the stored float16 slab, its label and,
    when training, the seed its augmentation draws from; :meth:`collate` stacks a batch and augments
    it at once (:meth:`SlabAugmentation.batch`, the same slabs as augmenting each item alone)."""

    def __init__(self, data: SlabSet, train: bool, teacher: torch.Tensor | None = None,
                 flip_axes: Sequence[int] = (FLIP_SPATIAL_AXIS,)) -> None:
        self.data, self.train, self.teacher = data, train, teacher
        self.augment = SlabAugmentation(flip_axes) if train else None

    def __len__(self) -> int:
        return len(self.data.y)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, ...]:
        # The seed comes from torch's global generator, which the DataLoader seeds per worker
        # and epoch from the seeded base generator: reproducible, yet different every epoch.
        item: tuple[torch.Tensor, ...] = (self.data.x[i], self.data.y[i])
        if self.augment is not None:
            item += (torch.tensor(draw_seed()),)
        if self.teacher is not None:
            item += (self.teacher[i],)
        if self.data.masks is not None:
            item += (self.data.masks[i],)
        return item

    def collate(self, items: list[tuple[torch.Tensor, ...]]) -> tuple[torch.Tensor, ...]:
        """A batch ``(x, y[, teacher][, masks])``: x float32 and augmented when training, the masks
        (when the set has them) flipped with their slabs."""
        x, y, *rest = (torch.stack(column) for column in zip(*items, strict=True))
        if self.augment is None:
            return (x.float(), y, *rest)
        seeds, *rest = rest
        if self.data.masks is None:
            return (self.augment.batch(x, seeds.tolist()), y, *rest)
        *rest, masks = rest
        x, masks = self.augment.batch_with_masks(x, masks, seeds.tolist())
        return (x, y, *rest, masks)
