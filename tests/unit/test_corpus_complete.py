"""An interrupted generation never leaves a folder that is later kept as a complete corpus."""

from __future__ import annotations

import logging
import subprocess
from pathlib import Path

import pytest

from dicomops import versioning
from dicomops.config import SynthConfig
from dicomops.synthetic import corpus, sidecars
from dicomops.synthetic.corpus import generate_corpus
from dicomops.versioning import ensure_corpus

CFG = SynthConfig(patients=2, seed=21, fault_rate=0.0, matrix=32, slices=8, workers=1)


def _no_remote(monkeypatch: pytest.MonkeyPatch) -> None:
    """`dvc pull` finds nothing (and no DVC subprocess is started)."""
    monkeypatch.setattr(versioning, "_dvc", lambda *args, cwd: subprocess.CompletedProcess(
        args, 1, "", "ERROR: no remote"))


def _pointer(path: Path, md5: str) -> Path:
    path.write_text(f"outs:\n- md5: {md5}\n  hash: md5\n  path: {path.stem}\n")
    return path


def test_a_generation_interrupted_after_some_series_leaves_no_corpus_folder(tmp_path: Path) -> None:
    out = tmp_path / "corpus"

    def interrupt(done: int, total: int) -> None:
        raise KeyboardInterrupt  # Ctrl-C after the first series

    with pytest.raises(KeyboardInterrupt):
        generate_corpus(out, CFG, progress=interrupt)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # the partial copy is cleaned up too


def test_a_generation_failing_while_writing_the_sidecars_leaves_no_corpus_folder(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "corpus"
    real = corpus._write_csv

    def failing(path: Path, columns: tuple[str, ...], rows: list[dict]) -> None:
        if path.name == sidecars.FAULTS_CSV:
            raise OSError("disk full")
        real(path, columns, rows)

    monkeypatch.setattr(corpus, "_write_csv", failing)
    with pytest.raises(OSError, match="disk full"):
        generate_corpus(out, CFG)
    assert not out.exists()

    monkeypatch.setattr(corpus, "_write_csv", real)
    summary = generate_corpus(out, CFG)  # the next run starts afresh
    assert summary.series == 2 and (out / sidecars.CORPUS_JSON).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus"]


def test_a_leftover_partial_folder_is_removed_and_never_taken_as_the_corpus(tmp_path: Path) -> None:
    out = tmp_path / "corpus"
    leftover = corpus.partial_folder(out)
    (leftover / "case-00001").mkdir(parents=True)
    (leftover / "case-00001" / "junk").write_text("from a killed run")
    generate_corpus(out, CFG)
    assert not leftover.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus"]
    assert not (out / "case-00001" / "junk").exists()


def test_an_incomplete_corpus_folder_is_refused_untouched_not_reported_present(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Never deleted (it may be someone's corpus without the generator's manifest), never taken as
    whole: the error says how to get the corpus."""
    _no_remote(monkeypatch)
    data = tmp_path / "d_int"
    generate_corpus(data, CFG)
    for name in sidecars.SIDECAR_FILES:  # what a run stopped before the sidecars leaves
        (data / name).unlink()
    before = sorted(p.relative_to(data) for p in data.rglob("*"))
    pointer = _pointer(tmp_path / "d_int.dvc", "0" * 32 + ".dir")
    with pytest.raises(ValueError, match=r"no corpus.json.*rm -r .*d_int.*dvc checkout --force d_int.dvc"):
        ensure_corpus(data, CFG, pointer=pointer, strict=True, track=False)
    assert sorted(p.relative_to(data) for p in data.rglob("*")) == before


def test_an_existing_empty_folder_is_written_in_place(tmp_path: Path) -> None:
    """A mount point, a link to a folder or '.': no sibling to rename from."""
    target = tmp_path / "target"
    target.mkdir()
    link = tmp_path / "link"
    link.symlink_to(target)
    assert generate_corpus(link, CFG).series == 2
    assert (target / sidecars.CORPUS_JSON).is_file() and corpus.is_complete_corpus(link)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "target"]


def test_a_folder_without_corpus_json_holding_other_files_is_refused_and_kept(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _no_remote(monkeypatch)
    data = tmp_path / "data"
    data.mkdir()
    (data / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"not a complete corpus.*left as it is.*another folder"):
        ensure_corpus(data, CFG, track=False)
    assert (data / "notes.txt").read_text() == "mine"


def test_a_present_corpus_that_differs_from_its_pointer_names_that_pointer(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    data = tmp_path / "d_int"
    generate_corpus(data, CFG)
    pointer = _pointer(tmp_path / "d_int.dvc", "0" * 32 + ".dir")
    with caplog.at_level(logging.WARNING):
        status = ensure_corpus(data, CFG, track=False)  # the default pointer is <folder>.dvc
    assert status.source == "present" and status.matches_pointer is False
    assert status.pointer == pointer and status.verdict == "DOES NOT match d_int.dvc"
    assert "d_int.dvc" in caplog.text and "data.dvc" not in caplog.text
    assert "dvc checkout d_int.dvc" in caplog.text


def test_a_present_corpus_made_with_other_options_is_kept_and_the_warning_names_them(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """`make run SEED=N` on a checkout whose data/ holds the demo corpus re-ran the demo corpus
    without a word: the options apply only when a corpus is made, and the warning says so."""
    data = tmp_path / "data"
    generate_corpus(data, CFG)
    with caplog.at_level(logging.WARNING):
        status = ensure_corpus(data, CFG, track=False)
    assert status.source == "present" and "made with" not in caplog.text
    with caplog.at_level(logging.WARNING):
        status = ensure_corpus(data, CFG.model_copy(update={"seed": CFG.seed + 1, "workers": 2}), track=False)
    assert status.source == "present"
    assert f"made with seed {CFG.seed}, not the seed {CFG.seed + 1} asked for" in caplog.text
    assert "workers" not in caplog.text and "DATA=data-N WORK=work-N" in caplog.text
