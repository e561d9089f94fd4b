"""The exported engine a served model runs on, and why that one.

Serving runs the files ``dicomops export`` attached to the version's training run (``export/``),
checked against the sha256 the version carries, never the training weights: what was checked for
parity at export is what scores patients. The choice:

- ``tensorrt``: the FP16 plan, when the ``tensorrt`` extra and a CUDA device are here and the
  export built one;
- ``ort-fp32``: ONNX Runtime on CPU, the default otherwise (bit-for-bit the model the export
  checked against torch);
- ``ort-int8``: the QDQ model, on request (faster on CPU, within the INT8 AUC drop the export
  measured), and only where the export's series check passed (``export.int8.series_check``:
  :func:`dicomops.serving.champion.load_champion` refuses both INT8 engines otherwise).
- ``ov-fp32``, ``ov-int8``: the same two files compiled by OpenVINO's CPU plugin, on request
  (:mod:`dicomops.export.openvino_engine`: the export checked them against ONNX Runtime; on the
  AMX Xeon OpenVINO's INT8 is the fastest CPU engine, README *Lightweight models*).

The choice and its reason travel with every result (the MLflow run, the result table, the SR's
algorithm version), so a figure always says which engine produced it.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from dicomops.export import onnx_export, openvino_engine, tensorrt_engine
from dicomops.export.contract import InputContract

log = logging.getLogger(__name__)

EngineKind = Literal["auto", "ort-fp32", "ort-int8", "ov-fp32", "ov-int8", "tensorrt"]
ENGINE_FILES = {"ort-fp32": "model.onnx", "ort-int8": "model.int8.onnx", "ov-fp32": "model.onnx",
                "ov-int8": "model.int8.onnx", "tensorrt": "model.fp16.plan"}
SHA_TAGS = {"ort-fp32": "export.onnx.sha256", "ort-int8": "export.int8.sha256"}
CPU_ENGINES = ("ort-fp32", "ort-int8", "ov-fp32", "ov-int8")


@dataclass(frozen=True)
class EngineChoice:
    kind: str
    reason: str
    file: str


def choose(requested: EngineKind, export_files: set[str]) -> EngineChoice:
    """The engine for `requested` given the exported files; 'auto' prefers TensorRT where it can run."""
    if requested in ("ov-fp32", "ov-int8") and (why := openvino_engine.availability()) is not None:
        raise ValueError(f"OpenVINO was asked for and cannot run here: {why}")
    if requested in CPU_ENGINES:
        return EngineChoice(requested, "requested", ENGINE_FILES[requested])
    why_not = tensorrt_engine.availability()
    if why_not is None and ENGINE_FILES["tensorrt"] not in export_files:
        why_not = "the export built no TensorRT plan (exported where no GPU was); re-export on this machine"
    if why_not is None:
        return EngineChoice("tensorrt", "CUDA device and TensorRT present", ENGINE_FILES["tensorrt"])
    if requested == "tensorrt":
        raise ValueError(f"TensorRT was asked for and cannot run here: {why_not}")
    return EngineChoice("ort-fp32", f"ONNX Runtime FP32 on CPU; TensorRT not used: {why_not}", ENGINE_FILES["ort-fp32"])


class OnnxEngine:
    """An ONNX Runtime session; thread-safe (ONNX Runtime's ``run`` is)."""

    def __init__(self, path: Path, threads: int = 2) -> None:
        self.session = onnx_export.session(path, threads)
        self.input = self.session.get_inputs()[0].name

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(self.session.run(None, {self.input: x})[0])


class TensorRTEngine:
    """The TensorRT plan (pinned host buffers, asynchronous copies on its own stream: see
    :class:`dicomops.export.tensorrt_engine.Engine`); one execution context, so calls are serialised."""

    def __init__(self, path: Path, contract: InputContract) -> None:
        self.engine = tensorrt_engine.Engine(path, contract)
        self.lock = threading.Lock()

    def __call__(self, x: np.ndarray) -> np.ndarray:
        with self.lock:
            return self.engine(x)


@dataclass
class Engine:
    """A callable over slabs (N, C, H, W) float32 → P(nodule) (N,), in chunks of `max_batch`."""

    choice: EngineChoice
    contract: InputContract
    runner: Any
    max_batch: int = 32

    def check(self, slabs: np.ndarray) -> np.ndarray:
        """`slabs` as contiguous float32, or a ValueError that says what the model takes."""
        x = np.ascontiguousarray(slabs, dtype=np.float32)
        expected = self.contract.input_shape
        if x.ndim != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"slabs of shape {tuple(x.shape)} do not match the model's input (N, "
                             f"{', '.join(map(str, expected))}) float32; see the model's input contract")
        if not np.isfinite(x).all():
            raise ValueError("slabs contain NaN or infinite values")
        return x

    def probabilities(self, slabs: np.ndarray) -> np.ndarray:
        x = self.check(slabs)
        out = [self.runner(x[i:i + self.max_batch])[:, 1] for i in range(0, len(x), self.max_batch)]
        return np.concatenate(out).astype(np.float64) if out else np.zeros(0)


def open_engine(folder: Path, choice: EngineChoice, contract: InputContract, threads: int = 2,
                max_batch: int = 32) -> Engine:
    path = Path(folder) / choice.file
    runner: Any
    if choice.kind == "tensorrt":
        runner = TensorRTEngine(path, contract)
    elif choice.kind.startswith("ov-"):
        runner = openvino_engine.OpenVinoRunner(path, threads, max_batch)
    else:
        runner = OnnxEngine(path, threads)
    log.info("serving engine: %s (%s)", choice.kind, choice.reason)
    return Engine(choice, contract, runner, max_batch)
