"""The clinical inflow as a monitored batch: the studies pacs-watch answered since the last check.

pacs-watch gates every study it takes from the PACS into ``WORK/pacs/studies/<token>/`` and records
it in its ledger (``WORK/pacs/studies.csv``). The drift monitor judges batches of DICOM files; this
module makes one of the studies the watch accepted since the monitor last looked: their
de-identified files (never the PACS's originals), linked under ``WORK/monitoring/inflow/<id>/``,
one folder per study token. The monitor then treats it like any batch: the same gate,
preprocessing and features against the serving model's reference. The cursor
(``WORK/monitoring/inflow.json``) counts the ledger rows already taken, and it moves only once a
batch has been judged, so an inflow too small to judge waits for more studies and nothing is lost
between checks. An inflow batch has no labels, so a retrain never learns from it (readers' labels
reach training through the feedback loop).
"""

from __future__ import annotations

import hashlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from dicomops import io
from dicomops.layout import WorkLayout


@dataclass(frozen=True)
class Inflow:
    """Studies pacs-watch accepted since the last monitored inflow batch."""

    studies: tuple[str, ...]  # tokens
    series: int  # the series the watch's gate accepted in them
    upto: int  # ledger rows taken once this batch is judged
    folder: Path | None = None  # their de-identified files, once gathered

    @property
    def batch_id(self) -> str:
        """Names the batch by the studies it holds (tokens only), so the same inflow is one batch."""
        return "inflow-" + hashlib.sha256(",".join(self.studies).encode()).hexdigest()[:12]


def pending(work: Path) -> Inflow:
    """The studies the watch accepted (``ingested``, at least one series through its gate) since
    the cursor; none when the watch has handled nothing."""
    layout = WorkLayout(work)
    ledger_path = layout.pacs.ledger
    if not ledger_path.exists():
        return Inflow((), 0, 0)
    ledger = pd.read_csv(ledger_path, keep_default_na=False)
    taken = int(io.read_json(layout.inflow_cursor)["rows"]) if layout.inflow_cursor.exists() else 0
    fresh = ledger.iloc[taken:]
    accepted = fresh[(fresh.status == "ingested") & (pd.to_numeric(fresh.accepted_series) > 0)]
    tokens = tuple(dict.fromkeys(str(t) for t in accepted.token))
    return Inflow(tokens, int(pd.to_numeric(accepted.accepted_series).sum()), len(ledger))


def gather(work: Path, inflow: Inflow) -> Inflow:
    """Link each study's de-identified files into the batch's folder (hard links: no copy; a copy
    where the file system has none); a study whose files are gone is left out."""
    layout = WorkLayout(work)
    folder = layout.inflow(inflow.batch_id)
    shutil.rmtree(folder, ignore_errors=True)
    kept = []
    for token in inflow.studies:
        deid = WorkLayout(layout.pacs.study(token)).ingest.deid
        files = [p for p in deid.rglob("*") if p.is_file() and p.suffix == ".dcm"] if deid.exists() else []
        for path in files:
            target = folder / token / path.relative_to(deid)
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(path, target)
            except OSError:
                shutil.copy2(path, target)
        if files:
            kept.append(token)
    return Inflow(tuple(kept), inflow.series, inflow.upto, folder)


def taken(work: Path, inflow: Inflow) -> None:
    """Move the cursor past the ledger rows of a batch that was judged."""
    io.write_json(WorkLayout(work).inflow_cursor, {"rows": inflow.upto})
