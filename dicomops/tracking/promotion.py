"""The promotion gate: when a new model version may replace the champion without a person.

A new version is the ``challenger``. It becomes ``champion`` automatically only if its mean
cross-validated AUC beats the champion's by ``margin`` and no vendor's AUC falls by more than
``vendor_tolerance``; every model must reach ``min_auc`` (a first one included), and any figure
given a floor its floor. Otherwise it waits for a reviewer
(``dicomops promote VERSION`` or the MLflow UI). The decision and every reason are recorded as tags
on the version, so the MLflow page explains itself.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel

# The settings only the gate reads (TrainConfig's and SegmentConfig's): they decide whether a version
# is promoted and change no model, so they stay out of what keys a training (its stage record, its
# resume key); a change to them alone gates the registered version again (the train and segment flows).
GATE_SETTINGS = frozenset({"promotion_margin", "vendor_tolerance", "min_auc", "min_cpm", "min_dice",
                           "min_series_kappa"})


def gate_settings(cfg: BaseModel) -> dict[str, Any]:
    """The gate's settings in `cfg` (:data:`GATE_SETTINGS`)."""
    return cfg.model_dump(mode="json", include=set(GATE_SETTINGS))


def model_settings(cfg: BaseModel) -> dict[str, Any]:
    """Every setting in `cfg` but the gate's: what the trained model depends on."""
    return cfg.model_dump(mode="json", exclude=set(GATE_SETTINGS))


@dataclass(frozen=True)
class ModelScore:
    """What the gate compares: mean CV AUC and each vendor's AUC."""

    mean_auc: float
    vendor_auc: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class ReaderAgreement:
    """Challenger and champion on the series readers labelled: the share of those series whose call
    matches the reader's label (the champion's calls are the ones it made in the clinic; the
    challenger's its out-of-fold calls)."""

    series: int
    champion_version: str
    champion: float
    challenger: float


@dataclass(frozen=True)
class PoolComparison:
    """Challenger and champion on the challenger's training pool, labels and folds: what the gate
    compares when it can (:mod:`dicomops.training.champion_pool`, :mod:`dicomops.segmentation.champion_pool`).
    A champion trained on another pool (before a retrain added series, or readers changed labels)
    has CV figures of that pool, which are not the challenger's to beat.

    The champion scores each series by a model of its cross-validation that never trained on the
    series' patient; each model's figures are computed as its ``cv.*`` are (fold-mean AUC, pooled
    CPM). `series` were compared, `rescored` of them by running a champion fold model now (the rest
    kept the score its cross-validation gave them). `unavailable` says why no such comparison was
    made (then the scores are None). The reason line names no count: the counts of a pool are
    released under differential privacy only (:mod:`dicomops.feedback.privacy`)."""

    champion_version: str
    challenger: ModelScore | None = None
    champion: ModelScore | None = None
    series: int = 0
    rescored: int = 0
    unavailable: str = ""

    def basis(self, metric: str = "AUC") -> str:
        """The reason line that says what was compared."""
        if self.champion is None:
            return (f"champion v{self.champion_version} compared by the {metric} of its own cross-validation, "
                    f"on its own pool: {self.unavailable}")
        return (f"compared on this version's pool, labels and folds: champion v{self.champion_version} by the "
                "models of its cross-validation, each series scored by one that never trained on its patient")


@dataclass(frozen=True)
class Decision:
    """The gate's verdict; `error` when it could not compare at all (the champion was unreadable).
    `recorded`: the version's decision as its tags hold it, when the gate left a version decided
    before as it was (then `promote` says whether it is the champion)."""

    promote: bool
    reasons: tuple[str, ...]
    error: bool = False
    recorded: str | None = None

    @property
    def label(self) -> str:
        if self.recorded is not None:
            return self.recorded
        return "gate-error" if self.error else "auto-promoted" if self.promote else "awaiting-review"

    def tags(self) -> dict[str, str]:
        return {"promotion.decision": self.label, "promotion.reasons": "; ".join(self.reasons)}


# The value at which each named floor is off (then even an undefined figure passes): the least the
# figure can be, a Dice of 0 or a kappa of -1.
FLOOR_OFF: defaultdict[str, float] = defaultdict(lambda: -math.inf, {"Dice (nodules >= 6 mm)": 0.0,
                                                                     "series kappa": -1.0})


def decide_promotion(challenger: ModelScore, champion: ModelScore | None, *, margin: float = 0.005,
                     vendor_tolerance: float = 0.02, min_auc: float = 0.8, metric: str = "AUC",
                     readers: ReaderAgreement | None = None, min_reader_series: int = 10,
                     floors: Mapping[str, tuple[float, float]] | None = None,
                     pool: PoolComparison | None = None) -> Decision:
    """Decide whether `challenger` replaces `champion` automatically, with the reasons.

    `metric` names the score in the reasons: the classifier is judged on AUC, the nodule segmenter
    on CPM (``ModelScore.mean_auc`` then holds its mean CPM; ``min_auc`` its floor). With `readers`
    on at least `min_reader_series` series, a challenger that agrees with the readers less often
    than the champion is not promoted automatically, whatever its AUC. `floors` names other
    figures of the challenger with the least each may be, ``{name: (value, floor)}``: one below
    its floor (or undefined) is never promoted automatically, with or without a champion (the
    segmenter's Dice and series kappa: CPM alone was met by a blob over the lung at Dice 0); a
    floor at the least its figure can be (:data:`FLOOR_OFF`) is off. With `pool` holding both
    models' figures on the challenger's pool, the gain and every vendor's drop are judged on those
    instead (the floor stays on the challenger's own CV figure); either way its basis is a reason.
    """
    if margin < 0 or vendor_tolerance < 0:
        raise ValueError("margin and vendor_tolerance must be non-negative")
    if math.isnan(challenger.mean_auc):
        return Decision(False, (f"challenger mean {metric} is undefined",))
    below = [f"{name} {value:.4f} is below its floor {floor:.4f}" if not math.isnan(value)
             else f"{name} is undefined (its floor is {floor:.4f})"
             for name, (value, floor) in (floors or {}).items()
             if floor > FLOOR_OFF[name] and (math.isnan(value) or value < floor)]
    if champion is None:
        if challenger.mean_auc >= min_auc and not below:
            return Decision(True, (f"no champion yet; mean {metric} {challenger.mean_auc:.4f} >= {min_auc:.4f}",))
        if challenger.mean_auc >= min_auc:
            return Decision(False, (f"no champion yet; mean {metric} {challenger.mean_auc:.4f} >= {min_auc:.4f}",
                                    *below))
        return Decision(False, (f"no champion yet, but mean {metric} {challenger.mean_auc:.4f} < {min_auc:.4f}",
                                *below))
    reasons: list[str] = list(below)
    ok = not below
    if challenger.mean_auc < min_auc:  # beating a poor champion does not make a model good enough
        ok = False
        reasons.append(f"mean {metric} {challenger.mean_auc:.4f} is below the floor {min_auc:.4f}")
    if pool is not None:
        reasons.insert(0, pool.basis(metric))
        if pool.challenger is not None and pool.champion is not None:
            challenger, champion = pool.challenger, pool.champion
    gain = challenger.mean_auc - champion.mean_auc
    if gain > margin:
        reasons.append(f"mean {metric} {challenger.mean_auc:.4f} beats champion {champion.mean_auc:.4f} by {gain:+.4f}")
    else:
        ok = False
        reasons.append(f"mean {metric} {challenger.mean_auc:.4f} vs champion {champion.mean_auc:.4f}: "
                       f"gain {gain:+.4f} not above margin {margin:.4f}")
    for vendor, old in sorted(champion.vendor_auc.items()):
        new = challenger.vendor_auc.get(vendor)
        if (new is None or math.isnan(new)) and math.isnan(old):  # a vendor neither could be scored on
            reasons.append(f"{vendor}: {metric} undefined for both (too few cases of one class), not compared")
        elif new is None or math.isnan(new):
            ok = False
            reasons.append(f"{vendor}: not evaluated for the challenger")
        elif not math.isnan(old) and old - new > vendor_tolerance:
            ok = False
            reasons.append(f"{vendor}: {metric} drops {old:.4f} -> {new:.4f} (more than {vendor_tolerance:.4f})")
    if readers is not None:
        on = (f"on {readers.series} reader-labelled series the challenger agrees with the readers on "
              f"{readers.challenger:.1%}, champion v{readers.champion_version} on {readers.champion:.1%}")
        if readers.series < min_reader_series:
            reasons.append(f"{on}: fewer than {min_reader_series}, not judged on them")
        elif readers.challenger < readers.champion:
            ok = False
            reasons.append(f"{on}: worse than the champion")
        else:
            reasons.append(on)
    return Decision(ok, tuple(reasons))
