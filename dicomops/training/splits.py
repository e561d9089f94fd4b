"""Four-fold cross-validation stratified by vendor × label and grouped by patient, made once.

As in nnU-Net, the split is computed once with a seed, written to ``WORK/splits/folds.json`` and
reused by every later run; unlike nnU-Net, a split in which any patient sits on both sides of a
fold is refused.
"""

from __future__ import annotations

import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

from dicomops.layout import Folds, WorkLayout


class LeakageError(ValueError):
    """A patient appears in both the training and the validation part of a fold."""


def make_folds(series: pd.DataFrame, n_splits: int = 4, seed: int = 0) -> list[dict[str, list[str]]]:
    """Folds of SeriesInstanceUIDs, stratified by ``vendor`` × ``label``, grouped by ``PatientID``.

    Args:
        series: one row per series with ``SeriesInstanceUID``, ``PatientID``, ``vendor``, ``label``.
        n_splits: number of folds.
        seed: shuffling seed; the same table and seed give the same folds.
    """
    missing = {"SeriesInstanceUID", "PatientID", "vendor", "label"} - set(series.columns)
    if missing:
        raise ValueError(f"series table lacks columns {sorted(missing)}")
    table = series.sort_values("SeriesInstanceUID").reset_index(drop=True)
    if table.PatientID.nunique() < n_splits:
        raise ValueError(f"{table.PatientID.nunique()} patients cannot fill {n_splits} folds; "
                         "lower n_splits or add data")
    strata = table.vendor.astype(str) + "|" + table.label.astype(str)
    smallest = strata.value_counts()
    if (smallest < n_splits).all():
        raise ValueError(f"every vendor × label group has fewer than {n_splits} series "
                         f"({smallest.to_dict()}); lower n_splits or add data")
    splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    folds = []
    for train_idx, val_idx in splitter.split(table, strata, groups=table.PatientID):
        folds.append({"train": sorted(table.SeriesInstanceUID.iloc[train_idx]),
                      "val": sorted(table.SeriesInstanceUID.iloc[val_idx])})
    check_no_leakage(folds, table)
    return folds


def check_no_leakage(folds: list[dict[str, list[str]]], series: pd.DataFrame) -> None:
    """Raise :class:`LeakageError` if a patient is on both sides of any fold."""
    patient = dict(zip(series.SeriesInstanceUID, series.PatientID, strict=True))
    for i, fold in enumerate(folds):
        shared = {patient[s] for s in fold["train"]} & {patient[s] for s in fold["val"]}
        if shared:
            raise LeakageError(f"fold {i}: {len(shared)} patient(s) in both train and validation")


def fold_counts(folds: list[dict[str, list[str]]], series: pd.DataFrame) -> pd.DataFrame:
    """Validation series per fold × vendor × label (the table logged with every run)."""
    lookup = series.set_index("SeriesInstanceUID")
    rows = []
    for i, fold in enumerate(folds):
        part = lookup.loc[fold["val"]]
        for (vendor, label), n in part.groupby(["vendor", "label"]).size().items():
            rows.append({"fold": i, "vendor": vendor, "label": int(label), "series": int(n)})
    return pd.DataFrame(rows)


def load_or_create_folds(layout: WorkLayout, series: pd.DataFrame, n_splits: int = 4, seed: int = 0) -> Folds:
    """The split in ``splits/folds.json`` if it exists (checked against `series`, `n_splits` and
    `seed`), else a new one written there."""
    path = layout.folds_file
    if not path.exists():
        return layout.write_folds(make_folds(series, n_splits, seed), n_splits, seed)
    folds = layout.read_folds()
    if (folds.n_splits, folds.seed) != (n_splits, seed):
        raise ValueError(f"{path} holds a {folds.n_splits}-fold split made with seed {folds.seed}, but the "
                         f"configuration asks for n_splits={n_splits}, seed={seed}; set train.n_splits="
                         f"{folds.n_splits} and train.seed={folds.seed} to keep the split, or delete {path} to "
                         "split again (earlier runs then stop being comparable fold by fold)")
    known = {s for f in folds.folds for s in f["val"]}
    current = set(series.SeriesInstanceUID)
    if known != current:
        raise ValueError(f"{path} was made for other series ({len(known ^ current)} differ); delete it "
                         "to split again, or train on the series it was made for")
    check_no_leakage(folds.folds, series)
    return folds
