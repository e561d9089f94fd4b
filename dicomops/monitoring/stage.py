"""The monitoring stage between the flows: the batch's features, the reference at training time,
the drift-share history picture, and the sources a retrain trains on."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from dicomops import io
from dicomops.layout import WorkLayout
from dicomops.monitoring.features import feature_table
from dicomops.monitoring.reference import build_reference, store_reference
from dicomops.preprocessing.stage import WITHHELD_REASONS
from dicomops.synthetic.sidecars import LABELS_CSV, MASKS_DIR, SIDECAR_FILES, mask_path
from dicomops.tracking import runs
from dicomops.training.model import load_trained
from dicomops.training.scoring import SeriesRule


def batch_features(batch_work: Path, tracking_uri: str, run_id: str) -> pd.DataFrame:
    """Features of every preprocessed series of a batch, scored by the model of training run `run_id`."""
    features = WorkLayout(batch_work).preprocessed.features
    if not features.exists() or pd.read_parquet(features).empty:  # no series went through preprocessing
        return pd.DataFrame()
    model, cfg, k = load_trained(tracking_uri, run_id)
    return feature_table(batch_work, model, k, cfg.input_size, SeriesRule.of(cfg))


def reference_for_version(work: Path, tracking_uri: str, name: str, version: str) -> str:
    """At training time: the training features scored by the new version, stored with it."""
    mv = runs.configure_mlflow(tracking_uri).get_model_version(name, version)
    model, cfg, k = load_trained(tracking_uri, str(mv.run_id))
    table = build_reference(work, model, k, cfg.input_size, SeriesRule.of(cfg))
    layout = WorkLayout(work)
    summary = layout.ingest.summary
    if summary.exists():
        share = io.read_json(summary)["quarantined_share"]
        runs.configure_mlflow(tracking_uri).set_model_version_tag(name, version, "monitoring.reference_quarantine_share",
                                                                  f"{share:.6f}")
    return store_reference(tracking_uri, name, version, str(mv.run_id), table, layout.train.root)


def quarantine_counts(batch_work: Path) -> tuple[int, int]:
    """(files the batch cannot use, files): those the gate quarantined; and, when every series it
    accepted then failed to preprocess, those too (such a batch was judged on nothing and its run
    failed). A batch that lost some series there is counted as the training reference is, by its
    gate alone (the reference's share, ``monitoring.reference_quarantine_share``, is the gate's)."""
    layout = WorkLayout(batch_work)
    if not layout.ingest.summary.exists():
        return 0, 0
    s = io.read_json(layout.ingest.summary)
    lost = 0
    if layout.preprocessed.failures.exists() and layout.ingest.instances.exists():
        listed = io.read_table(layout.preprocessed.failures)
        # A series whose label was withheld was preprocessed and judged: not lost.
        failed = set(listed[~listed.reason.isin(WITHHELD_REASONS)].SeriesInstanceUID)
        series = pd.read_parquet(layout.ingest.instances, columns=["SeriesInstanceUID"]).SeriesInstanceUID.astype(str)
        if len(series) and set(series) <= failed:
            lost = len(series)
    return int(s["quarantined_files"]) + lost, int(s["files"])


def drift_history(tracking_uri: str, experiment: str, name: str, out: Path, threshold: float) -> Path | None:
    """Drift share of the successive monitoring runs of model `name`, as a picture."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    client = runs.configure_mlflow(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return None
    found = client.search_runs([exp.experiment_id], filter_string=f"tags.model = '{name}' and tags.stage = 'monitor'",
                               order_by=["attributes.start_time ASC"], max_results=500)
    points = [(r.info.start_time, r.data.metrics["drift_share"], r.data.tags.get("drift.status", ""))
              for r in found if "drift_share" in r.data.metrics]
    if not points:
        return None
    fig, ax = plt.subplots(figsize=(7, 3.2))
    xs = list(range(1, len(points) + 1))
    ax.plot(xs, [p[1] for p in points], "-", color="0.6")
    for x, (_, share, status) in zip(xs, points, strict=True):
        ax.plot(x, share, "o", color="tab:red" if status == "drift" else "tab:green")
    ax.axhline(threshold, ls="--", color="tab:red", lw=1, label=f"drift share threshold {threshold}")
    ax.set(xlabel="monitoring run", ylabel="share of drifted columns", ylim=(0, 1), title=f"Drift share, {name}")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def record_batch(work: Path, batch_id: str, src: Path) -> Path:
    """Remember where a batch came from (kept in WORK only: a folder name may carry PHI); return the
    batch's own work directory."""
    batch = WorkLayout(work).batch(batch_id)
    io.write_json(batch.batch_record, {"batch_id": batch_id, "src": str(src)})
    return batch.root


def retrain_folders(work: Path) -> tuple[Path, Path]:
    """Where a retrain combines its labelled sources, and its own work directory."""
    layout = WorkLayout(work)
    return layout.retrain_sources, layout.retrain_work.root


def check_training_source(training_source: Path) -> None:
    """Raise :class:`~dicomops.errors.RetrainNotReadyError` unless `training_source` holds a labelled
    corpus: a relative path (the default ``data``) read from another folder than the project's
    does not, and a retrain found out only after its alert, with a FileNotFoundError."""
    from dicomops.errors import RetrainNotReadyError

    if not (Path(training_source) / LABELS_CSV).is_file():
        raise RetrainNotReadyError(
            f"monitor.training_source ({Path(training_source).absolute()}) holds no labelled corpus ({LABELS_CSV}): "
            "set it to the corpus the model was trained on, as an absolute path when the command runs from "
            "another folder than the project's")


def labelled_sources(work: Path, training_source: Path) -> list[Path]:
    """The original corpus and every monitored folder whose labels have arrived (``labels.csv``),
    each folder once (by resolved path): the nightly ``monitor`` deployment records the same
    ``incoming/`` for every batch, and what it holds now is all a retrain can read of it."""
    sources = [Path(training_source)]
    seen = {Path(training_source).resolve()}
    for batch in WorkLayout(work).batches():
        if not batch.batch_record.exists():
            continue
        src = Path(io.read_json(batch.batch_record)["src"])
        if (src / LABELS_CSV).exists() and src.resolve() not in seen:
            seen.add(src.resolve())
            sources.append(src)
    return sources


def reset_retrain_work(work: Path, pool: str) -> str:
    """Make the retrain's work directory hold no training state of another pool than `pool` (see
    :func:`dicomops.monitoring.guard.pool_identity`), and say what was done.

    On a new pool the classifier's and the segmenter's state, checkpoints and final models go, with
    their completion records: their keys do not see the readers' labels, so a crashed retrain of the
    old pool would otherwise be resumed with the new labels. The ingest and preprocessing caches (keyed
    by content) and the split (carried over by :func:`split_retrain_pool`) stay. The same pool (a
    retrain run again after a crash) keeps everything, so it resumes.
    """
    import shutil

    from dicomops import stages

    layout = WorkLayout(work)
    record = layout.retrain_pool
    if record.exists() and io.read_json(record).get("pool") == pool:
        return "the retrain work holds this pool's training state; a crashed training resumes"
    target = layout.retrain_work
    for folder in (target.train.root, target.segment.root):
        if folder.exists():
            shutil.rmtree(folder)
    for stage in ("train", "segment"):
        stages.clear(target.root, stage)
    io.write_json(record, {"pool": pool})
    return "a new labelled pool: the retrain work's earlier training state was cleared"


def split_retrain_pool(retrain_work: Path, n_splits: int, seed: int) -> str:
    """Split the retrain's preprocessed, labelled pool, carrying the earlier retrain's folds over
    (:func:`dicomops.training.splits.refresh_folds`); return the line that says how."""
    from dicomops.training.splits import refresh_folds

    layout = WorkLayout(retrain_work)
    return refresh_folds(layout, layout.labelled_series(), n_splits, seed)[1]


def combine_sources(sources: list[Path], out: Path) -> Path:
    """One folder over several labelled corpora: each under ``s<i>/`` as file symlinks, one merged
    ``labels.csv`` and the masks in ``masks/``. A series two sources label (a batch monitored again,
    a reader's later label) keeps the later source's row: the gate refuses two rows for one series."""
    import shutil

    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    labels = []
    for i, src in enumerate(sources):
        prefix = f"s{i}"
        table = io.read_table(src / LABELS_CSV)
        table["mask_path"] = [mask_path(f"{prefix}-{Path(str(p)).stem}") if p else "" for p in table.mask_path]
        table["series_dir"] = [f"{prefix}/{d}" for d in table.series_dir]
        labels.append(table)
        for dirpath, _, files in os.walk(src):
            rel = Path(dirpath).relative_to(src)
            is_mask = rel.parts[:1] == (MASKS_DIR,)
            target_dir = out / MASKS_DIR if is_mask else out / prefix / rel
            for name in files:
                if rel == Path(".") and name in SIDECAR_FILES:
                    continue
                target_dir.mkdir(parents=True, exist_ok=True)
                (target_dir / (f"{prefix}-{name}" if is_mask else name)).symlink_to(Path(dirpath).resolve() / name)
    merged = pd.concat(labels, ignore_index=True)
    merged = merged[~merged.SeriesInstanceUID.astype(str).str.strip().duplicated(keep="last")]
    io.write_csv(out / LABELS_CSV, merged)
    return out
