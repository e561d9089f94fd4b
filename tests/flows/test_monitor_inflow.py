"""The clinical inflow monitored: the studies pacs-watch accepted (gated into WORK/pacs/studies by
the watch's own code, from a PACS that sends images only) become a monitored batch once they hold
``monitor.min_series`` series; the monitor judges their de-identified files against the champion's
reference, moves its cursor only then, and nothing identifying reaches its run or its batch."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest

import mlflow
from dicomops.config import MonitorConfig, SynthConfig
from dicomops.deid.scan import scan_for_phi
from dicomops.layout import WorkLayout
from dicomops.pacs import watch
from dicomops.synthetic import generate_corpus
from flows.monitor import monitor
from tests.champion_fixture import CONFIG, KEY, ExportedChampion

pytestmark = pytest.mark.usefixtures("prefect_harness")


class _FolderPacs:
    """A PACS whose studies are the series folders of a synthetic corpus: what it sends is the images."""

    def __init__(self, corpus: Path) -> None:
        labels = pd.read_csv(corpus / "labels.csv", keep_default_na=False)
        self.folders = {str(r.StudyInstanceUID): corpus / str(r.series_dir) for r in labels.itertuples()}

    def image_instances(self, study_uid: str) -> dict[str, str]:
        return {p.name: "series" for p in self.folders[study_uid].iterdir()}

    def retrieve_study(self, study_uid: str, dest: Path) -> list[Path]:
        shutil.copytree(self.folders[study_uid], dest)
        return sorted(dest.iterdir())


def test_the_studies_pacs_watch_accepted_are_monitored_once_there_are_enough(
        exported_champion: ExportedChampion, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", exported_champion.uri)
    monkeypatch.setenv("DICOMOPS_MLFLOW_ARTIFACT_ROOT", str(exported_champion.artifacts))
    corpus = tmp_path / "clinic"
    generate_corpus(corpus, SynthConfig(patients=8, seed=51, fault_rate=0.0, matrix=128, slices=12, workers=1))
    pacs = _FolderPacs(corpus)
    work, staging = tmp_path / "work", tmp_path / "staging"
    config = CONFIG.model_copy(update={"monitor": MonitorConfig(min_series=6, retrain="off")})

    nothing = monitor(work=work, config=config, pacs=True)
    assert (nothing["status"], nothing["studies"], nothing["monitoring_run_id"]) == ("waiting", 0, None)

    uids = sorted(pacs.folders)
    for uid in uids[:3]:  # ingested without a champion: the watch's gate and its ledger
        assert watch.handle_study(uid, pacs, staging, work, CONFIG.ingest, KEY).status == "ingested"
    few = monitor(work=work, config=config, pacs=True)
    assert (few["status"], few["studies"], few["series"]) == ("waiting", 3, 3)
    assert not WorkLayout(work).inflow_cursor.exists()  # nothing taken: they wait for more

    for uid in uids[3:]:
        watch.handle_study(uid, pacs, staging, work, CONFIG.ingest, KEY)
    judged = monitor(work=work, config=config, pacs=True)
    assert judged["status"] in ("no drift", "drift") and (judged["studies"], judged["series"]) == (8, 8)
    assert str(judged["batch_id"]).startswith("inflow-")
    client = mlflow.tracking.MlflowClient(exported_champion.uri)
    run = client.get_run(str(judged["monitoring_run_id"]))
    assert run.data.tags["source"] == "pacs-inflow" and run.data.metrics["n_series"] == 8
    # The batch holds the watch's de-identified files, linked, not the PACS's.
    batch = WorkLayout(work).inflow(str(judged["batch_id"]))
    assert len(list(batch.rglob("*.dcm"))) == sum(len(list(f.iterdir())) for f in pacs.folders.values())

    again = monitor(work=work, config=config, pacs=True)
    assert (again["status"], again["studies"]) == ("waiting", 0)  # the cursor moved past them

    phi = pd.read_csv(corpus / "phi.csv", keep_default_na=False)
    labels = pd.read_csv(corpus / "labels.csv", keep_default_na=False)
    needles = set(phi.value) | set(labels.SeriesInstanceUID) | set(labels.StudyInstanceUID) | set(labels.PatientID)
    dump = tmp_path / "run-dump"
    client.download_artifacts(run.info.run_id, "", str(dump))
    for place in (WorkLayout(work).monitoring, dump):
        hits = scan_for_phi(place, needles)
        assert hits == [], f"PHI found under {place}: {hits[:5]}"
    assert len(scan_for_phi(corpus, needles)) > 5  # the scan is not vacuous
