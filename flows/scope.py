"""What every flow does around its body: hold the work directory, and end its MLflow run FAILED on
any exception or interrupt (FINISHED otherwise)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from dicomops import locking
from dicomops.config import Settings
from tasks.tracking import close_run


@contextmanager
def writing(work: Path, flow: str, settings: Settings) -> Iterator[Path]:
    """Hold `work`'s lock (re-entrant: a subflow on the same work directory does not wait)."""
    with locking.hold(work, flow, settings.work_lock_timeout_s):
        yield Path(work)


@contextmanager
def tracked(tracking_uri: str, run_id: str) -> Iterator[str]:
    """End `run_id` FINISHED when the block completes, FAILED when anything escapes it."""
    try:
        yield run_id
    except BaseException:
        close_run(tracking_uri, run_id, "FAILED")
        raise
    close_run(tracking_uri, run_id)
