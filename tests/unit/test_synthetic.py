"""The synthetic corpus: readable, vendor-faithful, exact in HU, deterministic, faults as listed."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from pydicom.errors import InvalidDicomError
from pydicom.uid import RLELossless
from scipy import ndimage

from dicomops.config import SynthConfig
from dicomops.synthetic import (
    ALL_VENDORS,
    VENDORS,
    corpus_digest,
    generate_corpus,
    phantom,
    plan_corpus,
    render_series,
)
from dicomops.synthetic.corpus import SeriesPlan, write_series
from dicomops.synthetic.writer import FAULTS


def _series_files(root: Path, series_dir: str) -> list[Path]:
    return sorted(p for p in (root / series_dir).iterdir() if p.is_file())


def _plan(vendor: str, scenario: str = "baseline", index: int = 3, **kw) -> SeriesPlan:
    base = dict(index=index, seed=5, scenario=scenario, vendor=vendor, label=1, nodule_count=2,
                fault=None, fault_detail="", matrix=64, slices=12)
    base.update(kw)
    return SeriesPlan(**base)


def test_every_file_reads_and_carries_its_vendor_profile(clean_corpus: Path) -> None:
    labels = pd.read_csv(clean_corpus / "labels.csv")
    assert set(labels.vendor) == set(VENDORS)
    for row in labels.itertuples():
        profile = VENDORS[row.vendor]
        files = _series_files(clean_corpus, row.series_dir)
        assert len(files) == row.slices
        for path in files:
            ds = pydicom.dcmread(path)
            assert ds.Manufacturer == profile.manufacturer
            assert ds.ManufacturerModelName == profile.model_name
            assert ds.ConvolutionKernel == profile.kernel
            assert ds.BitsStored == profile.bits_stored
            assert ds.PixelRepresentation == profile.pixel_representation
            assert float(ds.RescaleIntercept) == profile.rescale_intercept
            assert ds.file_meta.TransferSyntaxUID == profile.transfer_syntax
            assert ds.get("PixelPaddingValue") == profile.padding_value
            windows = ds.WindowCenter
            n_windows = len(windows) if isinstance(windows, pydicom.multival.MultiValue) else 1
            assert n_windows == len(profile.windows)
            assert ds.SOPClassUID == pydicom.uid.CTImageStorage
            assert ds.pixel_array.shape == (128, 128)


def test_file_names_do_not_follow_slice_order(clean_corpus: Path) -> None:
    labels = pd.read_csv(clean_corpus / "labels.csv")
    for row in labels.itertuples():
        files = _series_files(clean_corpus, row.series_dir)
        z_by_name = [float(pydicom.dcmread(p, stop_before_pixels=True).ImagePositionPatient[2]) for p in files]
        assert z_by_name != sorted(z_by_name), f"{row.vendor}: names sort in ascending z"


def test_compressed_vendor_decodes_to_the_stored_values(tmp_path: Path) -> None:
    plan = _plan("philips")
    assert VENDORS["philips"].transfer_syntax == RLELossless
    write_series(plan, tmp_path)
    truth = render_series(plan).acquisition.stored
    for path in _series_files(tmp_path, f"{plan.case}/series-1"):
        ds = pydicom.dcmread(path)
        assert ds.file_meta.TransferSyntaxUID == RLELossless
        k = int(ds.InstanceNumber) - 1
        np.testing.assert_array_equal(ds.pixel_array, truth[k])


@pytest.mark.parametrize("vendor", sorted(ALL_VENDORS))
def test_stored_values_recover_the_phantom_hu_exactly(tmp_path: Path, vendor: str) -> None:
    plan = _plan(vendor, scenario="new-vendor" if vendor == "uih" else "baseline")
    rendered = render_series(plan)
    write_series(plan, tmp_path)
    profile = rendered.profile
    slices = [pydicom.dcmread(p) for p in _series_files(tmp_path, f"{plan.case}/series-1")]
    slices.sort(key=lambda ds: int(ds.InstanceNumber))
    stored = np.stack([ds.pixel_array for ds in slices])
    expected_dtype = np.int16 if profile.pixel_representation else np.uint16
    assert stored.dtype == expected_dtype
    hu = stored.astype(np.float64) * float(slices[0].RescaleSlope) + float(slices[0].RescaleIntercept)
    fov = rendered.acquisition.fov
    np.testing.assert_array_equal(hu[:, fov], rendered.acquisition.hu[:, fov])
    # The phantom's own values come through wherever noise-free truth is clipped-free: lungs at -850.
    lung = rendered.regions == phantom.REGION_LUNG
    assert abs(float(np.median(hu[lung])) - phantom.HU_LUNG) < 3
    if profile.padding_value is not None:
        assert (stored[:, ~fov] == profile.padding_value).all()
        # Applying the rescale to padding gives nonsense HU: a consumer must mask it.
        assert hu[:, ~fov].max() < -1024


def test_same_seed_same_bytes_different_seed_different(tmp_path: Path) -> None:
    cfg = SynthConfig(patients=4, seed=3, fault_rate=0.5, matrix=64, slices=10, workers=1)
    generate_corpus(tmp_path / "a", cfg)
    generate_corpus(tmp_path / "b", cfg.model_copy(update={"workers": 2}))
    generate_corpus(tmp_path / "c", cfg.model_copy(update={"seed": 4}))
    assert corpus_digest(tmp_path / "a") == corpus_digest(tmp_path / "b")

    def pixel_hashes(root: Path) -> list[str]:
        out = []
        for p in sorted(root.rglob("*")):
            try:
                ds = pydicom.dcmread(p)
                out.append(ds.SOPInstanceUID + hashlib.sha256(ds.PixelData).hexdigest())
            except (InvalidDicomError, OSError, AttributeError, ValueError):
                pass
        return out

    assert pixel_hashes(tmp_path / "a") == pixel_hashes(tmp_path / "b")
    assert set(pixel_hashes(tmp_path / "a")).isdisjoint(pixel_hashes(tmp_path / "c"))


def test_every_fault_kind_is_written_as_listed(faulty_corpus: Path) -> None:
    faults = pd.read_csv(faulty_corpus / "faults.csv", keep_default_na=False)
    labels = pd.read_csv(faulty_corpus / "labels.csv")
    assert set(faults.fault) == set(FAULTS)
    listed = set(faults.path)
    for row in faults.itertuples():
        path = faulty_corpus / row.path
        assert path.is_file(), row.path
        if row.fault == "not_dicom":
            with pytest.raises(InvalidDicomError):
                pydicom.dcmread(path)
        elif row.fault == "truncated":
            ds = pydicom.dcmread(path)  # pydicom reads a truncated file without complaint...
            with pytest.raises((ValueError, AttributeError)):  # ...but its pixels do not decode
                ds.pixel_array  # noqa: B018
            sibling = next(p for p in path.parent.iterdir() if p.relative_to(faulty_corpus).as_posix() not in listed)
            assert path.stat().st_size < 0.7 * sibling.stat().st_size
        elif row.fault == "corrupt_pixel_data":
            ds = pydicom.dcmread(path)
            assert len(ds.PixelData) == ds.Rows * ds.Columns  # half of 2 bytes per pixel
        elif row.fault == "missing_tag":
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            assert row.detail and row.detail not in ds
        elif row.fault == "duplicated_slice":
            original = path.with_name(path.name.removesuffix("_copy"))
            assert path.read_bytes() == original.read_bytes()
        elif row.fault == "wrong_modality":
            assert pydicom.dcmread(path, stop_before_pixels=True).Modality == "MR"
    by_series = faults.groupby("SeriesInstanceUID")
    for uid, group in by_series:
        fault = group.fault.iloc[0]
        series_dir = labels.set_index("SeriesInstanceUID").loc[uid, "series_dir"]
        files = [p for p in _series_files(faulty_corpus, series_dir) if not p.name.endswith("_copy")]
        if fault == "missing_slice":
            z = sorted(float(pydicom.dcmread(p, stop_before_pixels=True).ImagePositionPatient[2]) for p in files)
            steps = np.diff(z)
            assert len(files) == 11 and steps.max() == pytest.approx(2 * steps.min())
        if fault == "inconsistent_spacing":
            spacings = {tuple(pydicom.dcmread(p, stop_before_pixels=True).PixelSpacing) for p in files}
            assert len(spacings) == 2
    # Files that are not listed are clean: full pixel data, CT, all required tags.
    for path in faulty_corpus.glob("case-*/series-1/*"):
        if path.relative_to(faulty_corpus).as_posix() in listed:
            continue
        ds = pydicom.dcmread(path)
        assert ds.Modality == "CT"
        assert ds.pixel_array.shape == (128, 128)


def _flat_noise(rendered) -> float:
    """Noise in the soft tissue, away from edges: standard deviation of HU there."""
    soft = ndimage.binary_erosion(rendered.regions == phantom.REGION_SOFT, iterations=2)
    soft &= rendered.acquisition.fov[None]
    return float(np.nanstd(rendered.acquisition.hu[soft]))


def test_low_dose_has_three_times_the_noise_of_baseline() -> None:
    base = render_series(_plan("ge", "baseline", matrix=128))
    low = render_series(_plan("ge", "low-dose", matrix=128))
    ratio = _flat_noise(low) / _flat_noise(base)
    assert 2.6 < ratio < 3.4, ratio
    assert low.profile.tube_current_ma < base.profile.tube_current_ma / 5


def test_protocol_shift_is_thick_sharp_and_contrast_enhanced() -> None:
    base = render_series(_plan("siemens", "baseline"))
    shifted = render_series(_plan("siemens", "protocol-shift"))
    assert shifted.profile.slice_thickness == 5.0 and base.profile.slice_thickness == 1.0
    assert shifted.profile.kernel == VENDORS["siemens"].sharp_kernel
    blood = shifted.regions == phantom.REGION_BLOOD
    assert np.nanmedian(shifted.acquisition.hu[blood]) > 200
    assert np.nanmedian(base.acquisition.hu[base.regions == phantom.REGION_BLOOD]) < 80


def test_scenarios_choose_their_vendors_and_keep_baseline_new_alike() -> None:
    cfg = SynthConfig(patients=40, seed=1, matrix=64, slices=8)
    assert {p.vendor for p in plan_corpus(cfg.model_copy(update={"scenario": "new-vendor"}))} == {"uih"}
    base = plan_corpus(cfg)
    new = plan_corpus(cfg.model_copy(update={"scenario": "baseline-new"}))
    assert {p.vendor for p in base} == {p.vendor for p in new} == set(VENDORS)
    assert render_series(new[0]).phi.study_date[:4] >= "2025"


def test_class_balance_differs_between_vendors() -> None:
    plans = plan_corpus(SynthConfig(patients=1000, seed=2))
    rate = {v: np.mean([p.label for p in plans if p.vendor == v]) for v in VENDORS}
    assert rate["siemens"] < 0.33 and rate["canon"] > 0.52, rate
    counts = {v: sum(p.vendor == v for p in plans) for v in VENDORS}
    assert counts == {"siemens": 300, "ge": 300, "philips": 200, "canon": 200}


def test_nodules_are_in_the_mask_with_their_size() -> None:
    rendered = render_series(_plan("canon", matrix=256, slices=40, nodule_count=1))
    nodule = rendered.nodules[0]
    assert phantom.NODULE_DIAMETER_MM[0] <= nodule.diameter_mm <= phantom.NODULE_DIAMETER_MM[1]
    voxel = rendered.grid.row_spacing * rendered.grid.col_spacing * 0.8  # canon slice spacing
    # The mask holds instance ids since generator version 3; this one nodule is id 1.
    assert set(np.unique(rendered.mask)) == {0, 1}
    volume = (rendered.mask == 1).sum() * voxel
    expected = np.pi / 6 * nodule.diameter_mm**3
    assert 0.6 * expected < volume < 1.5 * expected
    hu = rendered.acquisition.hu[rendered.mask.astype(bool)]
    assert abs(np.nanmedian(hu) - phantom.HU_NODULE) < 40  # soft tissue in the lung


def test_every_nodule_is_visible_in_lung_parenchyma() -> None:
    # A nodule overlapping the heart is soft tissue on soft tissue: labelled positive, yet invisible.
    rng = np.random.default_rng(11)
    grid = phantom.Grid(rows=160, cols=160, row_spacing=2.2, col_spacing=2.2, z=np.arange(-60.0, 60.0, 2.0))
    hidden = []
    for _ in range(40):
        anatomy = phantom.sample_anatomy(rng, z_center=0.0)
        nodules = phantom.sample_nodules(rng, anatomy, 2, grid.z)
        assert all(phantom.nodule_fits(anatomy, n) for n in nodules)
        # Actionable size only, and wider than the widest vessel, so each positive is decidable.
        widest_vessel = 2 * max(v[2] for v in anatomy.vessels)
        assert all(n.diameter_mm >= max(phantom.NODULE_DIAMETER_MM[0], 1.8 * widest_vessel) for n in nodules)
        _, regions, _ = phantom.render_phantom(anatomy, [], grid)
        for n in nodules:
            _, _, mask = phantom.render_phantom(anatomy, [n], grid)
            background = regions[mask.astype(bool)]
            hidden.append(np.isin(background, [phantom.REGION_BLOOD, phantom.REGION_SOFT, phantom.REGION_FAT,
                                               phantom.REGION_BONE]).mean())
    assert max(hidden) == 0.0


def test_ribs_stay_in_the_chest_wall_clear_of_the_lungs() -> None:
    # A rib inside the lung outline is a round bright blob on the lung border: a nodule look-alike.
    rng = np.random.default_rng(5)
    grid = phantom.Grid(rows=200, cols=200, row_spacing=1.8, col_spacing=1.8, z=np.arange(-40.0, 40.0, 4.0))
    for _ in range(30):
        _, regions, _ = phantom.render_phantom(phantom.sample_anatomy(rng, z_center=0.0), [], grid)
        ribs = (regions == phantom.REGION_BONE)
        near_ribs = ndimage.binary_dilation(ribs, structure=np.ones((1, 3, 3)), iterations=1)
        assert not (near_ribs & (regions == phantom.REGION_LUNG)).any()


def test_nodule_fits_rejects_the_heart_and_the_chest_wall() -> None:
    anatomy = phantom.sample_anatomy(np.random.default_rng(2), z_center=0.0)
    hx, hy = phantom.heart_center(anatomy)
    assert not phantom.nodule_fits(anatomy, phantom.Nodule((hx, hy, 0.0), 8.0))
    lateral = anatomy.lung_dx + anatomy.lung_a
    assert not phantom.nodule_fits(anatomy, phantom.Nodule((-lateral, 0.0, 0.0), 8.0))
    assert phantom.nodule_fits(anatomy, phantom.Nodule((-(anatomy.lung_dx + 0.3 * anatomy.lung_a), 0.0, 0.0), 6.0))


def test_labels_masks_and_phi_tables(clean_corpus: Path) -> None:
    labels = pd.read_csv(clean_corpus / "labels.csv", keep_default_na=False)
    assert {"SeriesInstanceUID", "PatientID", "vendor", "label", "nodule_count",
            "nodule_diameters_mm", "actionable_count"} <= set(labels.columns)
    for row in labels.itertuples():
        with np.load(clean_corpus / row.mask_path) as npz:
            assert npz["mask"].shape == (row.slices, 128, 128)
            # Since generator version 3 a negative may hold small or ground-glass nodules, and the
            # mask is an instance map: id k + 1 for the k-th record of `nodules`.
            assert set(np.unique(npz["mask"])) == set(range(row.nodule_count + 1))
            records = json.loads(row.nodules) if row.nodules else []
            assert len(records) == row.nodule_count
            assert row.actionable_count == sum(r["actionable"] for r in records)
            assert bool(row.label) == (row.actionable_count > 0)
    phi = pd.read_csv(clean_corpus / "phi.csv")
    assert set(phi.PatientID) == set(labels.PatientID)
    assert {"patient_name", "birth_date", "address", "telephone", "accession_number",
            "institution", "referring_physician", "comments"} <= set(phi.field)
    one = pydicom.dcmread(next((clean_corpus / labels.series_dir[0]).iterdir()))
    values = set(phi[phi.PatientID == labels.PatientID[0]].value)
    assert str(one.PatientName) in values and one.PatientAddress in values
    private = one.private_block(0x0009, "DICOMOPS SYNTH 1.0")
    assert private[0x01].value == str(one.PatientName)
    assert one.RequestAttributesSequence[0].IssuerOfAccessionNumberSequence[0].LocalNamespaceEntityID
    assert one.OtherPatientIDsSequence[0].PatientID in values


def test_sidecar_names_are_the_ones_the_ingest_gate_skips(clean_corpus: Path) -> None:
    import fnmatch

    from dicomops.config import IngestConfig
    from dicomops.synthetic import sidecars

    root_files = {p.name for p in clean_corpus.iterdir() if p.is_file()}
    assert root_files == set(sidecars.SIDECAR_FILES)
    assert IngestConfig().sidecars == sidecars.SIDECAR_PATTERNS
    labels = pd.read_csv(clean_corpus / sidecars.LABELS_CSV, keep_default_na=False)
    assert labels.mask_path.tolist() == [sidecars.mask_path(Path(d).parts[0]) for d in labels.series_dir]
    masks = [p.relative_to(clean_corpus).as_posix() for p in (clean_corpus / sidecars.MASKS_DIR).iterdir()]
    assert sorted(masks) == sorted(labels.mask_path)
    assert all(any(fnmatch.fnmatchcase(m, pat) for pat in IngestConfig().sidecars) for m in masks)
    with pytest.raises(ValueError, match="plain file stem"):
        sidecars.mask_path("masks/case-00001")
