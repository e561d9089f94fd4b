"""Segmenter export and results on the native grid: ONNX parity through the sliding window, dynamic
spatial axes, the preprocessed → native mapping, and a DICOM SEG that dciodvfy accepts."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import highdicom as hd
import numpy as np
import onnx
import pydicom
import pytest
import torch
from monai.data import MetaTensor

from dicomops.config import PreprocessConfig, SegmentConfig
from dicomops.errors import ExportCheckError
from dicomops.export.onnx_export import session
from dicomops.pacs.results import Finding, encode
from dicomops.preprocessing.transforms import build_transforms
from dicomops.preprocessing.volume import LPS_TO_RAS, dicom_affine
from dicomops.segmentation import export, native
from dicomops.segmentation.model import build_segmenter, probability
from dicomops.synthetic.corpus import SeriesPlan, write_series

CFG = SegmentConfig(channels=(4, 8), strides=(2,), roi=(16, 16, 8), patch=(16, 16, 8), overlap=0.25)
ODD_SHAPE = (41, 37, 19)  # no axis a multiple of the window or of the stride


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_segmenter(CFG).eval()


def _volume(shape: tuple[int, int, int] = ODD_SHAPE, seed: int = 3) -> np.ndarray:
    """Noise on a bright blob, so probabilities vary across the volume and across windows."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1)
    blob = np.exp(-np.sum(((grid - np.asarray(shape) / 2) / 6.0) ** 2, axis=-1))
    return (0.7 * blob + 0.3 * rng.random(shape)).astype(np.float32)


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, Path]:
    model = _model()
    return model, export.export_onnx(model, CFG, tmp_path_factory.mktemp("seg-onnx") / "segmenter.onnx")


# --- ONNX ------------------------------------------------------------------------------------


def test_onnx_sliding_window_matches_torch_on_an_odd_volume(exported: tuple[torch.nn.Module, Path]) -> None:
    model, path = exported
    volume = _volume()
    report = export.check_parity(model, path, [volume, _volume((20, 30, 11), seed=4)], CFG, tolerance=1e-4)
    print("segmenter parity", json.dumps(report, indent=1))
    assert report["volumes"] == 2 and report["patches"] == 4
    assert report["voxels"] == volume.size + 20 * 30 * 11
    assert report["volume_max_abs_diff"] < 1e-4 and report["patch_max_abs_diff"] < 1e-4
    assert report["torch_s_per_volume"] > 0 and report["onnx_s_per_volume"] > 0
    prob = export.onnx_probability(session(path), volume, CFG.model_copy(update={"sw_batch_size": 3}))
    ref = probability(model, volume, CFG)
    assert prob.shape == ODD_SHAPE and prob.dtype == np.float32
    assert ref.std() > 1e-3  # a constant output would make the comparison empty
    np.testing.assert_allclose(prob, ref, atol=1e-4)


def test_parity_fails_loudly_for_another_model(exported: tuple[torch.nn.Module, Path]) -> None:
    _, path = exported
    with pytest.raises(ExportCheckError, match=r"parity failed: max \|Δp\|"):
        export.check_parity(_model(seed=1), path, [_volume()], CFG, patches=2, threads=1)


def test_exported_graph_has_dynamic_batch_and_spatial_axes(exported: tuple[torch.nn.Module, Path]) -> None:
    model, path = exported
    proto = onnx.load(str(path))
    assert proto.opset_import[0].version == 18
    (inp,), (out,) = proto.graph.input, proto.graph.output
    assert (inp.name, out.name) == ("image", "logits")
    dims = inp.type.tensor_type.shape.dim
    assert dims[1].dim_value == 1
    assert all(dims[a].dim_param for a in (0, 2, 3, 4)), dims  # symbolic, not the roi
    props = {p.key: p.value for p in proto.metadata_props}
    settings = json.loads(props[export.METADATA_KEY])
    assert settings["roi"] == [16, 16, 8] and settings["spatial_multiple"] == 2
    assert props["dicomops.opset"] == "18"
    # A batch and a window size the export never saw.
    x = np.random.default_rng(0).random((3, 1, 24, 18, 12), dtype=np.float32)
    got = session(path).run(None, {"image": x})[0]
    with torch.inference_mode():
        ref = model(torch.from_numpy(x)).numpy()
    assert got.shape == (3, 1, 24, 18, 12)
    np.testing.assert_allclose(got, ref, atol=1e-4)


def test_onnx_probability_refuses_a_batched_array(exported: tuple[torch.nn.Module, Path]) -> None:
    with pytest.raises(ValueError, match="one \\(I, J, K\\) volume"):
        export.onnx_probability(session(exported[1]), _volume()[None], CFG)


# --- preprocessed → native -------------------------------------------------------------------

NATIVE_SHAPE = (96, 80, 24)  # columns, rows, slices
SPHERE_RADIUS_MM = 7.0


def _native_affine() -> np.ndarray:
    """Axial LPS slices, 0.7 x 0.7 mm pixels, 2.5 mm apart, ordered feet-wards: in RAS the
    column, row and slice axes all point the "wrong" way (-x, -y, -z)."""
    iop = np.array([1.0, 0.0, 0.0, 0.0, 1.0, 0.0])
    return dicom_affine(iop, np.array([31.5, -12.25, 80.0]), (0.7, 0.7), 2.5, np.array([0.0, 0.0, -1.0]))


def _ras_of(affine: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1).astype(float)
    return grid @ affine[:3, :3].T + affine[:3, 3]


def _sphere_case() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Native HU volume (a body in air), the sphere mask on it, its affine and the centre (RAS)."""
    affine = _native_affine()
    ras = _ras_of(affine, NATIVE_SHAPE)
    centre = ras[38, 34, 11] + np.array([0.3, -0.2, 0.9])  # between voxel centres
    sphere = np.linalg.norm(ras - centre, axis=-1) <= SPHERE_RADIUS_MM
    hu = np.full(NATIVE_SHAPE, -1000.0, np.float32)
    hu[12:84, 6:70] = 40.0  # the body; the crop centres on it
    hu[sphere] = 60.0
    return hu, sphere, affine, centre


def _meta(array: np.ndarray, affine: np.ndarray) -> MetaTensor:
    return MetaTensor(torch.from_numpy(np.ascontiguousarray(array))[None], affine=torch.as_tensor(affine))


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / float(a.sum() + b.sum())


def _centroid_ras(mask: np.ndarray, affine: np.ndarray) -> np.ndarray:
    return np.argwhere(mask).mean(axis=0) @ affine[:3, :3].T + affine[:3, 3]


def test_mask_round_trips_through_the_preprocessing_grid() -> None:
    hu, sphere, affine, centre = _sphere_case()
    # A 40 mm crop of a 67 x 56 mm field: the crop moves the origin, and the mapping must follow.
    cfg = PreprocessConfig(crop_xy=40)
    out = build_transforms(cfg)({"image": _meta(hu, affine), "mask": _meta(sphere.astype(np.uint8), affine),
                                 "windows": []})
    pre_mask = out["mask"][0].numpy()
    pre_affine = np.asarray(out["image"].affine, float)
    assert np.allclose(np.diag(pre_affine)[:3], 1.0) and pre_mask.shape[:2] == (40, 40)
    assert pre_mask.sum() > 1000  # the sphere survived the crop

    back = native.to_native_mask(pre_mask, pre_affine, affine, NATIVE_SHAPE)
    assert back.dtype == np.bool_ and back.shape == NATIVE_SHAPE
    dice = _dice(back, sphere)
    shift = np.abs(_centroid_ras(back, affine) - _centroid_ras(sphere, affine))
    print(f"round trip: Dice {dice:.4f}, centroid shift {shift.round(3)} mm")
    assert dice >= 0.9
    assert (shift <= np.array([0.7, 0.7, 2.5])).all()  # within one native voxel on every axis
    assert np.linalg.norm(_centroid_ras(back, affine) - centre) < 1.0


def test_probabilities_on_a_direct_1mm_grid_map_back() -> None:
    """The simpler construction: a 1 mm RAS grid over part of the region, a soft sphere on it."""
    _, sphere, affine, centre = _sphere_case()
    pre_affine = np.eye(4)
    pre_affine[:3, 3] = centre - np.array([20.2, 15.6, 18.4])  # not on native centres
    pre_shape = (40, 30, 36)
    distance = np.linalg.norm(_ras_of(pre_affine, pre_shape) - centre, axis=-1)
    prob = (1.0 / (1.0 + np.exp(distance - SPHERE_RADIUS_MM))).astype(np.float32)  # 0.5 on the surface
    back = native.to_native_mask(prob, pre_affine, affine, NATIVE_SHAPE, threshold=0.5)
    assert _dice(back, sphere) >= 0.9
    np.testing.assert_allclose(_centroid_ras(back, affine), centre, atol=0.7)
    # A higher threshold shrinks the mask: probabilities are thresholded, not rounded.
    assert native.to_native_mask(prob, pre_affine, affine, NATIVE_SHAPE, threshold=0.9).sum() < back.sum()


def test_native_voxels_outside_the_preprocessed_volume_are_background() -> None:
    affine = _native_affine()
    pre_affine = np.eye(4)
    pre_affine[:3, 3] = [-60.0, -20.0, 40.0]  # inside the native field (x -98..-31.5, y -43..12, z 22.5..80)
    full = np.ones((10, 8, 6), dtype=bool)
    back = native.to_native_mask(full, pre_affine, affine, NATIVE_SHAPE)
    pre_index = (_ras_of(affine, NATIVE_SHAPE) - pre_affine[:3, 3])
    inside = ((pre_index > -0.5 + 1e-6) & (pre_index < np.array([10, 8, 6]) - 0.5 - 1e-6)).all(axis=-1)
    np.testing.assert_array_equal(back, inside)
    assert 0 < back.sum() < back.size


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((np.zeros((4, 4)), np.eye(4), np.eye(4), (4, 4, 4)), "must be an \\(I, J, K\\) volume"),
        ((np.zeros((4, 4, 4)), np.zeros((4, 4)), np.eye(4), (4, 4, 4)), "pre_affine must be"),
        ((np.zeros((4, 4, 4)), np.eye(4), np.eye(3), (4, 4, 4)), "native_affine must be"),
        ((np.zeros((4, 4, 4)), np.eye(4), np.eye(4), (4, 0, 4)), "native_shape must be"),
    ],
)
def test_to_native_mask_names_the_bad_argument(args: tuple, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        native.to_native_mask(*args)


# --- the SEG on the source series -------------------------------------------------------------

DCIODVFY = shutil.which("dciodvfy")
FINDING = Finding(present=True, score=0.8125, threshold=0.5, model_name="dicomops-ct-nodule-seg",
                  model_version="3")


@pytest.fixture(scope="module")
def philips(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[pydicom.Dataset], dict[str, np.ndarray]]:
    """A 24-slice Philips series (2 mm slices, files feet-wards) with one nodule, the datasets in
    a shuffled order, and the truth mask (rows, columns) of every SOP instance."""
    out = tmp_path_factory.mktemp("seg-series")
    plan = SeriesPlan(index=1, seed=5, scenario="baseline", vendor="philips", label=1, nodule_count=1,
                      fault=None, fault_detail="", matrix=96, slices=24)
    row = write_series(plan, out).label_row
    images = [pydicom.dcmread(p) for p in sorted((out / str(row["series_dir"])).iterdir())]
    order = np.random.default_rng(0).permutation(len(images))
    images = [images[i] for i in order]
    truth = np.load(out / str(row["mask_path"]))
    by_sop = {}
    for ds in images:
        (k,) = np.flatnonzero(np.abs(truth["ipp_z"] - float(ds.ImagePositionPatient[2])) < 1e-3)
        by_sop[ds.SOPInstanceUID] = truth["mask"][k].astype(bool)
    holding = sum(m.any() for m in by_sop.values())
    assert 0 < holding < len(images) - 4  # empty slices on both sides of the nodule
    return images, by_sop


def test_native_grid_is_the_geometric_stack(philips: tuple[list[pydicom.Dataset], dict]) -> None:
    images, _ = philips
    grid = native.native_grid(images)
    assert grid.shape == (96, 96, 24)
    for k, idx in enumerate(grid.order):  # voxel (0, 0, k) is the first pixel of slice k
        lps = LPS_TO_RAS @ grid.affine @ np.array([0.0, 0.0, k, 1.0])
        np.testing.assert_allclose(lps[:3], [float(v) for v in images[idx].ImagePositionPatient], atol=1e-3)
    z = [float(images[i].ImagePositionPatient[2]) for i in grid.order]
    assert np.all(np.diff(z) > 0)  # ordered along the normal, not by file or list order


def test_series_segmentation_through_the_preprocessing_grid(philips: tuple[list[pydicom.Dataset], dict],
                                                           tmp_path: Path) -> None:
    """Truth mask → 1 mm cache (the project's transforms) → native grid → SEG → read back."""
    images, by_sop = philips
    grid = native.native_grid(images)
    ordered = [images[i] for i in grid.order]
    hu = np.stack([ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept) for ds in ordered])
    truth_xyz = np.stack([by_sop[ds.SOPInstanceUID] for ds in ordered]).transpose(2, 1, 0)
    out = build_transforms(PreprocessConfig(crop_xy=320))(
        {"image": _meta(hu.transpose(2, 1, 0).astype(np.float32), grid.affine),
         "mask": _meta(truth_xyz.astype(np.uint8), grid.affine), "windows": []})
    mask_native = native.to_native_mask(out["mask"][0].numpy(), np.asarray(out["image"].affine, float),
                                        grid.affine, grid.shape)
    assert _dice(mask_native, truth_xyz) >= 0.9

    seg = native.series_segmentation(images, mask_native, FINDING)
    path = tmp_path / "seg.dcm"
    path.write_bytes(encode(seg))
    back = hd.seg.segread(path)
    holding = {images[i].SOPInstanceUID for k, i in enumerate(grid.order) if mask_native[:, :, k].any()}
    truth_holding = {sop for sop, m in by_sop.items() if m.any()}
    assert holding == truth_holding  # the mapping kept the nodule on its slices
    frames = back.PerFrameFunctionalGroupsSequence
    assert back.NumberOfFrames == len(truth_holding)
    source_ipp = {ds.SOPInstanceUID: [float(v) for v in ds.ImagePositionPatient] for ds in images}
    for frame in frames:
        sop = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        assert sop in truth_holding
        np.testing.assert_allclose([float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient],
                                   source_ipp[sop], atol=1e-3)
    pixels = back.get_pixels_by_source_instance([ds.SOPInstanceUID for ds in images], segment_numbers=[1])
    for ds, got in zip(images, pixels[..., 0].astype(bool), strict=True):
        expected = by_sop[ds.SOPInstanceUID]
        if expected.any():
            assert _dice(got, expected) >= 0.9
        else:
            assert not got.any()


def test_series_segmentation_refuses_a_mask_off_the_grid(philips: tuple[list[pydicom.Dataset], dict]) -> None:
    images, _ = philips
    with pytest.raises(ValueError, match="columns, rows, slices"):
        native.series_segmentation(images, np.ones((96, 96, 23), bool), FINDING)


# CI installs dicom3tools first (.ci/run) and must not skip this; elsewhere it is optional.
@pytest.mark.skipif(DCIODVFY is None and not os.environ.get("CI"),
                    reason="dciodvfy not installed: apt-get install -y dicom3tools")
def test_dciodvfy_accepts_the_series_segmentation(philips: tuple[list[pydicom.Dataset], dict],
                                                  tmp_path: Path) -> None:
    images, by_sop = philips
    grid = native.native_grid(images)
    mask = np.stack([by_sop[images[i].SOPInstanceUID] for i in grid.order]).transpose(2, 1, 0)
    path = tmp_path / "seg.dcm"
    path.write_bytes(encode(native.series_segmentation(images, mask, FINDING)))
    run = subprocess.run([str(DCIODVFY), str(path)], capture_output=True, text=True, timeout=60)
    lines = (run.stdout + run.stderr).splitlines()
    print(f"dciodvfy seg: {sum(line.startswith('Warning') for line in lines)} warnings")
    assert not [line for line in lines if line.startswith("Error")], "\n".join(lines)
    assert run.returncode == 0, "\n".join(lines)


def test_a_seg_lies_on_a_series_whose_orientations_differ_within_the_gates_tolerance(
        philips: tuple[list[pydicom.Dataset], dict]) -> None:
    """A scanner that writes its direction cosines to a few digits: slices 5e-4 apart, which the gate
    accepts (ingest.geometry.orientation 1e-3). The SEG path refused them (1e-4 of its own, then
    highdicom's one orientation), and the whole study failed; the caller's headers stay as read."""
    import copy

    images = [copy.deepcopy(ds) for ds in philips[0]]
    for ds in images[1::2]:
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 0.9999998, -0.0005]
    before = [list(ds.ImageOrientationPatient) for ds in images]
    grid = native.native_grid(images)
    mask = np.stack([philips[1][images[i].SOPInstanceUID] for i in grid.order]).transpose(2, 1, 0)
    seg = native.series_segmentation(images, mask, FINDING)
    assert seg.NumberOfFrames == int(mask.any(axis=(0, 1)).sum())
    assert [list(ds.ImageOrientationPatient) for ds in images] == before
    for ds in images[1::2]:  # beyond the gate's tolerance: still not one series
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 0.999998, -0.002]
    with pytest.raises(ValueError, match="ImageOrientationPatient"):
        native.native_grid(images)
