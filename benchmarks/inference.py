"""Inference speed of the exported model, side by side, each engine timed in its own process.

Reproduce: ``.venv/bin/python benchmarks/inference.py`` (``--threads 2 --model-dir DIR``).

Engines: torch eager (the trained MONAI network), ONNX Runtime FP32 and ONNX Runtime INT8 (QDQ),
all on CPU with the same fixed thread count; TensorRT FP16 and INT8 too where the ``tensorrt``
extra and a CUDA device are present. For each: batch-1 latency (median of many calls) and
batch-32 throughput. Each engine runs in a fresh subprocess: timed in one process, torch eager was
seen to run several times slower than on its own, which would flatter the ratios.

Without ``--model-dir`` the default architecture is built with fixed random weights and exported
(ONNX + INT8 calibrated on random slabs): speed does not depend on the weights. Pass the folder of
a ``dicomops export`` (``work/export/vN``) to time a trained model.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ENGINES = ("torch", "ort_fp32", "ort_int8", "trt_fp16", "trt_int8")


def _child(engine: str, folder: Path, threads: int, batch: int, seconds: float) -> dict[str, float]:
    """Run in the subprocess: load one engine, warm it up, time it."""
    import torch

    torch.set_num_threads(threads)
    from dicomops.export import onnx_export
    from dicomops.export.onnx_export import read_contract

    contract = read_contract(folder / "model.onnx")
    shape = contract.input_shape
    rng = np.random.default_rng(0)
    one, many = rng.random((1, *shape), np.float32), rng.random((batch, *shape), np.float32)
    if engine == "torch":
        from dicomops.config import TrainConfig
        from dicomops.export.onnx_export import ProbabilityHead
        from dicomops.training.model import build_model

        model = build_model(TrainConfig(), contract.channels)
        model.load_state_dict(torch.load(folder / "torch_state.pt", weights_only=True))
        head = ProbabilityHead(model).eval()

        def call(x: np.ndarray) -> None:
            with torch.inference_mode():
                head(torch.from_numpy(x))
    elif engine.startswith("ort_"):
        sess = onnx_export.session(folder / ("model.onnx" if engine == "ort_fp32" else "model.int8.onnx"), threads)
        name = sess.get_inputs()[0].name

        def call(x: np.ndarray) -> None:
            sess.run(None, {name: x})
    else:
        from dicomops.export import tensorrt_engine

        precision = engine.removeprefix("trt_")
        plan = folder / f"model.{precision}.plan"
        if not plan.exists():
            calibration = np.random.default_rng(1).random((64, *shape), np.float32)
            source = tensorrt_engine.engine_input(precision, folder / "model.onnx", calibration, folder)
            tensorrt_engine.build_engine(source, plan, contract, batch)
        trt_engine = tensorrt_engine.Engine(plan, contract)

        def call(x: np.ndarray) -> None:
            trt_engine(x)

    for _ in range(5):
        call(one)
        call(many)
    latencies = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(latencies) < 20:
        start = time.perf_counter()
        call(one)
        latencies.append(time.perf_counter() - start)
    runs, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds or runs < 5:
        call(many)
        runs += 1
    return {"latency_ms_b1": float(np.median(latencies) * 1e3),
            "throughput": batch * runs / (time.perf_counter() - start)}


def _prepare(folder: Path) -> None:
    """A randomly initialised default model, exported and quantised, plus its torch weights."""
    import torch

    from dicomops.config import PreprocessConfig, TrainConfig
    from dicomops.export import onnx_export, quantize
    from dicomops.export.contract import InputContract
    from dicomops.training.model import build_model

    torch.manual_seed(0)
    train = TrainConfig()
    model = build_model(train, PreprocessConfig().slab_slices).eval()
    torch.save(model.state_dict(), folder / "torch_state.pt")
    contract = InputContract.from_configs(PreprocessConfig(), train, 0.5)
    fp32 = onnx_export.export_onnx(model, contract, folder / "model.onnx", opset=18)
    calibration = np.random.default_rng(1).random((64, *contract.input_shape), np.float32)
    quantize.quantize_int8(fp32, folder / "model.int8.onnx", calibration)


def _gpu_ready() -> bool:
    from dicomops.export.tensorrt_engine import availability

    reason = availability()
    if reason:
        print(f"TensorRT: skipped ({reason})")
    return reason is None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=4.0, help="Time per measurement.")
    parser.add_argument("--model-dir", type=Path, help="Folder of a dicomops export (needs torch_state.pt).")
    parser.add_argument("--child", choices=ENGINES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(args.child, args.model_dir, args.threads, args.batch, args.seconds)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.model_dir or Path(tmp)
        if args.model_dir is None:
            _prepare(folder)
        engines = [e for e in ENGINES if not e.startswith("trt_") or _gpu_ready()]
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
        results = {}
        for engine in engines:
            out = subprocess.run([sys.executable, __file__, "--child", engine, "--model-dir", str(folder),
                                  "--threads", str(args.threads), "--batch", str(args.batch),
                                  "--seconds", str(args.seconds)], capture_output=True, text=True, env=env,
                                 check=True)
            results[engine] = json.loads(out.stdout.strip().splitlines()[-1])
    base = results["torch"]
    print(f"inference, {args.threads} threads, each engine in its own process (batch-1 latency, batch-{args.batch} throughput)")
    for engine, r in results.items():
        print(f"  {engine:9s} {r['latency_ms_b1']:7.2f} ms  {r['throughput']:8.1f} samples/s  "
              f"throughput {r['throughput'] / base['throughput']:.2f}x torch, latency {base['latency_ms_b1'] / r['latency_ms_b1']:.2f}x")
    print(f"targets: ort_fp32 >= 1.5x torch throughput ({results['ort_fp32']['throughput'] / base['throughput']:.2f}x); "
          f"ort_int8 >= 2x ({results['ort_int8']['throughput'] / base['throughput']:.2f}x)")


if __name__ == "__main__":
    main()
