"""The preprocessing stage over a work directory: cache-aware, parallel over series.

Reads only the gate's outputs (``ingest/accepted.parquet``, ``deid/``); writes
``preprocessed/volumes/<key>.npz`` (image in [0, 1] as float16, nodule instance mask, affine) with a JSON
of its metadata beside it, then ``preprocessed/index.parquet`` (one row per series),
``features.parquet`` (header and image statistics for the drift monitor) and ``slabs.parquet``
(the 2.5D samples for training).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from dicomops import io, stages
from dicomops.config import PreprocessConfig
from dicomops.dicom.parallel import map_isolated
from dicomops.errors import PreprocessingFailedError, local_outage
from dicomops.layout import PreprocessedPaths, WorkLayout
from dicomops.preprocessing.features import HEADER_FEATURES
from dicomops.preprocessing.slabs import (
    SLAB_COLUMNS,
    central_slice_labels,
    sample_slabs,
    slice_labels,
    slices_showing,
)
from dicomops.synthetic.sidecars import (
    IPP_Z_ARRAY,
    LABELS_CSV,
    MASK_ARRAY,
    MASK_Z_TOLERANCE_MM,
    mask_slices,
    recorded_nodules,
)

log = logging.getLogger(__name__)

VOLUME_FIELDS = ("spacing_mm", "window", "window_center", "window_width", "header_window_index",
                 "histogram_equalize", "crop_xy", "min_positive_voxels")
# Settings that change only the slice labels stored beside a volume: in its cache key, not in a
# model's identity (a teacher or a served model is the same with other training labels).
LABEL_FIELDS = ("positive_area_share",)
# failures.csv's reasons for a series whose label is withheld from training: nodules recorded but
# no mask (:func:`unmasked_nodules`), or a mask that could not be laid on its volume (_aligned_mask).
NODULES_WITHOUT_MASK = "nodules_without_mask"
MASK_ERROR = "mask_error"
WITHHELD_REASONS = (NODULES_WITHOUT_MASK, MASK_ERROR)
LEFT_OUT = "it is preprocessed and monitored, and trains neither model until its mask is given"


def series_content_hash(instances: pd.DataFrame) -> str:
    """Hash of a series' de-identified files, in slice order (from the gate's per-file sha256)."""
    h = hashlib.sha256()
    for digest in instances.sort_values("slice_index")["sha256"]:
        h.update(str(digest).encode())
    return h.hexdigest()


def code_hash() -> str:
    """The source of the code that computes a cached entry: the preprocessing package (volume,
    transforms, features, slabs) and the DICOM pixel reading under it. The same modules key the
    stage's completion record, so the stage and its entries go stale together."""
    return stages.code_hash(*stages.stage_modules("preprocess"))


def cache_key(content_hash: str, cfg: PreprocessConfig, code: str, annotation: str = "") -> str:
    """Content, the settings that change a volume or its labels, the code, and the series'
    annotation (:func:`annotation_hash`; none for a series scored for a result): any change, new key."""
    settings = cfg.model_dump(mode="json", include=set(VOLUME_FIELDS) | set(LABEL_FIELDS))
    parts = {"content": content_hash, "config": settings, "code": code} | ({"annotation": annotation} if annotation else {})
    blob = json.dumps(parts, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def annotation_hash(mask: Path | None, nodules: str = "") -> str:
    """What an entry holds besides the volume: the series' mask (its file's bytes) and its nodule
    records; "" without a mask. A reader's corrected mask changes no DICOM file, so without it in the
    key a corrected mask was never preprocessed again and the segmenter retrained on the old one.
    The one owner of how a mask is hashed (:func:`labels_hash`, the segmenter's resume key)."""
    if mask is None:
        return ""
    return hashlib.sha256(mask.read_bytes() + b"\0" + nodules.encode()).hexdigest()


class MaskAlignmentError(ValueError):
    """A series' mask does not lie on its volume: another matrix, or a slice without a mask slice."""


def _aligned_mask(mask_file: Path, z_positions: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """The generator's mask (acquisition order) re-ordered to the volume's slices by z position.

    Raises:
        MaskAlignmentError: the mask's rows x columns are not the volume's, or a slice of the volume
            has no mask slice at its position (it would be learnt as free of nodules). The gate
            refuses such masks; one gets here only past it (a mask written into the corpus since).
    """
    out = np.zeros(shape, dtype=np.uint8)
    with np.load(mask_file) as npz:
        mask, ipp_z = npz[MASK_ARRAY], npz[IPP_Z_ARRAY]
    again = "give the series its own mask and ingest again, so that the gate checks it"
    if mask.ndim != 3 or mask.shape[1:] != (shape[1], shape[0]):
        raise MaskAlignmentError(f"the mask is {' x '.join(map(str, mask.shape))} (slices x rows x columns) but "
                                 f"the series' images are {shape[1]} x {shape[0]} (rows x columns); {again}")
    found = mask_slices(ipp_z, z_positions)
    for k in np.flatnonzero(found >= 0):
        out[:, :, k] = mask[found[k]].T  # (rows, cols) -> (cols, rows)
    if missing := int((found < 0).sum()):
        raise MaskAlignmentError(f"the mask has no slice at the position of {missing} of the series' "
                                 f"{len(z_positions)} slices (within {MASK_Z_TOLERANCE_MM:g} mm); {again}")
    return out


def native_reference(mask: np.ndarray, native_affine: np.ndarray) -> dict[str, np.ndarray]:
    """The annotation where it was drawn, beside the resampled one: the native (column, row, slice)
    index and instance of every annotated voxel, the grid's shape and affine. The segmenter's
    metrics read its Dice there too (:class:`dicomops.segmentation.metrics.NativeReference`), since
    at 1 mm a thick-sliced series' reference is its slices repeated."""
    index = np.argwhere(mask > 0)
    return {"native_index": index.astype(np.int32), "native_label": mask[tuple(index.T)].astype(np.uint8),
            "native_shape": np.asarray(mask.shape, np.int64), "native_affine": np.asarray(native_affine, np.float64)}


def single_threaded() -> None:
    """Worker initializer: one thread per library, so N workers use N cores and no more."""
    import torch

    torch.set_num_threads(1)


def actionable_labels(nodules_json: str) -> list[int]:
    """The instance ids (k + 1) of the nodules that make a series positive, from ``labels.csv``'s
    ``nodules`` record. Records without the flag (generator version 2 and earlier, where every
    nodule was actionable) count every nodule."""
    records = json.loads(nodules_json) if nodules_json else []
    return [k + 1 for k, record in enumerate(records) if record.get("actionable", True)]


def _root_message(err: BaseException) -> str:
    """The innermost cause of `err` as 'Type: message' (MONAI wraps a transform's error in a
    RuntimeError that names only the transform)."""
    while err.__cause__ is not None:
        err = err.__cause__
    return f"{type(err).__name__}: {err}"[:300]


def preprocess_one(records: list[dict[str, Any]], deid_root: str, mask_path: str, cfg_json: str,
                   out_path: str, actionable: list[int] | None = None) -> dict[str, Any]:
    """Worker: assemble, transform and cache one series; return its metadata (small).

    The cached mask keeps every annotated nodule (the segmenter learns them all); the slice labels
    of the classifier count only the `actionable` ones (instance ids; None: every nodule), since its
    series label means an actionable nodule and a small or ground-glass one must not teach it
    otherwise.
    """
    import torch
    from monai.data import MetaTensor

    from dicomops.preprocessing.features import image_features
    from dicomops.preprocessing.transforms import build_transforms
    from dicomops.preprocessing.volume import load_series

    cfg = PreprocessConfig.model_validate_json(cfg_json)
    instances = pd.DataFrame.from_records(records).sort_values("slice_index")
    try:
        volume = load_series(instances, Path(deid_root))
    except Exception as err:
        if local_outage(err):  # the machine's, not the series': map_isolated raises it in the caller
            raise
        return {"reason": "unreadable_pixels", "detail": type(err).__name__}
    features = image_features(volume.hu, volume.affine)
    data: dict[str, Any] = {"image": MetaTensor(torch.from_numpy(volume.hu)[None], affine=torch.as_tensor(volume.affine)),
                            "windows": volume.windows}
    mask, mask_error = None, ""
    if mask_path:
        try:
            mask = _aligned_mask(Path(mask_path), instances.ImagePositionPatient_2.to_numpy(float), volume.hu.shape)
        except Exception as err:  # this series' mask, not the volume's: preprocessed without it, its label withheld
            if local_outage(err):
                raise
            mask_error = str(err) if isinstance(err, MaskAlignmentError) else \
                f"{type(err).__name__}: the mask file is not the .npz the gate writes; ingest again"
    if mask is not None:
        data["mask"] = MetaTensor(torch.from_numpy(mask)[None], affine=torch.as_tensor(volume.affine))
    try:
        out = build_transforms(cfg)(data)
    except Exception as err:
        if local_outage(err):
            raise
        return {"reason": "transform_error", "detail": _root_message(err)}
    image = out["image"][0].numpy().astype(np.float16)
    # Instance ids survive: the mask is resampled with nearest neighbour, and nodule k of the series'
    # records is value k + 1 (what the segmentation metrics score nodule by nodule).
    mask_out = out["mask"][0].numpy().astype(np.uint8) if "mask" in out else np.zeros(image.shape, np.uint8)
    affine = np.asarray(out["image"].affine, dtype=np.float64)
    path = Path(out_path)
    arrays: dict[str, Any] = {"image": image, "mask": mask_out, "affine": affine,
                              **(native_reference(mask, volume.affine) if mask is not None else {})}
    io.write_npz(path, stored=() if cfg.compress_images else ("image",), **arrays)
    labels = central_slice_labels(mask_out, actionable, cfg.min_positive_voxels, cfg.positive_area_share)
    target = mask_out if actionable is None else np.isin(mask_out, actionable)
    # Slices that show only a nodule that is not actionable (small, ground-glass): the negatives that
    # teach the classifier its rule, which random negatives would rarely draw.
    others = np.flatnonzero(slice_labels(np.where(target, 0, mask_out), cfg.min_positive_voxels) & (labels == 0))
    meta = {"reason": "", "mask_error": mask_error, "shape": list(image.shape), "window": list(out["window"]),
            "slice_labels": labels.tolist(), "other_nodule_slices": others.tolist(), "features": features}
    io.write_json(path.with_suffix(".json"), meta)
    return meta


def preprocess_corpus(work: Path, cfg: PreprocessConfig,
                      progress: Callable[[int, int], None] | None = None) -> dict[str, int]:
    """Preprocess every accepted series that is not already cached; write the tables."""
    layout = WorkLayout(work)
    pre = layout.preprocessed
    accepted_path = layout.ingest.accepted
    if not accepted_path.exists():
        raise ValueError(f"{accepted_path} does not exist; run 'dicomops ingest SRC --work {work}' first")
    accepted = pd.read_parquet(accepted_path)
    if "sha256" not in accepted:
        raise ValueError(f"{accepted_path} comes from an older dicomops without file hashes; re-run "
                         f"'dicomops ingest SRC --work {work}'")
    labels_path = layout.ingest.deid / LABELS_CSV
    labels = pd.read_csv(labels_path, keep_default_na=False).set_index("SeriesInstanceUID") \
        if labels_path.exists() else pd.DataFrame()
    pre.made_from.unlink(missing_ok=True)  # until the tables are whole again (check_made_from)
    pre.volumes.mkdir(parents=True, exist_ok=True)
    cfg_json = cfg.model_dump_json()
    code = code_hash()
    deid = layout.ingest.deid
    plan: list[tuple[str, str, pd.DataFrame]] = []
    annotations: dict[str, tuple[str, str]] = {}  # series -> (its mask file, its nodule records)
    for uid, group in accepted.groupby("SeriesInstanceUID", sort=True):
        uid = str(uid)
        if uid in labels.index and labels.loc[uid, "mask_path"]:
            annotations[uid] = (str(deid / str(labels.loc[uid, "mask_path"])),
                                str(labels.loc[uid, "nodules"]) if "nodules" in labels else "")
        mask, nodules = annotations.get(uid, ("", ""))
        key = cache_key(series_content_hash(group), cfg, code, annotation_hash(Path(mask) if mask else None, nodules))
        plan.append((uid, key, group))
    withheld = unmasked_nodules(labels, {uid for uid, _, _ in plan} - set(annotations))
    todo = [(uid, key, group) for uid, key, group in plan if not pre.entry(key).with_suffix(".json").exists()]
    items = []
    for uid, key, group in todo:
        mask, actionable = "", None
        if uid in annotations:
            mask, nodules = annotations[uid]
            actionable = actionable_labels(nodules) if "nodules" in labels else None
        items.append((group.to_dict("records"), str(deid), mask, cfg_json, str(pre.entry(key)), actionable))
    results = map_isolated(preprocess_one, items, on_failure=lambda item, why: {"reason": why, "detail": why},
                           workers=cfg.workers, chunk_size=1, seconds_per_item=900, progress=progress,
                           initializer=single_threaded, dask_address=cfg.dask_address)
    failures = [{"SeriesInstanceUID": uid, "reason": r["reason"], "detail": r.get("detail", "")}
                for (uid, _, _), r in zip(todo, results, strict=True) if r.get("reason")]
    withheld_rows = _write_tables(pre, cfg, plan, labels, {f["SeriesInstanceUID"] for f in failures}, withheld)
    if withheld_rows:
        log.warning("%d labelled series have no mask they can be trained with: their labels are left out of training "
                    "(%s, reasons %s)", len(withheld_rows), pre.failures,
                    ", ".join(sorted({r["reason"] for r in withheld_rows})))
    io.write_csv(pre.failures,
                 pd.DataFrame(failures + withheld_rows, columns=["SeriesInstanceUID", "reason", "detail"]))
    if plan and len(failures) == len(plan):  # nothing to train on; earlier cache entries are kept
        raise PreprocessingFailedError(_all_failed_message(failures, pre.failures))
    io.write_json(pre.made_from, {"corpus": corpus_content_hash(work)})
    keep = {key for _, key, _ in plan}
    for stale in pre.volumes.iterdir():
        if stale.name.split(".")[0] not in keep:
            stale.unlink()
    return {"series": len(plan), "computed": len(todo) - len(failures), "cached": len(plan) - len(todo),
            "failed": len(failures), "labels_withheld": len(withheld_rows)}


def unmasked_nodules(labels: pd.DataFrame, unmasked: set[str]) -> dict[str, int]:
    """{series: nodules its ``labels.csv`` row records} for the series of `unmasked` (those the gate
    kept no mask for) that record any. Without a mask their slices would all teach the classifier
    "no nodule" and the segmenter would learn their nodules as background: a wrong label, so theirs
    is withheld from training (:data:`NODULES_WITHOUT_MASK`)."""
    out = {}
    for uid in sorted(unmasked & set(labels.index)):
        row = labels.loc[uid]
        n = max(recorded_nodules(row.get("nodules"), row.get("nodule_count")), default=0)
        if n:  # where either says there are nodules: the label needs the mask
            out[uid] = n
    return out


def _all_failed_message(failures: list[dict[str, Any]], path: Path, top: int = 3) -> str:
    """The `top` most common reasons, each with its first series' detail where that says more."""
    reasons = Counter(f["reason"] for f in failures)
    example: dict[str, str] = {}
    for f in failures:
        example.setdefault(f["reason"], str(f["detail"]))
    common = "; ".join(f"{n} x {reason}" + (f" (e.g. {example[reason]})" if example[reason] not in ("", reason) else "")
                       for reason, n in reasons.most_common(top))
    return f"all {len(failures)} series failed to preprocess: {common}. Every series is listed in {path}"


def _write_tables(pre: PreprocessedPaths, cfg: PreprocessConfig, plan: list[tuple[str, str, pd.DataFrame]],
                  labels: pd.DataFrame, failed: set[str], unmasked: Mapping[str, int]) -> list[dict[str, str]]:
    """The index, features and slabs of the series not `failed`; returns failures.csv's rows of the
    labelled series whose label is withheld: those recording nodules without a mask (`unmasked`,
    :func:`unmasked_nodules`) and those whose mask preprocessing could not lay on the volume."""
    rows, feature_rows, label_arrays, hard, withheld = [], [], {}, {}, []
    for uid, key, group in plan:
        if uid in failed:
            continue
        meta = io.read_json(pre.entry(key).with_suffix(".json"))
        first = group.iloc[0]
        label = int(labels.loc[uid, "label"]) if uid in labels.index else -1
        why = ((MASK_ERROR, str(meta["mask_error"])) if meta.get("mask_error") else
               (NODULES_WITHOUT_MASK, f"labels.csv records {unmasked[uid]} nodule(s) for it but the gate kept no "
                                      "mask (see the ingest warning)") if uid in unmasked else None)
        if label >= 0 and why is not None:
            withheld.append({"SeriesInstanceUID": uid, "reason": why[0], "detail": f"{why[1]}; {LEFT_OUT}"})
            label = -1
        vendor = str(labels.loc[uid, "vendor"]) if uid in labels.index and "vendor" in labels else str(first.Manufacturer)
        arr = np.asarray(meta["slice_labels"], dtype=np.int8)
        if label == 0:  # a series without an actionable nodule has no positive slice (a reader's 0 included)
            arr = np.zeros_like(arr)
        label_arrays[uid] = arr
        hard[uid] = np.asarray(meta.get("other_nodule_slices", []), dtype=np.int64)
        rows.append({"SeriesInstanceUID": uid, "PatientID": first.PatientID, "vendor": vendor,
                     "Manufacturer": first.Manufacturer, "label": label, "cache_key": key,
                     "path": str(pre.entry(key).relative_to(pre.root)), "n_z": int(meta["shape"][-1]),
                     "positive_slices": int((arr == 1).sum()), "window_center": meta["window"][0],
                     "window_width": meta["window"][1]})
        header = {c: first.get(c) for c in HEADER_FEATURES}
        header["n_slices"] = len(group)
        feature_rows.append({"SeriesInstanceUID": uid, "vendor": vendor, **header, **meta["features"]})
    index = pd.DataFrame(rows)
    io.write_parquet(pre.index, index)
    io.write_parquet(pre.features, pd.DataFrame(feature_rows))
    labelled = index[index.label >= 0] if len(index) else index
    wall = wall_positive_slices(pre, labelled, label_arrays, cfg) if cfg.wall_positive_repeat > 1 else {}
    slabs = sample_slabs(labelled, label_arrays, cfg.negative_ratio, cfg.seed, hard, wall,
                         cfg.wall_positive_repeat) if len(labelled) else \
        pd.DataFrame(columns=SLAB_COLUMNS)
    io.write_parquet(pre.slabs, slabs)
    return withheld


def wall_positive_slices(pre: PreprocessedPaths, labelled: pd.DataFrame, label_arrays: Mapping[str, np.ndarray],
                         cfg: PreprocessConfig) -> dict[str, np.ndarray]:
    """Each positive series' positive slices through a nodule that touches the chest wall, mediastinum
    or diaphragm (:func:`dicomops.segmentation.data.wall_nodules`, read off the cached volume and
    mask): the slices ``wall_positive_repeat`` samples more than once."""
    from dicomops.segmentation.data import wall_nodules

    out = {}
    for row in labelled[labelled.label == 1].itertuples():
        with np.load(pre.volume(row.path)) as npz:
            image, mask = npz["image"], npz["mask"]
        out[row.SeriesInstanceUID] = slices_showing(mask, wall_nodules(image, mask), label_arrays[row.SeriesInstanceUID],
                                                    cfg.min_positive_voxels)
    return out


def corpus_content_hash(work: Path) -> str:
    """One hash over every accepted, de-identified file: what the preprocessed data derives from.

    Raises:
        FileNotFoundError: nothing was ingested into `work`, saying what to run.
    """
    path = WorkLayout(work).ingest.accepted
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; run 'dicomops ingest SRC --work {work}' first")
    accepted = pd.read_parquet(path, columns=["deid_path", "sha256"])
    h = hashlib.sha256()
    for path, digest in sorted(zip(accepted.deid_path, accepted.sha256, strict=True)):
        h.update(f"{path}:{digest}\n".encode())
    return h.hexdigest()


def check_made_from(work: Path, corpus: str) -> None:
    """Refuse to go on from the preprocessed tables unless they were made from the accepted corpus
    whose content hash is `corpus` (the one ingested now): one ingested since, or a preprocessing
    that stopped half-way, would otherwise be trained on in name only, its hash on a model that
    learnt from the earlier tables.

    Raises:
        ValueError: saying to run ``dicomops preprocess`` (nothing preprocessed is left to the
            reader of the tables, which says so itself).
    """
    pre = WorkLayout(work).preprocessed
    if not pre.index.exists():
        return
    made_from = io.read_json(pre.made_from).get("corpus") if pre.made_from.exists() else None
    if made_from != corpus:
        why = ("another accepted corpus than the one ingested there now (ingested since?)" if made_from
               else "no known corpus (a preprocessing that stopped half-way, or an older dicomops)")
        raise ValueError(f"the preprocessed data in {work} were made from {why}: run "
                         f"'dicomops preprocess --work {work}' first")


def labels_hash(work: Path) -> str:
    """The sha256 of the de-identified ``labels.csv`` and of every mask it names ('' without one): the
    slab table's labels and the volumes' masks come from them. The gate writes a series' mask under
    a path of its pseudonym, so a reader's corrected mask changes no byte of ``labels.csv``: without
    the masks here the stage was skipped and the corrected mask never preprocessed."""
    deid = WorkLayout(work).ingest.deid
    path = deid / LABELS_CSV
    if not path.exists():
        return ""
    digest = hashlib.sha256(path.read_bytes())
    labels = pd.read_csv(path, keep_default_na=False, dtype=str)
    for rel in sorted(set(labels.mask_path) - {""}) if "mask_path" in labels else []:
        mask = deid / rel
        digest.update(f"\0{rel}\0{annotation_hash(mask) if mask.is_file() else ''}".encode())
    return digest.hexdigest()


def plot_samples(work: Path, per_vendor: int = 2) -> Path:
    """A grid of preprocessed slices per vendor (the most nodule-rich slice of positive series)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pre = WorkLayout(work).preprocessed
    index = pre.read_index()
    picks = (index.sort_values(["vendor", "positive_slices"], ascending=[True, False])
             .groupby("vendor").head(per_vendor)) if len(index) else index  # none: an empty figure, said so
    n = max(len(picks), 1)
    cols = min(n, 4)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.4 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, row in zip(axes.ravel(), picks.itertuples(), strict=False):
        with np.load(pre.volume(row.path)) as npz:
            image, mask = npz["image"].astype(np.float32), npz["mask"]
        z = int(np.argmax((mask > 0).sum(axis=(0, 1)))) if mask.any() else image.shape[-1] // 2
        ax.imshow(image[:, :, z].T, cmap="gray", vmin=0, vmax=1, origin="lower")
        if mask[:, :, z].any():
            ax.contour(mask[:, :, z].T, levels=[0.5], colors="red", linewidths=0.8, origin="lower")
        ax.set_title(f"{row.vendor} label={row.label} z={z}", fontsize=9)
    if not len(picks):
        axes[0, 0].text(0.5, 0.5, "no preprocessed series\n(see failures.csv)", ha="center", va="center")
    fig.suptitle("Preprocessed slices (1 mm, lung window, RAS; red: nodule mask)")
    fig.tight_layout()
    out = pre.samples
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return out
