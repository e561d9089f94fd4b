"""torchao's rewrite patterns traced once per process (dicomops.export.qat.trace_patterns_once): a
pattern is traced once and each caller gets a copy of its graph, patterns that differ in a flag or
a constant are kept apart, and what cannot be keyed safely is traced afresh."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F

from dicomops.export import qat


def _torchao_pattern(is_per_channel: bool, has_bias: bool, bn_is_training: bool) -> Any:
    from torchao.quantization.pt2e import qat_utils

    return qat_utils._get_quantized_qat_conv_bn_pattern(is_per_channel, has_bias, has_bias, F.conv2d, bn_is_training)


def _scaled(scale: Any) -> Any:
    from torchao.quantization.pt2e.export_utils import WrapperModule

    def pattern(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, w) * scale

    return WrapperModule(pattern)


def test_each_pattern_is_traced_once_and_every_caller_gets_its_own_copy() -> None:
    from torchao.quantization.pt2e import qat_utils, utils

    qat.trace_patterns_once()
    qat.trace_patterns_once()  # installed once: torchao's own function is never wrapped twice
    trace = utils._get_aten_graph_module_for_pattern
    assert trace is qat_utils._get_aten_graph_module_for_pattern and trace._dicomops_traced_once
    example = (torch.randn(1, 1, 3, 3), torch.randn(1, 1, 1, 1))
    kept = len(qat._PATTERNS)
    first = trace(_scaled(2.0), example)
    again = trace(_scaled(2.0), tuple(torch.randn_like(t) for t in example))  # built anew, other values
    assert len(qat._PATTERNS) == kept + 1  # traced once
    assert again is not first and again.code == first.code  # a copy: the caller may rewrite it
    other = trace(_scaled(3.0), example)
    trace(_scaled(2), example)  # 2 == 2.0 in Python, not in a graph
    assert len(qat._PATTERNS) == kept + 3
    assert "3.0" in other.code and "3.0" not in first.code


def test_torchaos_patterns_that_differ_in_a_flag_are_kept_apart() -> None:
    keys = {qat._pattern_key(_torchao_pattern(*flags)) for flags in
            [(True, True, True), (False, True, True), (True, False, True), (True, True, False)]}
    assert len(keys) == 4
    assert qat._pattern_key(_torchao_pattern(True, True, True)) == qat._pattern_key(_torchao_pattern(True, True, True))
    assert qat._pattern_key(True) != qat._pattern_key(1) != qat._pattern_key(1.0)


def test_what_cannot_be_keyed_safely_is_refused_a_key() -> None:
    constant = torch.ones(3)

    def closes_over_a_tensor(x: torch.Tensor) -> torch.Tensor:
        return x + constant  # a constant of its graph: its values matter, not its shape

    def refers_to_itself(x: torch.Tensor) -> torch.Tensor:
        return refers_to_itself(x)

    for pattern in (closes_over_a_tensor, refers_to_itself, object()):
        with pytest.raises(TypeError):
            qat._pattern_key(pattern)
    # example inputs are traced as inputs: their shapes and dtypes make the graph, not their values
    assert qat._pattern_key((torch.zeros(2, 3),), inputs=True) == qat._pattern_key((torch.ones(2, 3),), inputs=True)
    assert qat._pattern_key((torch.zeros(2, 3),), inputs=True) != qat._pattern_key((torch.zeros(2, 4),), inputs=True)
