"""What a leak test of counts checks: nothing a run shows people (its tables, summaries and metrics,
and those of its nested runs) carries an exact count; the counts people see are released under
differential privacy (:mod:`dicomops.feedback.privacy`)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
from mlflow.tracking import MlflowClient

from dicomops.feedback.privacy import EXACT_COUNT_COLUMNS


def assert_no_exact_counts(client: MlflowClient, run_id: str, scratch: Path) -> int:
    """Download `run_id`'s artifacts and its children's; fail on an exact-count column, key or metric.
    Returns how many tables were read (so a caller can tell the scan was not empty)."""
    run = client.get_run(run_id)
    children = client.search_runs([run.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{run_id}'")
    tables = 0
    for one in [run, *children]:
        counts = set(one.data.metrics) & EXACT_COUNT_COLUMNS
        counts |= {k for k in one.data.metrics if k.startswith("feedback.series.")}
        assert not counts, f"run {one.info.run_name} logs exact counts as metrics: {sorted(counts)}"
        folder = Path(client.download_artifacts(one.info.run_id, "", str(scratch / one.info.run_id)))
        for csv in folder.rglob("*.csv"):
            columns = set(pd.read_csv(csv, nrows=0).columns) & EXACT_COUNT_COLUMNS
            assert not columns, f"{csv.relative_to(folder)} of run {one.info.run_name} has exact counts: {columns}"
            tables += 1
        for doc in folder.rglob("summary.json"):
            keys = set(json.loads(doc.read_text())) & EXACT_COUNT_COLUMNS
            assert not keys, f"{doc.relative_to(folder)} of run {one.info.run_name} has exact counts: {keys}"
    return tables
