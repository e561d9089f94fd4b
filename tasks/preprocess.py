"""Preprocessing tasks: one library call each."""

from __future__ import annotations

from pathlib import Path

from prefect import task

from dicomops.config import PreprocessConfig
from dicomops.preprocessing import stage


@task(name="preprocess-series", tags=["cpu-heavy"])
def preprocess_series(work: Path, cfg: PreprocessConfig) -> dict[str, int]:
    return stage.preprocess_corpus(work, cfg)


@task(name="hash-accepted-corpus")
def hash_accepted_corpus(work: Path) -> str:
    return stage.corpus_content_hash(work)


@task(name="hash-labels")
def hash_labels(work: Path) -> str:
    return stage.labels_hash(work)


@task(name="check-made-from")
def check_made_from(work: Path, corpus: str) -> None:
    stage.check_made_from(work, corpus)
