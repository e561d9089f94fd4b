"""MobileNetV3-Small (Howard et al., 2019), layer for layer as torchvision builds it, for 2.5D slabs.

Written here rather than imported: torchvision's wheels on PyPI are built against CUDA torch, and
beside the CPU build of torch this project installs first they fail to import (``operator
torchvision::nms does not exist``); taking them would mean the 5.5 GB CUDA torch on every CPU
machine. The network is torchvision's ``mobilenet_v3_small`` (width 1.0): the same block table,
squeeze-and-excitation sizes, initialisation and batch-norm epsilon, and, for 3 input channels and
1000 classes, the same 2,542,856 parameters (checked by the tests); the first convolution takes the
slab's k slices instead of RGB.

One setting differs: the batch norms' running statistics follow the batches with momentum 0.1
(PyTorch's default), not torchvision's 0.01. At 0.01 they average over the last ~100 steps, which
suits ImageNet's hundreds of epochs; over this project's ~500 steps at a learning rate of 2e-3 they
lag the weights, and the network in eval mode is another network. Measured on the demo corpus
(2026-12-02, fold 0, 6 epochs at 192 px): its training slabs' slice AUC was 0.637 in eval mode and
0.976 once the statistics were re-estimated over them.

The first convolution's stride is a parameter (``TrainConfig.stem_stride``; torchvision's is 2).
The network reaches 1/4 of its input's resolution after two layers and 1/32 at the end; at 128 px
of a 320 mm crop a 6 mm nodule is 2.4 pixels, gone by the second block. Measured on the demo
corpus (2026-12-02, fold 0, 128 px, 6 epochs, no teacher): series AUC 0.409 at stride 2 and 0.779
at stride 1 (resnet-slim, the classifier, 0.918 at stride 1); halving the width and dropping the
1024-unit head, at stride 2, gave 0.413: the network did not lack data for its size, it could not
see the nodules.

``minimal=True`` builds the "minimalistic" variant that the paper's authors published for integer
hardware (Keras' ``MobileNetV3Small(minimalistic=True)``; torchvision has none): the same block
table with every depthwise kernel 3x3, no squeeze-and-excitation, and ReLU wherever the full network
has hard-swish. Every activation then has an integer kernel in ONNX Runtime, so its INT8 graph has
no float islands, and it runs faster in FP32 too (2,044,736 parameters at 3 channels and 1000
classes, 1.02 M with two).
Measured on this Zen 5 (2026-12-03, random weights, ONNX Runtime, 2 threads, 3x128x128 at stride 1):
2,009 slabs/s at batch 32 and 0.65 ms at batch 1 in FP32, against 1,417/s and 1.13 ms for the full
network in the same run; on 2026-12-03 at 04:33, 1,611/s and 0.44 ms against 1,201/s and 1.23 ms.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

# (input, kernel, expanded, output, squeeze-excitation, activation, stride): torchvision's table.
SMALL = [
    (16, 3, 16, 16, True, "RE", 2),
    (16, 3, 72, 24, False, "RE", 2),
    (24, 3, 88, 24, False, "RE", 1),
    (24, 5, 96, 40, True, "HS", 2),
    (40, 5, 240, 40, True, "HS", 1),
    (40, 5, 240, 40, True, "HS", 1),
    (40, 5, 120, 48, True, "HS", 1),
    (48, 5, 144, 48, True, "HS", 1),
    (48, 5, 288, 96, True, "HS", 2),
    (96, 5, 576, 96, True, "HS", 1),
    (96, 5, 576, 96, True, "HS", 1),
]
LAST_CHANNEL = 1024
BN_MOMENTUM = 0.1  # torchvision: 0.01 (see the module's docstring)
_norm = partial(nn.BatchNorm2d, eps=0.001, momentum=BN_MOMENTUM)


def make_divisible(value: float, divisor: int = 8) -> int:
    """The nearest multiple of `divisor`, never more than 10 % below `value` (as the paper's code)."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


def minimal_row(row: tuple[int, int, int, int, bool, str, int]) -> tuple[int, int, int, int, bool, str, int]:
    """A row of :data:`SMALL` as the minimalistic variant has it: 3x3, no squeeze-excitation, ReLU."""
    cin, _, expanded, cout, _, _, stride = row
    return cin, 3, expanded, cout, False, "RE", stride


def conv_bn_act(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1,
                act: type[nn.Module] | None = nn.Hardswish) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
                               _norm(cout)]
    if act is not None:
        layers.append(act(inplace=True))
    return nn.Sequential(*layers)


class SqueezeExcitation(nn.Module):
    def __init__(self, channels: int, squeeze: int) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, channels, 1)
        self.relu = nn.ReLU(inplace=True)
        self.gate = nn.Hardsigmoid(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = nn.functional.adaptive_avg_pool2d(x, 1)
        return x * self.gate(self.fc2(self.relu(self.fc1(s))))


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, kernel: int, expanded: int, cout: int, se: bool, activation: str,
                 stride: int) -> None:
        super().__init__()
        act = nn.Hardswish if activation == "HS" else nn.ReLU
        layers: list[nn.Module] = []
        if expanded != cin:
            layers.append(conv_bn_act(cin, expanded, 1, act=act))
        layers.append(conv_bn_act(expanded, expanded, kernel, stride, groups=expanded, act=act))
        if se:
            layers.append(SqueezeExcitation(expanded, make_divisible(expanded // 4)))
        layers.append(conv_bn_act(expanded, cout, 1, act=None))
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return out + x if self.residual else out


class MobileNetV3Small(nn.Module):
    def __init__(self, in_channels: int, num_classes: int = 2, dropout: float = 0.2, stem_stride: int = 2,
                 minimal: bool = False) -> None:
        super().__init__()
        act: type[nn.Module] = nn.ReLU if minimal else nn.Hardswish
        table = [minimal_row(row) for row in SMALL] if minimal else SMALL
        layers: list[nn.Module] = [conv_bn_act(in_channels, table[0][0], 3, stride=stem_stride, act=act)]
        layers += [InvertedResidual(*row) for row in table]
        last_in = table[-1][3]
        layers.append(conv_bn_act(last_in, 6 * last_in, 1, act=act))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        # After ReLU the dropout is not in place: it would overwrite the output ReLU's backward reads
        # (hard-swish's backward reads its input, so torchvision's head can drop out in place).
        self.classifier = nn.Sequential(nn.Linear(6 * last_in, LAST_CHANNEL), act(inplace=True),
                                        nn.Dropout(dropout, inplace=not minimal), nn.Linear(LAST_CHANNEL, num_classes))
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, 0, 0.01)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))
