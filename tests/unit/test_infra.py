"""The server stack in infra/: services present, every port bound to localhost, no password with a
default; the Kubernetes base job template is a valid Prefect template; the MLflow script refuses
basic auth without an admin password."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
SECRETS = ("POSTGRES_PASSWORD", "MINIO_ROOT_PASSWORD", "MLFLOW_ADMIN_PASSWORD", "MLFLOW_FLASK_SECRET_KEY",
           "PREFECT_AUTH_STRING", "DICOMOPS_DEID_KEY", "MINIO_ROOT_USER", "DICOMOPS_PACS_PASSWORD",
           "DICOMOPS_REDIS_PASSWORD")


def _compose() -> dict:
    return yaml.safe_load((ROOT / "infra" / "docker-compose.yml").read_text())


def test_compose_has_the_stack_and_binds_every_port_to_localhost() -> None:
    services = _compose()["services"]
    assert {"postgres", "minio", "mlflow", "prefect-server", "prefect-worker", "orthanc", "redis"} <= set(services)
    published = [(name, port) for name, svc in services.items() for port in svc.get("ports", [])]
    assert len(published) >= 5
    for name, port in published:
        assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} beyond localhost"
    mlflow, prefect = services["mlflow"]["environment"], services["prefect-server"]["environment"]
    assert mlflow["MLFLOW_AUTH"] == "basic" and "MLFLOW_AUTH_ADMIN_PASSWORD" in mlflow
    assert prefect["PREFECT_SERVER_API_CSRF_PROTECTION_ENABLED"] == "true"
    assert "PREFECT_SERVER_API_AUTH_STRING" in prefect
    assert services["prefect-worker"]["build"]["dockerfile"] == "Dockerfile" and (ROOT / "Dockerfile").exists()


def test_no_secret_has_a_default() -> None:
    text = (ROOT / "infra" / "docker-compose.yml").read_text()
    for secret in SECRETS:
        uses = re.findall(r"(?<!\$)\$\{" + secret + r"([^}]*)\}", text)  # $${...}: a container's own
        assert uses, secret
        for suffix in uses:
            assert suffix.startswith(":?"), f"${{{secret}{suffix}}} gives {secret} a default or lets it be empty"
    example = dict(line.split("=", 1) for line in (ROOT / "infra" / ".env.example").read_text().splitlines()
                   if line and not line.startswith("#"))
    for secret in SECRETS:
        if "PASSWORD" in secret or "KEY" in secret or "AUTH" in secret:
            assert example[secret] == "", f"{secret} has a value in .env.example"


def test_kubernetes_base_job_template_is_a_prefect_template() -> None:
    template = json.loads((ROOT / "infra" / "k8s" / "base-job-template.json").read_text())
    assert set(template) == {"job_configuration", "variables"}
    manifest = template["job_configuration"]["job_manifest"]
    assert manifest["kind"] == "Job" and manifest["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"]
    placeholders = set(re.findall(r"\{\{ (\w+) \}\}", json.dumps(template["job_configuration"])))
    assert placeholders <= set(template["variables"]["properties"])


def test_mlflow_server_script_refuses_basic_auth_without_an_admin_password(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update({"MLFLOW_AUTH": "basic", "MLFLOW_FLASK_SERVER_SECRET_KEY": "x"})
    result = subprocess.run(["bash", str(ROOT / "mlflow" / "server.sh")], env=env, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode != 0 and "MLFLOW_AUTH_ADMIN_PASSWORD" in result.stderr


def test_the_ddp_job_meets_at_pod_0_with_as_many_agents_as_pods() -> None:
    import yaml

    from dicomops.segmentation.ddp import parse_args

    service, job = list(yaml.safe_load_all((ROOT / "infra" / "k8s" / "segment-ddp.yaml").read_text()))
    spec = job["spec"]
    pod = spec["template"]["spec"]
    command = pod["containers"][0]["command"]
    flags = dict(a.removeprefix("--").split("=", 1) for a in command if a.startswith("--") and "=" in a)
    assert command[0] == "torchrun" and spec["completionMode"] == "Indexed"
    assert int(flags["nnodes"]) == spec["completions"] == spec["parallelism"]
    assert flags["node-rank"] == "$(JOB_COMPLETION_INDEX)"
    assert flags["master-addr"] == f"{job['metadata']['name']}-0.{pod['subdomain']}"
    assert service["spec"]["clusterIP"] == "None" and pod["subdomain"] == service["metadata"]["name"]
    assert pod["securityContext"]["runAsNonRoot"]
    module_args = command[command.index("dicomops.segmentation.ddp") + 1:]
    args = parse_args(module_args)  # what torchrun hands the module is what the module accepts
    assert str(args.work) == "/work" and args.fold == 0


def test_the_worker_reaches_the_pacs_and_the_cache_and_orthanc_indexes_in_postgresql() -> None:
    """The Compose stack's clinical side: the worker's deployments find the PACS and Redis by their
    service names, with the passwords the servers are started with; Orthanc's index settings are
    the ones `tests/integration/test_pacs_index.py` runs against a real PostgreSQL."""
    from dicomops.pacs.client import URL_ENV
    from dicomops.pacs.orthanc import OrthancIndex
    from dicomops.serving.cache import URL_ENV as REDIS_URL_ENV

    compose = _compose()
    services, worker = compose["services"], compose["x-worker-env"]
    assert worker[URL_ENV] == "http://orthanc:8042" and worker[REDIS_URL_ENV] == "redis://redis:6379/0"
    for name in ("DICOMOPS_PACS_PASSWORD", "DICOMOPS_REDIS_PASSWORD"):
        server = services["orthanc" if "PACS" in name else "redis"]["environment"][name]
        assert worker[name] == server and server.startswith("${" + name + ":?")
    assert {"orthanc", "redis"} <= set(services["prefect-worker"]["depends_on"])
    index = json.loads(compose["configs"]["orthanc-index"]["content"].replace(
        "$${ORTHANC_INDEX_PASSWORD}", "from-the-environment"))
    assert index["PostgreSQL"] == OrthancIndex("postgres", 5432, "orthanc", "dicomops",
                                               "from-the-environment").settings()
    assert services["orthanc"]["environment"]["ORTHANC_INDEX_PASSWORD"].startswith("${POSTGRES_PASSWORD:?")
    assert "CREATE DATABASE orthanc;" in (ROOT / "infra" / "postgres" / "init.sql").read_text()
    assert "requirepass $$DICOMOPS_REDIS_PASSWORD" in services["redis"]["entrypoint"][-1]
    assert not services["redis"].get("ports")  # the worker's alone
