"""Each slice is read with its own pixel header: rescale, padding, storage; one frame per file.

A bug hunter re-encoded slice 5 of a 12-slice series (stored + 1024, RescaleIntercept -2048: the
same HU) and it came out 1024 HU too high with nothing said: ``load_series`` took slope,
intercept, padding and storage from the first slice for all. And an unsigned 12-bit series padded
with 0xFFFF (PixelPaddingValue 0xFFFF) had its padding masked to 4095 before the comparison, so
the out-of-field voxels became +3071 HU instead of air.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from pydicom.uid import RLELossless

from dicomops import ingest
from dicomops.config import IngestConfig
from dicomops.preprocessing.volume import AIR_HU, load_series, read_cells
from tests.hostile import ct_slice, to_bytes

KEY = b"per-slice-rescale-key-0123456789ab"
N, SIZE = 12, 32
SERIES = ("rescale", "rescale-rle", "pad", "pad-rle", "mono1", "windows", "frames")


def _stored(k: int) -> np.ndarray:
    """Slice k's stored values with slope 1 and intercept -1024: soft tissue, a lung-like disc
    and a metal pixel at the 12-bit maximum (+3071 HU)."""
    yy, xx = np.mgrid[:SIZE, :SIZE]
    pixels = np.full((SIZE, SIZE), 1064 + 3 * k, np.uint16)  # 40 HU + 3k
    pixels[(yy - 16) ** 2 + (xx - 16) ** 2 < 36] = 200  # -824 HU
    pixels[16, 16] = 4095
    return pixels


def _corners() -> np.ndarray:
    yy, xx = np.mgrid[:SIZE, :SIZE]
    return (yy - 15.5) ** 2 + (xx - 15.5) ** 2 > 16.5**2  # outside the circular field of view


def _write(folder: Path, kind: str, index: int) -> None:
    folder.mkdir(parents=True)
    for k in range(N):
        ds = ct_slice(z=float(k), rows=SIZE, cols=SIZE, PixelSpacing=[1.0, 1.0], PatientID=f"PS-{index}",
                      StudyInstanceUID=f"1.2.3.44.{index}", SeriesInstanceUID=f"1.2.3.44.{index}.1")
        ds.BitsStored, ds.HighBit = (12, 11) if kind.startswith("pad") else (16, 15)
        pixels = _stored(k)
        if kind.startswith("rescale") and k == 5:  # the hunter's slice: a wider range, same HU
            pixels, ds.RescaleIntercept = pixels + 1024, "-2048"
        if kind.startswith("rescale") and k == 8:  # another slope, same HU
            pixels, ds.RescaleSlope = pixels * 2, "0.5"
        if kind.startswith("pad"):
            if k == 2:  # a padding value inside the 12-bit range, this slice only
                pixels[_corners()], ds.PixelPaddingValue = 0, 0
            else:  # outside it: the whole cell, high bits included
                pixels[_corners()], ds.PixelPaddingValue = 0xFFFF, 0xFFFF
        if kind == "mono1":
            ds.PhotometricInterpretation = "MONOCHROME1"
        if kind == "windows":
            ds.WindowCenter, ds.WindowWidth = (40, 400) if k < 4 else (-600, 1500)
        if kind == "frames":
            ds.NumberOfFrames = 2
            pixels = np.stack([pixels, pixels])
        ds.PixelData = pixels.tobytes()
        if kind.endswith("-rle"):
            bits = ds.BitsStored
            ds.BitsStored, ds.HighBit = 16, 15  # the encoder refuses cells above BitsStored
            ds.compress(RLELossless, pixels)
            ds.BitsStored, ds.HighBit = bits, bits - 1
        (folder / f"{k:03d}.dcm").write_bytes(to_bytes(ds))


def _truth(kind: str, k: int) -> np.ndarray:
    hu = _stored(k).astype(np.float32) - 1024
    if kind.startswith("pad"):
        hu[_corners()] = AIR_HU
    return hu


@pytest.fixture(scope="module")
def ingested(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, pd.DataFrame]:
    root = tmp_path_factory.mktemp("per-slice")
    for index, kind in enumerate(SERIES):
        _write(root / "src" / kind, kind, index)
    gate = ingest.run(root / "src", root / "work", IngestConfig(workers=1, max_invalid_fraction=1.0), KEY)
    assert gate.accepted_series == len(SERIES) - 1  # the multi-frame one is the gate's (the last test)
    assert gate.reasons == {"bad_value:NumberOfFrames": 12}
    return root / "work" / "deid", pd.read_parquet(root / "work/ingest/accepted.parquet")


def _series(ingested: tuple[Path, pd.DataFrame], kind: str) -> tuple[pd.DataFrame, Path]:
    deid, accepted = ingested
    return accepted[accepted.source_path.str.startswith(kind + "/")], deid


@pytest.mark.parametrize("kind", ["rescale", "rescale-rle", "pad", "pad-rle", "mono1"])
def test_every_slice_gets_its_true_hu(ingested: tuple[Path, pd.DataFrame], kind: str) -> None:
    rows, deid = _series(ingested, kind)
    volume = load_series(rows, deid)
    assert volume.hu.shape == (SIZE, SIZE, N)
    for k in range(N):
        got = volume.hu[:, :, k].T  # (cols, rows) -> (rows, cols)
        assert np.array_equal(got, _truth(kind, k)), (kind, k, float(np.abs(got - _truth(kind, k)).max()))
    # The metal pixel (stored 4095, the 12-bit maximum) is tissue, not padding; MONOCHROME1 changes
    # the display (PS3.3 C.7.6.3.1.2: after the VOI transformation), never the HU.
    assert float(volume.hu[16, 16, 0]) == 3071.0


def test_the_volume_takes_the_window_most_slices_carry(ingested: tuple[Path, pd.DataFrame]) -> None:
    rows, deid = _series(ingested, "windows")
    assert load_series(rows, deid).windows == [(-600.0, 1500.0)]  # 8 slices of 12; the first 4 differ


def test_a_file_with_several_frames_is_refused_not_cut_to_its_first(ingested: tuple[Path, pd.DataFrame],
                                                                    tmp_path: Path) -> None:
    """The gate quarantines each file (the fixture); were one to get past it, preprocessing refuses
    it rather than read its first frame alone."""
    rows, _ = _series(ingested, "frames")
    assert rows.empty
    _write(tmp_path / "frames", "frames", 0)
    first = sorted((tmp_path / "frames").iterdir())[0]
    with pytest.raises(ValueError, match="NumberOfFrames above 1") as raised:
        read_cells(first, SIZE, SIZE, 16, 0, frames=2)
    assert "2" not in str(raised.value)  # errors never quote a header value
