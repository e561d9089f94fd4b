"""The ingest flow for real: Prefect harness, MLflow in tmp_path, and a leak scan of everything."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

import mlflow
from dicomops import ingest as ingest_module
from dicomops.cli import app
from dicomops.config import IngestConfig
from dicomops.deid import scan_for_phi
from dicomops.feedback import privacy
from flows.ingest import ingest

pytestmark = pytest.mark.usefixtures("prefect_harness")


def _needles(corpus: Path) -> set[str]:
    """Every PHI value the generator wrote, plus the original UIDs (identifiers too)."""
    phi = pd.read_csv(corpus / "phi.csv", keep_default_na=False)
    labels = pd.read_csv(corpus / "labels.csv", keep_default_na=False)
    return set(phi.value) | set(labels.SeriesInstanceUID) | set(labels.StudyInstanceUID)


def _prefect_database() -> Path:
    from prefect.settings import get_current_settings

    url = str(get_current_settings().server.database.connection_url.get_secret_value())
    return Path(url.split("///", 1)[1])


def test_ingest_flow_accepts_quarantines_logs_and_leaks_nothing(
        mixed_corpus: Path, mlflow_env: str, tmp_path: Path) -> None:
    from tests.conftest import PREFECT_HOME

    result = ingest(src=mixed_corpus, config=IngestConfig(workers=2))
    work = Path(str(result["work"]))
    faults = pd.read_csv(mixed_corpus / "faults.csv", keep_default_na=False)
    quarantine = pd.read_csv(work / "ingest/quarantine.csv", keep_default_na=False)
    assert set(quarantine.source_path) == set(faults.path) and len(faults) > 0
    labels = pd.read_csv(mixed_corpus / "labels.csv")
    assert result["accepted_series"] == len(labels) - faults[faults.scope == "series"].SeriesInstanceUID.nunique()

    client = mlflow.tracking.MlflowClient(mlflow_env)
    run = client.get_run(str(result["mlflow_run_id"]))
    assert run.info.status == "FINISHED"
    assert run.data.metrics["ingest.quarantined_files"] == len(quarantine)
    # Of the fixture's faults only the duplicated slice reaches the expectation suite (its copy repeats
    # a SOPInstanceUID); a wrong modality, a missing tag and a truncated file are quarantined when the
    # headers are read. So exactly one expectation of the suite fails.
    assert set(faults.fault) == {"wrong_modality", "duplicated_slice", "truncated", "missing_tag"}
    expectations = pd.read_csv(work / "ingest/expectations.csv")
    assert expectations.expectation[~expectations.success].tolist() == ["sop_instance_uid_unique"]
    n_expectations = len(IngestConfig().expectations)
    assert len(expectations) == n_expectations
    assert run.data.metrics["validation.success_share"] == pytest.approx(1 - 1 / n_expectations)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "ingest")}
    assert {"ingest/quarantine.csv", "ingest/expectations.csv", "ingest/ingest_summary.png",
            "ingest/validation"} <= artifacts
    docs = {a.path for a in client.list_artifacts(run.info.run_id, "ingest/validation")}
    assert "ingest/validation/index.html" in docs

    # Counts leave only through OpenDP: every released cell reached the threshold, the tiny ones never
    # appear (a cell of 3 passes a threshold of 14 with probability about 1e-5), and the ledger paid.
    assert {"ingest/released/released_counts.csv", "ingest/released/released_counts.png"} <= \
        {a.path for a in client.list_artifacts(run.info.run_id, "ingest/released")}
    released = pd.read_csv(work / "ingest/released/released_counts.csv", keep_default_na=False)
    assert (released["count"] >= released.threshold).all() and (released.epsilon == 1.0).all()
    exact = privacy.cohort(pd.read_parquet(work / "ingest/instances.parquet"))
    for by in IngestConfig().privacy.releases:
        sizes = exact.groupby(list(by)).size()
        tiny = {" \u00d7 ".join(map(str, k if isinstance(k, tuple) else (k,))) for k in sizes[sizes <= 3].index}
        assert not tiny & set(released.cell[released.release == privacy.release_name(by)])
    ledger = privacy.PrivacyLedger(work / "privacy/ledger.json").entry(ingest_module.source_dvc_md5(work) or "")
    assert ledger.spent_epsilon == pytest.approx(len(IngestConfig().privacy.releases))

    needles = _needles(mixed_corpus)
    for place in (work, tmp_path / "mlflow", PREFECT_HOME, _prefect_database()):
        hits = scan_for_phi(place, needles)
        assert hits == [], f"PHI found under {place}: {hits[:5]}"
    # The scan is not vacuous: the raw corpus is full of the same needles, and Prefect's database
    # (a file: the scan reads its tables) holds this flow's name.
    assert len(scan_for_phi(mixed_corpus / "case-00001", needles)) > 10
    assert scan_for_phi(_prefect_database(), ["dicomops-ingest"]), _prefect_database()


def test_cli_ingest_exits_1_when_the_gate_fails(faulty_corpus: Path, mlflow_env: str, tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["ingest", str(faulty_corpus), "--work", str(tmp_path / "w")])
    assert result.exit_code == 1, result.output
    text = " ".join(result.output.split())  # rich wraps long lines
    assert "gate failed" in text and "Top reasons: wrong_modality" in text
    ok = CliRunner().invoke(app, ["ingest", str(faulty_corpus), "--work", str(tmp_path / "w"),
                                  "--max-invalid-fraction", "1.0", "--workers", "1"])
    assert ok.exit_code == 0, ok.output
    bad = CliRunner().invoke(app, ["ingest", str(faulty_corpus), "--max-invalid-fraction", "3"])
    assert bad.exit_code == 2


def test_the_quarantine_reaches_mlflow_by_token_never_by_a_path_that_names_a_patient(
        mixed_corpus: Path, mlflow_env: str, tmp_path: Path) -> None:
    """A site's export may name its folders and files after the patient: the quarantine MLflow shows
    names each file by a keyed token, and the work directory keeps the path beside the same token."""
    import shutil

    corpus = tmp_path / "corpus"
    shutil.copytree(mixed_corpus, corpus)
    faults = pd.read_csv(corpus / "faults.csv", keep_default_na=False)
    bad = corpus / str(faults[faults.fault == "truncated"].path.iloc[0])
    named = bad.with_name("DOE^JOHN_MRN-4711.dcm")  # as an export by patient name would call it
    bad.rename(named)

    result = ingest(src=corpus, work=tmp_path / "work", config=IngestConfig(workers=1))
    client = mlflow.tracking.MlflowClient(mlflow_env)
    shared = pd.read_csv(client.download_artifacts(str(result["mlflow_run_id"]), "ingest/quarantine.csv", str(tmp_path)),
                         keep_default_na=False)
    assert list(shared.columns) == ["file", "reason", "detail"] and shared.file.str.match(r"^FI-[A-Z2-7]{16}$").all()
    assert len(shared) == len(faults) and "truncated" in set(shared.reason)
    kept = pd.read_csv(tmp_path / "work/ingest/quarantine.csv", keep_default_na=False)
    row = kept[kept.source_path == named.relative_to(corpus).as_posix()]
    assert len(row) == 1 and row.file.iloc[0] in set(shared.file)  # the operator finds the file by its token
    hits = scan_for_phi(tmp_path / "mlflow", {"DOE^JOHN", "MRN-4711"})
    assert hits == [], f"a file path reached MLflow: {hits[:3]}"
    assert scan_for_phi(tmp_path / "work" / "ingest", {"DOE^JOHN"})  # the scan is not vacuous: the path is there


def test_cli_ingest_counts_the_series_lost_at_deidentification(
        mlflow_env: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A series the gate accepted and de-identification then lost (``deid_failed``) is in the printed
    figures, ``summary.json`` and MLflow; past --max-invalid-fraction the ingest fails, exit 1, as the
    gate does."""
    from dicomops.config import SynthConfig
    from dicomops.synthetic import generate_corpus

    lost: list[Path] = []
    gate = ingest_module.apply_gate

    def apply_gate_then_lose(work: Path, cfg: IngestConfig) -> ingest_module.GateSummary:
        summary = gate(work, cfg)
        lost.pop().unlink()  # moved away between the gate and de-identification: its series is lost
        return summary

    monkeypatch.setattr(ingest_module, "apply_gate", apply_gate_then_lose)
    texts = {}
    for name, fraction, code in (("kept", "1.0", 0), ("refused", "0.2", 1)):
        src = tmp_path / name
        generate_corpus(src, SynthConfig(patients=2, seed=3, fault_rate=0.0, matrix=128, slices=8, workers=1))
        lost.append(sorted(src.glob("case-00002/series-*/*"))[0])
        result = CliRunner().invoke(app, ["ingest", str(src), "--work", str(tmp_path / f"work-{name}"),
                                          "--max-invalid-fraction", fraction, "--workers", "1"])
        assert result.exit_code == code, result.output
        texts[name] = " ".join(result.output.split())  # rich wraps long lines
        summary = pd.read_json(tmp_path / f"work-{name}/ingest/summary.json", typ="series")
        assert (summary.accepted_files, summary.quarantined_files, summary.reasons) == (8, 8, {"deid_failed": 8})
    assert "1 series accepted, 8 files quarantined" in texts["kept"]  # was: 2 series, 0 files
    assert "gate failed" in texts["refused"] and "8 of 16 files quarantined (50.0%)" in texts["refused"]
    assert "Top reasons: deid_failed (8)" in texts["refused"]
    assert not (tmp_path / "work-refused/ingest/accepted.parquet").exists()
    client = mlflow.tracking.MlflowClient(mlflow_env)
    runs = client.search_runs([client.get_experiment_by_name("dicomops").experiment_id])
    assert len(runs) == 2
    for run in runs:
        assert run.data.metrics["quarantine.deid_failed"] == 8 and run.data.metrics["ingest.accepted_files"] == 8


def test_a_folder_named_after_a_patient_reaches_neither_prefects_parameters_nor_its_logs(
        clean_corpus: Path, mlflow_env: str, tmp_path: Path) -> None:
    """An export named by patient (``dicomops ingest /exports/PEMBERTON^ANASTASIA_MRN31285031``): the
    command line passed the folder as a plain path, which Prefect keeps as the flow run's parameter,
    and the ingest flow printed it into Prefect's logs when it skipped. Now it is a ``SecretStr``,
    stored masked, and never printed (twice: the second run is skipped, and says so)."""
    import shutil

    from tests.conftest import PREFECT_HOME

    named = tmp_path / "PEMBERTON^ANASTASIA_MRN31285031"
    shutil.copytree(clean_corpus, named)
    for _ in range(2):
        done = CliRunner().invoke(app, ["ingest", str(named), "--work", str(tmp_path / "work"), "--workers", "1"])
        assert done.exit_code == 0, done.output
    for place in (PREFECT_HOME, _prefect_database()):
        assert scan_for_phi(place, {"PEMBERTON", "MRN31285031"}) == [], place
    assert scan_for_phi(_prefect_database(), ["dicomops-ingest"])  # the scan is not vacuous
