"""Released counts under differential privacy: the mechanism's spread, suppression, the ledger.

OpenDP draws its noise from the operating system's CSPRNG and cannot be seeded (a replayable noise
could be subtracted), so the statistical checks use enough draws that a correct mechanism fails them
with a probability far below 1e-6, while a wrong scale, a Gaussian in place of the Laplace, or no
noise at all fails them every time.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from dicomops import io
from dicomops.config import PrivacyConfig
from dicomops.feedback import privacy
from dicomops.feedback.privacy import PrivacyBudgetExceededError, PrivacyLedger
from dicomops.layout import WorkLayout


def _cohort(sizes: dict[str, int], per_patient: int = 1) -> pd.DataFrame:
    rows = []
    for vendor, n in sizes.items():
        for i in range(n):
            for s in range(per_patient):
                rows.append({"patient": f"PX-{vendor}-{i:04d}", "series": f"2.25.{vendor}{i}{s}", "vendor": vendor,
                             "site": "SI-A", "month": "2017-03", "age_band": "40-49", "sex": "F"})
    return pd.DataFrame(rows)


def test_age_bands_cohort_columns_and_the_contribution_bound() -> None:
    assert [privacy.age_band(v) for v in ("045Y", "009Y", "003M", "090Y", "102Y", "", "45", None)] == \
        ["40-49", "00-09", "00-09", "90+", "90+", "unknown", "unknown", "unknown"]
    instances = pd.DataFrame({
        "SeriesInstanceUID": ["s1", "s1", "s2", "s3"], "PatientID": ["PX-1", "PX-1", "PX-1", "PX-2"],
        "Manufacturer": ["GE", "GE", "SIEMENS", ""], "Site": ["SI-X", "SI-X", "SI-X", ""],
        "StudyDate": ["20170304", "20170304", "malformed", ""], "PatientAge": ["063Y", "063Y", "063Y", "091Y"],
        "PatientSex": ["F", "F", "f", "X"]})
    rows = privacy.cohort(instances)
    assert rows.to_dict("records") == [
        {"patient": "PX-1", "series": "s1", "vendor": "GE", "site": "SI-X", "month": "2017-03", "age_band": "60-69",
         "sex": "F"},
        {"patient": "PX-1", "series": "s2", "vendor": "SIEMENS", "site": "SI-X", "month": "unknown",
         "age_band": "60-69", "sex": "F"},
        {"patient": "PX-2", "series": "s3", "vendor": "unknown", "site": "unknown", "month": "unknown",
         "age_band": "90+", "sex": "unknown"}]
    kept = privacy.bound_contributions(_cohort({"GE": 3}, per_patient=4), 2)
    assert kept.groupby("patient").size().tolist() == [2, 2, 2]


def test_calibration_is_opendps_privacy_map() -> None:
    scale, threshold, epsilon, delta = privacy.calibrate(PrivacyConfig(epsilon=0.5, delta=1e-7, min_cell=5))
    assert scale == 2.0 and epsilon == 0.5 and delta <= 1e-7
    # The threshold is the smallest that meets delta: one less does not.
    assert privacy._measurement(scale, threshold - 1).map(1)[1] > 1e-7
    # A contribution bound of 3 triples the scale at the same epsilon.
    assert privacy.calibrate(PrivacyConfig(epsilon=0.5, delta=1e-7, max_series_per_patient=3))[0] == 6.0
    # The configured smallest cell wins when it is the larger.
    assert privacy.calibrate(PrivacyConfig(min_cell=500))[1] == 500


def test_the_noise_is_the_discrete_laplace_at_the_calibrated_scale() -> None:
    scale, threshold, _, _ = privacy.calibrate(PrivacyConfig(epsilon=0.5))
    exact = {"a": 300, "b": 200, "c": 120}
    keys = [k for k, n in exact.items() for _ in range(n)]
    measurement = privacy._measurement(scale, threshold)
    noise = np.array([[out[k] - exact[k] for k in exact] for out in (measurement(keys) for _ in range(4000))]).ravel()
    # 12,000 draws of Laplace(b = 2) on the integers: P(0) = tanh(1 / 2b), variance 2b^2 (within 1e-3 here).
    assert abs(noise.mean()) < 0.15  # about 5.5 standard errors
    assert noise.var() == pytest.approx(2 * scale**2, rel=0.12)  # about 6 standard errors
    assert np.mean(noise == 0) == pytest.approx(math.tanh(1 / (2 * scale)), abs=0.025)  # about 6 standard errors
    assert np.all(noise == np.round(noise))


def test_releases_are_noisy_suppress_small_cells_and_are_reused_free(tmp_path: Path) -> None:
    # A threshold well above the rare cells: with the default one (14 here) a rare cell is released
    # by chance about once in 1,200 runs of this test.
    cfg = PrivacyConfig(epsilon=1.0, budget_epsilon=1000, budget_delta=1e-3, min_cell=40)
    rows = _cohort({"GE": 400, "SIEMENS": 250, "RARE": 3, "ONE": 1})
    ledger = PrivacyLedger(tmp_path / "ledger.json")
    draws = []
    for i in range(60):  # 60 corpora that differ (in series ids) but not in their counts
        release = privacy.release_counts(rows.assign(series=rows.series + f".{i}"), ("vendor",), cfg, ledger, "ds")
        assert not release.reused
        assert set(release.table.vendor) <= {"GE", "SIEMENS"}  # never the rare cells
        assert (release.table["count"] >= release.threshold).all()
        draws.append(release.table.set_index("vendor")["count"])
    counts = pd.DataFrame(draws)
    assert (counts.GE != 400).any() and (counts.SIEMENS != 250).any()  # noise, not the exact figures
    assert 0.6 < counts.GE.std() < 3.5  # Laplace(1): sqrt(2); the exact spread is the test above
    spent = ledger.entry("ds")
    assert spent.spent_epsilon == pytest.approx(60.0) and len(spent.releases) == 60

    # The same table of the same data again: the released numbers, at no cost.
    again = privacy.release_counts(rows.assign(series=rows.series + ".0", month="another month"), ("vendor",),
                                   cfg, ledger, "ds")
    assert again.reused and again.table.set_index("vendor")["count"].equals(draws[0])
    assert ledger.entry("ds").spent_epsilon == pytest.approx(60.0)
    # The ledger holds the released values and a hash of the rows; never an identifier or an exact count.
    text = (tmp_path / "ledger.json").read_text()
    assert "PX-" not in text and "2.25." not in text and "RARE" not in text


def test_the_ledger_refuses_past_the_budget_and_releases_nothing(tmp_path: Path) -> None:
    cfg = PrivacyConfig(epsilon=0.5, budget_epsilon=1.0)
    rows = _cohort({"GE": 100, "SIEMENS": 80})
    ledger = PrivacyLedger(tmp_path / "ledger.json")
    privacy.release_counts(rows, ("vendor",), cfg, ledger, "ds")
    privacy.release_counts(rows, ("site",), cfg, ledger, "ds")
    before = (tmp_path / "ledger.json").read_text()
    with pytest.raises(PrivacyBudgetExceededError, match=r"spent \u03b5 1 of 1.*Nothing was released"):
        privacy.release_counts(rows, ("month",), cfg, ledger, "ds")
    assert (tmp_path / "ledger.json").read_text() == before
    # Another dataset of other patients has its own budget.
    assert privacy.release_counts(_cohort({"GE": 90}), ("month",), cfg, ledger, "other").epsilon == 0.5
    # The same patients under another dataset name (a changed folder md5) do not: their budget is spent.
    with pytest.raises(PrivacyBudgetExceededError, match=r"same patients.*spent \u03b5 1 of 1.*Nothing was released"):
        privacy.release_counts(rows, ("month",), cfg, ledger, "ds-after-an-edited-labels-csv")
    # A whole set is refused before its first table is drawn.
    with pytest.raises(PrivacyBudgetExceededError, match="4 new tables"):
        privacy.release_cohort(pd.DataFrame(), PrivacyConfig(epsilon=0.5, budget_epsilon=1.9), ledger, "third")
    assert ledger.entry("third").releases == []


def test_the_same_rows_under_new_dataset_names_get_the_first_release_and_no_new_budget(tmp_path: Path) -> None:
    """The dataset is the source folder's DVC md5, which an edited labels.csv or a quarantined extra
    file changes without changing the rows: fresh noise for each name would average away."""
    cfg = PrivacyConfig(epsilon=1.0, budget_epsilon=3.0, budget_delta=1e-3)
    rows = _cohort({"GE": 120, "SIEMENS": 180})
    ledger = PrivacyLedger(tmp_path / "ledger.json")
    first = privacy.release_counts(rows, ("vendor",), cfg, ledger, "md5-0")
    assert not first.reused
    for i in range(1, 12):
        again = privacy.release_counts(rows, ("vendor",), cfg, ledger, f"md5-{i}")
        assert again.reused and again.dataset == "md5-0"
        assert again.table.equals(first.table)  # the same noisy counts, not a fresh draw
        assert ledger.entry(f"md5-{i}").spent_epsilon == 0.0
    assert ledger.entry("md5-0").spent_epsilon == pytest.approx(1.0)
    # A whole set over the same rows under a new name: the table released before is not new.
    releases = privacy.release_cohort(_instances(rows), cfg.model_copy(update={"releases": [["vendor"], ["site"]]}),
                                      ledger, "md5-x")
    assert [r.reused for r in releases] == [True, False] and releases[0].table.equals(first.table)
    # New tables over the same patients pay from the one budget whatever the name: 3 in all here.
    privacy.release_counts(rows.assign(series=rows.series + ".new-study"), ("month",), cfg, ledger, "md5-y")
    with pytest.raises(PrivacyBudgetExceededError, match="same patients"):
        privacy.release_counts(rows, ("age_band", "sex"), cfg, ledger, "md5-z")
    with pytest.raises(PrivacyBudgetExceededError, match="same patients"):
        privacy.release_cohort(_instances(rows), cfg.model_copy(update={"releases": [["vendor"], ["sex"]]}), ledger,
                               "md5-w")
    assert ledger.entry("md5-z").releases == [] and ledger.entry("md5-w").releases == []
    text = (tmp_path / "ledger.json").read_text()
    assert "PX-" not in text and "2.25." not in text


def _instances(rows: pd.DataFrame) -> pd.DataFrame:
    """The gate's instance table whose :func:`privacy.cohort` is `rows`."""
    return pd.DataFrame({"SeriesInstanceUID": rows.series, "PatientID": rows.patient, "Manufacturer": rows.vendor,
                         "Site": rows.site, "StudyDate": "20170304", "PatientAge": "045Y", "PatientSex": rows.sex})


def test_written_releases_hold_only_released_cells(tmp_path: Path) -> None:
    cfg = PrivacyConfig()
    rows = _cohort({"GE": 200, "RARE": 2})
    ledger = PrivacyLedger(tmp_path / "ledger.json")
    releases = [privacy.release_counts(rows, by, cfg, ledger, "ds") for by in (("vendor",), ("age_band", "sex"))]
    files = privacy.write_releases(releases, tmp_path / "out")
    assert [f.name for f in files] == ["released_counts.csv", "released_counts.png"]
    table = pd.read_csv(files[0], keep_default_na=False)
    assert table.cell.tolist() == ["GE", "40-49 \u00d7 F"]
    assert (table.epsilon == 1.0).all() and (table["count"] >= table.threshold).all()
    assert json.loads((tmp_path / "ledger.json").read_text())["datasets"]["ds"]["spent_epsilon"] == 2.0


def _pool_work(tmp_path: Path, sizes: dict[tuple[str, int], int]) -> Path:
    """A work directory whose preprocessed index holds `sizes` labelled series per (vendor, label)."""
    rows = [{"SeriesInstanceUID": f"2.25.{vendor}.{label}.{i}", "PatientID": f"PX-{vendor}{label}{i}",
             "vendor": vendor, "label": label} for (vendor, label), n in sizes.items() for i in range(n)]
    rows.append({"SeriesInstanceUID": "2.25.unlabelled", "PatientID": "PX-u", "vendor": "ge", "label": -1})
    work = tmp_path / "work"
    io.write_parquet(WorkLayout(work).preprocessed.index, pd.DataFrame(rows))
    return work


def test_the_pool_is_released_once_and_every_reader_gets_that_release(tmp_path: Path) -> None:
    work = _pool_work(tmp_path, {("ge", 0): 300, ("ge", 1): 120, ("rare", 1): 2})
    cfg = PrivacyConfig(budget_epsilon=2.0)
    ledger = PrivacyLedger(tmp_path / "ledger.json")
    counts = privacy.release_pool(work, cfg, ledger)
    assert counts.release is not None and counts.release.name == privacy.POOL_RELEASE
    table = counts.release.table
    assert set(zip(table.vendor, table.label, strict=True)) == {("ge", "0"), ("ge", "1")}  # the rare cell suppressed
    assert counts.cell("rare", 1) == f"\u2039 {counts.release.threshold}" and counts.cell("ge", 0).isdigit()
    assert counts.total(1, ["ge", "rare"]) == counts.cell("ge", 1) + "+"  # and a suppressed cell
    assert counts.total(0, ["ge"]) == counts.cell("ge", 0)
    # What a card reads is the same release; a segmenter after the classifier pays nothing.
    assert privacy.pool_counts(work).to_json() == counts.to_json()
    assert privacy.release_pool(work, cfg, ledger).release.reused  # type: ignore[union-attr]
    assert ledger.entry("unversioned").spent_epsilon == pytest.approx(1.0)
    assert "PX-" not in WorkLayout(work).privacy_pool.read_text() and "2.25." not in ledger.path.read_text()

    # Readers' labels change the pool: the recorded release is no longer about it, and none is shown.
    index = WorkLayout(work).preprocessed.read_index()
    index.loc[0, "label"] = 1
    io.write_parquet(WorkLayout(work).preprocessed.index, index)
    stale = privacy.pool_counts(work)
    assert stale.release is None and "another pool" in stale.caption and stale.cell("ge", 0) == "\u2013"
    # Its release costs another epsilon; a third pool finds the budget spent, releases nothing, says so.
    assert privacy.release_pool(work, cfg, ledger).release is not None
    index.loc[1, "label"] = 1
    io.write_parquet(WorkLayout(work).preprocessed.index, index)
    spent = privacy.release_pool(work, cfg, ledger)
    assert spent.release is None and "budget is spent" in spent.caption
    assert privacy.pool_counts(work).release is None
    off = privacy.release_pool(work, PrivacyConfig(enabled=False), ledger)
    assert off.release is None and "privacy is off" in off.caption


def test_shown_tables_lose_every_exact_count(tmp_path: Path) -> None:
    table = pd.DataFrame({"vendor": ["ge"], "n": [4], "positives": [2], "auc": [0.75], "tp": [1], "fp": [1],
                          "fn": [1], "tn": [1], "scans": [4], "nodules": [3], "sensitivity": [0.5]})
    shown = privacy.shown(tmp_path / "evidence.csv", table)
    assert shown == tmp_path / "shown" / "evidence.csv"
    assert list(pd.read_csv(shown).columns) == ["vendor", "auc", "sensitivity"]
