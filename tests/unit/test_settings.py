"""Settings: the embedded MLflow store keeps its artifacts beside itself, wherever the URI puts it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from dicomops.config import embedded_store_path, load_settings

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture()
def env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    """A clean environment whose current directory is a scratch folder (to catch cwd defaults)."""
    for name in ("MLFLOW_TRACKING_URI", "DICOMOPS_MLFLOW_ARTIFACT_ROOT"):
        monkeypatch.delenv(name, raising=False)
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    return monkeypatch


def test_artifacts_sit_beside_the_sqlite_file_the_uri_names(env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    env.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'elsewhere' / 'store.db'}")
    assert load_settings().mlflow_artifact_root == tmp_path / "elsewhere" / "artifacts"


def test_the_embedded_default_is_unchanged_for_the_demo(env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    settings = load_settings()
    cwd = tmp_path / "cwd"
    assert settings.mlflow_tracking_uri == f"sqlite:///{cwd / 'mlflow' / 'mlflow.db'}"
    assert settings.mlflow_artifact_root == cwd / "mlflow" / "artifacts"


def test_an_explicit_artifact_root_wins(env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    env.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'elsewhere' / 'store.db'}")
    env.setenv("DICOMOPS_MLFLOW_ARTIFACT_ROOT", str(tmp_path / "mine"))
    assert load_settings().mlflow_artifact_root == tmp_path / "mine"
    env.setenv("DICOMOPS_MLFLOW_ARTIFACT_ROOT", "")  # blank is unset, not Path("") = the cwd
    assert load_settings().mlflow_artifact_root == tmp_path / "elsewhere" / "artifacts"


def test_a_server_keeps_its_own_artifact_store(env: pytest.MonkeyPatch) -> None:
    for uri in ("http://127.0.0.1:5000", "https://mlflow.example.org", "postgresql://u@db/mlflow"):
        env.setenv("MLFLOW_TRACKING_URI", uri)
        assert load_settings().mlflow_artifact_root is None


@pytest.mark.parametrize(("uri", "store"), [
    ("sqlite:////abs/dir/m.db", "/abs/dir/m.db"),
    ("sqlite:///rel/m.db", "{cwd}/rel/m.db"),  # SQLAlchemy: three slashes, relative path
    ("sqlite:////abs/m.db?timeout=20", "/abs/m.db"),
    ("sqlite:///file:/abs/m.db?mode=ro&uri=true", "/abs/m.db"),
    ("file:///abs/mlruns", "/abs/mlruns"),
    ("file:/abs/mlruns", "/abs/mlruns"),
    ("file://localhost/abs/ml%20runs", "/abs/ml runs"),
    ("./mlruns", "{cwd}/mlruns"),  # MLflow reads a bare path as a file store
    ("http://127.0.0.1:5000", None),
    ("databricks", None),
])
def test_the_store_path_of_each_uri_form(env: pytest.MonkeyPatch, tmp_path: Path, uri: str, store: str | None) -> None:
    expected = None if store is None else Path(store.format(cwd=tmp_path / "cwd"))
    assert embedded_store_path(uri) == expected


def test_a_file_store_keeps_artifacts_beside_its_folder(env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    env.setenv("MLFLOW_TRACKING_URI", (tmp_path / "stores" / "mlruns").as_uri())
    assert load_settings().mlflow_artifact_root == tmp_path / "stores" / "artifacts"


def test_an_in_memory_store_is_refused_with_the_fix(env: pytest.MonkeyPatch) -> None:
    for uri in ("sqlite://", "sqlite:///:memory:"):
        env.setenv("MLFLOW_TRACKING_URI", uri)
        with pytest.raises(ValueError, match="DICOMOPS_MLFLOW_ARTIFACT_ROOT"):
            load_settings()


def test_makefile_and_server_script_agree_with_the_embedded_default() -> None:
    make = (ROOT / "Makefile").read_text()
    assert "MLFLOW_TRACKING_URI ?= sqlite:///$(CURDIR)/mlflow/mlflow.db" in make
    clean = re.search(r"^clean:\n\t(.+)$", make, re.M)
    assert clean is not None and {"mlflow/mlflow.db", "mlflow/artifacts"} <= set(clean.group(1).split())
    server = (ROOT / "mlflow" / "server.sh").read_text()
    assert '"${MLFLOW_BACKEND_STORE_URI:-sqlite:///${here}/mlflow.db}"' in server
    assert '"${MLFLOW_ARTIFACT_ROOT:-${here}/artifacts}"' in server
