"""The export's INT8 check on what is served, the series score: INT8 that keeps every slab's AUC
but moves the log-odds of confident negative slabs changes the ranking of series under the
classifier's ``top_k_contrast`` rule, which the slab check cannot see (found on the demo's
classifier, 2026-12-07: slab AUC drop −0.0005, series AUC 0.991 → 0.842).

Two real ONNX graphs stand for the FP32 and INT8 files: both read a slab's mean value m; "FP32"
gives the log-odds 20·m − 14, "INT8" the same less 300·relu(0.25 − m), as post-training INT8 did to
the demo's confident negative slabs and to nothing else."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from sklearn.metrics import roc_auc_score

from dicomops.export import quantize
from dicomops.training.data import all_slabs
from dicomops.training.scoring import SeriesRule, series_score

CONTRAST = SeriesRule(3, "top_k_contrast")
K, SIZE = 3, 8


def _graph(path: Path, tail: float) -> Path:
    """slab (N, 3, H, W) → probability (N, 2) from m, the slab's mean: log-odds 20·m − 14 − tail·relu(0.25 − m)."""
    const = {"third": np.full((K, 1), 1 / K, np.float32), "a": np.array(20.0, np.float32),
             "b": np.array(-14.0, np.float32), "t": np.array(0.25, np.float32), "c": np.array(tail, np.float32),
             "zero": np.array(0.0, np.float32)}
    nodes = [helper.make_node("GlobalAveragePool", ["slab"], ["p"]), helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("MatMul", ["f", "third"], ["m"]), helper.make_node("Mul", ["m", "a"], ["am"]),
             helper.make_node("Add", ["am", "b"], ["l"]), helper.make_node("Sub", ["t", "m"], ["below"]),
             helper.make_node("Relu", ["below"], ["r"]), helper.make_node("Mul", ["r", "c"], ["cut"]),
             helper.make_node("Sub", ["l", "cut"], ["l1"]), helper.make_node("Mul", ["m", "zero"], ["l0"]),
             helper.make_node("Concat", ["l0", "l1"], ["logits"], axis=1),
             helper.make_node("Softmax", ["logits"], ["probability"], axis=1)]
    graph = helper.make_graph(nodes, "series", [helper.make_tensor_value_info("slab", TensorProto.FLOAT, ["N", K, SIZE, SIZE])],
                              [helper.make_tensor_value_info("probability", TensorProto.FLOAT, ["N", 2])],
                              [numpy_helper.from_array(v, k) for k, v in const.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.save(model, str(path))
    return path


def _volumes() -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """Eight series of 40 slices, each slice of one value: three bright ones where the nodule is
    (brighter in the positives), the rest dark, a little darker in the negatives: "INT8" cuts
    those, and only those, to log-odds below −16."""
    rng = np.random.default_rng(0)
    volumes, labels = {}, {}
    for i in range(8):
        label = i % 2
        values = rng.uniform(0.26, 0.30, 40) if label else rng.uniform(0.18, 0.22, 40)
        values[18:21] = 0.95 if label else 0.65
        volumes[f"s{i}"] = np.broadcast_to(values, (16, 16, 40)).astype(np.float32).copy()
        labels[f"s{i}"] = label
    return volumes, labels


def _check(fp32: Path, int8: Path, volumes: dict[str, np.ndarray], labels: dict[str, int]) -> quantize.SeriesCheck:
    """The export's ONNX Runtime check: both files' series scores compared on the labels."""
    return quantize.SeriesCheck.of(quantize.series_scores(fp32, volumes, K, SIZE, CONTRAST),
                                   quantize.series_scores(int8, volumes, K, SIZE, CONTRAST), labels, 0.01)


def test_int8_that_keeps_the_slabs_but_moves_the_series_fails_and_says_what_to_do(tmp_path: Path) -> None:
    fp32, int8 = _graph(tmp_path / "fp32.onnx", 0.0), _graph(tmp_path / "int8.onnx", 300.0)
    volumes, labels = _volumes()
    slabs = {uid: all_slabs(v, K, SIZE).numpy() for uid, v in volumes.items()}
    y = np.concatenate([[labels[u]] * 40 for u in volumes])
    by_file = {path: {u: quantize.run_onnx(quantize.session(path), x)[:, 1] for u, x in slabs.items()}
               for path in (fp32, int8)}
    slab_auc = [roc_auc_score(y, np.concatenate(list(by_file[path].values()))) for path in (fp32, int8)]
    assert slab_auc[1] >= slab_auc[0] - 0.01  # the slab check passes

    check = _check(fp32, int8, volumes, labels)
    scores = {path: {u: series_score(p, CONTRAST) for u, p in by_file[path].items()} for path in (fp32, int8)}
    assert check.samples == 8 and check.auc_fp32 == 1.0 and check.auc_int8 < 0.5 and not check.ok
    assert check.auc_int8 == pytest.approx(roc_auc_score(list(labels.values()), list(scores[int8].values())))
    assert check.max_abs_diff == pytest.approx(max(abs(scores[fp32][u] - scores[int8][u]) for u in volumes))
    verdict = check.verdict()
    assert verdict.startswith("failed: series AUC 1.0000 -> ") and "--int8 qat" in verdict
    assert quantize.int8_refusal({quantize.SERIES_CHECK_TAG: verdict}) == verdict

    same = _check(fp32, fp32, volumes, labels)
    assert same.ok and same.max_abs_diff == 0.0 and same.verdict().startswith("passed: ")
    assert quantize.int8_refusal({quantize.SERIES_CHECK_TAG: same.verdict()}) is None
    assert quantize.int8_refusal({}) is None  # exported before the check: served as before


def test_the_series_check_needs_both_classes(tmp_path: Path) -> None:
    volumes, labels = _volumes()
    positives = {u: v for u, v in volumes.items() if labels[u] == 1}
    fp32 = _graph(tmp_path / "fp32.onnx", 0.0)
    with pytest.raises(ValueError, match="both classes"):
        _check(fp32, fp32, positives, labels)


def test_openvino_has_its_own_verdict_and_follows_onnx_runtime_only_where_it_has_none(tmp_path: Path) -> None:
    """The two runtimes compute the same INT8 file with other kernels, so each engine is refused on its
    own check; OpenVINO falls back on ONNX Runtime's verdict where the export did not judge it."""
    from dicomops.export import openvino_engine

    fp32, int8 = _graph(tmp_path / "fp32.onnx", 0.0), _graph(tmp_path / "int8.onnx", 300.0)
    volumes, labels = _volumes()
    reference = quantize.series_scores(fp32, volumes, K, SIZE, CONTRAST)
    runner = openvino_engine.OpenVinoRunner(int8, 1, 8)
    try:  # OpenVINO really scores the file: the same failure as ONNX Runtime's, by its own arithmetic
        ov = quantize.series_scores_by(lambda x: openvino_engine.run_batches(runner, x, 8), volumes, K, SIZE, CONTRAST)
    finally:
        runner.close()
    ov_check = quantize.SeriesCheck.of(reference, ov, labels, 0.01)
    ort_check = _check(fp32, int8, volumes, labels)
    assert not ov_check.ok and ov_check.auc_int8 == pytest.approx(ort_check.auc_int8, abs=0.05)
    assert ov_check.max_abs_diff == pytest.approx(max(abs(reference[u] - ov[u]) for u in volumes))

    failed, passed = ort_check.verdict(), quantize.SeriesCheck.of(reference, reference, labels, 0.01).verdict()
    ort_tag, ov_tag = quantize.SERIES_CHECK_TAG, quantize.OV_SERIES_CHECK_TAG
    both = {ort_tag: failed, ov_tag: passed}
    assert quantize.int8_refusal(both, "ort-int8") == failed and quantize.int8_refusal(both, "ov-int8") is None
    swapped = {ort_tag: passed, ov_tag: failed}
    assert quantize.int8_refusal(swapped, "ort-int8") is None and quantize.int8_refusal(swapped, "ov-int8") == failed
    for own in ("not run: export.openvino is false", None):  # not judged: ONNX Runtime's verdict stands for it
        tags = {ort_tag: failed, **({ov_tag: own} if own else {})}
        assert quantize.int8_refusal(tags, "ov-int8") == failed
