"""The classifier: a MONAI network over 2.5D slabs (k slices as channels), two classes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from monai.losses import DiceCELoss
from monai.networks.nets import DenseNet121, ResNet, resnet10

from dicomops.config import TrainConfig
from dicomops.training.mobilenet import MobileNetV3Small

# The architectures that run over the slab as a volume (3-D convolutions, NDHWC weights; float32 on
# CPU under precision auto, see training.loop.train_precision).
VOLUME_ARCHITECTURES = frozenset({"resnet3d-slim"})


def model_from_config(raw: dict[str, Any]) -> torch.nn.Module:
    """The untrained network described by a logged ``train_config.json`` (a ``TrainConfig`` plus
    ``in_channels``): the builder the registry uses to rebuild a version's network."""
    return build_model(TrainConfig.from_logged(raw), int(raw["in_channels"]))


def channels_last(model: torch.nn.Module, architecture: str) -> torch.nn.Module:
    """`model` with channels-last weights, which oneDNN and cuDNN train faster: NHWC for a 2-D
    network, NDHWC for a 3-D one (:data:`VOLUME_ARCHITECTURES`). The 3-D teacher's training step
    (batch 32 of 7x128x128 slabs, float32, 2 threads, Zen 4) took 304 ms instead of 430."""
    layout = torch.channels_last_3d if architecture in VOLUME_ARCHITECTURES else torch.channels_last
    model.to(memory_format=layout)  # type: ignore[call-overload]
    return model


def load_trained(tracking_uri: str, run_id: str) -> tuple[torch.nn.Module, TrainConfig, int]:
    """The final model of training run `run_id` (eval mode), its ``TrainConfig`` and input channels."""
    from dicomops.tracking.registry import load_weights

    model, raw = load_weights(tracking_uri, run_id, model_from_config)
    return model, TrainConfig.from_logged(raw), int(raw["in_channels"])


def load_state_dict(path: Path) -> dict[str, Any]:
    state: dict[str, Any] = torch.load(path, weights_only=True)
    return state


class SlabAsVolume(torch.nn.Module):
    """A 3-D network over a slab: the (N, k, H, W) input every classifier takes becomes one channel
    of depth k, (N, 1, k, H, W), so a 3-D teacher scores the same inputs, through the same export
    contract and serving path, as the 2.5D networks."""

    def __init__(self, net: torch.nn.Module, slices: int) -> None:
        super().__init__()
        self.net = net
        self.slices = slices  # the depth it was trained on (any depth runs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.unsqueeze(1))


def build_model(cfg: TrainConfig, in_channels: int) -> torch.nn.Module:
    """The network for `in_channels`-slice slabs.

    ``resnet-slim`` is MONAI's ResNet with one basic block per stage and widths 16–128: about
    0.3 M parameters; its first 7×7 convolution has stride ``cfg.stem_stride`` (2 by default, at
    192×192: about 9 ms per training sample on two CPU cores), which keeps the demo's
    cross-validation within minutes; ``resnet10`` and ``densenet121`` are the standard
    MONAI networks for a GPU. ``resnet3d-slim`` is the same ResNet in 3-D over the slab as a volume
    (first convolution 3×7×7, in-plane stride 2; 0.9 M parameters), the distillation teacher: train
    it with a deeper slab (``preprocess.slab_slices``, say 7) for 3-D context. ``mobilenet-v3-small``
    is the lightweight student (:mod:`dicomops.training.mobilenet`), its first convolution at
    ``cfg.stem_stride`` too (train it at 1); ``mobilenet-v3-small-minimal`` its minimalistic variant
    (3×3, ReLU, no squeeze-excitation: every activation has an integer kernel).
    """
    if cfg.architecture == "resnet-slim":
        return ResNet(block="basic", layers=[1, 1, 1, 1], block_inplanes=[16, 32, 64, 128],
                      spatial_dims=2, n_input_channels=in_channels, num_classes=2,
                      conv1_t_stride=cfg.stem_stride)
    if cfg.architecture == "resnet3d-slim":
        return SlabAsVolume(ResNet(block="basic", layers=[1, 1, 1, 1], block_inplanes=[16, 32, 64, 128],
                                   spatial_dims=3, n_input_channels=1, num_classes=2,
                                   conv1_t_size=(3, 7, 7), conv1_t_stride=(1, 2, 2)),  # type: ignore[arg-type]
                            in_channels)
    if cfg.architecture in ("mobilenet-v3-small", "mobilenet-v3-small-minimal"):
        return MobileNetV3Small(in_channels, num_classes=2, stem_stride=cfg.stem_stride,
                                minimal=cfg.architecture.endswith("-minimal"))
    if cfg.architecture == "resnet10":
        return resnet10(spatial_dims=2, n_input_channels=in_channels, num_classes=2)
    return DenseNet121(spatial_dims=2, in_channels=in_channels, out_channels=2)


class NoduleMapHead(torch.nn.Module):
    """An auxiliary localisation head for training a MONAI ``ResNet`` classifier: a 1×1 convolution over
    its ``layer3`` features and its ``layer4`` features upsampled to them, giving a map of nodule
    log-odds at ``layer3``'s resolution (12×12 for a 192 px slab at stem stride 2: cells of 16 pixels).

    It reads the features through forward hooks, so the classifier itself is unchanged: the head is
    trained beside it (:func:`dicomops.training.loop.fit` with ``train.aux_mask_weight``) and thrown
    away, and what is saved, registered and exported is the plain network. The pixel-level target
    tells the network where the nodule is on the slices that have one, which the slice label alone
    does not (README, *Where it fails*). Its loss (:meth:`loss`) is MONAI's ``DiceCELoss`` on sigmoid
    outputs, Dice over the whole batch (most slabs show no nodule); with `actionable_only`, only the
    slabs labelled positive are marked (:func:`mask_target`)."""

    def __init__(self, model: torch.nn.Module, actionable_only: bool = False) -> None:
        super().__init__()
        if not isinstance(model, ResNet):
            raise ValueError(f"train.aux_mask_weight needs a MONAI ResNet (resnet-slim, resnet10), not "
                             f"{type(model).__name__}: set it to 0 for this architecture")
        width = [m.num_features for m in model.layer3.modules() if isinstance(m, torch.nn.BatchNorm2d)][-1] + \
            [m.num_features for m in model.layer4.modules() if isinstance(m, torch.nn.BatchNorm2d)][-1]
        self.conv = torch.nn.Conv2d(width, 1, kernel_size=1)
        self.actionable_only = actionable_only
        self.criterion = DiceCELoss(sigmoid=True, batch=True)
        self._features: dict[str, torch.Tensor] = {}
        self._hooks = [getattr(model, name).register_forward_hook(self._keep(name)) for name in ("layer3", "layer4")]

    def _keep(self, name: str) -> Any:
        def hook(module: torch.nn.Module, args: Any, output: torch.Tensor) -> None:
            if module.training:  # a training step's; scoring and validation run in eval mode
                self._features[name] = output
        return hook

    def forward(self) -> torch.Tensor:
        """The (N, 1, h, w) map of the model's last training-mode forward pass, in float32 whatever
        precision that pass ran in (the 1x1 convolution over 12x12 cells costs next to nothing)."""
        fine, coarse = self._features.pop("layer3"), self._features.pop("layer4")
        coarse = torch.nn.functional.interpolate(coarse, size=fine.shape[-2:], mode="nearest")
        return self.conv(torch.cat([fine, coarse], dim=1).float())

    def loss(self, masks: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The head's loss for the model's last training-mode forward pass over slabs with nodule masks
        `masks` (N, S, S) and slice labels `labels`."""
        nodule_map = self()
        target = mask_target(masks, nodule_map.shape[-2:], labels if self.actionable_only else None)
        loss: torch.Tensor = self.criterion(nodule_map, target)
        return loss

    def remove(self) -> None:
        """Detach the hooks from the classifier (before it is saved or scored)."""
        for hook in self._hooks:
            hook.remove()
        self._features.clear()


def mask_target(masks: torch.Tensor, size: torch.Size, labels: torch.Tensor | None) -> torch.Tensor:
    """The head's target: (N, 1, h, w), a cell set where any pixel of the (N, S, S) slab masks is; with
    `labels`, only on the slabs labelled positive (an actionable nodule on the centre slice), so a
    ground-glass or small nodule's cells are background."""
    target = torch.nn.functional.adaptive_max_pool2d(masks[:, None].float(), size)
    if labels is not None:
        target = target * (labels == 1).float().view(-1, 1, 1, 1)
    return target


class FocalLoss(torch.nn.Module):
    """Class-weighted focal loss (gamma 2) on two-class logits."""

    def __init__(self, weight: torch.Tensor, gamma: float = 2.0) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(weight, requires_grad=False)
        self.gamma = gamma

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logp = torch.log_softmax(logits, dim=1).gather(1, target[:, None])[:, 0]
        w = self.weight[target]
        return (-w * (1 - logp.exp()) ** self.gamma * logp).sum() / w.sum()


def class_weights(labels: torch.Tensor) -> torch.Tensor:
    """Inverse-frequency weights normalised to mean 1, from one training fold's labels."""
    counts = torch.bincount(labels, minlength=2).float().clamp(min=1)
    weights = counts.sum() / (2 * counts)
    return weights / weights.mean()


def build_loss(cfg: TrainConfig, labels: torch.Tensor) -> torch.nn.Module:
    weights = class_weights(labels)
    if cfg.loss == "focal":
        return FocalLoss(weights)
    return torch.nn.CrossEntropyLoss(weight=weights)
