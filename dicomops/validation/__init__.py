"""Great Expectations suite and checkpoint over the de-identified header table."""

from __future__ import annotations

from dicomops.validation.suite import (
    ExpectationSpec,
    ValidationOutcome,
    default_expectations,
    validate_table,
)

__all__ = ["ExpectationSpec", "ValidationOutcome", "default_expectations", "validate_table"]
