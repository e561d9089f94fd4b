"""Volumes and patches for the nodule segmenter, from the preprocessing cache.

A volume is read once per process (image float16, instance mask, the nodules' records) and kept
with its foreground and background voxel indices, so MONAI's ``RandCropByPosNegLabeld`` never
rescans a volume: that is the cached half of MONAI's usual ``CacheDataset`` pipeline, done once for
all folds. A training sample is one patch; which volume and which crop it gets depend only on the
seed, the epoch and the sample's global position, so two DDP ranks that each take half of every
batch see exactly the patches one process would.
"""

from __future__ import annotations

import json
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from scipy import ndimage
from torch.utils.data import Dataset

from dicomops.layout import WorkLayout
from dicomops.segmentation.metrics import NativeReference, NoduleRef, mask_box
from dicomops.synthetic.sidecars import LABELS_CSV

# Lung window [-1350, 150] HU maps to [0, 1]: 0.28 is about -930 HU, between air (-1000 HU, 0.23)
# and aerated lung (-850 HU, 0.33); 0.45 is about -675 HU, above aerated lung and below ground glass.
# Background patches are centred in the lungs, where the look-alikes are (vessels, pleura, fissures),
# and the rest elsewhere in the body.
BODY_LEVEL = 0.28
LUNG_LEVEL = 0.45
BACKGROUND_STRIDE = 2  # lung centres on every 2nd voxel per axis: 1/8 of them, same coverage
BODY_STRIDE = 3  # other body centres on every 3rd: 34-41 % of the demo's background centres, so the
# rest of the body (mediastinum, diaphragm, liver dome in long series) is seen as often as it is scored
BORDER_WIDTH = 2  # the lung border: voxels within 2 voxels (2 mm) of both lung and other body tissue
BORDER_OPENING = 5  # structures thinner than 5 voxels (vessels, rims) are not a border
# Soft tissue of the wall: 0.75 is about -225 HU, above ground glass and its ill-defined rim (-750 to
# -300 HU), below fat (-100 HU) and muscle.
WALL_LEVEL = 0.75


@dataclass
class SegVolume:
    """One preprocessed series as the segmenter sees it."""

    series: str
    vendor: str
    image: np.ndarray  # float16 (X, Y, Z) in [0, 1], padded to at least the patch size
    mask: np.ndarray  # uint8 (X, Y, Z): 0 background, k + 1 inside nodule k of `nodules`
    nodules: list[NoduleRef]
    foreground: np.ndarray  # flat indices of nodule voxels
    balanced_foreground: np.ndarray  # the same, every nodule equally often (:func:`nodule_balanced`)
    background: np.ndarray  # flat indices of lung voxels (and a few other body voxels) outside nodules
    label: np.ndarray  # uint8 (1, X, Y, Z): the binary target, made once
    dropped_nodules: int = 0  # recorded nodules with no voxel left after resampling
    actionable: bool | None = None  # the series' label (an actionable nodule), None where unknown
    native: NativeReference | None = None  # the reference on the acquired grid; None in an older cache

    @property
    def shape(self) -> tuple[int, int, int]:
        return (int(self.image.shape[0]), int(self.image.shape[1]), int(self.image.shape[2]))


def nodule_refs(records: str | list[dict[str, Any]]) -> list[NoduleRef]:
    """The generator's per-nodule records (``labels.csv`` column ``nodules``) in instance order."""
    items = json.loads(records) if isinstance(records, str) else records
    return [NoduleRef(label=i + 1, diameter_mm=float(r["diameter_mm"]), kind=str(r.get("kind", "solid")),
                      attachment=str(r.get("attachment", "none"))) for i, r in enumerate(items or [])]


def pad_to(array: np.ndarray, size: tuple[int, int, int]) -> np.ndarray:
    """`array` grown at the far end of each axis to at least `size`, repeating its edge voxels."""
    pads = [(0, max(0, s - n)) for s, n in zip(size, array.shape, strict=True)]
    return np.pad(array, pads, mode="edge") if any(p for _, p in pads) else array


def _ordered(image: np.ndarray, level: float) -> tuple[np.ndarray, Any]:
    """`image` and `level` as values that compare as the image's do with a `level` above 0.

    numpy computes half precision in software: on a float16 volume of the cache (320x320x119) a
    comparison takes 39 ms. Read as int16, the bits of non-negative halves order as their values
    and negative ones lie below 0, so the comparison of the bits gives the same answer in 4 ms
    (a NaN would count as above; the cache holds none: preprocessing clips into the window).
    """
    if not level > 0:
        raise ValueError(f"level must be above 0, got {level}")
    if image.dtype == np.float16:
        return image.view(np.int16), np.float16(level).view(np.int16)
    return image, level


def above(image: np.ndarray, level: float) -> np.ndarray:
    """``image > level`` for a `level` above 0 (the levels here are), fast on float16 (:func:`_ordered`)."""
    values, bound = _ordered(image, level)
    return values > bound


def below(image: np.ndarray, level: float) -> np.ndarray:
    """``image < level`` for a `level` above 0, fast on float16 (:func:`_ordered`)."""
    values, bound = _ordered(image, level)
    return values < bound


def _cube(mask: np.ndarray, size: int, grow: bool) -> np.ndarray:
    """Binary dilation (`grow`) or erosion of `mask` by a cube of odd `size`, one axis at a time,
    the window cut short at the array's edges: what SciPy's ``maximum_filter`` and
    ``minimum_filter`` give (their default 'reflect' border only repeats values inside the window).

    Shifted ORs and ANDs of numpy views: on 12 of the demo's volumes :func:`lung_border` took
    67 ms instead of 196 with SciPy's filters (medians), the same voxels (``benchmarks/segmentation.py``, 4.).
    """
    if size % 2 == 0:
        raise ValueError(f"size must be odd (a cube centred on each voxel), got {size}")
    op = np.logical_or if grow else np.logical_and
    for axis in range(mask.ndim):
        out, n = mask.copy(), mask.shape[axis]
        for shift in range(1, min(size // 2, n - 1) + 1):
            later = tuple(slice(shift, None) if a == axis else slice(None) for a in range(mask.ndim))
            earlier = tuple(slice(None, n - shift) if a == axis else slice(None) for a in range(mask.ndim))
            op(out[later], mask[earlier], out=out[later])
            op(out[earlier], mask[later], out=out[earlier])
        mask = out
    return mask


def _open(mask: np.ndarray, size: int) -> np.ndarray:
    """Binary opening with a cube of `size`: what is thinner than `size` voxels is gone."""
    return _cube(_cube(mask, size, grow=False), size, grow=True)


def lung_border(image: np.ndarray, body: np.ndarray, width: int = BORDER_WIDTH) -> np.ndarray:
    """The band where the lung meets the chest wall, mediastinum and diaphragm: body voxels within
    `width` voxels (a cube) of both lung (below :data:`LUNG_LEVEL`) and other tissue, each opened
    by :data:`BORDER_OPENING` first so that vessels, the skin's partial-volume rim and the table
    are not borders.

    Partial volume smears that edge into values between aerated lung and soft tissue, most where
    the border runs oblique to thick slices: crescents that look like ground glass to the network.

    The filters run inside the body's box grown by their reach, the only place the answer can be
    true: the same result as over the whole volume, in a quarter to a half less time on the demo's
    119-slice volumes.
    """
    border = np.zeros(body.shape, dtype=bool)
    box = mask_box(body, BORDER_OPENING + 2 * width + 1)
    if box is None:
        return border
    image, body = image[box], body[box]
    lung = body & below(image, LUNG_LEVEL)
    size = 2 * width + 1
    near_lung = _cube(_open(lung, BORDER_OPENING), size, grow=True)
    near_tissue = _cube(_open(body & ~lung, BORDER_OPENING), size, grow=True)
    border[box] = body & near_lung & near_tissue
    return border


def wall_nodules(image: np.ndarray, mask: np.ndarray, reach: int = BORDER_WIDTH) -> list[int]:
    """The nodules of an instance mask (their ids) that touch the chest wall, mediastinum or
    diaphragm: some voxel of theirs within `reach` voxels (a cube) of soft tissue (above
    :data:`WALL_LEVEL`) that is no nodule, that tissue opened by :data:`BORDER_OPENING` first, as
    :func:`lung_border`'s is, so that a vessel running into a nodule is no wall.

    Each nodule is judged inside its own box grown by the filters' reach, the only place the answer
    can come from."""
    found = []
    for value in np.unique(mask[mask > 0]):
        box = mask_box(mask == value, BORDER_OPENING + reach + 1)
        if box is None:
            continue
        part, ids = image[box], mask[box]
        tissue = above(part, WALL_LEVEL) & (ids == 0)
        wall = _cube(_open(tissue, BORDER_OPENING), 2 * reach + 1, grow=True)
        if (wall & (ids == value)).any():
            found.append(int(value))
    return found


def border_centres(others: np.ndarray, border: np.ndarray, share: float, seed: int) -> np.ndarray:
    """`others` with border centres added so that they make `share` of the result: each of `border`
    as often as that allows, and a random subset of them (drawn with `seed`) once more."""
    if share <= 0 or not len(border):
        return others
    want = round(share / (1 - share) * len(others))
    whole, rest = divmod(want, len(border))
    pick = np.random.default_rng(seed).choice(border, size=rest, replace=False)
    return np.concatenate([others, np.sort(np.concatenate([np.tile(border, whole), pick]))])


def nodule_balanced(mask: np.ndarray) -> np.ndarray:
    """Flat indices of the nodule voxels of an instance mask in which every nodule counts the same:
    each nodule's voxels repeated in turn up to the largest nodule's count. A centre drawn uniformly
    from them lands on each nodule equally often, and uniformly within it; drawn from all nodule
    voxels instead, a 14 mm nodule beside a 3 mm one takes 100 times its patches."""
    flat = mask.ravel()
    voxels = np.flatnonzero(flat)
    if not len(voxels):
        return voxels
    ids = flat[voxels]
    groups = [voxels[ids == value] for value in np.unique(ids)]
    size = max(len(g) for g in groups)
    return np.concatenate([np.resize(g, size) for g in groups])


def read_volume(path: Path, series: str, vendor: str, nodules: list[NoduleRef],
                patch: tuple[int, int, int], actionable: bool | None = None, border_share: float = 0.0) -> SegVolume:
    with np.load(path) as npz:
        image, mask = pad_to(npz["image"], patch), pad_to(npz["mask"], patch)
        native = None
        if "native_index" in npz:  # padding at the far end moves no index: the affines stay true
            native = NativeReference.of(npz["native_index"], npz["native_label"], npz["native_shape"],
                                        npz["native_affine"], npz["affine"])
    labels = np.unique(mask[mask > 0])
    if len(labels) and labels.max() > len(nodules):
        raise ValueError(f"series {series}: mask holds nodule {labels.max()} but its record lists {len(nodules)}; "
                         "regenerate the corpus with the current generator (instance masks)")
    # A nodule smaller than the preprocessing's voxels can vanish in resampling: it cannot be judged
    # at that resolution, and is left out of the reference (counted by `dropped_nodules`).
    present = set(labels.tolist())
    dropped = sum(1 for n in nodules if n.label not in present)
    nodules = [n for n in nodules if n.label in present]
    foreground = np.flatnonzero(mask.ravel() > 0)
    lung_grid = np.zeros(image.shape, dtype=bool)
    lung_grid[::BACKGROUND_STRIDE, ::BACKGROUND_STRIDE, ::BACKGROUND_STRIDE] = True
    body_grid = np.zeros(image.shape, dtype=bool)
    body_grid[::BODY_STRIDE, ::BODY_STRIDE, ::BODY_STRIDE] = True
    inside = above(image, BODY_LEVEL)
    body = inside & (mask == 0)
    background = np.flatnonzero((body & ((lung_grid & below(image, LUNG_LEVEL)) | body_grid)).ravel())
    if border_share > 0:  # hard negatives: the lung's edge, outside nodules, at a fixed share
        border = np.flatnonzero(lung_border(image, inside).ravel() & (mask.ravel() == 0))
        background = border_centres(background, border, border_share, seed=zlib.crc32(series.encode()))
    return SegVolume(series, vendor, image, mask, nodules, foreground, nodule_balanced(mask), background,
                     (mask > 0)[None].astype(np.uint8), dropped, actionable, native)


def body_box(image: np.ndarray, margin: int, minimum: tuple[int, int, int]) -> tuple[slice, slice, slice]:
    """The box around the body (voxels above :data:`BODY_LEVEL`, so not the air around the
    patient), grown by `margin` voxels and to at least `minimum` per axis, inside the volume.
    The whole volume when nothing is body.
    """
    _check_box_args(image, minimum)
    return _at_least(mask_box(above(image, BODY_LEVEL), margin), image.shape, minimum)


def lung_box(image: np.ndarray, margin: int, minimum: tuple[int, int, int]) -> tuple[slice, slice, slice]:
    """The box around the lungs (body voxels below :data:`LUNG_LEVEL`, opened by
    :data:`BORDER_OPENING` so that the skin's partial-volume rim, air in a fold of the gown and
    noise are not lung), grown by `margin` voxels and to at least `minimum` per axis; the body's
    box (:func:`body_box`) where no lung is found.

    Nodules lie in the lungs, juxta-pleural ones against their wall: the segmenter scores this box
    only. Anything else at air density inside the body (trachea, bowel gas) only widens it.
    """
    _check_box_args(image, minimum)
    body = above(image, BODY_LEVEL)
    outer = mask_box(body, 0)
    found = None
    if outer is not None:
        inner = mask_box(_open(body[outer] & below(image[outer], LUNG_LEVEL), BORDER_OPENING), 0)
        if inner is not None:
            found = tuple(slice(max(o.start + i.start - margin, 0), min(o.start + i.stop + margin, n))
                          for o, i, n in zip(outer, inner, image.shape, strict=True))
    if found is None:
        found = mask_box(body, margin)
    return _at_least(found, image.shape, minimum)


def _check_box_args(image: np.ndarray, minimum: tuple[int, int, int]) -> None:
    if image.ndim != 3 or len(minimum) != 3:
        raise ValueError(f"image must be an (I, J, K) volume and minimum three sizes, got {image.shape} and {minimum}")


def _at_least(found: tuple[slice, ...] | None, shape: tuple[int, ...],
              minimum: tuple[int, int, int]) -> tuple[slice, slice, slice]:
    """`found` (the whole volume where None) grown to at least `minimum` per axis inside `shape`:
    centred where it can be, shifted inward at the volume's edges."""
    box = []
    for axis in range(3):
        lo, hi = (found[axis].start, found[axis].stop) if found is not None else (0, shape[axis])
        need = min(minimum[axis], shape[axis])
        if hi - lo < need:
            lo = min(max(0, lo - (need - (hi - lo)) // 2), shape[axis] - need)
            hi = lo + need
        box.append(slice(lo, hi))
    return box[0], box[1], box[2]


_CACHE: dict[tuple[str, tuple[int, int, int], float], SegVolume] = {}


def series_table(layout: WorkLayout) -> pd.DataFrame:
    """The labelled series with their vendor, cache path and nodule records."""
    series = layout.labelled_series()
    labels = pd.read_csv(layout.ingest.deid / LABELS_CSV, keep_default_na=False,
                         usecols=lambda c: c in ("SeriesInstanceUID", "nodules"))
    return series.merge(labels, on="SeriesInstanceUID", how="left").fillna({"nodules": "[]"})


def load_volumes(layout: WorkLayout, ids: list[str], patch: tuple[int, int, int],
                 border_share: float = 0.0, *, keep: bool = True) -> list[SegVolume]:
    """The volumes of series `ids`, in that order; each is read from disk once per process, those
    not read yet in as many threads as torch computes with (reading and numpy's array operations
    release the GIL: 40 of the demo's volumes took 20.3 s in one thread and 10.3 s in two, when the
    lung border still used SciPy's filters). With `keep` off, those read now are not kept for later
    calls (a pass over volumes one batch at a time holds one batch)."""
    table = series_table(layout).set_index("SeriesInstanceUID")
    keys = {uid: (str(layout.preprocessed.volume(str(table.loc[uid].path))), patch, border_share) for uid in ids}

    def read(uid: str) -> SegVolume:
        row = table.loc[uid]
        return read_volume(Path(keys[uid][0]), uid, str(row.vendor), nodule_refs(str(row.nodules) or "[]"), patch,
                           actionable=bool(row.label), border_share=border_share)

    missing = list(dict.fromkeys(uid for uid in ids if keys[uid] not in _CACHE))
    read_now = {}
    with ThreadPoolExecutor(max(1, min(torch.get_num_threads(), len(missing)))) as pool:
        for uid, volume in zip(missing, pool.map(read, missing), strict=True):
            read_now[keys[uid]] = volume
    if keep:
        _CACHE.update(read_now)
    return [read_now[keys[uid]] if keys[uid] in read_now else _CACHE[keys[uid]] for uid in ids]


def forget_volumes() -> None:
    """Drop the per-process volume cache (the pipeline does once the segmenter is trained)."""
    _CACHE.clear()


def patch_crop(patch: tuple[int, int, int], positive_share: float) -> Any:
    """MONAI's class-balanced crop, drawing centres from the precomputed indices."""
    from monai.transforms import RandCropByPosNegLabeld

    return RandCropByPosNegLabeld(keys=["image", "label"], label_key="label", spatial_size=patch,
                                  pos=positive_share, neg=1.0 - positive_share, num_samples=1,
                                  fg_indices_key="fg", bg_indices_key="bg", allow_smaller=False)


def augment(image: np.ndarray, label: np.ndarray, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random flips on each axis and a random 90° in-plane turn (square patches), on (1, X, Y, Z) arrays;
    float32 tensors out.

    numpy views, copied once at the end: MONAI's ``RandFlipd``/``RandRotate90d`` do the same through
    torch and MetaTensor at about 3 ms per call on a 48×48×32 patch here, more than the step's share.
    torch converts the copy to float32: numpy converts float16 in software (68 µs a 32³ patch, 6 µs by torch).
    """
    axes = [a + 1 for a in range(3) if rng.random() < 0.5]
    if axes:
        image, label = np.flip(image, tuple(axes)), np.flip(label, tuple(axes))
    if image.shape[1] == image.shape[2] and rng.random() < 0.5:
        turns = int(rng.integers(1, 4))
        image, label = np.rot90(image, turns, axes=(1, 2)), np.rot90(label, turns, axes=(1, 2))
    return (torch.from_numpy(np.ascontiguousarray(image)).float(),
            torch.from_numpy(np.ascontiguousarray(label)).float())


def thick_slices(image: np.ndarray, thickness: int, phase: int) -> np.ndarray:
    """`image` (..., Z) at 1 mm as a scanner with `thickness`-voxel slices every `thickness` voxels
    would see it, resampled back to every voxel: the mean over each slice's extent (a box slice
    profile centred on the slice: an even thickness covers its end voxels by half), sampled from
    slice `phase` on, then linear between the samples (as preprocessing resamples thick series);
    voxels beyond the first and last sample take theirs."""
    depth = image.shape[-1]
    if thickness < 2 or depth < thickness:
        return image
    kernel = np.ones(thickness + 1 - thickness % 2, dtype=np.float32)
    if thickness % 2 == 0:
        kernel[[0, -1]] = 0.5
    profile = ndimage.convolve1d(image.astype(np.float32), kernel / thickness, axis=-1, mode="nearest")
    centres = np.arange(phase % thickness, depth, thickness)
    sampled = profile[..., centres]
    if len(centres) == 1:
        return np.repeat(sampled, depth, axis=-1)
    position = np.clip(np.arange(depth, dtype=np.float32), centres[0], centres[-1])
    lower = np.minimum((position - centres[0]) // thickness, len(centres) - 2).astype(int)
    weight = (position - centres[lower]) / thickness
    return sampled[..., lower] * (1 - weight) + sampled[..., lower + 1] * weight


def zoomed_patch(image: np.ndarray, label: np.ndarray, centre: tuple[int, ...], patch: tuple[int, int, int],
                 scale: float) -> tuple[np.ndarray, np.ndarray]:
    """The patch centred on `centre` with its content shown `scale` times its size (nnU-Net's scaling
    augmentation): a box of ``patch / scale`` voxels cut from the (X, Y, Z) `image` and the (1, X, Y, Z)
    `label`, edge-padded beyond the volume, resized to `patch` (trilinear; the label's resized
    fraction at 0.5 again). At 0.7 a 4.5 mm nodule is shown as a 3.2 mm one. (1, *patch) arrays out."""
    size = [max(2, round(p / scale)) for p in patch]
    start = [c - q // 2 for c, q in zip(centre, size, strict=True)]
    inside = tuple(slice(max(s, 0), min(s + q, n)) for s, q, n in zip(start, size, image.shape, strict=True))
    pad = [(max(-s, 0), max(s + q - n, 0)) for s, q, n in zip(start, size, image.shape, strict=True)]
    box = torch.from_numpy(np.pad(image[inside], pad, mode="edge")).float()
    mark = torch.from_numpy(np.pad(label[0][inside], pad)).float()
    both = torch.nn.functional.interpolate(torch.stack([box, mark])[None], size=patch, mode="trilinear",
                                           align_corners=False)[0]
    return both[:1].numpy(), (both[1:] >= 0.5).numpy().astype(np.uint8)


def sample_seed(seed: int, epoch: int, position: int) -> int:
    """The seed of global sample `position` of `epoch`: the same whatever rank draws it."""
    return int(np.random.default_rng([seed, epoch, position]).integers(0, 2**31 - 1))


def epoch_volumes(n_volumes: int, n_samples: int, seed: int, epoch: int) -> np.ndarray:
    """Which volume each of the epoch's samples is cut from (every volume about equally often)."""
    rng = np.random.default_rng([seed, epoch, 2**20])
    reps = -(-n_samples // max(n_volumes, 1))
    return np.concatenate([rng.permutation(n_volumes) for _ in range(reps)])[:n_samples]


class PatchSet(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """The epoch's patches: sample `position` → (image, label) tensors of shape (1, *patch).

    Call :meth:`set_epoch` before each epoch (as with ``DistributedSampler``).
    """

    def __init__(self, volumes: list[SegVolume], patch: tuple[int, int, int], positive_share: float,
                 samples: int, seed: int, thick_share: float = 0.0, balance_nodules: bool = False,
                 scale_share: float = 0.0, scale_range: tuple[float, float] = (0.7, 1.4)) -> None:
        if not volumes:
            raise ValueError("no volumes to cut patches from")
        self.volumes, self.samples, self.seed = volumes, samples, seed
        self.patch: tuple[int, int, int] = (int(patch[0]), int(patch[1]), int(patch[2]))
        self.thick_share, self.balance_nodules = thick_share, balance_nodules
        self.scale_share, self.scale_range = scale_share, scale_range
        self.crop = patch_crop(patch, positive_share)
        self.random = np.random.RandomState(0)
        self.set_epoch(1)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.plan = epoch_volumes(len(self.volumes), self.samples, self.seed, epoch)

    def __len__(self) -> int:
        return self.samples

    def __getitem__(self, position: int) -> tuple[torch.Tensor, torch.Tensor]:
        from monai.data import set_track_meta

        v = self.volumes[int(self.plan[position])]
        seed = sample_seed(self.seed, self.epoch, position)
        # One state, reseeded per sample: the same draws as ``set_random_state(seed=...)``, which builds a
        # new RandomState for the crop and again for its cropper (2 µs against 2 × 108 µs a sample). Set
        # here, not once: MONAI's DataLoader gives the dataset's transforms states of its own.
        self.random.seed(seed)
        self.crop.set_random_state(state=self.random)
        fg = v.balanced_foreground if self.balance_nodules else v.foreground
        item = {"image": v.image[None], "label": v.label, "fg": fg,
                "bg": v.background if len(v.background) else np.arange(v.image.size)}
        set_track_meta(False)  # plain tensors: a patch needs no affine
        try:
            if len(fg):
                out = self.crop(item)[0]
            else:
                with warnings.catch_warnings():  # a series without nodules: all crops background
                    warnings.filterwarnings("ignore", message="Num foregrounds 0")
                    out = self.crop(item)[0]
        finally:
            set_track_meta(True)
        image, label = np.asarray(out["image"]), np.asarray(out["label"])
        if self.scale_share:  # the same centre, its content shrunk or grown
            rng = np.random.default_rng([seed, 3])
            if rng.random() < self.scale_share:
                centre = tuple(int(c) for c in self.crop.cropper.centers[0])
                image, label = zoomed_patch(v.image, v.label, centre, self.patch, float(rng.uniform(*self.scale_range)))
        if self.thick_share:  # the label stays the 1 mm truth
            rng = np.random.default_rng([seed, 2])
            if rng.random() < self.thick_share:
                thickness = int(rng.integers(2, 4))
                image = thick_slices(image, thickness, int(rng.integers(0, thickness)))
        return augment(image, label, np.random.default_rng([seed, 1]))


def rank_positions(samples: int, batch_size: int, rank: int, world: int) -> list[int]:
    """Rank `rank`'s share of every global batch, in order: positions ``[b*B + r*B/W, b*B + (r+1)*B/W)``.

    Whole batches only, so every rank takes the same number of steps.
    """
    if batch_size % world:
        raise ValueError(f"batch_size {batch_size} must be divisible by the {world} training processes")
    per_rank = batch_size // world
    out: list[int] = []
    for start in range(0, samples - batch_size + 1, batch_size):
        out.extend(range(start + rank * per_rank, start + (rank + 1) * per_rank))
    return out
