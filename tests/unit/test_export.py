"""Export: ONNX parity that catches wrong exports, dynamic batch, INT8 accuracy check, Triton
configuration checked with Triton's own protobuf schema, the TensorRT skip path; GPU tests marked."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from google.protobuf import text_format

from dicomops.config import ExportConfig, PreprocessConfig, TrainConfig
from dicomops.errors import ExportCheckError
from dicomops.export import onnx_export, quantize, tensorrt_engine, triton
from dicomops.export.contract import METADATA_KEY, InputContract
from dicomops.export.onnx_export import ProbabilityHead
from dicomops.training.model import build_model

SIZE = 32
TRAIN = TrainConfig(input_size=SIZE)
CONTRACT = InputContract.from_configs(PreprocessConfig(), TRAIN, 0.42)


def _model(seed: int = 0) -> torch.nn.Module:
    """The default architecture with BatchNorm statistics moved away from their initial values."""
    torch.manual_seed(seed)
    model = build_model(TRAIN, 3)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.rand(16, 3, SIZE, SIZE) * 2 + 0.5)
    return model.eval()


def _slabs(n: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).random((n, 3, SIZE, SIZE), dtype=np.float32)


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, Path]:
    model = _model()
    path = onnx_export.export_onnx(model, CONTRACT, tmp_path_factory.mktemp("onnx") / "model.onnx", opset=18)
    return model, path


def test_export_matches_torch_and_carries_its_contract(exported: tuple[torch.nn.Module, Path]) -> None:
    model, path = exported
    parity = onnx_export.check_parity(model, path, _slabs(64), 1e-4)
    assert parity.ok and parity.max_abs_diff < 1e-5
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    assert proto.opset_import[0].version == 18
    assert onnx_export.read_contract(path) == CONTRACT
    assert proto.graph.input[0].name == "slab" and proto.graph.output[0].name == "probability"
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # symbolic batch axis
    probs = onnx_export.run_onnx(onnx_export.session(path), _slabs(5))
    assert np.allclose(probs.sum(axis=1), 1.0, atol=1e-5)  # softmax is part of the graph


def test_parity_fails_for_a_model_exported_in_train_mode(exported: tuple[torch.nn.Module, Path],
                                                         tmp_path: Path) -> None:
    model, _ = exported
    wrong = tmp_path / "train-mode.onnx"
    # The TorchScript exporter honours TrainingMode.TRAINING: BatchNorm then normalises with the
    # statistics of whatever batch arrives, the classic silent export bug.
    torch.onnx.export(ProbabilityHead(model).train(), (torch.zeros(2, 3, SIZE, SIZE),), str(wrong), dynamo=False,
                      training=torch.onnx.TrainingMode.TRAINING, input_names=["slab"], output_names=["probability"],
                      dynamic_axes={"slab": {0: "batch"}})
    model.eval()
    with pytest.raises(ExportCheckError, match="parity failed"):
        onnx_export.check_parity(model, wrong, _slabs(32), 1e-4)


def test_parity_fails_for_a_wrong_input_layout(exported: tuple[torch.nn.Module, Path], tmp_path: Path) -> None:
    model, _ = exported

    class Transposed(torch.nn.Module):  # reads H and W swapped: a layout bug inside the graph
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.model(x.transpose(2, 3))

    wrong = onnx_export.export_onnx(Transposed(), CONTRACT, tmp_path / "t.onnx", opset=18)
    x = _slabs(32)
    x[:, :, : SIZE // 2] *= 0.2  # an image that is not symmetric under transposition
    with pytest.raises(ExportCheckError):
        onnx_export.check_parity(model, wrong, x, 1e-4)
    # A consumer feeding channels-last slabs is refused with the contract's shape, not silently scored.
    with pytest.raises(ValueError, match=r"float32 \(batch, 3, 32, 32\)"):
        onnx_export.run_onnx(onnx_export.session(exported[1]), np.moveaxis(_slabs(4), 1, -1).copy())


def test_dynamic_batch_sizes_give_identical_per_sample_outputs(exported: tuple[torch.nn.Module, Path]) -> None:
    _, path = exported
    sess = onnx_export.session(path)
    x = _slabs(32)
    one_by_one = onnx_export.run_onnx(sess, x, batch_size=1)
    for size in (7, 32):
        assert np.abs(onnx_export.run_onnx(sess, x, batch_size=size) - one_by_one).max() < 1e-6


def test_int8_is_accurate_and_a_broken_calibration_is_caught(exported: tuple[torch.nn.Module, Path],
                                                            tmp_path: Path) -> None:
    _, path = exported
    x = _slabs(200, seed=3)
    p32 = onnx_export.run_onnx(onnx_export.session(path), x)[:, 1]
    y = (p32 > np.median(p32)).astype(int)  # labels the FP32 model ranks perfectly: AUC 1.0
    int8 = quantize.quantize_int8(path, tmp_path / "int8.onnx", _slabs(64, seed=4))
    proto = onnx.load(str(int8))
    assert any(n.op_type == "QuantizeLinear" for n in proto.graph.node)  # QDQ format
    assert onnx_export.read_contract(int8) == CONTRACT
    check = quantize.check_int8(path, int8, x, y, tolerance=0.05)
    assert check.auc_fp32 == 1.0 and check.auc_drop <= 0.05

    broken = quantize.quantize_int8(path, tmp_path / "broken.onnx", np.zeros((16, 3, SIZE, SIZE), np.float32))
    with pytest.raises(ExportCheckError, match="INT8 loses"):
        quantize.check_int8(path, broken, x, y, tolerance=0.01)


def _triton_model_config_schema():  # type: ignore[no-untyped-def]
    """Triton's own ModelConfig protobuf, as shipped in tritonclient. Loaded from its file so that
    the gRPC client (grpcio and a protobuf pin below ours) is not needed just to parse configs."""
    import importlib.util

    tritonclient = pytest.importorskip("tritonclient")
    spec = importlib.util.spec_from_file_location(
        "triton_model_config_pb2", Path(tritonclient.__file__).parent / "grpc" / "model_config_pb2.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_triton_config_matches_the_onnx_model(exported: tuple[torch.nn.Module, Path], tmp_path: Path) -> None:
    model_config_pb2 = _triton_model_config_schema()
    _, path = exported
    cfg = ExportConfig()
    folder = triton.write_model(tmp_path / "repo", "dicomops-ct-classifier", "3", "onnxruntime_onnx", path, CONTRACT,
                                cfg.max_batch, cfg.preferred_batch_sizes, cfg.max_queue_delay_us)
    assert (folder / "3" / "model.onnx").read_bytes() == path.read_bytes()
    config = text_format.Parse((folder / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert config.name == folder.name and config.platform == "onnxruntime_onnx"
    assert config.max_batch_size == 32
    assert list(config.dynamic_batching.preferred_batch_size) == [8, 16, 32]
    graph = onnx.load(str(path)).graph
    for spec, value in ((config.input[0], graph.input[0]), (config.output[0], graph.output[0])):
        dims = [d.dim_value for d in value.type.tensor_type.shape.dim]
        assert spec.name == value.name
        assert list(spec.dims) == dims[1:]  # Triton dims exclude the batch axis
        assert spec.data_type == model_config_pb2.TYPE_FP32
    assert InputContract.from_mapping(config.parameters[METADATA_KEY].string_value) == CONTRACT


def test_export_config_rejects_preferred_batches_above_the_maximum() -> None:
    with pytest.raises(ValueError, match="exceed max_batch"):
        ExportConfig(max_batch=16, preferred_batch_sizes=(8, 32))


def test_tensorrt_skip_path_says_why(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from dicomops.export import stage

    reason = tensorrt_engine.availability()
    if reason is None:
        pytest.skip("TensorRT and a CUDA device are present here; the gpu tests cover the build")
    import importlib.util

    missing = importlib.util.find_spec("tensorrt") is None
    assert reason == ("tensorrt not installed; pip install -e '.[tensorrt]'" if missing else "no CUDA device")
    report = stage.ExportReport("1", str(tmp_path))
    ref = stage.ModelRef("m", "1", "run", CONTRACT)
    text = stage._tensorrt(tmp_path, ref, ExportConfig(), tmp_path / "a.onnx", _slabs(2), _slabs(2), report)
    assert text == f"skipped ({reason})"
    assert not list(tmp_path.glob("*.plan"))


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_tensorrt_engine_matches_onnx_runtime(exported: tuple[torch.nn.Module, Path], tmp_path: Path,
                                              precision: str) -> None:
    reason = tensorrt_engine.availability()
    if reason is not None:
        pytest.skip(reason)
    _, path = exported
    source = tensorrt_engine.engine_input(precision, path, _slabs(64, seed=4), tmp_path)  # type: ignore[arg-type]
    plan = tensorrt_engine.build_engine(source, tmp_path / f"model.{precision}.plan", CONTRACT, max_batch=32)
    engine = tensorrt_engine.Engine(plan, CONTRACT)
    x = _slabs(45)
    reference = onnx_export.run_onnx(onnx_export.session(path if precision == "fp16" else source), x)
    for batch in (1, 7, 32):
        got = tensorrt_engine.run_batches(engine, x, batch)
        assert np.abs(got - reference).max() < 2e-2
    timing = tensorrt_engine.time_engine(engine, precision, 32, repeats=10)
    assert timing.latency_ms_b1 > 0 and timing.throughput_b > 0
