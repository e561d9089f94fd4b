"""torchao's rewrite patterns traced once per process (dicomops.export.qat.patterns_once): a kept
pattern is the graph a fresh trace makes, patterns that differ in a flag are kept apart, and what
cannot be keyed safely is traced afresh."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dicomops.export import qat


def _patterns(is_per_channel: bool, has_bias: bool, bn_is_training: bool) -> tuple:
    from torchao.quantization.pt2e import qat_utils

    kwargs = qat_utils._get_quantized_conv_bn_example_inputs_kwargs(is_per_channel, has_bias, has_bias, False)
    pattern = qat_utils._get_quantized_qat_conv_bn_pattern(is_per_channel, has_bias, has_bias, F.conv2d,
                                                            bn_is_training)
    return pattern, kwargs


def _example() -> tuple[torch.Tensor, ...]:
    """The example inputs torchao's convert gives its quantized conv2d + batch-norm patterns."""
    return (torch.randn(1, 1, 3, 3), torch.randn(1, 1, 1, 1), torch.randn(1), torch.randn(1), torch.randn(1),
            torch.randn(1))


def test_a_kept_pattern_is_the_graph_a_fresh_trace_makes_and_flags_keep_patterns_apart() -> None:
    from torchao.quantization.pt2e import utils

    example = _example()
    pattern, kwargs = _patterns(True, True, True)
    fresh = utils._get_aten_graph_module_for_pattern(pattern, example, False, **kwargs)
    with qat.patterns_once():
        first = utils._get_aten_graph_module_for_pattern(pattern, example, False, **kwargs)
        again, again_kwargs = _patterns(True, True, True)  # built anew, as torchao builds it on each call
        kept = utils._get_aten_graph_module_for_pattern(again, tuple(torch.randn_like(t) for t in example), False,
                                                        **again_kwargs)
    assert kept is not first  # a copy: the caller may rewrite it
    assert kept.code == first.code == fresh.code
    assert utils._get_aten_graph_module_for_pattern.__name__ == "_get_aten_graph_module_for_pattern"  # restored

    keys = {qat._pattern_key(_patterns(*flags)[0]) for flags in
            [(True, True, True), (False, True, True), (True, False, True), (True, True, False)]}
    assert len(keys) == 4
    assert qat._pattern_key(_patterns(True, True, True)[0]) == qat._pattern_key(_patterns(True, True, True)[0])


def test_what_cannot_be_keyed_safely_is_refused_a_key() -> None:
    import pytest

    constant = torch.ones(3)

    def closes_over_a_tensor(x: torch.Tensor) -> torch.Tensor:
        return x + constant  # a constant of its graph: its values matter, not its shape

    with pytest.raises(TypeError):
        qat._pattern_key(closes_over_a_tensor)
    with pytest.raises(TypeError):
        qat._pattern_key(object())  # known by its identity alone
    # example inputs are traced as inputs: their shapes and dtypes make the graph, not their values
    assert qat._pattern_key((torch.zeros(2, 3),), inputs=True) == qat._pattern_key((torch.ones(2, 3),), inputs=True)
    assert qat._pattern_key((torch.zeros(2, 3),), inputs=True) != qat._pattern_key((torch.zeros(2, 4),), inputs=True)
