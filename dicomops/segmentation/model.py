"""The segmenter: MONAI's 3D ``UNet``, ``DiceFocalLoss``, and sliding-window inference on whole volumes.

Instance normalisation, not batch normalisation: a patch's statistics are its own, so a DDP rank
holding half the batch computes what one process would (no SyncBatchNorm needed). The price is that
a window is normalised over its own extent, so inference must use windows of the training patch's
size: with 160x160x64 windows, a fold-0 model trained on 32^3 patches scored eight of the demo's
series at a mean Dice of nodules >= 6 mm of 0.61, with predicted diameters 1.3x too large; with
32^3 windows, 0.80 and 0.94x. The Dice term is per patch (``batch=False``) so the loss is a plain mean over
patches, which DDP's gradient averaging reproduces exactly.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable
from typing import Any, TypeGuard

import numpy as np
import torch
import torch.nn.functional as F

from dicomops.config import SegmentConfig
from dicomops.segmentation.data import BODY_LEVEL, above, lung_box


def build_segmenter(cfg: SegmentConfig) -> torch.nn.Module:
    from monai.networks.nets import UNet

    return UNet(spatial_dims=3, in_channels=1, out_channels=1, channels=tuple(cfg.channels),
                strides=tuple(cfg.strides), num_res_units=1, norm="INSTANCE")


def build_loss(cfg: SegmentConfig) -> torch.nn.Module:
    from monai.losses import DiceFocalLoss

    # Smoothing 1 (not 1e-5): a patch without nodule then costs about its predicted nodule volume
    # instead of a flat 1 for any prediction at all, which taught the network to predict blobs
    # (measured on fold 0 of the demo: Dice of nodules >= 6 mm 0.57 with 1e-5).
    return DiceFocalLoss(sigmoid=True, batch=False, gamma=cfg.focal_gamma, lambda_dice=cfg.lambda_dice,
                         lambda_focal=cfg.lambda_focal, smooth_nr=1.0, smooth_dr=1.0)


# Which tap of a kernel-3, stride-2, padding-1 transposed convolution carries input position m + d
# (d = 0 or 1) to output position 2m + p (p = 0 even, 1 odd), per axis; no entry, no tap.
_TAPS = {(0, 0): 1, (1, 0): 2, (1, 1): 0}


def _phase_taps() -> torch.Tensor:
    """For each of the 8 output phases and the 8 input offsets of a 2x2x2 window, the flat index of
    the 3x3x3 kernel tap it uses (27: none, a zero weight)."""
    index = []
    for phase in itertools.product((0, 1), repeat=3):
        for offset in itertools.product((0, 1), repeat=3):
            taps = [_TAPS.get((p, d)) for p, d in zip(phase, offset, strict=True)]
            index.append(27 if None in taps else taps[0] * 9 + taps[1] * 3 + taps[2])  # type: ignore[operator]
    return torch.tensor(index)


def sub_pixel_eligible(layer: torch.nn.Module) -> TypeGuard[torch.nn.ConvTranspose3d]:
    """Whether :class:`SubPixelUp3d` computes `layer` (a UNet's up-sampling transposed convolution)
    faster: only where it has at most an eighth as many output channels as input channels.

    The rewrite convolves to 8x the output channels; oneDNN's transposed convolution is slow
    where it has few of them. Per layer of the demo's segmenter, 16 windows of 32^3 in bfloat16 on
    2 threads of a Zen 4 (2026-12-04): 16 -> 1 channels 9.45 ms as a transposed convolution, 3.28 ms
    rewritten; 32 -> 8 2.89 and 2.91 ms; 96 -> 16 0.86 and 1.70 ms.
    """
    return _doubling(layer) and layer.out_channels * 8 <= layer.in_channels


def _doubling(layer: torch.nn.Module) -> TypeGuard[torch.nn.ConvTranspose3d]:
    """Whether `layer` is the transposed convolution :class:`SubPixelUp3d` computes."""
    return (isinstance(layer, torch.nn.ConvTranspose3d) and layer.kernel_size == (3, 3, 3)
            and layer.stride == (2, 2, 2) and layer.padding == (1, 1, 1) and layer.output_padding == (1, 1, 1)
            and layer.dilation == (1, 1, 1) and layer.groups == 1 and layer.padding_mode == "zeros")


class SubPixelUp3d(torch.nn.Module):
    """A transposed convolution of kernel 3, stride 2, padding 1 and output padding 1, computed as
    one 2x2x2 convolution to 8x the output channels (one per output phase: even or odd along each
    axis) followed by a 3-D pixel shuffle (Shi et al.'s sub-pixel convolution). The same function
    of the same weights, summed in another order (max |difference| about 3e-6 on the segmenter's
    logits in float32); for inference, the weights are copied from `layer` and not trained.
    """

    def __init__(self, layer: torch.nn.ConvTranspose3d) -> None:
        super().__init__()
        if not _doubling(layer):
            raise ValueError(f"SubPixelUp3d computes a transposed convolution of kernel 3, stride 2, padding 1 and "
                             f"output padding 1 (no dilation, groups or padding mode), not {layer}")
        cin, cout = layer.in_channels, layer.out_channels
        w = layer.weight.detach().reshape(cin, cout, 27)
        w = torch.cat([w, w.new_zeros(cin, cout, 1)], dim=2)[:, :, _phase_taps()]
        # Output channel c * 8 + phase, as MONAI's pixelshuffle reads them.
        self.weight = torch.nn.Parameter(w.reshape(cin, cout, 8, 2, 2, 2).permute(1, 2, 0, 3, 4, 5)
                                         .reshape(cout * 8, cin, 2, 2, 2).contiguous(), requires_grad=False)
        bias = layer.bias.detach() if layer.bias is not None else torch.zeros(cout, dtype=w.dtype, device=w.device)
        self.bias = torch.nn.Parameter(bias.repeat_interleave(8).clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from monai.networks.utils import pixelshuffle

        return pixelshuffle(F.conv3d(F.pad(x, (0, 1, 0, 1, 0, 1)), self.weight, self.bias), spatial_dims=3,
                            scale_factor=2)


def for_inference(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of `model` in eval mode for scoring, with each transposed convolution that
    :func:`sub_pixel_eligible` picks computed by :class:`SubPixelUp3d`; `model` is left as it is.
    On the demo's segmenter, 16 windows took 22.4 ms instead of 28.5 (bfloat16, 2 threads, Zen 4)."""
    net = copy.deepcopy(model).eval()
    for name, layer in list(net.named_modules()):
        if sub_pixel_eligible(layer):
            parent, _, attribute = name.rpartition(".")
            setattr(net.get_submodule(parent), attribute, SubPixelUp3d(layer))
    return net


def crop_margin(cfg: SegmentConfig) -> int:
    """Voxels of tissue kept around the lungs' box (:func:`~dicomops.segmentation.data.lung_box`):
    half a window, so that a window can be centred on any voxel of the lungs and see around it what
    a training patch centred there saw. With 8, a 14 mm pleural nodule at the lung's outer edge of
    a held-out series was segmented 1.87 elongated instead of 1.54 (windows cut elsewhere) and lost
    as a finding."""
    return max(cfg.roi) // 2


def window_probability(predict: Callable[[torch.Tensor], torch.Tensor], image: np.ndarray,
                       cfg: SegmentConfig) -> np.ndarray:
    """Nodule probability of every voxel of an (X, Y, Z) volume from `predict` (a batch of windows
    → their logits), by MONAI's Gaussian-weighted sliding windows of ``cfg.roi``, ``cfg.sw_batch_size``
    windows per call, over the lungs' box only (:func:`~dicomops.segmentation.data.lung_box`; 0 outside
    it); voxels at air density are 0.

    Logits are blended and the sigmoid comes last. The torch model and the ONNX session both go
    through here, so they agree to float rounding.
    """
    from monai.inferers import sliding_window_inference

    box = lung_box(image, crop_margin(cfg), cfg.roi)
    # numpy copies the box in its own type and torch converts it: the cache's float16 to float32 in
    # 6 ms where numpy takes 44 (a typical body's box, before the lungs' box)
    x = torch.from_numpy(np.ascontiguousarray(image[box])).to(torch.float32)[None, None]
    logits = sliding_window_inference(x, tuple(cfg.roi), cfg.sw_batch_size, predict, overlap=cfg.overlap,
                                      mode="gaussian", padding_mode="replicate")
    assert isinstance(logits, torch.Tensor)  # one output head
    out = np.zeros(image.shape, dtype=np.float32)
    out[box] = torch.sigmoid(logits.float())[0, 0].numpy()
    # Nothing at air density is nodule (ground glass starts near -750 HU, the body level is about
    # -930): the network never trains on air and its scores there are noise. On the demo's folds
    # this took size-category kappa from 0.50 to 0.63 and changed no Dice.
    out[~above(image, BODY_LEVEL)] = 0.0
    return out


def probability(model: torch.nn.Module, image: np.ndarray, cfg: SegmentConfig,
                autocast: Any | None = None, *, prepared: bool = False) -> np.ndarray:
    """Nodule probability of every voxel of an (X, Y, Z) volume through the torch model (float32,
    or in `autocast`) in its :func:`for_inference` form, see :func:`window_probability`. With
    `prepared`, `model` is that form already (one copy for many volumes: a copy takes ~17 ms)."""
    model.eval()
    net = model if prepared else for_inference(model)
    with torch.inference_mode(), (autocast or torch.autocast("cpu", enabled=False)):
        return window_probability(net, image, cfg)
