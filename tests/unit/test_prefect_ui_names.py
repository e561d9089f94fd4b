"""What an operator sees in the Prefect UI that `dicomops serve` opens: the retrain automation named
and described after the event it listens for, the schedules' timezone, deployments that say what
starts them; and what `dicomops serve` sets up and prints: incoming/, the Prefect database `make run`
uses, the PACS (its URL, never its password; no password, no serve), where MLflow keeps its store."""

from __future__ import annotations

import shutil
import subprocess
import uuid
from pathlib import Path

import pytest
import yaml
from pydantic import TypeAdapter
from typer.testing import CliRunner

from dicomops import stack as serving
from dicomops.monitoring.alerts import EVENT

ROOT = Path(__file__).resolve().parents[2]


def _deployments() -> dict[str, dict]:
    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    return {d["name"]: d for d in spec["deployments"]}


def test_the_retrain_automations_are_named_and_described_after_their_events() -> None:
    from prefect.events.schemas.deployment_triggers import DeploymentTriggerTypes

    from dicomops.feedback.stage import EVENT as FEEDBACK_EVENT

    drift, feedback = _deployments()["retrain"]["triggers"]
    needs = {EVENT: ("monitor deployment", "drift check", "retrain deployment", "cooldown", "02:00 UTC"),
             FEEDBACK_EVENT: ("feedback deployment", "corrections", "retrain deployment", "cooldown")}
    for raw, event in ((drift, EVENT), (feedback, FEEDBACK_EVENT)):
        # Without a name `prefect deploy` names it "retrain__automation_1" and the UI calls it "a custom trigger".
        assert raw.get("name") == f"retrain on {event}"
        trigger = TypeAdapter(DeploymentTriggerTypes).validate_python(raw)
        trigger.set_deployment_id(uuid.uuid4())
        automation = trigger.as_automation()  # what `prefect deploy` sends to the server
        assert automation.name == f"retrain on {event}"
        assert automation.trigger.expect == {event}
        for needed in (event, *needs[event]):
            assert needed in automation.description, needed


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
    assert starts["retrain"] == (f'Started by the automation "retrain on {EVENT}" when the monitor deployment '
                                 "(or monitor-pacs) finds drift")
    assert starts["monitor-pacs"].startswith("Started nightly at 02:30 UTC by its schedule")
    assert starts["pacs-watch"].startswith("Started every 60 s by its schedule (interval 60 s, timezone UTC), one run "
                                           "at a time")


def test_the_pacs_watch_schedule_is_in_utc_and_says_so() -> None:
    from datetime import timedelta

    from prefect.client.schemas.schedules import IntervalSchedule

    watch = _deployments()["pacs-watch"]
    (raw,) = watch["schedules"]
    schedule = IntervalSchedule(interval=timedelta(seconds=raw["interval"]), timezone=raw["timezone"])
    assert (schedule.interval, schedule.timezone) == (timedelta(seconds=60), "UTC")
    assert raw["slug"] == "every-60s-UTC" and raw["active"] is True


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


PASSWORD = "banner-test-password-0123"


def _fake_stack(tmp_path: Path, pacs: bool = True) -> serving.Stack:
    from dicomops.pacs.client import PacsCredentials
    from dicomops.pacs.orthanc import OrthancProcess

    stack = serving.Stack("http://127.0.0.1:4321/api", "http://127.0.0.1:4321", incoming=tmp_path / "incoming",
                          database=str(tmp_path / ".prefect" / "prefect.db"))
    if pacs:
        stack.pacs = OrthancProcess(None, tmp_path / "pacs", 8999, PacsCredentials("dicomops", PASSWORD))  # type: ignore[arg-type]
        stack.pacs_watch = f"the PACS at {stack.pacs.url}"
    return stack


def _serve(monkeypatch: pytest.MonkeyPatch, stack: serving.Stack, *args: str) -> tuple[object, list[dict]]:
    from dicomops.cli import app

    calls: list[dict] = []

    def start(*positional: object, **options: object) -> serving.Stack:
        calls.append(options)
        return stack

    monkeypatch.setattr(serving, "start", start)
    monkeypatch.setattr(serving, "run_until_signal", lambda stack: "SIGINT")
    return CliRunner().invoke(app, ["serve", "--port", "4321", *args]), calls


def test_serve_banner_names_the_trigger_the_incoming_folder_the_database_and_the_pacs(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DICOMOPS_PACS_PASSWORD", PASSWORD)
    monkeypatch.setenv("DICOMOPS_PACS_USER", "dicomops")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://admin:mlflow-secret@127.0.0.1:5999")
    result, calls = _serve(monkeypatch, _fake_stack(tmp_path), "--pacs-port", "8999", "--pacs-stable-age", "3")
    assert result.exit_code == 0, result.output
    (options,) = calls
    pacs = options["pacs"]
    assert (pacs.http_port, pacs.stable_age_s, pacs.storage) == (8999, 3, None)  # None: <project>/pacs
    assert pacs.credentials.password == PASSWORD
    text = " ".join(result.output.split())
    assert f"retrain on {EVENT}" in text and "pacs-watch (every 60 s, one run at a time)" in text
    assert f"incoming folder: {tmp_path / 'incoming'}: put new DICOM studies there" in text
    assert f"Prefect database: {tmp_path / '.prefect' / 'prefect.db'}, the one 'make run' uses" in text
    assert "PREFECT_API_URL=http://127.0.0.1:4321/api make run" in text
    assert "PACS (Orthanc): http://127.0.0.1:8999 (loopback clients only; user dicomops" in text
    assert "DICOMweb root: http://127.0.0.1:8999/dicom-web/" in text
    assert "pacs-watch watches the PACS at http://127.0.0.1:8999" in text
    assert "MLflow store: the server http://127.0.0.1:5999 (MLFLOW_TRACKING_URI)" in text
    assert PASSWORD not in result.output and "mlflow-secret" not in result.output


def test_serve_without_a_pacs_password_stops_before_starting_anything(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DICOMOPS_PACS_PASSWORD", raising=False)
    result, calls = _serve(monkeypatch, _fake_stack(tmp_path))
    assert result.exit_code == 2 and calls == []
    text = " ".join(result.output.split())
    assert "no PACS password: set DICOMOPS_PACS_PASSWORD" in text
    assert "export DICOMOPS_PACS_PASSWORD=\"$(python3 -c 'import secrets; print(secrets.token_urlsafe(24))')\"" in text
    assert "dicomops serve --no-pacs" in text


def test_serve_with_no_pacs_starts_none_and_says_what_pacs_watch_does(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DICOMOPS_PACS_PASSWORD", raising=False)
    stack = _fake_stack(tmp_path, pacs=False)
    stack.pacs_watch = "nothing: no PACS runs here and DICOMOPS_PACS_URL is not set, so its schedule is paused"
    result, calls = _serve(monkeypatch, stack, "--no-pacs")
    assert result.exit_code == 0, result.output
    assert [c["pacs"] for c in calls] == [None]
    text = " ".join(result.output.split())
    assert "PACS (Orthanc)" not in text and "its schedule is paused" in text


def test_phi_folders_are_private_and_ignored_by_git(tmp_path: Path) -> None:
    folder = serving.create_private(tmp_path / "project" / "pacs")
    assert folder.stat().st_mode & 0o777 == 0o700
    assert (folder / ".gitignore").read_text().splitlines()[-1] == "*"
    if shutil.which("git"):
        subprocess.run(["git", "init", "-q", str(tmp_path / "project")], check=True)
        (folder / "index").write_text("a study")
        status = subprocess.run(["git", "-C", str(tmp_path / "project"), "status", "--porcelain", "--untracked-files=all"],
                                capture_output=True, text=True, check=True)
        assert status.stdout == ""  # neither the study nor the .gitignore itself shows


def test_mlflow_store_is_described_without_credentials(tmp_path: Path) -> None:
    assert serving.describe_tracking(f"sqlite:///{tmp_path}/m.db") == str(tmp_path / "m.db")
    assert serving.describe_tracking("https://u:p@mlflow.example:443/") == (
        "the server https://mlflow.example:443 (MLFLOW_TRACKING_URI)")
