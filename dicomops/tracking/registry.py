"""Model registry: log and register the final model, describe the version, aliases, promotion."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from dicomops.errors import RegistryUnavailableError
from dicomops.tracking.promotion import Decision, ModelScore, decide_promotion
from dicomops.tracking.runs import configure_mlflow

CHALLENGER, CHAMPION = "challenger", "champion"
WEIGHTS_ARTIFACT = "weights"
ModelBuilder = Callable[[dict[str, Any]], Any]


def version_description(summary: dict[str, Any], per_vendor: list[dict[str, Any]], per_fold: list[dict[str, Any]],
                        lovo: list[dict[str, Any]] | None = None) -> str:
    """Markdown for the version page: the cross-validation by vendor and by fold."""
    lines = ["## Four-fold vendor-stratified cross-validation", "",
             f"Mean AUC **{summary['mean_auc']:.3f} ± {summary['std_auc']:.3f}** (series level, out of fold); "
             f"operating point {summary['threshold']:.3f} (Youden).", "",
             "| vendor | AUC | sensitivity | specificity | F1 | kappa |", "|---|---|---|---|---|---|"]
    for row in per_vendor:
        lines.append("| {vendor} | {auc_mean:.3f} ± {auc_std:.3f} | {sensitivity_mean:.3f} | {specificity_mean:.3f} "
                     "| {f1_mean:.3f} | {kappa_mean:.3f} |".format(**{k: (0.0 if isinstance(v, float) and math.isnan(v) else v)
                                                                      for k, v in row.items()}))
    lines += ["", "| fold | AUC (all) | n |", "|---|---|---|"]
    for row in per_fold:
        lines.append(f"| {row['fold']} | {row['auc']:.3f} | {int(row['n'])} |")
    if lovo:
        lines += ["", "Leave one vendor out (trained on the other vendors, scored on the held-out one):", "",
                  "| held-out vendor | AUC | n |", "|---|---|---|"]
        lines += [f"| {row['held_out_vendor']} | {row['auc']:.3f} | {int(row['n'])} |" for row in lovo]
    lines += ["", "Final model: trained on all labelled series for the median best epoch of the folds."]
    return "\n".join(lines)


def register_model(tracking_uri: str, run_id: str, model: Any, example: np.ndarray, name: str,
                   description: str, tags: dict[str, str], metadata: dict[str, str] | None = None) -> str:
    """Log `model` to `run_id` with a signature and input example, register it, alias it challenger."""
    import mlflow.pytorch
    import monai
    import torch
    from mlflow.models import infer_signature

    import mlflow

    client = configure_mlflow(tracking_uri)
    with torch.no_grad():
        output = torch.softmax(model(torch.from_numpy(example)), dim=1).numpy()
    signature = infer_signature(example, output)
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pytorch.log_model(
            model, name="model", signature=signature, input_example=example, registered_model_name=name, metadata=metadata,
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"monai=={monai.__version__}"])
    version = str(info.registered_model_version)
    client.update_model_version(name, version, description=description)
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)
    client.set_registered_model_alias(name, CHALLENGER, version)
    return version


def _score(tags: dict[str, str]) -> ModelScore:
    vendors = {k.removeprefix("cv.auc."): float(v) for k, v in tags.items() if k.startswith("cv.auc.")}
    return ModelScore(float(tags.get("cv.mean_auc", "nan")), vendors)


def alias_version(client: Any, name: str, alias: str) -> Any | None:
    """The version of `name` holding `alias`, or None when no version holds it (or the model is not
    registered yet). Any other failure, such as a server that does not answer or a locked
    database, raises :class:`RegistryUnavailableError`: an outage must never read as "no version".

    The alias is looked up in the registered model's alias table rather than by catching the
    error of ``get_model_version_by_alias``, whose "not found" is an INVALID_PARAMETER_VALUE that
    cannot be told from other bad requests without parsing its message.
    """
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, ErrorCode

    def unavailable(err: Exception) -> RegistryUnavailableError:
        cause = str(err) if isinstance(err, MlflowException) else f"{type(err).__name__}: {err}"
        return RegistryUnavailableError(f"could not read which version of {name} holds '{alias}': {cause}")

    try:
        model = client.get_registered_model(name)
    except MlflowException as err:
        if err.error_code == ErrorCode.Name(RESOURCE_DOES_NOT_EXIST):
            return None
        raise unavailable(err) from err
    except Exception as err:
        raise unavailable(err) from err
    version = (model.aliases or {}).get(alias)
    if version is None:
        return None
    try:
        return client.get_model_version(name, str(version))
    except Exception as err:
        raise unavailable(err) from err


def apply_promotion_gate(tracking_uri: str, name: str, version: str, *, margin: float,
                         vendor_tolerance: float, min_auc: float) -> Decision:
    """Compare the challenger with the champion; promote automatically or leave it for review.

    When the champion cannot be read, the gate does not decide: the version stays challenger and
    its tags say why (``promotion.decision = gate-error``), for a reviewer or a re-run to settle.
    """
    client = configure_mlflow(tracking_uri)
    challenger = client.get_model_version(name, version)
    try:
        current = alias_version(client, name, CHAMPION)
    except RegistryUnavailableError as err:
        decision = Decision(False, (f"gate not applied: {err}; the version stays challenger (re-run the "
                                    f"gate or decide with 'dicomops promote {version}')",), error=True)
    else:
        champion = _score(current.tags) if current is not None and str(current.version) != str(version) else None
        decision = decide_promotion(_score(challenger.tags), champion, margin=margin,
                                    vendor_tolerance=vendor_tolerance, min_auc=min_auc)
    for key, value in decision.tags().items():
        client.set_model_version_tag(name, version, key, value)
    if decision.promote:
        client.set_registered_model_alias(name, CHAMPION, version)
    return decision


def promote(tracking_uri: str, name: str, version: str, reviewer: str = "reviewer") -> None:
    """A person's decision: make `version` the champion, and record who decided."""
    client = configure_mlflow(tracking_uri)
    client.get_model_version(name, version)  # raises with MLflow's message if it does not exist
    client.set_registered_model_alias(name, CHAMPION, version)
    client.set_model_version_tag(name, version, "promotion.decision", "promoted-by-reviewer")
    client.set_model_version_tag(name, version, "promotion.reviewer", reviewer)


def load_weights(tracking_uri: str, run_id: str, build: ModelBuilder) -> tuple[Any, dict[str, Any]]:
    """The model of training run `run_id` as an eval-mode ``torch.nn.Module``, with the raw config it
    was logged with: `build` turns that config (the ``weights/`` artifact's ``train_config.json``)
    into an untrained network, whose weights then come from ``weights/model.pt``.

    The registry does not know how networks are built; training passes its builder
    (:func:`dicomops.training.model.model_from_config`).
    """
    import json
    import tempfile

    import torch

    client = configure_mlflow(tracking_uri)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(client.download_artifacts(run_id, WEIGHTS_ARTIFACT, tmp))
        raw = json.loads((folder / "train_config.json").read_text())
        model = build(dict(raw))
        model.load_state_dict(torch.load(folder / "model.pt", weights_only=True))
    return model.eval(), raw
