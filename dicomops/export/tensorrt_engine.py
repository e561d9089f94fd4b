"""TensorRT engines from the ONNX exports, typed against TensorRT 10.x and 11.x.

TensorRT 11 removed the weak-typing builder flags (``BuilderFlag.FP16``/``INT8``): precision comes
from the network itself. So FP16 is built from an FP16 copy of the ONNX (inputs and outputs kept
FP32), and INT8 from the QDQ model (explicit quantisation). Both are strongly typed networks, which
TensorRT 10.x also supports. Buffers live in torch CUDA tensors, so no pycuda is needed.

Nothing here runs without the ``tensorrt`` extra and a CUDA device; :func:`availability` says which
is missing, and the export stage records that reason on the model version.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from dicomops.export.contract import InputContract

log = logging.getLogger(__name__)
Precision = Literal["fp16", "int8"]


def availability() -> str | None:
    """None when engines can be built here, else the exact reason they cannot."""
    if importlib.util.find_spec("tensorrt") is None:
        return "tensorrt not installed; pip install -e '.[tensorrt]'"
    import torch

    if not torch.cuda.is_available():
        return "no CUDA device"
    return None


def fp16_onnx(fp32: Path, out: Path) -> Path:
    """An FP16 copy of `fp32` with FP32 inputs and outputs, for a strongly typed FP16 engine."""
    import onnx
    from onnxconverter_common import float16

    model = float16.convert_float_to_float16(onnx.load(str(fp32)), keep_io_types=True)
    onnx.save(model, str(out))
    return out


def build_engine(onnx_path: Path, plan: Path, contract: InputContract, max_batch: int,
                 workspace_mb: int = 1024) -> Path:
    """Build a serialized engine (a Triton ``model.plan``) with a batch profile 1..`max_batch`."""
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    strongly_typed = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)  # implicit in 11.x
    flags = 0 if strongly_typed is None else 1 << int(strongly_typed)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(Path(onnx_path).read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mb << 20)
    profile = builder.create_optimization_profile()
    shape = contract.input_shape
    opt = max(1, max_batch // 2)
    profile.set_shape(contract.input_name, (1, *shape), (opt, *shape), (max_batch, *shape))
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path}; see its log above")
    tmp = Path(plan).with_name(Path(plan).name + ".tmp")
    tmp.write_bytes(bytes(serialized))
    os.replace(tmp, plan)
    return Path(plan)


class Engine:
    """A deserialized engine with one execution context; inputs and outputs as torch CUDA tensors."""

    def __init__(self, plan: Path, contract: InputContract) -> None:
        import tensorrt as trt
        import torch

        self._torch = torch
        self.contract = contract
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self.runtime.deserialize_cuda_engine(Path(plan).read_bytes())
        if self.engine is None:
            raise RuntimeError(f"could not deserialize {plan}: built by another TensorRT version or GPU?")
        self.context = self.engine.create_execution_context()
        self.stream = torch.cuda.Stream()

    def __call__(self, x: np.ndarray) -> np.ndarray:
        # Pinned host buffers and non-blocking copies on the engine's stream: the copy in, the
        # engine and the copy out are queued together, and the host waits once.
        torch = self._torch
        host = torch.from_numpy(np.ascontiguousarray(x, np.float32)).pin_memory()
        result = torch.empty((len(x), 2), dtype=torch.float32).pin_memory()
        with torch.cuda.stream(self.stream):
            inp = host.to("cuda", non_blocking=True)
            out = torch.empty((len(x), 2), dtype=torch.float32, device="cuda")
            self.context.set_input_shape(self.contract.input_name, tuple(inp.shape))
            self.context.set_tensor_address(self.contract.input_name, inp.data_ptr())
            self.context.set_tensor_address(self.contract.output_name, out.data_ptr())
            if not self.context.execute_async_v3(self.stream.cuda_stream):
                raise RuntimeError("TensorRT execution failed")
            result.copy_(out, non_blocking=True)
        self.stream.synchronize()
        return result.numpy()


@dataclass(frozen=True)
class EngineTiming:
    precision: str
    latency_ms_b1: float
    throughput_b: float  # samples per second at max batch
    batch: int


def time_engine(engine: Engine, precision: str, batch: int, repeats: int = 50) -> EngineTiming:
    shape = engine.contract.input_shape
    one = np.random.default_rng(0).random((1, *shape), dtype=np.float32)
    many = np.random.default_rng(1).random((batch, *shape), dtype=np.float32)
    for _ in range(5):
        engine(one), engine(many)
    start = time.perf_counter()
    for _ in range(repeats):
        engine(one)
    latency = (time.perf_counter() - start) / repeats * 1e3
    start = time.perf_counter()
    for _ in range(repeats):
        engine(many)
    throughput = batch * repeats / (time.perf_counter() - start)
    return EngineTiming(precision, latency, throughput, batch)


def run_batches(engine: Engine, x: np.ndarray, batch: int) -> np.ndarray:
    return np.concatenate([engine(x[i:i + batch]) for i in range(0, len(x), batch)])


def engine_input(precision: Precision, fp32: Path, calibration: np.ndarray, scratch: Path) -> Path:
    """The ONNX file an engine of `precision` is built from: an FP16 copy, or a symmetric QDQ model."""
    if precision == "fp16":
        return fp16_onnx(fp32, scratch / "model.fp16.onnx")
    from dicomops.export.quantize import quantize_int8

    return quantize_int8(fp32, scratch / "model.int8-trt.onnx", calibration, for_tensorrt=True)

