"""The whole loop as one flow. Stages arrive one issue at a time; this file only wires them."""

from __future__ import annotations

from pathlib import Path

from prefect import flow
from pydantic import SecretStr

from dicomops.config import PipelineConfig, load_settings
from dicomops.tracking import flatten_params
from flows.export import export
from flows.ingest import ingest
from flows.preprocess import preprocess
from flows.runners import on_dask
from flows.scope import folder, secret_folder, tracked, writing
from flows.segment import segment
from flows.train import train
from tasks.tracking import hash_corpus, log_input_counts, open_run


@flow(name="dicomops-pipeline", log_prints=True)
def pipeline(src: SecretStr | Path, config: PipelineConfig = PipelineConfig(), work: Path | None = None) -> dict[str, str]:
    """Run the pipeline on the DICOM folder `src` (a ``SecretStr`` from the command line,
    :func:`flows.scope.folder`), writing under `work`."""
    src = folder(src)
    settings = load_settings()
    work = Path(work or settings.work_dir)
    uri = settings.mlflow_tracking_uri
    data_hash = hash_corpus(src)
    with writing(work, "dicomops-pipeline", settings):
        run_id = open_run(uri, config.experiment, settings.mlflow_artifact_root, "pipeline", data_hash,
                          flatten_params(config.model_dump(mode="json")))
        with tracked(uri, run_id):
            log_input_counts(uri, run_id, src)
            gate = on_dask(ingest, config.ingest.dask_address)(
                secret_folder(src), work, config.ingest, config.experiment, parent_run_id=run_id)
            prepared = on_dask(preprocess, config.preprocess.dask_address)(
                work, config.preprocess, config.experiment, parent_run_id=run_id)
            trained = train(work, config.train, config.preprocess, config.experiment, parent_run_id=run_id,
                            privacy_config=config.ingest.privacy)
            exported = export(work, config.export, config.train.model_name, version=str(trained["version"]))
            segmented = (segment(work, config.segment, config.preprocess, config.train, config.experiment,
                                 parent_run_id=run_id, privacy_config=config.ingest.privacy)
                         if config.segment.enabled else {})
    return {"mlflow_run_id": run_id, "data_dvc_md5": data_hash, "work": str(work),
            "ingest_run_id": str(gate["mlflow_run_id"]), "accepted_series": str(gate["accepted_series"]),
            "preprocess_run_id": str(prepared["mlflow_run_id"]), "train_run_id": str(trained["mlflow_run_id"]),
            "model_version": str(trained["version"]), "tensorrt": str(exported["tensorrt"]),
            "segmenter_version": str(segmented.get("version", "")), "segmenter_cpm": str(segmented.get("cpm", "")),
            "skipped": ",".join(name for name, stage in (("ingest", gate), ("preprocess", prepared),
                                                         ("train", trained), ("export", exported),
                                                         ("segment", segmented))
                                if stage.get("skipped"))}
