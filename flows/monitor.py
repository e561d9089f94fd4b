"""The monitoring flow: a new batch (a folder, or the studies pacs-watch accepted since the last
check) → the same ingest gate and preprocessing → features → Evidently against the serving model's
reference → decision → alert → (embedded default) retrain."""

from __future__ import annotations

from pathlib import Path

from prefect import flow
from pydantic import SecretStr

from dicomops.config import PipelineConfig, load_settings
from dicomops.errors import GateFailedError, PreprocessingFailedError, RetrainNotReadyError
from dicomops.monitoring.drift import describe
from flows.ingest import ingest
from flows.preprocess import preprocess
from flows.retrain import retrain
from flows.runners import on_dask
from flows.scope import folder, secret_folder, tracked, writing
from tasks import monitor as t
from tasks.tracking import hash_corpus, open_run


@flow(name="dicomops-monitor", log_prints=True)
def monitor(src: SecretStr | Path | None = None, work: Path | None = None, config: PipelineConfig = PipelineConfig(),
            pacs: bool = False) -> dict[str, object]:
    """Check the DICOM folder `src` (a ``SecretStr`` from the command line: :func:`flows.scope.folder`)
    for drift against the model version holding ``monitor.alias``; with `pacs`, the clinical inflow
    instead: the studies pacs-watch accepted since the last check (their de-identified files), once
    they hold ``monitor.min_series`` series."""
    if (src is None) == (not pacs):
        raise ValueError("give a DICOM folder or pacs=True (the studies pacs-watch accepted), not both and not neither")
    src = folder(src) if src is not None else None
    settings = load_settings()
    work = Path(work or settings.work_dir)
    uri, cfg = settings.mlflow_tracking_uri, config.monitor
    serving = t.load_serving_model(uri, config.train.model_name, cfg.alias)
    with writing(work, "dicomops-monitor", settings):
        inflow = None
        if pacs:
            inflow = t.gather_inflow(work, cfg.min_series)
            if inflow.folder is None:
                print(f"monitor: {len(inflow.studies)} studies with {inflow.series} series accepted by pacs-watch since "
                      f"the last check, fewer than monitor.min_series ({cfg.min_series}); waiting for more")
                return {"status": "waiting", "drift_share": 0.0, "drifted_columns": [], "monitoring_run_id": None,
                        "batch_id": None, "retrain": None, "studies": len(inflow.studies), "series": inflow.series}
            src = inflow.folder
        assert src is not None
        data_hash = hash_corpus(src)
        batch_id = inflow.batch_id if inflow is not None else data_hash.removesuffix(".dir")[:12]
        batch_work = t.record_batch(work, batch_id, src)
        run_id = open_run(uri, cfg.experiment, settings.mlflow_artifact_root, "monitor", data_hash,
                          {"monitor": cfg.model_dump(mode="json")})
        with tracked(uri, run_id):
            t.tag_run(uri, run_id, {"stage": "monitor", "model": serving.name, "model_version": serving.version,
                                    "model_alias": cfg.alias, "batch_id": batch_id,
                                    "source": "pacs-inflow" if inflow is not None else "folder"})
            try:
                on_dask(ingest, config.ingest.dask_address)(
                    secret_folder(src), batch_work, config.ingest, cfg.experiment, parent_run_id=run_id)
                on_dask(preprocess, config.preprocess.dask_address)(
                    batch_work, config.preprocess, cfg.experiment, parent_run_id=run_id)
            except GateFailedError as err:
                print(f"monitor: the batch failed the ingest gate ({err}); judged on its quarantine alone")
            except PreprocessingFailedError as err:
                print(f"monitor: no series of the batch could be preprocessed ({err}); judged on its quarantine "
                      "and those failures alone")
            current = t.batch_features(batch_work, uri, serving)
            summary = t.compare(serving, current, batch_work, cfg, t.reference_quarantine_share(uri, serving))
            t.log_monitoring(uri, run_id, summary, batch_work, cfg, serving.name)
        if inflow is not None:
            t.take_inflow(work, inflow)
        print(f"monitor {serving.name} v{serving.version}, batch {batch_id}: {describe(summary)}")
        result: dict[str, object] = {"status": summary.status, "drift_share": summary.drift_share,
                                     "drifted_columns": summary.drifted_columns, "monitoring_run_id": run_id,
                                     "batch_id": batch_id, "retrain": None}
        if inflow is not None:
            result |= {"studies": len(inflow.studies), "series": inflow.series}
        if summary.drift:
            t.raise_alert(work, summary, serving, run_id, batch_id, cfg)
            if cfg.retrain == "subflow":
                try:
                    result["retrain"] = retrain(work=work, config=config, trigger="drift", monitoring_run_id=run_id)
                except RetrainNotReadyError as err:  # the drift stands, alerted; the retrain says what it needs
                    print(f"monitor: the retrain did not start: {err}")
                    result["retrain"] = {"status": "not started", "reason": str(err)}
    return result
