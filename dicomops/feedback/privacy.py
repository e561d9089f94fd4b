"""Counts released to people under differential privacy (OpenDP), and the ledger that budgets them.

What is protected: the *released aggregates* (series per vendor, site, month, age band and sex in
MLflow, Data Docs and cards). One patient joining or leaving the corpus changes each released table
by a bounded, noise-hidden amount. What is not: the records themselves, which the PS3.15
de-identification at the gate handles; and the exact counts, which stay in the work directory for
the pipeline's own use and never leave it.

Each release is OpenDP's ``count_by`` followed by ``laplace_threshold``: a Laplace count per cell,
and every cell whose noisy count is under the threshold suppressed. The threshold is the larger of
the configured smallest cell and the one OpenDP needs for the release's delta, so a category only one
patient has (a rare scanner, one site) cannot be told apart from one that does not exist. Noise
comes from OpenDP's own floating-point-safe samplers and the operating system's CSPRNG: there is no
seed, on purpose (noise that can be replayed can be subtracted).

The ledger charges what OpenDP's privacy map says each release costs, before the noise is drawn,
and refuses a release that would exceed the budget. Two budgets are charged, and both must allow it:

- the *dataset*'s (the source corpus's DVC hash, or ``ingest.privacy.dataset``): the name an operator
  can give several versions of a corpus to bound them together;
- the *cohort*'s: the set of patients whose rows the release counts (a hash of their pseudonyms,
  :func:`cohort_key`). The patient is what the privacy guarantee protects (the sensitivity is one
  patient's rows), so it is the patients, not the folder they came in, that must not be queried
  past the budget. The folder's DVC md5 changes with anything in it: an edited ``labels.csv``, a
  quarantined extra file, a sidecar. Were the budget the md5's alone, each such change would open a
  fresh budget over the very same patients, and enough fresh releases average the noise away. A
  cohort's budget follows its patients through every dataset name the ledger has seen; a patient's
  other series (a new study) stay in the same cohort.

What a cohort budget does not bound: cohorts that differ by some patients (the corpus, then the
corpus plus a batch) are different cohorts, and a patient in both pays in both; as before, name one
``ingest.privacy.dataset`` to bound them together. Releases a ledger recorded before cohorts were
(2026-12-05) name none: they count against their dataset only.

A table already released over the same rows and specification (:func:`_spec`, which holds a hash of
the rows) is published again as it was, whichever dataset paid for it: re-reading a released value
is post-processing and costs nothing, and drawing the same query over the same rows again is exactly
what must not happen.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import pandas as pd
from filelock import FileLock

from dicomops import io
from dicomops.config import PrivacyConfig
from dicomops.deid.keys import MALFORMED_DATE
from dicomops.errors import DicomOpsError

COHORT_COLUMNS = ("vendor", "site", "month", "age_band", "sex")
UNKNOWN = "unknown"
_AGE = re.compile(r"^(\d{3})([DWMY])$")


class PrivacyBudgetExceededError(DicomOpsError):
    """A release would spend more of a dataset's privacy budget than the ledger allows."""


@dataclass(frozen=True)
class Release:
    """One released table: the noisy counts that survived suppression, and what it cost."""

    name: str
    dataset: str  # the dataset whose budget paid for it (another name's, when reused from there)
    by: tuple[str, ...]
    epsilon: float
    delta: float
    scale: float
    threshold: int
    table: pd.DataFrame  # columns: *by, count (noisy); suppressed cells are absent
    reused: bool = False

    @property
    def caption(self) -> str:
        return (f"OpenDP Laplace, \u03b5 = {self.epsilon:g}, \u03b4 = {self.delta:.0e}; cells under "
                f"{self.threshold} suppressed")


@dataclass
class LedgerEntry:
    spent_epsilon: float = 0.0
    spent_delta: float = 0.0
    releases: list[dict[str, Any]] = field(default_factory=list)


def _over(spent_epsilon: float, spent_delta: float, cfg: PrivacyConfig) -> bool:
    # A relative slack: sums of floats must not refuse the release that exactly fills the budget.
    return spent_epsilon > cfg.budget_epsilon * (1 + 1e-9) or spent_delta > cfg.budget_delta * (1 + 1e-9)


class PrivacyLedger:
    """Per-dataset privacy spending in one JSON file, safe for several processes (a file lock)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def _read(self) -> dict[str, Any]:
        return json.loads(self.path.read_text()) if self.path.exists() else {"datasets": {}}

    def entry(self, dataset: str) -> LedgerEntry:
        raw = self._read()["datasets"].get(dataset)
        return LedgerEntry(**raw) if raw else LedgerEntry()

    def cohort_spent(self, cohort: str) -> tuple[float, float, int]:
        """(epsilon, delta, releases) the ledger has charged for `cohort`'s rows under any dataset name.

        Every record counts, a release paid for and never drawn included: it was paid.
        """
        eps = delta = 0.0
        count = 0
        for entry in self._read()["datasets"].values():
            for record in entry["releases"]:
                if record.get("cohort") == cohort:
                    eps += record["epsilon"]
                    delta += record["delta"]
                    count += 1
        return eps, delta, count

    def lock(self) -> FileLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        return FileLock(str(self.path) + ".lock", timeout=60)

    def charge(self, dataset: str, record: dict[str, Any], cfg: PrivacyConfig) -> None:
        """Add `record` (its ``epsilon``, ``delta``) to the dataset's spending, or refuse.

        A record with a ``cohort`` (:func:`cohort_key`) must also fit that cohort's budget: what the
        ledger has charged for the same patients under every dataset name.

        Must be called under :meth:`lock`.

        Raises:
            PrivacyBudgetExceededError: the release would take the dataset, or its cohort, past the budget.
        """
        if (cohort := record.get("cohort")) is not None:
            c_eps, c_delta, c_count = self.cohort_spent(cohort)
            if _over(c_eps + record["epsilon"], c_delta + record["delta"], cfg):
                raise PrivacyBudgetExceededError(
                    f"release {record['name']!r} of dataset {dataset[:12]} needs \u03b5 {record['epsilon']:g}, "
                    f"\u03b4 {record['delta']:.1e}, but {c_count} earlier releases of the same patients (cohort "
                    f"{cohort[:12]}, under any dataset name) spent \u03b5 {c_eps:g} of {cfg.budget_epsilon:g} and "
                    f"\u03b4 {c_delta:.1e} of {cfg.budget_delta:.1e} ({self.path}). Nothing was released. A new "
                    "dataset name (a changed source folder) does not renew the budget of the same patients. "
                    "Reuse the released tables, release fewer tables (ingest.privacy.releases) or, if the data "
                    "governance board agrees, raise ingest.privacy.budget_epsilon")
        ledger = self._read()
        entry = ledger["datasets"].setdefault(dataset, LedgerEntry().__dict__)
        eps = entry["spent_epsilon"] + record["epsilon"]
        delta = entry["spent_delta"] + record["delta"]
        if _over(eps, delta, cfg):
            raise PrivacyBudgetExceededError(
                f"release {record['name']!r} of dataset {dataset[:12]} needs \u03b5 {record['epsilon']:g}, "
                f"\u03b4 {record['delta']:.1e}, but {len(entry['releases'])} earlier releases spent "
                f"\u03b5 {entry['spent_epsilon']:g} of {cfg.budget_epsilon:g} and \u03b4 {entry['spent_delta']:.1e} "
                f"of {cfg.budget_delta:.1e} ({self.path}). Nothing was released. Reuse the released tables, "
                "release fewer tables (ingest.privacy.releases) or, if the data governance board agrees, "
                "raise ingest.privacy.budget_epsilon")
        entry.update(spent_epsilon=eps, spent_delta=delta, releases=[*entry["releases"], record])
        io.write_json(self.path, ledger)

    def find(self, dataset: str, spec: str) -> dict[str, Any] | None:
        """The drawn release of `spec` (:func:`_spec`, which hashes the rows), `dataset`'s first, else
        the first under any other dataset name, with ``dataset`` set to the one that paid; or None.

        The spec names the rows, so the same query over the same rows is the same release whatever
        the folder's name: answering it with fresh noise would let the noise be averaged away.
        """
        datasets = self._read()["datasets"]
        for name in (dataset, *sorted(d for d in datasets if d != dataset)):
            for record in datasets.get(name, {}).get("releases", []):
                # A release paid for but never drawn (a crash between the two) is not reused: drawn again, paid again.
                if record.get("spec") == spec and record.get("cells") is not None:
                    return record | {"dataset": name}
        return None


def ledger_for(work: Path, configured: Path | None) -> PrivacyLedger:
    """The site's shared ledger when one is configured, else the work directory's own."""
    return PrivacyLedger(configured or Path(work) / "privacy" / "ledger.json")


def age_band(value: object) -> str:
    """DICOM AS (``045Y``, ``003M``) → a decade band; 90 and over pooled (as HIPAA pools them)."""
    match = _AGE.match(str(value or "").strip())
    if not match:
        return UNKNOWN
    years = int(match.group(1)) if match.group(2) == "Y" else 0
    if years >= 90:
        return "90+"
    low = years // 10 * 10
    return f"{low:02d}-{low + 9:02d}"


def _month(value: object) -> str:
    text = str(value or "").strip()
    if len(text) != 8 or not text.isdigit() or text == MALFORMED_DATE:
        return UNKNOWN
    return f"{text[:4]}-{text[4:6]}"


def cohort(instances: pd.DataFrame) -> pd.DataFrame:
    """One row per accepted series with the released columns and the patient's pseudonym.

    `instances` is the gate's de-identified instance table: ``month`` is the study month on the
    shifted calendar of the training side (each patient's dates move 1–3 years back), never the
    original one; ``site`` is the keyed token of InstitutionName the reader wrote.
    """
    if instances.empty:
        return pd.DataFrame(columns=["patient", "series", *COHORT_COLUMNS])
    first = instances.sort_values(["SeriesInstanceUID"]).groupby("SeriesInstanceUID", sort=True).first()
    site = first["Site"] if "Site" in first else pd.Series("", index=first.index)

    def text(column: str) -> pd.Series:
        return first[column].fillna("").astype(str).str.strip() if column in first else pd.Series("", index=first.index)

    sex = text("PatientSex").str.upper()
    return pd.DataFrame({
        "patient": text("PatientID").to_numpy(),
        "series": first.index.to_numpy(),
        "vendor": text("Manufacturer").replace("", UNKNOWN).to_numpy(),
        "site": site.fillna("").astype(str).replace("", UNKNOWN).to_numpy(),
        "month": text("StudyDate").map(_month).to_numpy(),
        "age_band": text("PatientAge").map(age_band).to_numpy(),
        "sex": sex.where(sex.isin(["M", "F", "O"]), UNKNOWN).to_numpy(),
    })


def bound_contributions(rows: pd.DataFrame, max_per_patient: int) -> pd.DataFrame:
    """Keep at most `max_per_patient` rows of each patient (the first by series id): the contribution
    bound the sensitivity rests on. Which rows stay depends on that patient's rows only."""
    ordered = rows.sort_values(["patient", "series"], kind="stable")
    return ordered.groupby("patient", sort=False).head(max_per_patient).reset_index(drop=True)


def _measurement(scale: float, threshold: int) -> Any:
    import opendp.prelude as dp

    dp.enable_features("contrib")
    space = dp.vector_domain(dp.atom_domain(T=str)), dp.symmetric_distance()
    return dp.t.make_count_by(*space, TV=int) >> dp.m.then_laplace_threshold(scale=scale, threshold=threshold)


def calibrate(cfg: PrivacyConfig) -> tuple[float, int, float, float]:
    """Scale and threshold for one release: (scale, threshold, epsilon, delta) as OpenDP maps them.

    The distance in is the contribution bound (adding or removing one patient changes at most that
    many rows); the scale gives the configured epsilon, the threshold the configured delta or the
    smallest released cell, whichever is larger.
    """
    return _calibrate(cfg.max_series_per_patient, cfg.epsilon, cfg.delta, cfg.min_cell)


@lru_cache(maxsize=32)
def _calibrate(d_in: int, epsilon: float, delta: float, min_cell: int) -> tuple[float, int, float, float]:
    import opendp.prelude as dp

    scale = d_in / epsilon
    needed = int(dp.binary_search(lambda t: _measurement(scale, int(t)).map(d_in)[1] <= delta,
                                  bounds=(d_in, 1_000_000), T=int))
    threshold = max(needed, min_cell)
    spent_epsilon, spent_delta = _measurement(scale, threshold).map(d_in)
    return scale, threshold, float(spent_epsilon), float(spent_delta)


def release_name(by: Sequence[str]) -> str:
    return "series by " + " \u00d7 ".join(by)


def cohort_key(rows: pd.DataFrame) -> str:
    """The cohort a release is of: a hash of the set of patients in `rows` (never the pseudonyms).

    The privacy budget's unit (the guarantee protects a patient): the same patients under another
    dataset name, or with other series of theirs, are the same cohort.
    """
    patients = sorted(set(rows["patient"].astype(str))) if "patient" in rows else []
    return hashlib.sha256("\x1f".join(["cohort", *patients]).encode()).hexdigest()


def _key(values: Sequence[str]) -> str:
    return "\x1f".join(values)


def release_counts(rows: pd.DataFrame, by: Sequence[str], cfg: PrivacyConfig, ledger: PrivacyLedger,
                   dataset: str, name: str | None = None) -> Release:
    """Release the series count of each cell of `by` over `rows` (:func:`cohort`'s table).

    The same table over the same rows and settings, released before under any dataset name, is
    returned as it was (``reused``, its ``dataset`` the one that paid), and charged nothing. A new
    one is charged to `dataset` and to the cohort of `rows`' patients (:func:`cohort_key`).

    Raises:
        PrivacyBudgetExceededError: the dataset's budget, or its patients' (the cohort's), cannot
            pay for this release.
        ValueError: `by` names a column `rows` does not have.
    """
    by = tuple(by)
    if missing := [c for c in by if c not in rows]:
        raise ValueError(f"cannot release counts by {missing}: the cohort has columns {list(rows.columns)}")
    name = name or release_name(by)
    scale, threshold, epsilon, delta = calibrate(cfg)
    spec = _spec(rows, by, cfg)
    with ledger.lock():
        if (earlier := ledger.find(dataset, spec)) is not None:
            return _from_record(earlier, earlier["dataset"], reused=True)
        record = {"name": name, "by": list(by), "epsilon": epsilon, "delta": delta, "scale": scale,
                  "threshold": threshold, "spec": spec, "cohort": cohort_key(rows),
                  "at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds")}
        ledger.charge(dataset, record | {"cells": None}, cfg)  # paid before any noise is drawn
        kept = bound_contributions(rows, cfg.max_series_per_patient)
        keys = [_key(v) for v in kept[list(by)].astype(str).itertuples(index=False, name=None)]
        noisy = _measurement(scale, threshold)(keys) if keys else {}
        cells = [[*k.split("\x1f"), int(v)] for k, v in sorted(noisy.items())]
        _store_cells(ledger, dataset, spec, cells)
    return _from_record(record | {"cells": cells}, dataset)


def _spec(rows: pd.DataFrame, by: tuple[str, ...], cfg: PrivacyConfig) -> str:
    """What makes two releases the same release: the table, the settings, and the data it is drawn
    from (a hash, never the rows). The same spec again is published as it was, free."""
    return json.dumps({"by": list(by), "epsilon": cfg.epsilon, "delta": cfg.delta, "min_cell": cfg.min_cell,
                       "bound": cfg.max_series_per_patient,
                       "rows": _rows_hash(rows[["patient", "series", *by]].astype(str))}, sort_keys=True)


def _store_cells(ledger: PrivacyLedger, dataset: str, spec: str, cells: list[list[Any]]) -> None:
    raw = ledger._read()
    for record in raw["datasets"][dataset]["releases"]:
        if record["spec"] == spec:
            record["cells"] = cells
    io.write_json(ledger.path, raw)


def _from_record(record: dict[str, Any], dataset: str, reused: bool = False) -> Release:
    by = tuple(record["by"])
    table = pd.DataFrame(record["cells"] or [], columns=[*by, "count"])
    return Release(name=record["name"], dataset=dataset, by=by, epsilon=record["epsilon"], delta=record["delta"],
                   scale=record["scale"], threshold=record["threshold"], table=table, reused=reused)


def release_cohort(instances: pd.DataFrame, cfg: PrivacyConfig, ledger: PrivacyLedger,
                   dataset: str) -> list[Release]:
    """Every configured table over the gate's accepted series; all or none (the budget, the
    dataset's and the cohort's, is checked for the whole set before the first is drawn)."""
    if not cfg.enabled:
        return []
    rows = cohort(instances)
    _, _, epsilon, delta = calibrate(cfg)
    entry = ledger.entry(dataset)
    specs = {_spec(rows, tuple(by), cfg) for by in cfg.releases}
    new = sum(ledger.find(dataset, spec) is None for spec in specs)
    advice = ("Release fewer tables (ingest.privacy.releases), a smaller ingest.privacy.epsilon each, or, if "
              "the data governance board agrees, raise ingest.privacy.budget_epsilon")
    if new and _over(entry.spent_epsilon + new * epsilon, entry.spent_delta + new * delta, cfg):
        raise PrivacyBudgetExceededError(
            f"the {new} new tables of dataset {dataset[:12]} need \u03b5 {new * epsilon:g}; "
            f"{entry.spent_epsilon:g} of {cfg.budget_epsilon:g} is spent ({ledger.path}). Nothing was released. "
            + advice)
    c_eps, c_delta, _ = ledger.cohort_spent(cohort_key(rows))
    if new and _over(c_eps + new * epsilon, c_delta + new * delta, cfg):
        raise PrivacyBudgetExceededError(
            f"the {new} new tables of dataset {dataset[:12]} need \u03b5 {new * epsilon:g}; releases of the same "
            f"patients under any dataset name spent {c_eps:g} of {cfg.budget_epsilon:g} ({ledger.path}): a new "
            "dataset name does not renew their budget. Nothing was released. " + advice)
    return [release_counts(rows, by, cfg, ledger, dataset) for by in cfg.releases]


def publish_ingest(work: Path, cfg: PrivacyConfig, ledger: PrivacyLedger) -> list[Path]:
    """Release the configured tables over the gate's accepted series into ``ingest/released/``.

    The dataset charged is ``cfg.dataset`` or else the source corpus (its DVC md5). Returns the files
    to show people.

    Raises:
        PrivacyBudgetExceededError: nothing was released; the folder is left empty.
    """
    from dicomops.ingest import source_dvc_md5
    from dicomops.layout import WorkLayout

    paths = WorkLayout(work).ingest
    folder = paths.released
    if folder.exists():
        for old in folder.iterdir():
            old.unlink()
    dataset = cfg.dataset or source_dvc_md5(work)
    if dataset is None:
        raise ValueError(f"{paths.source} is missing: run the ingest flow, which records the source corpus")
    releases = release_cohort(pd.read_parquet(paths.instances), cfg, ledger, dataset)
    return write_releases(releases, folder) if releases else []


def released_table(work: Path, by: Sequence[str]) -> pd.DataFrame | None:
    """The released table of `by` from the last ingest (noisy counts, suppressed cells absent), or None."""
    from dicomops.layout import WorkLayout

    path = WorkLayout(work).ingest.released / "released_counts.csv"
    if not path.exists():
        return None
    table = pd.read_csv(path, keep_default_na=False)
    return table[table.release == release_name(by)].reset_index(drop=True)


def cell_names(release: Release) -> list[str]:
    return [" \u00d7 ".join(map(str, v)) for v in release.table[list(release.by)].itertuples(index=False, name=None)]


def write_releases(releases: Sequence[Release], folder: Path) -> list[Path]:
    """``released_counts.csv`` (every table, long form) and a picture of each; nothing exact."""
    folder.mkdir(parents=True, exist_ok=True)
    columns = ["release", "cell", "count", "epsilon", "delta", "threshold"]
    frames = [pd.DataFrame({"release": r.name, "cell": cell_names(r), "count": r.table["count"].astype(int),
                            "epsilon": r.epsilon, "delta": r.delta, "threshold": r.threshold}, columns=columns)
              for r in releases]
    table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns)
    csv = folder / "released_counts.csv"
    io.write_csv(csv, table)
    return [csv, plot_releases(releases, folder / "released_counts.png")] if releases else [csv]


def plot_releases(releases: Sequence[Release], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(2, len(releases))
    rows = math.ceil(len(releases) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(7 * cols, 0.5 + 3.6 * rows), layout="constrained", squeeze=False)
    for ax, release in zip(axes.flat, releases, strict=False):
        names = cell_names(release)
        if names:
            ax.barh(names, release.table["count"].tolist(), color="#4f81bd")
            ax.bar_label(ax.containers[0], fontsize=10, padding=2)
            ax.invert_yaxis()
            ax.set_xlabel("series (noisy count)", fontsize=10)
            ax.margins(x=0.15)
        else:
            ax.text(0.5, 0.5, f"every cell suppressed\n(no noisy count reached {release.threshold})",
                    ha="center", va="center", fontsize=11, color="#555555", transform=ax.transAxes)
            ax.set_xticks([])
            ax.set_yticks([])
        ax.set_title(f"{release.name}\n{release.caption}", fontsize=11)
    for ax in list(axes.flat)[len(releases):]:
        ax.set_visible(False)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


# -- the training pool's counts ------------------------------------------------------------------
POOL_BY = ("vendor", "label")
POOL_RELEASE = "labelled series by vendor \u00d7 label"
# What a table shown to people must not carry: exact counts of series, nodules or outcomes. Every
# copy of a training table that goes to MLflow passes through :func:`without_counts`.
EXACT_COUNT_COLUMNS = frozenset({"n", "positives", "series", "scans", "nodules", "tp", "fp", "fn", "tn",
                                 "TP", "FP", "FN", "TN", "n_series", "n_nodules"})


def without_counts(frame: pd.DataFrame) -> pd.DataFrame:
    """`frame` without its exact-count columns (:data:`EXACT_COUNT_COLUMNS`): the copy people see."""
    return frame.drop(columns=[c for c in frame.columns if c in EXACT_COUNT_COLUMNS])


def shown(path: Path, table: pd.DataFrame) -> Path:
    """The copy of `table` people see (MLflow), in ``shown/`` beside `path` and under its name:
    without its exact counts, which stay at `path` in the work directory."""
    return io.write_csv(path.parent / "shown" / path.name, without_counts(table))


@dataclass(frozen=True)
class PoolCounts:
    """The training pool's negatives and positives per vendor as released under differential privacy.

    The one source of the counts that cards, tables and pictures of a training show: they never
    count the pool themselves. `release` is None when nothing was released, and `note` says why
    (privacy off, the budget spent); `rows` is the hash of the pool the release is of.
    """

    release: Release | None
    note: str
    rows: str = ""

    @property
    def caption(self) -> str:
        if self.release is None:
            return f"Counts of the training pool not released: {self.note}."
        return (f"Counts of the training pool released under differential privacy ({self.release.caption}); "
                f"\u2039 {self.release.threshold}: suppressed. The exact counts stay in the work directory.")

    def cell(self, vendor: str, label: int) -> str:
        """The released count of `vendor`'s series with `label` as text: a number, ``‹ threshold`` where
        the cell was suppressed, an en dash where nothing was released."""
        if self.release is None:
            return "\u2013"
        table = self.release.table
        hit = table[(table.vendor.astype(str) == str(vendor)) & (table.label.astype(str) == str(label))]
        return str(int(hit["count"].iloc[0])) if len(hit) else f"\u2039 {self.release.threshold}"

    def total(self, label: int, vendors: Sequence[str]) -> str:
        """The sum of `vendors`' released cells of `label` (post-processing), ending in ``+`` when one
        of them was suppressed: the sum of the cells shown, and some series more."""
        if self.release is None:
            return "\u2013"
        table = self.release.table
        shown = table[(table.label.astype(str) == str(label)) & table.vendor.astype(str).isin(list(map(str, vendors)))]
        suppressed = len(set(map(str, vendors)) - set(shown.vendor.astype(str)))
        return f"{int(shown['count'].sum())}{'+' if suppressed else ''}"

    def to_json(self) -> dict[str, Any]:
        release = None if self.release is None else {
            "name": self.release.name, "dataset": self.release.dataset, "by": list(self.release.by),
            "epsilon": self.release.epsilon, "delta": self.release.delta, "scale": self.release.scale,
            "threshold": self.release.threshold, "cells": self.release.table.to_numpy().tolist()}
        return {"release": release, "note": self.note, "rows": self.rows}

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> PoolCounts:
        raw = doc.get("release")
        release = None if raw is None else _from_record(raw, raw["dataset"])
        return cls(release, str(doc.get("note", "")), str(doc.get("rows", "")))


def pool_rows(index: pd.DataFrame) -> pd.DataFrame:
    """The labelled pool as the release counts it: one row per labelled series, with its patient."""
    labelled = index[index.label >= 0]
    return pd.DataFrame({"patient": labelled.PatientID.astype(str).to_numpy(),
                         "series": labelled.SeriesInstanceUID.astype(str).to_numpy(),
                         "vendor": labelled.vendor.astype(str).to_numpy(),
                         "label": labelled.label.astype(int).astype(str).to_numpy()})


def _rows_hash(rows: pd.DataFrame) -> str:
    """A hash of `rows` (never the rows): what tells one pool or cohort from another."""
    text = rows.sort_values(["patient", "series"]).to_csv(index=False)
    return hashlib.sha256(text.encode()).hexdigest()


def release_pool(work: Path, cfg: PrivacyConfig, ledger: PrivacyLedger) -> PoolCounts:
    """Release the labelled pool's series per vendor and label once, and record it for every reader.

    Charged to the same dataset as the ingest's tables (and to the cohort of the pool's patients);
    the same pool again (a segmenter after the classifier, a resumed training, the same pool under
    another dataset name) is published as it was, free. A spent budget or privacy turned
    off releases nothing and says so: the training goes on, and shows no counts.
    """
    from dicomops.ingest import source_dvc_md5
    from dicomops.layout import WorkLayout

    layout = WorkLayout(work)
    rows = pool_rows(layout.preprocessed.read_index())
    digest = _rows_hash(rows)
    if not cfg.enabled:
        counts = PoolCounts(None, "differential privacy is off (ingest.privacy.enabled), so no counts are released",
                            digest)
    else:
        dataset = cfg.dataset or source_dvc_md5(work) or "unversioned"
        try:
            counts = PoolCounts(release_counts(rows, POOL_BY, cfg, ledger, dataset, POOL_RELEASE), "", digest)
        except PrivacyBudgetExceededError as err:
            counts = PoolCounts(None, f"the privacy budget is spent ({err})", digest)
    io.write_json(layout.privacy_pool, counts.to_json())
    return counts


def pool_counts(work: Path) -> PoolCounts:
    """The released counts of the pool now in `work` (:func:`release_pool`); none when the release
    is missing or of another pool (the labels changed since), and the note says so."""
    from dicomops.layout import WorkLayout

    layout = WorkLayout(work)
    if not layout.privacy_pool.exists():
        return PoolCounts(None, "no release of the training pool was made (run the training flow)")
    counts = PoolCounts.from_json(io.read_json(layout.privacy_pool))
    if counts.rows != _rows_hash(pool_rows(layout.preprocessed.read_index())):
        return PoolCounts(None, "the recorded release is of another pool (the labels changed since)")
    return counts
