"""Training speed: the loop's samples per second and the share of step time spent waiting for data,
with the automatic precision (bf16 autocast + channels-last on CPUs with native bf16, mixed
precision on CUDA) against float32 in the same run; the batched augmentation against MONAI's chain
one slab at a time (the same slabs bit for bit); one epoch without a DataLoader worker against one
with a worker process.

Reproduce: ``.venv/bin/python benchmarks/train.py --work work`` (after ``make run``: it trains
fold 0 of the demo's cross-validation for ``--epochs`` epochs, once per precision, and scores the
fold's validation slabs). Without ``--work`` it builds slabs from a small generated corpus.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from dicomops import ingest
from dicomops.config import IngestConfig, PreprocessConfig, SynthConfig, TrainConfig
from dicomops.layout import WorkLayout
from dicomops.preprocessing.stage import preprocess_corpus
from dicomops.synthetic import generate_corpus
from dicomops.training.augment import SEED_BOUND, SlabAugmentation
from dicomops.training.data import build_slab_set
from dicomops.training.loop import choose_precision, fit

KEY = b"train-benchmark-key-0123456789abcd"


def _fold0(work: Path, size: int) -> tuple:
    layout = WorkLayout(work)
    if layout.folds_file.exists():
        folds = layout.read_folds()
        train_ids, val_ids = folds.train(0), folds.val(0)
    else:
        ids = sorted(layout.labelled_series().SeriesInstanceUID)
        train_ids, val_ids = ids[: len(ids) * 3 // 4], ids[len(ids) * 3 // 4:]
    return (build_slab_set(layout, list(train_ids), 3, size), build_slab_set(layout, list(val_ids), 3, size))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, help="A work directory with preprocessed data (the demo's).")
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work if args.work and WorkLayout(args.work).preprocessed.index.exists() else None
        if work is None:
            work = Path(tmp) / "work"
            generate_corpus(Path(tmp) / "src", SynthConfig(patients=24, fault_rate=0.0, workers=2))
            ingest.run(Path(tmp) / "src", work, IngestConfig(workers=2), KEY)
            preprocess_corpus(work, PreprocessConfig(workers=2))
        base = TrainConfig(epochs=args.epochs)
        train, val = _fold0(work, base.input_size)
        print(f"fold 0: {len(train.y)} training slabs, {len(val.y)} validation slabs, {args.epochs} epochs, "
              f"{base.architecture} at {base.input_size}x{base.input_size}")
        results = {}
        for setting in ("fp32", "auto"):
            cfg = base.model_copy(update={"precision": setting})
            start = time.perf_counter()
            result = fit(train, val, cfg, Path(tmp) / f"{setting}.pt", seed=0)
            seconds = time.perf_counter() - start
            history = result.history
            results[setting] = {"seconds": seconds,
                                "samples_per_second": float(np.mean([h["samples_per_second"] for h in history])),
                                "data_wait_share": float(np.mean([h["data_wait_share"] for h in history])),
                                "val_slice_auc": result.best_auc}
            r = results[setting]
            # Without a worker process (the CPU default) the share is the augmentation's own work on the
            # cores the step uses; the 15 % is about a loader starving the compute beside it.
            print(f"  {choose_precision(setting).name:10s} {r['samples_per_second']:6.0f} samples/s, data wait "
                  f"{r['data_wait_share']:.1%} of step time (target < 15% with workers), {seconds:5.1f} s, "
                  f"validation slice AUC {r['val_slice_auc']:.3f}")
        ratio = results["auto"]["samples_per_second"] / results["fp32"]["samples_per_second"]
        print(f"automatic precision: {ratio:.2f}x the float32 throughput")
        augmentation(train.x[: 32 * 8])
        for workers in (1, 0, 1, 0):
            cfg = base.model_copy(update={"num_workers": workers})
            start = time.perf_counter()
            fit(train, None, cfg, Path(tmp) / f"workers-{workers}-{time.time_ns()}.pt", seed=0, epochs=1)
            print(f"  one epoch with {workers} DataLoader worker process(es): {time.perf_counter() - start:5.1f} s")


def augmentation(slabs: torch.Tensor, batch: int = 32) -> None:
    """Milliseconds per slab: MONAI's chain on each slab (as a Dataset item) against the batch at once."""
    aug = SlabAugmentation()
    seeds = [int(s) for s in torch.randint(SEED_BOUND, (len(slabs),), generator=torch.Generator().manual_seed(0))]
    chunks = [(slabs[i:i + batch], seeds[i:i + batch]) for i in range(0, len(slabs), batch)]
    times: dict[str, list[float]] = {"chain": [], "batch": []}
    for _ in range(3):  # alternated
        start = time.perf_counter()
        alone = [torch.stack([aug(x.float(), s) for x, s in zip(xs, ss, strict=True)]) for xs, ss in chunks]
        times["chain"].append(time.perf_counter() - start)
        start = time.perf_counter()
        together = [aug.batch(xs, ss) for xs, ss in chunks]
        times["batch"].append(time.perf_counter() - start)
    same = all(torch.equal(a, b) for a, b in zip(alone, together, strict=True))
    chain, batched = (float(np.median(times[k])) * 1e3 / len(slabs) for k in ("chain", "batch"))
    print(f"augmentation of {len(slabs)} slabs, median of 3: MONAI's chain {chain:.2f} ms a slab, batched "
          f"{batched:.2f} ms ({chain / batched:.2f}x), the same slabs bit for bit: {same}")


if __name__ == "__main__":
    main()
