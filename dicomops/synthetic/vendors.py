"""Scanner vendor profiles that differ the way real CT scanners do, and the scenario shifts.

Pixel spacings are given for a 512 matrix; a smaller matrix keeps the field of view (so a 256
matrix doubles the spacing), which keeps anatomy at its physical size whatever the matrix.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless

FileNaming = Literal["hex", "im_shuffled", "numbered_reversed", "numbered_shuffled"]


@dataclass(frozen=True)
class VendorProfile:
    """How one scanner model stores and reconstructs a chest CT."""

    key: str
    manufacturer: str
    model_name: str
    station_name: str
    software_versions: str
    pixel_representation: int  # 0 unsigned, 1 two's complement
    bits_stored: int
    rescale_intercept: float
    rescale_slope: float
    padding_value: int | None  # stored value outside the circular field of view
    pixel_spacing_512: tuple[float, float]  # min, max in mm for a 512 matrix
    slice_thickness: float
    slice_spacing: float  # can differ from thickness (overlapping reconstructions)
    kernel: str
    sharp_kernel: str
    noise_hu: float  # noise standard deviation in a flat region, HU
    noise_corr_mm: float  # in-plane correlation length of the noise (kernel texture)
    windows: tuple[tuple[float, float], ...]  # (center, width); several = multi-valued
    transfer_syntax: UID
    kvp: float
    tube_current_ma: int
    positive_rate: float
    file_naming: FileNaming
    z_step_sign: int  # +1: InstanceNumber increases head-wards, -1: feet-wards
    write_spacing_between_slices: bool
    share: float  # share of baseline patients scanned on it

    @property
    def stored_range(self) -> tuple[int, int]:
        """Smallest and largest storable value for this BitsStored and PixelRepresentation."""
        if self.pixel_representation:
            half = 1 << (self.bits_stored - 1)
            return -half, half - 1
        return 0, (1 << self.bits_stored) - 1


VENDORS: dict[str, VendorProfile] = {
    p.key: p
    for p in (
        VendorProfile(
            key="siemens", manufacturer="SIEMENS", model_name="SOMATOM Definition AS+",
            station_name="CTAWP73001", software_versions="syngo CT VA48A",
            pixel_representation=0, bits_stored=12, rescale_intercept=-1024.0, rescale_slope=1.0,
            padding_value=None, pixel_spacing_512=(0.60, 0.75), slice_thickness=1.0,
            slice_spacing=1.0, kernel="B30f", sharp_kernel="B70f", noise_hu=10.0,
            noise_corr_mm=1.1, windows=((40.0, 400.0), (-600.0, 1500.0)),
            transfer_syntax=ExplicitVRLittleEndian, kvp=120.0, tube_current_ma=240,
            positive_rate=0.25, file_naming="hex", z_step_sign=-1,
            write_spacing_between_slices=False, share=0.30,
        ),
        VendorProfile(
            key="ge", manufacturer="GE MEDICAL SYSTEMS", model_name="LightSpeed VCT",
            station_name="GECT64", software_versions="07MW18.4",
            pixel_representation=1, bits_stored=16, rescale_intercept=-1024.0, rescale_slope=1.0,
            padding_value=-2000, pixel_spacing_512=(0.68, 0.82), slice_thickness=1.25,
            slice_spacing=0.625, kernel="STANDARD", sharp_kernel="LUNG", noise_hu=12.0,
            noise_corr_mm=0.9, windows=((40.0, 400.0),), transfer_syntax=ImplicitVRLittleEndian,
            kvp=120.0, tube_current_ma=300, positive_rate=0.40, file_naming="im_shuffled",
            z_step_sign=1, write_spacing_between_slices=True, share=0.30,
        ),
        VendorProfile(
            key="philips", manufacturer="Philips", model_name="Brilliance 64",
            station_name="PHILIPS-CT1", software_versions="4.1.6",
            pixel_representation=0, bits_stored=12, rescale_intercept=-1024.0, rescale_slope=1.0,
            padding_value=None, pixel_spacing_512=(0.78, 0.98), slice_thickness=2.0,
            slice_spacing=2.0, kernel="B", sharp_kernel="YC", noise_hu=14.0, noise_corr_mm=1.0,
            windows=((-600.0, 1600.0),), transfer_syntax=RLELossless, kvp=120.0,
            tube_current_ma=200, positive_rate=0.50, file_naming="numbered_shuffled",
            z_step_sign=-1, write_spacing_between_slices=False, share=0.20,
        ),
        VendorProfile(
            key="canon", manufacturer="TOSHIBA", model_name="Aquilion ONE",
            station_name="TSB-AQ1", software_versions="V6.0",
            pixel_representation=1, bits_stored=16, rescale_intercept=0.0, rescale_slope=1.0,
            padding_value=-32768, pixel_spacing_512=(0.62, 0.78), slice_thickness=1.0,
            slice_spacing=0.8, kernel="FC13", sharp_kernel="FC52", noise_hu=11.0,
            noise_corr_mm=1.0, windows=((40.0, 350.0), (-550.0, 1600.0)),
            transfer_syntax=ExplicitVRLittleEndian, kvp=100.0, tube_current_ma=260,
            positive_rate=0.60, file_naming="numbered_reversed", z_step_sign=1,
            write_spacing_between_slices=True, share=0.20,
        ),
    )
}

# Never in the baseline: the `new-vendor` scenario scans everyone on it.
UNSEEN_VENDOR = VendorProfile(
    key="uih", manufacturer="UIH", model_name="uCT 760", station_name="UCT760-01",
    software_versions="R001", pixel_representation=1, bits_stored=16, rescale_intercept=-1024.0,
    rescale_slope=0.5, padding_value=-3000, pixel_spacing_512=(0.50, 0.60), slice_thickness=1.5,
    slice_spacing=1.5, kernel="B_SHARP_C", sharp_kernel="B_SHARP_E", noise_hu=18.0,
    noise_corr_mm=0.45, windows=((-500.0, 1400.0),), transfer_syntax=ExplicitVRLittleEndian,
    kvp=110.0, tube_current_ma=220, positive_rate=0.45, file_naming="hex", z_step_sign=1,
    write_spacing_between_slices=True, share=1.0,
)

ALL_VENDORS: dict[str, VendorProfile] = {**VENDORS, UNSEEN_VENDOR.key: UNSEEN_VENDOR}


@dataclass(frozen=True)
class ScenarioShift:
    """How a scenario changes acquisition relative to the baseline."""

    vendors: tuple[str, ...]
    noise_factor: float = 1.0
    dose_factor: float = 1.0  # multiplies tube current; noise follows 1/sqrt(dose)
    slice_thickness: float | None = None
    sharp_kernel: bool = False
    contrast: bool = False
    year: int = 2023  # first study year of the batch


SCENARIO_SHIFTS: dict[str, ScenarioShift] = {
    "baseline": ScenarioShift(vendors=tuple(VENDORS)),
    "baseline-new": ScenarioShift(vendors=tuple(VENDORS), year=2025),
    "new-vendor": ScenarioShift(vendors=(UNSEEN_VENDOR.key,), year=2025),
    "protocol-shift": ScenarioShift(
        vendors=tuple(VENDORS), slice_thickness=5.0, sharp_kernel=True, contrast=True, year=2025
    ),
    "low-dose": ScenarioShift(vendors=tuple(VENDORS), noise_factor=3.0, dose_factor=1 / 9, year=2025),
}


def apply_scenario(profile: VendorProfile, shift: ScenarioShift) -> VendorProfile:
    """Return the profile as the scenario acquires it (thicker slices, sharper kernel, less dose)."""
    changes: dict[str, object] = {
        "noise_hu": profile.noise_hu * shift.noise_factor,
        "tube_current_ma": max(10, round(profile.tube_current_ma * shift.dose_factor)),
    }
    if shift.slice_thickness is not None:
        changes["slice_thickness"] = shift.slice_thickness
        changes["slice_spacing"] = shift.slice_thickness
    if shift.sharp_kernel:
        changes["kernel"] = profile.sharp_kernel
        changes["noise_hu"] = float(changes["noise_hu"]) * 1.8  # type: ignore[arg-type]
        changes["noise_corr_mm"] = profile.noise_corr_mm * 0.45
    return dataclasses.replace(profile, **changes)  # type: ignore[arg-type]
