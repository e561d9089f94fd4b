"""Four-fold cross-validation stratified by vendor × label and grouped by patient, made once.

As in nnU-Net, the split is computed once with a seed, written to ``WORK/splits/folds.json`` and
reused by every later run; unlike nnU-Net, a split in which any patient sits on both sides of a
fold is refused.
"""

from __future__ import annotations

import numpy as np
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


def extend_folds(previous: list[dict[str, list[str]]], series: pd.DataFrame,
                 seed: int = 0) -> list[dict[str, list[str]]]:
    """`previous` folds carried over to `series`, a pool that has grown (or lost series).

    A series the earlier split holds keeps its validation fold, so that runs on the two pools stay
    comparable fold by fold; one that `series` no longer holds leaves. A new series joins the fold of
    its patient when the patient already has one (patients never straddle folds); the new patients
    are placed one at a time, in an order shuffled with `seed`, in the fold whose validation part
    holds the fewest series of their vendor × label groups (ties: the smaller fold, then the first).

    Raises:
        LeakageError: the kept series of one patient lie in different folds (their ``PatientID``
            changed since the earlier split): split the pool afresh.
        ValueError: a fold would be left without validation series, or `series` lacks a column.
    """
    missing = {"SeriesInstanceUID", "PatientID", "vendor", "label"} - set(series.columns)
    if missing:
        raise ValueError(f"series table lacks columns {sorted(missing)}")
    table = series.sort_values("SeriesInstanceUID").reset_index(drop=True)
    strata = dict(zip(table.SeriesInstanceUID, table.vendor.astype(str) + "|" + table.label.astype(str), strict=True))
    earlier = {s: i for i, fold in enumerate(previous) for s in fold["val"]}
    fold_of: dict[str, int] = {}
    patient_fold: dict[str, int] = {}
    for uid, patient in zip(table.SeriesInstanceUID, table.PatientID.astype(str), strict=True):
        if uid in earlier:
            fold_of[uid] = earlier[uid]
            if patient_fold.setdefault(patient, earlier[uid]) != earlier[uid]:
                raise LeakageError(f"a patient's series lie in folds {patient_fold[patient]} and {earlier[uid]} "
                                   "of the earlier split")
    new = table[~table.SeriesInstanceUID.isin(list(earlier))]
    for uid, patient in zip(new.SeriesInstanceUID, new.PatientID.astype(str), strict=True):
        if patient in patient_fold:
            fold_of[uid] = patient_fold[patient]
    counts: dict[tuple[int, str], int] = {}
    sizes = [0] * len(previous)
    for uid, fold in fold_of.items():
        counts[fold, strata[uid]] = counts.get((fold, strata[uid]), 0) + 1
        sizes[fold] += 1
    unplaced = new[~new.SeriesInstanceUID.isin(list(fold_of))]
    patients = sorted(set(unplaced.PatientID.astype(str)))
    np.random.default_rng(seed).shuffle(patients)
    by_patient = unplaced.groupby(unplaced.PatientID.astype(str)).SeriesInstanceUID.agg(list)
    for patient in patients:
        uids = by_patient[patient]
        fold = min(range(len(previous)),
                   key=lambda f: (sum(counts.get((f, strata[u]), 0) for u in uids), sizes[f], f))
        for uid in uids:
            fold_of[uid] = fold
            counts[fold, strata[uid]] = counts.get((fold, strata[uid]), 0) + 1
            sizes[fold] += 1
    if min(sizes) == 0:
        raise ValueError(f"fold {sizes.index(0)} would hold no validation series")
    folds = [{"train": sorted(s for s, f in fold_of.items() if f != i),
              "val": sorted(s for s, f in fold_of.items() if f == i)} for i in range(len(previous))]
    check_no_leakage(folds, table)
    return folds


def refresh_folds(layout: WorkLayout, series: pd.DataFrame, n_splits: int = 4, seed: int = 0) -> tuple[Folds, str]:
    """The split for a pool that may differ from the one ``splits/folds.json`` was made for, and a
    line saying what became of it (counts only).

    For a retrain, whose pool grows with every labelled batch: the earlier split is carried over by
    :func:`extend_folds` (same series, same folds); it is made afresh, and the line says why, when
    there is none, the configuration asks for another ``n_splits`` or ``seed``, no series of it is
    left, or it cannot be carried over without a patient on both sides of a fold. Training on its
    own work directory keeps :func:`load_or_create_folds`, which refuses a changed series set.
    """
    if not layout.folds_file.exists():
        folds = layout.write_folds(make_folds(series, n_splits, seed), n_splits, seed)
        return folds, f"split made: {len(series)} series in {n_splits} folds"
    earlier = layout.read_folds()
    known = {s for f in earlier.folds for s in f["val"]}
    current = set(series.SeriesInstanceUID)
    if (earlier.n_splits, earlier.seed) != (n_splits, seed):
        why = (f"the earlier one has n_splits={earlier.n_splits}, seed={earlier.seed}; the configuration asks "
               f"for n_splits={n_splits}, seed={seed}")
    elif not known & current:
        why = "no series of the earlier one is in this pool"
    else:
        try:
            extended = extend_folds(earlier.folds, series, seed)
        except ValueError as err:  # LeakageError included
            why = f"the earlier one cannot be carried over: {err}"
        else:
            if extended == earlier.folds:
                return earlier, f"split unchanged: the same {len(current)} series"
            folds = layout.write_folds(extended, n_splits, seed)
            return folds, (f"split carried over: {len(known & current)} series kept in their folds, "
                           f"{len(current - known)} new assigned (vendor-stratified, a known patient's to its "
                           f"fold), {len(known - current)} no longer in the pool")
    folds = layout.write_folds(make_folds(series, n_splits, seed), n_splits, seed)
    return folds, (f"split made afresh ({why}): {len(series)} series in {n_splits} folds; earlier runs are not "
                   "comparable fold by fold")
