"""The loop end to end with a real Orthanc of its own: study → finding → a reader's correction in the
PACS → the feedback flow → retrain with the readers' labels → the gate asks the readers."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

import mlflow
from dicomops.config import FeedbackConfig, MonitorConfig
from dicomops.deid import scan_for_phi
from dicomops.deid.keys import KeyedMapper
from dicomops.feedback.pacs import read_report, revise
from dicomops.pacs.changes import ChangesFeed
from dicomops.pacs.client import PacsClient
from dicomops.pacs.orthanc import OrthancProcess
from dicomops.tracking import read_dvc_pointer
from flows.feedback import feedback
from flows.pacs_watch import pacs_watch
from tests.champion_fixture import CONFIG, KEY, TINY, ExportedChampion, make_champion
from tests.unit.test_real_files import _needles

from .orthanc_fixture import orthanc  # noqa: F401  (a fixture: this module's own PACS)
from .test_pacs_feedback import ADA, _stable_again
from .test_pacs_watch import _pacs_env, _reports, _send, _wait_stable

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("prefect_harness")]


@pytest.fixture(scope="module")
def own_champion(tmp_path_factory: pytest.TempPathFactory, prefect_harness: None) -> ExportedChampion:
    """A champion of its own: the loop below retrains and may promote, which must not change the
    champion the other test modules share."""
    return make_champion(tmp_path_factory.mktemp("loop-champion"))


def test_the_loop_study_finding_correction_retrain_gated_promotion(
        orthanc: OrthancProcess, own_champion: ExportedChampion, tmp_path: Path,  # noqa: F811
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The issue's "done when": studies of the labelled corpus arrive in the PACS, pacs-watch answers
    each with an SR, a reader signs a correction of each in the PACS, the feedback flow collects them,
    calls for a retrain at the threshold and runs it: the readers' labels replace the generator's in
    the pool, and the new version's gate reports how it and the champion agree with the readers."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", own_champion.uri)
    monkeypatch.setenv("DICOMOPS_MLFLOW_ARTIFACT_ROOT", str(own_champion.artifacts))
    monkeypatch.setenv("DICOMOPS_DEID_KEY", KEY.decode())  # the key the champion's corpus was ingested with
    _pacs_env(monkeypatch, orthanc)
    src = own_champion.work.parent / "src"
    labels = pd.read_csv(src / "labels.csv", keep_default_na=False)
    picked = labels.sort_values("SeriesInstanceUID").head(3)
    files = {d: sorted(p for p in (src / d).iterdir() if p.is_file()) for d in picked.series_dir}
    studies = [_send(orthanc, files[d]) for d in picked.series_dir]
    _wait_stable(orthanc, set(studies))
    work = tmp_path / "work"
    assert pacs_watch(work=work, staging=tmp_path / "staging", config=CONFIG)["ingested"] == 3
    with ChangesFeed(orthanc.url, orthanc.credentials) as feed:
        last = feed.poll(0).last
    calls = {}
    with PacsClient(orthanc.dicomweb_url, orthanc.credentials) as pacs:
        for study in studies:
            (ours,) = _reports(orthanc, study)
            report = read_report(ours)
            assert report is not None
            calls[report.series_uid] = report.present
            pacs.store([revise(ours, present=not report.present, reader=ADA)])  # the reader disagrees
    for study in studies:
        _stable_again(orthanc, study, last)

    # The readers' labels are a DVC-versioned source in a repository of the site's (here tmp).
    repo = tmp_path / "site"
    repo.mkdir()
    for args in (["init", "-q", "--no-scm"], ["remote", "add", "-d", "site", str(tmp_path / "dvc-remote")]):
        subprocess.run([sys.executable, "-m", "dvc", *args], cwd=repo, check=True, capture_output=True)
    monkeypatch.setenv("DICOMOPS_READER_LABELS", str(repo / "readers"))

    config = CONFIG.model_copy(update={
        "feedback": FeedbackConfig(reviewers={ADA: "senior"}, corrections=3, min_cases=3),
        "monitor": MonitorConfig(training_source=src, retrain="subflow"),
        "segment": CONFIG.segment.model_copy(update={"enabled": False})})
    # The version the readers corrected: read before the flow, whose retrain may promote its own.
    version = str(mlflow.tracking.MlflowClient(own_champion.uri)
                  .get_model_version_by_alias(TINY.model_name, "champion").version)
    result = feedback(work=work, config=config)
    assert (result["stored"], result["refused"]) == (3, 0)
    assert result["retrain_reason"] == f"3 corrections of version {version} since it was deployed"
    retrained = result["retrain"]
    assert isinstance(retrained, dict) and retrained["status"] == "retrained", retrained

    client = mlflow.tracking.MlflowClient(own_champion.uri)
    run = client.get_run(str(retrained["mlflow_run_id"]))
    assert run.data.tags["trigger"] == "feedback" and run.data.tags["retrain.reader_labels"] == "3"
    # Which feedback it learned from: the readers' source version DVC recorded (and pushed), the one
    # the feedback run recorded too, holding the resolved labels.
    assert run.data.tags["feedback.dvc_md5"] == read_dvc_pointer(repo / "readers.dvc")["md5"]
    assert run.data.tags["feedback.dvc"] == str(repo / "readers.dvc") and result["feedback.dvc_md5"] == \
        run.data.tags["feedback.dvc_md5"]
    assert (repo / "readers/labels.csv").read_bytes() == (work / "feedback/labels.csv").read_bytes()
    assert any((tmp_path / "dvc-remote").rglob("*")), "the version was not pushed"
    pool = pd.read_csv(Path(str(retrained["work"])) / "deid/labels.csv", keep_default_na=False)
    mapper = KeyedMapper(KEY)
    for original, said in calls.items():
        row = pool[pool.SeriesInstanceUID == mapper.uid(original)]
        assert row.label_source.tolist() == ["reader"] and row.label.tolist() == [int(not said)]
    new = client.get_model_version(TINY.model_name, str(retrained["version"]))
    assert "on 3 reader-labelled series the challenger agrees with the readers" in new.tags["promotion.reasons"]
    assert scan_for_phi(work / "feedback", set().union(*(_needles(f) for f in files.values()))) == []
