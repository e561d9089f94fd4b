"""What every flow does around its body: check its servers and bound their clients' retries, hold
the work directory, and end its MLflow run FAILED on any exception or interrupt (FINISHED
otherwise)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pydantic import SecretStr

from dicomops import locking
from dicomops.config import Settings
from dicomops.preflight import preflight, reachable
from tasks.tracking import close_run

MASKED = str(SecretStr("x"))  # how Prefect stores a SecretStr parameter, and gives it back on a retry


def folder(src: SecretStr | Path | str) -> Path:
    """The DICOM folder a flow was given. A site's export may name its folders after the patient, so
    the command line and the flows that call others pass it as a ``SecretStr``: Prefect stores the
    flow run's parameter as ``**********``, and the flow never prints it."""
    path = src.get_secret_value() if isinstance(src, SecretStr) else str(src)
    if path == MASKED:
        raise ValueError("the folder is the masked value Prefect stored (a flow run retried or copied from the "
                         "UI): start a new run with the folder (dicomops ingest/predict/monitor/run FOLDER)")
    return Path(path)


def secret_folder(src: Path | str) -> SecretStr:
    """`src` as a flow parameter Prefect stores masked (:func:`folder`)."""
    return SecretStr(str(src))


@contextmanager
def writing(work: Path, flow: str, settings: Settings) -> Iterator[Path]:
    """Preflight the servers, then hold `work`'s lock (re-entrant: a subflow on the same work
    directory does not wait)."""
    preflight(settings)
    with locking.hold(work, flow, settings.work_lock_timeout_s):
        yield Path(work)


@contextmanager
def tracked(tracking_uri: str, run_id: str) -> Iterator[str]:
    """End `run_id` FINISHED when the block completes, FAILED when anything escapes it."""
    try:
        yield run_id
    except BaseException:
        if not reachable(tracking_uri):  # closing it would spend another retry budget on a dead server
            print(f"MLflow at {tracking_uri} does not answer: run {run_id} stays RUNNING there; "
                  "the next run of this flow starts a new one")
            raise
        try:
            close_run.with_options(retries=0)(tracking_uri, run_id, "FAILED")
        except Exception as close_error:  # the flow's own error is the one to report
            print(f"could not mark run {run_id} FAILED: {close_error}")
        raise
    close_run(tracking_uri, run_id)
