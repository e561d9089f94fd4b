"""Quantisation-aware training with torchao's PT2E flow, and INT8 judged on held-out folds.

``torch.ao.quantization`` is deprecated; torchao's QAT config for modules fakes ``Linear`` and
``Embedding`` only, so convolutional networks go through PT2E: ``torch.export``, then
``prepare_qat_pt2e`` with the ``X86InductorQuantizer`` in QAT mode (per-channel symmetric int8
weights, per-tensor uint8 activations: the scheme ONNX Runtime's fast x86 kernels use), a short
fine-tune with fake quantisation in the loop (batch norms folded into the convolutions the way
inference will see them, their statistics frozen: :func:`finetune`), then ``convert_pt2e``.

What ONNX Runtime serves is the program ``convert_pt2e`` made, exported as QDQ ONNX: the int8
weights and the activation ranges the fine-tune learnt, with the network's float computation
between them. The X86 quantiser leaves a convolution's output in float where Inductor fuses the
next operation into the convolution (a residual ``Add``); ONNX Runtime fuses only
``DequantizeLinear → Conv → QuantizeLinear`` into its integer ``QLinearConv``, so those
convolutions would run in float, dequantising their weights on every call.
:func:`quantise_float_convolutions` gives each such output a quantise/dequantise pair with a MinMax
range over the calibration slabs, as ONNX Runtime's static quantiser would, and changes nothing else.

The ranges are part of what QAT trains: the fine-tuned weights are adapted to activations clipped
at them. Until 2026-12-03 the served file was instead the fine-tuned float network re-quantised by
ONNX Runtime's static quantiser with freshly calibrated ranges. For the minimalistic student
(ReLU, unbounded) that lost 0.149 validation AUC (0.986 → 0.837) where torchao's own program lost
nothing (0.987): its fine-tuned float weights alone scored 0.940.
"""

from __future__ import annotations

import copy
import threading
import time
import types
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from dicomops import progress
from dicomops.config import TrainConfig
from dicomops.export import onnx_export, quantize
from dicomops.export.contract import InputContract
from dicomops.training.augment import FLIP_SPATIAL_AXIS
from dicomops.training.data import AugmentedSlabs, SlabSet
from dicomops.training.distill import distillation_loss
from dicomops.training.model import class_weights
from dicomops.training.scoring import SeriesRule


def _one_partition_per_call(program: torch.fx.GraphModule) -> None:
    """Give every call of a module its own source partition.

    The quantiser groups nodes by the module they came from; a module called twice (MONAI's ResNet
    blocks apply one ``act`` after the first convolution and again after the residual addition)
    becomes one partition with two outputs, which it refuses. Naming each call apart changes no
    computation."""
    for node in program.graph.nodes:
        stack = node.meta.get("nn_module_stack")
        if node.op == "call_function" and stack:
            key, (fqn, cls) = list(stack.items())[-1]
            stack[key] = (f"{fqn}@{node.name}", cls)


# torchao's pattern graphs, by what makes one (:func:`trace_patterns_once`).
_PATTERNS: dict[Any, torch.fx.GraphModule] = {}
_PATTERNS_LOCK = threading.Lock()


def _pattern_key(value: Any, *, inputs: bool = False, seen: frozenset[int] = frozenset()) -> Any:
    """What a pattern graph of torchao's is made from, hashable: the pattern function's code and
    what it closes over (flags, the convolution function), and the example inputs' shapes and
    dtypes (`inputs`: traced as inputs, so their values do not enter the graph). Scalars are keyed
    with their type (``True``, ``1`` and ``1.0`` are equal in Python, not in a graph). Raises
    TypeError for anything else, which is then traced afresh: a tensor a pattern closes over is a
    constant of its graph, an object known by its identity alone could be another one later, and a
    function that closes over itself has no finite key."""
    if isinstance(value, torch.Tensor) and inputs:
        return ("tensor", tuple(value.shape), value.dtype, value.device.type)
    if value is None or isinstance(value, (bool, int, float, str, torch.dtype)):
        return (type(value).__name__, value)
    if isinstance(value, (tuple, list)):
        return (type(value).__name__, tuple(_pattern_key(v, inputs=inputs, seen=seen) for v in value))
    if id(value) in seen:
        raise TypeError("a pattern that refers to itself")
    seen = seen | {id(value)}
    if isinstance(value, types.FunctionType):
        try:
            cells = tuple(_pattern_key(c.cell_contents, seen=seen) for c in value.__closure__ or ())
        except ValueError as err:  # a cell not filled yet
            raise TypeError("a pattern with an empty closure cell") from err
        return ("function", value.__code__, cells, _pattern_key(value.__defaults__ or (), seen=seen),
                _pattern_key(sorted((value.__kwdefaults__ or {}).items()), seen=seen))
    if type(value).__name__ == "WrapperModule" and not any(True for _ in value.parameters()) \
            and not any(True for _ in value.buffers()):
        return ("wrapped", _pattern_key(value.fn, seen=seen))
    if isinstance(value, (types.BuiltinFunctionType, torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        return value  # lives as long as the process, and the key holds it
    raise TypeError(f"no pattern key for a {type(value).__name__}")


def trace_patterns_once() -> None:
    """From now on in this process, torchao traces each of its rewrite patterns once.

    ``prepare_qat_pt2e``, ``move_exported_model_to_eval`` and ``convert_pt2e`` find the
    convolution + batch-norm subgraphs they rewrite by matching pattern graphs, and torchao 0.18
    makes each of those with a ``torch.export`` every time (114 of them for the classifier),
    though they depend only on the pattern and its example inputs. They are kept by
    :func:`_pattern_key` (with the default dtype and grad mode they were traced under) and each
    caller gets a copy: the classifier's prepare and convert took 3.8 s instead of 22.3 once they
    were kept (2026-12-06, 2 cores shared with other work), its converted program's outputs the same
    to the bit (``benchmarks/qat_patterns.py``). A held-out comparison fine-tunes each fold's model
    twice. Installed once, under a lock, and never taken off: a pattern with no safe key, or whose
    key cannot be made, is traced as torchao traces it.
    """
    from torchao.quantization.pt2e import qat_utils, utils

    with _PATTERNS_LOCK:
        original = utils._get_aten_graph_module_for_pattern
        if getattr(original, "_dicomops_traced_once", False):
            return

        def traced_once(pattern: Any, example_inputs: tuple[Any, ...], is_cuda: bool = False,
                        **kwargs: Any) -> torch.fx.GraphModule:
            try:
                key = (_pattern_key(pattern), _pattern_key(tuple(example_inputs), inputs=True), is_cuda,
                       tuple(sorted((k, _pattern_key(v, inputs=True)) for k, v in kwargs.items())),
                       torch.get_default_dtype(), torch.is_grad_enabled())
            except Exception:  # no safe key: traced as torchao does
                return original(pattern, example_inputs, is_cuda, **kwargs)
            with _PATTERNS_LOCK:
                graph = _PATTERNS.get(key)
            if graph is None:
                graph = original(pattern, example_inputs, is_cuda, **kwargs)
                with _PATTERNS_LOCK:
                    _PATTERNS.setdefault(key, graph)
            with warnings.catch_warnings():  # torch's pytree deprecation, raised by copying any GraphModule
                warnings.simplefilter("ignore", FutureWarning)
                return copy.deepcopy(graph)

        traced_once._dicomops_traced_once = True  # type: ignore[attr-defined]
        utils._get_aten_graph_module_for_pattern = traced_once
        qat_utils._get_aten_graph_module_for_pattern = traced_once


def prepare(model: torch.nn.Module, example: torch.Tensor) -> torch.fx.GraphModule:
    """`model` (copied, float, CPU) exported with a dynamic batch axis and prepared for QAT."""
    from torchao.quantization.pt2e.quantize_pt2e import prepare_qat_pt2e
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        X86InductorQuantizer,
        get_default_x86_inductor_quantization_config,
    )

    net = copy.deepcopy(model).cpu().float().eval()
    net.to(memory_format=torch.contiguous_format)  # type: ignore[call-overload]
    batch = torch.export.Dim("batch", min=1, max=1024)
    program = torch.export.export(net, (example.float(),), dynamic_shapes=({0: batch},)).module()
    _one_partition_per_call(program)
    quantizer = X86InductorQuantizer().set_global(get_default_x86_inductor_quantization_config(is_qat=True))
    trace_patterns_once()
    return prepare_qat_pt2e(program, quantizer)


@dataclass(frozen=True)
class Teacher:
    """What a distilled version learnt from, for its fine-tune to learn from too: the teacher's
    (N, 2) logits per training slab and the training's distillation settings."""

    logits: torch.Tensor
    alpha: float
    temperature: float


def finetune(model: torch.nn.Module, train: SlabSet, *, epochs: int, learning_rate: float, batch_size: int = 32,
             seed: int = 0, teacher: Teacher | None = None, fake_quantise: bool = True,
             flip_axes: Sequence[int] = (FLIP_SPATIAL_AXIS,)) -> tuple[torch.nn.Module, torch.fx.GraphModule]:
    """Fine-tune `model` with fake quantisation on `train` (augmented as its training was, flipped
    along `flip_axes` (``train.flip_axes``); class-weighted cross-entropy;
    with `teacher`, the distillation loss its training used,
    :func:`dicomops.training.distill.distillation_loss`).

    The network runs as it will be served while it learns: batch norms keep the trained network's
    statistics and dropout is off; only the weights and the quantisers' ranges move. With the
    statistics updated from the fine-tune's batches instead (train mode), fold 3 of the distilled
    minimal student scored 0.480 on its held-out series against 0.629 in FP32; frozen, 0.688
    (2026-12-03).

    Without `fake_quantise` the same fine-tune (the same batches, augmentations and steps) runs in
    float, the quantisers only observing: the control that tells what the fine-tune itself does to a
    version from what quantisation does (:func:`held_out`).

    Returns the float network carrying the QAT-trained weights and the converted PT2E program
    (integer weights, quantise/dequantise nodes).
    """
    from torchao.quantization.pt2e import disable_fake_quant, move_exported_model_to_eval
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

    torch.manual_seed(seed)
    prepared = prepare(model, train.x[:2].float())
    move_exported_model_to_eval(prepared)  # batch-norm statistics frozen, dropout off; gradients still flow
    if not fake_quantise:
        prepared.apply(disable_fake_quant)
    optimizer = torch.optim.AdamW(prepared.parameters(), lr=learning_rate, weight_decay=0.0)
    weight = class_weights(train.y)
    if teacher is not None and len(teacher.logits) != len(train.y):
        raise ValueError(f"{len(teacher.logits)} teacher outputs for {len(train.y)} training slabs")
    dataset = AugmentedSlabs(train, train=True, teacher=None if teacher is None else teacher.logits,
                             flip_axes=flip_axes)
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=dataset.collate, shuffle=True,
                        generator=torch.Generator().manual_seed(seed),
                        drop_last=len(train.y) > batch_size)
    label = "quantisation-aware fine-tune" if fake_quantise else "float fine-tune (the control)"
    for epoch in range(epochs):
        total, seen, tick = 0.0, 0, time.perf_counter()
        for x, y, *soft in loader:
            if teacher is None:
                loss = F.cross_entropy(prepared(x), y, weight=weight)
            else:
                loss = distillation_loss(prepared(x), y, soft[0], alpha=teacher.alpha, temperature=teacher.temperature,
                                         weight=weight)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total, seen = total + loss.item() * len(y), seen + len(y)
        progress.epoch(label, epoch + 1, epochs,
                       {"train_loss": total / max(seen, 1), "samples_per_second": seen / (time.perf_counter() - tick)})
    move_exported_model_to_eval(prepared)
    trained = copy.deepcopy(model).cpu().float()
    state = prepared.state_dict()
    # The program keeps every parameter and running statistic under its name; only the batch
    # counters (unused with a momentum) are dropped.
    missing = [key for key in trained.state_dict() if key not in state and not key.endswith("num_batches_tracked")]
    if missing:
        raise RuntimeError(f"the QAT program lost {len(missing)} of the network's tensors, e.g. {missing[:3]}")
    trained.load_state_dict({key: state[key] for key in trained.state_dict() if key in state}, strict=False)
    return trained.eval(), convert_pt2e(prepared)


def quantise_float_convolutions(src: Path, out: Path, calibration: np.ndarray) -> list[str]:
    """Write `src` (a QDQ graph) to `out` with every convolution output that is left in float
    quantised and dequantised again: uint8 at the range ONNX Runtime's own MinMax calibrator and
    ``compute_scale_zp`` give over `calibration`. An output counts as quantised when each of its
    readers is a ``QuantizeLinear``, or a ``Relu`` read only by ``QuantizeLinear`` (ONNX Runtime
    folds such a ReLU into the zero point). Returns the names of the tensors that got a pair."""
    import tempfile

    import onnx
    from onnx import helper, numpy_helper
    from onnxruntime.quantization.calibrate import create_calibrator
    from onnxruntime.quantization.quant_utils import compute_scale_zp, get_qmin_qmax_for_qType

    model = onnx.load(str(src))
    graph = model.graph
    readers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    outputs = {o.name for o in graph.output}

    def quantised(name: str) -> bool:
        if name in outputs or not readers.get(name):
            return False
        return all(r.op_type == "QuantizeLinear" or (r.op_type == "Relu" and quantised(r.output[0]))
                   for r in readers[name])

    floats = [n.output[0] for n in graph.node if n.op_type == "Conv" and not quantised(n.output[0])]
    ranges: dict[str, Any] = {}
    if floats:
        with tempfile.TemporaryDirectory() as tmp:
            calibrator = create_calibrator(src, ["Conv"], augmented_model_path=str(Path(tmp) / "augmented.onnx"))
            calibrator.collect_data(quantize.SlabCalibrationReader(graph.input[0].name, calibration))
            collected = calibrator.compute_data()
            ranges = {t: collected[t].range_value for t in floats}
    nodes = []
    for node in graph.node:
        nodes.append(node)
        t = node.output[0] if node.output else ""
        if t not in ranges:
            continue
        low, high = ranges[t]
        zero, scale = compute_scale_zp(np.asarray(low, np.float32), np.asarray(high, np.float32),
                                       *get_qmin_qmax_for_qType(onnx.TensorProto.UINT8))
        graph.initializer.extend([numpy_helper.from_array(np.asarray(scale, np.float32).reshape(()), f"{t}_scale"),
                                  numpy_helper.from_array(np.asarray(zero, np.uint8).reshape(()), f"{t}_zero_point")])
        nodes += [helper.make_node("QuantizeLinear", [t, f"{t}_scale", f"{t}_zero_point"], [f"{t}_q"], f"{t}_quantize"),
                  helper.make_node("DequantizeLinear", [f"{t}_q", f"{t}_scale", f"{t}_zero_point"], [f"{t}_dq"],
                                   f"{t}_dequantize")]
        for reader in readers[t]:
            if reader.op_type != "QuantizeLinear":
                reader.input[:] = [f"{t}_dq" if i == t else i for i in reader.input]
    del graph.node[:]
    graph.node.extend(nodes)
    onnx.checker.check_model(model)
    onnx.save(model, str(out))
    return floats


def quantize_qat(model: torch.nn.Module, contract: InputContract, train: SlabSet, folder: Path, *, opset: int,
                 epochs: int, learning_rate: float, calibration: np.ndarray, seed: int = 0,
                 teacher: Teacher | None = None, flip_axes: Sequence[int] = (FLIP_SPATIAL_AXIS,)) -> tuple[Path, Path]:
    """QAT on `train`; torchao's program exported as QDQ ONNX, and the same graph with the
    convolution outputs it leaves in float quantised at ranges over `calibration`
    (:func:`quantise_float_convolutions`), which ONNX Runtime runs integer end to end.

    Returns ``(int8 ONNX for ONNX Runtime, torchao's own QDQ export)``; both in `folder`."""
    _, converted = finetune(model, train, epochs=epochs, learning_rate=learning_rate, seed=seed, teacher=teacher,
                            flip_axes=flip_axes)
    return export_converted(converted, contract, folder, opset=opset, calibration=calibration)


def export_converted(converted: torch.fx.GraphModule, contract: InputContract, folder: Path, *, opset: int,
                     calibration: np.ndarray) -> tuple[Path, Path]:
    """The converted QAT program as torchao's QDQ ONNX and as the graph ONNX Runtime serves
    (:func:`quantize_qat`)."""
    import onnx

    qdq = onnx_export.export_onnx(converted, contract, folder / "model.qat.qdq.onnx", opset)
    int8 = folder / "model.qat.int8.onnx"
    calibrated = quantise_float_convolutions(qdq, int8, calibration)
    proto = onnx.load(str(int8))
    onnx_export.set_metadata(proto, {
        "dicomops.quantization": ("int8 qdq from quantisation-aware training (torchao PT2E, X86 quantiser: per-channel "
                                  "symmetric int8 weights, uint8 activations at the learnt ranges); "
                                  f"{len(calibrated)} convolution output(s) it left in float at minmax ranges"),
        "dicomops.calibration_samples": str(len(calibration))})
    onnx.save(proto, str(int8))
    return int8, qdq


def held_out_table(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """Per engine: AUC per fold and vendor (pooled over the folds per vendor), the mean over folds, and
    its difference from FP32's with a 95 % paired bootstrap interval (:func:`paired_difference`)."""
    from sklearn.metrics import roc_auc_score

    frame = pd.DataFrame(rows)
    out = []
    for engine, part in frame.groupby("engine", sort=False):
        folds = [roc_auc_score(p.label, p.score) for _, p in part.groupby("fold") if p.label.nunique() == 2]
        row = {"engine": engine, "mean_fold_auc": float(np.mean(folds)) if folds else float("nan"),
               "pooled_auc": float(roc_auc_score(part.label, part.score)) if part.label.nunique() == 2 else float("nan")}
        for vendor, vp in part.groupby("vendor"):
            row[f"auc.{vendor}"] = float(roc_auc_score(vp.label, vp.score)) if vp.label.nunique() == 2 else float("nan")
        if "fp32" in set(frame.engine):
            row |= dict(zip(("vs_fp32", "vs_fp32_low", "vs_fp32_high"),
                            paired_difference(frame, str(engine), "fp32"), strict=True))
        out.append(row)
    return pd.DataFrame(out)


def paired_difference(frame: pd.DataFrame, engine: str, baseline: str, resamples: int = 2000,
                      seed: int = 0) -> tuple[float, float, float]:
    """`engine`'s mean fold AUC minus `baseline`'s, and the 2.5th and 97.5th percentiles of that
    difference over `resamples` paired bootstrap draws: each draw takes every fold's positive and
    negative series with replacement (stratified, as the card's interval,
    :func:`dicomops.training.metrics.bootstrap_aucs`), and both engines are judged on the same
    draw. About 30 series per fold make a difference of 0.005 hard to resolve; the interval says
    how hard. A fold holding one class sits out, as it does from the mean fold AUC."""
    from sklearn.metrics import roc_auc_score

    from dicomops.training.metrics import bootstrap_aucs

    point, draws = [], []
    for fold, part in frame[frame.engine.isin([engine, baseline])].groupby("fold"):
        wide = part.pivot_table(index="SeriesInstanceUID", columns="engine", values="score")
        y = part.drop_duplicates("SeriesInstanceUID").set_index("SeriesInstanceUID").label.loc[wide.index].to_numpy()
        if len(set(y)) < 2:
            continue
        ours, theirs = wide[engine].to_numpy(), wide[baseline].to_numpy()
        point.append(roc_auc_score(y, ours) - roc_auc_score(y, theirs))
        aucs = bootstrap_aucs(y, [ours, theirs], resamples, seed + int(fold))
        draws.append(aucs[:, 0] - aucs[:, 1])
    if not point:
        return float("nan"), float("nan"), float("nan")
    low, high = np.percentile(np.mean(draws, axis=0), [2.5, 97.5])
    return float(np.mean(point)), float(low), float(high)


def teacher_of(layout: Any, tracking_uri: str, run_id: str, cfg: TrainConfig, train: SlabSet,
               fold: int | None) -> Teacher | None:
    """For a version distilled from a teacher (``cfg.distill_from``), that teacher's targets for
    `train` from its fold-`fold` model (None: its final model), as the version's own training took
    them; None for a version trained on labels alone. `run_id` is the version's training run.

    The fine-tune keeps the loss the version was trained with; on labels alone it is pulled towards
    another solution than the one distilled. Measured on the minimal student distilled from the
    segmenter (2026-12-03, batch-norm statistics still updated then): held-out QAT 0.637 with the
    teacher, 0.635 without; what hurt there were the statistics (:func:`finetune`)."""
    if cfg.distill_from is None:
        return None
    from dicomops.training.distill import teacher_targets

    logits = teacher_targets(layout, tracking_uri, cfg.model_name, cfg.distill_from, run_id, train, fold)
    return Teacher(logits, cfg.distill_alpha, cfg.distill_temperature)


FINETUNED = "fp32-finetuned"  # held_out's control engine


def held_out(layout: Any, tracking_uri: str, run_id: str, contract: InputContract, folder: Path, *, opset: int,
             epochs: int, learning_rate: float, calibration_samples: int, float_head: bool = False) -> pd.DataFrame:
    """FP32, post-training INT8 and QAT INT8 of each fold's model, judged on that fold's validation
    series, which none of the three saw: the fold model trained without them, PTQ calibrates and
    QAT fine-tunes on the fold's training slabs only. Rows: one per (fold, engine, series). With
    `float_head` both INT8 graphs run their input-resolution convolutions in float
    (:func:`dicomops.export.quantize.keep_in_float`), as the served graph was chosen to.

    A fourth engine, ``fp32-finetuned``, is QAT's control: each fold's model after the QAT fine-tune's
    steps without fake quantisation (:func:`finetune`), in FP32. QAT against it is what quantisation
    costs; FP32 against it is what the fine-tune itself does (more training, and away from the epoch
    that early stopping chose on these very series).

    `run_id` is the version's training run; its fold runs hold the fold models (``weights/``).
    """
    from dicomops.tracking.registry import load_weights
    from dicomops.training.data import build_slab_set, load_volume
    from dicomops.training.distill import fold_run
    from dicomops.training.model import model_from_config

    folds = layout.read_folds()
    series = layout.labelled_series().set_index("SeriesInstanceUID")
    pre = layout.preprocessed
    paths = pre.read_index().set_index("SeriesInstanceUID").path
    rows: list[dict[str, Any]] = []
    for fold in range(folds.n_splits):
        model, raw = load_weights(tracking_uri, fold_run(tracking_uri, run_id, fold), model_from_config)
        logged = TrainConfig.from_logged(raw)
        k, size, rule = int(raw["in_channels"]), int(raw["input_size"]), SeriesRule.of(logged)
        train = build_slab_set(layout, folds.train(fold), k, size)
        pick = np.sort(np.random.default_rng(fold).permutation(len(train.y))[:calibration_samples])
        calibration = train.x[pick].float().numpy()
        where = folder / f"fold-{fold}"
        where.mkdir(parents=True, exist_ok=True)
        fp32 = onnx_export.export_onnx(model, contract, where / "model.onnx", opset)
        engines = {"fp32": fp32, "int8-ptq": quantize.quantize_int8(fp32, where / "model.int8.onnx", calibration)}
        teacher = teacher_of(layout, tracking_uri, run_id, logged, train, fold)
        engines["int8-qat"] = quantize_qat(model, contract, train, where, opset=opset, epochs=epochs,
                                           learning_rate=learning_rate, calibration=calibration, seed=fold,
                                           teacher=teacher, flip_axes=logged.flip_axes)[0]
        tuned, _ = finetune(model, train, epochs=epochs, learning_rate=learning_rate, seed=fold, teacher=teacher,
                            fake_quantise=False, flip_axes=logged.flip_axes)
        engines[FINETUNED] = onnx_export.export_onnx(tuned, contract, where / "model.finetuned.onnx", opset)
        for engine in ("int8-ptq", "int8-qat") if float_head else ():
            quantize.keep_in_float(engines[engine], engines[engine])
        volumes = {uid: load_volume(pre.volume(paths[uid])) for uid in folds.val(fold)}
        for engine, path in engines.items():
            for uid, score in quantize.series_scores(path, volumes, k, size, rule).items():
                rows.append({"fold": fold, "engine": engine, "SeriesInstanceUID": uid,
                             "vendor": series.loc[uid, "vendor"], "label": int(series.loc[uid, "label"]),
                             "score": score})
        aucs = held_out_table([r for r in rows if r["fold"] == fold]).set_index("engine")["pooled_auc"]
        progress.PROGRESS.info("held-out INT8, fold %d: AUC %s", fold,
                               ", ".join(f"{engine} {auc:.3f}" for engine, auc in aucs.items()))
    return pd.DataFrame(rows)
