"""The ingest gate as stage functions over one work directory.

Order: index headers (safe read, de-identified rows) → validate the table with Great Expectations →
assemble series and check geometry → apply the gate → write the de-identified corpus → count and
judge again with what de-identification lost → re-key labels and masks. Each function reads and writes files under ``WORK/ingest``, so Prefect tasks
pass paths, and nothing with PHI is ever written: the raw header values never leave the worker
that read them.
"""

from __future__ import annotations

import fnmatch
import hashlib
import io as io_module
import logging
import math
import ntpath
import os
import posixpath
import shutil
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from dicomops import io
from dicomops.config import IngestConfig
from dicomops.deid.keys import KeyedMapper
from dicomops.dicom.parallel import map_isolated
from dicomops.dicom.reader import (
    INDEX_SCHEMA,
    ReadLimits,
    guessed_syntax,
    inspect_file,
    list_source,
    source_file,
)
from dicomops.dicom.series import assemble_series
from dicomops.errors import GateFailedError, local_outage
from dicomops.feedback.privacy import released_table
from dicomops.layout import IngestPaths, WorkLayout
from dicomops.synthetic.sidecars import (
    IPP_Z_ARRAY,
    LABELS_CSV,
    MASK_ARRAY,
    MASK_Z_TOLERANCE_MM,
    mask_path,
    mask_slices,
    recorded_nodules,
)
from dicomops.validation.suite import validate_table

QUARANTINE_COLUMNS = ["source_path", "reason", "detail"]
Progress = Callable[[int, int], None] | None
log = logging.getLogger(__name__)


def _limits(cfg: IngestConfig) -> ReadLimits:
    return ReadLimits(max_inflated_bytes=cfg.max_inflated_mb * 1024**2,
                      max_rows_columns=cfg.max_rows_columns,
                      allowed_modalities=tuple(cfg.allowed_modalities))


def _failed_read(item: tuple[Any, ...], reason: str) -> dict[str, Any]:
    detail = "the worker reading it died" if reason == "worker_crashed" else "reading took too long"
    return {"source_path": item[1], "reason": reason, "detail": detail}


def _read_table(path: Path) -> pd.DataFrame:
    """One of the gate's CSV tables (or a corpus's ``labels.csv``) exactly as written: every cell text.

    Paths, PatientIDs and UIDs are names, not numbers: parsed, a file named ``000011`` becomes 11
    and a PatientID ``0001001`` becomes 1001, and a file named ``NA`` becomes a missing value; each
    then matches nothing, so a quarantined file would be accepted, or a label keyed to nobody.
    """
    return pd.read_csv(path, dtype=str, keep_default_na=False)


def split_sidecars(files: list[tuple[str, str]], patterns: tuple[str, ...] | list[str]
                   ) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """Separate known non-image files (labels, masks) from the files to ingest."""
    sidecars = [f for f in files if any(fnmatch.fnmatchcase(f[1], p) for p in patterns)]
    chosen = set(sidecars)
    return [f for f in files if f not in chosen], sidecars


def index_headers(src: Path, work: Path, cfg: IngestConfig, key: bytes, progress: Progress = None) -> Path:
    """Read every regular file's header under `src` in parallel; write the de-identified index.

    Writes ``index.parquet`` (one row per readable, structurally sound file) and
    ``quarantine_headers.csv`` (one row per rejected file, and per folder or file the listing could not
    look into: each counts as one file of the batch).
    """
    src = Path(src)
    if not src.is_dir():
        raise ValueError(f"{src} is not a folder; pass the folder that holds the DICOM files")
    check_labels(src, warn=False)  # before hours of reading: a labels.csv the gate would refuse at the end
    paths = WorkLayout(work).ingest
    listing = list_source(src, skip=Path(work))
    files, sidecars = split_sidecars(listing.files, cfg.sidecars)
    io.write_csv(paths.sidecars, pd.DataFrame({"source_path": [rel for _, rel in sidecars]}))
    listed = len(files) + len(listing.unreadable)
    files, clashes = _name_clashes(src, files)
    rows = map_isolated(inspect_file, files, args=(key, _limits(cfg)), on_failure=_failed_read,
                        workers=cfg.workers, chunk_size=128, seconds_per_item=cfg.seconds_per_file,
                        progress=progress, dask_address=cfg.dask_address)
    good = [r for r in rows if r.get("reason") is None]
    bad = listing.unreadable + clashes + [{k: r.get(k, "") for k in QUARANTINE_COLUMNS}
                                          for r in rows if r.get("reason") is not None]
    # Without a single readable file the index still has every column of a row, so later steps see an
    # empty table, and the gate reports the quarantine (or passes an empty batch) instead of crashing.
    index = pd.DataFrame(good).drop(columns=["reason"], errors="ignore") if good else \
        pd.DataFrame({c: pd.Series(dtype=t) for c, t in INDEX_SCHEMA.items()})
    io.write_csv(paths.index_quarantine, pd.DataFrame(bad, columns=QUARANTINE_COLUMNS))
    io.write_json(paths.files, {"files": listed})
    return io.write_parquet(paths.index, index)


def _name_clashes(src: Path, files: list[tuple[str, str]]) -> tuple[list[tuple[str, str]], list[dict[str, str]]]:
    """(files to read, quarantine rows): a file whose name is not UTF-8 and, written with ``\\xNN``
    escapes, reads as another file's name, is quarantined (``bad_file_name``) rather than read under a
    name that opens the other file."""
    names = [rel for _, rel in files]
    if len(set(names)) == len(names):
        return files, []
    counts = pd.Series(names).value_counts()
    clashing = {(full, rel) for full, rel in files
                if counts[rel] > 1 and os.path.normpath(full) != os.path.normpath(os.path.join(src, rel))}
    rows = [{"source_path": rel, "reason": "bad_file_name",
             "detail": "the name is not valid UTF-8 and, with its other bytes written as \\xNN, reads as another "
                       "file's name; rename the file to UTF-8 (e.g. convmv -f latin1 -t utf8)"}
            for _, rel in sorted(clashing, key=lambda f: f[1])]
    return [f for f in files if f not in clashing], rows


def validate_headers(work: Path, cfg: IngestConfig) -> Path:
    """Run the expectation suite on the index; quarantine rows failing a critical expectation."""
    paths = WorkLayout(work).ingest
    index = pd.read_parquet(paths.index)
    outcome = validate_table(index, list(cfg.expectations), paths.docs)
    io.write_csv(paths.expectations, outcome.table)
    io.write_json(paths.validation, {
        "success": outcome.success, "success_share": outcome.success_share,
        "expectations": len(outcome.table),
        "failed_critical": sorted(outcome.failed_rows),
        "docs": str(outcome.docs_index.relative_to(Path(work).resolve())) if outcome.docs_index else None,
    })
    first_failure: dict[int, str] = {}
    for name in sorted(outcome.failed_rows):
        for row in outcome.failed_rows[name]:
            first_failure.setdefault(row, name)
    rejected = pd.DataFrame(
        [{"source_path": index.iloc[i]["source_path"], "reason": f"expectation:{name}",
          "detail": outcome.failed_details[name][i]} for i, name in sorted(first_failure.items())],
        columns=QUARANTINE_COLUMNS)
    return io.write_csv(paths.validation_quarantine, rejected)


def assemble(work: Path, cfg: IngestConfig) -> Path:
    """Group what passed validation into series, order slices, quarantine bad geometry."""
    paths = WorkLayout(work).ingest
    index = pd.read_parquet(paths.index)
    failed = set(_read_table(paths.validation_quarantine).source_path)
    index = index[~index.source_path.isin(failed)]
    result = assemble_series(index, cfg.geometry)
    io.write_parquet(paths.series, result.series)
    io.write_csv(paths.geometry_quarantine, result.quarantine)
    return io.write_parquet(paths.instances, result.instances)


@dataclass(frozen=True)
class GateSummary:
    files: int
    accepted_files: int
    quarantined_files: int
    quarantined_share: float
    accepted_series: int
    reasons: dict[str, int]
    passed: bool


def apply_gate(work: Path, cfg: IngestConfig) -> GateSummary:
    """Merge the quarantine lists, write ``quarantine.csv`` and ``summary.json``; fail if too much is bad.

    Raises:
        GateFailedError: the quarantined share exceeds ``cfg.max_invalid_fraction``; the message
            names the most common reasons.
    """
    paths = WorkLayout(work).ingest
    parts = [_read_table(p) for p in
             (paths.index_quarantine, paths.validation_quarantine, paths.geometry_quarantine)]
    quarantine = pd.concat(parts, ignore_index=True).sort_values("source_path", ignore_index=True)
    io.write_csv(paths.quarantine, quarantine[QUARANTINE_COLUMNS])
    return _judge(paths, cfg, quarantine, pd.read_parquet(paths.instances))


def recount_gate(work: Path, cfg: IngestConfig) -> GateSummary:
    """The gate's figures again after de-identification, from what was really accepted and quarantined.

    De-identification quarantines whole series (``deid_failed``) that :func:`apply_gate` counted as
    accepted, so ``summary.json``, the metrics and the printed result are rewritten from
    ``accepted.parquet`` and ``quarantine.csv``, and ``cfg.max_invalid_fraction`` holds for those
    losses too. A batch refused here leaves no de-identified corpus, as one refused before
    de-identification, so that no later stage reads it.

    Raises:
        GateFailedError: with the files lost at de-identification, the quarantined share exceeds
            ``cfg.max_invalid_fraction``.
    """
    paths = WorkLayout(work).ingest
    try:
        return _judge(paths, cfg, _read_table(paths.quarantine), pd.read_parquet(paths.accepted))
    except GateFailedError:
        paths.accepted.unlink(missing_ok=True)
        shutil.rmtree(paths.deid, ignore_errors=True)
        raise


def _judge(paths: IngestPaths, cfg: IngestConfig, quarantine: pd.DataFrame, accepted: pd.DataFrame) -> GateSummary:
    """Write ``summary.json`` for this quarantine and these accepted instances; raise if too much is bad."""
    files = int(io.read_json(paths.files)["files"])
    reasons = quarantine.reason.value_counts().to_dict()
    share = len(quarantine) / files if files else 0.0
    summary = GateSummary(
        files=files, accepted_files=len(accepted), quarantined_files=len(quarantine),
        quarantined_share=share,
        accepted_series=int(accepted.SeriesInstanceUID.nunique()) if len(accepted) else 0,
        reasons={str(k): int(v) for k, v in reasons.items()},
        passed=share <= cfg.max_invalid_fraction and files > 0,
    )
    io.write_json(paths.summary, summary.__dict__ | {"max_invalid_fraction": cfg.max_invalid_fraction})
    if files == 0:  # no threshold lets an empty batch through, and none should be suggested
        said = "the source holds no files to ingest (the corpus's sidecars, such as labels.csv, do not count)"
        raise GateFailedError(f"{said}; check the path, or that the studies were copied in",
                              brief=f"{said}; check the source")
    if not summary.passed:
        top = ", ".join(f"{k} ({v})" for k, v in list(summary.reasons.items())[:3])
        said = (f"{summary.quarantined_files} of {files} files quarantined ({share:.1%}), above the "
                f"allowed {cfg.max_invalid_fraction:.1%}. Top reasons: {top}")
        needed = math.ceil(share * 100) / 100  # the setting that would let this batch through
        raise GateFailedError(
            f"{said}. See {paths.quarantine}; fix the source, or, if this batch is acceptable, raise the setting "
            f"ingest.max_invalid_fraction to at least {needed:.2f}: `dicomops ingest --max-invalid-fraction "
            f"{needed:.2f}`, or for `dicomops run` and `dicomops monitor` a --config YAML with "
            f"`ingest: {{max_invalid_fraction: {needed:.2f}}}`.",
            brief=f"{said}; fix the source, or raise ingest.max_invalid_fraction if it is acceptable.")
    return summary


_DEIDENTIFIERS: dict[tuple[bytes, str], Any] = {}


def deidentify_file(source: str, dest: str, key: bytes, table_version: str) -> dict[str, str]:
    """Worker: read one accepted file, de-identify it, write it atomically to `dest`."""
    import pydicom

    from dicomops.deid.profile import Deidentifier

    try:
        deid = _DEIDENTIFIERS.get((key, table_version))
        if deid is None:
            deid = _DEIDENTIFIERS[(key, table_version)] = Deidentifier(KeyedMapper(key), table_version)
        # The gate accepts files without the preamble and DICM (warning no_preamble); read them as its
        # reader did. Written back, each is a PS3.10 file: preamble, DICM and file meta, whose transfer
        # syntax is the one the dataset was read in when the source had no file meta to say it.
        ds = pydicom.dcmread(source, force=True)
        if not ds.file_meta.get("TransferSyntaxUID"):
            ds.file_meta.TransferSyntaxUID = guessed_syntax(ds)
        deid.dataset(ds)
        buffer = io_module.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        data = buffer.getvalue()
        io.write_bytes(Path(dest), data)
        return {"reason": "", "sha256": hashlib.sha256(data).hexdigest()}
    except RecursionError:
        return {"reason": "deid_failed", "detail": "sequences nested too deep"}
    except Exception as err:
        if local_outage(err):  # the machine's, not the file's: map_isolated raises it in the caller
            raise
        return {"reason": "deid_failed", "detail": type(err).__name__}


def deidentify_corpus(src: Path, work: Path, cfg: IngestConfig, key: bytes, progress: Progress = None) -> Path:
    """Write every accepted instance de-identified to ``WORK/deid`` and ``accepted.parquet``.

    A series with any instance that fails to de-identify is quarantined whole (``deid_failed``).
    """
    paths = WorkLayout(work).ingest
    instances = pd.read_parquet(paths.instances)
    instances["deid_path"] = [
        f"{p}/{s}/{i}.dcm" for p, s, i in
        zip(instances.PatientID, instances.SeriesInstanceUID, instances.SOPInstanceUID, strict=True)]
    items = [(source_file(src, s), str(paths.deid / d)) for s, d in
             zip(instances.source_path, instances.deid_path, strict=True)]
    results = map_isolated(
        deidentify_file, items, args=(key, cfg.deid.table_version),
        on_failure=lambda item, why: {"reason": "deid_failed", "detail": why},
        workers=cfg.workers, chunk_size=64, seconds_per_item=cfg.seconds_per_file, progress=progress,
        dask_address=cfg.dask_address)
    instances["sha256"] = [r.get("sha256", "") for r in results]
    failed_series = {s for s, r in zip(instances.SeriesInstanceUID, results, strict=True) if r["reason"]}
    if failed_series:
        bad = instances[instances.SeriesInstanceUID.isin(failed_series)]
        for d in bad.deid_path:
            (paths.deid / d).unlink(missing_ok=True)
        extra = bad[["source_path"]].assign(reason="deid_failed", detail="could not be de-identified")
        quarantine = pd.concat([_read_table(paths.quarantine), extra])
        io.write_csv(paths.quarantine, quarantine.sort_values("source_path", ignore_index=True))
        instances = instances[~instances.SeriesInstanceUID.isin(failed_series)]
    return io.write_parquet(paths.accepted, instances.reset_index(drop=True))


def check_labels(src: Path, warn: bool = True) -> pd.DataFrame | None:
    """The corpus's ``labels.csv`` as the gate will re-key it, or None without one; its index is each
    row's place in the file (0 for the first row under the header), so later messages name the rows
    as these do.

    One row per series: a row with an empty SeriesInstanceUID is refused; a row repeated word for word
    is kept once (a warning); two different rows for one SeriesInstanceUID are refused, as is a
    ``mask_path`` written outside the source folder (absolute, or climbing out with ``..``): a mask
    is a file of the corpus. An empty ``mask_path`` means the series has no mask. What the file a
    ``mask_path`` names holds is checked when the gate reads it (:func:`rekey_labels`). Messages name
    rows by number, never by a value (UIDs, IDs and paths can identify a patient).

    Raises:
        ValueError: the file needs fixing; the message says what to change.
    """
    src_labels = Path(src) / LABELS_CSV
    if not src_labels.exists():
        return None
    labels = _read_table(src_labels)
    if labels.empty:  # a header without rows: nothing to check, nothing to re-key
        return labels
    for column in ("SeriesInstanceUID", "PatientID"):
        if column not in labels:
            raise ValueError(f"{LABELS_CSV} has no {column} column; give it one row per series with its "
                             "SeriesInstanceUID and PatientID, as the DICOM files spell them")
    def rows(which: pd.Series) -> str:  # numbered from 1, the first row under the header
        return ", ".join(str(i + 1) for i in labels.index[which.to_numpy()][:10])

    blank = labels.SeriesInstanceUID.str.strip() == ""
    if blank.any():  # a label that names no series matches none, and several would read as one series
        raise ValueError(f"{LABELS_CSV}: {int(blank.sum())} row(s) have an empty SeriesInstanceUID "
                         f"(rows {rows(blank)}); give each row the SeriesInstanceUID of its series, as the "
                         "DICOM files spell it")
    repeated = labels.duplicated(keep="first")
    if repeated.any():
        if warn:  # the gate checks twice: before reading the files and when it re-keys the labels
            log.warning("%s: %d row(s) repeat an earlier row word for word (rows %s); each is kept once",
                        LABELS_CSV, int(repeated.sum()), rows(repeated))
        labels = labels[~repeated]
    uid = labels.SeriesInstanceUID.str.strip()
    conflicting = uid.duplicated(keep=False)
    if conflicting.any():
        groups = [rows(uid == u) for u in uid[conflicting].unique()[:5]]
        raise ValueError(f"{LABELS_CSV} has {int(uid[conflicting].nunique())} series with different rows "
                         f"(rows {'; rows '.join(groups)}); a series has one label: keep one row per "
                         "SeriesInstanceUID and delete or merge the others")
    if "mask_path" in labels:
        outside = labels.mask_path.map(_outside_folder).astype(bool)
        if outside.any():
            raise ValueError(f"{LABELS_CSV}: the mask_path of rows {rows(outside)} "
                             "points outside the source folder (an absolute path, or one that climbs out with '..'); "
                             "give each mask relative to the folder that holds labels.csv (e.g. masks/case-1.npz), "
                             "or leave mask_path empty for a series without a mask")
    return labels


def _outside_folder(rel: str) -> bool:
    rel = str(rel).strip().replace("\\", "/")
    if not rel:
        return False
    return posixpath.isabs(rel) or bool(ntpath.splitdrive(rel)[0]) or \
        posixpath.normpath(rel).split("/", 1)[0] == ".."


def rekey_labels(src: Path, work: Path, key: bytes) -> Path | None:
    """Write ``labels.csv`` and the masks of accepted series, keyed by pseudonym and remapped UID
    (:func:`check_labels` says which files it refuses).

    A mask is never copied: the gate reads the file a ``mask_path`` names as the generator's mask
    format and writes its two arrays anew (:func:`_mask_arrays`), so nothing else that file holds (an
    array with a name in it) or that another file holds (a DICOM file, a table of names, named as a
    mask) reaches the de-identified corpus. It must also be a mask of its series: its rows and
    columns, a slice at each accepted slice's position, no nodule id beyond the row's records, and no
    larger than that series' mask can be (refused before it is inflated). A ``mask_path`` that names
    no file, or none in that format, or a mask that does not fit its series or its row, leaves its
    series without a mask, with one warning per reason naming the rows.
    """
    labels = check_labels(src)
    if labels is None:
        return None
    paths = WorkLayout(work).ingest
    mapper = KeyedMapper(key)
    labels = labels.assign(SeriesInstanceUID="", PatientID="") if labels.empty else labels
    labels["SeriesInstanceUID"] = labels.SeriesInstanceUID.str.strip().map(mapper.uid)
    labels["PatientID"] = labels.PatientID.map(mapper.pseudonym)
    grids = _series_grids(pd.read_parquet(paths.accepted, columns=list(GRID_COLUMNS)))
    labels = labels[labels.SeriesInstanceUID.isin(set(grids))].copy()
    new_masks: list[str] = []
    refused: dict[str, list[int]] = {}  # reason -> rows of labels.csv, numbered from 1
    for row in labels.itertuples():
        given = str(getattr(row, "mask_path", "") or "").strip()  # empty: the series has no mask
        recorded = recorded_nodules(getattr(row, "nodules", None), getattr(row, "nodule_count", None))
        bound = min(recorded) if recorded else None  # the strict bound: a mask's ids, the fewer the row records
        arrays, why = _mask_arrays(Path(src) / given, grids[row.SeriesInstanceUID], bound) if given else (None, "")
        rel = mask_path(row.SeriesInstanceUID)
        if arrays is None:
            if why:
                refused.setdefault(why, []).append(int(row.Index) + 1)
            (paths.deid / rel).unlink(missing_ok=True)  # an earlier run's, which labels.csv no longer names
            new_masks.append("")
            continue
        io.write_npz(paths.deid / rel, **arrays)
        new_masks.append(rel)
    for why, rows in refused.items():
        shown = ", ".join(map(str, rows[:10])) + (f" and {len(rows) - 10} more" if len(rows) > 10 else "")
        log.warning("%s: the mask_path of rows %s names %s; those series have no mask in the de-identified "
                    "corpus. Give each the .npz the generator writes for that series (a uint8 array %r of "
                    "slices x rows x columns, the rows and columns of its images, 0 outside and k inside the "
                    "row's nodule k, and %r, one finite z position per slice, with every slice of the series "
                    "among them), or leave mask_path empty",
                    LABELS_CSV, shown, why, MASK_ARRAY, IPP_Z_ARRAY)
    labels["mask_path"] = new_masks
    keep = ["SeriesInstanceUID", "PatientID", "vendor", "label", "nodule_count",
            "nodule_diameters_mm", "nodules", "actionable_count", "scenario", "mask_path"]
    return io.write_csv(paths.deid / LABELS_CSV, labels[[c for c in keep if c in labels]])


GRID_COLUMNS = ("SeriesInstanceUID", "Rows", "Columns", "ImagePositionPatient_2")
NPY_HEADER_BYTES = 16 * 1024  # room for an array's .npy header (numpy reads at most 10,000 bytes of one)
ARCHIVE_SLACK_BYTES = 1024**2  # room in a mask file for its zip headers and a reader's nodule records


@dataclass(frozen=True)
class _SeriesGrid:
    """What the mask of an accepted series must fit: its images' rows and columns and its slices' z
    positions (``ImagePositionPatient_2``, as preprocessing lays the mask on the volume)."""

    rows: int
    columns: int
    z: np.ndarray

    @property
    def max_slices(self) -> int:
        """The most slices its mask may hold: the acquisition's may include slices the gate left
        out at an end of the series (a gap quarantines the whole series), up to as many again and 8."""
        return 2 * len(self.z) + 8

    def max_array_bytes(self, name: str) -> int:
        """The most bytes the array `name` of its mask may inflate to, with its .npy header."""
        per_slice = self.rows * self.columns if name == MASK_ARRAY else np.dtype(np.float64).itemsize
        return per_slice * self.max_slices + NPY_HEADER_BYTES

    @property
    def max_file_bytes(self) -> int:
        return self.max_array_bytes(MASK_ARRAY) + self.max_array_bytes(IPP_Z_ARRAY) + ARCHIVE_SLACK_BYTES


def _series_grids(accepted: pd.DataFrame) -> dict[str, _SeriesGrid]:
    """Each accepted series' grid, by (re-keyed) SeriesInstanceUID; the gate's geometry check has
    made Rows and Columns the same across a series' slices."""
    return {str(uid): _SeriesGrid(int(group.Rows.iloc[0]), int(group.Columns.iloc[0]),
                                  group.ImagePositionPatient_2.to_numpy(dtype=np.float64))
            for uid, group in accepted.groupby("SeriesInstanceUID", sort=False)}


def _mask_arrays(path: Path, grid: _SeriesGrid, nodules: int | None) -> tuple[dict[str, Any] | None, str]:
    """The arrays of the mask file `path` the de-identified corpus keeps, or None and why it has none.

    The file must be a ``.npz`` with a uint8 ``mask`` (slices, rows, columns) and ``ipp_z``, one
    finite position per slice, as the generator writes it; it is read without pickles and only those
    two arrays are returned (a reader's mask also holds its nodule records, which ``labels.csv``
    carries). Links are followed, as for the DICOM files: a corpus may link its masks in, and the
    retrain's combined corpus does. The mask must be one of its series (`grid`): the rows and columns
    of its images and a slice within :data:`MASK_Z_TOLERANCE_MM` of each accepted slice's position
    (else a slice preprocessing finds no mask for would be learnt as free of nodules), with no nodule
    id above the `nodules` its row records (the segmenter refuses such a mask when it trains).

    Nothing is inflated before the file is known to be no larger than that series' mask can be: its
    size on disk, its zip directory's sizes and its arrays' .npy headers (dtype and shape) are checked
    first. The reasons say what is wrong, never what the file holds (a dtype's field names, an
    array's name, are the writer's words).
    """
    too_large = f"a file larger than a mask of its series can be ({MASK_ARRAY!r} of slices x rows x columns)"
    not_mask = f"a .npz whose {MASK_ARRAY!r} is not a uint8 array of slices x rows x columns"
    not_z = f"a .npz whose {IPP_Z_ARRAY!r} is not one finite z position per slice of {MASK_ARRAY!r}"
    other_matrix = "a mask whose rows x columns are not its series' (a mask of another series, or resized)"
    try:  # a name too long, a folder not searchable: the path's fault, said without the path
        if not path.is_file():  # nothing there, a dangling link, a folder or a FIFO: never opened
            return None, "no file"
        size = path.stat().st_size
        members = _zip_members(path)
        single = members is None and _is_npy(path)
    except (OSError, ValueError) as err:
        if local_outage(err):
            raise
        return None, "no file"
    if size > grid.max_file_bytes:
        return None, too_large
    if members is None:
        return None, "a single array, not a .npz archive of arrays" if single else "a file that is not a readable .npz archive"
    if members > MAX_MASK_MEMBERS:  # np.load would parse a directory of any length first
        return None, "a file that is not a readable .npz archive"
    try:
        loaded = np.load(path, allow_pickle=False)  # an archive: its directory only, nothing inflated yet
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            return None, "a single array, not a .npz archive of arrays"
        with loaded as npz:
            if MASK_ARRAY not in npz.files or IPP_Z_ARRAY not in npz.files:
                return None, f"a .npz without the arrays {MASK_ARRAY!r} and {IPP_Z_ARRAY!r}"
            (shape, dtype, stored), (z_shape, z_dtype, z_stored) = (_array_header(npz, MASK_ARRAY),
                                                                    _array_header(npz, IPP_Z_ARRAY))
            if dtype != np.uint8 or len(shape) != 3 or 0 in shape:
                return None, not_mask
            if shape[1:] != (grid.rows, grid.columns):
                return None, other_matrix
            if shape[0] > grid.max_slices or stored > grid.max_array_bytes(MASK_ARRAY) \
                    or z_stored > grid.max_array_bytes(IPP_Z_ARRAY):
                return None, too_large
            if z_dtype.kind != "f" or z_shape != shape[:1]:
                return None, not_z
            mask, ipp_z = npz[MASK_ARRAY], npz[IPP_Z_ARRAY]
    except Exception as err:  # whatever the bytes are, the series goes on without a mask
        if local_outage(err):  # the machine's, not the file's
            raise
        return None, "a file that is not a readable .npz archive"
    if not np.isfinite(ipp_z).all():
        return None, not_z
    matched = mask_slices(ipp_z, grid.z) >= 0
    if not matched.any():
        return None, f"a mask whose {IPP_Z_ARRAY!r} holds none of its series' slice positions (a mask of another series)"
    if not matched.all():
        return None, (f"a mask whose {IPP_Z_ARRAY!r} lacks some of its series' slice positions (within "
                      f"{MASK_Z_TOLERANCE_MM:g} mm; shifted, or of part of the series)")
    if nodules is not None and int(mask.max()) > nodules:
        return None, "a mask with nodule ids beyond the number of nodules its row records (nodules, nodule_count)"
    return {MASK_ARRAY: mask, IPP_Z_ARRAY: ipp_z.astype(np.float64)}, ""


MAX_MASK_MEMBERS = 8  # the generator writes two arrays, a reader's mask three


def _zip_members(path: Path) -> int | None:
    """How many members the zip archive `path` says it holds, from its end-of-central-directory
    record alone (the file's last 64 KiB at most), or None where it has none (not a zip, or a Zip64
    directory, which no mask needs)."""
    with path.open("rb") as f:
        f.seek(0, 2)
        end = f.tell()
        f.seek(max(0, end - 65557))  # the record (22 bytes) and the longest comment (65,535)
        tail = f.read()
    at = tail.rfind(b"PK\x05\x06")
    if at < 0 or len(tail) - at < 22:
        return None
    entries = int.from_bytes(tail[at + 10:at + 12], "little")
    return None if entries == 0xFFFF else entries


def _is_npy(path: Path) -> bool:
    with path.open("rb") as f:
        return f.read(6) == b"\x93NUMPY"


def _array_header(npz: np.lib.npyio.NpzFile, name: str) -> tuple[tuple[int, ...], np.dtype[Any], int]:
    """(shape, dtype, bytes stored) of the array `name` of an open .npz, from its .npy header and the
    zip directory: the member's first bytes are inflated, never the array.

    Raises:
        ValueError: the member is no .npy array (numpy would return its bytes whole), it holds
            Python objects (pickles, which are not read), or two members bear the name.
    """
    archive: zipfile.ZipFile | None = npz.zip
    if archive is None:
        raise ValueError("the archive is closed")
    members = [info for info in archive.infolist() if info.filename in (name, f"{name}.npy")]
    if len(members) != 1:
        raise ValueError(f"{len(members)} members for one array")
    with archive.open(members[0]) as member:
        version = np.lib.format.read_magic(member)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
            np.lib.format.read_array_header_2_0
        shape, _, dtype = read_header(member)
    if dtype.hasobject:
        raise ValueError("an array of Python objects")
    return tuple(int(n) for n in shape), dtype, members[0].file_size


def write_reid_key(src: Path, work: Path, cfg: IngestConfig, key: bytes) -> Path | None:
    """Write pseudonym → original PatientID, only where the site configured a path outside WORK."""
    target = cfg.deid.reid_key_path
    if target is None:
        return None
    target, work = Path(target).resolve(), Path(work).resolve()
    if target.is_relative_to(work):
        raise ValueError(f"reid_key_path {target} is inside the work directory {work}; choose a "
                         "location outside it (the work directory must stay free of PHI)")
    mapper = KeyedMapper(key)
    labels = Path(src) / LABELS_CSV
    ids = sorted(set(_read_table(labels).PatientID)) if labels.exists() else []
    frame = pd.DataFrame({"pseudonym": [mapper.pseudonym(i) for i in ids], "PatientID": ids})
    io.write_csv(target, frame)
    os.chmod(target, 0o600)
    return target


def run(src: Path, work: Path, cfg: IngestConfig, key: bytes) -> GateSummary:
    """Every step of the gate in order, without Prefect (benchmarks, tests, batch evaluation).

    Raises :class:`GateFailedError` when the gate refuses the batch, as the flow does.
    """
    reset(work)
    index_headers(src, work, cfg, key)
    validate_headers(work, cfg)
    assemble(work, cfg)
    apply_gate(work, cfg)
    deidentify_corpus(src, work, cfg, key)
    gate = recount_gate(work, cfg)  # de-identification may quarantine more: the true figures, judged again
    rekey_labels(src, work, key)
    return gate


def reset(work: Path) -> None:
    """Remove the outputs of an earlier ingest in `work` (a new batch replaces them whole)."""
    paths = WorkLayout(work).ingest
    for folder in (paths.root, paths.deid, paths.docs):
        shutil.rmtree(folder, ignore_errors=True)


def record_source(work: Path, dvc_md5: str) -> Path:
    """Remember which source corpus this ingest read, by its DVC md5 (as in ``data.dvc``) and never
    by its path, which may name a patient or a hospital share."""
    path = WorkLayout(work).ingest.source
    io.write_json(path, {"dvc_md5": dvc_md5})
    return path


def source_dvc_md5(work: Path) -> str | None:
    """The DVC md5 of the corpus the work directory was ingested from (None before this was kept)."""
    path = WorkLayout(work).ingest.source
    return str(io.read_json(path)["dvc_md5"]) if path.exists() else None


def shared_quarantine(work: Path, key: bytes) -> Path:
    """The quarantine as it leaves the gate (MLflow): each file named by a keyed token of its path
    (``FI-…``), never the path, which a site's export may spell with a patient's name or ID; the
    reasons and details as they are. ``quarantine.csv`` in the work directory keeps the paths for
    whoever fixes the batch, with the same token beside each."""
    paths = WorkLayout(work).ingest
    quarantine = _read_table(paths.quarantine)
    mapper = KeyedMapper(key)
    shared = pd.DataFrame({"file": [mapper.token("file", str(p)) for p in quarantine.source_path],
                           "reason": quarantine.reason, "detail": quarantine.detail})
    io.write_csv(paths.quarantine, quarantine.assign(file=shared.file))
    return io.write_csv(paths.quarantine_shared, shared)


def ingest_metrics(work: Path) -> dict[str, float]:
    """Numbers worth a metric: counts, shares, validation success, per-reason counts."""
    paths = WorkLayout(work).ingest
    summary = io.read_json(paths.summary)
    metrics = {
        "ingest.files": float(summary["files"]),
        "ingest.accepted_files": float(summary["accepted_files"]),
        "ingest.quarantined_files": float(summary["quarantined_files"]),
        "ingest.quarantined_share": float(summary["quarantined_share"]),
        "ingest.accepted_series": float(summary["accepted_series"]),
    }
    if paths.validation.exists():
        metrics["validation.success_share"] = float(io.read_json(paths.validation)["success_share"])
    for reason, count in summary["reasons"].items():
        metrics[f"quarantine.{reason.replace(':', '.')}"] = float(count)
    return metrics


def _vendor_keys(paths: IngestPaths) -> dict[str, str]:
    """Manufacturer → the vendor key of the re-keyed labels (one key per manufacturer), {} before labels."""
    labels_path = paths.deid / LABELS_CSV
    if not labels_path.exists() or not paths.series.exists() or not paths.series.stat().st_size:
        return {}
    labels = _read_table(labels_path)
    if "vendor" not in labels:
        return {}
    series = pd.read_parquet(paths.series)
    vendor = series.SeriesInstanceUID.map(labels.set_index("SeriesInstanceUID").vendor)
    pairs = pd.DataFrame({"m": series.Manufacturer.astype(str), "v": vendor}).dropna()
    return {str(m): " / ".join(sorted(set(part.v))) for m, part in pairs.groupby("m")}


def plot_ingest(work: Path) -> Path:
    """A picture for reviewers: quarantine reasons, and accepted series per manufacturer with the
    vendor key cross-validation reports them under.

    The key comes from the ``vendor`` column of the re-keyed ``labels.csv``, as preprocessing takes
    it; before labels exist (or for a series without a label) there is none, and the series would
    not be in the cross-validation.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = WorkLayout(work).ingest
    summary = io.read_json(paths.summary)
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8), layout="constrained")
    reasons = summary["reasons"] or {"(none)": 0}
    axes[0].barh(list(reasons), list(reasons.values()), color="#c0504d")
    axes[0].bar_label(axes[0].containers[0], fontsize=10, padding=2)
    axes[0].set_title(f"Quarantined files: {summary['quarantined_files']} of {summary['files']}", fontsize=12)
    axes[0].invert_yaxis()
    # The right panel shows released counts only (differential privacy, dicomops.feedback.privacy):
    # a picture in MLflow is a release like any other, and an exact small cell singles out a patient.
    released = released_table(work, ("vendor",))
    keys = _vendor_keys(paths)
    if released is not None and len(released):
        names = [f"{m} \u2192 {keys.get(m, 'no label, not in CV')}" for m in released.cell]
        axes[1].barh(names, released["count"].to_numpy(), color="#4f81bd")
        axes[1].bar_label(axes[1].containers[0], fontsize=10, padding=2)
        axes[1].invert_yaxis()
        how = (f"OpenDP Laplace, \u03b5 = {released.epsilon.iloc[0]:g}; cells under "
               f"{int(released.threshold.iloc[0])} suppressed")
    else:
        why = "every cell under the threshold: suppressed" if released is not None else \
            "privacy off, or the budget is spent (see the ingest log)"
        axes[1].text(0.5, 0.5, f"no counts released\n({why})", ha="center", va="center", fontsize=11,
                     color="#555555", transform=axes[1].transAxes)
        axes[1].set_xticks([])
        axes[1].set_yticks([])
        how = "nothing released"
    source = " \u2192 vendor key in CV" if keys else "\nno labels.csv yet: no vendor key"
    axes[1].set_title(f"Accepted series per manufacturer{source}\n{how}", fontsize=11)
    for ax in axes:
        ax.tick_params(labelsize=11)
        ax.set_xlabel("count" if ax.get_xticks().size else "", fontsize=10)
        ax.margins(x=0.12)
    out = paths.picture
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
