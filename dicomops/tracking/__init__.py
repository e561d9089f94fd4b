"""MLflow wiring: where runs go, and the lineage tags every run carries."""

from __future__ import annotations

from dicomops.tracking.lineage import (
    dvc_directory_hash,
    git_commit,
    lineage_tags,
    package_versions,
    read_dvc_pointer,
)
from dicomops.tracking.runs import (
    configure_mlflow,
    end_run,
    ensure_experiment,
    flatten_params,
    log_artifacts,
    log_metrics,
    set_tags,
    start_run,
)

__all__ = [
    "configure_mlflow",
    "dvc_directory_hash",
    "end_run",
    "ensure_experiment",
    "flatten_params",
    "git_commit",
    "lineage_tags",
    "log_artifacts",
    "log_metrics",
    "package_versions",
    "read_dvc_pointer",
    "set_tags",
    "start_run",
]
