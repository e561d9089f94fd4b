"""OpenVINO on CPU: the exported FP32 file agrees with ONNX Runtime at every batch size, the QDQ file's
arithmetic runs in integers, the export step checks and times both or refuses a broken INT8, and
serving opens the engines by name."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from dicomops.config import ExportConfig, PreprocessConfig, TrainConfig
from dicomops.errors import ExportCheckError
from dicomops.export import onnx_export, openvino_engine, quantize, stage
from dicomops.export.contract import InputContract
from dicomops.serving import engine as eng
from dicomops.training.model import build_model

pytest.importorskip("openvino")  # a dependency of dicomops: absent only where someone removed it

SIZE = 32
TRAIN = TrainConfig(input_size=SIZE)
CONTRACT = InputContract.from_configs(PreprocessConfig(), TRAIN, 0.42)


def _slabs(n: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).random((n, 3, SIZE, SIZE), dtype=np.float32)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """The default architecture (batch norm statistics moved off their initial values) as FP32 ONNX,
    its INT8 calibrated on slabs like the ones it scores, and an INT8 calibrated on zeros."""
    torch.manual_seed(0)
    model = build_model(TRAIN, 3).train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.rand(16, 3, SIZE, SIZE) * 2 + 0.5)
    folder = tmp_path_factory.mktemp("ov")
    fp32 = onnx_export.export_onnx(model.eval(), CONTRACT, folder / "model.onnx", opset=18)
    int8 = quantize.quantize_int8(fp32, folder / "model.int8.onnx", _slabs(64, seed=4))
    broken = quantize.quantize_int8(fp32, folder / "broken.int8.onnx", np.zeros((16, 3, SIZE, SIZE), np.float32))
    return fp32, int8, broken


def test_fp32_matches_onnx_runtime_at_batch_1_7_and_32(files: tuple[Path, Path, Path]) -> None:
    fp32, _, _ = files
    x = _slabs(45)
    reference = onnx_export.run_onnx(onnx_export.session(fp32), x)
    runner = openvino_engine.OpenVinoRunner(fp32)
    for batch in (1, 7, 32):
        got = openvino_engine.run_batches(runner, x, batch)
        # float32 throughout: bfloat16, OpenVINO's default on a CPU with AMX, differs by about 1e-2
        assert np.abs(got - reference).max() < 1e-5, batch
    assert openvino_engine.layers(runner.compiled).integer == 0


def test_int8_runs_every_convolution_in_integers_and_agrees_with_onnx_runtime(files: tuple[Path, Path, Path]) -> None:
    fp32, int8, _ = files
    runner = openvino_engine.OpenVinoRunner(int8)
    layers = openvino_engine.layers(runner.compiled)
    n_conv = sum(1 for m in build_model(TRAIN, 3).modules() if isinstance(m, torch.nn.Conv2d))
    convolutions = sum(n for key, n in layers.precisions.items() if key.startswith(("Convolution", "GroupConvolution")))
    assert convolutions == n_conv and layers.integer == layers.arithmetic, layers.describe()
    x = _slabs(64, seed=3)
    ort8 = onnx_export.run_onnx(onnx_export.session(int8), x)[:, 1]
    ov8 = openvino_engine.run_batches(runner, x)[:, 1]
    ov32 = openvino_engine.run_batches(openvino_engine.OpenVinoRunner(fp32), x)[:, 1]
    # The same integer graph, rounded by other kernels (ONNX Runtime also quantises the softmax's output
    # to 1/256 steps): within a dozen steps of ONNX Runtime's INT8, and ranking slabs as FP32 does.
    assert np.abs(ov8 - ort8).max() < 0.05
    assert np.corrcoef(ov8, ov32)[0, 1] > 0.95


def test_concurrent_calls_each_get_their_own_answer(files: tuple[Path, Path, Path]) -> None:
    fp32, _, _ = files
    runner = openvino_engine.OpenVinoRunner(fp32)
    inputs = [_slabs(5, seed=s) for s in range(8)]
    expected = [runner(x).copy() for x in inputs]
    got: dict[int, np.ndarray] = {}

    def call(i: int) -> None:
        for _ in range(5):
            got[i] = runner(inputs[i])

    threads = [threading.Thread(target=call, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(8):
        np.testing.assert_array_equal(got[i], expected[i])


def _check_set(fp32: Path) -> tuple[np.ndarray, np.ndarray, quantize.Int8Check]:
    x = _slabs(200, seed=3)
    p32 = onnx_export.run_onnx(onnx_export.session(fp32), x)[:, 1]
    y = (p32 > np.median(p32)).astype(int)  # labels the FP32 model ranks perfectly: AUC 1.0
    return x, y, quantize.Int8Check(1.0, 1.0, 0.0, len(y), 0.01)


def test_the_export_step_checks_times_and_names_what_ran(files: tuple[Path, Path, Path], tmp_path: Path) -> None:
    fp32, int8, _ = files
    x, y, check = _check_set(fp32)
    report = stage.ExportReport("1", str(tmp_path))
    cfg = ExportConfig(max_batch=8, preferred_batch_sizes=(8,), int8_max_auc_drop=0.05)
    text, refusal = stage._openvino(CONTRACT, cfg, fp32, int8, _slabs(16), (x, y), check, 2, report)
    assert text.startswith("built fp32, int8 (OpenVINO ") and "Convolution u8" in text and refusal is None
    m = report.metrics
    assert m["export.ov_fp32.parity_max_abs_diff"] < 1e-5
    assert m["export.ov_int8.auc_drop"] == pytest.approx(1.0 - m["export.ov_int8.auc_int8"])
    assert m["export.ov_int8.integer_layers"] == m["export.ov_int8.arithmetic_layers"] > 0
    for key in ("ov_fp32.throughput_b8", "ov_int8.throughput_b8", "ov_int8.speedup_b8",
                "ov_int8.speedup_vs_ort_fp32_b8", "ov_fp32.speedup_vs_ort_fp32_b8", "ov_int8.latency_ms_b1"):
        assert m[f"export.{key}"] > 0, key


def test_an_int8_that_loses_accuracy_in_openvino_is_refused_and_the_export_stands(
        files: tuple[Path, Path, Path], tmp_path: Path) -> None:
    """The INT8 file passed on ONNX Runtime; what lost accuracy is OpenVINO's arithmetic, so its INT8
    engine refuses the version (as for its series check) while FP32 and ONNX Runtime still serve it."""
    fp32, int8, broken = files
    x, y, check = _check_set(fp32)
    report, cfg = stage.ExportReport("1", str(tmp_path)), ExportConfig(max_batch=8, preferred_batch_sizes=(8,))
    text, refusal = stage._openvino(CONTRACT, cfg, fp32, broken, _slabs(16), (x, y), check, 2, report)
    assert text.startswith("built fp32, int8 (OpenVINO ") and text.endswith("; INT8 refused: it lost validation AUC)")
    m = report.metrics
    assert refusal is not None and refusal.startswith("failed: validation slab AUC 1.0000 -> ")
    assert f"a drop of {m['export.ov_int8.auc_drop']:.4f} over the allowed 0.01" in refusal
    assert m["export.ov_int8.auc_drop"] > 0.01 and m["export.ov_int8.throughput_b8"] > 0  # still timed
    tags = {quantize.SERIES_CHECK_TAG: "passed: series AUC 1.0000 -> 1.0000", quantize.OV_SERIES_CHECK_TAG: refusal}
    assert quantize.int8_refusal(tags, "ov-int8") == refusal and quantize.int8_refusal(tags, "ort-int8") is None
    # A good INT8 file passes with no verdict to add.
    assert stage._openvino(CONTRACT, cfg, fp32, int8, _slabs(16), (x, y), check, 2,
                           stage.ExportReport("1", str(tmp_path)))[1] is None


def test_openvino_fp32_that_disagrees_with_onnx_runtime_fails_the_export(
        files: tuple[Path, Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fp32, int8, _ = files
    x, y, check = _check_set(fp32)
    real = openvino_engine.run_batches
    monkeypatch.setattr(openvino_engine, "run_batches", lambda runner, x, batch_size=32: real(runner, x) + 0.1)
    with pytest.raises(ExportCheckError, match=r"OpenVINO FP32 parity failed: .*export.openvino: false"):
        stage._openvino(CONTRACT, ExportConfig(), fp32, int8, _slabs(16), (x, y), check, 2,
                        stage.ExportReport("1", str(tmp_path)))


def test_without_openvino_the_export_says_why_and_serving_refuses_the_engine(
        files: tuple[Path, Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fp32, int8, _ = files
    monkeypatch.setattr(openvino_engine, "availability", lambda: "openvino not installed; pip install -e .")
    x, y, check = _check_set(fp32)
    report = stage.ExportReport("1", str(tmp_path))
    text, refusal = stage._openvino(CONTRACT, ExportConfig(), fp32, int8, _slabs(4), (x, y), check, 2, report)
    assert text == "skipped (openvino not installed; pip install -e .)" and refusal is None and not report.metrics
    with pytest.raises(ValueError, match="OpenVINO was asked for and cannot run here: openvino not installed"):
        eng.choose("ov-int8", {"model.onnx", "model.int8.onnx"})


def test_serving_opens_the_openvino_engines_on_the_exported_files(files: tuple[Path, Path, Path],
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    fp32, int8, _ = files
    monkeypatch.setattr(eng.tensorrt_engine, "availability", lambda: "no CUDA device")
    assert eng.choose("auto", {"model.onnx", "model.int8.onnx"}).kind == "ort-fp32"  # never chosen unasked
    x = _slabs(40, seed=5)
    for kind, path in (("ov-fp32", fp32), ("ov-int8", int8)):
        choice = eng.choose(kind, {"model.onnx", "model.int8.onnx"})  # type: ignore[arg-type]
        assert (choice.kind, choice.file) == (kind, path.name)
        served = eng.open_engine(path.parent, choice, CONTRACT, threads=2, max_batch=16)
        assert isinstance(served.runner, openvino_engine.OpenVinoRunner)
        reference = onnx_export.run_onnx(onnx_export.session(path), x)[:, 1]
        assert np.abs(served.probabilities(x) - reference).max() < (1e-5 if kind == "ov-fp32" else 0.05)


def test_the_alternated_speedup_is_the_ratio_of_the_two_engines_times(monkeypatch: pytest.MonkeyPatch) -> None:
    import time

    rests: list[float] = []
    real_sleep = time.sleep
    monkeypatch.setattr(quantize.time, "sleep", lambda s: (rests.append(s), real_sleep(s)))
    ratio = quantize.alternated_speedup(lambda x: real_sleep(0.02), lambda x: real_sleep(0.005), (1, 2, 2), 4,
                                        rounds=3, runs=2)
    assert 2.0 < ratio < 6.0  # 4x, give or take a busy scheduler's few milliseconds
    assert rests == [quantize.IDLE_PAUSE_S] * 6  # a rest before every timed block, for spinning threads to park


def test_the_runner_meets_every_batch_size_it_will_be_given_before_it_serves(files: tuple[Path, Path, Path]) -> None:
    fp32, _, _ = files
    seen: list[int] = []

    class Counting(openvino_engine.OpenVinoRunner):
        def __call__(self, x: np.ndarray) -> np.ndarray:
            seen.append(len(x))
            return super().__call__(x)

    runner = Counting(fp32, max_batch=6)
    assert seen == [1, 2, 3, 4, 5, 6]  # OpenVINO prepares each input shape on its first call: not on a patient's
    assert runner(_slabs(4)).shape == (4, 2)


def test_a_signal_after_models_were_freed_out_of_order_reaches_its_handler(files: tuple[Path, Path, Path]) -> None:
    """OpenVINO gives the thread that makes a model a signal stack of its own and puts back the one it
    found when the model is freed; freed out of order, the thread was left on a freed stack and
    SIGTERM was a segmentation fault (in a child process here, so that a regression cannot take the
    test run down with it)."""
    import subprocess
    import sys
    import textwrap

    fp32, int8, _ = files
    script = textwrap.dedent(f"""
        import faulthandler, gc, os, signal, time
        faulthandler.enable()  # as pytest and Prefect's workers run: Python's own signal stack first
        import numpy as np
        from dicomops.export.openvino_engine import OpenVinoRunner
        first = OpenVinoRunner({str(fp32)!r}, max_batch=2)
        second = OpenVinoRunner({str(int8)!r}, max_batch=2)
        first(np.zeros((1, 3, {SIZE}, {SIZE}), np.float32))
        del first  # freed before the model made after it, which then puts back the first one's stack
        del second
        gc.collect()
        def stop(signum, frame):
            raise KeyboardInterrupt("SIGTERM")
        signal.signal(signal.SIGTERM, stop)
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
        except KeyboardInterrupt:
            print("handled")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "handled", (done.returncode, done.stderr[-2000:])
