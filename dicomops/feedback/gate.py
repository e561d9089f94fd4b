"""The promotion gate's question to the readers: on the series they labelled, does the challenger
agree with them at least as often as the champion did?"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pandas as pd

from dicomops.config import FeedbackConfig
from dicomops.feedback.clinical import pool_aliases
from dicomops.feedback.store import FeedbackStore, resolve
from dicomops.tracking.promotion import ReaderAgreement


def reader_agreement(feedback_work: Path, oof: pd.DataFrame, threshold: float, model: str, champion_version: str,
                     cfg: FeedbackConfig, key: bytes | None = None) -> ReaderAgreement | None:
    """Compare on every series with a resolved reader label, a call of `model`'s champion in the
    clinic (its feedback items: the segmenter's, versioned apart, are not its calls) and an
    out-of-fold score of the challenger (`oof`: ``SeriesInstanceUID``, ``score``; called at
    `threshold`). None when no reader has labelled anything."""
    items = FeedbackStore(feedback_work).judgements(cfg)
    if items.empty:
        return None
    resolved = resolve(items, cfg.conflict_rule)
    truth = resolved[resolved.label >= 0].set_index("SeriesInstanceUID").label.astype(int)
    mine = items[(items.model == model) & (items.version == str(champion_version))].sort_values("at")
    champion = mine.groupby("series").model_label.last().astype(int)
    challenger = (oof.set_index("SeriesInstanceUID").score >= threshold).astype(int)
    if key is not None:  # clinical series the retrain's gate remapped once more (dicomops.feedback.clinical)
        aliases = pool_aliases(resolved, key)
        challenger.index = [aliases.get(str(u), str(u)) for u in challenger.index]
        challenger = challenger[~challenger.index.duplicated()]
    common = truth.index.intersection(champion.index).intersection(challenger.index)
    if len(common) == 0:
        return ReaderAgreement(0, str(champion_version), float("nan"), float("nan"))
    return ReaderAgreement(len(common), str(champion_version),
                           float((champion[common] == truth[common]).mean()),
                           float((challenger[common] == truth[common]).mean()))


def readers_for(work: Path, feedback_work: Path, model: str, cfg: FeedbackConfig,
                key: bytes | None = None) -> Callable[[str], ReaderAgreement | None]:
    """What the promotion gate of `model` asks (``readers(champion_version)``), from the training in
    `work`: its out-of-fold scores called at its CV threshold."""
    from dicomops import io
    from dicomops.layout import WorkLayout

    paths = WorkLayout(work).train
    oof, threshold = pd.read_parquet(paths.oof_predictions), float(io.read_json(paths.summary)["threshold"])
    return lambda champion_version: reader_agreement(feedback_work, oof, threshold, model, champion_version, cfg,
                                                                 key)


def segmenter_readers_for(work: Path, feedback_work: Path, model: str, cfg: FeedbackConfig,
                          key: bytes | None = None) -> Callable[[str], ReaderAgreement | None]:
    """The same question for the segmenter of `model` trained in `work`: its out-of-fold finding per
    series (``segment/series.csv``: present or not, the call its SR makes) against the readers'
    labels, beside the champion segmenter's findings in the clinic (its own feedback items)."""
    from dicomops.layout import WorkLayout

    table = pd.read_csv(WorkLayout(work).segment.series, keep_default_na=False)
    oof = pd.DataFrame({"SeriesInstanceUID": table.series.astype(str),
                        "score": table.present_pred.astype(str).str.lower().isin(["true", "1"]).astype(float)})
    return lambda champion_version: reader_agreement(feedback_work, oof, 0.5, model, champion_version, cfg, key)

