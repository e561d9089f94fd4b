"""torchao's QAT prepare and convert with its rewrite patterns traced once per process, against
torchao as it is, in the same run.

Reproduce: ``.venv/bin/python benchmarks/qat_patterns.py``.

``prepare_qat_pt2e``, ``move_exported_model_to_eval`` and ``convert_pt2e`` (torchao 0.18) trace
every convolution + batch-norm pattern they match with ``torch.export``, each call anew.
:func:`dicomops.export.qat.trace_patterns_once` keeps them for the rest of the process. What a QAT
fine-tune does with them is timed here without the fine-tune's steps: prepare, the eval switch,
one forward pass, convert, on the served classifier (``resnet-slim``, 32 px, one thread),
``--rounds`` times as torchao does it, then ``--rounds`` times with the patterns kept (the first of
those fills the cache); the outputs of the converted programs are compared.
"""

from __future__ import annotations

import argparse
import time

import torch

from dicomops.config import TrainConfig
from dicomops.export import qat
from dicomops.training.model import build_model


def one_round(model: torch.nn.Module, x: torch.Tensor, cached: bool) -> tuple[float, torch.Tensor]:
    from torchao.quantization.pt2e import move_exported_model_to_eval
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_qat_pt2e
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        X86InductorQuantizer,
        get_default_x86_inductor_quantization_config,
    )

    start = time.perf_counter()
    if cached:  # dicomops's own path: prepare installs the cache for the process
        prepared = qat.prepare(model, x[:2])
        move_exported_model_to_eval(prepared)
        prepared(x)
        converted = convert_pt2e(prepared)
    else:
        batch = torch.export.Dim("batch", min=1, max=1024)
        program = torch.export.export(model, (x[:2],), dynamic_shapes=({0: batch},)).module()
        qat._one_partition_per_call(program)
        quantizer = X86InductorQuantizer().set_global(get_default_x86_inductor_quantization_config(is_qat=True))
        prepared = prepare_qat_pt2e(program, quantizer)
        move_exported_model_to_eval(prepared)
        prepared(x)
        converted = convert_pt2e(prepared)
    seconds = time.perf_counter() - start
    with torch.no_grad():
        return seconds, converted(x)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = build_model(TrainConfig(input_size=32), 3).eval()
    x = torch.randn(8, 3, 32, 32)
    times: dict[bool, list[float]] = {False: [], True: []}
    outputs: dict[bool, torch.Tensor] = {}
    for cached in (False, True):  # torchao as it is first: the cache, once installed, stays
        for _ in range(args.rounds):
            seconds, out = one_round(model, x, cached)
            times[cached].append(seconds)
            outputs[cached] = out
    diff = (outputs[False] - outputs[True]).abs().max().item()
    plain, once = times[False], times[True]
    print(f"torchao as it is: {', '.join(f'{t:.1f}' for t in plain)} s per prepare + convert")
    print(f"patterns traced once (first round fills the cache): {', '.join(f'{t:.1f}' for t in once)} s")
    print(f"after the first round: {min(plain[1:] or plain) / min(once[1:] or once):.1f}x faster; "
          f"{len(qat._PATTERNS)} patterns kept; converted outputs differ by at most {diff:.3g}")


if __name__ == "__main__":
    main()
