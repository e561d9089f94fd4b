"""The Data Docs page of a validation result, with warnings shown as warnings.

GX names this class in the site configuration (``site_section_builders.validations.renderer``) and
imports it by module path, so it lives apart from ``suite`` and ``docs``, which import GX only
inside the functions that need it.
"""

from __future__ import annotations

from typing import Any

from great_expectations.render.renderer import ValidationResultsPageRenderer

WARNING_ICON = '<i class="fas fa-exclamation-triangle text-warning" aria-hidden="true"></i>'


class SeverityValidationResultsPageRenderer(ValidationResultsPageRenderer):
    """GX's validation page, whose status says "Succeeded with N warnings" when the result
    succeeded (no critical expectation failed, see ``suite.judge_by_severity``) and some
    expectations below critical failed; GX would say "Succeeded" and leave them to the table."""

    @classmethod
    def _render_validation_header(cls, validation_results: Any) -> Any:
        header = super()._render_validation_header(validation_results)
        failed = sum(1 for r in validation_results.results if not r.success)
        if validation_results.success and failed:
            params = header.subheader.string_template["params"]
            params["success"] = f"Succeeded with {failed} warning{'s' if failed > 1 else ''}"
            params["html_success_icon"] = WARNING_ICON
        return header
