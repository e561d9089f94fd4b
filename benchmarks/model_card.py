"""Cost and agreement of the model card's AUC interval against scipy's bootstrap.

Reproduce: ``.venv/bin/python benchmarks/model_card.py``.

The card shows, per vendor, the pooled out-of-fold AUC with a stratified percentile-bootstrap 95 %
interval (2,000 resamples). :func:`dicomops.training.metrics.auc_confidence_interval` computes the
resamples from one comparison matrix weighted by draw counts; the baseline is
``scipy.stats.bootstrap`` over the two classes (so it is stratified too) with sklearn's
``roc_auc_score`` as the statistic, measured in the same run on the same scores. Sizes: a vendor
(30 series), the demo (120) and a hospital batch (1,000).
"""

from __future__ import annotations

import time

import numpy as np
from scipy.stats import bootstrap
from sklearn.metrics import roc_auc_score

from dicomops.training.metrics import auc_confidence_interval

RESAMPLES = 2000


def scipy_interval(y: np.ndarray, s: np.ndarray) -> tuple[float, float]:
    pos, neg = s[y == 1], s[y == 0]
    res = bootstrap((pos, neg), lambda p, n: roc_auc_score(np.r_[np.ones(len(p)), np.zeros(len(n))], np.r_[p, n]),
                    paired=False, vectorized=False, n_resamples=RESAMPLES, method="percentile", random_state=0)
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def main() -> None:
    rng = np.random.default_rng(7)
    print(f"{'series':>7} {'ours s':>8} {'scipy s':>8} {'speed-up':>9}  {'ours CI':>15} {'scipy CI':>15}")
    for n in (30, 120, 1000):
        y = rng.integers(0, 2, n)
        s = y * 1.2 + rng.normal(size=n)
        start = time.perf_counter()
        ours = auc_confidence_interval(y, s, n_boot=RESAMPLES)
        t_ours = time.perf_counter() - start
        start = time.perf_counter()
        ref = scipy_interval(y, s)
        t_ref = time.perf_counter() - start
        print(f"{n:>7} {t_ours:>8.3f} {t_ref:>8.3f} {t_ref / t_ours:>8.0f}x  {ours[0]:.3f}–{ours[1]:.3f}    "
              f"{ref[0]:.3f}–{ref[1]:.3f}")


if __name__ == "__main__":
    main()
