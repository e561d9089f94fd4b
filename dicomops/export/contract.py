"""The input contract of an exported model: what a consumer must feed it.

It travels in three places that must agree: the MLflow model's metadata (written at registration),
the ONNX ``metadata_props`` (so a file on its own still says what it expects) and the Triton
``config.pbtxt`` (names, shapes, batch size).

It records every preprocessing setting that makes a different volume, named by the preprocessing's
own list (:data:`dicomops.preprocessing.stage.VOLUME_FIELDS`, under the same names), so a served
model's preprocessing can be compared with it setting by setting (:meth:`InputContract.disagreements`).
A contract written before it recorded some of them (``header_window_index``, ``histogram_equalize``
and ``min_positive_voxels`` came on 2026-12-06) still reads; :attr:`InputContract.unrecorded` names
what it lacks, so a reader can say what it could not check.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from dicomops.config import PreprocessConfig, TrainConfig
from dicomops.preprocessing.stage import VOLUME_FIELDS

INPUT_NAME, OUTPUT_NAME = "slab", "probability"
# The volume settings a contract has recorded since 2026-12-06 (none of them can be None in a config;
# the window's centre and width can, for a preset window).
RECORDED_SINCE_2026_12_06 = ("header_window_index", "histogram_equalize", "min_positive_voxels")
METADATA_KEY = "dicomops_contract"


@dataclass(frozen=True)
class InputContract:
    """Shape, channels, spacing, intensity window and every other volume setting of the model's
    input; meaning of its output."""

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
    # The other VOLUME_FIELDS (None only in a contract written before they were recorded; see unrecorded).
    header_window_index: int | None = None
    histogram_equalize: bool | None = None
    min_positive_voxels: int | None = None  # what made a training slab positive: the output's meaning
    input_name: str = INPUT_NAME
    output_name: str = OUTPUT_NAME
    output: str = "softmax probabilities [negative, nodule] per slab"
    layout: str = "NCHW float32"
    # VOLUME_FIELDS the contract was written without (an older export): not part of the contract.
    unrecorded: tuple[str, ...] = field(default=(), compare=False)

    def __post_init__(self) -> None:
        # A volume setting left None (a contract made in code without it) is as unrecorded as one an
        # older export never wrote: not compared, rather than compared as None against every config.
        missing = tuple(name for name in RECORDED_SINCE_2026_12_06
                        if getattr(self, name) is None and name not in self.unrecorded)
        if missing:
            object.__setattr__(self, "unrecorded", (*self.unrecorded, *missing))

    @classmethod
    def from_configs(cls, pre: PreprocessConfig, train: TrainConfig, threshold: float) -> InputContract:
        from dicomops.training.scoring import SeriesRule

        return cls(channels=pre.slab_slices, height=train.input_size, width=train.input_size,
                   orientation="RAS", resize="area", value_range=(0.0, 1.0), threshold=float(threshold),
                   series_score=SeriesRule.of(train).describe(),
                   **pre.model_dump(include=set(VOLUME_FIELDS)))

    def disagreements(self, pre: PreprocessConfig) -> list[str]:
        """Each setting on which `pre` would feed the model another input than this contract
        describes, as 'name: preprocessing vs contract'; the :attr:`unrecorded` ones are not compared."""
        given = json.loads(pre.model_dump_json(include=set(VOLUME_FIELDS)))
        ours = json.loads(self.to_json())
        wrong = [] if pre.slab_slices == self.channels else [
            f"slab_slices/channels: {pre.slab_slices!r} vs {self.channels!r}"]
        return wrong + [f"{name}: {given[name]!r} vs {ours[name]!r}" for name in VOLUME_FIELDS
                        if name not in self.unrecorded and given[name] != ours[name]]

    def completed(self, pre: PreprocessConfig) -> InputContract:
        """This contract with its :attr:`unrecorded` settings taken from `pre`, the preprocessing the
        model was trained with (check :meth:`disagreements` first)."""
        values = pre.model_dump(include=set(self.unrecorded))
        return replace(self, unrecorded=(), **values)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """Per-sample shape (no batch axis)."""
        return self.channels, self.height, self.width

    def as_dict(self) -> dict[str, Any]:
        """The contract as it is written (without :attr:`unrecorded`, which says how it was read)."""
        data = asdict(self)
        del data["unrecorded"]
        return data

    def to_json(self) -> str:
        return json.dumps(self.as_dict(), sort_keys=True)

    @classmethod
    def from_mapping(cls, raw: dict[str, Any] | str) -> InputContract:
        """A written contract; one written before it recorded every volume setting reads with those
        settings None and named in :attr:`unrecorded`."""
        data = json.loads(raw) if isinstance(raw, str) else dict(raw)
        data.pop("unrecorded", None)
        data["spacing_mm"] = tuple(data["spacing_mm"])
        data["value_range"] = tuple(data["value_range"])
        return cls(**data, unrecorded=tuple(name for name in VOLUME_FIELDS if name not in data))
