"""The clinical inflow as a monitored batch: the studies pacs-watch answered since the last check.

pacs-watch gates every study it takes from the PACS into ``WORK/pacs/studies/<token>/`` and records
it in its ledger (``WORK/pacs/studies.csv``). The drift monitor judges batches of DICOM files; this
module makes one of the studies the watch accepted since the monitor last looked: their
de-identified files (never the PACS's originals), linked under ``WORK/monitoring/inflow/<id>/``,
one folder per study token. The monitor then treats it like any batch: the same gate,
preprocessing and features against the serving model's reference. The cursor
(``WORK/monitoring/inflow.json``) counts the ledger rows already taken and names the last one's
token (a replaced ledger is taken from its start); it moves only once a batch has been judged, so
an inflow too small to judge waits for more studies and nothing is lost between checks. An inflow
batch has no labels, so a retrain never learns from it (readers' labels reach training through the
feedback loop).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from dicomops import io
from dicomops.layout import WorkLayout

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Inflow:
    """Studies pacs-watch accepted since the last monitored inflow batch."""

    studies: tuple[str, ...]  # tokens
    series: int  # the series the watch's gate accepted in them
    upto: int  # ledger rows taken once this batch is judged
    folder: Path | None = None  # their de-identified files, once gathered
    last: str = ""  # the token of the ledger's row `upto`: the cursor checks the ledger is the same one

    @property
    def batch_id(self) -> str:
        """Names the batch by the studies it holds (tokens only), so the same inflow is one batch."""
        return "inflow-" + hashlib.sha256(",".join(self.studies).encode()).hexdigest()[:12]


def pending(work: Path) -> Inflow:
    """The studies the watch accepted (``ingested``, at least one series through its gate) since
    the cursor; none when the watch has handled nothing. A cursor that no longer fits the ledger
    (shorter, or another study at its row: WORK/pacs was replaced) starts again from the top."""
    layout = WorkLayout(work)
    ledger_path = layout.pacs.ledger
    if not ledger_path.exists():
        return Inflow((), 0, 0)
    ledger = pd.read_csv(ledger_path, keep_default_na=False)
    cursor: dict[str, Any] = io.read_json(layout.inflow_cursor) if layout.inflow_cursor.exists() else {}
    taken = int(cursor.get("rows", 0))
    if taken > len(ledger) or (taken and "last" in cursor and str(ledger.token.iloc[taken - 1]) != cursor["last"]):
        log.warning("monitor: pacs-watch's ledger changed since the last inflow batch; taking it from its start")
        taken = 0
    fresh = ledger.iloc[taken:]
    accepted = fresh[(fresh.status == "ingested") & (pd.to_numeric(fresh.accepted_series) > 0)]
    tokens = tuple(dict.fromkeys(str(t) for t in accepted.token))
    last = str(ledger.token.iloc[-1]) if len(ledger) else ""
    return Inflow(tokens, int(pd.to_numeric(accepted.accepted_series).sum()), len(ledger), last=last)


def ready(work: Path, min_series: int) -> Inflow:
    """The pending studies, gathered into a batch folder when the de-identified files there hold at
    least `min_series` series; otherwise returned without a folder (the batch waits for more, and
    nothing is taken). Series are counted from what each study's gate accepted and is still there,
    never from the ledger alone, so a study whose files are gone cannot make a batch look ready."""
    found = pending(work)
    if not found.studies or found.series < min_series:
        return found
    gathered = gather(work, found)
    if gathered.series < min_series:
        assert gathered.folder is not None
        shutil.rmtree(gathered.folder, ignore_errors=True)
        return dataclasses.replace(gathered, folder=None)
    return gathered


def gather(work: Path, inflow: Inflow) -> Inflow:
    """Link each study's de-identified files into the batch's folder (hard links: no copy; a copy
    where the file system has none); a study whose files are gone is left out, and the series are
    those the kept studies' gates accepted."""
    layout = WorkLayout(work)
    found: dict[str, list[Path]] = {}
    series = 0
    for token in inflow.studies:
        study = WorkLayout(layout.pacs.study(token)).ingest
        files = [p for p in study.deid.rglob("*.dcm") if p.is_file()] if study.deid.exists() else []
        if files and study.accepted.exists():
            found[token] = files
            series += int(pd.read_parquet(study.accepted, columns=["SeriesInstanceUID"]).SeriesInstanceUID.nunique())
    kept = dataclasses.replace(inflow, studies=tuple(found), series=series)
    folder = layout.inflow(kept.batch_id)  # named by the studies it holds
    shutil.rmtree(folder, ignore_errors=True)
    for token, files in found.items():
        deid = WorkLayout(layout.pacs.study(token)).ingest.deid
        for path in files:
            target = folder / token / path.relative_to(deid)
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(path, target)
            except OSError:
                shutil.copy2(path, target)
    return dataclasses.replace(kept, folder=folder)


def taken(work: Path, inflow: Inflow) -> None:
    """Move the cursor past the ledger rows of a batch that was judged."""
    io.write_json(WorkLayout(work).inflow_cursor, {"rows": inflow.upto, "last": inflow.last})
