"""Batch inference: a DICOM folder, or the studies a PACS query finds → the same gate and
preprocessing as training → the registered version's exported engine → SR back in the PACS and a
de-identified result table → one run in the dicomops-inference experiment."""

from __future__ import annotations

from pathlib import Path

from prefect import flow
from pydantic import SecretStr

from dicomops.config import PipelineConfig, load_settings
from dicomops.layout import WorkLayout
from flows.scope import folder, writing
from tasks import predict as t


@flow(name="dicomops-predict", log_prints=True)
def predict(src: SecretStr | Path | None = None, pacs_query: SecretStr | None = None, work: Path | None = None,
            config: PipelineConfig = PipelineConfig(), version: str | None = None,
            orthanc_url: str | None = None) -> dict[str, object]:
    """Score `src` (a folder) or the PACS studies matching `pacs_query` (QIDO-RS keywords as
    ``dicomops predict --pacs`` takes them, ``StudyDate=20261130,ModalitiesInStudy=CT``; ``all`` for
    every study) with the version holding ``config.serve.alias`` (or `version`).

    The query may name a patient or a study, so it is a secret: given as a ``SecretStr``, Prefect
    stores it as ``**********``. Typed into the UI's form, it is stored as typed. So is the folder
    (:func:`flows.scope.folder`)."""
    from dicomops.serving.batch import parse_query

    settings = load_settings()
    work = Path(work or settings.work_dir)
    query = None if pacs_query is None else parse_query(pacs_query.get_secret_value())
    with writing(WorkLayout(work).root / "predict", "dicomops-predict", settings):
        result = t.predict_batch(folder(src) if src else None, query, work, config.ingest, config.serve,
                                 config.train.model_name, version, orthanc_url,
                                 config.segment.model_name if config.serve.localise else None)
    if result.get("refused"):
        print(f"predict: the ingest gate refused the whole folder, nothing was scored: {result['refused']}")
    partly = int(result.get("studies_partly_answered", 0))
    not_kept = f" (the PACS did not keep every result of {partly} studies)" if partly else ""
    print(f"predict: {result['model']} v{result['version']} on {result['engine']}: {result['studies_scored']:.0f} "
          f"studies scored, {result['series_positive']:.0f} of {result['series_scored']:.0f} series positive, "
          f"{result['studies_refused']:.0f} refused, {result['studies_failed']:.0f} failed; "
          f"{result['results_stored']:.0f} DICOM results (SR, SEG) stored{not_kept}; results in {result['results']}")
    return result
