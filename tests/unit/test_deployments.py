"""prefect.yaml: every deployment's entrypoint imports and takes its parameters; the monitor is
scheduled; the retrain trigger is a valid Prefect event trigger that maps the event's payload; the
PACS watch runs every minute, one run at a time, and names the event its flow emits."""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path

import pytest
import yaml
from pydantic import TypeAdapter

ROOT = Path(__file__).resolve().parents[2]


def _deployments() -> dict[str, dict]:
    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    return {d["name"]: d for d in spec["deployments"]}


def test_entrypoints_exist_and_accept_their_parameters() -> None:
    deployments = _deployments()
    assert set(deployments) == {"pipeline", "monitor", "monitor-pacs", "retrain", "pacs-watch", "feedback", "predict"}
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
    inflow = _deployments()["monitor-pacs"]  # the clinical inflow, half an hour later, the same way
    (schedule,) = inflow["schedules"]
    assert CronSchedule(cron=schedule["cron"], timezone=schedule["timezone"]).cron == "30 2 * * *"
    assert inflow["parameters"]["pacs"] is True and "src" not in inflow["parameters"]
    assert PipelineConfig.model_validate(inflow["parameters"]["config"]).monitor.retrain == "event"


def test_retrain_trigger_is_a_valid_prefect_event_trigger() -> None:
    from prefect.events.schemas.deployment_triggers import DeploymentTriggerTypes

    from dicomops.feedback import stage
    from dicomops.monitoring.alerts import EVENT, resource

    drift, feedback = (TypeAdapter(DeploymentTriggerTypes).validate_python(raw)
                       for raw in _deployments()["retrain"]["triggers"])
    assert drift.expect == {EVENT} and feedback.expect == {stage.EVENT}
    for trigger in (drift, feedback):
        pattern = str(next(iter(trigger.match.model_dump().values())))
        assert resource("m", "1")["prefect.resource.id"].startswith(pattern.removesuffix("*"))
    assert drift.parameters["monitoring_run_id"] == "{{ event.payload.monitoring_run_id }}"
    # The feedback event's payload carries the run the trigger passes on.
    assert feedback.parameters == {"trigger": "feedback", "monitoring_run_id": "{{ event.payload.feedback_run_id }}"}
    assert "feedback_run_id" in stage.payload("m", "1", "why", "run")


def test_pacs_watch_runs_every_minute_on_the_pacs_watch_flow() -> None:
    from datetime import timedelta

    from prefect.client.schemas.schedules import IntervalSchedule

    from dicomops.stack import PACS_WATCH
    from flows.pacs_watch import pacs_watch

    watch = _deployments()["pacs-watch"]
    assert watch["entrypoint"] == "flows/pacs_watch.py:pacs_watch" and (ROOT / "flows/pacs_watch.py").is_file()
    # `dicomops serve` pauses it by these names when no PACS runs.
    assert (pacs_watch.name, watch["name"]) == PACS_WATCH
    # Every parameter has a default: a scheduled run passes none (the PACS's URL comes from the worker's env).
    assert all(p.default is not inspect.Parameter.empty for p in inspect.signature(pacs_watch.fn).parameters.values())
    assert not watch.get("parameters")
    (raw,) = watch["schedules"]
    schedule = IntervalSchedule(interval=timedelta(seconds=raw["interval"]), timezone=raw["timezone"])
    assert schedule.interval == timedelta(seconds=60) and raw["active"] is True


def test_two_pacs_watch_runs_never_overlap() -> None:
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy

    limit = ConcurrencyLimitConfig.model_validate(_deployments()["pacs-watch"]["concurrency_limit"])
    # One slot; a run due while one still holds it is cancelled rather than queued behind it: a pass
    # takes every study since the cursor, so queued runs would only pile up (after a downtime, one per
    # missed minute).
    assert limit.limit == 1 and limit.collision_strategy == ConcurrencyLimitStrategy.CANCEL_NEW


def test_pacs_watch_description_names_the_event_its_flow_emits(monkeypatch: pytest.MonkeyPatch) -> None:
    import prefect.events

    from dicomops.pacs.watch import StudyOutcome
    from tasks.pacs import emit_study_event

    emitted: list[str] = []
    monkeypatch.setattr(prefect.events, "emit_event", lambda event, **kwargs: emitted.append(event))
    emit_study_event(StudyOutcome("t", "ingested", 1, 0, 1))
    emit_study_event(StudyOutcome("t", "refused"))
    (event,) = emitted  # one per accepted study, none for a refused one
    description = " ".join(_deployments()["pacs-watch"]["description"].split())
    assert f"emits the event {event} for each study the gate accepts" in description
    assert "DICOMOPS_PACS_URL" in description and "work/pacs/studies.csv" in description
