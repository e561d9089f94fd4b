"""Readers' corrected segmentations: reading one into the pool's mask format, against highdicom's own
volume reader in the same run.

A CT series (512 × 512, 60 slices, written by the synthetic generator) gets a reader's SEG with three
nodules, as a viewer stores it (:func:`dicomops.feedback.seg.corrected_segmentation`). Timed, each
the best of five:

- ours: :func:`dicomops.feedback.seg.reader_mask` (highdicom's frames by source instance, then
  ``scipy.ndimage.label`` into nodule ids and one record per nodule, slices ordered by position);
- baseline: highdicom's ``Segmentation.get_volume(combine_segments=True)`` (its geometry-aware volume,
  no nodule ids, no records) then the same ``scipy.ndimage.label``.

Printed: both times, the ratio, and whether both find the same voxels and nodules.

Reproduce::

    .venv/bin/python benchmarks/feedback.py
"""

from __future__ import annotations

import tempfile
import time
from io import BytesIO
from pathlib import Path

import numpy as np
import pydicom

from dicomops.feedback.seg import corrected_segmentation, reader_mask
from dicomops.pacs.results import encode
from dicomops.synthetic.corpus import SeriesPlan, write_series


def _best(fn, repeat: int = 5) -> tuple[float, object]:  # type: ignore[no-untyped-def]
    best, out = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def main() -> None:
    import highdicom as hd
    from scipy import ndimage

    with tempfile.TemporaryDirectory() as tmp:
        plan = SeriesPlan(index=1, seed=17, scenario="baseline", vendor="siemens", label=0, nodule_count=0,
                          fault=None, fault_detail="", matrix=512, slices=60)
        write_series(plan, Path(tmp))
        files = sorted((Path(tmp) / plan.case / "series-1").iterdir())
        images = [pydicom.dcmread(f) for f in files]
        headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    frames = np.zeros((len(images), 512, 512), dtype=bool)
    order = np.argsort([float(i.ImagePositionPatient[2]) for i in images])
    for first, (row, col), size in ((10, (200, 300), 12), (30, (260, 150), 8), (48, (330, 340), 16)):
        for k in order[first:first + size // 2]:
            frames[k, row:row + size, col:col + size] = True
    seg = pydicom.dcmread(BytesIO(encode(corrected_segmentation(images, frames, "Lovelace^Ada"))))

    ours_s, drawn = _best(lambda: reader_mask(seg, headers))

    def baseline() -> tuple[np.ndarray, int]:
        volume = hd.seg.Segmentation.from_dataset(seg, copy=False).get_volume(combine_segments=True)
        return ndimage.label(volume.array > 0)

    base_s, (labels, count) = _best(baseline)
    same = int((drawn.mask > 0).sum()) == int((labels > 0).sum()) and len(drawn.nodules) == count  # type: ignore[union-attr]
    print(f"reader SEG over 60 slices of 512 x 512, {int(frames.sum())} voxels in 3 nodules")
    print(f"  dicomops reader_mask      {ours_s * 1000:8.1f} ms  (nodule ids, records, slice positions)")
    print(f"  highdicom get_volume+label {base_s * 1000:7.1f} ms  (labelled volume only)")
    print(f"  ratio ours / baseline     {ours_s / base_s:8.2f}x   same voxels and nodules: {same}")


if __name__ == "__main__":
    main()
