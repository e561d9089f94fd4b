"""OpenVINO on CPU: the exported ONNX files, FP32 and the QDQ INT8, compiled by OpenVINO's CPU plugin.

ONNX Runtime's CPU kernels (MLAS) gain little from INT8 on these networks: their convolutions are
narrow, and its integer convolution pays for packing and for the layout transposes around it (README,
*Lightweight models*). OpenVINO reads the same QDQ file, folds each quantise/dequantise pair into the
convolution after it and runs the integer convolutions on oneDNN's kernels (AMX, AVX-512 VNNI or
AVX2, whichever the CPU has) in its own blocked layout, with no transposes between them. So the
exported INT8 file is the same bytes whichever runtime serves it, checked for parity and accuracy
in each.

Precision is always stated: on a CPU with AMX-BF16, OpenVINO otherwise runs a float model's layers
in bfloat16. Here FP32 means FP32 (``INFERENCE_PRECISION_HINT`` ``f32``), so the FP32 engine agrees
with ONNX Runtime's to float rounding and the INT8 engine's float layers (softmax, the float head)
stay float32.

Nothing here needs a particular CPU; :func:`availability` says when the ``openvino`` package is
missing, and the export records that reason on the version as it does TensorRT's.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import threading
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

# The layer types that do the arithmetic; their runtime precision says whether INT8 reached the kernels.
ARITHMETIC_LAYERS = ("Convolution", "GroupConvolution", "FullyConnected", "MatMul", "Deconvolution")
INTEGER_PRECISIONS = ("u8", "i8")


class _SignalStack(ctypes.Structure):
    _fields_ = [("ss_sp", ctypes.c_void_p), ("ss_flags", ctypes.c_int), ("ss_size", ctypes.c_size_t)]


def _signal_stack() -> _SignalStack | None:
    """This thread's alternate signal stack (``sigaltstack``), or None where libc has none to ask."""
    try:
        stack = _SignalStack()
        return stack if ctypes.CDLL(None).sigaltstack(None, ctypes.byref(stack)) == 0 else None
    except (OSError, AttributeError):
        return None


# OpenVINO's CPU plugin gives the thread that makes a compiled model an alternate signal stack of its
# own and puts back, when the model is freed, the one it found: models freed in another order than
# they were made leave the thread on a stack already freed, and the next signal it takes (SIGTERM
# from an operator, Prefect cancelling a run) is a segmentation fault instead of the handler
# (2026-12-07, OpenVINO 2026.4). So each thread's stack from before its first model is remembered,
# the runner frees its model itself, and the thread that freed it gets that stack back (or, where it
# made no model, the one it had just before).
_THREAD_STACKS: dict[int, _SignalStack | None] = {}


def _remember_signal_stack() -> None:
    _THREAD_STACKS.setdefault(threading.get_ident(), _signal_stack())


def _set_signal_stack(stack: _SignalStack | None) -> None:
    if stack is not None:
        ctypes.CDLL(None).sigaltstack(ctypes.byref(stack), None)


def availability() -> str | None:
    """None when OpenVINO can compile models here, else the exact reason it cannot."""
    if importlib.util.find_spec("openvino") is None:
        return "openvino not installed; pip install -e . (it is a dependency of dicomops)"
    return None


def compile_model(path: Path, threads: int = 2) -> Any:
    """`path` (ONNX) compiled for this CPU with `threads` threads, float layers in float32, one stream."""
    import openvino as ov

    core = ov.Core()
    return core.compile_model(str(path), "CPU", {"INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": "f32",
                                                 "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1})


class OpenVinoRunner:
    """One compiled model and one inference request: slabs (N, C, H, W) float32 → the model's
    (N, 2) probabilities. Calls are serialised (an inference request is not re-entrant).

    OpenVINO's CPU plugin prepares its kernels and memory for each input shape it meets, 15-35 ms
    the first time (the classifier, 2026-12-07), which a series' last, shorter batch paid on nearly
    every series. So the runner meets every batch size from 1 to `max_batch` once when it is made
    (0.45 s for 32 sizes of the classifier): on a mix of batch sizes it then ran 4,600-4,900 slabs/s,
    where padding each call to the next power of two gave 3,000-3,300 and ONNX Runtime's FP32
    2,100."""

    def __init__(self, path: Path, threads: int = 2, max_batch: int = 32) -> None:
        _remember_signal_stack()
        self.compiled = compile_model(path, threads)
        self.request = self.compiled.create_infer_request()
        self.lock = threading.Lock()
        sample = tuple(int(d.get_length()) for d in self.compiled.input(0).get_partial_shape()[1:])
        slabs = np.zeros((max_batch, *sample), np.float32)
        for size in range(1, max_batch + 1):
            self(slabs[:size])

    def close(self) -> None:
        """Free the model now, and put back this thread's signal stack (see above)."""
        before = _signal_stack()
        for name in ("request", "compiled"):
            if hasattr(self, name):
                delattr(self, name)
        _set_signal_stack(_THREAD_STACKS.get(threading.get_ident(), before))

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # at interpreter exit ctypes or threading may be gone
            self.close()

    def __call__(self, x: np.ndarray) -> np.ndarray:
        with self.lock:
            # share_inputs: the request reads the caller's array in place (as ONNX Runtime does) instead of
            # copying it, 14 MB for 32 slabs of 3 x 192 x 192, which was a fifth of an INT8 call's time
            result = self.request.infer({0: np.ascontiguousarray(x, dtype=np.float32)}, share_inputs=True)
            return np.array(result[0], copy=True)  # the request reuses its output buffer


@dataclass(frozen=True)
class Layers:
    """What OpenVINO's compiled graph runs: each arithmetic layer's runtime precision."""

    precisions: dict[str, int]  # "Convolution u8" -> count

    @property
    def arithmetic(self) -> int:
        return sum(self.precisions.values())

    @property
    def integer(self) -> int:
        return sum(n for key, n in self.precisions.items() if key.rsplit(" ", 1)[1] in INTEGER_PRECISIONS)

    def describe(self) -> str:
        return ", ".join(f"{n} {key}" for key, n in sorted(self.precisions.items()))


def layers(compiled: Any) -> Layers:
    """The runtime precision of each arithmetic layer of a compiled model: an INT8 graph whose
    convolutions run in u8/i8 reached the integer kernels; one in f32 has a float island."""
    counts: Counter[str] = Counter()
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        kind = str(info["layerType"].astype(str))
        if kind in ARITHMETIC_LAYERS:
            counts[f"{kind} {info['runtimePrecision'].astype(str)}"] += 1
    return Layers(dict(counts))


def run_batches(runner: OpenVinoRunner, x: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """Probabilities (N, 2) for slabs `x`, in batches of `batch_size`."""
    out = [runner(x[i:i + batch_size]) for i in range(0, len(x), batch_size)]
    return np.concatenate(out) if out else np.zeros((0, 2), np.float32)
