"""ONNX export with a dynamic batch axis, the input contract in the metadata, and parity checks.

The exported graph ends in a softmax, so every consumer (ONNX Runtime, TensorRT, Triton) returns
the probabilities the series score is built from, and parity is judged on those probabilities.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dicomops.errors import ExportCheckError
from dicomops.export.contract import INPUT_NAME, METADATA_KEY, OUTPUT_NAME, InputContract

log = logging.getLogger(__name__)


class ProbabilityHead(torch.nn.Module):
    """The classifier followed by a softmax over its two logits."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.model(x), dim=1)

    @classmethod
    def for_inference(cls, model: torch.nn.Module) -> ProbabilityHead:
        """The head over `model` in eval mode. A quantised PT2E program refuses ``.eval()`` (its own
        ``move_exported_model_to_eval`` put it there), so only a plain module is switched."""
        head = cls(model)
        head.training = False
        if not isinstance(model, torch.fx.GraphModule):
            model.eval()
        return head


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def export_onnx(model: torch.nn.Module, contract: InputContract, path: Path, opset: int,
                max_batch: int = 1024) -> Path:
    """Export `model` (logits) as ``slab → probability`` with a dynamic batch axis.

    The model is put in eval mode first: an export in train mode would bake batch statistics into
    BatchNorm and fail the parity check. The contract and the opset go into ``metadata_props``.
    """
    import onnx

    head = ProbabilityHead.for_inference(model)
    example = torch.zeros((2, *contract.input_shape), dtype=torch.float32)
    batch = torch.export.Dim("batch", min=1, max=max(2, max_batch))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    program = torch.onnx.export(head, (example,), dynamo=True, opset_version=opset, input_names=[INPUT_NAME],
                                output_names=[OUTPUT_NAME], dynamic_shapes={"x": {0: batch}}, external_data=False,
                                verbose=False)
    assert program is not None
    program.save(str(tmp), external_data=False)
    proto = onnx.load(str(tmp))
    global_average_pools(proto)
    write_metadata(proto, contract, {"dicomops.opset": str(opset)})
    onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, str(tmp))
    os.replace(tmp, path)
    return path


def global_average_pools(proto: Any) -> int:
    """Replace each ``ReduceMean`` over the two spatial axes of a 4-D tensor, dimensions kept, by
    the ``GlobalAveragePool`` it is (torch exports ``adaptive_avg_pool2d(x, 1)`` as the former).
    The same mean, but ONNX Runtime quantises only the latter: between quantise/dequantise pairs
    it runs as an integer ``QLinearGlobalAveragePool`` in the integer layers' NHWC layout, where a
    ``ReduceMean`` goes back to float and NCHW through a transpose (the last float island of the
    minimal student's INT8 graph). Returns how many it replaced."""
    import onnx
    from onnx import helper, numpy_helper

    inferred = onnx.shape_inference.infer_shapes(proto)
    ranks = {v.name: len(v.type.tensor_type.shape.dim)
             for v in (*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output)}
    initialisers = {i.name: i for i in proto.graph.initializer}
    constants = {n.output[0]: n.attribute[0].t for n in proto.graph.node
                 if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"}
    orphans: set[str] = set()
    replaced = 0
    for index, node in enumerate(proto.graph.node):
        if node.op_type != "ReduceMean" or ranks.get(node.input[0]) != 4:
            continue
        attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        given = initialisers.get(node.input[1], constants.get(node.input[1])) if len(node.input) > 1 else None
        axes = list(attributes.get("axes", [])) if given is None else list(numpy_helper.to_array(given).reshape(-1))
        if sorted(int(a) % 4 for a in axes) != [2, 3] or attributes.get("keepdims", 1) != 1:
            continue
        orphans.update(node.input[1:])
        replaced += 1
        proto.graph.node[index].CopyFrom(helper.make_node("GlobalAveragePool", [node.input[0]], list(node.output),
                                                          node.name))
    orphans -= {name for n in proto.graph.node for name in n.input}  # axes nothing else reads go too
    kept = [i for i in proto.graph.initializer if i.name not in orphans]
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(kept)
    alive = [n for n in proto.graph.node if not (n.op_type == "Constant" and n.output[0] in orphans)]
    del proto.graph.node[:]
    proto.graph.node.extend(alive)
    return replaced


def write_metadata(proto: Any, contract: InputContract, extra: dict[str, str] | None = None) -> None:
    """Put the contract (and `extra` keys) into an ONNX model's ``metadata_props``, replacing old ones."""
    set_metadata(proto, {METADATA_KEY: contract.to_json(), **(extra or {})})


def set_metadata(proto: Any, entries: dict[str, str]) -> None:
    """Put `entries` into an ONNX model's ``metadata_props``, replacing the old values of those keys."""
    kept = [p for p in proto.metadata_props if p.key not in entries]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    for key, value in entries.items():
        prop = proto.metadata_props.add()
        prop.key, prop.value = key, value


def read_contract(path: Path) -> InputContract:
    """The contract an ONNX file carries; a file without one is refused."""
    import onnx

    props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    if METADATA_KEY not in props:
        raise ExportCheckError(f"{path} carries no '{METADATA_KEY}' metadata; export it with dicomops export")
    return InputContract.from_mapping(props[METADATA_KEY])


def session(path: Path, threads: int = 2) -> Any:
    """An ONNX Runtime CPU session with a fixed thread count (timings depend on it)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def check_input(sess: Any, x: np.ndarray) -> None:
    """Refuse an input whose per-sample shape or dtype differs from the model's input."""
    spec = sess.get_inputs()[0]
    expected = tuple(spec.shape[1:])
    if x.ndim != 4 or tuple(x.shape[1:]) != expected or x.dtype != np.float32:
        raise ValueError(f"input {x.dtype}{tuple(x.shape)} does not match the model's {spec.name}: "
                         f"float32 (batch, {', '.join(map(str, expected))}); see the ONNX metadata "
                         f"'{METADATA_KEY}' for spacing, window and layout")


def run_onnx(sess: Any, x: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Probabilities (N, 2) for slabs `x` (N, C, H, W), in batches."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    check_input(sess, x)
    name = sess.get_inputs()[0].name
    out = [sess.run(None, {name: x[i:i + batch_size]})[0] for i in range(0, len(x), batch_size)]
    return np.concatenate(out) if out else np.zeros((0, 2), np.float32)


def run_torch(model: torch.nn.Module, x: np.ndarray, batch_size: int = 64) -> np.ndarray:
    head = ProbabilityHead.for_inference(model)
    with torch.no_grad():
        return np.concatenate([head(torch.from_numpy(np.ascontiguousarray(x[i:i + batch_size], np.float32))).numpy()
                               for i in range(0, len(x), batch_size)])


@dataclass(frozen=True)
class Parity:
    max_abs_diff: float
    mean_abs_diff: float
    samples: int
    tolerance: float

    @property
    def ok(self) -> bool:
        return self.max_abs_diff <= self.tolerance


def compare(reference: np.ndarray, candidate: np.ndarray, tolerance: float) -> Parity:
    diff = np.abs(np.asarray(reference, np.float64) - np.asarray(candidate, np.float64))
    return Parity(float(diff.max()) if diff.size else 0.0, float(diff.mean()) if diff.size else 0.0,
                  len(reference), tolerance)


def check_parity(model: torch.nn.Module, path: Path, samples: np.ndarray, tolerance: float,
                 what: str = "ONNX") -> Parity:
    """Probabilities of the ONNX file against the torch model's; raise above `tolerance`."""
    parity = compare(run_torch(model, samples), run_onnx(session(path), samples), tolerance)
    if not parity.ok:
        raise ExportCheckError(
            f"{what} parity failed: max |Δp| {parity.max_abs_diff:.2e} over {parity.samples} validation "
            f"slabs exceeds {tolerance:.0e}. Was the model exported in train mode, or fed another layout?")
    log.info("%s parity: max |Δp| %.2e over %d slabs", what, parity.max_abs_diff, parity.samples)
    return parity
