"""A toy slab set for the training loop's tests: 3 x 32 x 32 slabs, a bright square marking the positives."""

from __future__ import annotations

import numpy as np
import torch

from dicomops.training.data import SlabSet


def toy_slabs(n: int, seed: int, signal: bool = True, masks: bool = False) -> SlabSet:
    """`n` slabs of uniform noise, alternately labelled 0 and 1, the positives with a brighter square;
    with `signal` False, random labels and no square (nothing to learn); with `masks`, the square's
    mask on each slab (``SlabSet.masks``)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, 32, 32, generator=g)
    y = (torch.arange(n) % 2).long() if signal else torch.randint(0, 2, (n,), generator=g)
    square = torch.zeros(n, 32, 32, dtype=torch.bool)
    if signal:
        x[y == 1, :, 10:16, 10:16] += 0.5
        square[y == 1, 10:16, 10:16] = True
    return SlabSet(x.half(), y, [f"s{i}" for i in range(n)], np.zeros(n), square if masks else None)
