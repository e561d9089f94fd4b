"""The training augmentation: one MONAI chain, the hand-written ranges, reproducible under torch's seed."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from monai.data import MetaTensor, get_track_meta
from monai.transforms import AdjustContrast
from torch.utils.data import DataLoader

from dicomops.training import augment
from dicomops.training.augment import GAMMA_RANGE, NOISE_STD, SlabAugmentation
from dicomops.training.data import AugmentedSlabs, SlabSet


def _slab(seed: int = 0, size: int = 32) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).random((3, size, size), dtype=np.float32))


def _slab_set(n: int = 16, size: int = 32) -> SlabSet:
    x = torch.from_numpy(np.random.default_rng(1).random((n, 3, size, size), dtype=np.float32)).half()
    return SlabSet(x, torch.arange(n) % 2, ["s"] * n, np.arange(n))


def _corr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(np.corrcoef(a.flatten().numpy(), b.flatten().numpy())[0, 1])


def test_flip_is_left_right_on_dim_minus_2_half_the_time() -> None:
    aug, x = SlabAugmentation(), _slab()
    flipped = 0
    for seed in range(200):
        out = aug(x, seed)
        straight, lr, other = _corr(out, x), _corr(out, x.flip(-2)), _corr(out, x.flip(-1))
        assert max(straight, lr) > 0.95 and abs(other) < 0.1
        flipped += lr > straight
    assert 70 <= flipped <= 130  # p = 0.5: 200 draws land here with probability > 0.999


def test_flips_front_to_back_too_each_axis_drawn_on_its_own() -> None:
    """``flip_axes`` (0, 1): each slab is flipped left-right (dim -2) and front to back (dim -1)
    independently, each half the time, and what comes out is the flip its draw names."""
    aug, x = SlabAugmentation((0, 1)), _slab()
    seen: dict[tuple[int, ...], int] = {}
    for seed in range(200):
        out, flips = aug(x, seed), aug.draw(seed).flips
        dims = [axis - 2 for axis in flips]
        expected = x.flip(dims) if dims else x
        assert _corr(out, expected) > 0.95
        assert all(abs(_corr(out, x.flip(d))) < 0.1 for d in ([-2], [-1], [-2, -1]) if d != dims)
        seen[flips] = seen.get(flips, 0) + 1
    assert set(seen) == {(), (0,), (1,), (0, 1)}
    assert all(25 <= n <= 75 for n in seen.values())  # p = 0.25 each: 200 draws land here with p > 0.999


def test_the_default_flips_left_right_only_and_bad_axes_are_refused() -> None:
    assert {SlabAugmentation().draw(s).flips for s in range(50)} == {(), (0,)}
    assert SlabAugmentation().flip_axes == (0,)
    assert {SlabAugmentation(()).draw(s).flips for s in range(20)} == {()}
    for axes in ((2,), (0, 0), (-1,)):
        with pytest.raises(ValueError, match="flip_axes must be distinct in-plane axes"):
            SlabAugmentation(axes)


def test_gamma_in_range_every_time_and_noise_of_the_set_spread() -> None:
    aug, x = SlabAugmentation(), _slab(size=64)
    flip, _, gamma, _, _ = aug.chain.transforms
    gammas = []
    for seed in range(100):
        out = aug(x, seed)
        g = float(gamma.gamma_value)
        assert GAMMA_RANGE[0] <= g <= GAMMA_RANGE[1] and gamma._do_transform
        clean = AdjustContrast(g)(x.flip(-2) if flip._do_transform else x)
        residual = out - clean
        assert abs(float(residual.mean())) < 0.002
        assert float(residual.std()) == pytest.approx(NOISE_STD, rel=0.05)
        gammas.append(g)
    assert min(gammas) < 0.9 and max(gammas) > 1.15  # drawn over the whole range, not a constant


def test_clamps_to_unit_range_before_gamma() -> None:
    x = torch.full((3, 16, 16), 1.7)
    x[:, :8] = -0.6
    out = SlabAugmentation()(x, seed=3)
    # Without the clamp the chain would keep -0.6 and 1.7; noise adds at most ~6 standard deviations.
    assert float(out.min()) > -6 * NOISE_STD and float(out.max()) < 1 + 6 * NOISE_STD


def test_output_is_a_plain_float32_tensor_and_metadata_tracking_is_restored() -> None:
    before = get_track_meta()
    out = SlabAugmentation()(_slab().half().float(), seed=0)
    assert type(out) is torch.Tensor and not isinstance(out, MetaTensor)
    assert out.dtype == torch.float32 and out.shape == (3, 32, 32)
    assert get_track_meta() == before


def test_same_seed_same_slab_other_seed_other_slab() -> None:
    aug, x = SlabAugmentation(), _slab()
    assert torch.equal(aug(x, 7), aug(x, 7))
    assert not torch.allclose(aug(x, 7), aug(x, 8))
    with pytest.raises(ValueError, match="seed"):
        aug(x, -1)
    with pytest.raises(ValueError, match="shape"):
        aug(x[None], 0)


def _epochs(seed: int, num_workers: int, epochs: int = 2) -> list[torch.Tensor]:
    torch.manual_seed(seed)
    data = AugmentedSlabs(_slab_set(), train=True)
    loader = DataLoader(data, batch_size=4, shuffle=True, collate_fn=data.collate,
                        generator=torch.Generator().manual_seed(seed), num_workers=num_workers,
                        persistent_workers=num_workers > 0,
                        multiprocessing_context="fork" if num_workers else None)
    return [torch.cat([x for x, _ in loader]) for _ in range(epochs)]


@pytest.mark.parametrize("num_workers", [0, 1])
def test_dataloader_runs_are_reproducible_and_epochs_differ(num_workers: int) -> None:
    first, again, other = _epochs(5, num_workers), _epochs(5, num_workers), _epochs(6, num_workers)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not torch.allclose(first[0], first[1])
    assert not torch.allclose(first[0], other[0])


def test_evaluation_items_are_not_augmented() -> None:
    data = _slab_set()
    dataset = AugmentedSlabs(data, train=False)
    x, y = dataset.collate([dataset[3], dataset[4]])
    assert torch.equal(x, data.x[3:5].float()) and x.dtype == torch.float32 and y.tolist() == [1, 0]


def test_a_batch_is_augmented_as_each_slab_alone_bit_for_bit() -> None:
    """The batched arithmetic (what training runs) against MONAI's chain one slab at a time, on
    float16 slabs that stray outside [0, 1] as resized ones do, flipped and not."""
    aug = SlabAugmentation()
    x = (torch.from_numpy(np.random.default_rng(2).random((12, 3, 40, 40), dtype=np.float32)) * 1.3 - 0.15).half()
    seeds = [0, 1, 2, 3, 7, 11, 2**31 - 1, 2**32 - 1, 12345, 99, 5, 6]
    batch = aug.batch(x, seeds)
    alone = torch.stack([aug(slab.float(), seed) for slab, seed in zip(x, seeds, strict=True)])
    assert batch.dtype == torch.float32 and torch.equal(batch, alone)
    assert 0 < sum(bool(aug.draw(s).flips) for s in seeds) < len(seeds)  # both branches are exercised
    with pytest.raises(ValueError, match="seeds"):
        aug.batch(x, seeds[:-1])


def test_a_batch_flipped_along_both_axes_is_each_slab_alone_bit_for_bit() -> None:
    aug = SlabAugmentation((0, 1))
    x = torch.from_numpy(np.random.default_rng(5).random((16, 3, 24, 24), dtype=np.float32)).half()
    seeds = list(range(300, 316))
    alone = torch.stack([aug(slab.float(), seed) for slab, seed in zip(x, seeds, strict=True)])
    assert torch.equal(aug.batch(x, seeds), alone)
    assert {aug.draw(s).flips for s in seeds} == {(), (0,), (1,), (0, 1)}  # every branch is exercised


@pytest.mark.parametrize("threads", [1, 2])
def test_a_batch_drawing_its_noise_on_several_threads_is_each_slab_alone(threads: int) -> None:
    """With torch's threads > 1 the slabs' noise is drawn in a thread pool; each slab still gets its
    own generator's noise, whichever thread draws it, and nothing else."""
    aug = SlabAugmentation()
    x = torch.from_numpy(np.random.default_rng(4).random((9, 3, 32, 32), dtype=np.float32)).half()
    seeds = list(range(200, 209))
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        batch, again = aug.batch(x, seeds), aug.batch(x, seeds)
    finally:
        torch.set_num_threads(before)
    alone = torch.stack([aug(slab.float(), seed) for slab, seed in zip(x, seeds, strict=True)])
    assert torch.equal(batch, alone) and torch.equal(again, alone)
    assert not torch.equal(batch[0], batch[1])  # different seeds, different noise
    if threads > 1:  # the noise was drawn in this process's pool of that many threads
        assert (os.getpid(), threads) in augment._POOLS


def test_a_batch_where_some_slabs_keep_their_contrast_or_get_no_noise_is_still_each_slab_alone() -> None:
    """The chain's probabilities are 1 for gamma and noise; with lower ones the batch leaves the
    slabs the chain leaves alone, and still matches it bit for bit."""
    aug = SlabAugmentation()
    _, _, contrast, noise, _ = aug.chain.transforms
    contrast.prob, noise.prob = 0.5, 0.5
    x = torch.from_numpy(np.random.default_rng(3).random((16, 3, 24, 24), dtype=np.float32)).half()
    seeds = list(range(100, 116))
    draws = [aug.draw(s) for s in seeds]
    assert 0 < sum(d.gamma is None for d in draws) < 16 and 0 < sum(d.noise is None for d in draws) < 16
    alone = torch.stack([aug(slab.float(), seed) for slab, seed in zip(x, seeds, strict=True)])
    assert torch.equal(aug.batch(x, seeds), alone)


def test_the_training_collate_flips_along_the_axes_it_was_given() -> None:
    data = _slab_set()
    dataset = AugmentedSlabs(data, train=True, flip_axes=(0, 1))
    torch.manual_seed(9)
    items = [dataset[i] for i in range(8)]
    x, _ = dataset.collate(items)
    aug = SlabAugmentation((0, 1))
    assert torch.equal(x, torch.stack([aug(data.x[i].float(), int(item[2])) for i, item in enumerate(items)]))
    assert not torch.equal(x, AugmentedSlabs(data, train=True).collate(items)[0])


def test_the_training_collate_augments_each_item_with_its_own_seed() -> None:
    data = _slab_set()
    teacher = torch.randn(len(data.y), 2)
    dataset = AugmentedSlabs(data, train=True, teacher=teacher)
    torch.manual_seed(4)
    items = [dataset[i] for i in (5, 0, 9, 3)]
    x, y, soft = dataset.collate(items)
    aug = SlabAugmentation()
    expected = torch.stack([aug(data.x[i].float(), int(item[2])) for i, item in zip((5, 0, 9, 3), items, strict=True)])
    assert torch.equal(x, expected)
    assert y.tolist() == data.y[[5, 0, 9, 3]].tolist() and torch.equal(soft, teacher[[5, 0, 9, 3]])
