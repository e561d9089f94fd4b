#!/usr/bin/env bash
# Start the MLflow tracking server and UI. Defaults: the embedded store (SQLite + local artifacts)
# on localhost only; reviewers open http://127.0.0.1:${MLFLOW_PORT:-5000}.
# The same script runs the site server (infra/docker-compose.yml) with:
#   MLFLOW_BACKEND_STORE_URI  e.g. postgresql://user:pass@host/mlflow
#   MLFLOW_ARTIFACT_ROOT      e.g. s3://mlflow-artifacts/ (with MLFLOW_S3_ENDPOINT_URL for MinIO)
#   MLFLOW_AUTH=basic         basic auth; needs MLFLOW_AUTH_ADMIN_PASSWORD (no default) and
#                             MLFLOW_FLASK_SERVER_SECRET_KEY; users in MLFLOW_AUTH_DATABASE_URI
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
if [[ "${MLFLOW_AUTH:-}" == "basic" ]]; then  # checked first: a missing secret is the first thing to say
  : "${MLFLOW_AUTH_ADMIN_PASSWORD:?MLFLOW_AUTH=basic needs MLFLOW_AUTH_ADMIN_PASSWORD (there is no default)}"
  : "${MLFLOW_FLASK_SERVER_SECRET_KEY:?MLFLOW_AUTH=basic needs MLFLOW_FLASK_SERVER_SECRET_KEY}"
fi
mlflow_bin="${here}/../.venv/bin/mlflow"
[[ -x "${mlflow_bin}" ]] || mlflow_bin="$(command -v mlflow || true)"
[[ -n "${mlflow_bin}" ]] || { echo "mlflow not found: run 'make venv' (it installs .venv) or put mlflow on PATH" >&2; exit 1; }
args=(server
  --backend-store-uri "${MLFLOW_BACKEND_STORE_URI:-sqlite:///${here}/mlflow.db}"
  --default-artifact-root "${MLFLOW_ARTIFACT_ROOT:-${here}/artifacts}"
  --host "${MLFLOW_HOST:-127.0.0.1}" --port "${MLFLOW_PORT:-5000}")
if [[ "${MLFLOW_AUTH:-}" == "basic" ]]; then
  config="$(mktemp -t mlflow-auth.XXXXXX.ini)"
  sed -e "s|^database_uri = .*|database_uri = ${MLFLOW_AUTH_DATABASE_URI:-sqlite:///${here}/basic_auth.db}|" \
      -e "s|^admin_username = .*|admin_username = ${MLFLOW_ADMIN_USER:-admin}|" \
      "${here}/basic_auth.ini" > "${config}"
  export MLFLOW_AUTH_CONFIG_PATH="${config}"
  args+=(--app-name basic-auth)
fi
exec "${mlflow_bin}" "${args[@]}"
