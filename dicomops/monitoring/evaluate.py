"""Detection quality of the drift monitor on the generator's scenarios: how often it raises a false
alarm on same-distribution batches, how often it detects each shift, and from which batch size on.

The gate, de-identification and preprocessing are the library calls the flows make (no Prefect, so
a benchmark of a few hundred batches is not dominated by orchestration). Each batch's series are
featurised once; smaller batches are the first n series of the same batches, and their quarantine
test counts the files of those n series (:meth:`Batch.counts`), not the whole batch's: a batch cut
to series of the reference distribution must not be credited with the quarantined files of the
series it left out.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch

from dicomops import ingest, io
from dicomops.config import MonitorConfig, PipelineConfig, SynthConfig
from dicomops.errors import GateFailedError
from dicomops.layout import WorkLayout
from dicomops.monitoring.drift import compare, quarantine_check
from dicomops.monitoring.features import feature_table
from dicomops.preprocessing.stage import preprocess_corpus
from dicomops.synthetic import generate_corpus
from dicomops.training.scoring import SeriesRule


def ingest_and_preprocess(src: Path, work: Path, cfg: PipelineConfig, key: bytes) -> tuple[int, int]:
    """The ingest gate and preprocessing of one corpus; returns (quarantined files, files)."""
    try:
        gate = ingest.run(src, work, cfg.ingest, key)
    except GateFailedError:
        summary = pd.read_json(WorkLayout(work).ingest.summary, typ="series")
        return int(summary["quarantined_files"]), int(summary["files"])
    preprocess_corpus(work, cfg.preprocess)
    return gate.quarantined_files, gate.accepted_files + gate.quarantined_files


def series_file_counts(work: Path, series: list[str]) -> tuple[list[int], list[int]]:
    """(files, quarantined files) of each of `series` (the gate's, keyed UIDs), in that order.

    A quarantined file is a series' when its header was read (``index.parquet`` names its series);
    an unreadable one belongs to no series.
    """
    paths = WorkLayout(work).ingest
    index = pd.read_parquet(paths.index, columns=["source_path", "SeriesInstanceUID"])
    quarantine = io.read_table(paths.quarantine) if paths.quarantine.exists() else \
        pd.DataFrame({"source_path": pd.Series(dtype=str)})
    of_series = index.SeriesInstanceUID.astype(str)
    files = of_series.value_counts()
    quarantined = of_series[index.source_path.isin(set(quarantine.source_path))].value_counts()
    return ([int(files.get(uid, 0)) for uid in series], [int(quarantined.get(uid, 0)) for uid in series])


@dataclass
class Batch:
    """One batch's featurised series (one row each, in :func:`feature_table`'s order) and its gate's
    file counts: all of them, and where known those of each featurised series (``series_files``,
    ``series_quarantined``, aligned with the rows of `features`)."""

    scenario: str
    seed: int
    features: pd.DataFrame
    quarantined: int
    files: int
    series_files: list[int] = field(default_factory=list)
    series_quarantined: list[int] = field(default_factory=list)

    def counts(self, n: int) -> tuple[int, int]:
        """(quarantined files, files) of the batch cut to its first `n` series.

        The files of those series, counted; the batch's files that belong to no featurised series
        (unreadable files, series quarantined whole) in proportion, n of the featurised series. A
        batch without per-series counts is scaled whole, n / series.
        """
        series = len(self.features)
        if n >= series:
            return self.quarantined, self.files
        known = len(self.series_files) == series and len(self.series_quarantined) == series
        quarantined = sum(self.series_quarantined[:n]) if known else 0
        files = sum(self.series_files[:n]) if known else 0
        rest_quarantined = max(self.quarantined - (sum(self.series_quarantined) if known else 0), 0)
        rest_files = max(self.files - (sum(self.series_files) if known else 0), 0)
        share = max(n, 0) / series
        return quarantined + round(rest_quarantined * share), files + round(rest_files * share)


def featurise_batches(root: Path, scenario: str, seeds: list[int], patients: int, synth: SynthConfig,
                      cfg: PipelineConfig, key: bytes, model: torch.nn.Module, k: int, size: int, rule: SeriesRule,
                      progress: Callable[[str], None] = print) -> list[Batch]:
    out = []
    for seed in seeds:
        src, work = root / f"{scenario}-{seed}" / "src", root / f"{scenario}-{seed}" / "work"
        generate_corpus(src, synth.model_copy(update={"patients": patients, "seed": seed, "scenario": scenario}))
        quarantined, files = ingest_and_preprocess(src, work, cfg, key)
        pre = WorkLayout(work).preprocessed
        table = feature_table(work, model, k, size, rule) if pre.root.exists() else pd.DataFrame()
        # feature_table's rows are the preprocessed series sorted by UID (it keeps no identifier).
        uids = sorted(pre.read_features().SeriesInstanceUID.astype(str)) if len(table) else []
        per_files, per_quarantined = series_file_counts(work, uids) if uids else ([], [])
        out.append(Batch(scenario, seed, table, quarantined, files, per_files, per_quarantined))
        progress(f"{scenario} seed {seed}: {len(table)} series featurised")
    return out


@dataclass
class Rates:
    scenario: str
    batch_size: int
    batches: int
    drift: int
    seconds_per_run: float
    moved: dict[str, int] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.drift / max(self.batches, 1)


def detection(reference: pd.DataFrame, batches: list[Batch], batch_size: int, cfg: MonitorConfig,
              reference_quarantine_share: float, scratch: Path) -> Rates:
    """Run the monitor's comparison on the first `batch_size` series of every batch, and the
    quarantine test on those series' files (:meth:`Batch.counts`)."""
    rates = Rates(batches[0].scenario, batch_size, len(batches), 0, 0.0)
    elapsed = 0.0
    for batch in batches:
        start = time.perf_counter()
        current = batch.features.head(batch_size).reset_index(drop=True)
        quarantined, files = batch.counts(batch_size)
        check = quarantine_check(reference_quarantine_share, quarantined, files, cfg)
        summary = compare(reference, current, cfg, scratch / f"{batch.scenario}-{batch.seed}-{batch_size}", check)
        elapsed += time.perf_counter() - start
        if summary.drift:
            rates.drift += 1
            for column in summary.drifted_columns:
                rates.moved[column] = rates.moved.get(column, 0) + 1
    rates.seconds_per_run = elapsed / max(len(batches), 1)
    return rates
