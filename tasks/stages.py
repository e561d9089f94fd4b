"""Stage completion records as tasks (see dicomops/stages.py): the key, the check, the mark."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from prefect import task

from dicomops import stages


@task(name="stage-key")
def stage_key(stage: str, inputs: dict[str, Any]) -> str:
    if stage == "ingest":  # pseudonyms depend on the de-identification key: a new key, a new ingest
        from dicomops.deid.keys import key_from_settings

        inputs = {**inputs, "deid_key_sha256": hashlib.sha256(key_from_settings()).hexdigest()}
    return stages.stage_key(stage, inputs)


@task(name="stage-completed")
def completed(work: Path, stage: str, key: str) -> dict[str, Any] | None:
    return stages.completed(work, stage, key)


@task(name="stage-started")
def started(work: Path, stage: str) -> None:
    stages.clear(work, stage)


@task(name="stage-done")
def done(work: Path, stage: str, key: str, result: dict[str, Any], outputs: list[Path] | None = None) -> None:
    stages.mark_done(work, stage, key, result, outputs)


@task(name="stage-completed-in-store")
def registered(work: Path, stage: str, key: str, tracking_uri: str, name: str) -> dict[str, Any] | None:
    return stages.completed_in_store(work, stage, key, tracking_uri, name)


@task(name="record-gate-again")
def gated_again(work: Path, stage: str, key: str, record: dict[str, Any], gate: dict[str, Any],
                decision: dict[str, Any]) -> dict[str, Any]:
    return stages.record_gate(work, stage, key, record, gate, decision)
