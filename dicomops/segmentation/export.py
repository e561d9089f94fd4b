"""ONNX export of the segmenter, sliding-window inference over an ONNX Runtime session, parity.

The exported graph is the UNet alone, ``image → logits``, with a dynamic batch axis and dynamic
spatial axes (each a multiple of the product of the strides, which the UNet's skip connections
need). The sliding window stays outside the graph: :func:`onnx_probability` runs the torch path's own
:func:`dicomops.segmentation.model.window_probability` (MONAI's ``sliding_window_inference`` over the
lungs' box, same window, overlap, Gaussian blending and replicate padding), calling the session for
each batch of windows. Logits are blended and the sigmoid comes last, as in the torch path, so the two agree to
float rounding; a graph ending in a sigmoid would blend probabilities and differ at the seams.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dicomops.config import SegmentConfig
from dicomops.errors import ExportCheckError
from dicomops.export.onnx_export import session, set_metadata, sha256
from dicomops.segmentation.data import BODY_LEVEL, BORDER_OPENING, LUNG_LEVEL
from dicomops.segmentation.model import crop_margin, probability, window_probability

log = logging.getLogger(__name__)

INPUT_NAME, OUTPUT_NAME = "image", "logits"
METADATA_KEY = "dicomops_segmenter"
MAX_SPATIAL = 2048  # voxels per axis the exported graph accepts (a 1 mm volume 2 m long)


def spatial_multiple(cfg: SegmentConfig) -> int:
    """Every spatial size the UNet accepts is a multiple of this (the product of its strides)."""
    return int(np.prod(cfg.strides))


def inference_settings(cfg: SegmentConfig) -> dict[str, Any]:
    """What a consumer of the ONNX file must do around it to reproduce the torch probabilities."""
    return {
        "input_name": INPUT_NAME, "output_name": OUTPUT_NAME,
        "layout": "N1IJK float32: (i, j, k) = (columns, rows, slices) of the 1 mm RAS preprocessing cache, "
                  "values in [0, 1]",
        "output": "logits; blend windows, then sigmoid",
        "spatial_multiple": spatial_multiple(cfg),
        "roi": list(cfg.roi), "overlap": cfg.overlap, "blend": "gaussian", "padding_mode": "replicate",
        "crop": f"box of the lungs (voxels > {BODY_LEVEL} and < {LUNG_LEVEL}, opened by a cube of "
                f"{BORDER_OPENING}; the voxels > {BODY_LEVEL} where there are none) grown by {crop_margin(cfg)}, at "
                f"least roi; probability 0 outside it and wherever the input is <= {BODY_LEVEL} (air)",
        "threshold": cfg.threshold, "channels": list(cfg.channels), "strides": list(cfg.strides),
    }


def export_onnx(model: torch.nn.Module, cfg: SegmentConfig, out: Path, opset: int = 18) -> Path:
    """Export the segmenter as ``image (N, 1, I, J, K) → logits (N, 1, I, J, K)``.

    Batch and the three spatial axes are dynamic; a spatial size must be a multiple of
    :func:`spatial_multiple` and at least twice it (the deepest level then still holds more than
    one voxel per axis for instance normalisation). The model is exported in eval mode; the
    opset and :func:`inference_settings` go into ``metadata_props`` and the sha256 into the log.
    """
    import onnx

    factor = spatial_multiple(cfg)
    model = model.eval()
    example = torch.zeros((2, 1, *cfg.roi), dtype=torch.float32)
    batch = torch.export.Dim("batch", min=1, max=1024)
    spatial = {axis: factor * torch.export.Dim(f"{name}_over_{factor}", min=2, max=MAX_SPATIAL // factor)
               for axis, name in zip((2, 3, 4), ("i", "j", "k"), strict=True)}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    program = torch.onnx.export(model, (example,), dynamo=True, opset_version=opset, input_names=[INPUT_NAME],
                                output_names=[OUTPUT_NAME], dynamic_shapes={"x": {0: batch, **spatial}},
                                external_data=False, verbose=False)
    if program is None:
        raise ExportCheckError("torch.onnx.export returned no program; is onnxscript installed?")
    program.save(str(tmp), external_data=False)
    proto = onnx.load(str(tmp))
    set_metadata(proto, {METADATA_KEY: json.dumps(inference_settings(cfg), sort_keys=True),
                         "dicomops.opset": str(opset)})
    onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, str(tmp))
    os.replace(tmp, out)
    log.info("segmenter exported to %s (opset %d, sha256 %s)", out, opset, sha256(out))
    return out


def _check_volume(image: np.ndarray) -> np.ndarray:
    if image.ndim != 3:
        raise ValueError(f"image must be one (I, J, K) volume, got shape {image.shape}; "
                         "drop batch and channel axes")
    # As it is: window_probability converts the lungs' box alone, with torch.
    return np.asarray(image)


def onnx_probability(sess: Any, image: np.ndarray, cfg: SegmentConfig) -> np.ndarray:
    """Nodule probability of every voxel of an (I, J, K) volume through an ONNX Runtime session:
    the torch path's windows, blending and crop (:func:`~dicomops.segmentation.model.window_probability`),
    ``cfg.sw_batch_size`` windows per session call (each window is normalised on its own, so the
    batch size does not change the result)."""
    image = _check_volume(image)
    name = sess.get_inputs()[0].name

    def predict(window: torch.Tensor) -> torch.Tensor:
        batch = np.ascontiguousarray(window.numpy(), dtype=np.float32)
        return torch.from_numpy(sess.run(None, {name: batch})[0])

    with torch.inference_mode():
        return window_probability(predict, image, cfg)


def sample_patches(volumes: list[np.ndarray], roi: tuple[int, int, int], count: int, seed: int = 0) -> np.ndarray:
    """`count` windows of size `roi` at random places in the volumes, edge-padded where a volume
    is smaller than the window; shape (count, 1, *roi)."""
    rng = np.random.default_rng(seed)
    out = np.empty((count, 1, *roi), dtype=np.float32)
    for n in range(count):
        vol = volumes[n % len(volumes)]
        pad = [(0, max(r - s, 0)) for r, s in zip(roi, vol.shape, strict=True)]
        vol = np.pad(vol, pad, mode="edge") if any(p[1] for p in pad) else vol
        start = [int(rng.integers(0, s - r + 1)) for r, s in zip(roi, vol.shape, strict=True)]
        out[n, 0] = vol[tuple(slice(a, a + r) for a, r in zip(start, roi, strict=True))]
    return out


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.asarray(x, np.float64)))


def check_parity(model: torch.nn.Module, onnx_path: Path, volumes: list[np.ndarray], cfg: SegmentConfig,
                 tolerance: float = 1e-4, patches: int = 4, threads: int = 2) -> dict[str, Any]:
    """Probabilities of the ONNX file against the torch model's, over whole volumes and single windows.

    Whole volumes go through both sliding-window paths (torch fp32, ONNX Runtime with `threads`
    intra-op threads; torch is held to the same thread count for the timing); `patches` single
    ``cfg.roi`` windows go straight through both graphs. Raises :class:`ExportCheckError` when any
    max |Δ probability| exceeds `tolerance`.

    Returns:
        ``max_abs_diff`` (the larger of the two), ``volume_max_abs_diff``,
        ``volume_mean_abs_diff``, ``patch_max_abs_diff``, ``volumes``, ``patches``, ``voxels``,
        ``torch_s_per_volume``, ``onnx_s_per_volume`` (median seconds), ``threads``, ``tolerance``.
    """
    if not volumes:
        raise ValueError("volumes is empty; give at least one preprocessed (I, J, K) volume")
    if tolerance <= 0 or patches < 0 or threads < 1:
        raise ValueError(f"tolerance must be > 0, patches >= 0 and threads >= 1; got {tolerance}, {patches}, "
                         f"{threads}")
    arrays = [_check_volume(v) for v in volumes]
    sess = session(Path(onnx_path), threads=threads)
    model.eval()
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        # The single windows go first: they also warm both runtimes up before the volumes are timed.
        x = sample_patches(arrays, cfg.roi, max(patches, 1))
        with torch.inference_mode():
            ref_logits = model(torch.from_numpy(x)).numpy()
        got_logits = sess.run(None, {sess.get_inputs()[0].name: x})[0]
        patch_worst = float(np.abs(_sigmoid(ref_logits) - _sigmoid(got_logits)).max()) if patches else 0.0
        torch_s, onnx_s, worst, total, voxels = [], [], 0.0, 0.0, 0
        for vol in arrays:
            t0 = time.perf_counter()
            ref = probability(model, vol, cfg)
            t1 = time.perf_counter()
            got = onnx_probability(sess, vol, cfg)
            t2 = time.perf_counter()
            torch_s.append(t1 - t0)
            onnx_s.append(t2 - t1)
            diff = np.abs(ref.astype(np.float64) - got.astype(np.float64))
            worst, total, voxels = max(worst, float(diff.max())), total + float(diff.sum()), voxels + diff.size
    finally:
        torch.set_num_threads(previous_threads)
    report = {
        "max_abs_diff": max(worst, patch_worst), "volume_max_abs_diff": worst,
        "volume_mean_abs_diff": total / voxels, "patch_max_abs_diff": patch_worst,
        "volumes": len(arrays), "patches": patches, "voxels": voxels,
        "torch_s_per_volume": float(np.median(torch_s)), "onnx_s_per_volume": float(np.median(onnx_s)),
        "threads": threads, "tolerance": tolerance,
    }
    if report["max_abs_diff"] > tolerance:
        raise ExportCheckError(
            f"segmenter ONNX parity failed: max |Δp| {worst:.2e} over {len(arrays)} whole volumes and "
            f"{patch_worst:.2e} over {patches} single {tuple(cfg.roi)} windows exceeds {tolerance:.0e}. "
            "Was the model exported in train mode, from another checkpoint, or with another SegmentConfig "
            "(roi, overlap)?")
    log.info("segmenter ONNX parity: max |Δp| %.2e (volumes) %.2e (windows); %.3f s torch, %.3f s ONNX "
             "per volume at %d threads", worst, patch_worst, report["torch_s_per_volume"],
             report["onnx_s_per_volume"], threads)
    return report
