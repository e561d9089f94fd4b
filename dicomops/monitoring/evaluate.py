"""Detection quality of the drift monitor on the generator's scenarios: how often it raises a false
alarm on same-distribution batches, how often it detects each shift, and from which batch size on.

The gate, de-identification and preprocessing are the library calls the flows make (no Prefect, so
a benchmark of a few hundred batches is not dominated by orchestration). Each batch's series are
featurised once; smaller batches are the first n series of the same batches.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch

from dicomops import ingest
from dicomops.config import MonitorConfig, PipelineConfig, SynthConfig
from dicomops.errors import GateFailedError
from dicomops.layout import WorkLayout
from dicomops.monitoring.drift import compare, quarantine_check
from dicomops.monitoring.features import feature_table
from dicomops.preprocessing.stage import preprocess_corpus
from dicomops.synthetic import generate_corpus


def ingest_and_preprocess(src: Path, work: Path, cfg: PipelineConfig, key: bytes) -> tuple[int, int]:
    """The ingest gate and preprocessing of one corpus; returns (quarantined files, files)."""
    try:
        gate = ingest.run(src, work, cfg.ingest, key)
    except GateFailedError:
        summary = pd.read_json(WorkLayout(work).ingest.summary, typ="series")
        return int(summary["quarantined_files"]), int(summary["files"])
    preprocess_corpus(work, cfg.preprocess)
    return gate.quarantined_files, gate.accepted_files + gate.quarantined_files


@dataclass
class Batch:
    scenario: str
    seed: int
    features: pd.DataFrame
    quarantined: int
    files: int


def featurise_batches(root: Path, scenario: str, seeds: list[int], patients: int, synth: SynthConfig,
                      cfg: PipelineConfig, key: bytes, model: torch.nn.Module, k: int, size: int, top_k: int,
                      progress: Callable[[str], None] = print) -> list[Batch]:
    out = []
    for seed in seeds:
        src, work = root / f"{scenario}-{seed}" / "src", root / f"{scenario}-{seed}" / "work"
        generate_corpus(src, synth.model_copy(update={"patients": patients, "seed": seed, "scenario": scenario}))
        quarantined, files = ingest_and_preprocess(src, work, cfg, key)
        table = feature_table(work, model, k, size, top_k) if WorkLayout(work).preprocessed.root.exists() else pd.DataFrame()
        out.append(Batch(scenario, seed, table, quarantined, files))
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
    """Run the monitor's comparison on the first `batch_size` series of every batch."""
    rates = Rates(batches[0].scenario, batch_size, len(batches), 0, 0.0)
    elapsed = 0.0
    for batch in batches:
        start = time.perf_counter()
        current = batch.features.head(batch_size).reset_index(drop=True)
        check = quarantine_check(reference_quarantine_share, batch.quarantined, batch.files, cfg)
        summary = compare(reference, current, cfg, scratch / f"{batch.scenario}-{batch.seed}-{batch_size}", check)
        elapsed += time.perf_counter() - start
        if summary.drift:
            rates.drift += 1
            for column in summary.drifted_columns:
                rates.moved[column] = rates.moved.get(column, 0) + 1
    rates.seconds_per_run = elapsed / max(len(batches), 1)
    return rates
