"""The feedback flow on a real registry: agreement with readers lands in the monitoring experiment
and on the version's page, and the retrain is called for at the threshold of corrections, not before."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pandas as pd
import pytest
from sklearn.metrics import cohen_kappa_score

import mlflow
from dicomops.config import FeedbackConfig, MonitorConfig
from dicomops.feedback import store
from dicomops.feedback.store import FeedbackStore
from flows.feedback import feedback
from tests.champion_fixture import CONFIG, TINY, ExportedChampion

pytestmark = pytest.mark.usefixtures("prefect_harness")
FEEDBACK = FeedbackConfig(reviewers={"ada": "senior", "bo": "reader"}, min_cases=4, corrections=3)


def _item(version: str, i: int, model_label: int, reader_label: int, vendor: str) -> dict[str, object]:
    verdict = "accept" if model_label == reader_label else "reject"
    return store.make_item(reader="bo", role="reader", source="endpoint", verdict=verdict, series=f"2.25.{1000 + i}",
                           vendor=vendor, model=TINY.model_name, version=version, model_label=model_label,
                           model_score=0.5, at=dt.datetime.now(dt.UTC) - dt.timedelta(hours=1, minutes=i))


def test_agreement_reaches_the_version_page_and_a_retrain_is_called_for_at_the_threshold(
        exported_champion: ExportedChampion, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", exported_champion.uri)
    monkeypatch.setenv("DICOMOPS_MLFLOW_ARTIFACT_ROOT", str(exported_champion.artifacts))
    client = mlflow.tracking.MlflowClient(exported_champion.uri)
    version = str(client.get_model_version_by_alias(TINY.model_name, "champion").version)
    config = CONFIG.model_copy(update={"feedback": FEEDBACK, "monitor": MonitorConfig(retrain="event")})
    work = tmp_path / "work"

    said = [1, 1, 0, 0, 1, 0, 1, 0, 1, 1]
    truth = [1, 1, 0, 0, 1, 0, 1, 0, 0, 0]  # two corrections: under the threshold of three
    vendors = ["ge"] * 5 + ["siemens"] * 5
    items = [_item(version, i, s, t, v) for i, (s, t, v) in enumerate(zip(said, truth, vendors, strict=True))]
    FeedbackStore(work).add(items)
    first = feedback(work=work, config=config, from_pacs=False)
    assert first["retrain_reason"] is None and first["retrain"] is None
    assert (first["series"], first["conflicts"], first["unresolved"]) == (10, 0, 0)

    run = client.get_run(str(first["feedback_run_id"]))
    # Figures people see have two decimals: a rate to full precision gives away its denominator, the
    # vendor's exact count of series (kappa 0.6153846... here); the work directory keeps them exact.
    exact = cohen_kappa_score(said, truth)
    assert run.data.metrics["feedback.kappa.all"] == round(exact, 2) != pytest.approx(exact, abs=1e-3)
    assert run.data.metrics["feedback.disagreement.siemens"] == pytest.approx(2 / 5)
    assert pd.read_csv(work / "feedback/agreement.csv").set_index("vendor").kappa["all"] == pytest.approx(exact)
    assert not any(k.startswith("feedback.series.") for k in run.data.metrics)  # no count per vendor leaves
    assert {"feedback/agreement.csv", "feedback/agreement.png"} <= \
        {a.path for a in client.list_artifacts(run.info.run_id, "feedback")}
    page = client.get_model_version(TINY.model_name, version)
    assert page.tags["feedback.kappa"] == f"{exact:.2f}"
    assert "## Agreement with readers" in page.description and run.info.run_id in page.description
    labels = pd.read_csv(work / "feedback/labels.csv")
    assert labels.set_index("SeriesInstanceUID").label.to_dict() == {f"2.25.{1000 + i}": t for i, t in enumerate(truth)}

    # The third correction: the event, and (retrain: event) the retrain deployment's job, not this flow's.
    FeedbackStore(work).add([_item(version, 10, 1, 0, "ge")])
    second = feedback(work=work, config=config, from_pacs=False)
    assert second["retrain_reason"] == f"3 corrections of version {version} since it was deployed"
    assert second["retrain"] is None

    # A PACS that does not answer: a warning, the endpoint's judgements still measured.
    monkeypatch.setenv("DICOMOPS_PACS_USER", "dicomops")
    monkeypatch.setenv("DICOMOPS_PACS_PASSWORD", "not-a-real-password-1234")
    unreachable = feedback(orthanc_url="http://127.0.0.1:9", work=work, config=config, from_pacs=True)
    assert unreachable["pacs_unreachable"] == 1 and unreachable["series"] == 11


def test_without_a_champion_or_a_pacs_the_flow_says_so_and_does_not_fail(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'empty.db'}")
    skipped = feedback(work=tmp_path / "work", config=CONFIG, from_pacs=True)
    assert skipped["status"] == "skipped" and skipped["reason"] == f"no champion of {TINY.model_name}"
