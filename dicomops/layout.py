"""The work directory contract: every path a stage reads or writes, and the readers and writers of
the files that more than one stage shares.

One ``WORK`` folder (``--work``, default ``./work``) holds everything a run writes::

    WORK/
      .stages/<stage>.json          completion records (dicomops.stages)
      .lock                         the writers' lock (dicomops.locking)
      ingest/                       header index, expectations, quarantine lists, accepted.parquet, summary.json
      deid/                         the de-identified corpus, labels.csv and masks (pseudonymised)
      reports/validation/           Great Expectations Data Docs
      preprocessed/                 volumes/<cache key>.npz + .json, index, features, slabs, failures
      splits/folds.json             the cross-validation split, made once (n_splits and seed inside)
      train/                        state.json, fold-<i>/, lovo-<vendor>/, final/, CV tables and pictures
      export/v<version>/            ONNX, INT8, TensorRT, Triton repository, manifest.json
      monitoring/batches/<id>/      a monitored batch: its own ingest/, deid/, preprocessed/, drift/
      monitoring/retrain_state.json cooldown of drift-triggered retraining
      monitoring/inflow/<id>/       the PACS studies a monitored inflow batch holds (links to their deid/)
      monitoring/inflow.json        how far pacs-watch's ledger has been monitored (a row count only)
      alerts.jsonl                  drift alerts, one JSON line each
      retrain/                      the combined labelled sources (src/, its DVC pointer src.dvc), the retrain's own
                                    work directory, pool.json
      pacs/cursor.json              how far the PACS changes feed was handled (a sequence number only)
      pacs/studies.csv              each PACS study handled: its token, verdict, counts, results stored back
      pacs/studies/<token>/         a PACS study's own ingest/, deid/, preprocessed/ (token: keyed hash)
      feedback/                     readers' judgements (items.parquet), resolved labels.csv, masks/<token>.npz

Nothing else in the package spells these names: a stage asks its ``WorkLayout`` for a path.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from dicomops import io

SPLIT_VERSION = 1


@dataclass(frozen=True)
class IngestPaths:
    """The ingest gate's outputs."""

    work: Path

    @property
    def root(self) -> Path:
        return self.work / "ingest"

    files = property(lambda self: self.root / "files.json")
    sidecars = property(lambda self: self.root / "sidecars.csv")
    index = property(lambda self: self.root / "index.parquet")
    index_quarantine = property(lambda self: self.root / "quarantine_headers.csv")
    validation = property(lambda self: self.root / "validation.json")
    expectations = property(lambda self: self.root / "expectations.csv")
    validation_quarantine = property(lambda self: self.root / "quarantine_validation.csv")
    instances = property(lambda self: self.root / "instances.parquet")
    series = property(lambda self: self.root / "series.parquet")
    geometry_quarantine = property(lambda self: self.root / "quarantine_geometry.csv")
    quarantine = property(lambda self: self.root / "quarantine.csv")
    quarantine_shared = property(lambda self: self.root / "shared" / "quarantine.csv")  # files by token: for MLflow
    accepted = property(lambda self: self.root / "accepted.parquet")
    summary = property(lambda self: self.root / "summary.json")
    source = property(lambda self: self.root / "source.json")  # the source corpus's DVC md5, never its path
    picture = property(lambda self: self.root / "ingest_summary.png")
    released = property(lambda self: self.root / "released")  # counts released under DP; nothing exact
    docs = property(lambda self: self.work / "reports" / "validation")
    deid = property(lambda self: self.work / "deid")


@dataclass(frozen=True)
class FeedbackPaths:
    """Readers' feedback: every item (the history), and the labels it resolves to."""

    work: Path

    @property
    def root(self) -> Path:
        return self.work / "feedback"

    items = property(lambda self: self.root / "items.parquet")
    labels = property(lambda self: self.root / "labels.csv")  # one resolved reader label per series
    pacs_seen = property(lambda self: self.root / "pacs_seen.csv")  # every report looked at, by token, and why
    cursor = property(lambda self: self.root / "cursor.json")  # how far the PACS changes feed was read
    clinical_labels = property(lambda self: self.root / "clinical_labels.csv")  # reviewed clinical series

    @staticmethod
    def mask(token: str) -> str:
        """Where a reader's mask lies, relative to ``feedback/`` (as items and labels record it)."""
        return f"masks/{token}.npz"


@dataclass(frozen=True)
class PacsPaths:
    """Studies taken from a PACS: where the changes feed was left, which studies were handled and
    how, and one work directory per study (named by its token, never its UID)."""

    work: Path

    @property
    def root(self) -> Path:
        return self.work / "pacs"

    cursor = property(lambda self: self.root / "cursor.json")
    ledger = property(lambda self: self.root / "studies.csv")
    attempts = property(lambda self: self.root / "attempts.json")  # passes a study failed in, by token

    def study(self, token: str) -> Path:
        return self.root / "studies" / token

    def studies(self) -> list[Path]:
        """Every PACS study's work directory, by token."""
        folder = self.root / "studies"
        return sorted(p for p in folder.iterdir() if p.is_dir()) if folder.exists() else []


@dataclass(frozen=True)
class PreprocessedPaths:
    """The preprocessing cache and the tables derived from it."""

    work: Path

    @property
    def root(self) -> Path:
        return self.work / "preprocessed"

    volumes = property(lambda self: self.root / "volumes")
    index = property(lambda self: self.root / "index.parquet")
    features = property(lambda self: self.root / "features.parquet")
    slabs = property(lambda self: self.root / "slabs.parquet")
    failures = property(lambda self: self.root / "failures.csv")
    samples = property(lambda self: self.root / "samples.png")
    made_from = property(lambda self: self.root / "made_from.json")  # the accepted corpus's content hash

    def volume(self, relative: str) -> Path:
        """A cached volume named by the index's ``path`` column (relative to this folder)."""
        return self.root / relative

    def entry(self, key: str) -> Path:
        """The cached volume of cache key `key` (its metadata sits beside it as ``.json``)."""
        return self.volumes / f"{key}.npz"

    def read_index(self) -> pd.DataFrame:
        return _read_parquet(self.index, "dicomops preprocess")

    def read_features(self) -> pd.DataFrame:
        return _read_parquet(self.features, "dicomops preprocess")

    def read_slabs(self) -> pd.DataFrame:
        return _read_parquet(self.slabs, "dicomops preprocess")


@dataclass(frozen=True)
class TrainPaths:
    """Cross-validation state, per-fold folders, the final model and the CV tables."""

    work: Path

    @property
    def root(self) -> Path:
        return self.work / "train"

    state = property(lambda self: self.root / "state.json")
    summary = property(lambda self: self.root / "summary.json")
    oof_predictions = property(lambda self: self.root / "oof_predictions.parquet")
    # Series and score only: what the training run keeps in MLflow for a later promotion gate
    # (dicomops.training.champion_pool), which reads vendors and labels from its own pool.
    oof_scores = property(lambda self: self.root / "oof_scores.parquet")
    per_fold_metrics = property(lambda self: self.root / "per_fold_metrics.csv")
    cv_summary = property(lambda self: self.root / "cv_summary.csv")
    fold_counts = property(lambda self: self.root / "fold_counts.csv")
    evidence = property(lambda self: self.root / "evidence_by_vendor.csv")
    lovo = property(lambda self: self.root / "lovo.csv")
    final = property(lambda self: self.root / "final")
    final_weights = property(lambda self: self.root / "final" / "model.pt")
    final_config = property(lambda self: self.root / "final" / "train_config.json")
    final_preprocess_config = property(lambda self: self.root / "final" / "preprocess_config.json")

    def fold(self, fold: int) -> Path:
        return self.root / f"fold-{fold}"

    def held_out(self, vendor: str) -> Path:
        return self.root / f"lovo-{vendor}"

    def picture(self, name: str) -> Path:
        return self.root / name


@dataclass(frozen=True)
class SegmentPaths:
    """The nodule segmenter's cross-validation: state, per-fold folders, final model, tables, pictures."""

    work: Path

    @property
    def root(self) -> Path:
        return self.work / "segment"

    state = property(lambda self: self.root / "state.json")
    summary = property(lambda self: self.root / "summary.json")
    nodules = property(lambda self: self.root / "nodules.csv")  # one row per reference nodule, out of fold
    series = property(lambda self: self.root / "series.csv")  # one row per series, out of fold
    by_group = property(lambda self: self.root / "metrics_by_group.csv")
    final = property(lambda self: self.root / "final")
    final_weights = property(lambda self: self.root / "final" / "model.pt")
    final_config = property(lambda self: self.root / "final" / "segment_config.json")
    final_preprocess_config = property(lambda self: self.root / "final" / "preprocess_config.json")

    def fold(self, fold: int) -> Path:
        return self.root / f"fold-{fold}"

    def picture(self, name: str) -> Path:
        return self.root / name

    def teacher_scores(self, run_id: str, code: str) -> Path:
        """Slice scores of the segmenter of MLflow run `run_id`, as a student's teacher, computed by code
        of hash `code` (one ``.npy`` per series and volume: :func:`teacher_score_file`)."""
        return self.root / "teacher" / run_id / code[:12]

    @staticmethod
    def teacher_score_file(folder: Path, series_uid: str, volume: str) -> Path:
        """A series' teacher scores in `folder`, for its preprocessed volume `volume` (path or cache key)."""
        return folder / f"{series_uid}_{Path(volume).name.split('.')[0][:12]}.npy"


@dataclass(frozen=True)
class Folds:
    """The cross-validation split as written to ``splits/folds.json``."""

    folds: list[dict[str, list[str]]]
    n_splits: int
    seed: int
    sha256: str

    def train(self, fold: int) -> list[str]:
        return self.folds[fold]["train"]

    def val(self, fold: int) -> list[str]:
        return self.folds[fold]["val"]


@dataclass(frozen=True)
class WorkLayout:
    """Every path under one work directory; the one owner of the work-directory contract."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @property
    def ingest(self) -> IngestPaths:
        return IngestPaths(self.root)

    @property
    def preprocessed(self) -> PreprocessedPaths:
        return PreprocessedPaths(self.root)

    @property
    def train(self) -> TrainPaths:
        return TrainPaths(self.root)

    @property
    def segment(self) -> SegmentPaths:
        return SegmentPaths(self.root)

    @property
    def feedback(self) -> FeedbackPaths:
        return FeedbackPaths(self.root)

    @property
    def pacs(self) -> PacsPaths:
        return PacsPaths(self.root)

    stages = property(lambda self: self.root / ".stages")
    lock = property(lambda self: self.root / ".lock")
    folds_file = property(lambda self: self.root / "splits" / "folds.json")
    alerts = property(lambda self: self.root / "alerts.jsonl")
    monitoring = property(lambda self: self.root / "monitoring")
    retrain_state = property(lambda self: self.root / "monitoring" / "retrain_state.json")
    inflow_cursor = property(lambda self: self.root / "monitoring" / "inflow.json")
    retrain_lock = property(lambda self: self.root / "monitoring" / "retrain.lock")
    retrain_sources = property(lambda self: self.root / "retrain" / "src")
    retrain_readers = property(lambda self: self.root / "retrain" / "readers")  # the readers' version it used
    retrain_pool = property(lambda self: self.root / "retrain" / "pool.json")  # the pool its training state is for
    privacy_pool = property(lambda self: self.root / "privacy" / "pool.json")  # the pool's released counts

    def stage_record(self, stage: str) -> Path:
        return self.stages / f"{stage}.json"

    def stage_outputs(self, stage: str) -> list[Path]:
        """What a finished stage leaves behind; its completion record holds only while they exist."""
        outputs = {"ingest": [self.ingest.accepted, self.ingest.summary, self.ingest.deid],
                   "preprocess": [self.preprocessed.index, self.preprocessed.features, self.preprocessed.slabs],
                   "train": [self.train.summary, self.train.final_weights],
                   "segment": [self.segment.summary, self.segment.final_weights]}
        if stage not in outputs:
            raise ValueError(f"stage {stage!r} names its outputs itself; one of {', '.join(outputs)} has them here")
        return outputs[stage]

    def export_dir(self, version: str) -> Path:
        return self.root / "export" / f"v{version}"

    def batch(self, batch_id: str) -> WorkLayout:
        """A monitored batch: a work directory of its own inside this one."""
        return WorkLayout(self.root / "monitoring" / "batches" / batch_id)

    def inflow(self, batch_id: str) -> Path:
        """The de-identified files of the PACS studies one monitored inflow batch holds."""
        return self.root / "monitoring" / "inflow" / batch_id

    def batches(self) -> list[WorkLayout]:
        folder = self.root / "monitoring" / "batches"
        return [WorkLayout(p) for p in sorted(folder.iterdir()) if p.is_dir()] if folder.exists() else []

    def predictions(self, batch_id: str) -> Path:
        """A prediction batch's de-identified results (``results.csv``, ``summary.json``)."""
        return self.root / "predict" / batch_id

    @staticmethod
    def served_mask(series: str) -> str:
        """Where a results folder (beside its ``results.csv``, which names it in ``segmenter_mask``)
        keeps the mask the segmenter served for `series` (the gate's pseudonym)."""
        return f"segments/{series}.npz"

    def result_tables(self) -> list[Path]:
        """Every ``results.csv`` the platform wrote: batches, the online service (``predict/``) and
        pacs-watch (``pacs/predict/``, under the one folder it holds), oldest first."""
        found = [*(self.root / "predict").glob("*/results.csv"), *(self.root / "pacs" / "predict").glob("*/results.csv")]
        return sorted(found, key=lambda p: p.stat().st_mtime)

    serving = property(lambda self: self.root / "serving")  # the served models' exported files, by version

    batch_record = property(lambda self: self.root / "batch.json")
    drift = property(lambda self: self.root / "drift")

    @property
    def retrain_work(self) -> WorkLayout:
        return WorkLayout(self.root / "retrain" / "work")

    def relative(self, path: Path) -> str:
        """`path` relative to the work directory, as stage records list their outputs."""
        return str(Path(path).resolve().relative_to(self.root.resolve()))

    # -- shared files ------------------------------------------------------------------------

    def labelled_series(self) -> pd.DataFrame:
        """The preprocessed series that carry a label: what training splits and learns from."""
        index = self.preprocessed.read_index()
        labelled = index[index.label >= 0].reset_index(drop=True)
        if labelled.empty:
            raise ValueError(f"no labelled series in {self.preprocessed.index}; training needs labels.csv in the source")
        return labelled

    def read_folds(self) -> Folds:
        path = self.folds_file
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist; run 'dicomops train --work {self.root}' to make the split")
        doc = json.loads(path.read_text())
        return Folds(doc["folds"], int(doc.get("n_splits", len(doc["folds"]))), int(doc.get("seed", -1)),
                     hashlib.sha256(path.read_bytes()).hexdigest())

    def write_folds(self, folds: list[dict[str, list[str]]], n_splits: int, seed: int) -> Folds:
        io.write_json(self.folds_file, {"version": SPLIT_VERSION, "n_splits": n_splits, "seed": seed, "folds": folds})
        return self.read_folds()


def _read_parquet(path: Path, producer: str) -> pd.DataFrame:
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; run '{producer} --work {path.parent.parent}' first")
    return pd.read_parquet(path)
