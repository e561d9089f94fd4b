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
from dicomops.config import PipelineConfig, Settings, SynthConfig, TrainConfig

runner = CliRunner()


COMMANDS = ["synth", "data", "ingest", "preprocess", "train", "segment", "promote", "reject", "compare", "export", "predict",
            "online", "monitor", "retrain", "feedback", "run", "serve"]
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
            # A variadic argument shows as ``name...``.
            assert re.search(rf"[│*] +{param.name}(\.\.\.)? ", result.output), f"{name} --help omits the argument {param.name}"


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


def test_the_student_defaults_to_the_resolution_it_can_see_at() -> None:
    # Unset, the student trains at 128 px with a stride-1 first convolution (at 192 px and stride 2
    # it cannot see a 6 mm nodule); what a config says wins; every other network keeps 192 and 2,
    # so resnet-slim's dumped config, and with it its run keys, do not change.
    student = TrainConfig(architecture="mobilenet-v3-small")
    assert (student.input_size, student.stem_stride) == (128, 1)
    # and for 12 epochs with a patience of 6 (in 6 it has not learnt the task); the others 6 and 3.
    for arch in ("mobilenet-v3-small", "mobilenet-v3-small-minimal"):
        assert (TrainConfig(architecture=arch).epochs, TrainConfig(architecture=arch).patience) == (12, 6)
    assert TrainConfig(architecture="mobilenet-v3-small", epochs=4).epochs == 4
    assert (TrainConfig(architecture="resnet-slim").epochs, TrainConfig(architecture="resnet-slim").patience) == (6, 3)
    assert "input_size" not in student.model_fields_set and "architecture" in student.model_fields_set
    assert TrainConfig(architecture="mobilenet-v3-small", input_size=160).input_size == 160
    assert TrainConfig(architecture="mobilenet-v3-small", stem_stride=2).stem_stride == 2
    for arch in ("resnet-slim", "resnet3d-slim", "densenet121"):
        assert (TrainConfig(architecture=arch).input_size, TrainConfig(architecture=arch).stem_stride) == (192, 2)
    assert TrainConfig().model_dump()["input_size"] == 192 and TrainConfig().model_dump()["stem_stride"] == 2
    # A registered student logged its sizes, and keeps them: a stride-2 one is rebuilt at stride 2.
    logged = TrainConfig(architecture="mobilenet-v3-small", input_size=192, stem_stride=2).model_dump(mode="json")
    assert TrainConfig.from_logged(logged | {"in_channels": 3}).stem_stride == 2


def test_train_architecture_option_takes_that_architectures_defaults(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import dicomops.cli as cli

    flows = _FakeFlows({"version": "1", "mean_auc": 0.9, "promoted": False})
    monkeypatch.setattr(cli, "_flow", flows)
    plain, sized = tmp_path / "plain.yaml", tmp_path / "sized.yaml"
    plain.write_text("train:\n  epochs: 2\n")
    sized.write_text("train:\n  epochs: 2\n  input_size: 160\n")
    for config, arch, expected in ((plain, "student", (128, 1)), (sized, "student", (160, 1)),
                                   (plain, "resnet-slim", (192, 2)), (sized, "teacher", (160, 2))):
        result = runner.invoke(app, ["train", "--config", str(config), "--architecture", arch], env=WIDE)
        assert result.exit_code == 0, result.output
        cfg = flows.calls[-1][1]["config"]
        assert isinstance(cfg, TrainConfig) and cfg.epochs == 2
        assert (cfg.input_size, cfg.stem_stride) == expected, (config.name, arch)
    # A config that names the student gets its defaults too, with no option.
    named = tmp_path / "named.yaml"
    named.write_text("train:\n  architecture: mobilenet-v3-small\n")
    assert PipelineConfig.from_yaml(named).train.input_size == 128
    assert runner.invoke(app, ["train", "--config", str(named)], env=WIDE).exit_code == 0
    assert flows.calls[-1][1]["config"].stem_stride == 1


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


# --- dicomops ingest --pacs ---------------------------------------------------------------------

class _FakeFlows:
    """Stands in for the CLI's flow lookup: records each call, answers with `result` or raises `error`."""

    def __init__(self, result: dict | None = None, error: Exception | None = None) -> None:
        self.calls: list[tuple[str, dict]] = []
        self.result, self.error = result, error

    def __call__(self, name: str, dask_address: str | None = None):
        def run(**parameters: object) -> object:
            self.calls.append((name, parameters))
            if self.error is not None:
                raise self.error
            return self.result

        return run


PASS_RESULT = {"studies": [{}, {}, {}, {}], "ingested": 2, "refused": 1, "failed": 0, "duplicate": 1, "results_stored": 2}


@pytest.fixture()
def pacs_env(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """A PACS password in the environment, and a PACS that answers (the URLs it was asked at)."""
    import dicomops.cli as cli

    monkeypatch.setenv("DICOMOPS_PACS_PASSWORD", "cli-test-password-0123")
    monkeypatch.delenv("DICOMOPS_PACS_USER", raising=False)
    asked: list[str] = []
    monkeypatch.setattr(cli, "_check_pacs", lambda url, credentials: asked.append(url))
    return asked


@pytest.mark.parametrize(("args", "message"), [
    ([], "give SRC (a folder of DICOM files) or --pacs URL"),
    (["somewhere", "--pacs", "http://127.0.0.1:8042"], "not both"),
    (["--pacs", "ftp://127.0.0.1:8042"], "Orthanc's root URL"),
    (["--pacs", "http://user:secret@127.0.0.1:8042"], "without credentials"),
    (["--pacs", "127.0.0.1:8042"], "Orthanc's root URL"),
])
def test_ingest_takes_a_folder_or_a_pacs_and_says_so(args: list[str], message: str, pacs_env: list[str],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    import dicomops.cli as cli

    flows = _FakeFlows(PASS_RESULT)
    monkeypatch.setattr(cli, "_flow", flows)
    result = runner.invoke(app, ["ingest", *args], env=WIDE)
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.replace("│", " ").split())
    assert flows.calls == []


def test_ingest_from_the_pacs_runs_one_pass_and_prints_the_counts(pacs_env: list[str], tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import dicomops.cli as cli

    flows = _FakeFlows({**PASS_RESULT, "work": str(tmp_path / "w")})
    monkeypatch.setattr(cli, "_flow", flows)
    config = tmp_path / "c.yaml"
    config.write_text("ingest:\n  max_invalid_fraction: 0.4\ntrain:\n  model_name: other-model\n")
    result = runner.invoke(app, ["ingest", "--pacs", "http://127.0.0.1:8042/", "--work", str(tmp_path / "w"),
                                 "--config", str(config), "--workers", "1"], env=WIDE)
    # A study the gate refused is a verdict recorded in the ledger, not a failure of the command.
    assert result.exit_code == 0, result.output
    ((name, parameters),) = flows.calls
    assert name == "pacs-watch" and parameters["orthanc_url"] == "http://127.0.0.1:8042"
    assert pacs_env == ["http://127.0.0.1:8042"]  # asked first, within seconds
    assert parameters["work"] == (tmp_path / "w").resolve()
    cfg = parameters["config"]
    assert isinstance(cfg, PipelineConfig) and cfg.train.model_name == "other-model"  # the champion it scores with
    assert (cfg.ingest.max_invalid_fraction, cfg.ingest.workers) == (0.4, 1)
    text = " ".join(result.output.split())
    assert ("4 stable studies: 2 ingested, 1 refused by the gate, 0 failed, 1 already handled; 2 results stored back in the "
            "PACS") in text
    assert str(tmp_path / "w" / "pacs" / "studies.csv") in text


def test_ingest_from_a_pacs_that_is_down_is_exit_2_before_any_flow_starts(monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    import dicomops.cli as cli

    monkeypatch.setenv("DICOMOPS_PACS_PASSWORD", "cli-test-password-0123")
    flows = _FakeFlows(PASS_RESULT)
    monkeypatch.setattr(cli, "_flow", flows)
    with socket.socket() as closed:  # a port nothing listens on
        closed.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{closed.getsockname()[1]}"
        result = runner.invoke(app, ["ingest", "--pacs", url], env=WIDE)
    assert result.exit_code == 2 and flows.calls == []
    text = " ".join(result.output.split())
    assert f"the PACS did not answer as it should: reaching the PACS: the PACS at {url} did not answer" in text


def test_ingest_from_a_pacs_lost_mid_pass_is_exit_2(pacs_env: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    import dicomops.cli as cli
    from dicomops.pacs.client import PacsError

    outage = PacsError("reading the changes feed: the PACS at http://127.0.0.1:8042 did not answer in full "
                       "(ConnectionError): is it running at that address (the one given, else DICOMOPS_PACS_URL)")
    monkeypatch.setattr(cli, "_flow", _FakeFlows(error=outage))
    result = runner.invoke(app, ["ingest", "--pacs", "http://127.0.0.1:8042"], env=WIDE)
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert "the PACS did not answer as it should: reading the changes feed" in text
    assert "the next pass starts where this one stopped" in text


def test_ingest_from_the_pacs_without_a_password_says_how_to_make_one(monkeypatch: pytest.MonkeyPatch) -> None:
    import dicomops.cli as cli

    monkeypatch.delenv("DICOMOPS_PACS_PASSWORD", raising=False)
    flows = _FakeFlows(PASS_RESULT)
    monkeypatch.setattr(cli, "_flow", flows)
    result = runner.invoke(app, ["ingest", "--pacs", "http://127.0.0.1:8042"], env=WIDE)
    assert result.exit_code == 2 and flows.calls == []
    text = " ".join(result.output.split())
    assert "set DICOMOPS_PACS_PASSWORD" in text and "secrets.token_urlsafe" in text


def test_ingest_of_a_folder_is_unchanged(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import dicomops.cli as cli

    flows = _FakeFlows({"accepted_series": 3, "quarantined_files": 1, "work": str(tmp_path / "w")})
    monkeypatch.setattr(cli, "_flow", flows)
    assert runner.invoke(app, ["ingest", str(tmp_path / "missing")]).exit_code == 2
    result = runner.invoke(app, ["ingest", str(tmp_path), "--max-invalid-fraction", "0.3"], env=WIDE)
    assert result.exit_code == 0, result.output
    ((name, parameters),) = flows.calls
    assert name == "ingest" and parameters["src"].get_secret_value() == str(tmp_path.resolve())  # masked in Prefect
    assert parameters["config"].max_invalid_fraction == 0.3  # the ingest section alone, as before
    assert "3 series accepted, 1 files quarantined" in result.output


PREDICT_RESULT = {"studies_scored": 0.0, "engine": "ort-fp32", "engine_reason": "test", "results": "r.csv",
                  "mlflow_run_id": "x"}


def test_predict_keeps_the_configs_write_back_unless_told_and_never_takes_credentials_in_a_url(
        pacs_env: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A site's `serve.write_back: false` holds for `predict --pacs` (it wrote into the PACS before);
    a URL with credentials is refused without repeating them (a flow's URL is a Prefect parameter)."""
    import dicomops.cli as cli

    flows = _FakeFlows(PREDICT_RESULT)
    monkeypatch.setattr(cli, "_flow", flows)
    quiet = tmp_path / "quiet.yaml"
    quiet.write_text("serve:\n  write_back: false\n")
    for args, expected in ((["--config", str(quiet)], False), ([], True), (["--config", str(quiet), "--write-back"], True),
                           (["--no-write-back"], False)):
        result = runner.invoke(app, ["predict", "--pacs", "all", *args], env=WIDE)
        assert result.exit_code == 0, result.output
        assert flows.calls[-1][1]["config"].serve.write_back is expected, args
    flows.calls.clear()
    for option in (["predict", "--pacs", "all", "--orthanc-url"], ["ingest", "--pacs"]):
        result = runner.invoke(app, [*option, "http://admin:S3cretPassw0rd@127.0.0.1:8042"], env=WIDE)
        said = " ".join(result.output.replace("│", " ").split())
        assert result.exit_code == 2 and "without credentials" in said and "S3cret" not in said, said
        assert "'http://127.0.0.1:8042', credentials removed" in said
        result = runner.invoke(app, [*option, "admin:S3cretPassw0rd@127.0.0.1:8042"], env=WIDE)  # no scheme
        said = " ".join(result.output.replace("│", " ").split())
        assert result.exit_code == 2 and "S3cret" not in said and "not http(s)" in said, said
    assert flows.calls == []
    result = runner.invoke(app, ["predict", "--pacs", "all", "--orthanc-url", "http://127.0.0.1:8042/"], env=WIDE)
    assert result.exit_code == 0 and flows.calls[-1][1]["orthanc_url"] == "http://127.0.0.1:8042"


def test_the_model_name_options_default_to_the_configs_model_name(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each --model-name default was a copy of TrainConfig's model_name, which a change to the config missed."""
    import importlib

    import dicomops.cli as cli
    import dicomops.config as config

    class SiteTrain(TrainConfig):
        model_name: str = "site-ct-classifier"

    monkeypatch.setattr(config, "TrainConfig", SiteTrain)
    try:
        fresh = importlib.reload(cli)
        defaults = {name: inspect.signature(getattr(fresh, name)).parameters["model_name"].default
                    for name in ("promote", "reject", "compare", "export")}
    finally:
        monkeypatch.undo()
        importlib.reload(cli)
    assert defaults == dict.fromkeys(defaults, "site-ct-classifier")
    assert inspect.signature(cli.promote).parameters["model_name"].default == TrainConfig().model_name


def test_export_qat_compares_on_held_out_series_unless_the_config_says_not(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import dicomops.cli as cli

    flows = _FakeFlows({"version": "1", "folder": "f", "tensorrt": "not built"})
    monkeypatch.setattr(cli, "_flow", flows)
    off = tmp_path / "off.yaml"
    off.write_text("export:\n  int8_held_out: false\n")
    for args, expected in (([], True), (["--config", str(off)], False), (["--config", str(off), "--held-out"], True)):
        result = runner.invoke(app, ["export", "--version", "1", "--int8", "qat", *args], env=WIDE)
        assert result.exit_code == 0, result.output
        assert flows.calls[-1][1]["config"].int8_held_out is expected, args


def test_predict_against_a_pacs_that_does_not_answer_and_train_on_an_empty_work_exit_2_with_the_reason(
        pacs_env: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import dicomops.cli as cli
    from dicomops.pacs.client import PacsError

    monkeypatch.setattr(cli, "_flow", _FakeFlows(error=PacsError("searching studies at http://127.0.0.1:9: "
                                                                 "connection refused")))
    result = runner.invoke(app, ["predict", "--pacs", "all"], env=WIDE)
    said = " ".join(result.output.split())
    assert result.exit_code == 2 and "the PACS did not answer as it should" in said and "Traceback" not in said
    missing = FileNotFoundError(f"{tmp_path}/ingest/accepted.parquet does not exist; run dicomops ingest first")
    monkeypatch.setattr(cli, "_flow", _FakeFlows(error=missing))
    for command in ("train", "segment", "preprocess", "export"):
        result = runner.invoke(app, [command, "--work", str(tmp_path)], env=WIDE)
        assert result.exit_code == 2 and "run dicomops ingest first" in " ".join(result.output.split()), command


def test_predict_on_a_folder_the_gate_refuses_exits_1_saying_why(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import dicomops.cli as cli

    monkeypatch.setattr(cli, "_flow", _FakeFlows({**PREDICT_RESULT, "refused": "5 of 5 files quarantined; "
                                                  "Top reasons: not_dicom (5)", "batch_refused": 1.0}))
    result = runner.invoke(app, ["predict", str(tmp_path)], env=WIDE)
    said = " ".join(result.output.split())
    assert result.exit_code == 1 and "gate failed" in said and "not_dicom (5)" in said


def test_retrain_without_its_labelled_source_exits_2_saying_what_to_set(monkeypatch: pytest.MonkeyPatch) -> None:
    import dicomops.cli as cli
    from dicomops.errors import RetrainNotReadyError

    monkeypatch.setattr(cli, "_flow", _FakeFlows(error=RetrainNotReadyError("monitor.training_source (/x/data) "
                                                                            "holds no labelled corpus")))
    result = runner.invoke(app, ["retrain"], env=WIDE)
    assert result.exit_code == 2 and "holds no labelled corpus" in " ".join(result.output.split())


def test_an_unreachable_pacs_names_the_address_given_and_the_variable_without_a_question() -> None:
    """The CLI ends the PACS's error with a full stop and the address may come from --pacs: the
    hint was "does DICOMOPS_PACS_URL point at it?." after `--pacs URL`."""
    import requests

    from dicomops.pacs.client import PacsError, translate_errors

    with pytest.raises(PacsError) as raised, translate_errors("reaching the PACS", "http://127.0.0.1:1"):
        raise requests.ConnectionError("refused")
    message = str(raised.value)
    assert message.endswith("(the one given, else DICOMOPS_PACS_URL)") and "?" not in message
