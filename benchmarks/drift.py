"""Detection quality and cost of the drift monitor, on the generator's scenarios with fresh seeds.

Reproduce: ``.venv/bin/python benchmarks/drift.py`` (``--quick`` for a few batches).

A reference corpus (baseline, the demo's seed) is ingested and preprocessed, a small classifier is
trained on it, and its reference feature table built exactly as training stores it. Then batches
of ``--batch-size`` series from other seeds go through the same gate, preprocessing and features:
20 ``baseline-new`` batches (false alarms: target at most 5%) and 10 each of ``new-vendor``,
``protocol-shift`` and ``low-dose`` (detection: target at least 95%). For each shift it also prints
the smallest batch size from which detection stays at or above 95% (the decision's ``min_series``
guard is lifted for that sweep), and the time one comparison takes. Baseline: the same decision
with Evidently's defaults (Wasserstein distance 0.1 for numerical columns, Jensen–Shannon 0.1 for
categorical ones, drift share 0.5), measured on the same batches.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from dicomops.config import (
    IngestConfig,
    MonitorConfig,
    PipelineConfig,
    PreprocessConfig,
    SynthConfig,
    TrainConfig,
)
from dicomops.layout import WorkLayout
from dicomops.monitoring.evaluate import Batch, detection, featurise_batches, ingest_and_preprocess
from dicomops.monitoring.reference import build_reference
from dicomops.training.data import build_slab_set
from dicomops.training.loop import fit
from dicomops.training.scoring import SeriesRule

KEY = b"drift-benchmark-key-0123456789abcd"
SHIFTS = ("new-vendor", "protocol-shift", "low-dose")


def _reference(root: Path, patients: int, synth: SynthConfig, cfg: PipelineConfig, train: TrainConfig) -> tuple:
    src, work = root / "reference" / "src", root / "reference" / "work"
    from dicomops.synthetic import generate_corpus

    generate_corpus(src, synth.model_copy(update={"patients": patients}))
    quarantined, files = ingest_and_preprocess(src, work, cfg, KEY)
    layout = WorkLayout(work)
    k = cfg.preprocess.slab_slices
    data = build_slab_set(layout, list(layout.labelled_series().SeriesInstanceUID), k, train.input_size)
    model = fit(data, None, train, root / "reference" / "checkpoint.pt", seed=0).model.eval()
    return build_reference(work, model, k, train.input_size, SeriesRule.of(train)), model, quarantined / max(files, 1)


def _evidently_defaults(cfg: MonitorConfig) -> MonitorConfig:
    """The comparison baseline: Evidently's default distance tests and share, no critical columns."""
    return cfg.model_copy(update={"numeric_test": "wasserstein", "categorical_test": "jensenshannon",
                                  "distance_threshold": 0.1, "critical_columns": (), "drift_share": 0.5})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference", type=int, default=120, help="Series in the reference corpus.")
    parser.add_argument("--batch-size", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="3 baseline-new and 3 per shift.")
    args = parser.parse_args()
    torch.set_num_threads(2)
    # One process per stage: for batches of 20 series, spawning worker pools (each re-imports torch)
    # would cost more than the work.
    synth = SynthConfig(patients=args.reference, fault_rate=0.0, matrix=128, slices=24, workers=1)
    cfg = PipelineConfig(ingest=IngestConfig(workers=1), preprocess=PreprocessConfig(workers=1, crop_xy=320))
    train = TrainConfig(epochs=2, input_size=64, batch_size=32, num_workers=0)
    monitor = MonitorConfig()
    n_same, n_shift = (3, 3) if args.quick else (20, 10)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        start = time.perf_counter()
        reference, model, ref_share = _reference(root, args.reference, synth, cfg, train)
        print(f"reference: {len(reference)} series, model trained, {time.perf_counter() - start:.0f} s", flush=True)
        k, size, rule = cfg.preprocess.slab_slices, train.input_size, SeriesRule.of(train)
        batches: dict[str, list[Batch]] = {}
        for scenario, count, first_seed in (("baseline-new", n_same, 1000), *((s, n_shift, 2000) for s in SHIFTS)):
            seeds = [first_seed + i for i in range(count)]
            start = time.perf_counter()
            batches[scenario] = featurise_batches(root / "batches", scenario, seeds, args.batch_size, synth, cfg, KEY,
                                                  model, k, size, rule, progress=lambda _m: None)
            print(f"featurised {count} {scenario} batches of {args.batch_size} series (generate, gate, "
                  f"de-identify, preprocess, score): {(time.perf_counter() - start) / count:.1f} s per batch",
                  flush=True)
        scratch = root / "reports"
        print(f"\nbatch size {args.batch_size}; decision: KS/chi-square p<{monitor.column_p_value}, critical "
              f"p<{monitor.critical_p_value} ({', '.join(monitor.critical_columns)}), share >= {monitor.drift_share}")
        rows = []
        for name, config in (("dicomops", monitor), ("evidently defaults", _evidently_defaults(monitor))):
            for scenario, group in batches.items():
                r = detection(reference, group, args.batch_size, config, ref_share, scratch / name.replace(" ", "-"))
                rows.append((name, scenario, r))
        for name, scenario, r in rows:
            kind = "false alarms" if scenario == "baseline-new" else "detected"
            target = "target <= 5%" if scenario == "baseline-new" else "target >= 95%"
            top = ", ".join(f"{c} {n}" for c, n in sorted(r.moved.items(), key=lambda kv: -kv[1])[:4])
            print(f"  {name:18s} {scenario:15s} {kind:12s} {r.drift:2d}/{r.batches} = {r.rate:5.0%} ({target}); "
                  f"{r.seconds_per_run:.2f} s per comparison; moved most: {top or '-'}")
        print("\nsmallest batch size with detection >= 95% (min_series lifted):")
        sweep = monitor.model_copy(update={"min_series": 2})
        for scenario in SHIFTS:
            found = None
            for n in (3, 4, 6, 8, 12, 16, args.batch_size):
                if n > args.batch_size:
                    break
                r = detection(reference, batches[scenario], n, sweep, ref_share, scratch / "sweep")
                if r.rate >= 0.95:
                    found = n
                    break
            print(f"  {scenario:15s} {found if found else f'> {args.batch_size}'} series")
        same = detection(reference, batches["baseline-new"], 3, sweep, ref_share, scratch / "sweep")
        print(f"  (false alarms of baseline-new at 3 series: {same.drift}/{same.batches})")
        one = np.mean([r.seconds_per_run for _, _, r in rows])
        print(f"\none monitoring comparison (Evidently report + decision): {one:.2f} s on {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
