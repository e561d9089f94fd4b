"""The one helper that imports an optional dependency and names the extra that provides it."""

from __future__ import annotations

import importlib
from types import ModuleType

from dicomops.errors import OptionalDependencyError


def import_optional(module: str, extra: str) -> ModuleType:
    """Import ``module`` or raise an error that says which extra installs it.

    Args:
        module: dotted module name, e.g. ``"tensorrt"``.
        extra: the dicomops extra that provides it, e.g. ``"tensorrt"``.
    """
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise OptionalDependencyError(
            f"{module} is not installed; install it with: pip install 'dicomops[{extra}]'"
        ) from err
