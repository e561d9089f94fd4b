"""The training augmentation of 2.5D slabs: one chain of MONAI array ``Rand*`` transforms.

A slab is a ``(k, S, S)`` float tensor in [0, 1], the k adjacent slices as channels. The chain
flips it left-right with probability one half (and front to back, with ``flip_axes`` (0, 1)),
clamps it to [0, 1], applies a random gamma and adds Gaussian noise, every time. It is the only
augmentation of the project: preprocessing has none.

MONAI's random transforms draw from their own numpy ``RandomState``, which nothing seeds. So that a
run is reproducible and each epoch differs, :meth:`SlabAugmentation.__call__` takes a seed, which
the dataset draws from torch's generator (seeded per DataLoader worker and epoch by the loader).

The training loop augments a whole batch at once (:meth:`SlabAugmentation.batch`): the chain's own
transforms draw each slab's flip, gamma and noise seed from its seed, and the arithmetic runs over
the batch, giving the chain's output bit for bit (a test checks it). One slab through the chain
costs about 0.3 ms of MONAI's bookkeeping on top of its 0.6 ms of arithmetic and noise.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
from monai.config.type_definitions import NdarrayOrTensor
from monai.data import get_track_meta, set_track_meta
from monai.transforms import (
    Compose,
    EnsureType,
    Lambda,
    RandAdjustContrast,
    RandFlip,
    RandGaussianNoise,
    Randomizable,
    RandomizableTransform,
)

FLIP_PROB = 0.5
FLIP_SPATIAL_AXIS = 0  # spatial axis 0 of a (k, S, S) slab is dim -2: left-right in RAS
# Spatial axis 1 is dim -1: anterior-posterior. The in-plane axes a slab may be flipped along.
IN_PLANE_AXES = (0, 1)
GAMMA_RANGE = (0.85, 1.2)
NOISE_STD = 0.02
SEED_BOUND = 2**31  # seeds are drawn from [0, SEED_BOUND); numpy takes up to 2**32 - 1


class RandGaussianNoiseTorch(RandGaussianNoise):
    """MONAI's ``RandGaussianNoise`` with the noise drawn by torch in float32.

    MONAI draws float64 noise from numpy's legacy generator: about 1 ms for one 3×128×128 slab,
    a third of a training step. Here whether to apply it, the spread and the seed of the torch
    generator all come from the transform's ``RandomState``, so ``set_random_state`` still
    governs every draw, and the noise has the same distribution.
    """

    def __init__(self, prob: float, mean: float, std: float, sample_std: bool) -> None:
        super().__init__(prob=prob, mean=mean, std=std, dtype=np.float32, sample_std=sample_std)

    def draw(self) -> tuple[float, int] | None:
        """Whether to add noise and, if so, its spread and the seed of its torch generator."""
        RandomizableTransform.randomize(self, None)
        if not self._do_transform:
            return None
        std = self.R.uniform(0, self.std) if self.sample_std else self.std
        return float(std), int(self.R.randint(SEED_BOUND))

    def randomize(self, img: NdarrayOrTensor, mean: float | None = None) -> None:
        drawn = self.draw()
        if drawn is None:
            return
        std, seed = drawn
        noise = torch.empty(tuple(img.shape), dtype=torch.float32).normal_(generator=torch.Generator().manual_seed(seed))
        self.noise = noise.mul_(std).add_(self.mean if mean is None else mean)  # type: ignore[assignment]


def build_augmentation(flip_axes: Sequence[int] = (FLIP_SPATIAL_AXIS,)) -> Compose:
    """The chain, unseeded: a flip along each of `flip_axes` (each drawn on its own), clamp to
    [0, 1], gamma, noise; a plain float tensor comes out.

    Gamma is MONAI's: ``((x - min) / range) ** gamma * range + min`` over the whole slab, which
    keeps the slab's minimum and maximum in place.
    """
    axes = tuple(flip_axes)
    if len(set(axes)) != len(axes) or any(a not in IN_PLANE_AXES for a in axes):
        raise ValueError(f"flip_axes must be distinct in-plane axes among {IN_PLANE_AXES} (0 left-right, "
                         f"1 front to back), got {list(axes)}")
    return Compose([
        *(RandFlip(prob=FLIP_PROB, spatial_axis=axis) for axis in axes),
        Lambda(func=partial(torch.clamp, min=0.0, max=1.0)),
        RandAdjustContrast(prob=1.0, gamma=GAMMA_RANGE),
        RandGaussianNoiseTorch(prob=1.0, mean=0.0, std=NOISE_STD, sample_std=False),
        EnsureType(data_type="tensor", dtype=torch.float32, track_meta=False),
    ])


@dataclass(frozen=True)
class SlabDraw:
    """What the chain drew for one slab: the spatial axes it flips along (none: no flip), a gamma
    (None: no contrast change), noise as (spread, generator seed) or None."""

    flips: tuple[int, ...]
    gamma: float | None
    noise: tuple[float, int] | None


class SlabAugmentation:
    """:func:`build_augmentation` with every random transform drawing from one seedable state.

    Re-seeding one shared ``RandomState`` per call is cheaper than MONAI's
    ``Compose.set_random_state``, which builds a new state for every transform. Metadata tracking
    is off during a call (process-wide, restored afterwards): slabs carry no affine.
    """

    def __init__(self, flip_axes: Sequence[int] = (FLIP_SPATIAL_AXIS,)) -> None:
        self.flip_axes = tuple(flip_axes)
        self.chain = build_augmentation(self.flip_axes)
        self.state = np.random.RandomState(0)
        for transform in self.chain.transforms:
            if isinstance(transform, Randomizable):
                transform.set_random_state(state=self.state)

    def __call__(self, slab: torch.Tensor, seed: int) -> torch.Tensor:
        """Augment one ``(k, S, S)`` slab; the same slab and seed give the same result."""
        if slab.ndim != 3:
            raise ValueError(f"expected one slab of shape (k, S, S), got shape {tuple(slab.shape)}")
        if not 0 <= seed < 2**32:
            raise ValueError(f"seed must be in [0, 2**32), got {seed}")
        self.state.seed(seed)
        tracking = get_track_meta()
        set_track_meta(False)  # a slab has no affine to track, and MetaTensor bookkeeping doubles the cost
        try:
            out: torch.Tensor = self.chain(slab)
        finally:
            set_track_meta(tracking)
        return out

    def draw(self, seed: int) -> SlabDraw:
        """The chain's draws for `seed`, in its order, by its own transforms."""
        *flips, _, contrast, noise, _ = self.chain.transforms
        self.state.seed(seed)
        for flip in flips:
            flip.randomize(None)
        contrast.randomize()
        return SlabDraw(flips=tuple(a for a, f in zip(self.flip_axes, flips, strict=True) if f._do_transform),
                        gamma=float(contrast.gamma_value) if contrast._do_transform else None,
                        noise=noise.draw())

    def batch(self, slabs: torch.Tensor, seeds: Sequence[int]) -> torch.Tensor:
        """Augment a ``(B, k, S, S)`` batch, slab i with ``seeds[i]``: :meth:`__call__` of each slab,
        bit for bit, at 0.75 ms a 3×192×192 slab instead of 1.07 (``benchmarks/train.py``, Zen 4);
        with the slabs' noise drawn on torch's threads at once, fold 0's two epochs of 2,708 slabs
        in 11.9-15.8 s instead of 13.5-18.2 (2 threads, the AMX Xeon; alternated, each run in a
        thread as Prefect runs a task).

        The same operations in the same order, each over the whole batch: the per-slab minimum and
        range are the chain's, the noise comes from the same generator seeds in float32."""
        return self._apply(slabs, self._draws(slabs, seeds))

    def batch_with_masks(self, slabs: torch.Tensor, masks: torch.Tensor,
                         seeds: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`batch`, and the ``(B, S, S)`` nodule masks of the slabs' centre slices flipped with them
        (the only spatial transform of the chain), for the auxiliary localisation target."""
        if masks.shape[0] != len(slabs) or masks.shape[-2:] != slabs.shape[-2:]:
            raise ValueError(f"expected one ({slabs.shape[-2]}, {slabs.shape[-1]}) mask per slab, got shape "
                             f"{tuple(masks.shape)} for slabs of shape {tuple(slabs.shape)}")
        draws = self._draws(slabs, seeds)
        return self._apply(slabs, draws), self._flip(masks.clone(), draws)

    def _flip(self, x: torch.Tensor, draws: list[SlabDraw]) -> torch.Tensor:
        """Flip each of `x`'s items (slabs or masks, in place) along the axes its draw names:
        spatial axis a is dimension a - 2."""
        for axis in self.flip_axes:
            flipped = [i for i, d in enumerate(draws) if axis in d.flips]
            if flipped:
                x[flipped] = x[flipped].flip(axis - 2)
        return x

    def _draws(self, slabs: torch.Tensor, seeds: Sequence[int]) -> list[SlabDraw]:
        if slabs.ndim != 4 or len(slabs) != len(seeds):
            raise ValueError(f"expected a batch of shape (B, k, S, S) and B seeds, got shape {tuple(slabs.shape)} "
                             f"and {len(seeds)} seeds")
        if any(not 0 <= s < 2**32 for s in seeds):
            raise ValueError(f"seeds must be in [0, 2**32), got {list(seeds)}")
        return [self.draw(int(s)) for s in seeds]

    def _apply(self, slabs: torch.Tensor, draws: list[SlabDraw]) -> torch.Tensor:
        x = self._flip(slabs.to(torch.float32, copy=True), draws)
        x.clamp_(0.0, 1.0)
        gamma = [i for i, d in enumerate(draws) if d.gamma is not None]
        if gamma:
            # MONAI's AdjustContrast over each slab: ((x - min) / (range + eps)) ** gamma * range + min
            every = len(gamma) == len(x)  # the default chain changes every slab's contrast: no copy
            part = x if every else x[gamma]
            low = part.amin(dim=(1, 2, 3), keepdim=True)
            span = part.amax(dim=(1, 2, 3), keepdim=True).sub_(low)
            exponent = torch.tensor([draws[i].gamma for i in gamma], dtype=torch.float32).view(-1, 1, 1, 1)
            part.sub_(low).div_(span + 1e-7).pow_(exponent).mul_(span).add_(low)
            if not every:
                x[gamma] = part
        noise_mean = float(self.chain.transforms[-2].mean)
        noisy = [(i, d.noise) for i, d in enumerate(draws) if d.noise is not None]
        if noisy:
            noise = torch.empty((len(noisy), *x.shape[1:]), dtype=torch.float32)

            def draw_noise(j: int) -> None:
                noise[j].normal_(generator=torch.Generator().manual_seed(noisy[j][1][1]))

            # torch draws normal noise on one core, without a parallel region: the slabs' noise is
            # drawn on torch's threads at once, each slab from its own generator as before (11.5 ->
            # 7.5 ms for 32 slabs of 3x192x192, 2 threads). Only the draws run in the pool: an
            # elementwise op there would start an OpenMP team in each pool thread, and those teams
            # slowed the process's later steps (libgomp then spins less between parallel regions).
            threads = min(torch.get_num_threads(), len(noisy))
            if threads > 1:
                list(_noise_pool(threads).map(draw_noise, range(len(noisy))))
            else:
                for j in range(len(noisy)):
                    draw_noise(j)
            spread = torch.tensor([std for _, (std, _) in noisy], dtype=torch.float32)
            noise.mul_(spread.view(-1, 1, 1, 1)).add_(noise_mean)
            if len(noisy) == len(x):
                x.add_(noise)
            else:
                x[[i for i, _ in noisy]] += noise
        return x


_POOLS: dict[tuple[int, int], ThreadPoolExecutor] = {}


def _noise_pool(threads: int) -> ThreadPoolExecutor:
    """A pool of `threads` threads for this process (a forked DataLoader worker makes its own)."""
    key = (os.getpid(), threads)
    if key not in _POOLS:
        _POOLS[key] = ThreadPoolExecutor(threads, thread_name_prefix="slab-noise")
    return _POOLS[key]


def draw_seed() -> int:
    """A seed from torch's generator, so augmentation follows torch's seeding of workers and epochs."""
    return int(torch.randint(SEED_BOUND, (1,)))
