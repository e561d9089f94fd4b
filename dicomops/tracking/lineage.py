"""Where a run's code and data came from: git commit, DVC hash of the data, package versions."""

from __future__ import annotations

import hashlib
import json
import subprocess
from importlib import metadata
from pathlib import Path

import yaml

TRACKED_PACKAGES = ("dicomops", "torch", "monai", "pydicom", "prefect", "mlflow", "dvc",
                    "great_expectations", "evidently", "onnx", "onnxruntime", "numpy", "pandas")


def git_commit(repo: Path | None = None) -> str:
    """The checkout's HEAD commit, with ``-dirty`` when tracked files changed; ``unknown`` outside git."""
    cwd = str(repo or Path.cwd())
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True,
                              text=True, check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{head}-dirty" if dirty else head


def _file_md5(path: Path) -> str:
    h = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def dvc_directory_hash(root: Path) -> str:
    """The md5 DVC 3 records for a directory output (``<md5>.dir``), computed without DVC.

    DVC hashes a directory as the md5 of the JSON list of ``{"md5", "relpath"}`` entries sorted by
    path. Computing it here lets a regenerated corpus be checked against ``data.dvc`` before
    anything is written.
    """
    root = Path(root)
    entries = [
        {"md5": _file_md5(p), "relpath": p.relative_to(root).as_posix()}
        for p in sorted(root.rglob("*"), key=lambda q: q.relative_to(root).as_posix())
        if p.is_file()
    ]
    entries.sort(key=lambda e: e["relpath"])
    blob = json.dumps(entries, sort_keys=True).encode()
    return hashlib.md5(blob, usedforsecurity=False).hexdigest() + ".dir"


def read_dvc_pointer(pointer: Path) -> dict[str, object]:
    """The first output of a ``.dvc`` file: md5, size, nfiles, path."""
    try:
        doc = yaml.safe_load(Path(pointer).read_text())
        return dict(doc["outs"][0])
    except (OSError, KeyError, IndexError, TypeError) as err:
        raise ValueError(f"{pointer} is not a DVC pointer file with an 'outs' entry") from err


def package_versions() -> dict[str, str]:
    """Installed versions of the packages that decide a run's result."""
    versions = {}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = metadata.version(name.replace("_", "-"))
        except metadata.PackageNotFoundError:
            versions[name] = "absent"
    return versions


# The data's identity, one tag per meaning. The source corpus as DVC hashes it (the md5 in
# ``data.dvc``), on the runs that read a DICOM folder (ingest, pipeline, monitor); and the accepted,
# de-identified corpus that training learns from, on training runs and model versions.
SOURCE_HASH_TAG = "data_dvc_md5"
ACCEPTED_HASH_TAG = "data.accepted_sha256"


def lineage_tags(data_hash: str | None = None, repo: Path | None = None, *,
                 accepted_sha256: str | None = None) -> dict[str, str]:
    """Tags every dicomops MLflow run carries: `data_hash` is the source folder's DVC md5
    (:data:`SOURCE_HASH_TAG`); `accepted_sha256` the accepted corpus's hash (:data:`ACCEPTED_HASH_TAG`)."""
    tags = {"git_commit": git_commit(repo)}
    if data_hash:
        tags[SOURCE_HASH_TAG] = data_hash
    if accepted_sha256:
        tags[ACCEPTED_HASH_TAG] = accepted_sha256
    tags.update({f"version.{k}": v for k, v in package_versions().items()})
    return tags
