"""The training augmentation of 2.5D slabs: one chain of MONAI array ``Rand*`` transforms.

A slab is a ``(k, S, S)`` float tensor in [0, 1], the k adjacent slices as channels. The chain
flips it left-right with probability one half, clamps it to [0, 1], applies a random gamma and adds
Gaussian noise, every time. It is the only augmentation of the project: preprocessing has none.

MONAI's random transforms draw from their own numpy ``RandomState``, which nothing seeds. So that a
run is reproducible and each epoch differs, :meth:`SlabAugmentation.__call__` takes a seed, which
the dataset draws from torch's generator (seeded per DataLoader worker and epoch by the loader).
"""

from __future__ import annotations

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

    def randomize(self, img: NdarrayOrTensor, mean: float | None = None) -> None:
        RandomizableTransform.randomize(self, None)
        if not self._do_transform:
            return
        std = self.R.uniform(0, self.std) if self.sample_std else self.std
        generator = torch.Generator().manual_seed(int(self.R.randint(SEED_BOUND)))
        noise = torch.randn(tuple(img.shape), generator=generator, dtype=torch.float32)
        self.noise = noise.mul_(std).add_(self.mean if mean is None else mean)  # type: ignore[assignment]


def build_augmentation() -> Compose:
    """The chain, unseeded: flip, clamp to [0, 1], gamma, noise; a plain float tensor comes out.

    Gamma is MONAI's: ``((x - min) / range) ** gamma * range + min`` over the whole slab, which
    keeps the slab's minimum and maximum in place.
    """
    return Compose([
        RandFlip(prob=FLIP_PROB, spatial_axis=FLIP_SPATIAL_AXIS),
        Lambda(func=partial(torch.clamp, min=0.0, max=1.0)),
        RandAdjustContrast(prob=1.0, gamma=GAMMA_RANGE),
        RandGaussianNoiseTorch(prob=1.0, mean=0.0, std=NOISE_STD, sample_std=False),
        EnsureType(data_type="tensor", dtype=torch.float32, track_meta=False),
    ])


class SlabAugmentation:
    """:func:`build_augmentation` with every random transform drawing from one seedable state.

    Re-seeding one shared ``RandomState`` per call is cheaper than MONAI's
    ``Compose.set_random_state``, which builds a new state for every transform. Metadata tracking
    is off during a call (process-wide, restored afterwards): slabs carry no affine.
    """

    def __init__(self) -> None:
        self.chain = build_augmentation()
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


def draw_seed() -> int:
    """A seed from torch's generator, so augmentation follows torch's seeding of workers and epochs."""
    return int(torch.randint(SEED_BOUND, (1,)))
