"""prefect.yaml: every deployment's entrypoint imports and takes its parameters; the monitor is
scheduled; the retrain trigger is a valid Prefect event trigger that maps the event's payload."""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path

import yaml
from pydantic import TypeAdapter

ROOT = Path(__file__).resolve().parents[2]


def _deployments() -> dict[str, dict]:
    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    return {d["name"]: d for d in spec["deployments"]}


def test_entrypoints_exist_and_accept_their_parameters() -> None:
    deployments = _deployments()
    assert set(deployments) == {"pipeline", "monitor", "retrain"}
    for deployment in deployments.values():
        module, name = deployment["entrypoint"].removesuffix(".py").replace("/", ".").split(":")
        flow = getattr(importlib.import_module(module.replace(".py", "")), name)
        accepted = set(inspect.signature(flow.fn).parameters)
        assert set(deployment.get("parameters", {})) <= accepted, deployment["name"]
        for trigger in deployment.get("triggers", []):
            assert set(trigger.get("parameters", {})) <= accepted


def test_monitor_runs_nightly_and_hands_retraining_to_the_event() -> None:
    from prefect.client.schemas.schedules import CronSchedule

    from dicomops.config import PipelineConfig

    monitor = _deployments()["monitor"]
    (schedule,) = monitor["schedules"]
    assert CronSchedule(cron=schedule["cron"], timezone=schedule["timezone"]).cron == "0 2 * * *"
    assert schedule["active"]
    assert PipelineConfig.model_validate(monitor["parameters"]["config"]).monitor.retrain == "event"


def test_retrain_trigger_is_a_valid_prefect_event_trigger() -> None:
    from prefect.events.schemas.deployment_triggers import DeploymentTriggerTypes

    from dicomops.monitoring.alerts import EVENT, resource

    (raw,) = _deployments()["retrain"]["triggers"]
    trigger = TypeAdapter(DeploymentTriggerTypes).validate_python(raw)
    assert trigger.expect == {EVENT}
    pattern = str(next(iter(trigger.match.model_dump().values())))
    assert resource("m", "1")["prefect.resource.id"].startswith(pattern.removesuffix("*"))
    assert trigger.parameters["monitoring_run_id"] == "{{ event.payload.monitoring_run_id }}"
