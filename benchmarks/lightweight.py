"""Lightweight models: the 3-D teacher, the MobileNetV3-Small student and the current 2.5D classifier,
each in torch (float32), ONNX Runtime (FP32, INT8 static post-training, INT8 from
quantisation-aware training when a QDQ file is given) and OpenVINO (the same FP32 and QDQ files on
its CPU plugin, float layers in float32), batch-1 latency and batch-32 throughput;
with ``--profile``, ONNX Runtime's profiler splits each ONNX engine's batch-32 time by operator.

Reproduce::

    .venv/bin/python benchmarks/lightweight.py                 # random weights (speed does not depend on them)
    .venv/bin/python benchmarks/lightweight.py --qat student=/path/model.qat.onnx
    .venv/bin/python benchmarks/lightweight.py --profile      # where INT8 and FP32 spend their time
    MLFLOW_TRACKING_URI=... .venv/bin/python benchmarks/lightweight.py --studies DIR --version 3 [--version 1]
    .venv/bin/python benchmarks/lightweight.py --bootstrap    # the held-out table's interval, against scikit-learn

With ``--bootstrap``, the paired bootstrap interval of the held-out INT8 table
(``dicomops.export.qat.paired_difference``: every draw's AUC read from one comparison matrix per
engine and fold, all draws at once, ``dicomops.training.metrics.bootstrap_aucs``) is timed against
the same draws scored one by one with scikit-learn's ``roc_auc_score``, on four folds of 30 series,
and both intervals must agree.

With ``--studies`` the end-to-end figure instead: ``dicomops predict DIR --version V --engine E`` for
E in ort-fp32, ort-int8 and ov-int8, each in its own process (the served path: gate,
de-identification, preprocessing, every slab of every series through the exported engine), and the
per-study medians of its ``summary.json`` (whole study, preprocessing, scoring), with each engine's
ratio to ONNX Runtime FP32 per study and for the scoring step alone. The versions must have been exported (``dicomops export``).

Each engine runs in its own fresh process (``--measure``) with ``--threads`` intra-op threads, so no
engine inherits another's thread pools, caches or allocator state; the parent builds and exports the
networks (ONNX opset 18, dynamic batch, the export stage's own functions) and calibrates INT8 on
random slabs of the right shape. The teacher and the student run at 128 px, the student with its
first convolution at stride 1 (as it is trained); the classifier at its configured size and stem
stride (``TrainConfig``'s defaults, what the pipeline serves). A fourth network, ``reference``, five
plain 3×3 convolutions 64 channels wide, shows what ONNX Runtime's INT8 kernels give on this CPU
when the convolutions are wide (ORT engines only); the summary names the CPU and its VNNI, AMX and
bf16 flags. Latency: the
median of ``--repeats`` single-slab calls after warm-up; throughput: slabs per second over
``--seconds`` of batch-32 calls. Ratios are against the teacher (latency) and against each network's
own ONNX Runtime FP32 (INT8 throughput; OpenVINO's INT8 also against its own FP32), measured in the
same run. Each INT8 graph is also timed
with its input-resolution convolutions in float (``…-float-head``), what the export serves where that
is faster (``export.int8_float_head``); a QAT file exported that way is timed as it is.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx

SIZE = 128
# role: (architecture, slab slices, TrainConfig settings besides the defaults). The student at its
# architecture's defaults, 128 px and stride 1, as it is trained (config.ARCHITECTURE_DEFAULTS).
NETWORKS: dict[str, tuple[str, int, dict[str, int]]] = {
    "teacher": ("resnet3d-slim", 7, {"input_size": SIZE}),
    "student": ("mobilenet-v3-small", 3, {}),
    "student-minimal": ("mobilenet-v3-small-minimal", 3, {}),
    "classifier": ("resnet-slim", 3, {})}


# A plain stack of five 3x3 convolutions 64 channels wide at 64 px, ReLU between, no stem: what ONNX
# Runtime's INT8 kernels give on this CPU when the convolutions are wide enough to use them (the
# reference the networks' INT8 ratios are read against).
REFERENCE_WIDTH, REFERENCE_SIZE = 64, 64


def cpu_features() -> str:
    """The CPU's model and the instruction sets INT8 and bf16 kernels depend on."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    first: dict[str, str] = {}  # the first processor's fields
    for line in info.splitlines():
        key, _, value = line.partition(":")
        first.setdefault(key.strip(), value.strip())
    flags, model, family = set(first.get("flags", "").split()), first.get("model name", "?"), first.get("cpu family", "?")
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8", "amx_bf16")
    return f"{model} (family {family}); " + ", ".join(f"{f} {'yes' if f in flags else 'no'}" for f in wanted)


def measure(engine: str, path: str, k: int, size: int, threads: int, repeats: int, seconds: float,
            profile: bool = False) -> dict[str, object]:
    """In this process: batch-1 median latency (ms) and batch-32 throughput (slabs/s) of one engine;
    with `profile`, the share of ONNX Runtime's batch-32 kernel time per operator type."""
    rng = np.random.default_rng(0)
    one = rng.random((1, k, size, size), dtype=np.float32)
    many = rng.random((32, k, size, size), dtype=np.float32)
    runner: Any = None
    if engine == "torch-fp32":
        import torch

        torch.set_num_threads(threads)
        from dicomops.training.model import model_from_config

        raw = json.loads(Path(path).with_suffix(".json").read_text())
        model = model_from_config(raw).eval()
        model.load_state_dict(torch.load(path, weights_only=True))

        def run(x: np.ndarray) -> None:
            with torch.no_grad():
                model(torch.from_numpy(x))
    elif engine.startswith("ov-"):
        from dicomops.export.openvino_engine import OpenVinoRunner

        runner = OpenVinoRunner(Path(path), threads)

        def run(x: np.ndarray) -> None:
            runner(x)
    else:
        from dicomops.export.onnx_export import session

        sess = session(Path(path), threads=threads)
        name = sess.get_inputs()[0].name

        def run(x: np.ndarray) -> None:
            sess.run(None, {name: x})
    for _ in range(10):
        run(one)
    times = []
    for _ in range(repeats):
        tick = time.perf_counter()
        run(one)
        times.append(time.perf_counter() - tick)
    for _ in range(3):
        run(many)
    n, tick = 0, time.perf_counter()
    while time.perf_counter() - tick < seconds:
        run(many)
        n += 32
    out: dict[str, object] = {"latency_ms_b1": float(np.median(times) * 1e3),
                              "throughput_b32": n / (time.perf_counter() - tick)}
    if profile and engine.startswith("ort-"):
        out["operators"] = operator_shares(Path(path), many, threads)
    if engine.startswith("ov-"):
        from dicomops.export.openvino_engine import layers

        out["ov_layers"] = layers(runner.compiled).describe()
    return out


def operator_shares(path: Path, x: np.ndarray, threads: int) -> dict[str, float]:
    """Share of kernel time per operator type of the graph ONNX Runtime really runs (after its fusions
    and layout passes: QLinearConv, NhwcMaxPool, fused Conv in NCHWc...), over 6 calls on `x`, the
    first one included."""
    import collections

    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads, options.log_severity_level = threads, 1, 3
    options.enable_profiling = True
    with tempfile.TemporaryDirectory() as tmp:
        options.profile_file_prefix = str(Path(tmp) / "ort")
        sess = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        for _ in range(6):
            sess.run(None, {sess.get_inputs()[0].name: x})
        events = json.loads(Path(sess.end_profiling()).read_text())
    by_op: dict[str, float] = collections.defaultdict(float)
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            by_op[event["args"]["op_name"]] += event["dur"]
    total = sum(by_op.values()) or 1.0
    return {op: round(t / total, 3) for op, t in sorted(by_op.items(), key=lambda kv: -kv[1])}


E2E_ENGINES = ("ort-fp32", "ort-int8", "ov-int8")  # the baseline first


def end_to_end(studies: Path, versions: list[str]) -> None:
    """Per-study medians of ``dicomops predict`` on `studies` for each version of the classifier's
    registered model in ONNX Runtime FP32 and INT8 and OpenVINO INT8, each run in its own process, and each
    engine's speed-up over ONNX Runtime FP32 per study and for scoring alone. The INT8 engines serve
    only a version whose export's series check passed (``export.int8.series_check``): export the
    versions with ``--int8 qat`` first where post-training INT8 failed it."""
    cli = Path(sys.executable).with_name("dicomops")
    medians: dict[tuple[str, str], dict[str, float]] = {}
    # Read every file once first: otherwise the first engine pays for the cold disk cache (measured
    # 1.47x "faster" INT8 end to end whose scoring step alone was 0.95x).
    warmed = sum(len(f.read_bytes()) for f in studies.rglob("*") if f.is_file())
    print(f"{warmed / 1e6:.0f} MB of studies read once before timing", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for version in versions:
            for engine in E2E_ENGINES:
                work = Path(tmp) / f"{version}-{engine}"
                tick = time.perf_counter()
                done = subprocess.run([str(cli), "predict", str(studies), "--version", version, "--engine", engine,
                                       "--work", str(work)], capture_output=True, text=True)
                if done.returncode not in (0, 1):  # 1: a study refused or failed (a corpus's faults); timed all the same
                    raise RuntimeError(f"dicomops predict exited {done.returncode}: {done.stderr[-2000:]}")
                wall = time.perf_counter() - tick
                summary = json.loads(next((work / "predict").glob("*/summary.json")).read_text())
                m = summary["metrics"]
                if summary.get("engine") != engine:
                    raise SystemExit(f"version {version} ran on {summary.get('engine')}, not {engine}")
                medians[(version, engine)] = m
                print(f"version {version:>3s} {engine:9s} {m['studies_scored']:.0f} studies, "
                      f"{m['series_scored']:.0f} series; per study p50 {m['latency_p50_s']:.3f} s "
                      f"(preprocess {m.get('preprocess_p50_s', float('nan')):.3f} s, "
                      f"score {m.get('score_p50_s', float('nan')):.3f} s); whole command {wall:.0f} s", flush=True)
    print(f"\n{cpu_features()}; ratios measured in this run")
    for version in versions:
        fp32 = medians[(version, "ort-fp32")]
        for engine in E2E_ENGINES[1:]:
            other = medians[(version, engine)]
            print(f"version {version}: {engine} / ort-fp32 per study (end to end) "
                  f"{fp32['latency_p50_s'] / other['latency_p50_s']:.2f}x, scoring step alone "
                  f"{fp32['score_p50_s'] / other['score_p50_s']:.2f}x")


def float_head(int8: Path, out: Path) -> Path:
    """A copy of the INT8 graph at `out` with its input-resolution convolutions in float, as the export
    keeps them where that is faster (``export.int8_float_head``)."""
    from dicomops.export import quantize

    quantize.keep_in_float(int8, out)
    return out


def build(folder: Path) -> dict[str, dict[str, object]]:
    """Each network with random weights: torch weights, ONNX FP32 and ORT INT8 (static, calibrated)."""
    import torch

    from dicomops.config import PreprocessConfig, TrainConfig
    from dicomops.export import onnx_export, quantize
    from dicomops.export.contract import InputContract
    from dicomops.training.model import build_model

    out: dict[str, dict[str, object]] = {}
    for role, (architecture, k, settings) in NETWORKS.items():
        torch.manual_seed(0)
        cfg = TrainConfig(architecture=architecture, **settings)
        model = build_model(cfg, k).eval()
        weights = folder / f"{role}.pt"
        torch.save(model.state_dict(), weights)
        weights.with_suffix(".json").write_text(json.dumps(cfg.model_dump(mode="json") | {"in_channels": k}))
        contract = InputContract.from_configs(PreprocessConfig(slab_slices=k), cfg, 0.5)
        fp32 = onnx_export.export_onnx(model, contract, folder / f"{role}.onnx", opset=18)
        calibration = np.random.default_rng(1).random((64, k, cfg.input_size, cfg.input_size), dtype=np.float32)
        int8 = quantize.quantize_int8(fp32, folder / f"{role}.int8.onnx", calibration)
        out[role] = {"k": k, "size": cfg.input_size, "architecture": architecture,
                     "parameters": sum(p.numel() for p in model.parameters()),
                     "engines": {"torch-fp32": str(weights), "ort-fp32": str(fp32), "ort-int8-ptq": str(int8),
                                 "ort-int8-ptq-float-head": str(float_head(int8, folder / f"{role}.int8.fh.onnx")),
                                 "ov-fp32": str(fp32), "ov-int8-ptq": str(int8)}}
    torch.manual_seed(0)
    layers: list[torch.nn.Module] = []
    for i in range(5):
        layers += [torch.nn.Conv2d(3 if i == 0 else REFERENCE_WIDTH, REFERENCE_WIDTH, 3, padding=1), torch.nn.ReLU()]
    wide = torch.nn.Sequential(*layers, torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                               torch.nn.Linear(REFERENCE_WIDTH, 2)).eval()
    contract = InputContract.from_configs(PreprocessConfig(slab_slices=3), TrainConfig(input_size=REFERENCE_SIZE), 0.5)
    fp32 = onnx_export.export_onnx(wide, contract, folder / "reference.onnx", opset=18)
    calibration = np.random.default_rng(1).random((64, 3, REFERENCE_SIZE, REFERENCE_SIZE), dtype=np.float32)
    int8 = quantize.quantize_int8(fp32, folder / "reference.int8.onnx", calibration)
    out["reference"] = {"k": 3, "size": REFERENCE_SIZE, "architecture": f"5 plain 3x3 convolutions, {REFERENCE_WIDTH} wide",
                        "parameters": sum(p.numel() for p in wide.parameters()),
                        "engines": {"ort-fp32": str(fp32), "ort-int8-ptq": str(int8), "ov-fp32": str(fp32),
                                    "ov-int8-ptq": str(int8)}}
    return out


def bootstrap(resamples: int = 2000) -> None:
    """The held-out table's paired interval against scikit-learn's AUC over the same draws."""
    import pandas as pd
    from sklearn.metrics import roc_auc_score

    from dicomops.export import qat

    rng = np.random.default_rng(0)
    rows = []
    for fold in range(4):
        labels = rng.integers(0, 2, 30)
        base = labels + rng.normal(0, 0.8, 30)
        for engine, scores in (("fp32", base), ("int8-qat", base + rng.normal(0, 0.3, 30))):
            rows += [{"engine": engine, "fold": fold, "label": int(y), "score": float(x),
                      "SeriesInstanceUID": f"{fold}-{i}"} for i, (y, x) in enumerate(zip(labels, scores, strict=True))]
    frame = pd.DataFrame(rows)

    def by_sklearn() -> tuple[float, float, float]:
        point, spread = [], []
        for fold, part in frame.groupby("fold"):
            wide = part.pivot_table(index="SeriesInstanceUID", columns="engine", values="score")
            y = part.drop_duplicates("SeriesInstanceUID").set_index("SeriesInstanceUID").label.loc[wide.index].to_numpy()
            a, b = wide["int8-qat"].to_numpy(), wide["fp32"].to_numpy()
            point.append(roc_auc_score(y, a) - roc_auc_score(y, b))
            draw = np.random.default_rng(int(fold))  # the draws paired_difference makes for this fold
            pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
            counts_pos = draw.multinomial(len(pos), np.full(len(pos), 1 / len(pos)), size=resamples)
            counts_neg = draw.multinomial(len(neg), np.full(len(neg), 1 / len(neg)), size=resamples)
            picks = (np.concatenate([np.repeat(pos, cp), np.repeat(neg, cn)]) for cp, cn in zip(counts_pos, counts_neg,
                                                                                               strict=True))
            spread.append([roc_auc_score(y[i], a[i]) - roc_auc_score(y[i], b[i]) for i in picks])
        low, high = np.percentile(np.mean(spread, axis=0), [2.5, 97.5])
        return float(np.mean(point)), float(low), float(high)

    seconds, results = {}, {}
    for name, fn in (("one matrix, all draws at once", lambda: qat.paired_difference(frame, "int8-qat", "fp32", resamples)),
                     ("scikit-learn, draw by draw", by_sklearn)):
        tick = time.perf_counter()
        results[name] = fn()
        seconds[name] = time.perf_counter() - tick
        point, low, high = results[name]
        print(f"{name:30s} {seconds[name]:7.3f} s   difference {point:+.4f} ({low:+.4f} to {high:+.4f})")
    ours, theirs = results.values()
    assert np.allclose(ours, theirs, atol=1e-12), (ours, theirs)
    fast, slow = seconds.values()
    print(f"the same interval, {slow / fast:.1f}x faster ({resamples} draws of 4 folds x 30 series)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--qat", action="append", default=[], metavar="ROLE=PATH",
                        help="A QDQ ONNX file from quantisation-aware training, e.g. student=model.qat.onnx.")
    parser.add_argument("--profile", action="store_true", help="Also split each ONNX engine's time by operator.")
    parser.add_argument("--studies", type=Path, help="End to end: a folder of DICOM studies to score with "
                        "dicomops predict (needs --version and MLFLOW_TRACKING_URI).")
    parser.add_argument("--version", action="append", default=[], help="An exported version of the classifier's "
                        "registered model (repeatable).")
    parser.add_argument("--bootstrap", action="store_true", help="Time the held-out table's paired interval "
                        "against scikit-learn's AUC over the same draws.")
    parser.add_argument("--measure", nargs=4, metavar=("ENGINE", "PATH", "K", "SIZE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        engine, path, k, size = args.measure
        print(json.dumps(measure(engine, path, int(k), int(size), args.threads, args.repeats, args.seconds,
                                 args.profile)))
        return
    if args.bootstrap:
        bootstrap()
        return
    if args.studies:
        if not args.version:
            parser.error("--studies needs at least one --version (an exported version of the classifier)")
        end_to_end(args.studies, args.version)
        return
    with tempfile.TemporaryDirectory() as tmp:
        networks = build(Path(tmp))
        for item in args.qat:
            role, path = item.split("=", 1)
            networks[role]["engines"]["ort-int8-qat"] = path  # type: ignore[index]
            networks[role]["engines"]["ov-int8-qat"] = path  # type: ignore[index]
            # an export that kept the head in float already serves it (its metadata names the layers)
            if "dicomops.float_convolutions" not in {p.key for p in onnx.load(path).metadata_props}:
                networks[role]["engines"]["ort-int8-qat-float-head"] = str(  # type: ignore[index]
                    float_head(Path(path), Path(tmp) / f"{role}.qat.fh.onnx"))
        rows = []
        for role, net in networks.items():
            for engine, path in net["engines"].items():  # type: ignore[attr-defined]
                done = subprocess.run([sys.executable, __file__, "--threads", str(args.threads), "--repeats",
                                       str(args.repeats), "--seconds", str(args.seconds),
                                       *(["--profile"] if args.profile else []), "--measure", engine, path,
                                       str(net["k"]), str(net["size"])], check=True, capture_output=True, text=True)
                figures = json.loads(done.stdout.strip().splitlines()[-1])
                rows.append({"network": role, "architecture": net["architecture"], "k": net["k"],
                             "parameters": net["parameters"], "engine": engine, **figures})
                print(f"{role:15s} {engine:23s} {net['size']:3d} px  batch 1 {figures['latency_ms_b1']:7.2f} ms   "
                      f"batch 32 {figures['throughput_b32']:7.0f} slabs/s", flush=True)
                if "ov_layers" in figures and "int8" in engine:
                    print(f"    OpenVINO runs {figures['ov_layers']}")
                if "operators" in figures:
                    top = list(figures["operators"].items())[:5]
                    print("    " + ", ".join(f"{op} {share:.0%}" for op, share in top))
    by = {(r["network"], r["engine"]): r for r in rows}
    print(f"\n{args.threads} threads on {cpu_features()}; ratios measured in this run")
    teacher = by[("teacher", "torch-fp32")]["latency_ms_b1"]
    for role in ("student", "student-minimal", "classifier"):
        for engine in ("torch-fp32", "ort-fp32"):
            ratio = by[("teacher", engine)]["latency_ms_b1"] / by[(role, engine)]["latency_ms_b1"]
            print(f"batch-1 latency, teacher / {role} ({engine}): {ratio:.2f}x")
    print(f"batch-1 latency, teacher torch / student ORT FP32: {teacher / by[('student', 'ort-fp32')]['latency_ms_b1']:.2f}x")
    for role in networks:
        for engine in ("ort-int8-ptq", "ort-int8-ptq-float-head", "ort-int8-qat", "ort-int8-qat-float-head",
                       "ov-fp32", "ov-int8-ptq", "ov-int8-qat"):
            if (role, engine) in by:
                ratio = by[(role, engine)]["throughput_b32"] / by[(role, "ort-fp32")]["throughput_b32"]
                own = ""
                if engine.startswith("ov-int8"):
                    own = f"; / ov-fp32 {by[(role, engine)]['throughput_b32'] / by[(role, 'ov-fp32')]['throughput_b32']:.2f}x"
                print(f"batch-32 throughput, {role} {engine} / ort-fp32: {ratio:.2f}x{own}")


if __name__ == "__main__":
    main()
