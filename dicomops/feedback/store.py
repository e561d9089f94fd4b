"""Readers' feedback on the model's results: who may give it, where it is kept, what it means.

A feedback item is one reader's judgement of one series the model scored: accept (the reader agrees),
reject (the reader says the opposite of the model) or correct (the reader gives the label, and for
the segmenter a corrected mask). It names the series by the training side's pseudonymous UID (the
keyed remapping the gate applies, :meth:`KeyedMapper.uid`), never by its original UID, so feedback and
the de-identified pool meet without an original identifier being stored. Provenance travels with
each item: reader, role, time, source (the review endpoint, an SR or a SEG in the PACS), model
version, what the model said and what was changed.

The store keeps every item (the history); :func:`resolve` turns it into one label per series with a
configured rule for readers who disagree; :func:`agreement` measures Cohen's kappa between the model
and the readers per version and vendor over a rolling window; :func:`retrain_due` says when enough
corrections have accumulated or agreement has dropped.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from filelock import FileLock

from dicomops import io
from dicomops.config import FeedbackConfig
from dicomops.errors import DicomOpsError

VERDICTS = ("accept", "reject", "correct")
SOURCES = ("endpoint", "pacs-sr", "pacs-seg", "simulated")  # simulated: the demo's readers (dicomops.feedback.simulate)
ITEM_COLUMNS = ["item", "at", "reader", "role", "source", "verdict", "series", "vendor", "model", "version",
                "model_label", "model_score", "reader_label", "changed", "mask", "dice"]
# Columns a store written before they existed lacks, with the value its items have.
LATER_COLUMNS = {"mask": "", "dice": math.nan}


class UnknownReaderError(DicomOpsError):
    """Feedback from someone who is not a configured reviewer, or with a wrong token."""


@dataclass(frozen=True)
class Reviewers:
    """The configured readers, their roles, and (for the review endpoint) their tokens."""

    roles: dict[str, str]
    tokens: dict[str, str]

    @classmethod
    def from_config(cls, cfg: FeedbackConfig, tokens: str | None = None) -> Reviewers:
        """`tokens` is ``DICOMOPS_REVIEWER_TOKENS``: ``id=token,id=token``.

        Raises:
            ValueError: a token for a reader who is not configured, or a malformed entry.
        """
        parsed: dict[str, str] = {}
        for entry in filter(None, (t.strip() for t in (tokens or "").split(","))):
            reader, sep, token = entry.partition("=")
            if not sep or not reader.strip() or len(token.strip()) < 16:
                raise ValueError("DICOMOPS_REVIEWER_TOKENS must read 'id=token,id=token' with tokens of at least "
                                 "16 characters (e.g. python -c 'import secrets; print(secrets.token_urlsafe(24))')")
            if reader.strip() not in cfg.reviewers:
                raise ValueError(f"DICOMOPS_REVIEWER_TOKENS names {reader.strip()!r}, who is not in "
                                 f"feedback.reviewers ({sorted(cfg.reviewers)}); add the reader or drop the token")
            parsed[reader.strip()] = token.strip()
        return cls(dict(cfg.reviewers), parsed)

    def role(self, reader: str) -> str:
        """The reader's role. Raises :class:`UnknownReaderError` for anyone not configured."""
        if reader not in self.roles:
            raise UnknownReaderError(f"reader {reader!r} is not a configured reviewer; their feedback is not taken "
                                     "(add them under feedback.reviewers)")
        return self.roles[reader]

    def authenticate(self, reader: str, token: str) -> str:
        """The reader's role if `token` is theirs; one message for an unknown reader and a wrong token."""
        expected = self.tokens.get(reader, "")
        if not expected or not hmac.compare_digest(expected.encode(), token.encode()) or reader not in self.roles:
            raise UnknownReaderError("unknown reviewer or wrong token")
        return self.roles[reader]


def make_item(*, reader: str, role: str, source: str, verdict: str, series: str, vendor: str, model: str,
              version: str, model_label: int, model_score: float, reader_label: int | None = None,
              changed: str = "", ref: str = "", at: dt.datetime | None = None, mask: str = "",
              dice: float = math.nan) -> dict[str, Any]:
    """One validated feedback item. `ref` makes it idempotent (the PACS instance it came from, the
    request id): the same judgement seen twice is stored once. `mask`: the reader's nodule mask, a path
    relative to ``WORK/feedback`` (a corrected segmentation), else empty. `dice`: for the segmenter,
    the Dice coefficient of the mask it served and the reader's (NaN when there is none to compare).

    Raises:
        ValueError: an unknown verdict or source, a correction without a label, a label not 0 or 1.
    """
    if verdict not in VERDICTS:
        raise ValueError(f"verdict must be one of {VERDICTS}, got {verdict!r}")
    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
    if model_label not in (0, 1):
        raise ValueError(f"model_label must be 0 or 1, got {model_label!r}")
    if verdict == "correct":
        if reader_label not in (0, 1):
            raise ValueError("a correction needs the reader's label: 0 (no nodule) or 1 (nodule)")
        label = int(reader_label)
    else:
        if reader_label is not None and reader_label != (model_label if verdict == "accept" else 1 - model_label):
            raise ValueError(f"verdict {verdict!r} of a model label {model_label} contradicts reader_label "
                             f"{reader_label}; send verdict 'correct' with the label instead")
        label = model_label if verdict == "accept" else 1 - model_label
    when = (at or dt.datetime.now(dt.UTC)).astimezone(dt.UTC)
    if not changed:
        changed = "nothing" if label == model_label else f"label {model_label} \u2192 {label}"
    key = "\x1f".join([source, reader, series, str(version), ref or when.isoformat()])
    return {"item": hashlib.sha256(key.encode()).hexdigest()[:20], "at": when.isoformat(timespec="seconds"),
            "reader": reader, "role": role, "source": source, "verdict": verdict, "series": series,
            "vendor": vendor, "model": model, "version": str(version), "model_label": int(model_label),
            "model_score": float(model_score), "reader_label": label, "changed": changed, "mask": mask,
            "dice": float(dice)}


class FeedbackStore:
    """Every feedback item of a work directory (``feedback/items.parquet``), appended under a lock."""

    def __init__(self, work: Path) -> None:
        from dicomops.layout import WorkLayout

        self.paths = WorkLayout(work).feedback
        self.path = self.paths.items

    def items(self) -> pd.DataFrame:
        if not self.path.exists():
            return pd.DataFrame(columns=ITEM_COLUMNS)
        items = pd.read_parquet(self.path)
        return items.assign(**{c: v for c, v in LATER_COLUMNS.items() if c not in items})[ITEM_COLUMNS]

    def judgements(self, cfg: FeedbackConfig) -> pd.DataFrame:
        """The items that count now: those of readers ``cfg.reviewers`` names, each with the role it
        gives them today. A reader taken off the list (or the demo's simulated readers, configured
        only for the run that simulates them) stays in the history and no longer decides a label,
        an agreement figure, a retrain or the gate."""
        items = self.items()
        mine = items[items.reader.isin(list(cfg.reviewers))].copy()
        mine["role"] = mine.reader.map(cfg.reviewers)
        return mine

    def add(self, items: Iterable[dict[str, Any]]) -> int:
        """Append the items not already stored (by item id); return how many were new."""
        new = pd.DataFrame(list(items), columns=ITEM_COLUMNS)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(self.path) + ".lock", timeout=60):
            old = self.items()
            new = new[~new.item.isin(old.item)].drop_duplicates("item")
            if len(new):
                io.write_parquet(self.path, pd.concat([old, new], ignore_index=True) if len(old) else new)
        return len(new)


def resolve(items: pd.DataFrame, rule: str) -> pd.DataFrame:
    """One label per series from each reader's latest judgement.

    ``senior``: the senior readers' majority if any senior judged the series, else every reader's
    majority; ``majority``: every reader's majority. A tie leaves the series unresolved (label -1),
    recorded with the readers on each side. ``mask``: of a positive series, the latest nodule mask a
    reader on the winning side drew (a corrected segmentation), else empty.
    """
    columns = ["SeriesInstanceUID", "label", "readers", "conflict", "rule", "vendor", "last_at", "mask"]
    if items.empty:
        return pd.DataFrame(columns=columns)
    latest = items.sort_values("at").groupby(["series", "reader"], sort=True).tail(1)
    rows = []
    for series, part in latest.groupby("series", sort=True):
        voters = part[part.role == "senior"] if rule == "senior" and (part.role == "senior").any() else part
        votes = voters.reader_label.astype(int)
        ones, zeros = int((votes == 1).sum()), int((votes == 0).sum())
        label = 1 if ones > zeros else 0 if zeros > ones else -1
        drawn = items[(items.series == series) & items.reader.isin(voters.reader[votes == label])
                      & (items["mask"].fillna("") != "")]
        masks = drawn[drawn.reader_label.astype(int) == label].sort_values("at")["mask"]
        rows.append({"mask": str(masks.iloc[-1]) if label == 1 and len(masks) else "","SeriesInstanceUID": series, "label": label,
                     "readers": ";".join(f"{r}={int(v)}" for r, v in sorted(zip(part.reader, part.reader_label, strict=True))),
                     "conflict": part.reader_label.nunique() > 1, "rule": rule, "vendor": str(part.vendor.iloc[-1]),
                     "last_at": str(part["at"].max())})
    return pd.DataFrame(rows, columns=columns)


def override_labels(labels: pd.DataFrame, resolved: pd.DataFrame) -> pd.DataFrame:
    """The labelled pool with each resolved reader label in place of the earlier one.

    The earlier label stays beside it (``label_before``) and ``label_source`` says whose it is;
    unresolved series keep their label.
    """
    out = labels.copy()
    out["label_before"] = out["label"]
    out["label_source"] = "generator"
    decided = resolved[resolved.label >= 0].set_index("SeriesInstanceUID").label
    hit = out.SeriesInstanceUID.isin(decided.index)
    out.loc[hit, "label"] = out.loc[hit, "SeriesInstanceUID"].map(decided).astype(int)
    out.loc[hit, "label_source"] = "reader"
    return out


def _kappa(a: np.ndarray, b: np.ndarray) -> float:
    from sklearn.metrics import cohen_kappa_score

    if len(a) == 0:
        return float("nan")
    if len(set(a) | set(b)) < 2:  # one class everywhere: perfect agreement, kappa undefined
        return 1.0 if (a == b).all() else float("nan")
    return float(cohen_kappa_score(a, b))


def agreement(items: pd.DataFrame, cfg: FeedbackConfig, now: dt.datetime | None = None) -> pd.DataFrame:
    """Each model against the readers per version and vendor (and ``all``) over the rolling window:
    series, Cohen's kappa, disagreement rate and, for the segmenter, the mean Dice of the masks it
    served and the readers' corrected ones. Each series counts once per model and version (its
    readers' latest judgements resolved by the configured rule: agreement with the readers, not
    with one reader; an unresolved tie is left out), and its Dice is the one of the reader's mask
    the rule kept. Fewer than ``min_cases`` series give no figure (NaN), a kappa, a disagreement
    rate or a mean Dice: over one or two series a rate is one reader's verdict on one patient, and
    the figures are shown on the version's page and in MLflow. The classifier and the segmenter
    are versioned apart, so their version numbers say nothing of each other: rows are by model."""
    columns = ["model", "version", "vendor", "series", "kappa", "disagreement", "dice"]
    if items.empty:
        return pd.DataFrame(columns=columns)
    now = (now or dt.datetime.now(dt.UTC)).astimezone(dt.UTC)
    since = (now - dt.timedelta(days=cfg.window_days)).isoformat(timespec="seconds")
    recent = items[items["at"] >= since]
    rows = []
    for (model, version), part in recent.groupby(["model", "version"], sort=True):
        resolved = resolve(part, cfg.conflict_rule).set_index("SeriesInstanceUID")
        model_label = part.sort_values("at").groupby("series").model_label.last()
        table = resolved[resolved.label >= 0].join(model_label.rename("model_label"))
        compared = part[part["mask"].fillna("") != ""].sort_values("at").drop_duplicates("mask", keep="last")
        table["dice"] = table["mask"].map(compared.set_index("mask").dice.astype(float)).astype(float)
        for vendor, group in [("all", table), *table.groupby("vendor", sort=True)]:
            n = len(group)
            truth, said = group.label.to_numpy(int), group.model_label.to_numpy(int)
            enough = n >= cfg.min_cases
            dice = group.dice.dropna()
            rows.append({"model": str(model), "version": str(version), "vendor": str(vendor), "series": n,
                         "kappa": _kappa(said, truth) if enough else float("nan"),
                         "disagreement": float(np.mean(said != truth)) if enough else float("nan"),
                         "dice": float(dice.mean()) if len(dice) >= cfg.min_cases else float("nan")})
    return pd.DataFrame(rows, columns=columns)


def retrain_due(items: pd.DataFrame, cfg: FeedbackConfig, model: str, version: str, since: str = "",
                now: dt.datetime | None = None) -> str | None:
    """Why readers' feedback calls for a retrain of `version` of `model`, or None.

    Two reasons: ``cfg.corrections`` judgements that changed the model's answer since `since` (the
    time of the last feedback-triggered retrain, ISO), or agreement over the window below
    ``cfg.min_kappa`` on at least ``cfg.min_cases`` series.
    """
    if items.empty:
        return None
    mine = items[(items.model == model) & (items.version == str(version))]
    changed = mine[(mine.reader_label != mine.model_label) & (mine["at"] > since)]
    if len(changed) >= cfg.corrections:
        return f"{len(changed)} corrections of version {version} since {since or 'it was deployed'}"
    table = agreement(mine, cfg, now)
    overall = table[table.vendor == "all"]
    if len(overall) and not np.isnan(overall.kappa.iloc[0]) and overall.kappa.iloc[0] < cfg.min_kappa:
        return (f"agreement with readers fell to kappa {overall.kappa.iloc[0]:.2f} (below {cfg.min_kappa}) over "
                f"{int(overall.series.iloc[0])} series")
    return None
