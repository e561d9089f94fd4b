"""The feedback loop: readers' judgements (their verified revisions of our reports and corrected
segmentations in the PACS; the review endpoint's are stored as they arrive) → one label per series →
agreement with the classifier, and with the segmenter where one is promoted, on their real work →
the event dicomops.feedback.threshold and (embedded default) the classifier's retrain."""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from dicomops.config import PipelineConfig, load_settings
from dicomops.layout import WorkLayout
from dicomops.monitoring.stage import labelled_sources
from flows.retrain import retrain
from flows.scope import writing
from tasks import feedback as t


@flow(name="dicomops-feedback", log_prints=True)
def feedback(orthanc_url: str | None = None, work: Path | None = None, config: PipelineConfig = PipelineConfig(),
             from_pacs: bool = True, limit: int = 100) -> dict[str, object]:
    """Collect, resolve and measure readers' feedback on the version holding ``monitor.alias``; retrain
    when enough corrections accumulate or agreement drops (``config.feedback``)."""
    settings = load_settings()
    work = Path(work or settings.work_dir)
    uri, cfg, name = settings.mlflow_tracking_uri, config.feedback, config.train.model_name
    version = t.serving_version(uri, name, config.monitor.alias)
    if version is None:
        print(f"feedback: no version of {name} holds '{config.monitor.alias}' yet; nothing to measure")
        return {"status": "skipped", "reason": f"no {config.monitor.alias} of {name}", "feedback_run_id": None,
                "retrain_reason": None, "retrain": None}
    # It holds WORK/feedback only: the review endpoint and pacs-watch keep working beside it.
    with writing(WorkLayout(work).feedback.root, "dicomops-feedback", settings):
        collected = t.collect_from_pacs(orthanc_url, work, cfg, limit) if from_pacs else {}
        labels = t.write_labels(work, cfg)
        # The readers' labels, masks and reviewed clinical series: a DVC-versioned training source.
        source, _, _ = t.readers_source(work, cfg, labelled_sources(work, config.monitor.training_source))
        run_id, rows = t.log_agreement(uri, settings.mlflow_artifact_root, config.monitor.experiment, name,
                                       version, work, cfg, collected | labels, source)
        # The segmenter's answers are judged by the same readers: its own run and page (kappa, Dice).
        segmenter = config.segment.model_name
        segmenter_version = t.serving_version(uri, segmenter, config.monitor.alias)
        if segmenter_version is not None:
            t.log_agreement(uri, settings.mlflow_artifact_root, config.monitor.experiment, segmenter,
                            segmenter_version, work, cfg, {}, source)
        reason = t.retrain_reason(work, cfg, name, version)
    overall = next((r for r in rows if r["vendor"] == "all"), None)
    print(f"feedback on {name} v{version}: {collected or 'PACS not read'}; {labels}; agreement "
          + (f"kappa {overall['kappa']:.3f} over {overall['series']} series" if overall else "not measured yet"))
    result: dict[str, object] = {"status": "measured", "feedback_run_id": run_id, **collected, **labels, **source,
                                 "retrain_reason": reason, "retrain": None}
    if reason:
        t.raise_event(name, version, reason, run_id)
        if config.monitor.retrain == "subflow":
            result["retrain"] = retrain(work=work, config=config, trigger="feedback", monitoring_run_id=run_id)
    return result
