"""Preprocessing speed and memory, each against a baseline measured in the same run.

Reproduce: ``.venv/bin/python benchmarks/preprocess.py`` (``--patients 24``).

1. Resampling a 512×512×100 float32 CT (0.7 × 0.7 × 2.5 mm) to 1 mm on one thread: MONAI
   ``Spacing`` (bilinear) against ``FastSpacing`` (same output grid), with the mean absolute
   difference in HU.
2. End to end on an ingested synthetic corpus: a naive loader (per-file ``dcmread``, ``np.stack``,
   HU, ``scipy.ndimage.zoom`` order 1 to 1 mm) in one process against ``preprocess_corpus`` (HU,
   RAS, 1 mm, window, crop, features, compressed cache) on all cores, from a cold cache.
3. Peak memory of one worker preprocessing the largest series, against that series' 1 mm float32
   volume.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import torch
from monai.data import MetaTensor
from monai.transforms import Spacing
from scipy import ndimage

from dicomops import ingest
from dicomops.config import IngestConfig, PreprocessConfig, SynthConfig
from dicomops.layout import WorkLayout
from dicomops.preprocessing.stage import preprocess_corpus
from dicomops.preprocessing.transforms import FastSpacing
from dicomops.synthetic import generate_corpus

KEY = b"benchmark-key-0123456789abcdef012"


def resampling() -> None:
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    volume = ndimage.gaussian_filter(rng.normal(size=(512, 512, 100)).astype(np.float32), 1.5) * 800 - 300
    affine = np.diag([0.7, 0.7, 2.5, 1.0])
    img = MetaTensor(torch.from_numpy(volume)[None], affine=torch.as_tensor(affine))
    start = time.perf_counter()
    ref = Spacing(pixdim=(1.0, 1.0, 1.0), mode="bilinear")(img)
    t_monai = time.perf_counter() - start
    start = time.perf_counter()
    ours = FastSpacing((1.0, 1.0, 1.0))(img)
    t_ours = time.perf_counter() - start
    diff = float((ours - ref.as_tensor()).abs().mean())
    print(f"1. resample 512x512x100 -> {tuple(ours.shape[1:])} at 1 mm, one thread")
    print(f"   MONAI Spacing {t_monai:.2f} s | FastSpacing {t_ours:.2f} s | speed-up {t_monai / t_ours:.1f}x "
          f"(target >= 5x) | mean |diff| {diff:.4f} HU (target < 1)")


def naive_series(files: list[Path]) -> np.ndarray:
    slices = [pydicom.dcmread(f) for f in files]
    slices.sort(key=lambda ds: float(ds.ImagePositionPatient[2]))
    first = slices[0]
    hu = np.stack([ds.pixel_array for ds in slices]).astype(np.float32)
    hu = hu * float(first.RescaleSlope) + float(first.RescaleIntercept)
    dz = abs(float(slices[1].ImagePositionPatient[2]) - float(first.ImagePositionPatient[2]))
    dy, dx = (float(v) for v in first.PixelSpacing)
    return ndimage.zoom(hu, (dz, dy, dx), order=1)


def end_to_end(patients: int, workers: int) -> None:
    root = Path(tempfile.mkdtemp(prefix="dicomops-bench-pre-"))
    try:
        src, work = root / "src", root / "work"
        generate_corpus(src, SynthConfig(patients=patients, fault_rate=0.0, workers=workers))
        ingest.run(src, work, IngestConfig(workers=workers), KEY)
        accepted = pd.read_parquet(work / "ingest/accepted.parquet")
        series = [[WorkLayout(work).ingest.deid / p for p in g.deid_path] for _, g in accepted.groupby("SeriesInstanceUID")]
        start = time.perf_counter()
        for files in series:
            naive_series(files)
        t_naive = time.perf_counter() - start
        start = time.perf_counter()
        preprocess_corpus(work, PreprocessConfig(workers=workers))
        t_ours = time.perf_counter() - start
        n = len(series)
        print(f"2. end to end, {n} series of {len(series[0])} slices at 256x256")
        print(f"   naive loop {t_naive:.1f} s ({n / t_naive:.2f} series/s) | dicomops {t_ours:.1f} s "
              f"({n / t_ours:.2f} series/s, {workers} workers) | throughput {t_naive / t_ours:.1f}x (target >= 2x)")
        largest = accepted.groupby("SeriesInstanceUID").slice_spacing.first().idxmax()
        memory(work, accepted[accepted.SeriesInstanceUID == largest])
    finally:
        shutil.rmtree(root, ignore_errors=True)


_PROBE = r"""
import gc, json, os, sys, threading, time
import numpy as np, pandas as pd
from dicomops.config import PreprocessConfig
from dicomops.preprocessing.stage import preprocess_one
from dicomops.preprocessing.volume import load_series

def rss_kb():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024

rows = pd.read_parquet(sys.argv[1])
args = (rows.to_dict("records"), sys.argv[2], "", PreprocessConfig().model_dump_json(), sys.argv[3])
preprocess_one(*args)  # warm-up: libraries and kernels loaded, as in a worker after its first series
gc.collect()
base, peak, running = rss_kb(), [0], [True]
def sample():
    while running[0]:
        peak[0] = max(peak[0], rss_kb())
        time.sleep(0.002)
t = threading.Thread(target=sample); t.start()
preprocess_one(*args)
running[0] = False; t.join()
v = load_series(rows, sys.argv[2])
extent = np.abs(np.diag(v.affine)[:3]) * np.array(v.hu.shape)
out_bytes = int(np.prod(np.ceil(extent))) * 4
print(json.dumps({"peak_kb": peak[0] - base, "out_kb": out_bytes // 1024}))
"""


def memory(work: Path, rows: pd.DataFrame) -> None:
    import json

    table = work / "largest.parquet"
    rows.to_parquet(table)
    out = subprocess.run([sys.executable, "-c", _PROBE, str(table), str(WorkLayout(work).ingest.deid), str(work / "probe.npz")],
                         capture_output=True, text=True, check=True)
    m = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"3. worker memory on the largest series (second series in the worker): peak RSS growth {m['peak_kb'] / 1024:.0f} MB, 1 mm float32 "
          f"volume {m['out_kb'] / 1024:.0f} MB, ratio {m['peak_kb'] / m['out_kb']:.1f}x (target <= 3x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--patients", type=int, default=24)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    args = parser.parse_args()
    resampling()
    end_to_end(args.patients, args.workers)


if __name__ == "__main__":
    main()
