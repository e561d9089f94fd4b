"""The export's INT8 check on what is served, the series score: INT8 that keeps every slab's AUC
but moves the log-odds of confident negative slabs changes the ranking of series under the
classifier's ``top_k_contrast`` rule, which the slab check cannot see (found on the demo's
classifier, 2026-12-07: slab AUC drop −0.0005, series AUC 0.991 → 0.842)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from dicomops.export import quantize
from dicomops.training.scoring import SeriesRule, series_score

CONTRAST = SeriesRule(3, "top_k_contrast")


def _series() -> tuple[dict[str, tuple[np.ndarray, int]], dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Six series of 40 slabs: the FP32 probabilities, and INT8's, equal on each series' top slabs
    but pushed to 0 on the confident negative slabs of the negative series."""
    rng = np.random.default_rng(0)
    series, p32, p8 = {}, {}, {}
    for i in range(6):
        label = i % 2
        p = 1 / (1 + np.exp(-rng.normal(-6.0, 1.0, 40)))
        p[:3] = 1 / (1 + np.exp(-np.array([2.0, 1.5, 1.0]) - 2.0 * label))  # the top slabs
        q = p.copy()
        if label == 0:
            q[3:] = 1e-9  # below float32's clip: log-odds −16, as ONNX Runtime's INT8 gave there
        series[f"s{i}"] = (np.full((40, 1), float(i), np.float32), label)
        p32[f"s{i}"], p8[f"s{i}"] = p, q
    return series, p32, p8


def test_int8_that_keeps_the_slabs_but_moves_the_series_fails_and_says_what_to_do(
        monkeypatch: pytest.MonkeyPatch) -> None:
    series, p32, p8 = _series()
    by_file = {Path("fp32.onnx"): p32, Path("int8.onnx"): p8}
    monkeypatch.setattr(quantize, "session", lambda path, threads=2: by_file[Path(path)])

    def run(probabilities: dict[str, np.ndarray], slabs: np.ndarray) -> np.ndarray:
        p = probabilities[f"s{int(slabs[0, 0])}"]
        return np.stack([1 - p, p], axis=1)

    monkeypatch.setattr(quantize, "run_onnx", run)
    labels = np.concatenate([[label] * 40 for _, label in series.values()])
    slab_auc = [roc_auc_score(labels, np.concatenate(list(p.values()))) for p in (p32, p8)]
    assert slab_auc[1] >= slab_auc[0] - 0.01  # the slab check passes

    check = quantize.check_int8_series(Path("fp32.onnx"), Path("int8.onnx"), series,
                                       lambda p: series_score(p, CONTRAST), tolerance=0.01)
    assert check.samples == 6 and check.auc_fp32 == 1.0 and check.auc_int8 < 0.5 and not check.ok
    scores = {k: (series_score(p32[k], CONTRAST), series_score(p8[k], CONTRAST)) for k in series}
    assert check.max_abs_diff == pytest.approx(max(abs(a - b) for a, b in scores.values()))
    verdict = check.verdict()
    assert verdict.startswith("failed: series AUC 1.0000 -> ") and "--int8 qat" in verdict
    assert quantize.int8_refusal({quantize.SERIES_CHECK_TAG: verdict}) == verdict

    same = quantize.check_int8_series(Path("fp32.onnx"), Path("fp32.onnx"), series,
                                      lambda p: series_score(p, CONTRAST), tolerance=0.01)
    assert same.ok and same.max_abs_diff == 0.0 and same.verdict().startswith("passed: ")
    assert quantize.int8_refusal({quantize.SERIES_CHECK_TAG: same.verdict()}) is None
    assert quantize.int8_refusal({}) is None  # exported before the check: served as before


def test_the_series_check_needs_both_classes(monkeypatch: Any) -> None:
    series, _, _ = _series()
    with pytest.raises(ValueError, match="both classes"):
        quantize.check_int8_series(Path("a"), Path("b"), {k: v for k, v in series.items() if v[1] == 1},
                                   lambda p: 0.0, 0.01)
