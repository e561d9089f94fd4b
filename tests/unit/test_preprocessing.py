"""Preprocessing correctness: HU, padding, unsigned storage, windows, resampling, size, orientation,
cache behaviour, slabs and features."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Spacing
from scipy import ndimage

from dicomops import ingest, io
from dicomops.config import IngestConfig, PreprocessConfig
from dicomops.preprocessing import stage
from dicomops.preprocessing.features import image_features
from dicomops.preprocessing.slabs import (
    central_slice_labels,
    sample_slabs,
    slab,
    slice_labels,
    slices_showing,
)
from dicomops.preprocessing.transforms import (
    FastSpacing,
    HUWindow,
    build_transforms,
    resolve_window,
)
from dicomops.preprocessing.volume import load_series, stored_to_hu
from dicomops.synthetic import ALL_VENDORS, phantom
from dicomops.synthetic.corpus import SeriesPlan, render_series, write_series
from tests.hostile import ct_slice, to_bytes

KEY = b"preprocess-test-key-0123456789abcd"
HU_ONLY = PreprocessConfig(window="none", crop_xy=400, workers=1)


def _ingest(src: Path, work: Path) -> pd.DataFrame:
    ingest.run(src, work, IngestConfig(workers=1, max_invalid_fraction=1.0), KEY)
    return pd.read_parquet(work / "ingest/accepted.parquet")


@pytest.fixture(scope="module")
def vendor_work(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, SeriesPlan]]:
    """One series per vendor profile (the unseen one too), 256 matrix, one nodule each, ingested."""
    root = tmp_path_factory.mktemp("vendors")
    plans, label_rows = {}, []
    for i, vendor in enumerate(sorted(ALL_VENDORS)):
        plan = SeriesPlan(index=i + 1, seed=31, scenario="new-vendor" if vendor == "uih" else "baseline",
                          vendor=vendor, label=1, nodule_count=1, fault=None, fault_detail="",
                          matrix=256, slices=40)
        label_rows.append(write_series(plan, root / "src").label_row)
        plans[vendor] = plan
    pd.DataFrame(label_rows).to_csv(root / "src" / "labels.csv", index=False)
    _ingest(root / "src", root / "work")
    return root, plans


def _series_rows(root: Path, plan: SeriesPlan) -> pd.DataFrame:
    accepted = pd.read_parquet(root / "work/ingest/accepted.parquet")
    return accepted[accepted.source_path.str.startswith(plan.case + "/")]


def _transformed(root: Path, plan: SeriesPlan, cfg: PreprocessConfig, extra: np.ndarray | None = None) -> dict:
    rows = _series_rows(root, plan)
    volume = load_series(rows, root / "work/deid")
    data = {"image": MetaTensor(torch.from_numpy(volume.hu)[None], affine=torch.as_tensor(volume.affine)),
            "windows": volume.windows}
    if extra is not None:
        data["mask"] = MetaTensor(torch.from_numpy(extra.astype(np.float32))[None], affine=torch.as_tensor(volume.affine))
    return build_transforms(cfg)(data)


def _regions_on_volume(root: Path, plan: SeriesPlan) -> np.ndarray:
    """The phantom's region labels, reordered like the volume (by z position)."""
    rendered = render_series(plan)
    rows = _series_rows(root, plan).sort_values("slice_index")
    out = np.zeros((plan.matrix, plan.matrix, len(rows)), np.uint8)
    for k, z in enumerate(rows.ImagePositionPatient_2):
        src = int(np.flatnonzero(np.abs(rendered.grid.z - z) < 1e-3)[0])
        out[:, :, k] = rendered.regions[src].T
    return out


@pytest.mark.parametrize("vendor", sorted(ALL_VENDORS))
def test_tissue_hu_survives_assembly_and_resampling(vendor_work, vendor: str) -> None:
    root, plans = vendor_work
    out = _transformed(root, plans[vendor], HU_ONLY, _regions_on_volume(root, plans[vendor]))
    hu, regions = out["image"][0].numpy(), out["mask"][0].numpy().astype(int)
    assert np.allclose(np.diag(np.asarray(out["image"].affine))[:3], 1.0)
    for region, truth in ((phantom.REGION_LUNG, phantom.HU_LUNG), (phantom.REGION_SOFT, phantom.HU_SOFT),
                          (phantom.REGION_BONE, phantom.HU_BONE)):
        inside = ndimage.binary_erosion(regions == region, iterations=2)
        assert inside.sum() > 100, (vendor, region)
        assert abs(float(np.median(hu[inside])) - truth) <= 5, (vendor, region, float(np.median(hu[inside])))
    assert hu.min() >= -1024.5  # padding never leaks in as -2000 / -3024 / -32768 HU


@pytest.mark.parametrize("vendor", sorted(ALL_VENDORS))
def test_nodule_keeps_its_physical_size_at_1mm(vendor_work, vendor: str) -> None:
    root, plans = vendor_work
    plan = plans[vendor]
    nodule = render_series(plan).nodules[0]
    out = _transformed(root, plan, HU_ONLY)
    image = out["image"][0].numpy()
    affine = np.asarray(out["image"].affine)
    lps = np.array(nodule.center)
    ras = np.array([-lps[0], -lps[1], lps[2], 1.0])
    center = np.rint(np.linalg.solve(affine, ras)[:3]).astype(int)
    half_max = (phantom.HU_NODULE + phantom.HU_LUNG) / 2
    for axis in (0, 1, 2):
        line = image[tuple(slice(None) if a == axis else center[a] for a in range(3))]
        above = line > half_max
        run = ndimage.label(above)[0]
        extent = int((run == run[center[axis]]).sum()) if above[center[axis]] else 0
        if axis == 2 and ALL_VENDORS[vendor].slice_spacing > 1.25:
            continue  # thick slices blur z beyond ±1 mm; in-plane is checked for every vendor
        assert abs(extent - nodule.diameter_mm) <= 1.5, (vendor, axis, extent, nodule.diameter_mm)


def _marker_series(folder: Path, *, reverse: bool, flip_rows: bool) -> None:
    """A 32×32×12 block of soft tissue with a 3-voxel bright marker at the patient's
    left-anterior-superior corner."""
    n, rows = 12, 32
    row_dir = [-1, 0, 0] if flip_rows else [1, 0, 0]
    folder.mkdir(parents=True)
    for k in range(n):
        z = float(k)
        pixels = np.full((rows, rows), 1024, np.uint16)  # 0 HU
        if k >= n - 3:  # superior
            col = slice(0, 3) if flip_rows else slice(rows - 3, rows)  # patient left
            pixels[0:3, col] = 3024  # anterior rows, 2000 HU
        ds = ct_slice(z=z, rows=rows, cols=rows, ImageOrientationPatient=[*row_dir, 0, 1, 0],
                      ImagePositionPatient=[15.5 if flip_rows else -15.5, -15.5, z],
                      PixelSpacing=[1.0, 1.0], InstanceNumber=(n - k) if reverse else k + 1)
        ds.PixelData = pixels.tobytes()
        name = f"{(n - k) if reverse else k:03d}.dcm"
        (folder / name).write_bytes(to_bytes(ds))


@pytest.mark.parametrize(("reverse", "flip_rows"), [(False, False), (True, False), (False, True)])
def test_orientation_puts_the_marker_in_the_right_corner(tmp_path: Path, reverse: bool, flip_rows: bool) -> None:
    _marker_series(tmp_path / "src" / "s", reverse=reverse, flip_rows=flip_rows)
    rows = _ingest(tmp_path / "src", tmp_path / "work")
    volume = load_series(rows, tmp_path / "work/deid")
    data = {"image": MetaTensor(torch.from_numpy(volume.hu)[None], affine=torch.as_tensor(volume.affine))}
    out = build_transforms(HU_ONLY.model_copy(update={"crop_xy": 32}))(data)
    image = out["image"][0].numpy()
    i, j, k = np.argwhere(image > 1000).mean(axis=0)  # centre of the marker
    # RAS: i grows towards the patient's right, j towards anterior, k towards superior.
    assert i < image.shape[0] // 4 and j > 3 * image.shape[1] // 4 and k > 3 * image.shape[2] // 4, (i, j, k)


def test_padding_and_unsigned_storage_become_the_right_hu() -> None:
    signed = np.array([[-2000, -1024, 0, 1000]], np.int16)
    hu = stored_to_hu(signed, 1.0, -1024.0, padding=-2000)
    # padding → air; -1024 stored → -2048 HU, below the physical minimum → air; 0 → -1024; 1000 → -24
    assert hu.tolist() == [[-1000.0, -1000.0, -1024.0, -24.0]]
    unsigned = np.array([[0, 1024, 4095, 40000]], np.uint16)  # read as int16, 40000 would turn negative
    assert stored_to_hu(unsigned, 1.0, -1024.0, padding=None).tolist() == [[-1024.0, 0.0, 3071.0, 38976.0]]
    half = np.array([[2048, 4096]], np.int16)  # slope 0.5
    assert stored_to_hu(half, 0.5, -1024.0, padding=None).tolist() == [[0.0, 1024.0]]


def test_multi_valued_header_windows_are_chosen_explicitly() -> None:
    windows = [(40.0, 400.0), (-600.0, 1500.0)]
    assert resolve_window(PreprocessConfig(window="header"), windows) == (40.0, 400.0)
    assert resolve_window(PreprocessConfig(window="header", header_window_index=1), windows) == (-600.0, 1500.0)
    with pytest.raises(ValueError, match="only 2 window"):
        resolve_window(PreprocessConfig(window="header", header_window_index=2), windows)
    with pytest.raises(ValueError, match="no WindowCenter"):
        resolve_window(PreprocessConfig(window="header"), [])
    lung = HUWindow(-600, 1500)(torch.tensor([-2000.0, -1350.0, -600.0, 150.0, 3000.0]))
    assert lung.tolist() == [0.0, 0.0, 0.5, 1.0, 1.0]


def test_fast_spacing_matches_monai_spacing() -> None:
    rng = np.random.default_rng(0)
    data = ndimage.gaussian_filter(rng.normal(size=(40, 36, 12)).astype(np.float32), 2) * 500
    affine = np.diag([0.7, 0.8, 2.5, 1.0])
    affine[:3, 3] = [-12.0, 5.0, 30.0]
    img = MetaTensor(torch.from_numpy(data)[None], affine=torch.as_tensor(affine))
    ours = FastSpacing((1.0, 1.0, 1.0))(img)
    ref = Spacing(pixdim=(1.0, 1.0, 1.0), mode="bilinear")(img)
    assert ours.shape == ref.shape
    np.testing.assert_allclose(np.asarray(ours.affine), np.asarray(ref.affine), atol=1e-6)
    assert float((ours - ref.as_tensor()).abs().mean()) < 1e-3
    oblique = affine.copy()
    oblique[0, 1] = 0.1  # not axis-aligned: the general path runs
    tilted = MetaTensor(torch.from_numpy(data)[None], affine=torch.as_tensor(oblique))
    np.testing.assert_allclose(FastSpacing((1.0, 1.0, 1.0))(tilted).numpy(),
                               Spacing(pixdim=(1.0, 1.0, 1.0))(tilted).numpy(), atol=1e-5)


def _member_kinds(path: Path) -> tuple[tuple[str, int], ...]:
    with zipfile.ZipFile(path) as zf:
        return tuple(sorted((info.filename, info.compress_type) for info in zf.infolist()))


def test_cache_hits_and_misses(vendor_work, tmp_path: Path) -> None:
    root, _ = vendor_work
    cfg = PreprocessConfig(workers=1, crop_xy=256)
    first = stage.preprocess_corpus(root / "work", cfg)
    assert first == {"series": 5, "computed": 5, "cached": 0, "failed": 0, "labels_withheld": 0}
    stage.check_made_from(root / "work", stage.corpus_content_hash(root / "work"))  # what training checks
    volumes = root / "work/preprocessed/volumes"
    stamps = {p.name: p.stat().st_mtime_ns for p in volumes.iterdir()}
    # The image, read four times a pipeline, is stored; the masks (the annotation on the acquired
    # grid too), mostly zeros or few, deflated.
    assert {_member_kinds(p) for p in volumes.glob("*.npz")} == {
        (("affine.npy", zipfile.ZIP_DEFLATED), ("image.npy", zipfile.ZIP_STORED), ("mask.npy", zipfile.ZIP_DEFLATED),
         ("native_affine.npy", zipfile.ZIP_DEFLATED), ("native_index.npy", zipfile.ZIP_DEFLATED),
         ("native_label.npy", zipfile.ZIP_DEFLATED), ("native_shape.npy", zipfile.ZIP_DEFLATED))}
    assert stage.preprocess_corpus(root / "work", cfg) == {"series": 5, "computed": 0, "cached": 5, "failed": 0,
                                                         "labels_withheld": 0}
    assert {p.name: p.stat().st_mtime_ns for p in volumes.iterdir()} == stamps  # nothing rewritten
    changed = stage.preprocess_corpus(root / "work", cfg.model_copy(update={"window": "soft_tissue",
                                                                             "compress_images": True}))
    assert changed["computed"] == 5
    assert {dict(_member_kinds(p))["image.npy"] for p in volumes.glob("*.npz")} == {zipfile.ZIP_DEFLATED}
    assert not set(stamps) & {p.name for p in volumes.iterdir()}  # stale entries pruned
    # Settings that do not change a volume do not invalidate it.
    assert stage.preprocess_corpus(root / "work", cfg.model_copy(
        update={"window": "soft_tissue", "negative_ratio": 3.0}))["computed"] == 0
    index = pd.read_parquet(root / "work/preprocessed/index.parquet")
    features = pd.read_parquet(root / "work/preprocessed/features.parquet")
    assert len(index) == len(features) == 5 and (index.positive_slices > 0).all()
    with np.load(root / "work/preprocessed" / index.path[0]) as npz:
        assert npz["image"].dtype == np.float16 and npz["image"].shape[:2] == (256, 256)
        assert float(npz["image"].min()) >= 0.0 and float(npz["image"].max()) <= 1.0


def test_compressed_images_hold_the_same_volume(tmp_path: Path) -> None:
    image = np.linspace(0, 1, 4 * 5 * 6, dtype=np.float16).reshape(4, 5, 6)
    mask = (image > 0.5).astype(np.uint8)
    for name, stored in (("plain", ("image",)), ("deflated", ())):
        io.write_npz(tmp_path / f"{name}.npz", stored=stored, image=image, mask=mask)
        with np.load(tmp_path / f"{name}.npz") as npz:
            assert npz["image"].dtype == np.float16 and np.array_equal(npz["image"], image)
            assert np.array_equal(npz["mask"], mask)
        with zipfile.ZipFile(tmp_path / f"{name}.npz") as zf:
            assert (zf.getinfo("image.npy").compress_type == zipfile.ZIP_STORED) == bool(stored)


def test_slabs_and_sampling() -> None:
    volume = np.arange(2 * 2 * 5, dtype=np.float32).reshape(2, 2, 5)
    s = slab(volume, 0, 3)
    assert s.shape == (3, 2, 2)
    np.testing.assert_array_equal(s[0], volume[..., 0])  # edge repeated
    np.testing.assert_array_equal(s[2], volume[..., 1])
    mask = np.zeros((4, 4, 6), np.uint8)
    mask[1:3, 1:3, 2] = 1
    mask[1, 1, 4] = 1
    labels = slice_labels(mask, min_voxels=3)
    assert labels.tolist() == [0, 0, 1, 0, 0, 0]
    index = pd.DataFrame({"SeriesInstanceUID": ["a", "b"], "label": [1, 0]})
    slabs = sample_slabs(index, {"a": labels, "b": np.zeros(6, np.int8)}, negative_ratio=2.0, seed=0)
    a, b = slabs[slabs.SeriesInstanceUID == "a"], slabs[slabs.SeriesInstanceUID == "b"]
    assert a.slice_label.sum() == 1 and len(a) == 3 and len(b) == 1
    # Hard negatives come besides the random ones, whatever the draw; a positive slice is never one.
    hard = {"a": np.array([3, 5, 2]), "b": np.array([0, 1])}
    for seed in range(5):
        slabs = sample_slabs(index, {"a": labels, "b": np.zeros(6, np.int8)}, 2.0, seed, hard)
        a, b = slabs[slabs.SeriesInstanceUID == "a"], slabs[slabs.SeriesInstanceUID == "b"]
        assert {3, 5} <= set(a.z) and len(a) == 5 and a.slice_label.sum() == 1
        assert {0, 1} <= set(b.z) and len(b) == 3 and not b.z.duplicated().any()


def test_repeated_positives_are_marked_and_the_draw_is_unchanged() -> None:
    labels = np.array([0, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0], np.int8)
    index = pd.DataFrame({"SeriesInstanceUID": ["a", "b"], "label": [1, 0]})
    arrays = {"a": labels, "b": np.zeros(12, np.int8)}
    plain = sample_slabs(index, arrays, 2.0, 3)
    # Slice 0 is no positive and 7 is not in the table: neither is marked; slices 2 and 3 are.
    marked = sample_slabs(index, arrays, 2.0, 3, repeat_by_series={"a": np.array([0, 2, 3, 7])}, repeat=4)
    assert marked.drop(columns="repeat").equals(plain.drop(columns="repeat"))
    assert set(plain.repeat) == {1}
    a = marked[marked.SeriesInstanceUID == "a"]
    assert dict(zip(a.z, a.repeat, strict=True)) == {z: 4 if z in (2, 3) else 1 for z in a.z}
    assert {1, 2, 3} <= set(a.z)  # every positive, as always
    assert (marked[marked.SeriesInstanceUID == "b"].repeat == 1).all()
    # slices_showing: the positive slices on which the named nodules show.
    mask = np.zeros((4, 4, 12), np.uint8)
    mask[:2, :2, 1:4] = 1
    mask[2:, 2:, 3:5] = 2
    assert slices_showing(mask, [1], labels, 3).tolist() == [1, 2, 3]
    assert slices_showing(mask, [2], labels, 3).tolist() == [3]  # slice 4 shows it but is no positive
    assert slices_showing(mask, [], labels, 3).tolist() == []


def test_caps_of_an_actionable_nodule_are_left_out() -> None:
    # A 9 mm ball (id 1, actionable) and a 5 mm one (id 2, not) on 1 mm voxels.
    grid = np.mgrid[:24, :24, :30].astype(float)
    mask = np.zeros((24, 24, 30), np.uint8)
    mask[((grid - np.array([8, 8, 10])[:, None, None, None]) ** 2).sum(0) <= 4.5 ** 2] = 1
    mask[((grid - np.array([16, 16, 22])[:, None, None, None]) ** 2).sum(0) <= 2.5 ** 2] = 2
    labels = central_slice_labels(mask, [1], min_voxels=3, min_area_share=0.5)
    area = np.count_nonzero(mask.reshape(-1, 30) == 1, axis=0)
    # Positive where the section is at least half the largest. By hand, the section d slices from the
    # centre holds the lattice points of a disc of radius^2 20.25 - d^2: 69, 61, 49, 37, 13 for d = 0 ... 4.
    assert area[6:15].tolist() == [13, 37, 49, 61, 69, 61, 49, 37, 13] and area.sum() == area[6:15].sum()
    assert np.flatnonzero(labels == 1).tolist() == [7, 8, 9, 10, 11, 12, 13]
    assert np.flatnonzero(labels == -1).tolist() == [6, 14]
    assert not labels[16:].any()  # the small nodule is nobody's positive
    # Share 0 is every slice with min_voxels voxels, as before; None counts every nodule.
    assert (central_slice_labels(mask, [1], 3, 0.0) == slice_labels(mask == 1, 3)).all()
    assert (central_slice_labels(mask, None, 3, 0.0) == slice_labels(mask, 3)).all()
    # Where a cap of one nodule meets the middle of another, the slice is positive.
    both = mask.copy()
    both[((grid - np.array([16, 16, 6])[:, None, None, None]) ** 2).sum(0) <= 3.5 ** 2] = 3
    assert central_slice_labels(both, [1, 3], 3, 0.5)[6] == 1
    # The caps are neither sampled as positives nor drawn as negatives.
    index = pd.DataFrame({"SeriesInstanceUID": ["a"], "label": [1]})
    for seed in range(5):
        slabs = sample_slabs(index, {"a": labels}, negative_ratio=10.0, seed=seed)
        assert not {6, 14} & set(slabs.z) and slabs.slice_label.sum() == 7


def test_low_dose_noise_shows_in_the_features() -> None:
    base = render_series(SeriesPlan(1, 3, "baseline", "ge", 0, 0, None, "", 128, 16))
    low = render_series(SeriesPlan(1, 3, "low-dose", "ge", 0, 0, None, "", 128, 16))
    affine = np.diag([base.grid.col_spacing, base.grid.row_spacing, 0.625, 1])
    f_base = image_features(np.nan_to_num(base.acquisition.hu, nan=-1000).transpose(2, 1, 0), affine)
    f_low = image_features(np.nan_to_num(low.acquisition.hu, nan=-1000).transpose(2, 1, 0), affine)
    assert 2.3 < f_low["noise_hu"] / f_base["noise_hu"] < 3.5
    assert 200 < f_base["body_width_mm"] < 340


def test_the_preprocessing_chain_is_deterministic_and_has_no_training_branch() -> None:
    from monai.transforms import Randomizable

    chain = build_transforms(HU_ONLY)
    assert not [t for t in chain.transforms if isinstance(t, Randomizable)]
    with pytest.raises(TypeError, match="train"):
        build_transforms(HU_ONLY, train=True)  # type: ignore[call-arg]


def test_only_actionable_nodules_make_positive_slices(vendor_work, tmp_path: Path) -> None:
    import json
    import shutil

    root, _ = vendor_work
    work = tmp_path / "work"
    shutil.copytree(root / "work", work, ignore=shutil.ignore_patterns("preprocessed"))
    labels_path = work / "deid/labels.csv"
    labels = pd.read_csv(labels_path, keep_default_na=False)
    demoted = labels.SeriesInstanceUID[0]
    records = json.loads(labels.nodules[0])
    labels.loc[0, "nodules"] = json.dumps([{**r, "actionable": False} for r in records])
    labels.to_csv(labels_path, index=False)
    stage.preprocess_corpus(work, PreprocessConfig(workers=1, crop_xy=256))
    index = pd.read_parquet(work / "preprocessed/index.parquet").set_index("SeriesInstanceUID")
    # The classifier's slice labels skip a nodule that is not actionable; the segmenter's mask keeps it.
    assert index.positive_slices[demoted] == 0
    assert (index.drop(demoted).positive_slices > 0).all()
    with np.load(work / "preprocessed" / index.path[demoted]) as npz:
        assert set(np.unique(npz["mask"])) == {0, 1}
        shown = np.flatnonzero(slice_labels(npz["mask"], PreprocessConfig().min_positive_voxels))
    # ... and its slices are the hard negatives, every one in the training table with label 0.
    meta = json.loads((work / "preprocessed" / index.path[demoted]).with_suffix(".json").read_text())
    assert meta["other_nodule_slices"] == shown.tolist() and len(shown)
    slabs = pd.read_parquet(work / "preprocessed/slabs.parquet")
    chosen = slabs[slabs.SeriesInstanceUID == demoted]
    assert set(shown) <= set(chosen.z) and (chosen.slice_label == 0).all()
    assert stage.actionable_labels(json.dumps([{"actionable": True}, {"actionable": False}, {}])) == [1, 3]


def test_a_corrected_mask_is_preprocessed_again(vendor_work, tmp_path: Path, mlflow_env: str,
                                                 prefect_harness: None) -> None:
    """A reader's corrected mask changes no DICOM file and, written under its series' pseudonym, no
    byte of labels.csv: the stage's key and the entry's hold the mask too, so the flow preprocesses
    that series again with it (it skipped: the segmenter retrained on the old mask)."""
    import shutil

    from flows.preprocess import preprocess

    root, _ = vendor_work
    work = tmp_path / "work"
    shutil.copytree(root / "work", work)
    shutil.rmtree(work / "preprocessed", ignore_errors=True)
    cfg = PreprocessConfig(workers=1, crop_xy=256)
    assert preprocess(work=work, config=cfg)["computed"] == 5
    assert preprocess(work=work, config=cfg)["skipped"]
    labels = pd.read_csv(work / "deid/labels.csv", keep_default_na=False)
    row = labels[labels.mask_path != ""].iloc[0]
    mask_file = work / "deid" / row.mask_path
    with np.load(mask_file) as npz:
        mask, ipp_z = npz["mask"], npz["ipp_z"]
    assert mask.any()
    np.savez_compressed(mask_file, mask=np.zeros_like(mask), ipp_z=ipp_z)  # the reader: no nodule there
    again = preprocess(work=work, config=cfg)
    assert not again["skipped"] and (again["computed"], again["cached"]) == (1, 4)
    index = pd.read_parquet(work / "preprocessed/index.parquet").set_index("SeriesInstanceUID")
    with np.load(work / "preprocessed" / index.loc[row.SeriesInstanceUID, "path"]) as npz:
        assert not npz["mask"].any()
    assert index.loc[row.SeriesInstanceUID, "positive_slices"] == 0


def test_the_cache_keeps_the_annotation_where_it_was_drawn(vendor_work, tmp_path: Path) -> None:
    """Each entry holds its mask on the acquired grid beside the resampled one, with both affines:
    the resampled reference, read back on the acquired slices as the SEG is written, is the
    annotation again (so the segmenter's native Dice measures the model, not the bookkeeping), and
    the acquired mask is the generator's own, voxel for voxel."""
    import shutil

    from dicomops.segmentation import metrics
    from dicomops.segmentation.data import nodule_refs, read_volume

    root, plans = vendor_work
    work = tmp_path / "work"
    shutil.copytree(root / "work", work, ignore=shutil.ignore_patterns("preprocessed"))
    stage.preprocess_corpus(work, PreprocessConfig(workers=1, crop_xy=256))
    index = pd.read_parquet(work / "preprocessed/index.parquet").set_index("SeriesInstanceUID")
    labels = pd.read_csv(work / "deid/labels.csv", keep_default_na=False).set_index("SeriesInstanceUID")
    for uid, row in index.iterrows():
        path = work / "preprocessed" / row.path
        volume = read_volume(path, str(uid), str(row.vendor), nodule_refs(labels.nodules[uid]), (8, 8, 8))
        assert volume.native is not None and len(volume.nodules) == 1, row.vendor
        plan = next(p for p in plans.values() if p.vendor == row.vendor)
        assert volume.native.shape == (plan.matrix, plan.matrix, plan.slices)
        drawn = np.load(work / "deid" / labels.mask_path[uid])["mask"]
        assert len(volume.native.index) == int((drawn > 0).sum())
        judged = metrics.evaluate_series((volume.mask > 0).astype(np.float32), volume.mask, volume.nodules,
                                         native=volume.native).nodules[0]
        assert judged["dice_native"] > 0.9, (row.vendor, judged)
