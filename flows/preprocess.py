"""The preprocessing flow: accepted, de-identified series → cached 1 mm volumes, features, slabs."""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from dicomops.config import PreprocessConfig, load_settings
from dicomops.tracking import flatten_params
from flows.scope import tracked, writing
from tasks import stages
from tasks.preprocess import hash_accepted_corpus, hash_labels, preprocess_series
from tasks.tracking import log_preprocess, open_run


@flow(name="dicomops-preprocess", log_prints=True)
def preprocess(work: Path | None = None, config: PreprocessConfig = PreprocessConfig(),
               experiment: str = "dicomops", parent_run_id: str | None = None) -> dict[str, object]:
    """Preprocess every accepted series under `work` that is not cached yet."""
    settings = load_settings()
    work = Path(work or settings.work_dir)
    uri = settings.mlflow_tracking_uri
    with writing(work, "dicomops-preprocess", settings):
        corpus_hash = hash_accepted_corpus(work)
        runtime = {"workers", "dask_address"}  # where the work runs does not change what it produces
        # The labels too: readers' labels (dicomops.feedback) change them without changing a file.
        key = stages.stage_key("preprocess", {"corpus": corpus_hash, "labels": hash_labels(work),
                                              "config": config.model_dump(mode="json", exclude=runtime)})
        if (cached := stages.completed(work, "preprocess", key)) is not None:
            print("preprocess: the accepted corpus and the settings are unchanged since the last run; skipped")
            return {**cached, "skipped": True}
        stages.started(work, "preprocess")
        run_id = open_run(uri, experiment, settings.mlflow_artifact_root, "preprocess",
                          corpus_hash, flatten_params({"preprocess": config.model_dump(mode="json")}),
                          parent_run_id)
        with tracked(uri, run_id):
            summary = preprocess_series.submit(work, config).result()  # on the flow's task runner
            log_preprocess(uri, run_id, work, summary)
        print(f"preprocess: {summary['computed']} series computed, {summary['cached']} from cache, "
              f"{summary['failed']} failed, {summary['labels_withheld']} labels withheld (no mask to train with)")
        result: dict[str, object] = {"mlflow_run_id": run_id, **summary, "work": str(work)}
        stages.done(work, "preprocess", key, result)
    return {**result, "skipped": False}
