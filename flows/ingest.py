"""The ingest gate flow: header index → expectations → geometry → gate → de-identified corpus → gate's recount."""

from __future__ import annotations

from pathlib import Path

from prefect import flow
from pydantic import SecretStr

from dicomops.config import IngestConfig, load_settings
from dicomops.errors import GateFailedError
from dicomops.tracking import flatten_params
from flows.scope import folder, tracked, writing
from tasks import ingest as t
from tasks import stages
from tasks.tracking import hash_corpus, log_ingest, open_run


@flow(name="dicomops-ingest", log_prints=True)
def ingest(src: SecretStr | Path, work: Path | None = None, config: IngestConfig = IngestConfig(),
           experiment: str = "dicomops", parent_run_id: str | None = None) -> dict[str, object]:
    """Accept or quarantine every file under `src` (a ``SecretStr`` from the command line: its name
    may be a patient's, :func:`flows.scope.folder`); write the de-identified corpus under `work`."""
    src = folder(src)
    settings = load_settings()
    work = Path(work or settings.work_dir)
    uri = settings.mlflow_tracking_uri
    data_hash = hash_corpus(src)
    runtime = {"workers", "dask_address"}  # where the work runs does not change what it produces
    key = stages.stage_key("ingest", {"data": data_hash, "config": config.model_dump(mode="json", exclude=runtime)})
    with writing(work, "dicomops-ingest", settings):
        if (cached := stages.completed(work, "ingest", key)) is not None:
            print("ingest: the folder's files and the settings are unchanged since the last run; skipped")
            return {**cached, "skipped": True}
        stages.started(work, "ingest")
        run_id = open_run(uri, experiment, settings.mlflow_artifact_root, "ingest", data_hash,
                          flatten_params({"ingest": config.model_dump(mode="json", exclude={"expectations"})}),
                          parent_run_id)
        with tracked(uri, run_id):
            t.reset_ingest(work, data_hash)
            t.index_headers.submit(src, work, config).result()  # on the flow's task runner (Dask when set)
            t.validate_headers(work, config)
            t.assemble_series(work, config)
            try:
                t.apply_gate(work, config)
                t.deidentify_corpus.submit(src, work, config).result()
                gate = t.recount_gate(work, config)  # with the series de-identification quarantined
            except GateFailedError:
                log_ingest(uri, run_id, work)  # the quarantine and its reasons, for whoever fixes the batch
                raise
            t.rekey_labels(src, work, config)
            released = t.release_counts(work, config)  # counts for people: differentially private only
            log_ingest(uri, run_id, work, released)
        print(f"ingest: {gate.accepted_files} files in {gate.accepted_series} series accepted, "
              f"{gate.quarantined_files} quarantined ({gate.quarantined_share:.1%})")
        result: dict[str, object] = {"mlflow_run_id": run_id, "accepted_series": gate.accepted_series,
                                     "quarantined_files": gate.quarantined_files, "work": str(work)}
        stages.done(work, "ingest", key, result)
    return {**result, "skipped": False}
