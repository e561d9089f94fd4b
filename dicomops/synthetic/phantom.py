"""A chest phantom in Hounsfield units, rendered on a scanner's own grid.

Anatomy is defined in patient coordinates (LPS, millimetres), so the same patient rendered at
different pixel spacings and slice thicknesses has the same physical size; that is what lets the
preprocessing tests check that 1 mm resampling preserves size.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

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


# Diameters of the nodules that make a series positive. The label means "an actionable solid nodule":
# Lung-RADS v2022 puts solid nodules under 6 mm at baseline in category 2 (screening-negative) and
# the Fleischner Society recommends no routine follow-up for them. The lower bound also keeps each
# positive distinct from the vessels (1.6-3.2 mm calibre, same density): a 4 mm sphere is 3.5 mm
# across 1 mm off its centre, and at the classifier's 2.5 mm input pixels a 4-6 mm nodule is two
# pixels wide. With 4-15 mm, the demo's 6 lowest-ranked positives were exactly its 6 under 6.4 mm.
NODULE_DIAMETER_MM = (6.0, 15.0)
# Nodules a reader outlines but that do not make a series actionable (Lung-RADS 2 at baseline):
# small ones of any kind, and pure ground-glass nodules of any size up to 15 mm (under 30 mm).
SMALL_DIAMETER_MM = (3.0, 6.0)  # the upper bound is exclusive
GGO_DIAMETER_MM = (5.0, 15.0)
# Ground-glass density: hazy, vessels and bronchi still visible through it, well below soft tissue.
GGO_HU = (-750.0, -300.0)
# A part-solid nodule's solid core, as a fraction of its diameter.
CORE_FRACTION = (0.3, 0.6)
# A ground-glass border fades over 2-3 mm, where a solid nodule's is the scanner's partial volume.
GGO_EDGE_MM = (2.0, 3.0)
# Pleural nodules: centre this far inside the lung border, as a fraction of the radius.
PLEURAL_DEPTH = (0.3, 0.7)
# Nodules in one series stay this far apart (surface to surface), so masks do not touch.
NODULE_GAP_MM = 4.0

NODULE_KINDS = ("solid", "part-solid", "ground-glass")
ATTACHMENTS = ("none", "pleural", "vascular")


@dataclass(frozen=True)
class Nodule:
    """A spherical nodule; centre in patient coordinates (mm).

    ``hu`` is the density of the ground-glass component (of the whole nodule when solid),
    ``core_fraction`` the solid core's share of the diameter of a part-solid nodule, and
    ``edge_mm`` the width of a ground-glass border (0: the scanner's own partial volume).
    """

    center: tuple[float, float, float]
    diameter_mm: float
    kind: str = "solid"
    attachment: str = "none"
    hu: float = HU_NODULE
    core_fraction: float = 0.0
    edge_mm: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in NODULE_KINDS:
            raise ValueError(f"kind must be one of {NODULE_KINDS}, got {self.kind!r}")
        if self.attachment not in ATTACHMENTS:
            raise ValueError(f"attachment must be one of {ATTACHMENTS}, got {self.attachment!r}")
        if self.kind == "part-solid" and not 0.0 < self.core_fraction < 1.0:
            raise ValueError(f"a part-solid nodule needs 0 < core_fraction < 1, got {self.core_fraction}")

    @property
    def actionable(self) -> bool:
        """Whether the nodule makes its series positive: solid or part-solid, at least 6 mm."""
        return self.kind != "ground-glass" and self.diameter_mm >= NODULE_DIAMETER_MM[0]


@dataclass(frozen=True)
class NoduleSpec:
    """What a corpus plan decides about one nodule; rendering draws its size, density and place.

    ``small`` nodules are 3-6 mm (:data:`SMALL_DIAMETER_MM`); otherwise ground-glass ones are
    :data:`GGO_DIAMETER_MM` and solid or part-solid ones :data:`NODULE_DIAMETER_MM` (actionable).
    """

    kind: str = "solid"
    attachment: str = "none"
    small: bool = False

    def __post_init__(self) -> None:
        if self.kind not in NODULE_KINDS:
            raise ValueError(f"kind must be one of {NODULE_KINDS}, got {self.kind!r}")
        if self.attachment not in ATTACHMENTS:
            raise ValueError(f"attachment must be one of {ATTACHMENTS}, got {self.attachment!r}")

    @property
    def actionable(self) -> bool:
        return not self.small and self.kind != "ground-glass"

    @property
    def diameter_range(self) -> tuple[float, float]:
        if self.small:
            return SMALL_DIAMETER_MM
        return GGO_DIAMETER_MM if self.kind == "ground-glass" else NODULE_DIAMETER_MM


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
    lung_a, lung_b = _clear_of_ribs(body_a - fat, body_b - fat, lung_a, lung_b, lung_dx)
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


RIB_RADIUS_MM, RIB_INSET_MM, PLEURA_MM = 4.5, 7.0, 3.0
RIB_ANGLES = np.linspace(0.12 * np.pi, 0.88 * np.pi, 8)


def rib_centres(inner_a: float, inner_b: float) -> list[tuple[float, float]]:
    """Centres of the 16 ribs in one axial plane, on an ellipse just inside the body wall."""
    out = []
    for angle in RIB_ANGLES:
        cx, cy = (inner_a - RIB_INSET_MM) * np.cos(angle), (inner_b - RIB_INSET_MM) * np.sin(angle)
        out += [(float(cx), float(cy)), (float(cx), float(-cy))]
    return out


def _clear_of_ribs(inner_a: float, inner_b: float, lung_a: float, lung_b: float,
                   lung_dx: float) -> tuple[float, float]:
    """Shrink the lungs until every rib lies outside them with a pleural gap.

    A rib inside the lung outline is a bright round blob on the lung border: a juxtapleural
    nodule look-alike that real anatomy never produces (ribs sit in the chest wall).
    """
    reach = RIB_RADIUS_MM + PLEURA_MM
    for _ in range(100):
        inside = any(((abs(cx) - lung_dx) / (lung_a + reach)) ** 2 + (cy / (lung_b + reach)) ** 2 < 1.0
                     for cx, cy in rib_centres(inner_a, inner_b))
        if not inside:
            break
        lung_a, lung_b = lung_a * 0.97, lung_b * 0.97
    return lung_a, lung_b


def lung_scale(anatomy: Anatomy, z: np.ndarray) -> np.ndarray:
    """Relative lung cross-section size along z: widest mid-chest, narrowing to the apex."""
    zrel = (np.asarray(z, dtype=np.float64) - anatomy.z_center) / 170.0
    return np.sqrt(np.clip(1.0 - zrel**2, 0.09, 1.0))


def heart_radius(anatomy: Anatomy, z: np.ndarray) -> np.ndarray:
    """Left-right semi-axis of the heart along z (0 outside it); the AP semi-axis is 0.85 of it."""
    zrel = np.asarray(z, dtype=np.float64) - anatomy.z_center
    return anatomy.heart_r * np.clip(1.0 - ((zrel + 30.0) / 120.0) ** 2, 0.0, 1.0)


def heart_center(anatomy: Anatomy) -> tuple[float, float]:
    return 0.25 * anatomy.heart_r, -0.15 * (anatomy.body_b - anatomy.fat_mm)


def nodule_fits(anatomy: Anatomy, nodule: Nodule, clearance_mm: float = 2.0) -> bool:
    """Whether the whole sphere lies in lung parenchyma: inside a lung, clear of the heart.

    A nodule that overlaps the mediastinum has soft-tissue density on soft tissue and is invisible,
    yet its series would be labelled positive: label noise that no model can learn.
    """
    (xc, yc, zc), r = nodule.center, nodule.diameter_mm / 2 + clearance_mm
    zs = np.linspace(zc - r, zc + r, 5)
    s = float(np.min(lung_scale(anatomy, zs)))
    side = 1.0 if xc >= 0 else -1.0
    # Distance to an ellipse's border is approximated by shrinking its semi-axes by r.
    a, b = anatomy.lung_a * s - r, anatomy.lung_b * s - r
    if a <= 0 or b <= 0 or ((xc - side * anatomy.lung_dx) / a) ** 2 + (yc / b) ** 2 > 1.0:
        return False
    return _clear_of_heart(anatomy, nodule, clearance_mm)


def _clear_of_heart(anatomy: Anatomy, nodule: Nodule, clearance_mm: float) -> bool:
    (xc, yc, zc), r = nodule.center, nodule.diameter_mm / 2 + clearance_mm
    zs = np.linspace(zc - r, zc + r, 5)
    hr = float(np.max(heart_radius(anatomy, zs)))
    if hr <= 1.0:
        return True
    hx, hy = heart_center(anatomy)
    return bool(((xc - hx) / (hr + r)) ** 2 + ((yc - hy) / (0.85 * hr + r)) ** 2 > 1.0)


def pleural_fits(anatomy: Anatomy, nodule: Nodule, clearance_mm: float = 2.0) -> bool:
    """Whether a juxta-pleural nodule reaches only into the chest wall, clear of ribs and heart.

    Its centre must lie in the lung; the part of the sphere outside it must stay inside the
    soft-tissue wall and away from the ribs, whose round cross-sections beside a nodule would make
    a second bright blob that no reader would outline.
    """
    (xc, yc, zc), r = nodule.center, nodule.diameter_mm / 2
    s = float(lung_scale(anatomy, np.array([zc]))[0])
    side = 1.0 if xc >= 0 else -1.0
    a, b = anatomy.lung_a * s, anatomy.lung_b * s
    if ((xc - side * anatomy.lung_dx) / a) ** 2 + (yc / b) ** 2 >= 1.0:
        return False
    inner_a, inner_b = anatomy.body_a - anatomy.fat_mm, anatomy.body_b - anatomy.fat_mm
    reach = r + clearance_mm
    ring = np.linspace(0, 2 * np.pi, 24, endpoint=False)
    if np.any(((xc + reach * np.cos(ring)) / inner_a) ** 2 + ((yc + reach * np.sin(ring)) / inner_b) ** 2 > 1.0):
        return False
    if any(np.hypot(xc - rx, yc - ry) < r + RIB_RADIUS_MM + clearance_mm
           for rx, ry in rib_centres(inner_a, inner_b)):
        return False
    return _clear_of_heart(anatomy, nodule, clearance_mm)


def _apart(candidate: Nodule, placed: list[Nodule]) -> bool:
    c = np.asarray(candidate.center)
    return all(float(np.linalg.norm(c - np.asarray(n.center)))
               >= (candidate.diameter_mm + n.diameter_mm) / 2 + NODULE_GAP_MM for n in placed)


def sample_nodules(
    rng: np.random.Generator, anatomy: Anatomy, count: int, z: np.ndarray, attempts: int = 200
) -> list[Nodule]:
    """Place `count` solid nodules of :data:`NODULE_DIAMETER_MM` free in lung parenchyma."""
    return place_nodules(rng, anatomy, [NoduleSpec()] * count, z, attempts)


def place_nodules(
    rng: np.random.Generator, anatomy: Anatomy, specs: list[NoduleSpec], z: np.ndarray,
    attempts: int = 200,
) -> list[Nodule]:
    """Draw size, density and position of each planned nodule, within the scanned z range.

    Free nodules lie wholly in lung parenchyma (:func:`nodule_fits`); pleural ones sit on the
    lateral or posterior lung border with part of the sphere in the chest wall
    (:func:`pleural_fits`); vascular ones have a vessel through or against them at their z. All
    keep :data:`NODULE_GAP_MM` from each other. When no attached position is found the nodule is
    placed free (and recorded so); the lateral edge of the lung away from the heart is the last
    fallback, and it always fits.
    """
    lo, hi = float(np.min(z)), float(np.max(z))
    margin = 0.15 * (hi - lo)
    nodules: list[Nodule] = []
    for spec in specs:
        d_lo, d_hi = spec.diameter_range
        diameter = round(float(rng.uniform(d_lo, d_hi)), 2)
        if spec.small:
            diameter = min(diameter, round(d_hi - 0.01, 2))
        hu, core, edge = HU_NODULE, 0.0, 0.0
        if spec.kind != "solid":
            hu = round(float(rng.uniform(*GGO_HU)), 1)
            edge = round(float(rng.uniform(*GGO_EDGE_MM)), 2)
        if spec.kind == "part-solid":
            core = round(float(rng.uniform(*CORE_FRACTION)), 3)
        zc = round(float(rng.uniform(lo + margin, hi - margin)), 2)
        s = float(lung_scale(anatomy, np.array([zc]))[0])

        proto = Nodule((0.0, 0.0, zc), diameter, spec.kind, "none", hu, core, edge)
        candidate: Nodule | None = None
        if spec.attachment == "pleural":
            candidate = _place_pleural(rng, anatomy, proto, s, nodules, attempts)
        elif spec.attachment == "vascular":
            candidate = _place_vascular(rng, anatomy, proto, s, nodules, attempts)
        for _attempt in range(attempts if candidate is None else 0):
            side = 1 if rng.random() < 0.5 else -1
            t = rng.uniform(0, 2 * np.pi)
            rho = np.sqrt(rng.uniform(0.0, 1.0)) * 0.8
            trial = _at(proto, side * anatomy.lung_dx + rho * anatomy.lung_a * s * np.cos(t),
                        rho * anatomy.lung_b * s * np.sin(t), "none")
            if nodule_fits(anatomy, trial) and _apart(trial, nodules):
                candidate = trial
                break
        if candidate is None:
            d = min(diameter, max(d_lo, anatomy.lung_a * s * 0.5))
            candidate = replace(_at(proto, -(anatomy.lung_dx + 0.4 * anatomy.lung_a * s), 0.0, "none"),
                                diameter_mm=round(d, 2))
        nodules.append(candidate)
    return nodules


def _at(proto: Nodule, xc: float, yc: float, attachment: str) -> Nodule:
    return replace(proto, center=(round(float(xc), 2), round(float(yc), 2), proto.center[2]),
                   attachment=attachment)


def _place_pleural(rng: np.random.Generator, anatomy: Anatomy, proto: Nodule, s: float,
                   placed: list[Nodule], attempts: int) -> Nodule | None:
    r = proto.diameter_mm / 2
    a, b = anatomy.lung_a * s, anatomy.lung_b * s
    for _attempt in range(attempts):
        side = 1 if rng.random() < 0.5 else -1
        # From 30 degrees anterior of lateral round to straight posterior: chest wall, not mediastinum.
        t = rng.uniform(-np.pi / 6, np.pi / 2)
        depth = rng.uniform(*PLEURAL_DEPTH) * r
        nx, ny = np.cos(t) / a, np.sin(t) / b
        norm = np.hypot(nx, ny)
        xc = side * (anatomy.lung_dx + a * np.cos(t) - depth * nx / norm)
        yc = b * np.sin(t) - depth * ny / norm
        trial = _at(proto, xc, yc, "pleural")
        if pleural_fits(anatomy, trial) and _apart(trial, placed):
            return trial
    return None


def _place_vascular(rng: np.random.Generator, anatomy: Anatomy, proto: Nodule, s: float,
                    placed: list[Nodule], attempts: int) -> Nodule | None:
    if not anatomy.vessels:
        return None
    r = proto.diameter_mm / 2
    zrel = proto.center[2] - anatomy.z_center
    for _attempt in range(attempts):
        vx, vy, vr, phase = anatomy.vessels[int(rng.integers(len(anatomy.vessels)))]
        # The vessel's axis at the nodule's z, as render_phantom draws it.
        cx = vx * s + 3.0 * np.sin(zrel / 40.0 + phase)
        cy = vy * s + 3.0 * np.cos(zrel / 55.0 + phase)
        # From through the nodule to grazing its surface.
        dist = rng.uniform(0.3 * r, r + 0.5 * vr)
        phi = rng.uniform(0, 2 * np.pi)
        trial = _at(proto, cx + dist * np.cos(phi), cy + dist * np.sin(phi), "vascular")
        if nodule_fits(anatomy, trial) and _apart(trial, placed):
            return trial
    return None


def _ellipse(x: np.ndarray, y: np.ndarray, cx: float | np.ndarray, cy: float | np.ndarray,
             a: float | np.ndarray, b: float | np.ndarray) -> np.ndarray:
    return ((x - cx) / a) ** 2 + ((y - cy) / b) ** 2 <= 1.0


def render_phantom(
    anatomy: Anatomy, nodules: list[Nodule], grid: Grid, *, contrast: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Render the noiseless chest on `grid`.

    Returns:
        ``(hu, regions, nodule_mask)``: float32 HU of shape (slices, rows, cols) in the order of
        ``grid.z``; a uint8 region label map (``REGION_*``); a uint8 instance map, ``k + 1``
        inside ``nodules[k]`` where it lies in lung (a later nodule wins an overlap), 0 elsewhere.
    """
    if len(nodules) > 254:
        raise ValueError(f"at most 254 nodules fit a uint8 instance mask, got {len(nodules)}")
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
    heart_r = heart_radius(anatomy, z)
    hx, hy = heart_center(anatomy)
    heart = _ellipse(x, y, hx, hy, heart_r + 1e-6, 0.85 * heart_r + 1e-6)
    regions[heart & (heart_r > 1.0)] = REGION_BLOOD
    aorta = (x + 0.0) ** 2 + (y - (anatomy.spine_y - anatomy.spine_r - 14.0)) ** 2 <= 12.0**2
    regions[np.broadcast_to(aorta, shape)] = REGION_BLOOD

    spine = np.broadcast_to(x**2 + (y - anatomy.spine_y) ** 2 <= anatomy.spine_r**2, shape)
    disc = np.broadcast_to((np.mod(zrel, 30.0) < 6.0), shape)
    regions[spine & ~disc] = REGION_BONE
    regions[spine & disc] = REGION_SOFT
    rib_band = np.broadcast_to(np.sin(2 * np.pi * zrel / 26.0) > 0.2, shape)
    for rib_x, rib_y in rib_centres(inner_a, inner_b):
        rib = np.broadcast_to((x - rib_x) ** 2 + (y - rib_y) ** 2 <= RIB_RADIUS_MM**2, shape)
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
    for k, nodule in enumerate(nodules):
        _paint_nodule(hu, regions, mask, grid, nodule, edge, k + 1)
    return hu, regions, mask


def _z_step(grid: Grid) -> float:
    return float(np.median(np.abs(np.diff(grid.z)))) if len(grid.z) > 1 else 1.0


def _paint_nodule(hu: np.ndarray, regions: np.ndarray, mask: np.ndarray, grid: Grid,
                  nodule: Nodule, edge_mm: float, instance: int) -> None:
    """Blend a sphere into the lung of `hu`; mark its lung part `instance` in `mask`.

    A solid nodule has the scanner's partial-volume edge `edge_mm` wide. A ground-glass one fades
    over its own wider edge and only raises the HU, so vessels stay visible through it; a
    part-solid one is that plus a solid core. Only lung voxels (parenchyma, vessels, earlier
    nodules) are painted and masked: the part of a pleural nodule inside the chest wall has the
    wall's density and is not what a reader outlines.
    """
    r = nodule.diameter_mm / 2
    cx, cy, cz = nodule.center
    soft = max(nodule.edge_mm, edge_mm) if nodule.kind != "solid" else edge_mm
    reach = r + soft / 2 + 0.5
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
    block = np.s_[zs[0] : zs[-1] + 1, r0:r1, c0:c1]
    lung = np.isin(regions[block], (REGION_LUNG, REGION_VESSEL, REGION_NODULE))
    before = hu[block]
    if nodule.kind == "solid":
        frac = np.clip(0.5 + (r - d) / edge_mm, 0.0, 1.0).astype(np.float32)
        painted = before * (1 - frac) + np.float32(nodule.hu) * frac
    else:
        frac = np.clip(0.5 + (r - d) / soft, 0.0, 1.0).astype(np.float32)
        painted = np.maximum(before, before * (1 - frac) + np.float32(nodule.hu) * frac)
        if nodule.kind == "part-solid":
            core = np.clip(0.5 + (r * nodule.core_fraction - d) / edge_mm, 0.0, 1.0).astype(np.float32)
            painted = painted * (1 - core) + np.float32(HU_NODULE) * core
    hu[block] = np.where(lung, painted, before)
    inside = (d <= r) & lung
    if not inside.any():
        # A 3 mm nodule can fall between the voxel centres of a coarse grid, yet its partial volume
        # shows; a reader marks the voxel it shows in, and FROC needs every annotated nodule present.
        nearest = np.unravel_index(int(np.argmin(np.where(lung, d, np.inf))), d.shape)
        if lung[nearest] and d[nearest] < r + soft / 2:
            inside[nearest] = True
    mask[block][inside] = instance
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
