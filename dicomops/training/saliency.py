"""Where the classifier looked: Grad-CAM maps of the nodule evidence over a slab.

Grad-CAM (MONAI's :class:`monai.visualize.GradCAM`) weights the activations of the network's last
convolutional stage by the gradient of the *nodule evidence*, the logit difference
``nodule - no nodule``. The softmax probability of a nodule is a monotone function of that
difference, so the map shows what pushed the score up; the logit of one class alone can rise
together with the other's and would show regions that leave the score unchanged.

The last stage of the slim ResNet is 1/32 of the input (4 × 4 cells at 128 px), so the map is
coarse: it says which part of the slice, not which voxel.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import cast

import numpy as np
import torch
from torch import nn

from dicomops.config import TrainConfig
from dicomops.layout import WorkLayout

# The last convolutional stage of MONAI's ResNet (2-D, or 3-D inside the teacher's SlabAsVolume)
# and of its DenseNet121, in that order.
TARGET_LAYERS = ("layer4", "class_layers.relu")


def default_target_layer(model: nn.Module) -> str:
    """The layer Grad-CAM reads: the last convolutional stage of a MONAI ResNet or DenseNet, else
    the last ``Conv2d`` of the network."""
    names = dict(model.named_modules())
    for name in TARGET_LAYERS:
        if name in names:
            return name
    convs = [name for name, module in model.named_modules() if isinstance(module, nn.Conv2d)]
    if not convs:
        raise ValueError(f"{type(model).__name__} has no Conv2d layer for Grad-CAM; pass target_layer= "
                         "with the name of the layer whose activations should be mapped")
    return convs[-1]


def input_channels(model: nn.Module) -> int:
    """The slab depth k the network expects: the input channels of its first ``Conv2d``, or the
    depth a 3-D network over the slab was built for."""
    if isinstance(slices := getattr(model, "slices", None), int):
        return slices
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            return int(module.in_channels)
    raise ValueError(f"{type(model).__name__} has no Conv2d layer; cannot tell how many slices a slab has")


class _NoduleEvidence(nn.Module):
    """The network's ``nodule - no nodule`` logit difference, as a one-column output."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.net(x)
        return (logits[:, 1] - logits[:, 0])[:, None]


def saliency_maps(model: nn.Module, slabs: torch.Tensor, target_layer: str | None = None) -> np.ndarray:
    """Grad-CAM of the nodule evidence for a batch of (N, k, H, W) slabs: (N, H, W), each in [0, 1].

    Each map is divided by its own maximum, so 1 is where that slab's evidence peaks and 0 where
    there is none; a slab with no positive evidence anywhere gets a map of zeros. The model is
    copied first: MONAI registers hooks it never removes, and the caller's model stays as it was.
    """
    from monai.visualize import GradCAM

    if slabs.ndim != 4:
        raise ValueError(f"slabs must be (N, k, H, W), got shape {tuple(slabs.shape)}; add a batch axis")
    if slabs.shape[1] != input_channels(model):
        raise ValueError(f"slabs have {slabs.shape[1]} slices but the model expects {input_channels(model)}")
    from dicomops.training.model import SlabAsVolume

    inputs = slabs.detach().float().cpu()
    if isinstance(model, SlabAsVolume):  # Grad-CAM of the 3-D network itself, over the slab as a volume
        model, inputs = model.net, inputs[:, None]
    layer = target_layer or default_target_layer(model)
    net = copy.deepcopy(model).cpu().float().eval()
    net.to(memory_format=torch.contiguous_format)  # type: ignore[call-overload]
    cam = GradCAM(_NoduleEvidence(net), target_layers=f"net.{layer}", postprocessing=lambda m: m)
    with torch.enable_grad():
        # The input asks for gradients too, so a network with frozen weights still has some.
        maps = cam(inputs.requires_grad_(True), class_idx=0).detach()[:, 0]
    if maps.ndim == 4:  # a 3-D map over the slab's depth: the centre slice is the one scored
        maps = maps[:, maps.shape[1] // 2]
    peak = maps.flatten(1).amax(dim=1).clamp(min=1e-12)
    return (maps / peak[:, None, None]).clamp(0.0, 1.0).numpy()


def saliency_map(model: nn.Module, slab: torch.Tensor, target_layer: str | None = None) -> np.ndarray:
    """Grad-CAM of the nodule evidence for one (k, H, W) slab: an (H, W) map in [0, 1]."""
    if slab.ndim != 3:
        raise ValueError(f"slab must be (k, H, W), got shape {tuple(slab.shape)}")
    return saliency_maps(model, slab[None], target_layer)[0]


def fold_models(layout: WorkLayout, cfg: TrainConfig, folds: Sequence[int]) -> dict[int, nn.Module]:
    """Each fold's best weights (as :func:`dicomops.training.loop.fit` returned them), in eval mode.

    These are the out-of-fold models: the one of fold ``i`` scored fold ``i``'s validation series
    without having seen them, so its map explains that score. The slab depth is read from the
    checkpoint (older ones: from the weights of the first convolution).
    """
    from dicomops.training.loop import load_checkpoint
    from dicomops.training.model import build_model

    models: dict[int, nn.Module] = {}
    for fold in sorted(set(int(f) for f in folds)):
        path: Path = layout.train.fold(fold) / "checkpoint.pt"
        state = load_checkpoint(path)
        if state is None:
            raise FileNotFoundError(f"{path} does not exist; train fold {fold} before drawing its saliency")
        weights = cast(dict[str, torch.Tensor], state.get("best_model") or state["model"])
        k = state.get("in_channels") or next(v for v in weights.values() if v.ndim == 4).shape[1]
        model = build_model(cfg, int(k))  # type: ignore[call-overload]
        model.load_state_dict(weights)
        models[fold] = model.eval()
    return models
