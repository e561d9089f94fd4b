"""What a drift alert says, and where it is recorded. Nothing here may carry PHI: the payload names
the model, the monitoring run, the batch's content hash, counts and column names, never a patient,
a UID, a date or a path under the batch."""

from __future__ import annotations

import datetime as dt
import json
import os
from pathlib import Path
from typing import Any

from dicomops.layout import WorkLayout
from dicomops.monitoring.drift import DriftSummary

EVENT = "dicomops.drift.detected"


def resource(name: str, version: str) -> dict[str, str]:
    """The Prefect event resource: the watched model version."""
    return {"prefect.resource.id": f"dicomops.model.{name}", "prefect.resource.name": name,
            "dicomops.model.version": str(version)}


def payload(summary: DriftSummary, name: str, version: str, monitoring_run_id: str, batch_id: str) -> dict[str, Any]:
    return {"model": name, "version": str(version), "monitoring_run_id": monitoring_run_id, "batch_id": batch_id,
            "status": summary.status, "drift_share": round(summary.drift_share, 4),
            "drifted_columns": list(summary.drifted_columns), "critical_columns": list(summary.critical_drifted),
            "n_series": summary.n_series, "reasons": list(summary.reasons)}


def append_alert(work: Path, record: dict[str, Any]) -> Path:
    """Append one JSON line to ``WORK/alerts.jsonl`` (one write call; readers never see half a line)."""
    path = WorkLayout(work).alerts
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps({"time": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "event": EVENT, **record},
                      sort_keys=True) + "\n"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)
    return path


def read_alerts(work: Path) -> list[dict[str, Any]]:
    path = WorkLayout(work).alerts
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def message(record: dict[str, Any]) -> str:
    """The notification text."""
    return (f"Drift on {record['model']} v{record['version']} (batch {record['batch_id']}, {record['n_series']} series): "
            f"share {record['drift_share']:.2f}; moved: {', '.join(record['drifted_columns']) or 'none'}. "
            f"Monitoring run {record['monitoring_run_id']}. " + " ".join(record["reasons"]))
