"""Reviewed clinical series as a labelled source of their own.

A study the platform answered from the PACS stays de-identified in ``WORK/pacs/studies/<token>`` (the
gate's output: no PHI). When readers label one of its series and no labelled source already holds
that series, :func:`clinical_files` lays it out as a corpus in the generator's format: the
de-identified files under ``<series>/``, a ``labels.csv`` row with the readers' label and, when a
reader drew one, their mask under ``masks/``. The readers' DVC source keeps it as ``clinical/``, and a
retrain ingests it beside its other labelled sources. Going through the gate again remaps its UIDs
once more (the keyed mapping of the pseudonym): :func:`pool_aliases` follows them, so that the
readers' labels and the promotion gate still find their series in the retrained pool.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from dicomops import io
from dicomops.deid.keys import KeyedMapper
from dicomops.layout import WorkLayout
from dicomops.synthetic.sidecars import LABELS_CSV, mask_path

CLINICAL = "clinical"
LABEL_COLUMNS = ["SeriesInstanceUID", "StudyInstanceUID", "PatientID", "vendor", "label", "nodule_count",
                 "nodule_diameters_mm", "nodules", "actionable_count", "scenario", "series_dir", "mask_path"]


def vendor_key(manufacturer: str) -> str:
    """The vendor key a manufacturer is reported under (the generator's keys; else its first word)."""
    from dicomops.synthetic.vendors import VENDORS

    for key, profile in VENDORS.items():
        if profile.manufacturer.lower() == manufacturer.strip().lower():
            return key
    words = manufacturer.strip().lower().split()
    return words[0] if words else "unknown"


def known_series(sources: list[Path], key: bytes) -> set[str]:
    """The pseudonymous UIDs the gate gives every series of the labelled sources (raw corpora)."""
    mapper = KeyedMapper(key)
    known: set[str] = set()
    for src in sources:
        labels = Path(src) / LABELS_CSV
        if labels.exists():
            known |= {mapper.uid(str(u)) for u in io.read_table(labels, usecols=["SeriesInstanceUID"]).SeriesInstanceUID}
    return known


def clinical_files(work: Path, resolved: pd.DataFrame, known: set[str], masks_root: Path) -> dict[str, Path]:
    """The files of the clinical corpus (name in ``clinical/`` → file): every series readers labelled
    (``resolved``, label 0 or 1) that a PACS study of `work` holds de-identified and `known` does not,
    and ``labels.csv`` (written beside the feedback, ``WORK/feedback/clinical_labels.csv``).
    `masks_root`: where ``resolved.mask`` paths lie (``WORK/feedback``)."""
    from dicomops import io
    from dicomops.feedback.seg import ReaderMask

    decided = resolved[(resolved.label >= 0) & ~resolved.SeriesInstanceUID.isin(known)].set_index("SeriesInstanceUID")
    files: dict[str, Path] = {}
    rows: list[dict[str, object]] = []
    for study in WorkLayout(work).pacs.studies():
        ingest = WorkLayout(study).ingest
        if not decided.size or not ingest.accepted.exists():
            continue
        accepted = pd.read_parquet(ingest.accepted, columns=["SeriesInstanceUID", "StudyInstanceUID", "PatientID",
                                                             "Manufacturer", "deid_path"])
        for series, part in accepted[accepted.SeriesInstanceUID.isin(decided.index)].groupby("SeriesInstanceUID"):
            if any(r["SeriesInstanceUID"] == series for r in rows):
                continue  # the same series answered twice: its first copy
            files.update({f"{series}/{Path(p).name}": ingest.deid / p for p in part.deid_path})
            verdict = decided.loc[series]
            nodules: list[dict[str, object]] = []
            relative = ""
            if int(verdict.label) == 1 and str(verdict.get("mask", "") or ""):
                relative = mask_path(str(series))
                files[relative] = masks_root / str(verdict["mask"])
                nodules = ReaderMask.nodules_of(files[relative])
            rows.append({"SeriesInstanceUID": series, "StudyInstanceUID": str(part.StudyInstanceUID.iloc[0]),
                         "PatientID": str(part.PatientID.iloc[0]), "vendor": vendor_key(str(part.Manufacturer.iloc[0])),
                         "label": int(verdict.label), "nodule_count": len(nodules),
                         "nodule_diameters_mm": ";".join(f"{n['diameter_mm']:g}" for n in nodules),
                         "nodules": json.dumps(nodules), "actionable_count": len(nodules),
                         "scenario": "reviewed", "series_dir": str(series), "mask_path": relative})
    if not rows:
        return {}
    table = io.write_csv(WorkLayout(work).feedback.clinical_labels, pd.DataFrame(rows, columns=LABEL_COLUMNS))
    return {LABELS_CSV: table, **files}


def pool_aliases(resolved: pd.DataFrame, key: bytes) -> dict[str, str]:
    """Pool UID → readers' series UID for series that came in through the clinical source (the gate
    remapped their pseudonym once more)."""
    mapper = KeyedMapper(key)
    return {mapper.uid(str(s)): str(s) for s in resolved.SeriesInstanceUID}
