"""Real scanner files through the ingest *flow*: the verdicts of the unit table hold, the Biograph
series is accepted, and no PHI from those files reaches WORK, MLflow or Prefect."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import pytest

import mlflow
from dicomops.config import IngestConfig
from dicomops.deid import scan_for_phi
from dicomops.deid.scan import _UUID
from flows.ingest import ingest
from tests.flows.test_ingest_flow import _prefect_database
from tests.unit.test_real_files import _needles, _subset, _write_cases, biograph  # noqa: F401 (fixture)

pytestmark = pytest.mark.usefixtures("prefect_harness")


def test_real_files_through_the_ingest_flow_leak_nothing(biograph: Path, mlflow_env: str,  # noqa: F811
                                                         tmp_path: Path) -> None:
    from tests.conftest import PREFECT_HOME

    src = tmp_path / "src"
    src.mkdir()
    _subset(biograph, src / "biograph", 12)
    expected = _write_cases(src / "single")
    result = ingest(src=src, work=tmp_path / "work", config=IngestConfig(workers=2, max_invalid_fraction=1.0))
    assert result["accepted_series"] == 1  # the Biograph slices; every single file is a series of one
    quarantine = pd.read_csv(tmp_path / "work/ingest/quarantine.csv", keep_default_na=False)
    rejected = {Path(p).name: r for p, r in zip(quarantine.source_path, quarantine.reason, strict=True)
                if p.startswith("single/")}
    header_verdicts = {k: r for k, (r, _) in expected.items() if r is not None}
    assert {k: rejected[k] for k in header_verdicts} == header_verdicts
    assert not any(p.startswith("biograph/") for p in quarantine.source_path)
    run = mlflow.tracking.MlflowClient(mlflow_env).get_run(str(result["mlflow_run_id"]))
    assert run.info.status == "FINISHED"

    needles = _needles(sorted((src / "single").iterdir()) + sorted((src / "biograph").iterdir())[:3])
    assert {"SIMPSON", "PANCREAS_0001", "An institute", "19800228"} <= needles
    # Prefect names each task run by its task and 3 or 4 random hex digits ("open-run-1311"), one
    # in 65,536 of them a given 4-digit ID such as this corpus's PatientID "0010", and the session's
    # database holds thousands: in it, a needle of five hex digits or fewer is looked for as a token
    # that does not end such a name (after a '-'), wherever else it stands.
    by_chance = {n for n in needles if len(n) <= 5 and all(c in "0123456789abcdefABCDEF" for c in n)}
    assert "0010" in by_chance and by_chance < needles
    for place, looked_for in ((tmp_path / "work", needles), (tmp_path / "mlflow", needles),
                              (PREFECT_HOME, needles), (_prefect_database(), needles - by_chance)):
        hits = scan_for_phi(place, looked_for)
        assert hits == [], f"PHI found under {place}: {hits[:5]}"
    text = _UUID.sub(" ", _prefect_database().read_bytes().decode("latin-1").lower())
    for needle in by_chance:
        found = re.findall(rf"(?<![-0-9a-z]){re.escape(needle.lower())}(?![0-9a-z])", text)
        assert found == [], f"{needle} found in Prefect's database"
    assert len(scan_for_phi(src, needles)) > 5  # not vacuous
