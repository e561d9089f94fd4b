"""Model registry: log and register the final model, describe the version, aliases, promotion."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from dicomops.tracking.promotion import Decision, ModelScore, decide_promotion
from dicomops.tracking.runs import configure_mlflow

CHALLENGER, CHAMPION = "challenger", "champion"


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


def apply_promotion_gate(tracking_uri: str, name: str, version: str, *, margin: float,
                         vendor_tolerance: float, min_auc: float) -> Decision:
    """Compare the challenger with the champion; promote automatically or leave it for review."""
    client = configure_mlflow(tracking_uri)
    challenger = client.get_model_version(name, version)
    champion = None
    try:
        current = client.get_model_version_by_alias(name, CHAMPION)
        if current.version != version:
            champion = _score(current.tags)
    except Exception:
        champion = None
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


def load_state_dict(path: Path) -> dict[str, Any]:
    import torch

    state: dict[str, Any] = torch.load(path, weights_only=True)
    return state


def load_weights(tracking_uri: str, run_id: str) -> tuple[Any, Any, int]:
    """The final model of training run `run_id` as an eval-mode ``torch.nn.Module``, rebuilt from the
    ``weights/`` artifacts; with the ``TrainConfig`` that built it and its number of input channels."""
    import json
    import tempfile

    from dicomops.config import TrainConfig
    from dicomops.training.model import build_model

    client = configure_mlflow(tracking_uri)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(client.download_artifacts(run_id, "weights", tmp))
        raw = json.loads((folder / "train_config.json").read_text())
        in_channels = int(raw.pop("in_channels"))
        cfg = TrainConfig.model_validate(raw)
        model = build_model(cfg, in_channels)
        model.load_state_dict(load_state_dict(folder / "model.pt"))
    return model.eval(), cfg, in_channels
