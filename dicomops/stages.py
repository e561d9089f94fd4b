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
import inspect
import json
from pathlib import Path
from types import ModuleType
from typing import Any

from dicomops import io


def code_hash(*modules: ModuleType) -> str:
    """sha256 over the source of `modules` (a package counts with every module file under it)."""
    digest = hashlib.sha256()
    for module in modules:
        origin = Path(inspect.getfile(module))
        files = sorted(origin.parent.rglob("*.py")) if origin.name == "__init__.py" else [origin]
        for path in files:
            digest.update(str(path.relative_to(origin.parent.parent)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def stage_key(stage: str, inputs: dict[str, Any], modules: tuple[ModuleType, ...]) -> str:
    blob = json.dumps({"stage": stage, "inputs": inputs, "code": code_hash(*modules)}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def _path(work: Path, stage: str) -> Path:
    return Path(work) / ".stages" / f"{stage}.json"


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


def mark_done(work: Path, stage: str, key: str, result: dict[str, Any], outputs: list[str]) -> None:
    io.write_json(_path(work, stage), {"key": key, "result": result, "outputs": outputs})
