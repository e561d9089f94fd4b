"""The DVC hash computed without DVC equals DVC's, and a regenerated corpus is checked against it."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dicomops.config import SynthConfig
from dicomops.errors import CorpusMismatchError
from dicomops.tracking import dvc_directory_hash, read_dvc_pointer
from dicomops.versioning import ensure_corpus

CFG = SynthConfig(patients=2, seed=21, fault_rate=0.0, matrix=32, slices=8, workers=1)


def _repo(tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    repo.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=repo, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "remote", "add", "-d", "local", str(tmp_path / "remote")],
                   cwd=repo, check=True, capture_output=True)
    return repo


def test_regenerate_track_pull_and_detect_a_mismatch(tmp_path: Path) -> None:
    repo = _repo(tmp_path)
    data = repo / "data"
    first = ensure_corpus(data, CFG)
    assert first.source == "generated" and first.matches_pointer is None
    pointer = read_dvc_pointer(repo / "data.dvc")
    assert pointer["md5"] == first.md5 == dvc_directory_hash(data)  # our hash is DVC's hash

    shutil.rmtree(data)
    pulled = ensure_corpus(data, CFG)
    assert pulled.source == "pulled" and pulled.matches_pointer

    shutil.rmtree(data)
    shutil.rmtree(tmp_path / "remote")
    shutil.rmtree(repo / ".dvc" / "cache")
    regenerated = ensure_corpus(data, CFG)
    assert regenerated.source == "generated" and regenerated.matches_pointer is True

    for folder in (data, tmp_path / "remote", repo / ".dvc" / "cache"):
        shutil.rmtree(folder)
    with pytest.raises(CorpusMismatchError, match=r"differs from data\.dvc"):
        ensure_corpus(data, CFG.model_copy(update={"seed": 22}), strict=True)
