"""A chest phantom in Hounsfield units, rendered on a scanner's own grid.

Anatomy is defined in patient coordinates (LPS, millimetres), so the same patient rendered at
different pixel spacings and slice thicknesses has the same physical size; that is what lets the
preprocessing tests check that 1 mm resampling preserves size.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

HU_AIR = -1000.0
HU_LUNG = -850.0
HU_FAT = -100.0
HU_SOFT = 40.0
HU_BONE = 700.0
HU_RIB = 1000.0
HU_DISC = 80.0
HU_TABLE = 150.0
HU_BLOOD = 40.0
HU_CONTRAST = 260.0
HU_NODULE = 40.0

# Region codes of the label map `render_phantom` returns alongside the HU volume.
REGION_AIR, REGION_FAT, REGION_SOFT, REGION_LUNG, REGION_BONE = 0, 1, 2, 3, 4
REGION_TABLE, REGION_BLOOD, REGION_NODULE, REGION_VESSEL = 5, 6, 7, 8


@dataclass(frozen=True)
class Nodule:
    """A spherical solid nodule; centre in patient coordinates (mm)."""

    center: tuple[float, float, float]
    diameter_mm: float


@dataclass(frozen=True)
class Anatomy:
    """One patient's body habitus; all lengths in mm, centred on the body axis."""

    body_a: float  # left-right semi-axis
    body_b: float  # anterior-posterior semi-axis
    fat_mm: float
    lung_a: float
    lung_b: float
    lung_dx: float  # lateral offset of each lung centre
    heart_r: float
    spine_r: float
    z_center: float  # table position of the chest centre
    vessels: tuple[tuple[float, float, float, float], ...] = field(default=())  # x, y, r, phase

    @property
    def spine_y(self) -> float:
        return self.body_b - self.fat_mm - self.spine_r - 12.0


@dataclass(frozen=True)
class Grid:
    """A scanner's sampling grid: in-plane spacing, matrix, and slice positions."""

    rows: int
    cols: int
    row_spacing: float  # mm between rows (DICOM PixelSpacing[0])
    col_spacing: float  # mm between columns (DICOM PixelSpacing[1])
    z: np.ndarray  # slice positions in mm, in acquisition order

    @property
    def x0(self) -> float:
        return -(self.cols - 1) / 2 * self.col_spacing

    @property
    def y0(self) -> float:
        return -(self.rows - 1) / 2 * self.row_spacing

    def fov_mask(self) -> np.ndarray:
        """Circular reconstruction field of view, True inside."""
        y = (np.arange(self.rows) - (self.rows - 1) / 2)[:, None]
        x = (np.arange(self.cols) - (self.cols - 1) / 2)[None, :]
        return (x / (self.cols / 2)) ** 2 + (y / (self.rows / 2)) ** 2 <= 1.0


def sample_anatomy(rng: np.random.Generator, z_center: float) -> Anatomy:
    """Draw a plausible adult chest."""
    body_a = float(rng.uniform(130, 165))
    body_b = float(rng.uniform(95, 125))
    fat = float(rng.uniform(8, 20))
    lung_a = float((body_a - fat) * rng.uniform(0.36, 0.42))
    lung_b = float((body_b - fat) * rng.uniform(0.70, 0.80))
    lung_dx = float((body_a - fat) * rng.uniform(0.45, 0.52))
    vessels = []
    for side in (-1, 1):
        for _ in range(int(rng.integers(5, 9))):
            t = rng.uniform(0, 2 * np.pi)
            rho = np.sqrt(rng.uniform(0.05, 0.55))
            vessels.append(
                (
                    float(side * lung_dx + rho * lung_a * np.cos(t)),
                    float(rho * lung_b * np.sin(t)),
                    float(rng.uniform(0.8, 1.6)),
                    float(rng.uniform(0, 2 * np.pi)),
                )
            )
    return Anatomy(
        body_a=body_a, body_b=body_b, fat_mm=fat, lung_a=lung_a, lung_b=lung_b, lung_dx=lung_dx,
        heart_r=float(rng.uniform(38, 50)), spine_r=float(rng.uniform(13, 17)), z_center=z_center,
        vessels=tuple(vessels),
    )


def lung_scale(anatomy: Anatomy, z: np.ndarray) -> np.ndarray:
    """Relative lung cross-section size along z: widest mid-chest, narrowing to the apex."""
    zrel = (np.asarray(z, dtype=np.float64) - anatomy.z_center) / 170.0
    return np.sqrt(np.clip(1.0 - zrel**2, 0.09, 1.0))


def sample_nodules(
    rng: np.random.Generator, anatomy: Anatomy, count: int, z: np.ndarray
) -> list[Nodule]:
    """Place `count` nodules of 4–15 mm inside the lungs, within the scanned z range."""
    lo, hi = float(np.min(z)), float(np.max(z))
    margin = 0.15 * (hi - lo)
    nodules: list[Nodule] = []
    for _ in range(count):
        diameter = float(rng.uniform(4.0, 15.0))
        zc = float(rng.uniform(lo + margin, hi - margin))
        s = float(lung_scale(anatomy, np.array([zc]))[0])
        side = 1 if rng.random() < 0.5 else -1
        t = rng.uniform(0, 2 * np.pi)
        rho = np.sqrt(rng.uniform(0.0, 1.0)) * 0.55
        xc = side * anatomy.lung_dx + rho * anatomy.lung_a * s * np.cos(t)
        yc = rho * anatomy.lung_b * s * np.sin(t)
        nodules.append(Nodule((round(float(xc), 2), round(float(yc), 2), round(zc, 2)), round(diameter, 2)))
    return nodules


def _ellipse(x: np.ndarray, y: np.ndarray, cx: float | np.ndarray, cy: float | np.ndarray,
             a: float | np.ndarray, b: float | np.ndarray) -> np.ndarray:
    return ((x - cx) / a) ** 2 + ((y - cy) / b) ** 2 <= 1.0


def render_phantom(
    anatomy: Anatomy, nodules: list[Nodule], grid: Grid, *, contrast: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Render the noiseless chest on `grid`.

    Returns:
        ``(hu, regions, nodule_mask)``: float32 HU of shape (slices, rows, cols) in the order of
        ``grid.z``; a uint8 region label map (``REGION_*``); a uint8 mask, 1 inside a nodule.
    """
    nz = len(grid.z)
    z = np.asarray(grid.z, dtype=np.float64)[:, None, None]
    y = (grid.y0 + np.arange(grid.rows) * grid.row_spacing)[None, :, None]
    x = (grid.x0 + np.arange(grid.cols) * grid.col_spacing)[None, None, :]
    shape = (nz, grid.rows, grid.cols)
    regions = np.full(shape, REGION_AIR, dtype=np.uint8)

    table_top = anatomy.body_b + 4.0
    regions[np.broadcast_to((y >= table_top) & (y <= table_top + 12.0) & (np.abs(x) <= 210.0), shape)] = REGION_TABLE
    body = np.broadcast_to(_ellipse(x, y, 0.0, 0.0, anatomy.body_a, anatomy.body_b), shape)
    regions[body] = REGION_FAT
    inner_a, inner_b = anatomy.body_a - anatomy.fat_mm, anatomy.body_b - anatomy.fat_mm
    regions[np.broadcast_to(_ellipse(x, y, 0.0, 0.0, inner_a, inner_b), shape)] = REGION_SOFT

    s = lung_scale(anatomy, z)
    for side in (-1.0, 1.0):
        lung = _ellipse(x, y, side * anatomy.lung_dx, 0.0, anatomy.lung_a * s, anatomy.lung_b * s)
        regions[lung] = REGION_LUNG
    zrel = z - anatomy.z_center
    for vx, vy, vr, phase in anatomy.vessels:
        cx = vx * s + 3.0 * np.sin(zrel / 40.0 + phase)
        cy = vy * s + 3.0 * np.cos(zrel / 55.0 + phase)
        vessel = ((x - cx) ** 2 + (y - cy) ** 2 <= vr**2) & (regions == REGION_LUNG)
        regions[vessel] = REGION_VESSEL
    heart_r = anatomy.heart_r * np.clip(1.0 - ((zrel + 30.0) / 120.0) ** 2, 0.0, 1.0)
    heart = _ellipse(x, y, 0.25 * anatomy.heart_r, -0.15 * inner_b, heart_r + 1e-6, 0.85 * heart_r + 1e-6)
    regions[heart & (heart_r > 1.0)] = REGION_BLOOD
    aorta = (x + 0.0) ** 2 + (y - (anatomy.spine_y - anatomy.spine_r - 14.0)) ** 2 <= 12.0**2
    regions[np.broadcast_to(aorta, shape)] = REGION_BLOOD

    spine = np.broadcast_to(x**2 + (y - anatomy.spine_y) ** 2 <= anatomy.spine_r**2, shape)
    disc = np.broadcast_to((np.mod(zrel, 30.0) < 6.0), shape)
    regions[spine & ~disc] = REGION_BONE
    regions[spine & disc] = REGION_SOFT
    rib_band = np.broadcast_to(np.sin(2 * np.pi * zrel / 26.0) > 0.2, shape)
    for angle in np.linspace(0.12 * np.pi, 0.88 * np.pi, 8):
        cx = (inner_a - 7.0) * np.cos(angle)
        cy = (inner_b - 7.0) * np.sin(angle)
        for cy_ in (cy, -cy):
            rib = np.broadcast_to((x - cx) ** 2 + (y - cy_) ** 2 <= 4.5**2, shape)
            regions[rib & rib_band] = REGION_BONE

    lut = np.zeros(16, dtype=np.float32)
    lut[[REGION_AIR, REGION_FAT, REGION_SOFT, REGION_LUNG, REGION_BONE, REGION_TABLE,
         REGION_BLOOD, REGION_VESSEL]] = [HU_AIR, HU_FAT, HU_SOFT, HU_LUNG, HU_BONE, HU_TABLE,
                                           HU_CONTRAST if contrast else HU_BLOOD,
                                           HU_CONTRAST if contrast else HU_BLOOD]
    hu = lut[regions]
    ribs = regions == REGION_BONE
    hu[ribs & ~spine] = HU_RIB

    mask = np.zeros(shape, dtype=np.uint8)
    edge = float(np.mean([grid.row_spacing, grid.col_spacing, _z_step(grid)]))
    for nodule in nodules:
        _paint_nodule(hu, regions, mask, grid, nodule, edge)
    return hu, regions, mask


def _z_step(grid: Grid) -> float:
    return float(np.median(np.abs(np.diff(grid.z)))) if len(grid.z) > 1 else 1.0


def _paint_nodule(hu: np.ndarray, regions: np.ndarray, mask: np.ndarray, grid: Grid,
                  nodule: Nodule, edge_mm: float) -> None:
    """Blend a sphere into `hu` with a partial-volume edge `edge_mm` wide."""
    r = nodule.diameter_mm / 2
    cx, cy, cz = nodule.center
    reach = r + edge_mm
    zs = np.nonzero(np.abs(np.asarray(grid.z) - cz) <= reach)[0]
    c0 = max(int(np.floor((cx - reach - grid.x0) / grid.col_spacing)), 0)
    c1 = min(int(np.ceil((cx + reach - grid.x0) / grid.col_spacing)) + 1, grid.cols)
    r0 = max(int(np.floor((cy - reach - grid.y0) / grid.row_spacing)), 0)
    r1 = min(int(np.ceil((cy + reach - grid.y0) / grid.row_spacing)) + 1, grid.rows)
    if zs.size == 0 or c0 >= c1 or r0 >= r1:
        return
    z = np.asarray(grid.z)[zs][:, None, None]
    y = (grid.y0 + np.arange(r0, r1) * grid.row_spacing)[None, :, None]
    x = (grid.x0 + np.arange(c0, c1) * grid.col_spacing)[None, None, :]
    d = np.sqrt((x - cx) ** 2 + (y - cy) ** 2 + (z - cz) ** 2)
    frac = np.clip(0.5 + (r - d) / edge_mm, 0.0, 1.0).astype(np.float32)
    block = np.s_[zs[0] : zs[-1] + 1, r0:r1, c0:c1]
    hu[block] = hu[block] * (1 - frac) + HU_NODULE * frac
    inside = d <= r
    mask[block][inside] = 1
    regions[block][inside] = REGION_NODULE


def correlated_noise(rng: np.random.Generator, shape: tuple[int, int, int], sigma_hu: float,
                     corr_px: float) -> np.ndarray:
    """Gaussian noise with standard deviation `sigma_hu` and in-plane correlation `corr_px`.

    The correlation length stands for the reconstruction kernel's texture: smooth kernels give
    blotchy noise, sharp kernels fine-grained noise.
    """
    white = rng.standard_normal(shape, dtype=np.float32)
    if corr_px > 0.3:
        white = ndimage.gaussian_filter(white, sigma=(0.0, corr_px, corr_px), mode="wrap")
    std = float(white.std()) or 1.0
    white *= sigma_hu / std
    return white
