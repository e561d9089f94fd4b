"""Released statistics: what differential privacy costs in time and in accuracy.

For cohorts of 1k, 10k and 100k series (a patient each; vendors, sites, months, age bands and sexes
drawn with a long tail so some cells are small), the gate's four tables are released with OpenDP
(``count_by`` + ``laplace_threshold``, :mod:`dicomops.feedback.privacy`) and, in the same run, the
baseline it replaces: exact counts by pandas ``groupby``, and the naive mechanism a hand-written
release would use (numpy Laplace noise on those counts, no threshold: neither floating-point safe
nor safe for rare categories). Printed per size: time of each and the ratio, the mean absolute error
of released cells against the exact counts, and the share of cells (and of series in them)
suppressed.

Reproduce::

    .venv/bin/python benchmarks/privacy.py
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from dicomops.config import PrivacyConfig
from dicomops.feedback import privacy


def cohort(n: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)

    def tail(k: int, name: str) -> np.ndarray:
        weights = 1 / np.arange(1, k + 1) ** 1.5
        return rng.choice([f"{name}{i}" for i in range(k)], size=n, p=weights / weights.sum())

    return pd.DataFrame({"patient": [f"PX-{i}" for i in range(n)], "series": [f"2.25.{i}" for i in range(n)],
                         "vendor": tail(8, "v"), "site": tail(40, "s"), "month": tail(36, "m"),
                         "age_band": tail(10, "a"), "sex": rng.choice(["F", "M"], size=n)})


def main() -> None:
    cfg = PrivacyConfig(budget_epsilon=1e9, budget_delta=0.5)
    print(f"{'series':>8} {'opendp s':>9} {'pandas+numpy s':>15} {'ratio':>6} {'MAE':>6} {'naive MAE':>9} "
          f"{'cells supp.':>11} {'series supp.':>12}")
    for n in (1_000, 10_000, 100_000):
        rows = cohort(n)
        with tempfile.TemporaryDirectory() as tmp:
            ledger = privacy.PrivacyLedger(Path(tmp) / "ledger.json")
            privacy.calibrate(cfg)  # the calibration is cached per setting: not part of a release
            t0 = time.perf_counter()
            released = [privacy.release_counts(rows, by, cfg, ledger, f"d{n}") for by in cfg.releases]
            t_dp = time.perf_counter() - t0
        rng = np.random.default_rng(1)
        t0 = time.perf_counter()
        exact_counts = [rows.groupby(list(by)).size() for by in cfg.releases]
        naive = [c + rng.laplace(0, cfg.max_series_per_patient / cfg.epsilon, size=len(c)) for c in exact_counts]
        t_base = time.perf_counter() - t0
        errors, naive_errors, cells, supp_cells, supp_series = [], [], 0, 0, 0
        for release, noisy in zip(released, naive, strict=True):
            exact = rows.groupby(list(release.by)).size()
            kept = release.table.set_index(list(release.by))["count"]
            errors.extend(np.abs(kept - exact.loc[kept.index]).tolist())
            naive_errors.extend(np.abs(noisy - exact).tolist())
            cells += len(exact)
            supp_cells += len(exact) - len(kept)
            supp_series += int(exact.drop(kept.index).sum())
        print(f"{n:>8} {t_dp:>9.3f} {t_base:>15.3f} {t_dp / t_base:>6.1f} {np.mean(errors):>6.2f} "
              f"{np.mean(naive_errors):>9.2f} {supp_cells / cells:>11.1%} {supp_series / (n * len(released)):>12.2%}")


if __name__ == "__main__":
    main()
