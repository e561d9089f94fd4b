"""The segmenter: MONAI's 3D ``UNet``, ``DiceFocalLoss``, and sliding-window inference on whole volumes.

Instance normalisation, not batch normalisation: a patch's statistics are its own, so a DDP rank
holding half the batch computes what one process would (no SyncBatchNorm needed), and inference on
a whole volume normalises as training did. The Dice term is per patch (``batch=False``) so the loss
is a plain mean over patches, which DDP's gradient averaging reproduces exactly.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from dicomops.config import SegmentConfig


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


def probability(model: torch.nn.Module, image: np.ndarray, cfg: SegmentConfig,
                autocast: Any | None = None) -> np.ndarray:
    """Nodule probability of every voxel of an (X, Y, Z) volume, float32, by Gaussian-weighted
    sliding windows of ``cfg.roi`` (edges repeated where the volume is smaller)."""
    from monai.inferers import sliding_window_inference

    model.eval()
    x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None]
    with torch.inference_mode(), (autocast or torch.autocast("cpu", enabled=False)):
        logits = sliding_window_inference(x, tuple(cfg.roi), 1, model, overlap=cfg.overlap, mode="gaussian",
                                          padding_mode="replicate")
    assert isinstance(logits, torch.Tensor)  # one output head
    return torch.sigmoid(logits.float())[0, 0].numpy()
