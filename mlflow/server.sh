#!/usr/bin/env bash
# Start the MLflow tracking server and UI on the embedded store (SQLite + local artifacts), on
# localhost only. Reviewers open http://127.0.0.1:${MLFLOW_PORT:-5000}.
# For a multi-user site use infra/ (PostgreSQL + S3-compatible artifacts + basic auth) instead.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
exec "${here}/../.venv/bin/mlflow" server \
  --backend-store-uri "${MLFLOW_BACKEND_STORE_URI:-sqlite:///${here}/mlflow.db}" \
  --default-artifact-root "${MLFLOW_ARTIFACT_ROOT:-${here}/artifacts}" \
  --host "${MLFLOW_HOST:-127.0.0.1}" --port "${MLFLOW_PORT:-5000}"
