"""One pass of the feedback loop, as the flow runs it: labels from the readers' judgements, agreement
with them, and whether they call for a retrain. Nothing here names a patient or an original UID."""

from __future__ import annotations

import datetime as dt
import math
from pathlib import Path
from typing import Any

import pandas as pd

from dicomops import io
from dicomops.config import FeedbackConfig
from dicomops.feedback import privacy
from dicomops.feedback.store import FeedbackStore, agreement, override_labels, resolve, retrain_due
from dicomops.layout import WorkLayout

EVENT = "dicomops.feedback.threshold"


def write_labels(work: Path, cfg: FeedbackConfig) -> pd.DataFrame:
    """``feedback/labels.csv``: one resolved reader label per series (the history stays in the store)."""
    resolved = resolve(FeedbackStore(work).judgements(cfg), cfg.conflict_rule)
    io.write_csv(WorkLayout(work).feedback.labels, resolved)
    return resolved


def version_labels(work: Path, source: Path, known: set[str] | None = None) -> Any:
    """The resolved labels (``feedback/labels.csv``), the readers' masks and, given the series the
    labelled sources hold (`known`), the reviewed clinical series no source holds
    (:mod:`dicomops.feedback.clinical`, as ``clinical/``) as the next version of the readers' source
    `source`, a DVC-tracked folder (:func:`dicomops.versioning.version_source`)."""
    from dicomops.feedback.clinical import CLINICAL, clinical_files
    from dicomops.versioning import version_source

    paths = WorkLayout(work).feedback
    labels = pd.read_csv(paths.labels, keep_default_na=False)
    masks = sorted({str(m) for m in labels.get("mask", pd.Series(dtype=str)) if m})
    files = {"labels.csv": paths.labels, **{m: paths.root / m for m in masks}}
    if known is not None:
        files |= {f"{CLINICAL}/{name}": path for name, path in clinical_files(work, labels, known, paths.root).items()}
    return version_source(source, files)


def apply_to_pool(resolved: pd.DataFrame, labels_path: Path, masks_root: Path | None = None) -> int:
    """Put the readers' resolved labels (:func:`write_labels`) into a de-identified pool's ``labels.csv``
    (in place), and their masks (``mask``, relative to `masks_root`) beside the pool's own; return how
    many series changed hands.

    The pool is keyed by the same pseudonymous SeriesInstanceUID as the feedback (one key, one
    remapping). A reader's 0 makes every slab of the series negative (preprocessing: a series label
    of 0 has no positive slice); the masks stay for the segmenter (a reader's series call does not
    erase a nodule). The earlier label stays beside the new one (``label_before``), and
    ``label_source`` says whose each label is.
    """
    labels = pd.read_csv(labels_path, keep_default_na=False)
    if "label_before" in labels:  # applied before: start again from the earlier labels
        labels["label"] = labels["label_before"]
    updated = override_labels(labels, resolved)
    if masks_root is not None and "mask" in resolved:
        updated = _with_reader_masks(updated, resolved, masks_root, labels_path.parent)
    io.write_csv(labels_path, updated)
    return int((updated.label_source == "reader").sum())


MASK_FIELDS = ("mask_path", "nodules", "nodule_count", "nodule_diameters_mm", "actionable_count")


def _with_reader_masks(labels: pd.DataFrame, resolved: pd.DataFrame, masks_root: Path, pool: Path) -> pd.DataFrame:
    """A reader's mask in place of the pool's for each series they drew one for: copied into the pool's
    ``masks/`` (``reader-<name>``), its nodule records in ``nodules``; the pool's own fields are kept
    (``<field>_before``) and restored first when applied again."""
    import json

    from dicomops.feedback.seg import ReaderMask

    out = labels.copy()
    fields = [f for f in MASK_FIELDS if f in out]
    for field in fields:
        before = f"{field}_before"
        if before in out:
            out[field] = out[before]
        else:
            out[before] = out[field]
    drawn = resolved[(resolved["mask"].fillna("") != "") & (resolved.label == 1)].set_index("SeriesInstanceUID")["mask"]
    for i in out.index[out.SeriesInstanceUID.isin(drawn.index)]:
        source = masks_root / str(drawn[out.at[i, "SeriesInstanceUID"]])
        relative = f"masks/reader-{source.name}"
        io.write_bytes(pool / relative, source.read_bytes())
        nodules = ReaderMask.nodules_of(source)
        out.at[i, "mask_path"] = relative
        out.at[i, "nodules"] = json.dumps(nodules)
        for field, value in (("nodule_count", len(nodules)), ("actionable_count", len(nodules)),
                             ("nodule_diameters_mm", ";".join(f"{n['diameter_mm']:g}" for n in nodules))):
            if field in out:
                out.at[i, field] = value
    return out


def agreement_table(work: Path, cfg: FeedbackConfig, now: dt.datetime | None = None) -> pd.DataFrame:
    return agreement(FeedbackStore(work).judgements(cfg), cfg, now)


SHOWN_DIGITS = 2


def shown_figures(table: pd.DataFrame) -> pd.DataFrame:
    """`table` (:func:`agreement_table`) with its figures rounded to :data:`SHOWN_DIGITS` decimals, as
    people see them (MLflow, the version's page): a rate to full precision is a fraction whose
    denominator is the vendor's exact count of series (0.23076923 is 3 of 13), which only the work
    directory's ``agreement.csv`` may hold; two decimals fit many counts."""
    return table.round({"kappa": SHOWN_DIGITS, "disagreement": SHOWN_DIGITS, "dice": SHOWN_DIGITS})


def _of(table: pd.DataFrame, model: str, version: str) -> pd.DataFrame:
    return table[(table.model == model) & (table.version == str(version))]


def metrics(table: pd.DataFrame, model: str, version: str) -> dict[str, float]:
    """``feedback.kappa.<vendor>``, ``feedback.disagreement.<vendor>`` and, for the segmenter,
    ``feedback.dice.<vendor>`` of one version of `model` (NaN figures left out: MLflow would store
    them, and a chart of NaN helps nobody). No count of series: counts people see are released under
    differential privacy (:mod:`dicomops.feedback.privacy`), and the exact ones stay in the work
    directory's ``agreement.csv``."""
    out: dict[str, float] = {}
    for row in _of(table, model, version).itertuples():
        for name in ("disagreement", "kappa", "dice"):
            value = float(getattr(row, name))
            if not math.isnan(value):
                out[f"feedback.{name}.{row.vendor}"] = value
    return out


def due(work: Path, cfg: FeedbackConfig, model: str, version: str, since: str,
        now: dt.datetime | None = None) -> str | None:
    return retrain_due(FeedbackStore(work).judgements(cfg), cfg, model, version, since, now)


def payload(name: str, version: str, reason: str, run_id: str) -> dict[str, Any]:
    return {"model": name, "version": str(version), "reason": reason, "feedback_run_id": run_id}


def plot_agreement(table: pd.DataFrame, model: str, version: str, cfg: FeedbackConfig, out: Path) -> Path:
    """Kappa and disagreement per vendor for one version of `model`, with the retrain threshold drawn
    in; for a model whose masks readers corrected (the segmenter), the mean Dice beside them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mine = _of(table, model, version)
    with_dice = bool(mine.dice.notna().any()) if len(mine) else False
    fig, axes = plt.subplots(1, 3 if with_dice else 2, figsize=(17 if with_dice else 12, 4.2), layout="constrained")
    if mine.empty:
        for ax in axes:
            ax.text(0.5, 0.5, "no reader feedback in the window", ha="center", va="center", transform=ax.transAxes)
            ax.set_xticks([])
            ax.set_yticks([])
    else:
        names = [str(v) for v in mine.vendor]
        kappa = mine.kappa.fillna(0).to_numpy()
        colours = ["#bbbbbb" if math.isnan(k) else "#c0504d" if k < cfg.min_kappa else "#4f81bd" for k in mine.kappa]
        axes[0].barh(names, kappa, color=colours)
        axes[0].axvline(cfg.min_kappa, color="#333333", linestyle="--", linewidth=1)
        axes[0].set_xlim(-1 if (kappa < 0).any() else 0, 1)
        axes[0].set_title(f"Cohen's kappa, model vs readers (grey: under {cfg.min_cases} series)\n"
                          f"dashed: retrain below {cfg.min_kappa}", fontsize=11)
        axes[0].invert_yaxis()
        for row, value in enumerate(mine.kappa):  # no bar is not a kappa of zero
            if math.isnan(value):
                axes[0].text(0.01, row, f"no figure: fewer than {cfg.min_cases} series", va="center",
                             color="#777777", fontsize=9)
        axes[1].barh(names, mine.disagreement.fillna(0).to_numpy(), color="#9bbb59")
        for row, value in enumerate(mine.disagreement):  # no bar is not "no disagreement"
            if math.isnan(value):
                axes[1].text(0.01, row, f"no figure: fewer than {cfg.min_cases} series", va="center",
                             color="#777777", fontsize=9)
        axes[1].set_xlim(0, 1)
        axes[1].set_title(f"Disagreement rate (last {cfg.window_days:g} days; none under {cfg.min_cases} series)",
                          fontsize=11)
        axes[1].invert_yaxis()
        if with_dice:
            axes[2].barh(names, mine.dice.fillna(0).to_numpy(), color="#8064a2")
            for row, value in enumerate(mine.dice):
                if math.isnan(value):
                    axes[2].text(0.01, row, f"no figure: fewer than {cfg.min_cases} corrected masks", va="center",
                                 color="#777777", fontsize=9)
            axes[2].set_xlim(0, 1)
            axes[2].set_title("Mean Dice, served mask vs the reader's corrected one\n"
                              "(series the readers call positive)", fontsize=11)
            axes[2].invert_yaxis()
    fig.suptitle(f"Agreement with readers, {model} version {version}", fontsize=12)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def record_agreement(tracking_uri: str, artifact_root: Path | None, experiment: str, name: str, version: str,
                     work: Path, cfg: FeedbackConfig, counts: dict[str, int],
                     tags: dict[str, str] | None = None) -> tuple[str, list[dict[str, Any]]]:
    """A ``feedback`` run in the monitoring experiment (figures, table, picture, `tags`) and the version's
    page; returns the run id and the version's agreement rows."""
    from dicomops.tracking import runs
    from dicomops.tracking.registry import describe_feedback

    exact = agreement_table(work, cfg)
    folder = WorkLayout(work).feedback.root
    folder.mkdir(parents=True, exist_ok=True)
    agreement_csv = io.write_csv(folder / "agreement.csv", exact)
    table = shown_figures(exact)
    pictures = folder / "pictures" / name  # one per model; each run logs its own as agreement.png
    pictures.mkdir(parents=True, exist_ok=True)
    picture = plot_agreement(table, name, version, cfg, pictures / "agreement.png")
    run_id = runs.start_run(tracking_uri, experiment, artifact_root, run_name="feedback",
                            tags={"stage": "feedback", "model": name, "model_version": str(version), **(tags or {})},
                            params={"feedback.window_days": cfg.window_days, "feedback.min_kappa": cfg.min_kappa,
                                    "feedback.corrections": cfg.corrections, "feedback.rule": cfg.conflict_rule})
    runs.log_metrics(tracking_uri, run_id, metrics(table, name, version) | {f"feedback.{k}": float(v) for k, v in counts.items()})
    runs.log_artifacts(tracking_uri, run_id, [privacy.shown(agreement_csv, table), picture], "feedback")
    runs.end_run(tracking_uri, run_id)
    rows = _of(table, name, version).to_dict("records")
    if rows:
        describe_feedback(tracking_uri, name, str(version), rows, cfg.window_days, run_id)
    return run_id, rows


def readers_source(feedback_work: Path, cfg: FeedbackConfig, source: Path, sources: list[Path], key: bytes,
                   snapshot: Path | None = None) -> Any:
    """The readers' labels resolved and versioned in `source`, with the reviewed clinical series that
    none of the labelled `sources` holds (``<source>/clinical``, a labelled corpus when there are any).

    A retrain passes `snapshot`: the version is copied there and the returned version names that copy,
    so that a feedback pass writing the next version meanwhile cannot change what it learns from.
    """
    import dataclasses
    import shutil

    from dicomops.feedback.clinical import known_series

    write_labels(feedback_work, cfg)
    version = version_labels(feedback_work, source, known_series(sources, key))
    if snapshot is None:
        return version
    shutil.rmtree(snapshot, ignore_errors=True)
    shutil.copytree(version.folder, snapshot)
    return dataclasses.replace(version, folder=snapshot)


def apply_to_retrain(source: Path, pool_work: Path, key: bytes) -> int:
    """The readers' labels of the version in `source` (:func:`readers_source`'s snapshot) into a retraining pool
    (:func:`apply_to_pool`), also for the clinical series whose UIDs the gate remapped once more;
    returns how many series carry a reader's label."""
    from dicomops.feedback.clinical import pool_aliases
    from dicomops.synthetic.sidecars import LABELS_CSV

    path = WorkLayout(pool_work).ingest.deid / LABELS_CSV
    if not path.exists():
        return 0
    resolved = io.read_table(source / "labels.csv")
    aliases = pool_aliases(resolved, key)
    pool_uid = {series: uid for uid, series in aliases.items()}
    remapped = resolved.assign(SeriesInstanceUID=resolved.SeriesInstanceUID.map(pool_uid), mask="")  # masks came along
    return apply_to_pool(pd.concat([resolved, remapped], ignore_index=True), path, source)
