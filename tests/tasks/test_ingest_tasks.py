"""Ingest tasks are thin: each `.fn` is one library call that returns a path or a summary."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from dicomops.config import IngestConfig
from dicomops.ingest import GateSummary
from tasks import ingest as t


def test_tasks_chain_through_the_work_directory(clean_corpus: Path, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DICOMOPS_DEID_KEY", "task-test-key-0123456789abcdef0123")
    cfg = IngestConfig(workers=1)
    work = tmp_path / "work"
    index = t.index_headers.fn(clean_corpus, work, cfg)
    assert index == work / "ingest/index.parquet" and len(pd.read_parquet(index)) == 8 * 12
    assert t.validate_headers.fn(work, cfg).name == "quarantine_validation.csv"
    assert t.assemble_series.fn(work, cfg).name == "instances.parquet"
    gate = t.apply_gate.fn(work, cfg)
    assert isinstance(gate, GateSummary) and gate.accepted_series == 8
    accepted = t.deidentify_corpus.fn(clean_corpus, work, cfg)
    assert len(pd.read_parquet(accepted)) == 96
    labels = t.rekey_labels.fn(clean_corpus, work, cfg)
    assert labels is not None and len(pd.read_csv(labels)) == 8
    t.reset_ingest.fn(work, "0" * 32 + ".dir")
    # A reset leaves only which source corpus comes next (its DVC md5, never its path).
    assert [p.name for p in (work / "ingest").iterdir()] == ["source.json"] and not (work / "deid").exists()
    assert json.loads((work / "ingest/source.json").read_text()) == {"dvc_md5": "0" * 32 + ".dir"}
