"""Static INT8 quantisation with ONNX Runtime in QDQ format, calibrated on training slabs.

QDQ (QuantizeLinear/DequantizeLinear pairs around each quantised op) is what TensorRT's explicit
quantisation consumes, so the same file serves ONNX Runtime on CPU and the TensorRT INT8 engine.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from sklearn.metrics import roc_auc_score

from dicomops.errors import ExportCheckError
from dicomops.export.contract import InputContract
from dicomops.export.onnx_export import (
    read_contract,
    run_onnx,
    session,
    set_metadata,
    write_metadata,
)

if TYPE_CHECKING:
    from dicomops.training.scoring import SeriesRule

log = logging.getLogger(__name__)


class SlabCalibrationReader:
    """Feeds calibration slabs to ONNX Runtime's calibrator one small batch at a time."""

    def __init__(self, input_name: str, samples: np.ndarray, batch_size: int = 16) -> None:
        self._batches = iter([{input_name: np.ascontiguousarray(samples[i:i + batch_size], np.float32)}
                              for i in range(0, len(samples), batch_size)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)

    def rewind(self) -> None:  # ONNX Runtime's interface; one pass is all static MinMax needs
        pass


def quantize_int8(fp32: Path, out: Path, calibration: np.ndarray, *, for_tensorrt: bool = False) -> Path:
    """Write a QDQ INT8 copy of `fp32`, activation ranges from MinMax calibration on `calibration`,
    per-channel symmetric int8 weights, keeping its contract metadata.

    Activations: asymmetric uint8 for ONNX Runtime on CPU (its x86 kernels are U8S8; with int8
    activations the same model ran 2.5× slower than FP32 here), symmetric int8 for TensorRT, whose
    explicit quantisation accepts only zero points of 0.
    """
    import onnx
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    contract: InputContract = read_contract(fp32)
    out = Path(out)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=False)
        staged = Path(tmp) / "int8.onnx"
        quantize_static(str(prepared), str(staged), SlabCalibrationReader(contract.input_name, calibration),
                        quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QInt8 if for_tensorrt else QuantType.QUInt8,
                        weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax,
                        extra_options={"ActivationSymmetric": for_tensorrt, "WeightSymmetric": True})
        proto = onnx.load(str(staged))
        scheme = "s8s8 symmetric (TensorRT)" if for_tensorrt else "u8s8 (ONNX Runtime CPU)"
        write_metadata(proto, contract, {"dicomops.quantization": f"int8 qdq static minmax per-channel, {scheme}",
                                         "dicomops.calibration_samples": str(len(calibration))})
        onnx.checker.check_model(proto)
        onnx.save(proto, str(staged))
        os.replace(staged, out)
    return out


@dataclass(frozen=True)
class Int8Check:
    auc_fp32: float
    auc_int8: float
    max_abs_diff: float
    samples: int
    tolerance: float

    @property
    def auc_drop(self) -> float:
        return self.auc_fp32 - self.auc_int8

    @property
    def ok(self) -> bool:
        return self.auc_drop <= self.tolerance


def check_int8(fp32: Path, int8: Path, x: np.ndarray, y: np.ndarray, tolerance: float) -> Int8Check:
    """Validation AUC of the INT8 model against the FP32 one on labelled slabs; raise above `tolerance`."""
    if len(np.unique(y)) < 2:
        raise ValueError("the INT8 accuracy check needs validation slabs of both classes")
    p32 = run_onnx(session(fp32), x)[:, 1]
    p8 = run_onnx(session(int8), x)[:, 1]
    result = Int8Check(float(roc_auc_score(y, p32)), float(roc_auc_score(y, p8)),
                       float(np.abs(p32 - p8).max()), len(y), tolerance)
    if not result.ok:
        raise ExportCheckError(
            f"INT8 loses {result.auc_drop:.4f} validation AUC ({result.auc_fp32:.4f} → {result.auc_int8:.4f}) on "
            f"{result.samples} slabs, more than the allowed {tolerance}; calibrate on more samples "
            "(export.calibration_samples) or raise export.int8_max_auc_drop knowingly")
    log.info("INT8: validation AUC %.4f → %.4f (drop %.4f) on %d slabs", result.auc_fp32, result.auc_int8,
             result.auc_drop, result.samples)
    return result


SERIES_CHECK_TAG = "export.int8.series_check"  # the version's tag: whether ONNX Runtime may serve its INT8 file
OV_SERIES_CHECK_TAG = "export.ov_int8.series_check"  # the same for OpenVINO, which computes the same file otherwise
SERIES_CHECK_TAGS = {"ort-int8": SERIES_CHECK_TAG, "ov-int8": OV_SERIES_CHECK_TAG}


@dataclass(frozen=True)
class SeriesCheck(Int8Check):
    """INT8 against FP32 on what is served, the series score (the model's rule over every slab of a
    series): their AUC over the same `samples` series and the largest difference of a series' score."""

    @classmethod
    def of(cls, fp32: Mapping[str, float], int8: Mapping[str, float], labels: Mapping[str, int],
           tolerance: float) -> SeriesCheck:
        """Compare two engines' series scores (series → score, :func:`series_scores`) on `labels`.
        Nothing is raised for a failed check: the caller decides what it withholds.

        The slab check (:func:`check_int8`) cannot see what the series rule does with the slabs that
        matter little alone: a rule that reads every slab's log-odds against the series' mean (the
        classifier's ``top_k_contrast``) turns INT8's error on confident negative slabs, which no slab
        AUC notices, into a different ranking of series."""
        uids = list(fp32)
        if len({labels[uid] for uid in uids}) < 2:
            raise ValueError("the INT8 series check needs series of both classes")
        y = [labels[uid] for uid in uids]
        a32, a8 = np.array([fp32[uid] for uid in uids]), np.array([int8[uid] for uid in uids])
        return cls(float(roc_auc_score(y, a32)), float(roc_auc_score(y, a8)), float(np.abs(a32 - a8).max()),
                   len(y), tolerance)

    def verdict(self) -> str:
        """The tag that says whether the INT8 file may be served, and why not."""
        figures = (f"series AUC {self.auc_fp32:.4f} -> {self.auc_int8:.4f} over {self.samples} series, scores "
                   f"moved by up to {self.max_abs_diff:.3f}")
        if self.ok:
            return f"passed: {figures}"
        return (f"failed: {figures}; this INT8 engine refuses the version: serve it with ort-fp32 (or ov-fp32), "
                "or export it with --int8 qat")


def int8_refusal(tags: Mapping[str, str], engine: str = "ort-int8") -> str | None:
    """Why `engine` must not serve a version's INT8 file (the export's series check of that engine
    failed), or None. The two runtimes compute the same file differently (the demo's post-training
    file over its final model's 120 series: series AUC 0.853 on ONNX Runtime, 0.891 on OpenVINO, FP32
    0.970), so each has its own verdict; OpenVINO follows ONNX Runtime's where its own was not given
    (an export from before it was judged, or one without OpenVINO). Versions exported before the
    check carry no verdict at all and are served as before."""
    own = tags.get(SERIES_CHECK_TAGS.get(engine, SERIES_CHECK_TAG), "")
    verdict = own if own.startswith(("passed", "failed")) else tags.get(SERIES_CHECK_TAG, "")
    return verdict if verdict.startswith("failed") else None


def series_scores_by(score: Callable[[np.ndarray], np.ndarray], volumes: Mapping[str, np.ndarray], k: int,
                     size: int, rule: SeriesRule) -> dict[str, float]:
    """Each series' score (by the model's `rule`) from `score` (slabs → (N, 2) probabilities) over all
    its slices, as serving scores it: every slab of the (X, Y, Z) volume, `k` slices deep and `size`
    pixels wide."""
    from dicomops.training.data import all_slabs
    from dicomops.training.scoring import series_score

    return {uid: series_score(score(all_slabs(volume, k, size).numpy())[:, 1], rule) for uid, volume in volumes.items()}


def series_scores(path: Path, volumes: Mapping[str, np.ndarray], k: int, size: int, rule: SeriesRule,
                  threads: int = 2) -> dict[str, float]:
    """:func:`series_scores_by` with ONNX Runtime on the ONNX file at `path`."""
    sess = session(path, threads)
    return series_scores_by(lambda x: run_onnx(sess, x), volumes, k, size, rule)


# -- the layers at the input's resolution --------------------------------------------------------
#
# ONNX Runtime's integer convolution pays for packing and for the NCHW/NHWC transposes around it,
# which only arithmetic can earn back: a convolution over 1-16 channels per group (a stem over the
# slab's 3 slices, a depthwise one) at full resolution has little. On a Zen 5 with VNNI the minimal
# student's stem (3 channels, 128 px, stride 1) took 9.0 ms of 32 slabs in INT8 against 3.8 ms in
# float, and its first depthwise convolution 4.2 against 1.9 ms: together 44 % of the INT8 graph's
# time. The classifier's 7x7 stem is the opposite case: kept in float, ONNX Runtime's QDQ propagation
# runs the max-pool after it as a slow uint8 NCHW operator and the graph gets slower. So the export
# measures, on the machine it runs on, whether these layers should stay float (:func:`float_head`).

FLOAT_HEAD_GAIN = 1.05  # keep the head in float only when the whole graph is at least this much faster


@dataclass(frozen=True)
class FloatHead:
    """What :func:`float_head` decided: the convolutions now in float (none: the graph is unchanged),
    the candidates it considered, and the measured throughput of the float-head graph over the
    all-integer one (nan when it did not time them)."""

    kept: tuple[str, ...]
    candidates: tuple[str, ...]
    speedup: float


def input_resolution_convolutions(path: Path) -> list[str]:
    """The convolutions of the ONNX graph at `path` that read a tensor at the model input's height and
    width, in graph order: the stem, and at a stride-1 stem what follows it up to the first
    downsampling (the minimal student's first depthwise convolution)."""
    import onnx

    model = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    shapes = {v.name: [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
              for v in (*model.graph.input, *model.graph.value_info, *model.graph.output)}
    size = shapes[model.graph.input[0].name][-2:]
    return [n.name for n in model.graph.node if n.op_type == "Conv" and shapes.get(n.input[0], [])[-2:] == size]


def _dequantised(node: Any, initialisers: dict[str, Any]) -> np.ndarray:
    """The float value a ``DequantizeLinear`` of an initialiser gives: ``(q - zero point) * scale``,
    per tensor or along its ``axis``."""
    from onnx import numpy_helper

    q = numpy_helper.to_array(initialisers[node.input[0]]).astype(np.float64)
    scale = numpy_helper.to_array(initialisers[node.input[1]]).astype(np.float64)
    zero = (numpy_helper.to_array(initialisers[node.input[2]]).astype(np.float64)
            if len(node.input) > 2 and node.input[2] else np.zeros_like(scale))
    if scale.ndim == 1 and q.ndim > 1:
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1) % q.ndim
        shape = [1] * q.ndim
        shape[axis] = -1
        scale, zero = scale.reshape(shape), zero.reshape(shape)
    return ((q - zero) * scale).astype(np.float32)


def _representable(q: Any, initialisers: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """The float range a ``QuantizeLinear`` keeps: ``(qmin - zero point) * scale`` to ``(qmax - zero
    point) * scale`` for its output type (uint8 unless its zero point says otherwise)."""
    from onnx import numpy_helper

    scale = numpy_helper.to_array(initialisers[q.input[1]]).astype(np.float64)
    stored = (numpy_helper.to_array(initialisers[q.input[2]]) if len(q.input) > 2 and q.input[2]
              else np.zeros((), np.uint8))
    info, zero = np.iinfo(stored.dtype), stored.astype(np.float64)
    return (np.asarray((info.min - zero) * scale, np.float32).reshape(()),
            np.asarray((info.max - zero) * scale, np.float32).reshape(()))


def _within(bounds: tuple[float, float], low: np.ndarray, high: np.ndarray, q: Any,
            initialisers: dict[str, Any]) -> bool:
    """Whether `bounds` lie in ``[low, high]`` give or take half the ``QuantizeLinear`` `q`'s step."""
    from onnx import numpy_helper

    half = float(np.max(numpy_helper.to_array(initialisers[q.input[1]]))) / 2
    return bool(low <= bounds[0] + half and bounds[1] - half <= high)


def keep_in_float(src: Path, out: Path, convolutions: list[str] | tuple[str, ...] | None = None) -> None:
    """Write the QDQ graph `src` to `out` with `convolutions` run in float (by default its
    :func:`input_resolution_convolutions`).

    Their quantised weights and biases become float initialisers holding exactly the values the
    integer kernel would use (so a QAT graph keeps what it learnt). Each reads its activation from
    before its quantise/dequantise pair, clipped to the range that pair could represent: ONNX
    Runtime's quantiser drops a ``Relu`` whose output is quantised from zero up, leaving the clamp to
    the pair, so without the ``Clip`` a convolution after it would see negative values. The graph's
    input is not clipped where the file's contract keeps it within the pair's range (to half a
    quantisation step, less than the pair's own rounding): a pass over the batch that changes
    nothing a valid slab holds (3–4 % of the minimal student's INT8 time at batch 32). The pair
    on an output stays where an integer operator reads it. Nodes and initialisers nothing reads any
    more are dropped; everything else is unchanged."""
    import onnx
    from onnx import helper, numpy_helper

    chosen = set(input_resolution_convolutions(src) if convolutions is None else convolutions)
    model = onnx.load(str(src))
    graph = model.graph
    initialisers = {i.name: i for i in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    clips: dict[str, Any] = {}
    made: set[str] = set()
    try:
        contract = read_contract(src)
        declared = {contract.input_name: contract.value_range}
    except ExportCheckError:  # no contract, no promise about the input
        declared = {}
    unknown = chosen - {n.name for n in graph.node if n.op_type == "Conv"}
    if unknown:
        raise ValueError(f"{src} has no convolution(s) {sorted(unknown)}")
    for node in graph.node:
        if node.name not in chosen:
            continue
        for index, name in enumerate(node.input):
            dq = producer.get(name)
            if dq is None or dq.op_type != "DequantizeLinear":
                continue
            if dq.input[0] in initialisers:  # a weight or a bias (made once, should two layers share it)
                if f"{name}_float" not in made:
                    graph.initializer.append(numpy_helper.from_array(_dequantised(dq, initialisers), f"{name}_float"))
                    made.add(f"{name}_float")
                node.input[index] = f"{name}_float"
            elif (q := producer.get(dq.input[0])) is not None and q.op_type == "QuantizeLinear":
                low, high = _representable(q, initialisers)
                if q.input[0] in declared and _within(declared[q.input[0]], low, high, q, initialisers):
                    node.input[index] = q.input[0]  # the contract already keeps it in the pair's range
                    continue
                clipped = f"{name}_float"  # the activation before it was quantised, within the pair's range
                if clipped not in clips:
                    clips[clipped] = helper.make_node("Clip", [q.input[0], f"{clipped}_min", f"{clipped}_max"],
                                                      [clipped], f"{clipped}_clip")
                    graph.initializer.extend(numpy_helper.from_array(bound, f"{clipped}_{end}")
                                             for end, bound in zip(("min", "max"), (low, high), strict=True))
                node.input[index] = clipped
    nodes = list(graph.node)
    for clip in clips.values():  # each right after what it clips, so the graph stays in topological order
        source = producer.get(clip.input[0])
        nodes.insert(0 if source is None else next(i for i, n in enumerate(nodes) if n is source) + 1, clip)
    wanted = {o.name for o in graph.output}
    alive: list[Any] = []
    for node in reversed(nodes):  # graph order is topological: readers come after producers
        if any(o in wanted for o in node.output):
            alive.append(node)
            wanted.update(node.input)
    del graph.node[:]
    graph.node.extend(reversed(alive))
    kept = [i for i in graph.initializer if i.name in wanted]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    set_metadata(model, {"dicomops.float_convolutions": ", ".join(sorted(chosen))})
    onnx.checker.check_model(model)
    onnx.save(model, str(out))


IDLE_PAUSE_S = 0.1  # rest before each timed block of alternated_speedup: long enough for spinning threads to park


def relative_throughput(base: Path, other: Path, shape: tuple[int, ...], batch: int, threads: int,
                        rounds: int = 7, runs: int = 4) -> float:
    """Batch-`batch` throughput of `other` over `base` in ONNX Runtime (:func:`alternated_speedup`)."""
    runners = []
    for path in (base, other):
        sess = session(path, threads)
        runners.append(lambda x, sess=sess, name=sess.get_inputs()[0].name: sess.run(None, {name: x}))
    return alternated_speedup(runners[0], runners[1], shape, batch, rounds, runs)


def alternated_speedup(base: Callable[[np.ndarray], Any], other: Callable[[np.ndarray], Any], shape: tuple[int, ...],
                       batch: int, rounds: int = 7, runs: int = 4) -> float:
    """Batch-`batch` throughput of `other` over `base`, two engines' calls on slabs of `shape`: the
    median of per-round ratios, the two timed in alternation so a busy neighbour slows both alike.

    Each timed block starts after :data:`IDLE_PAUSE_S` of rest: a runtime's worker threads spin for a
    while after a call (ONNX Runtime's do by default), and spinning threads take the cores from the
    engine timed next. Without the rest, OpenVINO's INT8 after ONNX Runtime's FP32 timed 1.5-1.6x
    where each alone gave 2.4x (the classifier, 2026-12-07)."""
    x = np.random.default_rng(0).random((batch, *shape), np.float32)
    for run in (base, other):
        for _ in range(2):
            run(x)
    ratios = []
    for _ in range(rounds):
        seconds = []
        for run in (base, other):
            time.sleep(IDLE_PAUSE_S)
            tick = time.perf_counter()
            for _ in range(runs):
                run(x)
            seconds.append(time.perf_counter() - tick)
        ratios.append(seconds[0] / seconds[1])
    return float(np.median(ratios))


def float_head(int8: Path, mode: str, shape: tuple[int, ...], batch: int, threads: int = 2) -> FloatHead:
    """Run the INT8 graph's input-resolution convolutions (:func:`input_resolution_convolutions`) in
    float, rewriting `int8` in place: ``always``; ``auto``, when that makes the graph at least
    :data:`FLOAT_HEAD_GAIN` times faster at batch `batch` on this machine; ``never`` leaves it."""
    candidates = tuple(input_resolution_convolutions(int8))
    if mode == "never" or not candidates:
        return FloatHead((), candidates, float("nan"))
    staged = int8.with_name(int8.stem + ".float-head.onnx")
    keep_in_float(int8, staged, candidates)
    speedup = relative_throughput(int8, staged, shape, batch, threads) if mode == "auto" else float("nan")
    if mode == "always" or speedup >= FLOAT_HEAD_GAIN:
        os.replace(staged, int8)
        log.info("INT8: %s kept in float (%.2fx the all-integer graph's throughput)", ", ".join(candidates), speedup)
        return FloatHead(candidates, candidates, speedup)
    staged.unlink()
    log.info("INT8: all-integer graph kept (float %s: %.2fx)", ", ".join(candidates), speedup)
    return FloatHead((), candidates, speedup)
