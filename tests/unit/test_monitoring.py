"""The drift monitor's parts: decision rules, quarantine test, cooldown and lock, alert payload,
and a reduced version of benchmarks/drift.py (false alarms and detection on the generator's scenarios)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from dicomops import io
from dicomops.config import (
    IngestConfig,
    MonitorConfig,
    PipelineConfig,
    PreprocessConfig,
    SynthConfig,
    TrainConfig,
)
from dicomops.monitoring import alerts, guard
from dicomops.monitoring.drift import DriftSummary, compare, quarantine_check
from dicomops.monitoring.evaluate import detection, featurise_batches, ingest_and_preprocess
from dicomops.monitoring.features import categorical_columns, numeric_columns
from dicomops.monitoring.reference import build_reference
from dicomops.synthetic import generate_corpus
from dicomops.training.model import build_model
from dicomops.training.scoring import SeriesRule

KEY = b"monitor-test-key-0123456789abcdef01"


def _table(n: int, seed: int, shift: float = 0.0, vendor: str = "GE") -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    data = {c: rng.normal(shift, 1.0, n) for c in numeric_columns()}
    data.update({c: rng.choice([vendor, "Siemens", "Philips"], n) for c in categorical_columns()})
    emb = rng.normal(shift, 1.0, (n, 8))
    data.update({f"emb_{i}": emb[:, i] for i in range(8)})
    return pd.DataFrame(data)


def test_too_few_series_is_insufficient_data_never_a_guess(tmp_path: Path) -> None:
    summary = compare(_table(60, 0), _table(5, 1, shift=5.0), MonitorConfig(min_series=10), tmp_path)
    assert summary.status == "insufficient data" and summary.columns == []
    assert "fewer than min_series=10" in summary.reasons[0]


def test_a_critical_column_alone_is_drift_and_the_summary_names_it(tmp_path: Path) -> None:
    reference, current = _table(120, 0), _table(30, 1)
    current["noise_hu"] += 4.0  # only the image noise moves
    summary = compare(reference, current, MonitorConfig(), tmp_path)
    assert summary.status == "drift" and summary.critical_drifted == ["noise_hu"]
    assert summary.drift_share < 0.3 and any("noise_hu" in r for r in summary.reasons)
    assert (tmp_path / "report.html").stat().st_size > 10_000 and (tmp_path / "summary.json").exists()
    # The scanner columns are tested but never drawn: the report would show each one's exact count.
    assert {c.column for c in summary.columns if c.kind == "categorical"} == set(categorical_columns())
    html = (tmp_path / "report.html").read_text()
    assert "Siemens" not in html and "Philips" not in html and "noise_hu" in html
    same = compare(reference, _table(30, 2), MonitorConfig(), tmp_path / "same")
    assert same.status == "no drift", same.reasons


def test_a_small_reference_and_batch_are_judged_embeddings_included(tmp_path: Path) -> None:
    """20 reference series and 8 new ones (a small site's champion and a week's inflow): Evidently's
    picture of the embeddings (a t-SNE of perplexity 30) cannot be drawn on 28 rows, and the
    monitor judged nothing (it raised); now the embedding's verdict is there without the picture."""
    shifted = compare(_table(20, 0), _table(8, 1, shift=10.0), MonitorConfig(min_series=6), tmp_path)
    assert shifted.status == "drift"
    (embedding,) = [c for c in shifted.columns if c.kind == "embedding"]
    assert embedding.drifted and (tmp_path / "report.html").exists()
    assert any("embedding chart omitted" in n for n in shifted.notes)


def test_quarantine_share_is_tested_against_the_training_ingest() -> None:
    cfg = MonitorConfig()
    assert not quarantine_check(0.01, 2, 200, cfg)["drifted"]
    flagged = quarantine_check(0.01, 40, 200, cfg)
    assert flagged["drifted"] and flagged["p_value"] < 1e-6


def test_cooldown_and_lock_stop_retrain_storms(tmp_path: Path) -> None:
    t0 = dt.datetime(2026, 11, 27, 3, 0, tzinfo=dt.UTC)
    assert guard.check_cooldown(tmp_path, "m", 24, now=t0).go
    guard.record_start(tmp_path, "m", "run-1", now=t0)
    inside = guard.check_cooldown(tmp_path, "m", 24, now=t0 + dt.timedelta(hours=5))
    assert not inside.go and "cooldown" in inside.reason and "19.0 h" in inside.reason
    assert guard.check_cooldown(tmp_path, "other-model", 24, now=t0).go
    assert guard.check_cooldown(tmp_path, "m", 24, now=t0 + dt.timedelta(hours=25)).go
    with guard.retrain_lock(tmp_path), pytest.raises(guard.RetrainLocked, match="another retrain holds"), \
            guard.retrain_lock(tmp_path):
        pass
    with guard.retrain_lock(tmp_path):  # released after use
        pass


def test_an_alert_finds_nothing_new_in_the_pool_the_last_retrain_learned_from(tmp_path: Path) -> None:
    """A pool is its content; the one the last retrain registered a version from is nothing new to
    an alert (the reason says what would be), and a later start of the cooldown keeps it."""
    assert guard.same_pool(tmp_path, "m", guard.pool_identity("a.dir", "r.dir")) is None  # none recorded
    guard.record_pool(tmp_path, "m", guard.pool_identity("a.dir", "r.dir"), "7")
    guard.record_start(tmp_path, "m", "run-2")
    same = guard.same_pool(tmp_path, "m", guard.pool_identity("a.dir", "r.dir"))
    assert same is not None and "version 7" in same and "label the drifted studies" in same
    assert guard.same_pool(tmp_path, "m", guard.pool_identity("a.dir", "new-readers.dir")) is None
    assert guard.same_pool(tmp_path, "m", guard.pool_identity("b.dir", "r.dir")) is None
    assert guard.same_pool(tmp_path, "other-model", guard.pool_identity("a.dir", "r.dir")) is None


def test_alert_payload_has_counts_and_column_names_only(tmp_path: Path) -> None:
    summary = DriftSummary("drift", 12, 120, 0.4, 0.3, ["SliceThickness"], ["SliceThickness"],
                           reasons=["critical column(s) drifted: SliceThickness"])
    record = alerts.payload(summary, "model", "3", "run-abc", "0123456789ab")
    assert set(record) == {"model", "version", "monitoring_run_id", "batch_id", "status", "drift_share",
                           "drifted_columns", "critical_columns", "n_series", "reasons"}
    alerts.append_alert(tmp_path, record)
    alerts.append_alert(tmp_path, record)
    assert [r["monitoring_run_id"] for r in alerts.read_alerts(tmp_path)] == ["run-abc", "run-abc"]


def test_reduced_detection_benchmark(tmp_path: Path) -> None:
    """benchmarks/drift.py in small: no false alarm on same-distribution batches, every shift caught."""
    synth = SynthConfig(patients=40, fault_rate=0.0, matrix=96, slices=16, workers=1)
    cfg = PipelineConfig(ingest=IngestConfig(workers=1), preprocess=PreprocessConfig(workers=1, crop_xy=320))
    train = TrainConfig(input_size=32)
    torch.manual_seed(0)
    model = build_model(train, 3).eval()  # untrained: speed; its embeddings still follow appearance
    generate_corpus(tmp_path / "ref" / "src", synth)
    quarantined, files = ingest_and_preprocess(tmp_path / "ref" / "src", tmp_path / "ref" / "work", cfg, KEY)
    reference = build_reference(tmp_path / "ref" / "work", model, 3, 32, SeriesRule(3))
    monitor = MonitorConfig()
    # Two same-distribution batches and one of each shift (benchmarks/drift.py runs more of each).
    for scenario, seeds, expected in (("baseline-new", [101, 102], 0), ("new-vendor", [201], 1),
                                      ("protocol-shift", [301], 1), ("low-dose", [401], 1)):
        batches = featurise_batches(tmp_path / "b", scenario, seeds, 12, synth, cfg, KEY, model, 3, 32, SeriesRule(3),
                                    progress=lambda _m: None)
        rates = detection(reference, batches, 12, monitor, quarantined / files, tmp_path / "r")
        assert rates.drift == expected, (scenario, rates)


def test_a_batch_cut_to_its_first_series_is_tested_on_those_series_files(tmp_path: Path) -> None:
    """The benchmark's sweep of batch sizes: the first n series of a batch are credited with their own
    quarantined files, not the whole batch's (which would mark reference-like series as detected)."""
    from dicomops.monitoring.evaluate import Batch

    reference = _table(40, 0)
    current = reference.head(16).reset_index(drop=True)  # the reference's own distribution
    cfg = MonitorConfig(min_series=2)

    def tested(batch: Batch, n: int) -> tuple[int, dict]:
        rates = detection(reference, [batch], n, cfg, 0.005, tmp_path / "r")
        summary = io.read_json(tmp_path / "r" / f"{batch.scenario}-{batch.seed}-{n}" / "summary.json")
        return rates.drift, summary["quarantine"]

    # 30 of the batch's 960 files are quarantined. Without per-series counts the whole batch's are
    # scaled: 3 of its 16 series' share, never all of them.
    _, quarantine = tested(Batch("shift", 3, current, 30, 960), 3)
    assert (quarantine["quarantined"], quarantine["files"]) == (6, 180)
    # Counted per series (as featurise_batches records them): all 30 are in its last series.
    counted = Batch("shift", 1, current, 30, 960, [60] * 16, [0] * 15 + [30])
    drift, quarantine = tested(counted, 3)
    assert drift == 0 and (quarantine["quarantined"], quarantine["files"]) == (0, 180)
    drift, quarantine = tested(counted, 16)  # the whole batch: its whole quarantine
    assert drift == 1 and (quarantine["quarantined"], quarantine["files"]) == (30, 960)
    # Files of no featurised series (unreadable, a series quarantined whole) count in proportion.
    assert Batch("s", 2, current, 46, 1040, [60] * 16, [0] * 15 + [30]).counts(4) == (4, 260)


def test_series_file_counts_follow_the_gates_index(tmp_path: Path) -> None:
    from dicomops.layout import WorkLayout
    from dicomops.monitoring.evaluate import series_file_counts

    paths = WorkLayout(tmp_path).ingest
    io.write_parquet(paths.index, pd.DataFrame({"source_path": [f"f{i}.dcm" for i in range(7)],
                                                "SeriesInstanceUID": ["a", "a", "b", "b", "b", "c", "c"]}))
    # f1 (a) failed an expectation, c was quarantined whole, x.dcm could not be read (no series).
    io.write_csv(paths.quarantine, pd.DataFrame({"source_path": ["f1.dcm", "f5.dcm", "f6.dcm", "x.dcm"],
                                                 "reason": "r", "detail": ""}))
    assert series_file_counts(tmp_path, ["b", "a"]) == ([3, 2], [0, 1])


@pytest.mark.parametrize(("architecture", "k"), [("resnet-slim", 3), ("resnet3d-slim", 5)])
def test_model_outputs_are_the_models_own_and_leave_it_as_it_was(architecture: str, k: int) -> None:
    """The channels-last copy scores what the model scores in its own layout; the caller's model keeps
    its layout; a 3-D network (5-D weights, no channels-last 2-D form) runs too."""
    from dicomops.monitoring.features import model_outputs
    from dicomops.training.data import all_slabs
    from dicomops.training.scoring import series_score

    torch.manual_seed(0)
    model = build_model(TrainConfig(architecture=architecture, input_size=32), k).eval()
    volumes = [np.random.default_rng(i).random((40, 40, 9), dtype=np.float32).astype(np.float16) for i in range(2)]
    rule = SeriesRule(3, "top_k_contrast")
    scores, embeddings = model_outputs(model, iter(volumes), k, 32, rule)
    with torch.no_grad():
        expected = [series_score(torch.softmax(model(all_slabs(v, k, 32)), 1)[:, 1].numpy(), rule) for v in volumes]
    assert scores == pytest.approx(expected, abs=1e-5) and embeddings.shape[0] == 2
    assert all(p.is_contiguous() for p in model.parameters())


def _watched(work: Path, token: str, series: int, files: bool = True) -> None:
    """What pacs-watch leaves for one accepted study: its ledger row and, with `files`, its gate's
    de-identified files and accepted table."""
    from dicomops.layout import WorkLayout
    from dicomops.pacs.watch import StudyOutcome, _record

    _record(work, StudyOutcome(token, "ingested", accepted_series=series))
    if files:
        ingest = WorkLayout(WorkLayout(work).pacs.study(token)).ingest
        for s in range(series):
            (ingest.deid / "P" / f"S{s}").mkdir(parents=True)
            (ingest.deid / "P" / f"S{s}" / "1.dcm").write_bytes(b"de-identified")
        ingest.accepted.parent.mkdir(parents=True, exist_ok=True)
        pd.DataFrame({"SeriesInstanceUID": [f"S{s}" for s in range(series)]}).to_parquet(ingest.accepted)


def test_the_inflow_is_ready_by_what_is_there_and_its_cursor_knows_its_ledger(tmp_path: Path) -> None:
    """Series are counted from the studies whose files are there (a ledger row alone makes no
    batch); the cursor moves only when a batch is taken, and a replaced ledger is taken from its start."""
    from dicomops.layout import WorkLayout
    from dicomops.monitoring import inflow

    work = tmp_path / "work"
    assert inflow.ready(work, 3).folder is None  # nothing handled yet
    for i in range(4):
        _watched(work, f"ST-gone{i}", 3, files=False)
    gone = inflow.ready(work, 3)
    assert (gone.folder, gone.series, gone.studies) == (None, 0, ())  # 12 series in the ledger, none there
    assert not WorkLayout(work).inflow_cursor.exists() and not list((work / "monitoring").rglob("*.dcm"))

    _watched(work, "ST-a", 2)
    _watched(work, "ST-b", 2)
    batch = inflow.ready(work, 3)
    assert batch.studies == ("ST-a", "ST-b") and batch.series == 4 and batch.folder is not None
    assert batch.folder == WorkLayout(work).inflow(batch.batch_id)  # named by the studies it holds
    assert sorted(p.relative_to(batch.folder).parts[0] for p in batch.folder.rglob("*.dcm")) == ["ST-a"] * 2 + ["ST-b"] * 2
    inflow.taken(work, batch)
    assert inflow.pending(work).studies == ()
    _watched(work, "ST-c", 1)
    assert inflow.pending(work).studies == ("ST-c",)

    ledger = WorkLayout(work).pacs.ledger  # WORK/pacs replaced: another ledger, shorter than the cursor
    ledger.unlink()
    _watched(work, "ST-d", 1)
    assert inflow.pending(work).studies == ("ST-d",)
    for i in range(7):  # or as long, with other studies at the cursor's row
        _watched(work, f"ST-e{i}", 1)
    assert inflow.pending(work).studies == ("ST-d", *(f"ST-e{i}" for i in range(7)))
    io.write_json(WorkLayout(work).inflow_cursor, {"rows": 6})  # a cursor that names no row: trusted
    assert inflow.pending(work).studies == ("ST-e5", "ST-e6")


def test_a_retrain_whose_training_source_holds_no_labels_says_what_to_set(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """`monitor.training_source` defaults to data/ of the folder the command runs in: run from
    elsewhere, a retrain met FileNotFoundError 'data/labels.csv' after the drift alert."""
    from dicomops.errors import RetrainNotReadyError
    from dicomops.monitoring.stage import check_training_source, labelled_sources

    monkeypatch.chdir(tmp_path)
    with pytest.raises(RetrainNotReadyError, match=r"monitor.training_source \(.*/data\) holds no labelled corpus"):
        check_training_source(Path("data"))
    assert labelled_sources(tmp_path / "work", Path("data")) == [Path("data")]  # feedback reads it as it is
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "labels.csv").write_text("SeriesInstanceUID,label\n")
    check_training_source(Path("data"))


def test_combined_sources_keep_names_that_look_like_numbers(tmp_path: Path) -> None:
    """A site's labels name patients 0001001 and series 1.20: read as numbers they became 1001 and
    1.2 in the retrain's combined labels, so its pseudonyms matched none of the images'."""

    from dicomops.monitoring.stage import combine_sources

    src = tmp_path / "site"
    (src / "a").mkdir(parents=True)
    (src / "a" / "1.dcm").write_bytes(b"x")
    pd.DataFrame({"PatientID": ["0001001"], "SeriesInstanceUID": ["1.20"], "series_dir": ["a"], "label": [1],
                  "mask_path": [""]}).to_csv(src / "labels.csv", index=False)
    out = combine_sources([src], tmp_path / "combined")
    text = (out / "labels.csv").read_text()
    assert "0001001" in text and "1.20," in text and ",1," in text


def test_a_series_two_sources_label_keeps_the_later_row(tmp_path: Path) -> None:
    """The gate refuses two different rows for one series (a crash in preprocessing before): the
    combined labels keep the later source's row."""
    from dicomops import ingest
    from dicomops.monitoring.stage import combine_sources

    sources = []
    for i, label in enumerate((0, 1)):
        src = tmp_path / f"source-{i}"
        (src / "a").mkdir(parents=True)
        (src / "a" / "1.dcm").write_bytes(b"x")
        pd.DataFrame({"PatientID": ["P1"], "SeriesInstanceUID": ["1.2.3"], "series_dir": ["a"], "label": [label],
                      "mask_path": [""]}).to_csv(src / "labels.csv", index=False)
        sources.append(src)
    out = combine_sources(sources, tmp_path / "combined")
    labels = ingest.check_labels(out)
    assert labels is not None and labels.label.tolist() == ["1"] and labels.series_dir.tolist() == ["s1/a"]


def test_series_that_fail_preprocessing_count_as_files_the_batch_cannot_use(tmp_path: Path) -> None:
    """A monitored batch whose every series failed preprocessing raised a ValueError the monitor did
    not catch: no summary, no alert, and with --pacs the same batch failed night after night. It is
    judged on its quarantine, which now holds the files of the series preprocessing lost."""
    from dicomops.errors import PreprocessingFailedError
    from dicomops.layout import WorkLayout
    from dicomops.monitoring.stage import batch_features, quarantine_counts

    layout = WorkLayout(tmp_path)
    layout.ingest.root.mkdir(parents=True)
    io.write_json(layout.ingest.summary, {"quarantined_files": 2, "files": 10})
    io.write_parquet(layout.ingest.instances, pd.DataFrame({"SeriesInstanceUID": ["A"] * 4 + ["B"] * 4}))
    assert quarantine_counts(tmp_path) == (2, 10)
    layout.preprocessed.root.mkdir(parents=True)
    io.write_csv(layout.preprocessed.failures, pd.DataFrame({"SeriesInstanceUID": ["B"], "reason": ["transform_error"],
                                                             "detail": [""]}))
    assert quarantine_counts(tmp_path) == (2, 10)  # some series lost: counted as the reference is, by the gate
    io.write_csv(layout.preprocessed.failures, pd.DataFrame({"SeriesInstanceUID": ["A", "B"],
                                                             "reason": ["transform_error"] * 2, "detail": ["", ""]}))
    assert quarantine_counts(tmp_path) == (10, 10)  # every one lost: nothing the batch holds can be used
    io.write_parquet(layout.preprocessed.features, pd.DataFrame({"SeriesInstanceUID": pd.Series(dtype=str)}))
    assert batch_features(tmp_path, "sqlite:///nowhere.db", "no-run").empty  # no model is loaded for nothing
    assert issubclass(PreprocessingFailedError, ValueError)  # callers catching ValueError still do
