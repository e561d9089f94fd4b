"""The few domain exceptions; everything else is a ValueError or TypeError that says what to change."""

from __future__ import annotations

import errno
import os


class DicomOpsError(Exception):
    """Base class for the errors dicomops raises on purpose."""


class GateFailedError(DicomOpsError):
    """A quality gate refused the batch (too much quarantined, a critical expectation failed).
    `brief` says the same without pointing to files under the gate's work directory, for a caller
    that removes it (a prediction's scratch folder); the message itself names them."""

    def __init__(self, message: str, brief: str | None = None) -> None:
        super().__init__(message)
        self.brief = brief or message


class PreprocessingFailedError(DicomOpsError, ValueError):
    """Every series of a corpus failed to preprocess: nothing to train on or to judge by its images."""


class CorpusMismatchError(DicomOpsError):
    """A regenerated corpus does not reproduce the hash its DVC pointer records."""


class ExportCheckError(DicomOpsError):
    """An exported model does not compute what the trained model computes (parity, INT8 accuracy)."""


class RegistryUnavailableError(DicomOpsError):
    """The model registry could not be read (a server down, a locked database): not the same as
    an alias that no version holds, and never to be decided as if it were."""


class WorkDirLockedError(DicomOpsError):
    """Another process is writing the same work directory."""


class RetrainNotReadyError(DicomOpsError, ValueError):
    """A retrain cannot start: what it needs is missing (its labelled source); the message says what to set."""


class ServerUnreachableError(DicomOpsError):
    """A server the command needs does not answer; the message names it, its setting and the fix."""


# What the machine, not the input, ran out of: a full disk or quota, a disk gone read-only, no file
# handles or kernel memory left.
LOCAL_OUTAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EMFILE, errno.ENFILE, errno.ENOMEM})


def local_outage(err: BaseException) -> str | None:
    """What this machine ran out of when `err` (or an error it was raised from) is the machine's
    doing, not the input's, e.g. "ENOSPC: no space left on device"; None for any other error. Work
    that meets one stops like an outage (the next run takes the same input again) instead of
    recording the input in hand as failed: every input would fail the same way until it is fixed."""
    code = local_outage_errno(err)
    return None if code is None else f"{errno.errorcode[code]}: {os.strerror(code).lower()}"


def local_outage_errno(err: BaseException) -> int | None:
    """The errno of :func:`local_outage`'s finding (``errno.ENOSPC``), None where it finds none."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in LOCAL_OUTAGE_ERRNOS:
            return current.errno
        current = current.__cause__ or current.__context__
    return None
