"""Header indexing speed of the ingest gate against a plain pydicom loop, in one run.

Reproduce: ``.venv/bin/python benchmarks/ingest.py`` (``--patients 16 --matrix 512 --slices 60``).
Baseline: ``pydicom.dcmread`` + ``.pixel_array`` per file in one process, the loop most pipelines
start from. dicomops: ``ingest.index_headers`` (safe header read, checks, de-identified rows) on
all cores, worker start-up included; printed for the first call in the process (which also
imports pyarrow) and for a warm one. Both read the same freshly written (page-cached) 512×512 CT
files.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import pydicom

from dicomops import ingest
from dicomops.config import IngestConfig, SynthConfig
from dicomops.dicom.reader import list_files
from dicomops.synthetic import generate_corpus


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--patients", type=int, default=16)
    parser.add_argument("--matrix", type=int, default=512)
    parser.add_argument("--slices", type=int, default=60)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="dicomops-bench-ingest-"))
    try:
        src = root / "corpus"
        generate_corpus(src, SynthConfig(patients=args.patients, matrix=args.matrix, slices=args.slices,
                                         fault_rate=0.0, workers=args.workers))
        files = [f for f, rel in list_files(src) if rel.startswith("case-")]
        start = time.perf_counter()
        for f in files:
            pydicom.dcmread(f).pixel_array  # noqa: B018
        baseline = time.perf_counter() - start
        cfg = IngestConfig(workers=args.workers)
        key = b"benchmark-key-0123456789abcdef01"
        start = time.perf_counter()
        ingest.index_headers(src, root / "work", cfg, key)
        first = time.perf_counter() - start  # includes importing pyarrow on first write
        start = time.perf_counter()
        ingest.index_headers(src, root / "work", cfg, key)
        ours = time.perf_counter() - start
    finally:
        shutil.rmtree(root, ignore_errors=True)
    n = len(files)
    print(f"{n} files, {args.matrix}x{args.matrix}, {args.workers} workers")
    print(f"{'method':<44}{'seconds':>9}{'files/s':>10}")
    print(f"{'baseline: dcmread + pixel_array, 1 process':<44}{baseline:>9.2f}{n / baseline:>10.0f}")
    print(f"{'dicomops: safe header index, first call':<44}{first:>9.2f}{n / first:>10.0f}")
    print(f"{'dicomops: safe header index, warm process':<44}{ours:>9.2f}{n / ours:>10.0f}")
    print(f"speed-up {baseline / ours:.1f}x (target >= 4x); {n / ours:.0f} files/s (target >= 1500)")


if __name__ == "__main__":
    main()
