"""A Triton Inference Server model repository for the exported model.

Layout: ``<repo>/<name>/<version>/model.onnx`` (platform ``onnxruntime_onnx``) and, where an engine
was built, ``<repo>/<name>-trt/<version>/model.plan`` (``tensorrt_plan``), each with a
``config.pbtxt`` whose input and output names, types and per-sample dims are those of the export.
The version directory is the MLflow model version, so Triton's default policy (serve the latest)
follows the registry.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Literal

from dicomops import io
from dicomops.export.contract import METADATA_KEY, InputContract

Platform = Literal["onnxruntime_onnx", "tensorrt_plan"]
FILE_NAME = {"onnxruntime_onnx": "model.onnx", "tensorrt_plan": "model.plan"}


def config_pbtxt(name: str, platform: Platform, contract: InputContract, max_batch: int,
                 preferred: tuple[int, ...], max_queue_delay_us: int) -> str:
    """Triton's model configuration in protobuf text format."""
    dims = ", ".join(str(d) for d in contract.input_shape)
    kind = "KIND_GPU" if platform == "tensorrt_plan" else "KIND_CPU"
    preferred_line = f"  preferred_batch_size: [ {', '.join(map(str, preferred))} ]\n" if preferred else ""
    return (
        f'name: "{name}"\n'
        f'platform: "{platform}"\n'
        f"max_batch_size: {max_batch}\n"
        "input [\n"
        "  {\n"
        f'    name: "{contract.input_name}"\n'
        "    data_type: TYPE_FP32\n"
        f"    dims: [ {dims} ]\n"
        "  }\n"
        "]\n"
        "output [\n"
        "  {\n"
        f'    name: "{contract.output_name}"\n'
        "    data_type: TYPE_FP32\n"
        "    dims: [ 2 ]\n"
        "  }\n"
        "]\n"
        "dynamic_batching {\n"
        f"{preferred_line}"
        f"  max_queue_delay_microseconds: {max_queue_delay_us}\n"
        "}\n"
        f"instance_group [ {{ count: 1, kind: {kind} }} ]\n"
        "parameters {\n"
        f'  key: "{METADATA_KEY}"\n'
        f"  value: {{ string_value: {json.dumps(contract.to_json())} }}\n"
        "}\n"
    )


def write_model(repo: Path, name: str, version: str, platform: Platform, model_file: Path,
                contract: InputContract, max_batch: int, preferred: tuple[int, ...],
                max_queue_delay_us: int) -> Path:
    """Write one model (file + config.pbtxt) into the repository; return its folder."""
    folder = Path(repo) / name
    target = folder / str(int(version)) / FILE_NAME[platform]
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".tmp")
    shutil.copyfile(model_file, tmp)
    tmp.replace(target)
    io.write_text(folder / "config.pbtxt",
                  config_pbtxt(name, platform, contract, max_batch, preferred, max_queue_delay_us))
    return folder
