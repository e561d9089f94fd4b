"""The input contract of an exported model: what a consumer must feed it.

It travels in three places that must agree: the MLflow model's metadata (written at registration),
the ONNX ``metadata_props`` (so a file on its own still says what it expects) and the Triton
``config.pbtxt`` (names, shapes, batch size).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

from dicomops.config import PreprocessConfig, TrainConfig

INPUT_NAME, OUTPUT_NAME = "slab", "probability"
METADATA_KEY = "dicomops_contract"


@dataclass(frozen=True)
class InputContract:
    """Shape, channels, spacing and intensity window of the model's input; meaning of its output."""

    channels: int  # adjacent 1 mm slices stacked as channels (a 2.5D slab)
    height: int
    width: int
    spacing_mm: tuple[float, float, float]
    orientation: str
    window: str
    window_center: float | None
    window_width: float | None
    crop_xy: int
    resize: str
    value_range: tuple[float, float]
    threshold: float  # operating point chosen by cross-validation (Youden), on the series score
    series_score: str
    input_name: str = INPUT_NAME
    output_name: str = OUTPUT_NAME
    output: str = "softmax probabilities [negative, nodule] per slab"
    layout: str = "NCHW float32"

    @classmethod
    def from_configs(cls, pre: PreprocessConfig, train: TrainConfig, threshold: float) -> InputContract:
        return cls(channels=pre.slab_slices, height=train.input_size, width=train.input_size,
                   spacing_mm=pre.spacing_mm, orientation="RAS", window=pre.window,
                   window_center=pre.window_center, window_width=pre.window_width, crop_xy=pre.crop_xy,
                   resize="area", value_range=(0.0, 1.0), threshold=float(threshold),
                   series_score=f"mean of the {train.top_k_slices} highest slab probabilities")

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """Per-sample shape (no batch axis)."""
        return self.channels, self.height, self.width

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_mapping(cls, raw: dict[str, Any] | str) -> InputContract:
        data = json.loads(raw) if isinstance(raw, str) else dict(raw)
        data["spacing_mm"] = tuple(data["spacing_mm"])
        data["value_range"] = tuple(data["value_range"])
        return cls(**data)
