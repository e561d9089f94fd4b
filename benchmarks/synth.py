"""Synthetic corpus generator: wall time for the demo corpus, and parallel speed-up in one run.

Reproduce: ``.venv/bin/python benchmarks/synth.py`` (``--patients 120 --matrix 256 --slices 60``).
The baseline is the same generator on one process over a quarter of the patients, measured in
the same run, so the ratio is the parallel speed-up on this machine.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

from dicomops.config import SynthConfig
from dicomops.synthetic import generate_corpus


def _timed(out: Path, cfg: SynthConfig) -> tuple[float, int]:
    start = time.perf_counter()
    summary = generate_corpus(out, cfg)
    return time.perf_counter() - start, summary.files


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--patients", type=int, default=120)
    parser.add_argument("--matrix", type=int, default=256)
    parser.add_argument("--slices", type=int, default=60)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    args = parser.parse_args()
    base = SynthConfig(patients=max(args.patients // 4, 1), matrix=args.matrix, slices=args.slices,
                       workers=1, fault_rate=0.05)
    full = base.model_copy(update={"patients": args.patients, "workers": args.workers})
    root = Path(tempfile.mkdtemp(prefix="dicomops-bench-"))
    try:
        t1, f1 = _timed(root / "one", base)
        tn, fn = _timed(root / "many", full)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    s1, sn = base.patients / t1, full.patients / tn
    print(f"{'run':<28}{'series':>8}{'files':>8}{'seconds':>10}{'series/s':>10}{'files/s':>10}")
    print(f"{'baseline: 1 process':<28}{base.patients:>8}{f1:>8}{t1:>10.1f}{s1:>10.2f}{f1 / t1:>10.0f}")
    print(f"{f'dicomops: {args.workers} processes':<28}{full.patients:>8}{fn:>8}{tn:>10.1f}{sn:>10.2f}{fn / tn:>10.0f}")
    print(f"speed-up (series/s) {sn / s1:.2f}x; demo corpus in {tn:.1f} s (target < 60 s)")


if __name__ == "__main__":
    main()
