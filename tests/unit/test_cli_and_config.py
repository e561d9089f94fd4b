"""The CLI's help and synth command, and configuration loading."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pandas as pd
import pydantic
import pytest
import typer
from typer.testing import CliRunner

from dicomops.cli import app
from dicomops.config import PipelineConfig, Settings, SynthConfig

runner = CliRunner()


COMMANDS = ["synth", "data", "ingest", "preprocess", "train", "promote", "reject", "export", "monitor", "retrain", "run",
            "serve"]
GROUPS = ["pacs"]  # sub-command groups, listed after the commands
WIDE = {"COLUMNS": "200"}  # rich cuts long option names short at 80 columns


def _command_name(info: typer.models.CommandInfo) -> str:
    assert info.callback is not None
    return info.name or info.callback.__name__.replace("_", "-")


def test_help_lists_every_command() -> None:
    assert [_command_name(info) for info in app.registered_commands] == COMMANDS  # and no command twice
    assert [info.name or info.typer_instance.info.name for info in app.registered_groups] == GROUPS
    result = runner.invoke(app, ["--help"], env=WIDE)
    assert result.exit_code == 0
    listed = re.findall(r"^│ ([a-z][a-z-]*)  ", result.output, flags=re.MULTILINE)  # the Commands panel
    assert listed == COMMANDS + GROUPS


@pytest.mark.parametrize("name", COMMANDS)
def test_every_command_has_help_naming_each_argument_and_option(name: str) -> None:
    command = typer.main.get_command(app).commands[name]
    result = runner.invoke(app, [name, "--help"], env=WIDE)
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert f"Usage: dicomops {name} " in text
    assert " ".join(inspect.getdoc(command.callback).split("\n\n")[0].split()) in text
    assert command.params, f"{name} takes no arguments or options"
    for param in command.params:
        if param.param_type_name == "option":
            for opt in param.opts + param.secondary_opts:
                assert re.search(rf"{re.escape(opt)}(?![\w-])", result.output), f"{name} --help omits {opt}"
            assert param.help and " ".join(param.help.split()) in text, f"{name} --help omits the help of {param.name}"
        else:
            assert re.search(rf"[│*] +{param.name} ", result.output), f"{name} --help omits the argument {param.name}"


def test_synth_help_explains_scenarios() -> None:
    result = runner.invoke(app, ["synth", "--help"])
    assert result.exit_code == 0
    assert "protocol-shift" in result.output and "--fault-rate" in result.output


def test_synth_writes_a_corpus(tmp_path: Path) -> None:
    out = tmp_path / "corpus"
    result = runner.invoke(app, ["synth", str(out), "--patients", "3", "--matrix", "32", "--slices",
                                 "8", "--workers", "1", "--scenario", "low-dose", "--seed", "9"])
    assert result.exit_code == 0, result.output
    labels = pd.read_csv(out / "labels.csv")
    assert len(labels) == 3 and set(labels.scenario) == {"low-dose"}
    assert len(list(out.glob("case-*/series-1/*"))) >= 3 * 8


def test_synth_rejects_a_bad_scenario_with_usage_exit(tmp_path: Path) -> None:
    result = runner.invoke(app, ["synth", str(tmp_path / "x"), "--scenario", "sideways"])
    assert result.exit_code == 2
    assert "baseline" in result.output


def test_synth_refuses_a_non_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "keep.txt").write_text("mine")
    result = runner.invoke(app, ["synth", str(tmp_path), "--patients", "1", "--workers", "1"])
    assert result.exit_code == 2
    assert (tmp_path / "keep.txt").read_text() == "mine"


def test_config_from_yaml_and_unknown_keys(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text("synth:\n  patients: 12\n  scenario: low-dose\n")
    cfg = PipelineConfig.from_yaml(good)
    assert cfg.synth.patients == 12 and cfg.synth.scenario == "low-dose"
    bad = tmp_path / "bad.yaml"
    bad.write_text("synth:\n  patients: 12\n  patience: 3\n")
    with pytest.raises(pydantic.ValidationError, match="patience"):
        PipelineConfig.from_yaml(bad)
    with pytest.raises(ValueError, match="does not exist"):
        PipelineConfig.from_yaml(tmp_path / "missing.yaml")


def test_synth_config_validates_its_arguments() -> None:
    with pytest.raises(pydantic.ValidationError, match="matrix must be even"):
        SynthConfig(matrix=255)
    with pytest.raises(pydantic.ValidationError):
        SynthConfig(fault_rate=1.5)


def test_settings_are_read_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////elsewhere/m.db")
    monkeypatch.setenv("DICOMOPS_WORK_DIR", str(tmp_path))
    s = Settings()
    assert s.mlflow_tracking_uri == "sqlite:////elsewhere/m.db" and s.work_dir == tmp_path
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert Settings().mlflow_tracking_uri.endswith("mlflow/mlflow.db")
