"""The segmenter's parts: volumes and their indices, patch sampling, the rank split, inference, the gate."""

from __future__ import annotations

from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch

from dicomops.config import SegmentConfig
from dicomops.segmentation.data import (
    BODY_LEVEL,
    LUNG_LEVEL,
    PatchSet,
    body_box,
    border_centres,
    epoch_volumes,
    lung_border,
    lung_box,
    nodule_balanced,
    nodule_refs,
    rank_positions,
    read_volume,
    wall_nodules,
    zoomed_patch,
)
from dicomops.segmentation.model import (
    SubPixelUp3d,
    build_segmenter,
    for_inference,
    probability,
    sub_pixel_eligible,
    window_probability,
)
from dicomops.tracking.promotion import ModelScore, decide_promotion

PATCH = (16, 16, 16)


def _volume(tmp_path: Path, name: str, *, nodule: bool = True, shape: tuple[int, int, int] = (40, 40, 24)) -> Path:
    image = np.full(shape, 0.1, np.float16)  # outside the body
    image[4:-4, 4:-4, :] = 0.35  # lung
    mask = np.zeros(shape, np.uint8)
    if nodule:
        mask[10:14, 10:14, 8:12] = 1
        mask[25:28, 25:28, 5:8] = 2
        image[mask > 0] = 0.9
    path = tmp_path / f"{name}.npz"
    np.savez(path, image=image, mask=mask)
    return path


RECORDS = '[{"diameter_mm": 5.0, "kind": "solid", "attachment": "pleural"}, {"diameter_mm": 4.0, "kind": "ground-glass"}]'


def test_volume_indices_padding_and_nodule_records(tmp_path: Path) -> None:
    v = read_volume(_volume(tmp_path, "a", shape=(40, 40, 10)), "s", "ge", nodule_refs(RECORDS), PATCH)
    assert v.shape == (40, 40, 16)  # z grown to the patch, edge repeated
    assert np.array_equal(v.image[:, :, 15], v.image[:, :, 9])
    assert [(n.label, n.kind, n.attachment) for n in v.nodules] == [(1, "solid", "pleural"), (2, "ground-glass", "none")]
    flat_mask = v.mask.ravel()
    assert set(flat_mask[v.foreground]) == {1, 2} and len(v.foreground) == int((v.mask > 0).sum())
    # Background centres: inside the body, outside nodules; in the lung on the stride-2 grid, and
    # anywhere in the body on the stride-3 grid.
    assert (v.image.ravel()[v.background] > BODY_LEVEL).all() and (flat_mask[v.background] == 0).all()
    coords = np.stack(np.unravel_index(v.background, v.shape), axis=1)
    on2, on3 = (coords % 2 == 0).all(axis=1), (coords % 3 == 0).all(axis=1)
    assert (on2 | on3).all() and on2.any() and (on3 & ~on2).any()
    body = np.argwhere((v.image > BODY_LEVEL) & (v.mask == 0))
    expected = {tuple(c) for c in body if (c % 2 == 0).all() or (c % 3 == 0).all()}
    assert {tuple(c) for c in coords} == expected
    assert v.label.shape == (1, *v.shape) and set(np.unique(v.label)) == {0, 1}


def test_a_nodule_lost_in_resampling_leaves_the_reference_and_is_counted(tmp_path: Path) -> None:
    three = '[{"diameter_mm": 5.0}, {"diameter_mm": 4.0}, {"diameter_mm": 3.0}]'
    v = read_volume(_volume(tmp_path, "a"), "s", "ge", nodule_refs(three), PATCH)
    assert [n.label for n in v.nodules] == [1, 2] and v.dropped_nodules == 1
    with pytest.raises(ValueError, match="regenerate the corpus"):
        read_volume(_volume(tmp_path, "b"), "s", "ge", nodule_refs('[{"diameter_mm": 5.0}]'), PATCH)


def test_the_lung_border_is_the_band_where_lung_meets_tissue() -> None:
    image = np.full((30, 30, 30), 0.1, np.float32)  # air outside the patient
    image[2:28, 2:28, 2:28] = 0.6  # soft tissue
    image[8:22, 8:22, 8:22] = 0.35  # lung inside it
    image[8:22, 14:16, 14:16] = 0.6  # a vessel 2 voxels across
    image[2:28, 2, 2:28] = 0.35  # the skin's partial-volume rim
    band = lung_border(image, image > BODY_LEVEL, width=2)
    # Two voxels either side of the lung's faces, and nowhere deeper on either side.
    assert band[7, 10, 10] and band[6, 10, 10] and band[8, 10, 10] and band[9, 10, 10]
    assert not band[5, 10, 10] and not band[10, 10, 10] and not band[15, 10, 10]
    assert not band[15, 12, 15] and not band[15, 14, 15]  # around and on the vessel: no border
    assert not band[15, 2, 15] and not band[15, 3, 15]  # nor along the rim
    assert (image[band] > BODY_LEVEL).all()
    assert (image[band] < LUNG_LEVEL).any() and (image[band] >= LUNG_LEVEL).any()


def test_wall_nodules_are_those_touching_the_chest_wall_not_a_vessel_or_only_the_lung() -> None:
    image = np.full((40, 40, 30), 0.1, np.float32)  # air outside the patient
    image[2:38, 2:38, 2:28] = 0.9  # soft tissue (about 0 HU in the lung window)
    image[8:32, 8:32, 6:24] = 0.3  # aerated lung inside it
    mask = np.zeros(image.shape, np.uint8)
    grid = np.indices(image.shape)

    def ball(centre: tuple[int, int, int], radius: float, value: int, level: float) -> None:
        inside = sum((g - c) ** 2 for g, c in zip(grid, centre, strict=True)) <= radius ** 2
        image[inside], mask[inside] = level, value

    ball((10, 20, 15), 3.0, 1, 0.9)  # juxta-pleural: it reaches into the wall at x < 8
    ball((20, 14, 15), 2.0, 2, 0.9)  # in the lung, on a vessel one voxel across that runs to the wall
    image[20, 16:32, 15] = 0.9
    ball((20, 28, 18), 2.0, 3, 0.5)  # ground glass (about -600 HU), its edge 2 voxels from the wall at y = 32
    ball((20, 20, 10), 2.0, 4, 0.9)  # solid, in the middle of the lung
    assert wall_nodules(image, mask) == [1, 3]  # within 2 voxels of the wall
    assert wall_nodules(image, mask, reach=1) == [1]  # the ground glass is 2 voxels off
    assert wall_nodules(image, np.zeros_like(mask)) == []


def test_the_lung_border_inside_the_body_box_is_the_whole_volumes() -> None:
    from scipy import ndimage

    from dicomops.segmentation.data import BORDER_OPENING

    def opened(mask: np.ndarray) -> np.ndarray:
        return ndimage.maximum_filter(ndimage.minimum_filter(mask.view(np.uint8), BORDER_OPENING), BORDER_OPENING)

    def everywhere(image: np.ndarray, body: np.ndarray, width: int) -> np.ndarray:  # SciPy's filters, all voxels
        lung, size = body & (image < LUNG_LEVEL), 2 * width + 1
        near_lung = ndimage.maximum_filter(opened(lung), size=size).view(bool)
        near_tissue = ndimage.maximum_filter(opened(body & ~lung), size=size)
        return body & near_lung & near_tissue.view(bool)

    rng = np.random.default_rng(3)
    image = np.full((64, 56, 40), 0.1, np.float32)
    image[12:50, 9:47, 5:40] = 0.6  # a body touching the last slice, air around it elsewhere
    image[15:47, 15:41, 10:40] = 0.35  # lung, behind a chest wall 3 voxels thin (too thin to be a border) on i
    image[15:47, 15:41, 10:40] += rng.normal(0, 0.04, (32, 26, 30)).astype(np.float32)  # noise
    image[18:44, 27:29, 20:23] = 0.6  # a vessel
    for width in (1, 2, 3):
        band = lung_border(image, image > BODY_LEVEL, width=width)
        assert band.any() and np.array_equal(band, everywhere(image, image > BODY_LEVEL, width))
    assert not lung_border(np.full((9, 9, 9), 0.1), np.zeros((9, 9, 9), bool)).any()  # no body, no border


def test_cube_dilation_and_erosion_are_scipys_filters_at_every_size_and_edge() -> None:
    from scipy import ndimage

    from dicomops.segmentation.data import _cube

    rng = np.random.default_rng(5)
    for shape in [(1, 1, 1), (2, 3, 1), (4, 7, 5), (20, 17, 9), (3, 40, 2)]:
        for share in (0.1, 0.5, 0.9):
            mask = rng.random(shape) < share
            for size in (1, 3, 5, 7):
                assert np.array_equal(_cube(mask, size, grow=True),
                                      ndimage.maximum_filter(mask.view(np.uint8), size).view(bool))
                assert np.array_equal(_cube(mask, size, grow=False),
                                      ndimage.minimum_filter(mask.view(np.uint8), size).view(bool))
    with pytest.raises(ValueError, match="odd"):
        _cube(np.ones((3, 3, 3), bool), 4, grow=True)


def test_level_comparisons_of_halves_are_numpys() -> None:
    from dicomops.segmentation.data import above, below

    rng = np.random.default_rng(0)
    edge = [0.0, -0.0, np.inf, -np.inf, BODY_LEVEL, LUNG_LEVEL, 65504, -65504, 6e-8, -6e-8]
    halves = np.concatenate([rng.normal(0.3, 0.5, 20000), edge]).astype(np.float16)
    for level in (BODY_LEVEL, LUNG_LEVEL, 1e-3, 1.0):
        for image in (halves, halves.astype(np.float32)):
            assert np.array_equal(above(image, level), image > level)
            assert np.array_equal(below(image, level), image < level)
    with pytest.raises(ValueError, match="above 0"):
        above(halves, 0.0)


def test_thick_slices_average_over_each_slice_and_resample_back() -> None:
    from dicomops.segmentation.data import thick_slices

    ramp = np.broadcast_to(np.arange(40, dtype=np.float32), (2, 3, 40))
    sheet = np.zeros((1, 1, 40), np.float32)
    sheet[..., 20] = 1.0  # a structure one voxel thick across the slices
    for thickness in (2, 3):
        for phase in range(thickness):
            # A straight line stays itself between the first and last slice centre: no shift.
            out = thick_slices(ramp, thickness, phase)
            assert out.shape == ramp.shape and np.allclose(out[..., thickness:-thickness], ramp[..., thickness:-thickness])
            # A thin structure is smeared over more slices at lower contrast, its amount kept.
            smeared = thick_slices(sheet, thickness, phase)[0, 0]
            assert smeared.max() <= 1 / thickness + 1e-6 and (smeared > 0).sum() > 1
            assert abs(smeared.sum() - 1.0) < 1e-5
    # Centred on a slice, the 2 mm profile weighs the slice by half and its neighbours by a quarter.
    assert np.allclose(thick_slices(sheet, 2, 0)[0, 0, 19:22], [0.25, 0.5, 0.25])
    assert thick_slices(sheet, 1, 0) is sheet  # 1 mm slices: unchanged


def test_thick_slice_share_changes_images_not_labels(tmp_path: Path) -> None:
    volume = read_volume(_volume(tmp_path, "t"), "t", "ge", nodule_refs(RECORDS), PATCH)
    plain = PatchSet([volume], PATCH, 0.5, 16, seed=4)
    thick = PatchSet([volume], PATCH, 0.5, 16, seed=4, thick_share=1.0)
    varying = 0
    for i in range(16):
        (a, la), (b, lb) = plain[i], thick[i]
        assert torch.equal(la, lb) and a.shape == b.shape  # the same crop, flips and truth
        # The phantom is uniform along the slices but for its nodules' edges: those patches change, no other.
        along_slices = bool((a[..., 1:] != a[..., :-1]).any())
        varying += int(along_slices)
        assert torch.allclose(a, b) != along_slices
    assert varying >= 4


def test_a_zoomed_patch_shows_the_same_centre_scaled(tmp_path: Path) -> None:
    v = read_volume(_volume(tmp_path, "z"), "z", "ge", nodule_refs(RECORDS), PATCH)
    centre = (12, 12, 10)  # inside the 4-voxel cube of nodule 1, which spans 10..13 on every axis
    image, label = zoomed_patch(v.image, v.label, centre, PATCH, 1.0)
    # At scale 1 it is the plain crop of the patch around the centre (MONAI's, start = centre - 8).
    crop = (slice(4, 20), slice(4, 20), slice(2, 18))
    assert np.array_equal(image[0], v.image[crop].astype(np.float32)) and np.array_equal(label, v.label[(slice(None), *crop)])
    # Shrunk by half, the 4-voxel cube is 2 voxels wide, still at the centre; grown by 2, 8 voxels.
    # (Shrunk, the box also reaches nodule 2, at 14-15 on the first two axes: left out here.)
    for scale, width in ((0.5, 2), (2.0, 8)):
        image, label = zoomed_patch(v.image, v.label, centre, PATCH, scale)
        assert image.shape == label.shape == (1, *PATCH) and label.dtype == np.uint8
        near = label[0, :12, :12, :12]
        for axis in range(3):
            assert near.any(axis=tuple(a for a in range(3) if a != axis)).sum() == width
        assert label[0, 8, 8, 8] == 1 and image[0, 8, 8, 8] > 0.8
    # Beyond the volume's edge the box is padded with its edge: no false border in the patch.
    image, _ = zoomed_patch(v.image, v.label, (2, 2, 2), PATCH, 0.5)
    assert image.min() >= 0.1 - 1e-3


def test_scale_share_changes_some_patches_and_keeps_them_aligned(tmp_path: Path) -> None:
    volume = read_volume(_volume(tmp_path, "s"), "s", "ge", nodule_refs(RECORDS), PATCH)
    plain = PatchSet([volume], PATCH, 1.0, 24, seed=4)
    scaled = PatchSet([volume], PATCH, 1.0, 24, seed=4, scale_share=0.5, scale_range=(0.5, 0.6))
    changed = 0
    for i in range(24):
        (a, la), (b, lb) = plain[i], scaled[i]
        if torch.equal(la, lb):
            assert torch.equal(a, b)
            continue
        changed += 1
        assert lb.sum() < la.sum()  # shrunk: fewer nodule voxels
        assert (b[lb > 0] > 0.6).float().mean() > 0.9  # and the label still lies on the nodule
    assert 4 <= changed <= 20
    # At scale 1 every patch is cut again around the crop's own centre: MONAI's patch, bit for bit.
    mixed = PatchSet([volume], PATCH, 0.5, 24, seed=4)  # nodule and background centres
    same = PatchSet([volume], PATCH, 0.5, 24, seed=4, scale_share=1.0, scale_range=(1.0, 1.0))
    for i in range(24):
        (a, la), (b, lb) = mixed[i], same[i]
        assert torch.equal(a, b) and torch.equal(la, lb)


def test_border_centres_take_their_share_of_the_background() -> None:
    others, border = np.arange(0, 300), np.arange(1000, 1050)
    out = border_centres(others, border, 0.25, seed=1)  # 100 border centres: each at least once
    assert len(out) == 400 and np.isin(out[300:], border).all() and set(out[300:]) == set(border.tolist())
    few = border_centres(others, border, 0.1, seed=1)  # 33 of them, no repeats
    assert len(few) == 333 and len(set(few[300:].tolist())) == 33
    assert np.array_equal(border_centres(others, border, 0.1, seed=1), few)
    assert np.array_equal(border_centres(others, border, 0.0, seed=1), others)
    assert np.array_equal(border_centres(others, border[:0], 0.3, seed=1), others)


def test_border_share_puts_background_centres_on_the_lung_edge(tmp_path: Path) -> None:
    path = _volume(tmp_path, "a")
    with np.load(path) as npz:
        image, mask = npz["image"].copy(), npz["mask"]
    image[image == np.float16(0.35)] = 0.6  # soft tissue, with a lung inside it touching a nodule
    image[8:32, 8:32, 4:20] = np.where(mask[8:32, 8:32, 4:20] > 0, image[8:32, 8:32, 4:20], 0.35)
    np.savez(path, image=image, mask=mask)
    plain = read_volume(path, "s", "ge", nodule_refs(RECORDS), PATCH)
    hard = read_volume(path, "s", "ge", nodule_refs(RECORDS), PATCH, border_share=0.4)
    edge = lung_border(hard.image, hard.image > BODY_LEVEL).ravel() & (hard.mask.ravel() == 0)
    assert np.array_equal(hard.background[: len(plain.background)], plain.background)
    added = hard.background[len(plain.background):]
    assert edge.sum() > 1000 and edge[added].all() and abs(len(added) / len(hard.background) - 0.4) < 0.01
    assert (hard.mask.ravel()[hard.background] == 0).all()


def test_patches_depend_on_seed_epoch_and_position_only(tmp_path: Path) -> None:
    vols = [read_volume(_volume(tmp_path, f"v{i}", nodule=i != 1), f"s{i}", "ge",
                        nodule_refs(RECORDS if i != 1 else "[]"), PATCH) for i in range(3)]
    a, b = PatchSet(vols, PATCH, 0.5, 12, seed=5), PatchSet(vols, PATCH, 0.5, 12, seed=5)
    order = [7, 3, 11, 0]
    first = [a[i] for i in order]
    second = [b[i] for i in reversed(order)][::-1]  # another order, another object: the same patches
    for (x1, y1), (x2, y2) in zip(first, second, strict=True):
        assert x1.shape == (1, *PATCH) and x1.dtype == torch.float32 and y1.shape == (1, *PATCH)
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    a.set_epoch(2)
    assert not all(torch.equal(a[i][0], x) for i, (x, _) in zip(order, first, strict=True))
    # Labels follow the image through the crop and the flips: nodule voxels are the bright ones.
    for i in range(12):
        x, y = a[i]
        assert torch.equal(y > 0, x > 0.8)


def test_patches_through_monai_loaders_are_the_indexed_ones(tmp_path: Path) -> None:
    """MONAI's DataLoader reseeds the random transforms it finds in a dataset: a patch must still
    depend on its position only, in whatever share of the positions a DDP rank loads."""
    from monai.data import DataLoader, ThreadDataLoader

    vols = [read_volume(_volume(tmp_path, f"v{i}"), f"s{i}", "ge", nodule_refs(RECORDS), PATCH) for i in range(2)]
    patches = PatchSet(vols, PATCH, 0.5, 16, seed=2)
    patches.set_epoch(3)
    direct = [patches[i] for i in range(16)]
    for positions in (rank_positions(16, 4, 0, 1), rank_positions(16, 4, 1, 2)):
        for loader in (ThreadDataLoader(patches, buffer_size=2, batch_size=2, sampler=positions, num_workers=0),
                       DataLoader(patches, batch_size=2, sampler=positions, num_workers=0)):
            images = torch.cat([x for x, _ in loader])
            assert torch.equal(images, torch.stack([direct[i][0] for i in positions]))


def test_positive_share_of_patches(tmp_path: Path) -> None:
    vols = [read_volume(_volume(tmp_path, "v"), "s", "ge", nodule_refs(RECORDS), PATCH)]
    patches = PatchSet(vols, PATCH, 0.75, 200, seed=0)
    with_nodule = np.mean([float(patches[i][1].sum() > 0) for i in range(200)])
    # 3 in 4 patches are centred on a nodule voxel; a background-centred patch can still touch one.
    assert 0.7 <= with_nodule <= 0.95


def test_balanced_patches_centre_on_every_nodule_equally_often(tmp_path: Path) -> None:
    vol = read_volume(_volume(tmp_path, "v"), "s", "ge", nodule_refs(RECORDS), PATCH)
    # Nodule 1 has 64 voxels, nodule 2 has 27: each appears 64 times, every voxel of each at least twice.
    balanced = nodule_balanced(vol.mask)
    ids = vol.mask.ravel()[balanced]
    assert (ids == 1).sum() == (ids == 2).sum() == 64
    counts = np.unique(balanced[ids == 2], return_counts=True)[1]
    assert set(balanced) == set(vol.foreground) and len(counts) == 27 and counts.min() == 2 and counts.max() == 3
    assert len(nodule_balanced(np.zeros((4, 4, 4), np.uint8))) == 0
    # A 16-voxel patch centred on one nodule holds all of it and none of the other, so the label's
    # voxel count says which: drawn from all nodule voxels the small one gets 27/91 of the patches.
    shares = {}
    for balance in (False, True):
        patches = PatchSet([vol], PATCH, 1.0, 400, seed=0, balance_nodules=balance)
        sizes = [int(patches[i][1].sum()) for i in range(400)]
        assert set(sizes) <= {27, 64}
        shares[balance] = sizes.count(27) / 400
    assert 0.22 < shares[False] < 0.38 and 0.42 < shares[True] < 0.58


def test_each_rank_takes_its_share_of_every_global_batch() -> None:
    assert rank_positions(10, 4, 0, 2) == [0, 1, 4, 5]
    assert rank_positions(10, 4, 1, 2) == [2, 3, 6, 7]  # the incomplete last batch is left out on every rank
    assert sorted(rank_positions(16, 4, 0, 1)) == list(range(16))
    with pytest.raises(ValueError, match="divisible"):
        rank_positions(16, 3, 0, 2)
    counts = np.bincount(epoch_volumes(5, 23, seed=1, epoch=3), minlength=5)
    assert counts.max() - counts.min() <= 1  # every volume about equally often


def test_sliding_window_covers_volumes_of_any_size() -> None:
    cfg = SegmentConfig(channels=(4, 8), strides=(2,), patch=(16, 16, 16), roi=(32, 32, 16), precision="fp32")
    model = build_segmenter(cfg)
    for shape in [(40, 36, 10), (64, 64, 20)]:  # smaller than the window in z; several windows
        prob = probability(model, np.random.default_rng(0).random(shape, dtype=np.float32), cfg)
        assert prob.shape == shape and prob.dtype == np.float32
        assert prob.min() >= 0.0 and prob.max() <= 1.0


def test_body_box_keeps_the_body_a_margin_and_at_least_a_window() -> None:
    image = np.zeros((60, 50, 30), np.float32)
    image[20:30, 10:40, 5:25] = 0.5  # the body, in air
    assert body_box(image, 2, (8, 8, 8)) == (slice(18, 32), slice(8, 42), slice(3, 27))
    # grown to the window, centred, and shifted inward at the volume's edge
    assert body_box(image, 0, (16, 16, 28)) == (slice(17, 33), slice(10, 40), slice(1, 29))
    image[:, :, :] = 0.0
    image[58:, 0:2, 0] = 0.5
    assert body_box(image, 1, (16, 4, 8)) == (slice(44, 60), slice(0, 4), slice(0, 8))
    assert body_box(np.zeros((5, 6, 7)), 3, (4, 4, 4)) == (slice(0, 5), slice(0, 6), slice(0, 7))  # no body
    assert body_box(np.ones((5, 6, 7)), 3, (64, 64, 64)) == (slice(0, 5), slice(0, 6), slice(0, 7))


def test_the_lungs_box_leaves_out_the_chest_wall_the_skins_rim_and_small_gas() -> None:
    image = np.full((80, 64, 32), 0.1, np.float32)  # air
    image[10:70, 8:56, :] = 0.6  # the body
    image[20:35, 16:40, 4:28] = image[45:60, 16:40, 4:28] = 0.35  # two lungs
    image[10, 8:56, :] = 0.35  # the skin's partial-volume rim: one voxel thin
    image[65:68, 50:53, 10:13] = 0.35  # a gas bubble smaller than the opening's cube
    assert lung_box(image, 2, (8, 8, 8)) == (slice(18, 62), slice(14, 42), slice(2, 30))
    assert body_box(image, 2, (8, 8, 8)) == (slice(8, 72), slice(6, 58), slice(0, 32))
    assert lung_box(image, 0, (8, 32, 8)) == (slice(20, 60), slice(12, 44), slice(4, 28))  # at least a window
    image[image == 0.35] = 0.6  # no lung: the body's box
    assert lung_box(image, 2, (8, 8, 8)) == body_box(image, 2, (8, 8, 8))
    assert lung_box(np.zeros((5, 6, 7)), 3, (4, 4, 4)) == (slice(0, 5), slice(0, 6), slice(0, 7))  # nothing at all


def test_inference_scores_the_lungs_box_only_and_matches_the_uncropped_window_inside() -> None:
    cfg = SegmentConfig(channels=(4, 8), strides=(2,), patch=(16, 16, 16), roi=(16, 16, 16), precision="fp32",
                        sw_batch_size=5)
    model = build_segmenter(cfg)
    rng = np.random.default_rng(1)
    image = np.full((80, 64, 32), 0.1, np.float32)  # air
    image[16:64, 8:56, :] = 0.5 + 0.3 * rng.random((48, 48, 32), dtype=np.float32)  # the body
    image[24:56, 24:40, :] = 0.3 + 0.1 * rng.random((32, 16, 32), dtype=np.float32)  # lung
    prob = probability(model, image, cfg)
    box = lung_box(image, 8, (16, 16, 16))
    assert box == (slice(16, 64), slice(16, 48), slice(0, 32))  # the body is wider on j
    assert body_box(image, 8, (16, 16, 16)) == (slice(8, 72), slice(0, 64), slice(0, 32))
    outside = np.ones(image.shape, bool)
    outside[box] = False
    body = image > BODY_LEVEL
    assert (body & outside).any() and prob[outside].max() == 0.0  # chest wall beyond the box: not scored
    assert prob[body & ~outside].min() > 0.0 and prob[~body].max() == 0.0  # nothing at air density is nodule
    # The same windows on the box alone: the crop changes where they are cut, nothing else.
    alone = probability(model, np.ascontiguousarray(image[box]), cfg)
    np.testing.assert_allclose(prob[box], alone, atol=1e-6)


def test_the_config_refuses_sizes_the_network_cannot_halve() -> None:
    with pytest.raises(ValueError, match="divisible by 8"):
        SegmentConfig(patch=(48, 48, 20))
    with pytest.raises(ValueError, match="one entry more"):
        SegmentConfig(channels=(8, 16), strides=(2, 2))
    for bad in ((1.4, 0.7), (0.0, 1.2)):
        with pytest.raises(ValueError, match="smaller first"):
            SegmentConfig(scale_range=bad)


def test_the_gate_speaks_of_the_metric_it_judges() -> None:
    first = decide_promotion(ModelScore(0.91, {"ge": 0.9}), None, min_auc=0.8, metric="CPM")
    assert first.promote and "mean CPM 0.9100 >= 0.8000" in first.reasons[0]
    worse = decide_promotion(ModelScore(0.95, {"ge": 0.80, "siemens": 0.99}),
                             ModelScore(0.90, {"ge": 0.90, "siemens": 0.90}), vendor_tolerance=0.05, metric="CPM")
    assert not worse.promote and any("ge: CPM drops 0.9000 -> 0.8000" in r for r in worse.reasons)


@pytest.mark.parametrize(("cin", "cout", "bias"), [(16, 2, True), (5, 3, False)])
def test_sub_pixel_up_sampling_is_the_transposed_convolution(cin: int, cout: int, bias: bool) -> None:
    torch.manual_seed(0)
    layer = torch.nn.ConvTranspose3d(cin, cout, 3, stride=2, padding=1, output_padding=1, bias=bias)
    x = torch.randn(2, cin, 3, 5, 4)  # odd and even sizes: every phase meets the far edge
    with torch.no_grad():
        expected, got = layer(x), SubPixelUp3d(layer)(x)
    assert got.shape == expected.shape == (2, cout, 6, 10, 8)
    assert torch.allclose(got, expected, atol=1e-5)
    with pytest.raises(ValueError, match="stride 2"):
        SubPixelUp3d(torch.nn.ConvTranspose3d(4, 2, 3, stride=1, padding=1))


def test_the_inference_form_rewrites_only_the_narrow_up_sampling_and_scores_alike() -> None:
    torch.manual_seed(0)
    model = build_segmenter(SegmentConfig())
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)  # trained-like weights, not the near-zero output of a fresh network
    net = for_inference(model)
    rewritten = [name for name, layer in net.named_modules() if isinstance(layer, SubPixelUp3d)]
    ups = [name for name, layer in model.named_modules() if isinstance(layer, torch.nn.ConvTranspose3d)]
    assert len(ups) == 3 and rewritten == [name for name in ups if sub_pixel_eligible(model.get_submodule(name))]
    assert rewritten == ["model.2.0.conv"]  # 16 -> 1 channels; the wider ones stay as trained
    assert isinstance(model.get_submodule("model.2.0.conv"), torch.nn.ConvTranspose3d)  # the model is untouched
    x = torch.randn(2, 1, 32, 32, 32)
    model.eval()
    with torch.no_grad():
        assert torch.allclose(net(x), model(x), atol=1e-4)
    image = np.random.default_rng(0).uniform(0.0, 1.0, (40, 36, 34)).astype(np.float32)
    cfg = SegmentConfig(sw_batch_size=4)
    with torch.inference_mode():
        plain = window_probability(model, image, cfg)
    assert np.abs(probability(model, image, cfg) - plain).max() < 1e-5
    # The form made once for many volumes scores as the one each call makes, and is not copied again.
    expected = probability(model, image, cfg)
    with mock.patch("dicomops.segmentation.model.for_inference", side_effect=AssertionError("copied again")):
        assert np.array_equal(probability(net, image, cfg, prepared=True), expected)


def test_the_teachers_cache_key_is_the_code_this_process_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Source edited on disk under a running process must not re-key what its imported code computes."""
    from dicomops import stages
    from dicomops.segmentation import teacher

    teacher.scores_code.cache_clear()
    first = teacher.scores_code()
    assert first == stages.code_hash(*teacher.SCORES_MODULES)
    monkeypatch.setattr(stages, "_read_source", lambda path: b"edited since")
    assert stages.code_hash(*teacher.SCORES_MODULES) != first  # what the disk now says
    assert teacher.scores_code() == first  # what this process runs
    teacher.scores_code.cache_clear()
