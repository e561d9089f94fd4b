"""A segmenter whose answer is known exactly: a one-node-pair ONNX graph (logit = GAIN x (image -
LEVEL), so a voxel is "nodule" where it is denser than LEVEL of the window), run by ONNX Runtime,
and registered like a trained one (its run holds ``weights/segment_config.json``,
``weights/preprocess_config.json`` and ``export/segmenter.onnx``; the version carries the ONNX's
sha256 and holds the champion alias). The real training path to the registry is tested in
``tests/flows/test_segment_flow.py``; serving tests need a localiser whose output they can check."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import onnx
from onnx import TensorProto, helper

from dicomops.config import PreprocessConfig, SegmentConfig
from dicomops.export.onnx_export import sha256

LEVEL, GAIN = 0.7, 20.0  # p > 0.5 exactly where image > LEVEL (the lung window's 0.7 is -300 HU)


def density_graph(path: Path) -> Path:
    """image (N, 1, I, J, K) -> logits = GAIN * (image - LEVEL), every axis dynamic but the channel."""
    dims = ["n", 1, "i", "j", "k"]
    graph = helper.make_graph(
        [helper.make_node("Sub", ["image", "level"], ["centred"]),
         helper.make_node("Mul", ["centred", "gain"], ["logits"])],
        "density", [helper.make_tensor_value_info("image", TensorProto.FLOAT, dims)],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, dims)],
        [helper.make_tensor("level", TensorProto.FLOAT, [], [LEVEL]),
         helper.make_tensor("gain", TensorProto.FLOAT, [], [GAIN])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def register_density_segmenter(tracking_uri: str, name: str, preprocess: PreprocessConfig,
                               experiment: str = "segmenter-fixture") -> str:
    """Register the density graph as a version of `name` holding the champion alias; its number."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    # Its artifacts beside the store's database, not in ./mlruns of whatever folder the tests run in.
    artifacts = (Path(tracking_uri.removeprefix("sqlite:///")).parent / "artifacts").as_uri() \
        if tracking_uri.startswith("sqlite:///") else None
    experiment_id = found.experiment_id if found else client.create_experiment(experiment, artifacts)
    run = client.create_run(experiment_id, run_name=f"{name}-fixture")
    cfg = SegmentConfig(channels=(4, 8), strides=(2,), patch=(16, 16, 16), roi=(16, 16, 16), model_name=name)
    with tempfile.TemporaryDirectory() as tmp:
        weights, export = Path(tmp) / "weights", Path(tmp) / "export"
        weights.mkdir()
        export.mkdir()
        (weights / "segment_config.json").write_text(json.dumps(cfg.model_dump(mode="json")))
        (weights / "preprocess_config.json").write_text(json.dumps(preprocess.model_dump(mode="json")))
        onnx_path = density_graph(export / "segmenter.onnx")
        client.log_artifacts(run.info.run_id, str(weights), "weights")
        client.log_artifacts(run.info.run_id, str(export), "export")
        digest = sha256(onnx_path)
    client.set_terminated(run.info.run_id)
    if not client.search_registered_models(f"name = '{name}'"):
        client.create_registered_model(name)
    mv = client.create_model_version(name, f"runs:/{run.info.run_id}/weights", run.info.run_id,
                                     tags={"export.onnx.sha256": digest})
    client.set_registered_model_alias(name, "champion", str(mv.version))
    return str(mv.version)
