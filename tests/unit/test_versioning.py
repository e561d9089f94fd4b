"""The DVC hash computed without DVC equals DVC's, and a regenerated corpus is checked against it."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dicomops.config import SynthConfig
from dicomops.errors import CorpusMismatchError
from dicomops.monitoring.stage import combine_sources
from dicomops.synthetic import generate_corpus
from dicomops.tracking import dvc_directory_hash, read_dvc_pointer
from dicomops.versioning import ensure_corpus, version_folder, version_source

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


def test_each_version_of_a_source_is_recorded_pushed_and_restorable(tmp_path: Path) -> None:
    repo = _repo(tmp_path)
    readers = repo / "readers"
    labels = tmp_path / "labels.csv"
    labels.write_text("SeriesInstanceUID,label\n2.25.1,1\n")
    first = version_source(readers, {"labels.csv": labels})
    assert first.pointer == repo / "readers.dvc" and first.pushed and first.note == ""
    assert first.md5 == read_dvc_pointer(first.pointer)["md5"] == dvc_directory_hash(readers)
    assert first.tags("feedback") == {"feedback.dvc_md5": first.md5, "feedback.dvc": str(repo / "readers.dvc")}
    assert "/readers" in (repo / ".gitignore").read_text()  # DVC keeps the data out of git

    labels.write_text("SeriesInstanceUID,label\n2.25.1,0\n2.25.2,1\n")
    second = version_source(readers, {"labels.csv": labels})
    assert second.md5 != first.md5 and (readers / "labels.csv").read_text() == labels.read_text()
    # The first version is still in the remote: with its pointer back, `dvc pull` restores it.
    shutil.rmtree(readers)
    shutil.rmtree(repo / ".dvc" / "cache")
    (repo / "readers.dvc").write_text((repo / "readers.dvc").read_text().replace(
        second.md5, first.md5))
    subprocess.run([sys.executable, "-m", "dvc", "pull", "-q", "readers.dvc"], cwd=repo, check=True,
                   capture_output=True)
    assert (readers / "labels.csv").read_text() == "SeriesInstanceUID,label\n2.25.1,1\n"


def test_a_source_outside_a_dvc_repository_is_written_and_says_why_it_is_not_versioned(tmp_path: Path) -> None:
    labels = tmp_path / "labels.csv"
    labels.write_text("SeriesInstanceUID,label\n2.25.1,1\n")
    version = version_source(tmp_path / "elsewhere" / "readers", {"labels.csv": labels})
    assert version.pointer is None and not version.pushed and "no DVC repository above" in version.note
    assert (tmp_path / "elsewhere/readers/labels.csv").read_text() == labels.read_text()
    assert version.tags("x")["x.dvc"].startswith("not versioned: no DVC repository")


def test_a_retrain_pool_of_links_is_recorded_by_content_and_comes_back_after_its_sources_are_gone(
        tmp_path: Path) -> None:
    repo = _repo(tmp_path)
    (repo / ".gitignore").write_text("/work/\n")  # as the project's: DVC must do without git there
    batch = tmp_path / "incoming"  # outside the repository, as a monitored batch is
    generate_corpus(batch, CFG)
    pool = combine_sources([batch], repo / "work" / "retrain" / "src")
    links = sorted(p.relative_to(pool).as_posix() for p in pool.rglob("*") if p.is_symlink())
    assert len(links) > 10
    before = dvc_directory_hash(pool)  # the retrain's data hash, taken over the links

    version = version_folder(pool)
    assert version.pointer == pool.with_name("src.dvc") and version.pushed and version.note == ""
    assert version.md5 == before == read_dvc_pointer(version.pointer)["md5"]
    assert (repo / ".gitignore").read_text() == "/work/\n" and not (pool.parent / ".gitignore").exists()
    content = {name: (pool / name).read_bytes() for name in links}

    shutil.rmtree(batch)
    shutil.rmtree(pool)
    shutil.rmtree(repo / ".dvc" / "cache")
    # What a user does with a retrain run's artifact data/src.dvc: into a folder git keeps, then pull.
    (repo / "restored").mkdir()
    shutil.copy(version.pointer, repo / "restored" / "src.dvc")
    subprocess.run([sys.executable, "-m", "dvc", "pull", "-q", "restored/src.dvc"], cwd=repo, check=True,
                   capture_output=True)
    restored = repo / "restored" / "src"
    assert {name: (restored / name).read_bytes() for name in links} == content
    assert dvc_directory_hash(restored) == before


def test_a_pool_dvc_refuses_is_left_as_it_is_and_the_note_names_the_command_not_dvc_s_message(
        tmp_path: Path) -> None:
    repo = _repo(tmp_path)
    pool = repo / "work" / "retrain" / "src"
    pool.mkdir(parents=True)
    (pool / "case-Doe^John.dcm").write_bytes(b"x")  # a monitored batch's own file name
    (repo / ".dvcignore").write_text("/work/retrain/src\n")
    version = version_folder(pool)
    assert version.pointer is None and not version.pushed and version.md5 == dvc_directory_hash(pool)
    assert version.note.startswith("'dvc add work/retrain/src' failed (exit 1)") and "Doe" not in version.note

    (repo / ".dvcignore").unlink()
    subprocess.run([sys.executable, "-m", "dvc", "add", "-q", "work"], cwd=repo, check=True, capture_output=True)
    inside = version_folder(pool)  # DVC updates work.dvc and writes no src.dvc
    assert inside.pointer is None and "inside a folder DVC already tracks" in inside.note
