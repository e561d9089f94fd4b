"""The model version's page as a model card: the Markdown description a radiologist reads in the
MLflow UI to approve or reject a version.

The card is a sequence of ``## `` sections in a fixed order. Training writes the evidence; the
promotion gate, a reviewer's decision and the export each rewrite only their own section, so the
decision always leads and nothing another stage wrote is lost. This module owns the wording and
the order; :mod:`dicomops.tracking.registry` decides when a section changes.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dicomops.feedback.privacy import PoolCounts

# Section keys in the order they appear; a heading is ``## <key>`` plus, for the decision, its verdict.
DECISION, EVIDENCE, FOLDS, LOVO, IDENTITY, EXPORT, COMPARISON, REVIEW = (
    "Decision", "Evidence by vendor", "By fold", "Unseen scanners", "Data, split and code", "Export", "Compared with",
    "How to review")
ORDER = (DECISION, EVIDENCE, FOLDS, LOVO, IDENTITY, EXPORT, COMPARISON, REVIEW)

VERDICTS = {
    "pending": "pending — the promotion gate has not run yet",
    "superseded": "superseded — a newer version is the challenger",
    "auto-promoted": "promoted automatically — champion",
    "awaiting-review": "awaiting review — challenger",
    "gate-error": "not decided (the gate could not read the champion) — challenger",
    "promoted-by-reviewer": "approved by a reviewer — champion",
    "rejected-by-reviewer": "rejected by a reviewer",
    "replaced": "replaced — no longer champion",
}


def _f(value: Any, digits: int = 3) -> str:
    """A figure for a table cell: fixed decimals, an en dash where it is undefined."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{float(value):.{digits}f}"


# MLflow's Markdown tables have no cell padding: two right-aligned figures side by side read as one
# number ("0.9911.000"). Every cell therefore ends in a no-break space.
PAD = "&nbsp;"
# MLflow's SQL stores keep a version description in a VARCHAR(5000) (PostgreSQL enforces it).
LIMIT = 5000


def table(header: Sequence[str], align: str, rows: Sequence[Sequence[str]]) -> list[str]:
    """A Markdown table whose cells stay apart in MLflow's UI; `align` has one ``l`` or ``r`` per column."""
    if len(align) != len(header) or any(len(row) != len(header) for row in rows):
        raise ValueError("a table needs one alignment and one cell per column in every row")

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(f"{cell}{PAD}" for cell in cells) + " |"

    return [line(header), "|" + "|".join(":--" if a == "l" else "--:" for a in align) + "|", *map(line, rows)]


def section(key: str, body: str, verdict: str | None = None) -> str:
    heading = f"## {key}: {verdict}" if verdict else f"## {key}"
    return f"{heading}\n\n{body.strip()}\n"


def split_sections(description: str) -> dict[str, str]:
    """The card's sections by key (text before the first heading is dropped)."""
    found: dict[str, str] = {}
    for block in re.split(r"(?m)^(?=## )", description or ""):
        if not block.startswith("## "):
            continue
        title = block[3:].split("\n", 1)[0]
        key = next((k for k in ORDER if title == k or title.startswith(f"{k}:")), title)
        found[key] = block.rstrip() + "\n"
    return found


def set_section(description: str, key: str, text: str) -> str:
    """`description` with section `key` replaced by `text` (a :func:`section`), in card order,
    within :data:`LIMIT` (see :func:`fit`)."""
    sections = split_sections(description)
    sections[key] = text.rstrip() + "\n"
    ordered = [sections[k] for k in ORDER if k in sections] + [v for k, v in sections.items() if k not in ORDER]
    return fit("\n".join(ordered))


def fit(card: str, limit: int = LIMIT) -> str:
    """`card` within `limit` characters: first without the cells' padding, then without its last
    sections (never the decision or the evidence), saying which were left out and where they are."""
    if len(card) <= limit:
        return card
    card = card.replace(PAD, "")
    sections = split_sections(card)
    dropped: list[str] = []
    while len(card) > limit and len(sections) > 2:
        dropped.insert(0, list(sections)[-1])
        sections.pop(dropped[0])
        note = (f"## Left out\n\nMLflow keeps {limit:,} characters of a description: "
                f"{', '.join(dropped)} left out; the training run's `cv/` artifacts hold the tables.\n")
        card = "\n".join([*sections.values(), note])
    return card[:limit]


def review_command(verb: str, model_name: str, version: str) -> str:
    """The CLI command a reviewer runs to `verb` (promote, reject) `version` of `model_name`: it
    names the model unless it is the one ``dicomops promote`` and ``reject`` take by default (a
    segmenter's page told reviewers to promote the classifier's version of the same number)."""
    from dicomops.config import TrainConfig

    named = "" if model_name == TrainConfig.model_fields["model_name"].default else f" --model-name {model_name}"
    return f"dicomops {verb} {version}{named}"


def decision_section(label: str, reasons: Sequence[str], version: str, reviewer: str | None = None,
                     note: str | None = None, *, model_name: str) -> str:
    """The lead section: what was decided about `version` of `model_name`, by whom, and why."""
    lines = []
    if reviewer:
        lines.append(f"Decided by **{reviewer}**" + (f": {note}" if note else "") + ".")
        lines.append("")
    if reasons:
        lines.append("Reasons of the promotion gate:")
        lines += [f"- {reason}" for reason in reasons]
    if label in ("awaiting-review", "gate-error", "pending"):
        lines += ["", f"This version is the **challenger**. To approve it, see *How to review* below "
                      f"(`{review_command('promote', model_name, version)} --reviewer NAME`)."]
    return section(DECISION, "\n".join(lines) or "No reasons recorded.", VERDICTS.get(label, label))


def evidence_section(summary: Mapping[str, Any], evidence: Sequence[Mapping[str, Any]], pool: PoolCounts,
                     level: float = 0.95, n_splits: int = 4) -> str:
    """Per vendor: the released negatives and positives, pooled AUC with its interval, the fold mean
    the gate uses, and sensitivity / specificity at the operating point. No exact count: the counts
    are `pool`'s, released under differential privacy (:mod:`dicomops.feedback.privacy`)."""
    pct = f"{level * 100:.0f} %"
    lines = [
        f"{n_splits}-fold vendor-stratified cross-validation, series level. Mean fold AUC "
        f"**{_f(summary['mean_auc'])} ± {_f(summary['std_auc'])}** (the figure the promotion gate compares); "
        f"operating point **{_f(summary['threshold'])}** (Youden, on the pooled out-of-fold scores).",
        "",
    ]

    vendors = [str(row["vendor"]) for row in evidence if row["vendor"] != "all"]

    def counts(vendor: str) -> list[str]:
        if vendor == "all":
            return [pool.total(0, vendors), pool.total(1, vendors)]
        return [pool.cell(vendor, 0), pool.cell(vendor, 1)]

    lines += table(
        ["vendor", "negatives", "positives", f"AUC pooled ({pct} CI)", "AUC fold mean ± sd", "sensitivity",
         "specificity"], "lrrllrr",
        [["**all**" if row["vendor"] == "all" else str(row["vendor"]), *counts(str(row["vendor"])),
          f"{_f(row['auc_pooled'])}" + (f" ({_f(row['auc_ci_low'])}–{_f(row['auc_ci_high'])})"
                                        if row["auc_ci_low"] == row["auc_ci_low"] else ""),  # NaN: none
          f"{_f(row['auc_fold_mean'])} ± {_f(row['auc_fold_std'])}" + _folds_counted(row, n_splits),
          _f(row["sensitivity"]), _f(row["specificity"])]
         for row in evidence])
    lines += [
        "",
        f"*Negatives, positives*: {pool.caption} The *all* row adds the vendors' released cells (+: and "
        f"the suppressed ones).",
        "",
        f"*AUC pooled*: one ROC over every series' out-of-fold score (the ROC pictures show this one), with a "
        f"stratified bootstrap {pct} interval (2,000 resamples; none under 5 positives or 5 negatives, where "
        f"its resamples barely differ). *AUC fold mean*: the mean of the {n_splits} folds' "
        f"AUCs, each on a fold's share of a vendor's series, so it varies more; where a fold held one class "
        f"of a vendor only, it has no AUC there, and the cell says of how many folds the mean is. Sensitivity and specificity are "
        f"pooled out of fold at the operating point. A pooled AUC well below the fold mean means the fold models "
        f"score on different scales, so one operating point serves them (and the final model) less well than "
        f"their AUCs suggest: read sensitivity and specificity.",
    ]
    return section(EVIDENCE, "\n".join(lines))


def _folds_counted(row: Mapping[str, Any], n_splits: int) -> str:
    counted = row.get("auc_folds")
    if counted is None or counted != counted or int(counted) >= n_splits:  # absent (older evidence), NaN, all
        return ""
    return f" ({int(counted)} of {n_splits} folds)"


def folds_section(per_fold: Sequence[Mapping[str, Any]]) -> str:
    return section(FOLDS, "\n".join(table(
        ["fold", "AUC", "sensitivity", "specificity"], "rrrr",
        [[str(int(r["fold"])), _f(r["auc"]), _f(r["sensitivity"]), _f(r["specificity"])] for r in per_fold])))


def lovo_section(lovo: Sequence[Mapping[str, Any]]) -> str:
    lines = ["Trained on the other vendors, scored on the held-out one (its series: *Evidence by vendor*):", ""]
    lines += table(["held-out vendor", "AUC"], "lr", [[str(r["held_out_vendor"]), _f(r["auc"])] for r in lovo])
    return section(LOVO, "\n".join(lines))


def identity_section(identity: Mapping[str, str], vendor_names: Mapping[str, Sequence[str]] | None = None) -> str:
    """Where the version came from: data and split hashes, code, and which scanner makes each vendor is."""
    lines = [f"- {name}: `{value}`" for name, value in identity.items()]
    if vendor_names:
        lines += ["", "Vendor keys and the Manufacturer values they stand for: "
                  + "; ".join(f"{key} ← {', '.join(sorted(names))}" for key, names in sorted(vendor_names.items()))]
    return section(IDENTITY, "\n".join(lines))


def export_section(metrics: Mapping[str, float], tensorrt: str, artifacts: str) -> str:
    """The export's figures: ONNX parity, INT8 cost, latency, TensorRT."""
    def get(key: str) -> float:
        return float(metrics.get(key, float("nan")))

    lines = [f"- ONNX parity with torch (max abs diff): {get('export.onnx.parity_max_abs_diff'):.1e}",
             f"- INT8: AUC {_f(get('export.int8.auc_fp32'), 4)} → {_f(get('export.int8.auc_int8'), 4)} "
             f"(drop {get('export.int8.auc_drop'):+.4f})",
             *([f"- INT8 series scores (what is served): series AUC {_f(get('export.int8.series_auc_fp32'), 4)} → "
                f"{_f(get('export.int8.series_auc_int8'), 4)} over {_f(get('export.int8.series'), 0)} series, scores "
                f"moved by up to {_f(get('export.int8.series_max_abs_diff'), 3)} on ONNX Runtime"
                + (f", series AUC {_f(get('export.ov_int8.series_auc_int8'), 4)} and up to "
                   f"{_f(get('export.ov_int8.series_max_abs_diff'), 3)} on OpenVINO"
                   if "export.ov_int8.series_auc_int8" in metrics else "")
                + "; the tags export.int8.series_check and export.ov_int8.series_check say whether each INT8 "
                "engine serves this version"]
               if "export.int8.series_auc_int8" in metrics else []),
             f"- ONNX Runtime FP32 latency at batch 1: {_f(get('export.ort_fp32.latency_ms_b1'), 1)} ms",
             f"- TensorRT: {tensorrt}",
             *([f"- OpenVINO on CPU (engines ov-fp32, ov-int8): INT8 AUC {_f(get('export.ov_int8.auc_int8'), 4)}; "
                f"throughput at batch 32 {_f(get('export.ov_int8.throughput_b32'), 0)} slabs/s INT8, "
                f"{_f(get('export.ov_int8.speedup_vs_ort_fp32_b32'), 2)}x ONNX Runtime FP32 and "
                f"{_f(get('export.ov_int8.speedup_b32'), 2)}x its own FP32 (timed in turns)"]
               if "export.ov_int8.auc_int8" in metrics else []),
             f"- Files: {artifacts}"]
    return section(EXPORT, "\n".join(lines))


def feedback_section(rows: Sequence[Mapping[str, Any]], window_days: float, run_id: str) -> str:
    """Agreement with readers on the model's real work, per vendor (Cohen's kappa, disagreement; for
    the segmenter, the mean Dice of its masks and the readers' corrected ones)."""
    dice = any(r.get("dice") is not None and r["dice"] == r["dice"] for r in rows)  # any that is not NaN
    header, align = (["vendor", "kappa", "disagreement", "Dice (corrected masks)"], "lrrr") if dice else (
        ["vendor", "kappa", "disagreement"], "lrr")
    body = table(header, align, [[str(r["vendor"]), _f(r["kappa"]), _f(r["disagreement"]),
                                  *([_f(r["dice"])] if dice else [])] for r in rows])
    return section("Agreement with readers", "\n".join([
        f"Readers' judgements of this version's results over the last {window_days:g} days (each series once, "
        f"its readers' latest judgements resolved by the conflict rule); picture and table in run `{run_id}`.", "",
        *body, *(["", "Dice: of the mask this version served and the reader's corrected one, over the series the "
                  "readers call positive; no figure under the minimum of series."] if dice else [])]))


CLASSIFIER_EVIDENCE = ("the run's artifacts `cv/` (ROC, confusion matrices per vendor, sample slices with where "
                       "the model looked, `folds.json`), and the *Datasets* panel of the run for the series of each "
                       "fold")


def review_section(model_name: str, version: str, evidence: str = CLASSIFIER_EVIDENCE) -> str:
    return section(REVIEW, "\n".join([
        f"- **Approve** on this page: *Aliases* → edit → add `champion` (it moves from the current champion). "
        f"Or `{review_command('promote', model_name, version)} --reviewer NAME`, which also records who decided "
        f"and rewrites the *Decision* above.",
        f"- **Reject**: `{review_command('reject', model_name, version)} --reviewer NAME --reason TEXT`; or on this "
        f"page add the "
        f"tag `review.decision` = `rejected` with `review.reason` (and `review.reviewer`); the next flow that reads "
        f"the registry records it and removes the `challenger` alias. An alias moved on this page counts as an "
        f"approval the same way.",
        f"- Evidence: {evidence}.",
        f"- `models:/{model_name}@champion` is what the inference service and export load.",
    ]))


def initial_card(model_name: str, version: str, summary: Mapping[str, Any], evidence: Sequence[Mapping[str, Any]],
                 per_fold: Sequence[Mapping[str, Any]], identity: Mapping[str, str], pool: PoolCounts,
                 lovo: Sequence[Mapping[str, Any]] | None = None,
                 vendor_names: Mapping[str, Sequence[str]] | None = None) -> str:
    """The card a new version is registered with (its decision pending)."""
    parts = [decision_section("pending", (), version, model_name=model_name), evidence_section(summary, evidence, pool, n_splits=len(per_fold)),
             folds_section(per_fold)]
    if lovo:
        parts.append(lovo_section(lovo))
    parts += [identity_section(identity, vendor_names), review_section(model_name, version)]
    return fit("\n".join(parts))
