"""The auxiliary localisation head (`train.aux_mask_weight`): masks that follow their slabs through the
resize and the flip, a head that learns where the nodule is from the features it reads, and a training
that leaves the plain classifier behind (its resumption is one case of test_training_resume.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from dicomops.config import TrainConfig
from dicomops.training.augment import SlabAugmentation
from dicomops.training.data import masks_at, slabs_at
from dicomops.training.loop import fit, load_checkpoint
from dicomops.training.model import NoduleMapHead, build_model, mask_target
from tests.toy_slabs import toy_slabs

CFG = TrainConfig(epochs=2, input_size=32, batch_size=16, patience=5, precision="fp32", num_workers=0,
                  aux_mask_weight=1.0)


@pytest.mark.parametrize("flip_axes", [(0,), (0, 1)])
def test_masks_flip_with_their_slabs_and_the_slabs_are_augmented_as_without_them(flip_axes: tuple[int, ...]) -> None:
    aug = SlabAugmentation(flip_axes)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(24, 3, 16, 16, generator=g)
    masks = torch.zeros(24, 16, 16, dtype=torch.bool)
    masks[:, 2:5, 9:11] = True  # off every axis of symmetry: a flip moves it
    seeds = list(range(100, 124))
    out, moved = aug.batch_with_masks(x, masks, seeds)
    assert torch.equal(out, aug.batch(x, seeds))
    flips = [aug.draw(s).flips for s in seeds]
    assert {axis for f in flips for axis in f} == set(flip_axes) and () in flips
    for i, axes in enumerate(flips):
        assert torch.equal(moved[i], masks[i].flip([a - 2 for a in axes]) if axes else masks[i])
    assert masks[:, 2:5, 9:11].all()  # the caller's masks are left as they were
    with pytest.raises(ValueError, match=r"one \(16, 16\) mask per slab"):
        aug.batch_with_masks(x, masks[:3], seeds)


def test_masks_at_marks_the_nodule_where_the_resized_slab_shows_it() -> None:
    volume = np.zeros((64, 64, 6), np.float32)
    mask = np.zeros((64, 64, 6), np.uint8)
    volume[10:14, 40:44, 2] = 1.0
    mask[10:14, 40:44, 2] = 3  # an instance id, not 1
    mask[50, 5, 3] = 7  # one voxel: smaller than a pixel of the 32 px slab, still marked
    marks = masks_at(mask, np.array([2, 3, 0]), 32)
    assert marks.shape == (3, 32, 32) and marks.dtype == torch.bool
    shown = slabs_at(volume, np.array([2]), 1, 32)[0, 0] > 0
    assert torch.equal(marks[0], shown) and int(marks[0].sum()) == 4
    assert marks[1].nonzero().tolist() == [[25, 2]]
    assert not marks[2].any()


def test_the_target_marks_every_nodule_or_only_those_of_positive_slabs() -> None:
    masks = torch.zeros(2, 32, 32, dtype=torch.bool)
    masks[:, 4:6, 20:22] = True
    every = mask_target(masks, torch.Size([4, 4]), None)
    assert every.shape == (2, 1, 4, 4)
    assert every[:, 0].nonzero().tolist() == [[0, 0, 2], [1, 0, 2]]  # the 8-pixel cell (0, 2) of each
    actionable = mask_target(masks, torch.Size([4, 4]), torch.tensor([0, 1]))
    assert not actionable[0].any() and torch.equal(actionable[1], every[1])
    # The head applies the rule it was built with: its loss on a negative slab's nodule differs.
    model = build_model(TrainConfig(input_size=32), 3).train()
    x = torch.rand(2, 3, 32, 32)
    losses = []
    for only in (False, True):
        head = NoduleMapHead(model, actionable_only=only)
        model(x)
        losses.append(float(head.loss(masks, torch.tensor([0, 1]))))
        head.remove()
    assert losses[0] != losses[1]


def test_the_head_learns_where_the_nodule_is_from_the_features_it_reads() -> None:
    torch.manual_seed(0)
    model = build_model(TrainConfig(input_size=64), 3)
    head = NoduleMapHead(model)
    assert head.conv.in_channels == 64 + 128  # layer3's and layer4's widths of resnet-slim

    def batch(n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.rand(n, 3, 64, 64, generator=g) * 0.3
        masks = torch.zeros(n, 64, 64, dtype=torch.bool)
        cells = torch.randint(0, 4, (n, 2), generator=g)  # one 16-pixel cell of the 4x4 map each
        for i, (r, c) in enumerate(cells.tolist()):
            x[i, :, 16 * r + 5 : 16 * r + 11, 16 * c + 5 : 16 * c + 11] += 0.7
            masks[i, 16 * r + 5 : 16 * r + 11, 16 * c + 5 : 16 * c + 11] = True
        return x, masks

    optimizer = torch.optim.AdamW([*model.parameters(), *head.parameters()], lr=3e-3)
    g = torch.Generator().manual_seed(1)
    model.train()
    for _ in range(60):
        x, masks = batch(32, g)
        model(x)
        loss = head.loss(masks, torch.zeros(len(x), dtype=torch.long))  # every nodule: labels unread
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    x, masks = batch(64, torch.Generator().manual_seed(2))
    with torch.no_grad():
        model(x)  # still training mode: the hooks keep this pass's features
        found = head()[:, 0].flatten(1).argmax(1)
    truth = mask_target(masks, torch.Size([4, 4]), None)[:, 0].flatten(1).argmax(1)
    assert float((found == truth).float().mean()) >= 0.9
    head.remove()
    model.eval()
    model(x)
    assert not head._features  # no hook left on the classifier


def test_a_training_with_the_head_returns_the_plain_classifier_and_keeps_the_head_in_its_checkpoint(
        tmp_path: Path) -> None:
    train = toy_slabs(64, 0, masks=True)
    result = fit(train, toy_slabs(32, 1), CFG, tmp_path / "a.pt", seed=1)
    plain = build_model(CFG, 3)
    assert result.model.state_dict().keys() == plain.state_dict().keys()
    assert not any(m._forward_hooks for m in result.model.modules())
    state = load_checkpoint(tmp_path / "a.pt")
    assert state is not None and set(state["aux_head"]) == {"conv.weight", "conv.bias"}
    # The head's loss changed what the classifier learnt.
    without = fit(train, toy_slabs(32, 1), CFG.model_copy(update={"aux_mask_weight": 0.0}), tmp_path / "b.pt", seed=1)
    assert [h["train_loss"] for h in result.history] != [h["train_loss"] for h in without.history]
    assert any(not torch.equal(a, b) for a, b in zip(result.model.state_dict().values(),
                                                     without.model.state_dict().values(), strict=True))


def test_what_the_head_needs_is_asked_for_with_what_to_change(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"needs the slabs' nodule masks.*masks=True"):
        fit(toy_slabs(32, 0), None, CFG, tmp_path / "a.pt", seed=1)
    student = CFG.model_copy(update={"architecture": "mobilenet-v3-small"})
    with pytest.raises(ValueError, match=r"needs a MONAI ResNet.*set it to 0"):
        fit(toy_slabs(32, 0, masks=True), None, student, tmp_path / "b.pt", seed=1)
    # A checkpoint written without the head is not resumed with one.
    with pytest.raises(InterruptedError):
        fit(toy_slabs(32, 0, masks=True), None, CFG.model_copy(update={"aux_mask_weight": 0.0}), tmp_path / "c.pt",
            seed=1, stop_after=1)
    with pytest.raises(ValueError, match=r"without train\.aux_mask_weight"):
        fit(toy_slabs(32, 0, masks=True), None, CFG, tmp_path / "c.pt", seed=1)
