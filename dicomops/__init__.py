"""dicomops: orchestrated MLOps for CT imaging.

The library holds all the logic and never imports Prefect; ``tasks/`` and ``flows/`` wire it.
"""

from __future__ import annotations

import logging
import warnings

__version__ = "0.1.0"


class _WithheldMessage(logging.Filter):
    """pydicom logs what it finds odd in a header with the value in the text ("Invalid value for VR
    UI: '1.2.840...'"), and a worker's log is kept: the record stays, its text does not."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = "pydicom reported a %s about a header (text withheld: it may quote the value)"
        record.args = (record.levelname.lower(),)
        return True


logging.getLogger("pydicom").addFilter(_WithheldMessage())
# highdicom logs source SOP Instance UIDs (INFO, and WARNING for an odd reference in a reader's
# SEG), dicomweb-client the paths it requests (INFO: study, series and instance UIDs). Their
# modules log under these names; below ERROR nothing of theirs leaves the process.
for _library in ("highdicom", "dicomweb_client"):
    logging.getLogger(_library).setLevel(logging.ERROR)
# Their warnings quote values too (pydicom: "Invalid value for VR UI: '1.2.840...'" when a header
# is read, set or written; highdicom: a person name it finds odd), and a warning printed to stderr
# ends in the worker's or the replica's log. pydicom is told not to check values it would only warn
# about (its checks warn and change nothing, so nothing else changes), a setting no
# `warnings.catch_warnings` elsewhere can undo; what else the two libraries warn is not issued, by
# a filter set once for the process (one set while a caller's catch_warnings block imports
# dicomops ends with that block, hence the setting). Not catch_warnings around each call: that
# swaps process-wide state, and the threads of the online service or of a prefetch would restore
# each other's (a lasting "ignore all", or warnings collected into a list nobody reads).
warnings.filterwarnings("ignore", module=r"(pydicom|highdicom)(\.|$)")


def _quiet_pydicom() -> None:
    from pydicom import config

    config.settings.reading_validation_mode = config.IGNORE
    config.settings.writing_validation_mode = config.IGNORE


_quiet_pydicom()
