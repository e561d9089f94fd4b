"""Safe DICOM reading, the header index, and series assembly with geometry checks."""

from __future__ import annotations

from dicomops.dicom.parallel import map_isolated
from dicomops.dicom.reader import REQUIRED_TAGS, ReadLimits, inspect_file, list_files
from dicomops.dicom.series import AssemblyResult, GeometryTolerance, assemble_series

__all__ = ["REQUIRED_TAGS", "AssemblyResult", "GeometryTolerance", "ReadLimits", "assemble_series",
           "inspect_file", "list_files", "map_isolated"]
