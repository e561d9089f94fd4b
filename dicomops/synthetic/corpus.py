"""Generate a multi-vendor synthetic CT corpus: DICOM files, labels, masks, faults and PHI list.

Each series is drawn from its own seeded generator, so the output does not depend on how many
worker processes write it, and the same seed and options reproduce every byte.
"""

from __future__ import annotations

import copy
import csv
import hashlib
import json
import logging
import shutil
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.uid import UID

from dicomops import io
from dicomops.config import SCENARIOS, SynthConfig
from dicomops.synthetic import phantom, sidecars, writer
from dicomops.synthetic.phi import PatientPHI, sample_phi
from dicomops.synthetic.vendors import ALL_VENDORS, SCENARIO_SHIFTS, VENDORS, apply_scenario

# Recorded in corpus.json, so in the corpus hash: bump it whenever the same seed and options would
# give other files. 2: nodules of 6-15 mm (were 4-15 mm). 3: solid, part-solid and ground-glass
# nodules, free, juxta-pleural or vessel-attached, plus non-actionable small (3-6 mm) and
# ground-glass ones in positives and negatives; masks hold instance ids (k + 1 for nodule k), and
# labels.csv gains each nodule's kind, attachment, density and actionability, and actionable_count.
GENERATOR_VERSION = "3"
# The masks' deflate level (zlib's default, as np.savez_compressed): their bytes are part of the
# corpus hash recorded in data.dvc, so change it only with a new GENERATOR_VERSION.
MASK_COMPRESSLEVEL = 6
# New columns go at the end, so readers that index the old ones keep working.
LABEL_COLUMNS = ("SeriesInstanceUID", "StudyInstanceUID", "PatientID", "vendor", "label",
                 "nodule_count", "nodule_diameters_mm", "nodules", "scenario", "series_dir",
                 "mask_path", "slices", "actionable_count")
# The nodule mix of plan_corpus. Actionable nodules: kind and attachment shares. A positive gets a
# non-actionable distractor with DISTRACTOR_RATE; a negative gets one or two with NEGATIVE_NODULE_RATE.
# A non-actionable nodule is ground-glass (5-15 mm) with GGO_SHARE, else small (3-6 mm) of
# SMALL_KINDS. Solid nodules stay the majority, so a bright round blob in lung window keeps
# marking most positives and a slice classifier can still learn the label.
ACTIONABLE_KINDS = {"solid": 0.7, "part-solid": 0.3}
ATTACHMENT_SHARES = {"none": 0.6, "pleural": 0.2, "vascular": 0.2}
DISTRACTOR_RATE = 0.3
NEGATIVE_NODULE_RATE = 0.4
GGO_SHARE = 0.4
SMALL_KINDS = {"solid": 0.7, "part-solid": 0.15, "ground-glass": 0.15}
FAULT_COLUMNS = ("path", "fault", "scope", "detail", "SeriesInstanceUID")
PHI_COLUMNS = ("PatientID", "field", "value")

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SeriesPlan:
    """Everything a worker needs to write one series; small enough to send to a process."""

    index: int
    seed: int
    scenario: str
    vendor: str
    label: int
    nodule_count: int
    fault: str | None
    fault_detail: str
    matrix: int
    slices: int
    # Kind, attachment and size class of each nodule; empty means `nodule_count` free solid
    # actionable nodules (what a hand-made plan usually wants).
    nodule_specs: tuple[phantom.NoduleSpec, ...] = ()

    def __post_init__(self) -> None:
        if self.nodule_specs and len(self.nodule_specs) != self.nodule_count:
            raise ValueError(f"nodule_count is {self.nodule_count} but {len(self.nodule_specs)} "
                             "nodule_specs were given; make them agree or leave nodule_specs empty")

    @property
    def specs(self) -> tuple[phantom.NoduleSpec, ...]:
        return self.nodule_specs or (phantom.NoduleSpec(),) * self.nodule_count

    @property
    def case(self) -> str:
        return f"case-{self.index:05d}"


@dataclass
class SeriesResult:
    label_row: dict[str, object]
    fault_rows: list[dict[str, str]] = field(default_factory=list)
    phi_rows: list[dict[str, str]] = field(default_factory=list)


@dataclass(frozen=True)
class CorpusSummary:
    out: Path
    series: int
    files: int
    faults: int
    per_vendor: dict[str, int]
    positives: int


def _scenario_id(scenario: str) -> int:
    return SCENARIOS.index(scenario)


def plan_corpus(cfg: SynthConfig) -> list[SeriesPlan]:
    """Decide vendor, label, nodule count and fault of every series, reproducibly."""
    shift = SCENARIO_SHIFTS[cfg.scenario]
    rng = np.random.default_rng([cfg.seed, _scenario_id(cfg.scenario), 0])
    vendors = list(shift.vendors)
    shares = np.array([ALL_VENDORS[v].share for v in vendors], dtype=float)
    shares /= shares.sum()
    # Largest-remainder allocation keeps each vendor's share exact, then a seeded shuffle.
    counts = np.floor(shares * cfg.patients).astype(int)
    for i in np.argsort(-(shares * cfg.patients - counts))[: cfg.patients - counts.sum()]:
        counts[i] += 1
    assigned = np.repeat(np.arange(len(vendors)), counts)
    rng.shuffle(assigned)
    fault_cycle = list(rng.permutation(len(writer.FAULTS)))
    plans: list[SeriesPlan] = []
    n_faults = 0
    for i, v in enumerate(assigned):
        vendor = vendors[int(v)]
        label = int(rng.random() < ALL_VENDORS[vendor].positive_rate)
        if label:
            rng.integers(1, 4)  # v2's nodule count, still drawn so that labels and faults stay as in v2
        specs = plan_nodules(np.random.default_rng([cfg.seed, _scenario_id(cfg.scenario), 2, i + 1]), label)
        fault: str | None = None
        detail = ""
        if rng.random() < cfg.fault_rate:
            fault = writer.FAULTS[fault_cycle[n_faults % len(fault_cycle)]]
            if fault == "corrupt_pixel_data" and ALL_VENDORS[vendor].transfer_syntax.is_compressed:
                fault = "truncated"  # a compressed frame has no fixed length to contradict
            if fault == "missing_tag":
                detail = writer.MISSING_TAG_CHOICES[n_faults % len(writer.MISSING_TAG_CHOICES)]
            n_faults += 1
        plans.append(SeriesPlan(
            index=i + 1, seed=cfg.seed, scenario=cfg.scenario, vendor=vendor, label=label,
            nodule_count=len(specs), fault=fault, fault_detail=detail, matrix=cfg.matrix,
            slices=cfg.slices, nodule_specs=specs,
        ))
    return plans


def _pick(rng: np.random.Generator, shares: dict[str, float]) -> str:
    return str(rng.choice(list(shares), p=np.array(list(shares.values())) / sum(shares.values())))


def _non_actionable(rng: np.random.Generator) -> phantom.NoduleSpec:
    attachment = _pick(rng, ATTACHMENT_SHARES)
    if rng.random() < GGO_SHARE:
        return phantom.NoduleSpec("ground-glass", attachment)
    return phantom.NoduleSpec(_pick(rng, SMALL_KINDS), attachment, small=True)


def plan_nodules(rng: np.random.Generator, label: int) -> tuple[phantom.NoduleSpec, ...]:
    """The nodules of one series: 1-3 actionable ones and maybe a distractor when `label` is 1,
    else sometimes one or two that are not actionable (small, or ground-glass)."""
    specs: list[phantom.NoduleSpec] = []
    if label:
        for _ in range(int(rng.integers(1, 4))):
            specs.append(phantom.NoduleSpec(_pick(rng, ACTIONABLE_KINDS), _pick(rng, ATTACHMENT_SHARES)))
        if rng.random() < DISTRACTOR_RATE:
            specs.append(_non_actionable(rng))
    elif rng.random() < NEGATIVE_NODULE_RATE:
        specs.extend(_non_actionable(rng) for _ in range(1 if rng.random() < 0.7 else 2))
    return tuple(specs)


@dataclass(frozen=True)
class RenderedSeries:
    """One series before it is written: geometry, truth and identity."""

    plan: SeriesPlan
    profile: writer.VendorProfile
    grid: phantom.Grid
    anatomy: phantom.Anatomy
    nodules: list[phantom.Nodule]
    acquisition: writer.Acquisition
    mask: np.ndarray
    regions: np.ndarray
    phi: PatientPHI
    identity: writer.SeriesIdentity
    names: list[str]


def render_series(plan: SeriesPlan) -> RenderedSeries:
    """Draw patient, geometry and noise for `plan` and quantise it as the vendor would store it."""
    rng = np.random.default_rng([plan.seed, _scenario_id(plan.scenario), 1, plan.index])
    shift = SCENARIO_SHIFTS[plan.scenario]
    profile = apply_scenario(ALL_VENDORS[plan.vendor], shift)
    phi = sample_phi(rng, plan.index, shift.year)
    spacing = float(rng.uniform(*profile.pixel_spacing_512)) * 512 / plan.matrix
    spacing = round(spacing, 4)
    z_center = round(float(rng.uniform(-420.0, -120.0)), 1)
    extent = (plan.slices - 1) * profile.slice_spacing
    z_first = round(z_center - profile.z_step_sign * extent / 2, 3)
    z = np.round(z_first + profile.z_step_sign * profile.slice_spacing * np.arange(plan.slices), 3)
    grid = phantom.Grid(rows=plan.matrix, cols=plan.matrix, row_spacing=spacing,
                        col_spacing=spacing, z=z)
    anatomy = phantom.sample_anatomy(rng, z_center)
    nodules = phantom.place_nodules(rng, anatomy, list(plan.specs), z)
    hu, regions, mask = phantom.render_phantom(anatomy, nodules, grid, contrast=shift.contrast)
    hu += phantom.correlated_noise(rng, hu.shape, profile.noise_hu, profile.noise_corr_mm / spacing)
    acquisition = writer.to_stored(hu, profile, grid.fov_mask())
    entropy = [str(plan.seed), plan.scenario, str(plan.index)]
    identity = writer.make_identity(entropy, plan.slices)
    names = writer.file_names(profile, plan.slices, rng)
    return RenderedSeries(plan, profile, grid, anatomy, nodules, acquisition, mask, regions, phi,
                          identity, names)


def write_series(plan: SeriesPlan, out: Path) -> SeriesResult:
    """Render and write one series with its mask; return its rows for the corpus tables."""
    r = render_series(plan)
    series_dir = Path(r.plan.case) / "series-1"
    template = writer.build_template(
        r.profile, r.phi, r.identity, rows=r.grid.rows, cols=r.grid.cols,
        row_spacing=r.grid.row_spacing, col_spacing=r.grid.col_spacing,
        contrast=SCENARIO_SHIFTS[plan.scenario].contrast, series_number=2,
    )
    n = plan.slices
    fault = plan.fault
    fault_rows: list[dict[str, str]] = []
    # File-level faults hit the last slice in z, so the rest of the series stays usable.
    edge = n - 1
    skip = n // 2 if fault == "missing_slice" else -1
    paths: list[str] = []
    for k in range(n):
        if k == skip:
            continue
        ds = template
        ds.SOPInstanceUID = r.identity.sop_uids[k]
        ds.file_meta.MediaStorageSOPInstanceUID = UID(r.identity.sop_uids[k])
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [writer._ds(r.grid.x0, 4), writer._ds(r.grid.y0, 4),
                                   writer._ds(float(r.grid.z[k]), 3)]
        ds.SliceLocation = writer._ds(float(r.grid.z[k]), 3)
        header_fault = fault in ("missing_tag",) and k == edge
        header_fault |= fault == "wrong_modality"
        header_fault |= fault == "inconsistent_spacing" and k == n // 3
        if header_fault:
            ds = copy.deepcopy(template)
            writer.apply_slice_fault(ds, str(fault), plan.fault_detail)
        data = writer.write_slice(ds, r.acquisition.stored[k], r.profile)
        if fault == "truncated" and k == edge:
            data = data[: int(len(data) * 0.6)]
        if fault == "corrupt_pixel_data" and k == edge:
            data = writer.corrupt_pixel_data(data)
        rel = series_dir / r.names[k]
        writer.write_bytes(out / rel, data)
        paths.append(rel.as_posix())
        if fault in writer.FILE_FAULTS and fault not in ("not_dicom", "duplicated_slice") and k == edge:
            fault_rows.append(_fault_row(rel.as_posix(), fault, "file", plan, r))
        if fault == "duplicated_slice" and k == edge:
            duplicate = series_dir / f"{r.names[k]}_copy"
            writer.write_bytes(out / duplicate, data)
            fault_rows.append(_fault_row(duplicate.as_posix(), fault, "file", plan, r))
    if fault == "not_dicom":
        name, payload = writer.NOT_DICOM_PAYLOADS[plan.index % len(writer.NOT_DICOM_PAYLOADS)]
        writer.write_bytes(out / series_dir / name, payload)
        fault_rows.append(_fault_row((series_dir / name).as_posix(), fault, "file", plan, r))
    if fault in writer.SERIES_FAULTS:
        fault_rows.extend(_fault_row(p, fault, "series", plan, r) for p in paths)

    mask_rel = sidecars.mask_path(plan.case)
    mask_arrays: dict[str, Any] = {sidecars.MASK_ARRAY: r.mask,
                                   sidecars.IPP_Z_ARRAY: np.asarray(r.grid.z, dtype=np.float64)}
    io.write_npz(out / mask_rel, compresslevel=MASK_COMPRESSLEVEL, **mask_arrays)
    diameters = ";".join(f"{nd.diameter_mm:g}" for nd in r.nodules)
    nodules = json.dumps([
        {"center_mm": list(nd.center), "diameter_mm": nd.diameter_mm, "kind": nd.kind,
         "attachment": nd.attachment, "actionable": nd.actionable, "hu": nd.hu,
         "core_fraction": nd.core_fraction}
        for nd in r.nodules
    ])
    label_row: dict[str, object] = {
        "SeriesInstanceUID": r.identity.series_uid, "StudyInstanceUID": r.identity.study_uid,
        "PatientID": r.phi.patient_id, "vendor": plan.vendor, "label": plan.label,
        "nodule_count": len(r.nodules), "nodule_diameters_mm": diameters, "nodules": nodules,
        "scenario": plan.scenario, "series_dir": series_dir.as_posix(),
        "mask_path": mask_rel, "slices": n,
        "actionable_count": sum(nd.actionable for nd in r.nodules),
    }
    phi_rows = [{"PatientID": r.phi.patient_id, "field": k, "value": v}
                for k, v in r.phi.needles().items()]
    return SeriesResult(label_row, fault_rows, phi_rows)


def _fault_row(path: str, fault: str, scope: str, plan: SeriesPlan, r: RenderedSeries) -> dict[str, str]:
    return {"path": path, "fault": fault, "scope": scope, "detail": plan.fault_detail,
            "SeriesInstanceUID": r.identity.series_uid}


def _write_csv(path: Path, columns: tuple[str, ...], rows: list[dict]) -> None:
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(columns), lineterminator="\n")
        w.writeheader()
        w.writerows(rows)


def partial_folder(out: Path) -> Path:
    """The hidden sibling of `out` that :func:`generate_corpus` writes into before renaming it to `out`."""
    out = Path(out)
    return out.with_name(f".{out.name}.partial")


def is_complete_corpus(folder: Path) -> bool:
    """Whether `folder` holds a whole corpus: :func:`generate_corpus` writes ``corpus.json`` last."""
    return (Path(folder) / sidecars.CORPUS_JSON).is_file()


def generate_corpus(
    out: Path, cfg: SynthConfig, progress: Callable[[int, int], None] | None = None
) -> CorpusSummary:
    """Write the corpus described by `cfg` into `out` (created; must be empty or absent).

    Writes ``labels.csv``, ``faults.csv``, ``phi.csv`` (the PHI the corpus carries, for leak
    tests), ``masks/`` and ``corpus.json`` beside the DICOM folders. A new `out` is written as
    :func:`partial_folder` first and renamed to `out` only when complete, so an interrupted run
    leaves no `out` behind (its partial folder is removed on failure, else by the next run); an
    existing empty folder is written in place, ``corpus.json`` last, so that an interrupted run
    leaves a folder :func:`is_complete_corpus` refuses.
    """
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} is not empty; choose an empty or new folder for the corpus")
    if out.exists():  # an empty folder (a mount point, a link, '.'): in place, corpus.json last
        labels, faults = _write_corpus(out, cfg, progress)
    else:
        partial = partial_folder(out)
        if partial.exists():
            log.info("removing %s, left by an interrupted corpus generation", partial)
            shutil.rmtree(partial)
        partial.mkdir(parents=True)
        try:
            labels, faults = _write_corpus(partial, cfg, progress)
            partial.rename(out)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
    files = sum(1 for p in out.glob("case-*/*/*") if p.is_file())
    per_vendor: dict[str, int] = {}
    for row in labels:
        per_vendor[str(row["vendor"])] = per_vendor.get(str(row["vendor"]), 0) + 1
    return CorpusSummary(out=out, series=len(labels), files=files,
                         faults=len({f["SeriesInstanceUID"] for f in faults}),
                         per_vendor=per_vendor, positives=sum(int(str(r["label"])) for r in labels))


def _write_corpus(out: Path, cfg: SynthConfig, progress: Callable[[int, int], None] | None
                  ) -> tuple[list[dict[str, object]], list[dict[str, str]]]:
    """Write every series and the sidecars into `out`, ``corpus.json`` last; return labels and fault rows."""
    plans = plan_corpus(cfg)
    results: list[SeriesResult] = []
    if cfg.workers == 1:
        for i, plan in enumerate(plans):
            results.append(write_series(plan, out))
            if progress:
                progress(i + 1, len(plans))
    else:
        with ProcessPoolExecutor(max_workers=cfg.workers, mp_context=get_context("spawn")) as pool:
            futures = [pool.submit(write_series, plan, out) for plan in plans]
            for i, fut in enumerate(futures):
                results.append(fut.result())
                if progress:
                    progress(i + 1, len(plans))
    labels = [r.label_row for r in results]
    faults = [row for r in results for row in r.fault_rows]
    _write_csv(out / sidecars.LABELS_CSV, LABEL_COLUMNS, labels)
    _write_csv(out / sidecars.FAULTS_CSV, FAULT_COLUMNS, faults)
    _write_csv(out / sidecars.PHI_CSV, PHI_COLUMNS, [row for r in results for row in r.phi_rows])
    manifest = {"generator_version": GENERATOR_VERSION, **cfg.model_dump(exclude={"workers"})}
    (out / sidecars.CORPUS_JSON).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return labels, faults


def corpus_digest(out: Path) -> str:
    """sha256 over every file's relative path and bytes, in sorted order (a quick identity check)."""
    h = hashlib.sha256()
    for p in sorted(q for q in Path(out).rglob("*") if q.is_file()):
        h.update(p.relative_to(out).as_posix().encode())
        h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()


__all__ = ["VENDORS", "CorpusSummary", "SeriesPlan", "generate_corpus", "is_complete_corpus", "partial_folder",
           "plan_corpus", "plan_nodules", "render_series", "write_series"]
