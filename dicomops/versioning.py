"""Get the demo corpus into ``data/``: from the DVC remote if it has it, else by regenerating it.

The generator is deterministic, so a fresh clone that cannot reach the remote regenerates the
corpus and checks it against the hash in ``data.dvc`` before trusting it.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from dicomops.config import SynthConfig
from dicomops.errors import CorpusMismatchError
from dicomops.synthetic import generate_corpus
from dicomops.tracking.lineage import dvc_directory_hash, read_dvc_pointer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CorpusStatus:
    path: Path
    source: str  # "present", "pulled" or "generated"
    md5: str
    matches_pointer: bool | None  # None when there is no pointer to compare with


def _dvc(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=1800)


def ensure_corpus(data: Path, cfg: SynthConfig, *, pointer: Path | None = None, strict: bool = False,
                  track: bool = True, progress: Callable[[int, int], None] | None = None) -> CorpusStatus:
    """Make sure `data` holds the corpus `pointer` records (or `cfg` describes).

    Args:
        data: the corpus folder, e.g. ``data``.
        cfg: generator options used when the corpus has to be regenerated.
        pointer: the DVC pointer file (default ``<data>.dvc`` beside the folder).
        strict: raise :class:`CorpusMismatchError` when a regenerated corpus does not reproduce the
            pointer's hash (otherwise warn and go on with the regenerated data).
        track: after regenerating, ``dvc add`` the folder and push it to the default remote.
        progress: called with (series done, series total) while generating.
    """
    data = Path(data).resolve()
    pointer = Path(pointer) if pointer else data.with_name(data.name + ".dvc")
    expected = str(read_dvc_pointer(pointer)["md5"]) if pointer.exists() else None
    repo = pointer.resolve().parent
    if data.exists() and any(data.iterdir()):
        md5 = dvc_directory_hash(data)
        return CorpusStatus(data, "present", md5, None if expected is None else md5 == expected)
    if expected is not None:
        pulled = _dvc("pull", pointer.name, cwd=repo)
        if pulled.returncode == 0 and data.exists() and any(data.iterdir()):
            return CorpusStatus(data, "pulled", expected, True)
        log.info("dvc pull found no copy (%s); regenerating the corpus",
                 pulled.stderr.strip().splitlines()[-1] if pulled.stderr.strip() else "no output")
    generate_corpus(data, cfg, progress=progress)
    md5 = dvc_directory_hash(data)
    matches = None if expected is None else md5 == expected
    if matches is False:
        message = (f"regenerated corpus hash {md5} differs from {pointer.name} ({expected}); the "
                   "generator or a pinned dependency changed. If the change is intended, run "
                   f"'dvc add {data.name}' and commit {pointer.name}")
        if strict:
            raise CorpusMismatchError(message)
        log.warning(message)
    elif track:
        for args in (("add", data.name), ("push", pointer.name)):
            result = _dvc(*args, cwd=repo)
            if result.returncode != 0:
                log.warning("dvc %s failed: %s", args[0], result.stderr.strip()[-500:])
                break
    return CorpusStatus(data, "generated", md5, matches)
