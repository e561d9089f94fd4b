"""Compare a batch's features with the reference: Evidently for the report people read, and the
decision (drift, no drift, insufficient data) with the columns that moved."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy.stats import binomtest

from dicomops import io
from dicomops.config import MonitorConfig
from dicomops.monitoring.features import categorical_columns, embedding_columns, numeric_columns

EMBEDDING = "embedding"
TSNE_PERPLEXITY = 30  # what Evidently's picture of the embeddings needs fewer rows than


@dataclass(frozen=True)
class ColumnDrift:
    column: str
    kind: str  # numerical | categorical | embedding
    method: str
    score: float  # p-value (ks, chisquare), distance (wasserstein, jensenshannon), or the embedding's ROC AUC
    threshold: float
    drifted: bool
    critical: bool


@dataclass
class DriftSummary:
    status: str  # "drift" | "no drift" | "insufficient data"
    n_series: int
    reference_series: int
    drift_share: float
    threshold_share: float
    drifted_columns: list[str] = field(default_factory=list)
    critical_drifted: list[str] = field(default_factory=list)
    columns: list[ColumnDrift] = field(default_factory=list)
    quarantine: dict[str, Any] = field(default_factory=dict)
    reasons: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def drift(self) -> bool:
        return self.status == "drift"

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["columns"] = {c.column: {k: v for k, v in asdict(c).items() if k != "column"} for c in self.columns}
        return out


DISTANCES = ("wasserstein", "jensenshannon")


def _threshold(method: str, critical: bool, cfg: MonitorConfig) -> float:
    if method in DISTANCES:  # a distance: drift at or above; no stricter level for critical columns
        return cfg.distance_threshold
    return cfg.critical_p_value if critical else cfg.column_p_value


def _evidently_report(reference: pd.DataFrame, current: pd.DataFrame, cfg: MonitorConfig,
                      numeric: list[str], categorical: list[str], embeddings: list[str]) -> Any:
    from evidently import DataDefinition, Dataset, Report
    from evidently.metrics import EmbeddingsDrift
    from evidently.metrics.embeddings import ModelDriftMethod
    from evidently.presets import DataDriftPreset

    definition = DataDefinition(numerical_columns=numeric, categorical_columns=categorical,
                                embeddings={EMBEDDING: embeddings} if embeddings else None)
    used = [*numeric, *categorical, *embeddings]  # nothing else reaches the report
    methods = {**{c: cfg.numeric_test for c in numeric}, **{c: cfg.categorical_test for c in categorical}}
    thresholds = {c: _threshold(methods[c], c in cfg.critical_columns, cfg) for c in numeric + categorical}
    metrics: list[Any] = [DataDriftPreset(columns=numeric + categorical, per_column_method=methods,
                                          per_column_threshold=thresholds, drift_share=cfg.drift_share)]
    if embeddings:
        metrics.append(EmbeddingsDrift(embeddings_name=EMBEDDING, drift_method=ModelDriftMethod(
            bootstrap=True, quantile_probability=cfg.embedding_quantile)))
    report = Report(metrics, include_tests=True)
    return report.run(current_data=Dataset.from_pandas(current[used], data_definition=definition),
                      reference_data=Dataset.from_pandas(reference[used], data_definition=definition))


def _column_results(snapshot: dict[str, Any], cfg: MonitorConfig) -> list[ColumnDrift]:
    """Per-column method, p-value, threshold and drift flag from the snapshot's dict."""
    failed = {t["metric_config"]["metric_id"]: t["status"] == "FAIL" for t in snapshot.get("tests", [])}
    out = []
    for metric in snapshot["metrics"]:
        config = metric["config"]
        if config["type"].endswith(":ValueDrift"):
            column = config["column"]
            method, score, threshold = config["method"], float(metric["value"]), float(config["threshold"])
            fallback = score >= threshold if method in DISTANCES else score < threshold
            out.append(ColumnDrift(column, "categorical" if column in categorical_columns() else "numerical",
                                   method, score, threshold, bool(failed.get(metric["id"], fallback)),
                                   column in cfg.critical_columns))
    return out


def _embedding_drift(reference: pd.DataFrame, current: pd.DataFrame, columns: list[str],
                     cfg: MonitorConfig) -> ColumnDrift:
    """Evidently's domain-classifier method, called for its verdict (the report only keeps the score)."""
    from evidently.metrics.embeddings import ModelDriftMethod

    method = ModelDriftMethod(bootstrap=True, quantile_probability=cfg.embedding_quantile)
    score, drifted, _ = method(current[columns].copy(), reference[columns].copy())
    return ColumnDrift(EMBEDDING, "embedding", "domain classifier (bootstrap)", float(score),
                       cfg.embedding_quantile, bool(drifted), EMBEDDING in cfg.critical_columns)


def quarantine_check(reference_share: float, quarantined: int, total: int, cfg: MonitorConfig) -> dict[str, Any]:
    """Is the batch's quarantined share higher than the training ingest's? One-sided binomial test."""
    if total == 0:
        return {"quarantined": 0, "files": 0, "share": 0.0, "reference_share": reference_share, "p_value": 1.0,
                "drifted": False}
    p = binomtest(quarantined, total, max(reference_share, 1e-4), alternative="greater").pvalue
    return {"quarantined": quarantined, "files": total, "share": quarantined / total,
            "reference_share": reference_share, "p_value": float(p), "drifted": bool(p < cfg.quarantine_p_value)}


def compare(reference: pd.DataFrame, current: pd.DataFrame, cfg: MonitorConfig, out: Path,
            quarantine: dict[str, Any] | None = None) -> DriftSummary:
    """Run the report (``out/report.html``, ``out/summary.json``) and decide."""
    from threadpoolctl import threadpool_limits

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    quarantine = quarantine or {}
    base = DriftSummary("insufficient data", len(current), len(reference), 0.0, cfg.drift_share, quarantine=quarantine)
    if len(current) < cfg.min_series:
        base.reasons.append(f"{len(current)} series in the batch, fewer than min_series={cfg.min_series}: "
                            "no decision is made on so little data")
        if quarantine.get("drifted"):  # file counts, not series: this test has its own sample
            base.status = "drift"
            base.reasons.append(f"quarantined share {quarantine['share']:.1%} is above the training ingest's "
                                f"{quarantine['reference_share']:.1%} (p={quarantine['p_value']:.1e})")
        io.write_json(out / "summary.json", base.to_dict())
        return base
    numeric = [c for c in numeric_columns() if c in reference and c in current]
    categorical = [c for c in categorical_columns() if c in reference and c in current]
    embeddings = [c for c in embedding_columns(reference) if c in current]
    # Embedding drift runs a t-SNE for its chart; with free threads it stalls on a busy 2-core box.
    notes = []
    drawn = embeddings
    if embeddings and len(reference) + len(current) <= TSNE_PERPLEXITY:
        # Evidently draws the embeddings with scikit-learn's t-SNE at its default perplexity (30),
        # which refuses 30 rows or fewer; the verdict does not need the picture (_embedding_drift).
        drawn = []
        notes.append(f"embedding chart omitted from the report ({len(reference) + len(current)} series with the "
                     f"reference, a t-SNE needs more than {TSNE_PERPLEXITY}); its test still ran")
    with threadpool_limits(limits=1):
        try:
            snapshot = _evidently_report(reference, current, cfg, numeric, [], drawn)
        except np.linalg.LinAlgError as err:  # the embedding chart's KDE needs more than a handful of rows
            notes.append(f"embedding chart omitted from the report ({type(err).__name__}); its test still ran")
            snapshot = _evidently_report(reference, current, cfg, numeric, [], [])
        columns = _column_results(snapshot.dict(), cfg)
        if categorical:
            # Tested, never drawn: the report's bar charts would show how many of the batch's series
            # each scanner model made, exact, and a batch is small (one night, one rare scanner).
            # Counts people see are released under differential privacy (dicomops.feedback.privacy).
            columns += _column_results(_evidently_report(reference, current, cfg, [], categorical, []).dict(), cfg)
            notes.append(f"categorical columns ({', '.join(categorical)}) are tested but not drawn in the report: "
                         "its charts would show exact counts per scanner; their verdicts are in summary.json")
        if embeddings:
            columns.append(_embedding_drift(reference, current, embeddings, cfg))
    snapshot.save_html(str(out / "report.html"))
    drifted = [c.column for c in columns if c.drifted]
    critical = [c.column for c in columns if c.drifted and c.critical]
    share = len(drifted) / max(len(columns), 1)
    summary = DriftSummary("no drift", len(current), len(reference), share, cfg.drift_share, drifted, critical,
                           columns, quarantine, notes=notes)
    if share >= cfg.drift_share:
        summary.reasons.append(f"{len(drifted)} of {len(columns)} columns drifted (share {share:.2f} >= "
                               f"{cfg.drift_share})")
    if critical:
        summary.reasons.append(f"critical column(s) drifted: {', '.join(critical)}")
    if quarantine.get("drifted"):
        summary.reasons.append(f"quarantined share {quarantine['share']:.1%} is above the training ingest's "
                               f"{quarantine['reference_share']:.1%} (p={quarantine['p_value']:.1e})")
    if summary.reasons:
        summary.status = "drift"
    io.write_json(out / "summary.json", summary.to_dict())
    return summary


def describe(summary: DriftSummary) -> str:
    """One line for logs and alerts."""
    if summary.status == "insufficient data":
        return f"insufficient data: {summary.n_series} series, no decision"
    moved = ", ".join(summary.drifted_columns) or "none"
    return f"{summary.status}: drift share {summary.drift_share:.2f}, columns that moved: {moved}"
