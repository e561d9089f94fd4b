"""MONAI-style transforms: an array transform plus a dictionary wrapper with a ``d`` suffix.

``build_transforms(cfg)`` is the one chain used by caching, training, export parity checks
and inference: orientation to RAS, resampling to the configured spacing, windowing, scaling to
[0, 1], optional histogram equalisation, and crop/pad around the body.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any, cast

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.data.utils import compute_shape_offset, zoom_affine
from monai.transforms import (
    Compose,
    EnsureTyped,
    MapTransform,
    Orientationd,
    Spacing,
    Transform,
)

from dicomops.config import PreprocessConfig

IMAGE, MASK = "image", "mask"
WINDOW_PRESETS = {"lung": (-600.0, 1500.0), "soft_tissue": (40.0, 400.0), "bone": (400.0, 1800.0)}
AXIS_ALIGNED_TOL = 1e-6


def resolve_window(cfg: PreprocessConfig, header_windows: Sequence[tuple[float, float]]) -> tuple[float, float]:
    """The (center, width) to apply: a preset, the configured one, or the header's.

    With ``window="header"`` the header's window number ``header_window_index`` is used: headers
    may carry several (e.g. soft tissue and lung), and taking "the" window silently picks one.
    """
    if cfg.window == "header":
        if not header_windows:
            raise ValueError("window='header' but the series has no WindowCenter/WindowWidth; "
                             "choose a preset such as 'lung'")
        if cfg.header_window_index >= len(header_windows):
            raise ValueError(f"header_window_index {cfg.header_window_index} but the header has only "
                             f"{len(header_windows)} window(s)")
        return header_windows[cfg.header_window_index]
    if cfg.window == "none":
        return 0.0, 0.0  # HU pass through unchanged (features, tests, diagnostics)
    if cfg.window == "custom":
        if cfg.window_center is None or cfg.window_width is None:
            raise ValueError("window='custom' needs window_center and window_width")
        return cfg.window_center, cfg.window_width
    return WINDOW_PRESETS[cfg.window]


class HUWindow(Transform):
    """Clip HU to a window and scale it to [0, 1]."""

    def __init__(self, center: float, width: float) -> None:
        if width <= 0:
            raise ValueError(f"window width must be positive, got {width}")
        self.low, self.high = center - width / 2, center + width / 2

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        return ((img.clamp(self.low, self.high) - self.low) / (self.high - self.low)).float()


class HUWindowd(MapTransform):
    """Dictionary wrapper of :class:`HUWindow`; the window can differ per item (header windows)."""

    def __init__(self, keys: KeysCollection, cfg: PreprocessConfig, windows_key: str = "windows") -> None:
        super().__init__(keys)
        self.cfg = cfg
        self.windows_key = windows_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        center, width = resolve_window(self.cfg, d.get(self.windows_key) or [])
        d["window"] = (center, width)
        if width == 0.0:
            return d
        for key in self.key_iterator(d):
            d[key] = HUWindow(center, width)(d[key])
        return d


class HistogramEqualize(Transform):
    """Histogram equalisation of a [0, 1] image over `bins` levels."""

    def __init__(self, bins: int = 256) -> None:
        self.bins = bins

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        values = img.detach().cpu().numpy()
        hist, edges = np.histogram(values, bins=self.bins, range=(0.0, 1.0))
        cdf = hist.cumsum().astype(np.float64)
        cdf = (cdf - cdf.min()) / max(cdf.max() - cdf.min(), 1.0)
        out = np.interp(values.ravel(), edges[:-1], cdf).reshape(values.shape).astype(np.float32)
        result = torch.as_tensor(out)
        return MetaTensor(result, meta=img.meta) if isinstance(img, MetaTensor) else result


class HistogramEqualized(MapTransform):
    def __init__(self, keys: KeysCollection, bins: int = 256) -> None:
        super().__init__(keys)
        self.op = HistogramEqualize(bins)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.op(d[key])
        return d


def _lerp_axis(x: np.ndarray, axis: int, coords: np.ndarray) -> np.ndarray:
    """Linear interpolation of `x` along `axis` at continuous indices `coords` (border-clamped)."""
    n = x.shape[axis]
    c = np.clip(coords, 0.0, n - 1.0)
    i0 = np.floor(c).astype(np.int64)
    i1 = np.minimum(i0 + 1, n - 1)
    w = (c - i0).astype(np.float32)
    shape = [1] * x.ndim
    shape[axis] = len(coords)
    w = w.reshape(shape)
    lo = np.take(x, i0, axis=axis)
    hi = np.take(x, i1, axis=axis)
    hi -= lo
    hi *= w
    lo += hi
    return lo


class FastSpacing(Transform):
    """Resample to `pixdim` with MONAI ``Spacing``'s output grid, fast when the affine is diagonal.

    The output affine and shape come from MONAI's own ``zoom_affine`` and
    ``compute_shape_offset``, so the grid is identical to ``Spacing``'s. When the input affine is
    axis-aligned (after ``Orientation`` it is, unless the series is oblique), trilinear
    interpolation is separable: three passes of 1-D linear interpolation, shrinking axes first to
    keep intermediates small. Otherwise the general ``Spacing`` runs.
    """

    def __init__(self, pixdim: Sequence[float], mode: str = "bilinear") -> None:
        if len(pixdim) != 3 or min(pixdim) <= 0:
            raise ValueError(f"pixdim must be three positive spacings in mm, got {pixdim}")
        if mode not in ("bilinear", "nearest"):
            raise ValueError(f"mode must be 'bilinear' or 'nearest', got {mode!r}")
        self.pixdim = np.asarray(pixdim, dtype=np.float64)
        self.mode = mode
        self.fallback = Spacing(pixdim=tuple(pixdim), mode=mode)

    def __call__(self, img: MetaTensor) -> MetaTensor:
        affine = np.asarray(img.affine, dtype=np.float64)
        linear = affine[:3, :3]
        if np.abs(linear - np.diag(np.diag(linear))).max() > AXIS_ALIGNED_TOL or (np.diag(linear) <= 0).any():
            return cast(MetaTensor, self.fallback(img))
        new_affine = zoom_affine(affine, self.pixdim, diagonal=True)
        shape, offset = compute_shape_offset(img.shape[1:], affine, new_affine)
        new_affine[:3, 3] = offset[:3]
        data = img.detach().cpu().numpy()
        order = np.argsort([int(s) / max(n, 1) for s, n in zip(shape, img.shape[1:], strict=True)])
        for axis in order:  # shrinking axes first keeps the intermediate arrays small
            a_out, t_out = new_affine[axis, axis], new_affine[axis, 3]
            a_in, t_in = affine[axis, axis], affine[axis, 3]
            coords = (a_out * np.arange(int(shape[axis])) + t_out - t_in) / a_in
            if self.mode == "nearest":
                idx = np.clip(np.rint(coords), 0, data.shape[axis + 1] - 1).astype(np.int64)
                data = np.take(data, idx, axis=axis + 1)
            else:
                data = _lerp_axis(data, axis + 1, coords)
        dtype = data.dtype if self.mode == "nearest" else np.float32  # labels keep their type
        out = MetaTensor(torch.from_numpy(np.ascontiguousarray(data, dtype=dtype)), affine=torch.as_tensor(new_affine))
        out.meta.update({k: v for k, v in img.meta.items() if k not in ("affine", "original_affine")})
        return out


class FastSpacingd(MapTransform):
    def __init__(self, keys: KeysCollection, pixdim: Sequence[float],
                 mode: str | Sequence[str] = "bilinear", allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        modes = [mode] * len(self.keys) if isinstance(mode, str) else list(mode)
        self.ops = {k: FastSpacing(pixdim, m) for k, m in zip(self.keys, modes, strict=True)}

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.ops[key](d[key])
        return d


class CenterOnBodyd(MapTransform):
    """Crop/pad in-plane to `size` voxels centred on the body (HU above -500), z untouched.

    Centering on the body rather than the array keeps the patient in frame whatever the table
    height and reconstruction centre.
    """

    def __init__(self, keys: KeysCollection, source_key: str, size: int, threshold: float = -500.0,
                 allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        if size < 8:
            raise ValueError(f"crop size must be at least 8 voxels, got {size}")
        self.source_key, self.size, self.threshold = source_key, size, threshold

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        src = d[self.source_key][0]
        body = (src > self.threshold).any(dim=2)
        if body.any():
            ii, jj = torch.nonzero(body, as_tuple=True)
            ci, cj = int((ii.min() + ii.max()) // 2), int((jj.min() + jj.max()) // 2)
        else:
            ci, cj = src.shape[0] // 2, src.shape[1] // 2
        half = self.size // 2
        for key in self.key_iterator(d):
            img = d[key]
            pad_value = -1000.0 if key == self.source_key else 0.0
            d[key] = _crop_pad_xy(img, ci - half, cj - half, self.size, pad_value)
        d["crop_origin_ij"] = (ci - half, cj - half)
        return d


def _crop_pad_xy(img: MetaTensor, i0: int, j0: int, size: int, pad_value: float) -> MetaTensor:
    c, ni, nj, nk = img.shape
    out = torch.full((c, size, size, nk), pad_value, dtype=img.dtype)
    si0, sj0 = max(i0, 0), max(j0, 0)
    si1, sj1 = min(i0 + size, ni), min(j0 + size, nj)
    if si0 < si1 and sj0 < sj1:
        out[:, si0 - i0 : si1 - i0, sj0 - j0 : sj1 - j0] = torch.as_tensor(img[:, si0:si1, sj0:sj1])
    affine = np.asarray(img.affine, dtype=np.float64).copy()
    affine[:3, 3] = affine[:3, :3] @ np.array([i0, j0, 0.0]) + affine[:3, 3]
    return MetaTensor(out, affine=torch.as_tensor(affine))


def build_transforms(cfg: PreprocessConfig) -> Compose:
    """The preprocessing chain for dictionaries with ``image`` (HU, channel first) and ``mask``.

    Input: ``{"image": MetaTensor (1, i, j, k) in HU with its RAS affine, "mask": same grid or
    absent, "windows": header windows}``. Output: image in [0, 1] at ``cfg.spacing_mm``, RAS,
    ``cfg.crop_xy`` voxels square in-plane around the body; the mask follows with nearest
    neighbour. The chain is deterministic: the cache holds its output once for every run;
    augmentation runs on the cached slabs, in :mod:`dicomops.training.augment`, never here.
    """
    keys = [IMAGE, MASK]
    steps: list[Any] = [
        EnsureTyped(keys=keys, allow_missing_keys=True, track_meta=True),
        Orientationd(keys=keys, axcodes="RAS", allow_missing_keys=True,
                     labels=(("L", "R"), ("P", "A"), ("I", "S"))),
        FastSpacingd(keys=[IMAGE], pixdim=cfg.spacing_mm, mode="bilinear"),
    ]
    steps.append(FastSpacingd(keys=[MASK], pixdim=cfg.spacing_mm, mode="nearest", allow_missing_keys=True))
    steps.append(CenterOnBodyd(keys=keys, source_key=IMAGE, size=cfg.crop_xy, allow_missing_keys=True))
    steps.append(HUWindowd(keys=[IMAGE], cfg=cfg))
    if cfg.histogram_equalize:
        steps.append(HistogramEqualized(keys=[IMAGE]))
    return Compose(steps)
