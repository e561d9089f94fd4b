"""The core contracts: outages never read as "no champion", one cache key for stage records and
per-series entries, one writer per work directory, and a library that never imports its flows."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, TEMPORARILY_UNAVAILABLE
from mlflow.tracking import MlflowClient

from dicomops import locking, stages
from dicomops.errors import RegistryUnavailableError, WorkDirLockedError
from dicomops.layout import WorkLayout
from dicomops.monitoring import reference
from dicomops.tracking import registry

NAME = "gate-test-model"
ROOT = Path(__file__).resolve().parents[2]


def _registry(tmp_path: Path, champion_auc: float | None) -> tuple[str, str]:
    """A SQLite registry holding a challenger (v2, AUC 0.95) and optionally a champion (v1)."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    client.create_registered_model(NAME)
    experiment = client.create_experiment("gate", artifact_location=(tmp_path / "art").as_uri())
    aucs = ([champion_auc] if champion_auc is not None else []) + [0.95]
    for auc in aucs:
        run = client.create_run(experiment)
        mv = client.create_model_version(NAME, source=f"runs:/{run.info.run_id}/model", run_id=run.info.run_id)
        client.set_model_version_tag(NAME, mv.version, "cv.mean_auc", str(auc))
        client.set_model_version_tag(NAME, mv.version, "cv.auc.ge", str(auc))
    if champion_auc is not None:
        client.set_registered_model_alias(NAME, registry.CHAMPION, "1")
    client.set_registered_model_alias(NAME, registry.CHALLENGER, str(len(aucs)))  # as register_model does
    return uri, str(len(aucs))


class FailingAliasClient:
    """A real client whose registered-model reads fail as MLflow's do when its store cannot answer."""

    def __init__(self, uri: str, error: Exception) -> None:
        self._client, self._error = MlflowClient(uri), error

    def get_registered_model(self, name: str) -> Any:
        raise self._error

    def get_model_version_by_alias(self, name: str, alias: str) -> Any:
        raise self._error

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._client, attr)


def _inject(monkeypatch: pytest.MonkeyPatch, module: Any, error: Exception) -> None:
    monkeypatch.setattr(module, "configure_mlflow", lambda uri: FailingAliasClient(uri, error))


def _gate(uri: str, version: str) -> Any:
    return registry.apply_promotion_gate(uri, NAME, version, margin=0.005, vendor_tolerance=0.02, min_auc=0.8)


@pytest.mark.parametrize("error", [
    MlflowException("(sqlite3.OperationalError) database is locked", error_code=TEMPORARILY_UNAVAILABLE),
    ConnectionError("Max retries exceeded with url: /api/2.0/mlflow/registered-models/alias"),
])
def test_an_unreadable_champion_fails_the_gate_and_leaves_the_challenger(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: Exception) -> None:
    uri, version = _registry(tmp_path, champion_auc=None)  # no champion: an outage must not read as this
    _inject(monkeypatch, registry, error)
    decision = _gate(uri, version)
    assert (decision.promote, decision.error, decision.label) == (False, True, "gate-error")
    assert "could not read which version" in decision.reasons[0] and str(error).split(":")[0][:20] in decision.reasons[0]
    client = MlflowClient(uri)
    tags = client.get_model_version(NAME, version).tags
    assert tags["promotion.decision"] == "gate-error"
    assert f"dicomops promote {version}" in tags["promotion.reasons"]
    assert client.get_registered_model(NAME).aliases == {"challenger": int(version)}  # nobody became champion


def test_no_champion_alias_is_the_only_case_read_as_a_first_model(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    uri, version = _registry(tmp_path, champion_auc=None)
    decision = _gate(uri, version)  # the real store answers RESOURCE_DOES_NOT_EXIST
    assert decision.label == "auto-promoted" and decision.reasons[0].startswith("no champion yet; mean AUC 0.9500")
    assert str(MlflowClient(uri).get_model_version_by_alias(NAME, "champion").version) == version

    client = registry.configure_mlflow(uri)
    assert registry.alias_version(client, "never-registered", "champion") is None
    _inject(monkeypatch, registry, MlflowException("Registered Model with name=x not found",
                                                   error_code=RESOURCE_DOES_NOT_EXIST))
    assert registry.alias_version(registry.configure_mlflow(uri), NAME, "champion") is None


def test_a_readable_champion_is_compared(tmp_path: Path) -> None:
    uri, version = _registry(tmp_path, champion_auc=0.97)
    decision = _gate(uri, version)
    assert decision.label == "awaiting-review"
    assert decision.reasons[0] == "mean AUC 0.9500 vs champion 0.9700: gain -0.0200 not above margin 0.0050"
    assert str(MlflowClient(uri).get_model_version_by_alias(NAME, "champion").version) == "1"


def test_the_monitor_does_not_report_an_outage_as_a_missing_alias(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    uri, _ = _registry(tmp_path, champion_auc=None)
    with pytest.raises(ValueError, match="no version of gate-test-model holds the alias 'champion'"):
        reference.load_serving(uri, NAME, "champion")
    _inject(monkeypatch, reference.runs, MlflowException("database is locked", error_code=TEMPORARILY_UNAVAILABLE))
    with pytest.raises(RegistryUnavailableError, match="database is locked"):
        reference.load_serving(uri, NAME, "champion")


def _edited_source(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, module_file: str, old: str, new: str) -> None:
    """Make the code hash read `module_file` with `old` replaced by `new`, as after an edit."""
    real = stages._read_source
    original = (ROOT / module_file).resolve()
    text = original.read_bytes()
    assert old.encode() in text

    def read_source(path: Path) -> bytes:
        return text.replace(old.encode(), new.encode()) if path.resolve() == original else real(path)

    monkeypatch.setattr(stages, "_read_source", read_source)


def test_a_change_to_feature_code_recomputes_the_cached_series(clean_corpus: Path, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from dicomops import ingest
    from dicomops.config import IngestConfig, PreprocessConfig
    from dicomops.preprocessing.stage import preprocess_corpus

    work = tmp_path / "work"
    ingest.run(clean_corpus, work, IngestConfig(workers=1), b"cache-test-key-0123456789abcdef01")
    cfg = PreprocessConfig(workers=1)
    first = preprocess_corpus(work, cfg)
    assert first["computed"] == first["series"] == 8 and first["cached"] == 0
    index = pd.read_parquet(WorkLayout(work).preprocessed.index)
    again = preprocess_corpus(work, cfg)
    assert (again["computed"], again["cached"]) == (0, 8)
    stage_key = stages.stage_key("preprocess", {"corpus": "c"})

    _edited_source(monkeypatch, tmp_path, "dicomops/preprocessing/features.py",
                   'feats["body_width_mm"] = float(np.median(widths))',
                   'feats["body_width_mm"] = float(np.mean(widths))')
    assert stages.stage_key("preprocess", {"corpus": "c"}) != stage_key  # the stage record goes stale
    after = preprocess_corpus(work, cfg)
    assert (after["computed"], after["cached"]) == (8, 0)  # and so does every per-series entry
    new_index = pd.read_parquet(WorkLayout(work).preprocessed.index)
    assert set(new_index.cache_key).isdisjoint(index.cache_key)
    assert sorted(p.stem for p in WorkLayout(work).preprocessed.volumes.glob("*.npz")) == sorted(new_index.cache_key)


def test_code_outside_a_stage_does_not_touch_its_key(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    before = stages.stage_key("preprocess", {"corpus": "c"})
    _edited_source(monkeypatch, tmp_path, "dicomops/export/triton.py", "def ", "def  ")
    assert stages.stage_key("preprocess", {"corpus": "c"}) == before
    assert stages.stage_key("export", {"model": "m"}) != stages.stage_key("preprocess", {"model": "m"})



HOLDER = textwrap.dedent("""
    import sys, time
    from dicomops import locking
    with locking.hold(sys.argv[1], "dicomops-monitor (scheduled)"):
        print("held", flush=True)
        time.sleep(float(sys.argv[2]))
""")


def test_a_second_writer_fails_naming_the_holder(tmp_path: Path) -> None:
    work = tmp_path / "work"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(work), "30"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        start = time.monotonic()
        with pytest.raises(WorkDirLockedError) as err, locking.hold(work, "dicomops-pipeline", timeout=1.0):
            pass
        assert 0.9 < time.monotonic() - start < 5
        message = str(err.value)
        assert f"dicomops-monitor (scheduled) (pid {holder.pid} on " in message
        assert "DICOMOPS_WORK_LOCK_TIMEOUT_S" in message
    finally:
        holder.kill()
        holder.wait()
    with locking.hold(work, "dicomops-pipeline", timeout=5.0):  # the kernel released the dead holder's lock
        assert locking.describe_holder(work).startswith("dicomops-pipeline (pid ")


def test_the_lock_is_reentrant_within_a_process_and_released_at_the_end(tmp_path: Path) -> None:
    with locking.hold(tmp_path, "pipeline", timeout=0.5):
        with locking.hold(tmp_path, "ingest", timeout=0.5):  # a subflow on the same work directory
            assert locking.describe_holder(tmp_path).startswith("pipeline (pid")
        assert locking.describe_holder(tmp_path).startswith("pipeline (pid")
    assert locking.describe_holder(tmp_path) == ""
    probe = subprocess.run([sys.executable, "-c", HOLDER, str(tmp_path), "0"], capture_output=True, text=True,
                           timeout=60)
    assert probe.stdout.strip() == "held", probe.stderr


def test_the_library_never_imports_the_flows() -> None:
    offenders = [str(p.relative_to(ROOT)) for p in (ROOT / "dicomops").rglob("*.py")
                 if any(line.lstrip().startswith(("from flows", "import flows", "from tasks", "import tasks"))
                        for line in p.read_text().splitlines())]
    assert offenders == []
    code = ("import sys, dicomops.cli; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('flows', 'tasks', 'prefect')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.stdout.strip() == "[]", out.stderr[-2000:]


def test_the_cli_finds_every_flow_through_the_entry_point() -> None:
    from importlib.metadata import entry_points

    from flows.runners import FLOWS

    (point,) = entry_points(group="dicomops", name="flows")
    load = point.load()
    assert {name: load(name).name for name in FLOWS} == {name: f"dicomops-{name}" for name in FLOWS}
    with pytest.raises(ValueError, match="unknown flow 'serve'"):
        load("serve")


def test_only_the_layout_spells_the_work_directory() -> None:
    import re

    names = re.compile(r'"(preprocessed|splits|folds\.json|accepted\.parquet|index\.parquet|slabs\.parquet|'
                       r'features\.parquet|oof_predictions\.parquet|state\.json|alerts\.jsonl|\.stages|deid)"')
    offenders = [f"{p.relative_to(ROOT)}:{i}" for folder in ("dicomops", "tasks", "flows")
                 for p in sorted((ROOT / folder).rglob("*.py")) if p.name != "layout.py"
                 for i, line in enumerate(p.read_text().splitlines(), 1) if names.search(line)]
    assert offenders == []


def test_the_layout_owns_the_paths_the_stages_share(tmp_path: Path) -> None:
    layout = WorkLayout(tmp_path)
    assert layout.preprocessed.volume("volumes/abc.npz") == tmp_path / "preprocessed/volumes/abc.npz"
    assert layout.preprocessed.entry("abc") == tmp_path / "preprocessed/volumes/abc.npz"
    assert layout.batch("b1").ingest.summary == tmp_path / "monitoring/batches/b1/ingest/summary.json"
    assert layout.export_dir("3") == tmp_path / "export/v3"
    assert layout.stage_outputs("ingest") == [tmp_path / "ingest/accepted.parquet", tmp_path / "ingest/summary.json",
                                              tmp_path / "deid"]
    with pytest.raises(FileNotFoundError, match=r"run 'dicomops train --work .*' to make the split"):
        layout.read_folds()
    with pytest.raises(FileNotFoundError, match=r"preprocessed/index.parquet does not exist; run 'dicomops preprocess"):
        layout.labelled_series()


def test_the_http_budget_bounds_one_retried_call() -> None:
    from dicomops import preflight

    for bound in (40, 120, 600):
        env = preflight.http_budget(bound)
        retries, timeout = int(env["MLFLOW_HTTP_REQUEST_MAX_RETRIES"]), float(env["MLFLOW_HTTP_REQUEST_TIMEOUT"])
        factor, jitter = int(env["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"]), float(env["MLFLOW_HTTP_REQUEST_BACKOFF_JITTER"])
        per_call = (retries + 1) * timeout + sum(factor * 2**i for i in range(1, retries)) + retries * jitter
        worst = preflight.TASK_ATTEMPTS * per_call + preflight.TASK_RETRY_DELAYS_S + preflight.PROBE_TIMEOUT_S
        assert worst <= bound, (bound, env)
    assert preflight.http_budget(120)["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "10"  # not MLflow's 120 s
    with pytest.raises(ValueError, match="DICOMOPS_HTTP_BUDGET_S=10 is too short"):
        preflight.http_budget(10)


def test_the_cli_names_a_server_that_does_not_answer(tmp_path: Path) -> None:
    import socket

    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    hung = socket.socket()  # listens, never answers: a server stuck at start-up
    hung.bind(("127.0.0.1", 0))
    hung.listen(1)
    cases = [({"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{port}"}, "MLflow tracking server", "MLFLOW_TRACKING_URI",
              "bash mlflow/server.sh", "ConnectionRefusedError"),
             ({"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{hung.getsockname()[1]}"}, "MLflow tracking server",
              "MLFLOW_TRACKING_URI", "bash mlflow/server.sh", "timed out"),
             ({"PREFECT_API_URL": f"http://127.0.0.1:{port}/api"}, "Prefect API", "PREFECT_API_URL",
              "dicomops serve", "ConnectionRefusedError")]
    try:
        for env, server, variable, fix, why in cases:
            start = time.monotonic()
            out = subprocess.run([sys.executable, "-m", "dicomops.cli", "ingest", str(tmp_path), "--work",
                                  str(tmp_path / "w")], env={**__import__("os").environ, **env},
                                 capture_output=True, text=True, timeout=60)
            assert time.monotonic() - start < 15
            assert out.returncode == 2, out.stderr
            line = out.stderr.strip()
            assert "\n" not in line, line  # one line
            assert server in line and f"(from {variable})" in line and fix in line and why in line, line
    finally:
        hung.close()
    assert not (tmp_path / "w").exists()


def test_a_version_that_is_not_there_is_a_usage_error_naming_those_that_are(tmp_path: Path) -> None:
    """`export --version 99`, `predict --version abc`: a message and exit 2, not MLflow's traceback."""
    from dicomops.export.stage import resolve_version
    from dicomops.serving.champion import resolve

    uri, _ = _registry(tmp_path, champion_auc=0.97)
    client = registry.configure_mlflow(uri)
    assert str(registry.model_version(client, NAME, "2").version) == "2"
    for version in ("99", "abc"):
        with pytest.raises(ValueError, match=rf"{NAME} has no version '{version}'; its versions are 1, 2"):
            registry.model_version(client, NAME, version)
        with pytest.raises(ValueError, match="has no version"):
            resolve(client, NAME, None, version)
        with pytest.raises(ValueError, match="has no version"):
            resolve_version(uri, NAME, version, None)
    with pytest.raises(ValueError, match="train one first"):
        registry.model_version(client, "never-registered", "1")
    with pytest.raises(ValueError, match="holds the alias 'nosuch'"):
        resolve_version(uri, NAME, None, "nosuch")


def test_a_recorded_version_stands_only_in_the_store_that_holds_it_from_its_run(tmp_path: Path) -> None:
    """A work directory trained against one store and run against a fresh one skipped training
    ("version 1 stands") with no model there, and the export's advice to train first skipped it
    again: a stage that registers a version checks the store before it skips."""
    import mlflow
    from dicomops.tracking.registry import registered_from

    one, fresh = f"sqlite:///{tmp_path / 'one.db'}", f"sqlite:///{tmp_path / 'fresh.db'}"
    client = mlflow.tracking.MlflowClient(one)
    run = client.create_run(client.create_experiment("e", artifact_location=str(tmp_path / "a"))).info.run_id
    client.create_registered_model("m")
    client.create_model_version("m", str(tmp_path / "a" / "model"), run_id=run)
    assert registered_from(one, "m", "1", run)
    assert not registered_from(one, "m", "1", "another-run")  # version 1 of another training
    assert not registered_from(fresh, "m", "1", run)  # the store this run uses has no such version
