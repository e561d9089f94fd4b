"""Build a Great Expectations 1.x suite from config, run it as a checkpoint, build Data Docs.

The table validated is the de-identified header index, so no unexpected-value sample in the Data
Docs can carry PHI. Each expectation is critical (its failing rows are quarantined as
``expectation:<name>``) or a warning (reported only), and GX carries that as the expectation's
``severity``; a run succeeds, in the outcome and in the Data Docs alike, when no critical
expectation failed (``judge_by_severity``). The Data Docs render offline (``dicomops.validation.docs``).
A rule that must see an original value (the
StudyDate format) is judged in the worker that reads the header; the index carries the verdict
(``dicomops.validation.dates``) and the expectation checks that. Quarantine details name the column,
the rule and the kind of value that failed, never the value.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pandas as pd
from pydantic import BaseModel, ConfigDict, Field

from dicomops.validation.dates import (
    ACCEPTED,
    NOT_JUDGED,
    STUDY_DATE_VERDICT,
    VERDICT_COLUMNS,
    verdict_detail,
)
from dicomops.validation.docs import make_docs_offline

Kind = Literal["not_null", "in_set", "between", "unique", "regex"]
ROW_ID = "row_id"


class ExpectationSpec(BaseModel):
    """One expectation, as configured."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    kind: Kind
    column: str
    critical: bool = True
    value_set: list[Any] | None = None
    min_value: float | None = None
    max_value: float | None = None
    strict_min: bool = False
    regex: str | None = None
    mostly: float = 1.0
    detail: str | None = Field(
        None, description="What a failing value is, in words, for the quarantine detail "
                          "('<column>: <detail>'); default: the rule. Never put a value from the data here.")


REQUIRED_COLUMNS = (
    "PatientID", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "StudyDate", "Modality",
    "Manufacturer", "PixelSpacing_0", "SliceThickness", "Rows", "Columns", "BitsStored",
    "RescaleSlope", "RescaleIntercept", "ImagePositionPatient_0", "ImageOrientationPatient_0",
)


# The modalities the ingest gate accepts: ``IngestConfig.allowed_modalities`` defaults to this, and
# the suite's modality expectation is built from that config field (or from this by default).
ALLOWED_MODALITIES: tuple[str, ...] = ("CT",)
MODALITY_EXPECTATION = "modality_allowed"
DOCS_SITE = "validation"
STUDY_DATE_EXPECTATION = "study_date_format"


def default_expectations(allowed_modalities: Sequence[str] = ALLOWED_MODALITIES) -> list[ExpectationSpec]:
    """The header contract of the ingest gate, accepting the modalities `allowed_modalities`."""
    if isinstance(allowed_modalities, str) or not allowed_modalities:
        raise ValueError(f"allowed_modalities must be a non-empty list of modalities such as ['CT'], "
                         f"got {allowed_modalities!r}")
    specs = [ExpectationSpec(name=f"required_{c}", kind="not_null", column=c) for c in REQUIRED_COLUMNS]
    specs += [
        ExpectationSpec(name=MODALITY_EXPECTATION, kind="in_set", column="Modality",
                        value_set=list(allowed_modalities)),
        ExpectationSpec(name="pixel_spacing_row_range", kind="between", column="PixelSpacing_0",
                        min_value=0.2, max_value=5.0),
        ExpectationSpec(name="pixel_spacing_col_range", kind="between", column="PixelSpacing_1",
                        min_value=0.2, max_value=5.0),
        ExpectationSpec(name="slice_thickness_range", kind="between", column="SliceThickness",
                        min_value=0.5, max_value=5.0),
        ExpectationSpec(name="kvp_range", kind="between", column="KVP", min_value=70, max_value=150,
                        critical=False),
        ExpectationSpec(name="bits_stored_allowed", kind="in_set", column="BitsStored",
                        value_set=[8, 12, 16]),
        ExpectationSpec(name="rescale_slope_positive", kind="between", column="RescaleSlope",
                        min_value=0, strict_min=True),
        ExpectationSpec(name="sop_instance_uid_unique", kind="unique", column="SOPInstanceUID",
                        critical=False),
        # Judged on the original value before the date shift; see dicomops.validation.dates.
        ExpectationSpec(name=STUDY_DATE_EXPECTATION, kind="in_set", column=STUDY_DATE_VERDICT,
                        value_set=list(ACCEPTED)),
    ]
    return specs


@dataclass
class ValidationOutcome:
    success: bool  # no critical expectation failed; warnings never fail a run
    success_share: float  # share of expectations met
    table: pd.DataFrame  # one row per expectation: name, column, critical, success, unexpected
    failed_rows: dict[str, list[int]] = field(default_factory=dict)  # critical name -> row ids
    docs_index: Path | None = None
    # critical name -> row id -> quarantine detail (column, rule, kind of value; never the value)
    failed_details: dict[str, dict[int, str]] = field(default_factory=dict)


def _number(value: float | None) -> str:
    return "" if value is None else f"{value:g}"


def describe_failure(spec: ExpectationSpec, value: object = None) -> str:
    """The quarantine detail of a row failing `spec`: ``'<column>: <what failed>'``.

    `value` is read only when the column holds verdicts from a closed set (never PHI); every other
    detail is built from the spec alone, so no value from the data can reach it.
    """
    from_verdict = verdict_detail(spec.column, value)
    if from_verdict is not None:
        return from_verdict
    if spec.detail:
        return f"{spec.column}: {spec.detail}"
    if spec.kind == "not_null":
        what = "missing or empty"
    elif spec.kind == "in_set":
        what = f"not one of the allowed values ({', '.join(str(v) for v in spec.value_set or [])})"
    elif spec.kind == "between":
        low = "" if spec.min_value is None else ("above " if spec.strict_min else "at least ") + _number(spec.min_value)
        high = "" if spec.max_value is None else f"at most {_number(spec.max_value)}"
        what = "a number outside the range (" + ", ".join(x for x in (low, high) if x) + ")"
    elif spec.kind == "unique":
        what = "a value shared with another instance (must be unique)"
    else:
        what = f"does not match the pattern {spec.regex}"
    return f"{spec.column}: {what}"


def _gx_expectation(spec: ExpectationSpec) -> Any:
    import great_expectations as gx

    common: dict[str, Any] = {"column": spec.column, "mostly": spec.mostly,
                              "meta": {"name": spec.name, "critical": spec.critical},
                              "severity": "critical" if spec.critical else "warning"}
    e = gx.expectations
    if spec.kind == "not_null":
        return e.ExpectColumnValuesToNotBeNull(**common)
    if spec.kind == "in_set":
        return e.ExpectColumnValuesToBeInSet(value_set=spec.value_set or [], **common)
    if spec.kind == "between":
        return e.ExpectColumnValuesToBeBetween(min_value=spec.min_value, max_value=spec.max_value,
                                               strict_min=spec.strict_min, **common)
    if spec.kind == "unique":
        return e.ExpectColumnValuesToBeUnique(**common)
    return e.ExpectColumnValuesToMatchRegex(regex=spec.regex or ".*", **common)


def judge_by_severity(result: Any, store: Any) -> bool:
    """Make each validation result of checkpoint `result` succeed unless a critical expectation
    failed, save it again in `store`, and return whether all succeeded.

    GX 1.x records each expectation's ``severity`` but still fails a result on any failure, so
    its Data Docs said "Failed" for a duplicate UID (a warning) while the gate passed. The Data
    Docs are built from the results saved here, so their status is the gate's verdict.
    """
    from great_expectations.expectations.metadata_types import FailureSeverity

    verdicts = []
    for key, run in result.run_results.items():
        run.success = run.get_max_severity_failure() != FailureSeverity.CRITICAL
        store.set(key, run)
        verdicts.append(run.success)
    return all(verdicts)


def _site_config(docs_dir: Path) -> Any:  # GX's TypedDict omits site_section_builders, which it reads
    return {
        "class_name": "SiteBuilder",
        "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
        "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(docs_dir)},
        "site_section_builders": {"validations": {"renderer": {
            "module_name": "dicomops.validation.renderer",
            "class_name": "SeverityValidationResultsPageRenderer"}}},
    }


def validate_table(table: pd.DataFrame, specs: list[ExpectationSpec], docs_dir: Path,
                   suite_name: str = "dicom-headers") -> ValidationOutcome:
    """Validate `table` against `specs` in an ephemeral GX context and build Data Docs in `docs_dir`.

    Columns that a spec names but the table lacks are added as nulls, so a missing column fails
    its expectation instead of crashing the checkpoint. The Data Docs load nothing from the network
    (``docs.make_docs_offline``) and say "Failed" only when a critical expectation failed.
    """
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    frame = table.reset_index(drop=True).copy()
    frame[ROW_ID] = range(len(frame))
    for spec in specs:
        if spec.column not in frame:
            frame[spec.column] = None
        if spec.column in VERDICT_COLUMNS:  # GX skips nulls; a missing verdict must fail, not pass
            frame[spec.column] = frame[spec.column].astype(object).where(frame[spec.column].notna(), NOT_JUDGED)
    docs_dir = Path(docs_dir).resolve()  # GX wants an absolute base directory
    docs_dir.mkdir(parents=True, exist_ok=True)
    ctx = gx.get_context(mode="ephemeral")
    ctx.variables.progress_bars = ProgressBarsConfig(globally=False)
    ctx.add_data_docs_site(site_name=DOCS_SITE, site_config=_site_config(docs_dir))
    asset = ctx.data_sources.add_pandas("dicom").add_dataframe_asset("header_index")
    batch = asset.add_batch_definition_whole_dataframe("all-instances")
    suite = ctx.suites.add(gx.ExpectationSuite(name=suite_name))
    for spec in specs:
        suite.add_expectation(_gx_expectation(spec))
    definition = ctx.validation_definitions.add(
        gx.ValidationDefinition(data=batch, suite=suite, name=f"{suite_name}-validation"))
    # No UpdateDataDocsAction: the docs are built after judge_by_severity has saved the verdicts.
    checkpoint = ctx.checkpoints.add(gx.Checkpoint(
        name=f"{suite_name}-checkpoint", validation_definitions=[definition], actions=[],
        result_format={"result_format": "COMPLETE", "unexpected_index_column_names": [ROW_ID]},
    ))
    result = checkpoint.run(batch_parameters={"dataframe": frame})
    success = judge_by_severity(result, ctx.validation_results_store)
    ctx.build_data_docs(site_names=[DOCS_SITE])
    make_docs_offline(docs_dir)
    rows: list[dict[str, Any]] = []
    failed: dict[str, list[int]] = {}
    details: dict[str, dict[int, str]] = {}
    by_name = {spec.name: spec for spec in specs}
    for run in result.run_results.values():
        for r in run.results:
            config = r.expectation_config
            if config is None:
                continue
            meta = config.meta or {}
            name = str(meta.get("name"))
            unexpected = [int(i[ROW_ID]) for i in (r.result.get("unexpected_index_list") or [])]
            rows.append({"expectation": name, "type": config.type,
                         "column": config.kwargs.get("column"),
                         "critical": bool(meta.get("critical")), "success": bool(r.success),
                         "unexpected_count": int(r.result.get("unexpected_count") or 0),
                         "element_count": int(r.result.get("element_count") or len(frame))})
            if meta.get("critical") and not r.success:
                failed[name] = unexpected
                spec = by_name[name]
                details[name] = {i: describe_failure(spec, frame.at[i, spec.column]) for i in unexpected}
    summary = pd.DataFrame(rows).sort_values("expectation", ignore_index=True)
    share = float(summary["success"].mean()) if len(summary) else 1.0
    index = docs_dir / "index.html"
    return ValidationOutcome(success=success, success_share=share, table=summary,
                             failed_rows=failed, docs_index=index if index.exists() else None,
                             failed_details=details)
