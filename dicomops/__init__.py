"""dicomops: orchestrated MLOps for CT imaging.

The library holds all the logic and never imports Prefect; ``tasks/`` and ``flows/`` wire it.
"""

from __future__ import annotations

import logging

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
