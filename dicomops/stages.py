"""Completion records that let a re-run skip finished work.

A stage that finishes writes ``WORK/.stages/<stage>.json``: a key built from the content hash of
its inputs, its settings and the source code of the modules it runs, the stage's result, and the
outputs it wrote. A later run with the same key skips the stage and returns the recorded result,
provided every listed output still exists. A stage clears its record before it starts, so a run
that dies half-way leaves no record, and the next run redoes that stage (per-series caches and the
training checkpoints make the redo cheap).

Prefect's own INPUTS cache is not used for stages that write into WORK: its key sees a path, not
what is on disk, so a deleted or edited work directory would still be a cache hit.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
from pathlib import Path
from typing import Any

from dicomops import io
from dicomops.layout import WorkLayout

log = logging.getLogger(__name__)

# The code each stage runs, by module or package name (a package counts with every module under it).
# The same names key a stage's completion record and the per-item caches inside the stage, so a
# change to that code re-runs the stage and recomputes its entries: there is no version to bump.
STAGE_CODE: dict[str, tuple[str, ...]] = {
    "ingest": ("dicomops.ingest", "dicomops.dicom", "dicomops.deid", "dicomops.validation"),
    "preprocess": ("dicomops.preprocessing", "dicomops.dicom.fastheader"),
    "train": ("dicomops.training", "dicomops.tracking", "dicomops.monitoring"),
    "segment": ("dicomops.segmentation", "dicomops.tracking"),
    "export": ("dicomops.export",),
}


def stage_modules(stage: str) -> tuple[str, ...]:
    """The module names whose source keys `stage`."""
    if stage not in STAGE_CODE:
        raise ValueError(f"unknown stage {stage!r}; one of {', '.join(STAGE_CODE)}")
    return STAGE_CODE[stage]


def _source_files(name: str) -> list[Path]:
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        raise ValueError(f"cannot find the source of module {name!r}")
    origin = Path(spec.origin)
    return sorted(origin.parent.rglob("*.py")) if origin.name == "__init__.py" else [origin]


def code_hash(*modules: str) -> str:
    """sha256 over the source of the named modules (a package counts with every module file under
    it), found without importing them."""
    digest = hashlib.sha256()
    root = Path(__file__).resolve().parent.parent  # paths are hashed relative to the project
    for name in modules:
        for path in _source_files(name):
            digest.update(str(path.relative_to(root) if path.is_relative_to(root) else path.name).encode())
            digest.update(_read_source(path))
    return digest.hexdigest()


def _read_source(path: Path) -> bytes:
    return path.read_bytes()


def stage_key(stage: str, inputs: dict[str, Any]) -> str:
    """The key of a stage's completion record: its inputs (content hashes, settings) and its code.
    A stage that registers a version also checks, before it skips, that the store it runs against
    holds that version from the recorded run (:func:`completed_in_store`)."""
    blob = json.dumps({"stage": stage, "inputs": inputs, "code": code_hash(*stage_modules(stage))},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def completed_in_store(work: Path, stage: str, key: str, tracking_uri: str, name: str) -> dict[str, Any] | None:
    """The record of a stage that registers a version of `name` (:func:`completed`), when the store at
    `tracking_uri` also holds that version from the recorded run; else None, saying why when the
    record stands for another store (a work directory trained against one store and run against a
    fresh one skipped training, "version 1 stands", with no model there)."""
    from dicomops.tracking.registry import registered_from

    cached = completed(work, stage, key)
    if cached is not None and not registered_from(tracking_uri, name, str(cached["version"]),
                                                  str(cached["mlflow_run_id"])):
        log.warning("%s: version %s recorded here is not in the MLflow store this run uses (another store, or "
                    "deleted there); running the stage again", stage, cached["version"])
        return None
    return cached


def _path(work: Path, stage: str) -> Path:
    return WorkLayout(work).stage_record(stage)


def completed(work: Path, stage: str, key: str) -> dict[str, Any] | None:
    """The recorded result when `stage` finished with `key` and its outputs are all still there."""
    path = _path(work, stage)
    if not path.exists():
        return None
    record = io.read_json(path)
    if record.get("key") != key or not all((Path(work) / p).exists() for p in record.get("outputs", [])):
        return None
    return dict(record["result"])


def clear(work: Path, stage: str) -> None:
    _path(work, stage).unlink(missing_ok=True)


def mark_done(work: Path, stage: str, key: str, result: dict[str, Any], outputs: list[Path] | None = None) -> None:
    """Record `stage` as finished with `key`; `outputs` default to the layout's list for the stage."""
    layout = WorkLayout(work)
    paths = outputs if outputs is not None else layout.stage_outputs(stage)
    io.write_json(_path(work, stage), {"key": key, "result": result, "outputs": [layout.relative(p) for p in paths]})



def decided_under(record: dict[str, Any], gate: dict[str, Any]) -> bool:
    """Whether a completed training stage's `record` holds a gate decision that stands under the
    gate settings `gate`: one made under those settings and not a gate error (a registry that did
    not answer; until a later run settles it, the version waits). Otherwise the flow gates the
    registered version again, and trains nothing."""
    return record.get("gate") == gate and record.get("decision") != "gate-error"


def record_gate(work: Path, stage: str, key: str, record: dict[str, Any], gate: dict[str, Any],
                decision: dict[str, Any]) -> dict[str, Any]:
    """`record` of a completed training stage with the gate's new `decision` on its version, made
    under the settings `gate`, marked done again (:func:`decided_under` then holds until they change)."""
    record = record | {"promoted": decision["promoted"], "decision": decision["decision"], "gate": gate}
    mark_done(work, stage, key, record)
    return record
