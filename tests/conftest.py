"""Shared fixtures: small synthetic corpora (fixed seeds), a Prefect harness, MLflow in tmp."""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

from dicomops.config import SynthConfig
from dicomops.synthetic import generate_corpus

# `make test` runs two pytest-xdist workers: each takes its share of the cores (torch and OpenMP
# default to all of them, and two workers at two threads each on two cores oversubscribe).
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    _THREADS = max(1, (os.cpu_count() or 1) // _WORKERS)
    os.environ["OMP_NUM_THREADS"] = str(_THREADS)  # for the subprocesses the tests start, too
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(_THREADS)

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")  # 20 s is too short on 2 busy cores
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
# Everything Prefect writes during the tests lands here, where the leak test can scan it.
PREFECT_HOME = Path(tempfile.mkdtemp(prefix="dicomops-prefect-home-"))
os.environ["PREFECT_HOME"] = str(PREFECT_HOME)
os.environ["DICOMOPS_DEID_KEY"] = "test-suite-key-0123456789abcdef0123"
# Readers' labels are versioned in a DVC source: never the repository's own readers/ during tests.
READERS = Path(tempfile.mkdtemp(prefix="dicomops-readers-"))
os.environ["DICOMOPS_READER_LABELS"] = str(READERS / "readers")
for _made in (PREFECT_HOME, READERS):  # each test process makes its own; gone when it exits
    atexit.register(shutil.rmtree, _made, ignore_errors=True)

SMALL = dict(matrix=128, slices=12, workers=1)


@pytest.fixture(scope="session")
def clean_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Eight patients, two per baseline vendor, no faults."""
    out = tmp_path_factory.mktemp("clean") / "corpus"
    generate_corpus(out, SynthConfig(patients=8, seed=7, fault_rate=0.0, **SMALL))
    return out


@pytest.fixture(scope="session")
def faulty_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Sixteen patients, every series with a fault: each fault kind appears at least once."""
    out = tmp_path_factory.mktemp("faulty") / "corpus"
    generate_corpus(out, SynthConfig(patients=16, seed=11, fault_rate=1.0, **SMALL))
    return out


@pytest.fixture(scope="session")
def mixed_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Twelve patients, about a third of the series with a fault."""
    out = tmp_path_factory.mktemp("mixed") / "corpus"
    generate_corpus(out, SynthConfig(patients=12, seed=5, fault_rate=0.35, **SMALL))
    return out


@pytest.fixture(scope="session")
def prefect_harness():
    """One ephemeral Prefect API for the whole session (it takes about 12 s to start)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture()
def mlflow_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """Point Settings (and so MLflow) at a SQLite store and work dir inside tmp_path."""
    uri = f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("DICOMOPS_MLFLOW_ARTIFACT_ROOT", str(tmp_path / "mlflow" / "artifacts"))
    monkeypatch.setenv("DICOMOPS_WORK_DIR", str(tmp_path / "work"))
    return uri
from tests.champion_fixture import exported_champion  # noqa: E402,F401  (a session fixture: trained, promoted, exported)
