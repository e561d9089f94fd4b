# The dicomops image: the worker of infra/docker-compose.yml and the MLflow server.
FROM python:3.11-slim
ENV PIP_NO_CACHE_DIR=1 PYTHONDONTWRITEBYTECODE=1 DICOMOPS_PROJECT_DIR=/app
# Telemetry off in every process of the image (worker, flow runs, MLflow server).
ENV PREFECT_SERVER_ANALYTICS_ENABLED=false DO_NOT_TRACK=1 MLFLOW_DISABLE_TELEMETRY=true \
    GX_ANALYTICS_ENABLED=false
WORKDIR /app
# CPU torch first: a bare 'torch' can pull a multi-GB CUDA build.
RUN pip install "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu
COPY pyproject.toml README.md ./
COPY dicomops ./dicomops
COPY tasks ./tasks
COPY flows ./flows
RUN pip install ".[dask,server,online]"
COPY prefect.yaml ./
COPY mlflow/server.sh mlflow/basic_auth.ini ./mlflow/
RUN useradd --create-home --uid 10001 dicomops && mkdir -p /work && chown dicomops /work
USER dicomops
