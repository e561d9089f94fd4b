"""The few domain exceptions; everything else is a ValueError or TypeError that says what to change."""

from __future__ import annotations


class DicomOpsError(Exception):
    """Base class for the errors dicomops raises on purpose."""


class GateFailedError(DicomOpsError):
    """A quality gate refused the batch (too much quarantined, a critical expectation failed)."""


class CorpusMismatchError(DicomOpsError):
    """A regenerated corpus does not reproduce the hash its DVC pointer records."""


class ExportCheckError(DicomOpsError):
    """An exported model does not compute what the trained model computes (parity, INT8 accuracy)."""


class RegistryUnavailableError(DicomOpsError):
    """The model registry could not be read (a server down, a locked database): not the same as
    an alias that no version holds, and never to be decided as if it were."""


class WorkDirLockedError(DicomOpsError):
    """Another process is writing the same work directory."""


class ServerUnreachableError(DicomOpsError):
    """A server the command needs does not answer; the message names it, its setting and the fix."""
