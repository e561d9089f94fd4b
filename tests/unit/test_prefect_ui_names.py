"""What an operator sees in the Prefect UI that `dicomops serve` opens: the retrain automation named
and described after the event it listens for, the schedule's timezone, deployments that say what
starts them; and what `dicomops serve` sets up: incoming/, and the Prefect database `make run` uses."""

from __future__ import annotations

import shutil
import subprocess
import uuid
from pathlib import Path

import pytest
import yaml
from pydantic import TypeAdapter
from typer.testing import CliRunner

from dicomops import serving
from dicomops.monitoring.alerts import EVENT

ROOT = Path(__file__).resolve().parents[2]


def _deployments() -> dict[str, dict]:
    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    return {d["name"]: d for d in spec["deployments"]}


def test_the_retrain_automation_is_named_and_described_after_its_event() -> None:
    from prefect.events.schemas.deployment_triggers import DeploymentTriggerTypes

    (raw,) = _deployments()["retrain"]["triggers"]
    # Without a name `prefect deploy` names it "retrain__automation_1" and the UI calls it "a custom trigger".
    assert raw.get("name") == f"retrain on {EVENT}"
    trigger = TypeAdapter(DeploymentTriggerTypes).validate_python(raw)
    trigger.set_deployment_id(uuid.uuid4())
    automation = trigger.as_automation()  # what `prefect deploy` sends to the server
    assert automation.name == f"retrain on {EVENT}"
    assert automation.trigger.expect == {EVENT}
    description = automation.description
    for needed in (EVENT, "monitor deployment", "drift check", "retrain deployment", "cooldown", "02:00 UTC"):
        assert needed in description, needed


def test_the_nightly_schedule_is_in_utc_and_says_so() -> None:
    from prefect.client.schemas.schedules import CronSchedule

    monitor = _deployments()["monitor"]
    (raw,) = monitor["schedules"]
    schedule = CronSchedule(cron=raw["cron"], timezone=raw["timezone"])
    assert (schedule.cron, schedule.timezone) == ("0 2 * * *", "UTC")
    # The UI's schedule card shows the slug; its cron text leaves the timezone to a tooltip.
    assert "0200-UTC" in raw["slug"]
    assert "02:00 UTC" in monitor["description"]


def test_every_deployment_says_what_starts_it() -> None:
    deployments = _deployments()
    starts = {name: d["description"].split(". ")[0] for name, d in deployments.items()}
    assert starts["pipeline"].startswith("Started by hand")
    assert starts["monitor"].startswith("Started nightly at 02:00 UTC by its schedule")
    assert starts["retrain"] == f'Started by the automation "retrain on {EVENT}" when the monitor deployment finds drift'


def test_serve_creates_the_folder_the_monitor_reads(tmp_path: Path) -> None:
    assert _deployments()["monitor"]["parameters"]["src"] == serving.INCOMING
    project = tmp_path / "project"
    project.mkdir()
    incoming = serving.create_incoming(project)
    assert incoming == project / "incoming" and incoming.is_dir()
    (incoming / "study").mkdir()
    assert serving.create_incoming(project) == incoming and (incoming / "study").is_dir()  # kept as it is


def test_the_server_uses_the_prefect_home_of_make_run(tmp_path: Path) -> None:
    project = tmp_path / "project"
    project.mkdir()
    env = serving.server_env(project, "http://127.0.0.1:4200/api", {"PATH": "/usr/bin"})
    assert env["PREFECT_HOME"] == str(project.resolve() / ".prefect")
    assert env["PREFECT_API_URL"] == "http://127.0.0.1:4200/api"
    assert env["DICOMOPS_PROJECT_DIR"] == str(project.resolve())
    assert serving.describe_database(env) == str(project.resolve() / ".prefect" / "prefect.db")
    if shutil.which("make"):  # the Makefile's own default, as `make run` exports it from the project folder
        made = subprocess.run(["make", "-s", "-f", str(ROOT / "Makefile"), "--eval", "home: ; @echo $$PREFECT_HOME",
                               "home"], cwd=project, env={"PATH": env["PATH"]}, capture_output=True, text=True,
                              check=True)
        assert made.stdout.strip() == env["PREFECT_HOME"]


def test_a_prefect_home_or_database_the_user_set_wins_and_no_url_is_shown(tmp_path: Path) -> None:
    project = tmp_path / "project"
    assert serving.server_env(project, "u", {"PREFECT_HOME": "/srv/prefect"})["PREFECT_HOME"] == "/srv/prefect"
    assert serving.server_env(project, "u", {"PREFECT_HOME": "state"})["PREFECT_HOME"] == str(project.resolve() / "state")
    url = "postgresql+asyncpg://prefect:s3cret@db/prefect"
    env = serving.server_env(project, "u", {"PREFECT_API_DATABASE_CONNECTION_URL": url})
    assert env["PREFECT_API_DATABASE_CONNECTION_URL"] == url
    assert "s3cret" not in serving.describe_database(env)
    assert "PREFECT_API_DATABASE_CONNECTION_URL" in serving.describe_database(env)


def test_serve_banner_names_the_trigger_the_incoming_folder_and_the_database(tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from dicomops.cli import app

    stack = serving.Stack("http://127.0.0.1:4321/api", "http://127.0.0.1:4321", incoming=tmp_path / "incoming",
                          database=str(tmp_path / ".prefect" / "prefect.db"))
    monkeypatch.setattr(serving, "start", lambda *args, **kwargs: stack)
    monkeypatch.setattr(serving, "run_until_signal", lambda stack: "SIGINT")
    result = CliRunner().invoke(app, ["serve", "--port", "4321"])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert f"retrain on {EVENT}" in text
    assert f"incoming folder: {tmp_path / 'incoming'}: put new DICOM studies there" in text
    assert f"Prefect database: {tmp_path / '.prefect' / 'prefect.db'}, the one 'make run' uses" in text
    assert "PREFECT_API_URL=http://127.0.0.1:4321/api make run" in text
