"""One ``PipelineConfig`` with a section per stage, and ``Settings`` for the environment.

``PipelineConfig`` is the parameter of the top Prefect flow, so Prefect validates it and its UI shows
it. ``Settings`` holds what differs between machines (work directory, tracking URI, secrets); it is
read when a flow starts by calling :func:`load_settings`, never at import time.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal
from urllib.parse import unquote, urlsplit

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from dicomops.synthetic.sidecars import SIDECAR_PATTERNS
from dicomops.validation.suite import ALLOWED_MODALITIES, ExpectationSpec, default_expectations

SCENARIOS = ("baseline", "baseline-new", "new-vendor", "protocol-shift", "low-dose")
Scenario = Literal["baseline", "baseline-new", "new-vendor", "protocol-shift", "low-dose"]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SynthConfig(_Section):
    """The synthetic multi-vendor corpus (the embedded default data set)."""

    patients: int = Field(120, ge=1, le=100_000, description="Patients, one CT series each.")
    seed: int = Field(20261126, ge=0, description="Same seed and options give identical files.")
    scenario: Scenario = "baseline"
    fault_rate: float = Field(0.05, ge=0.0, le=1.0, description="Share of series given a fault.")
    matrix: int = Field(256, ge=32, le=1024, description="Rows and Columns of each slice.")
    slices: int = Field(60, ge=8, le=1000, description="Slices per series.")
    workers: int = Field(2, ge=1, le=64)

    @field_validator("matrix")
    @classmethod
    def _even_matrix(cls, value: int) -> int:
        if value % 2:
            raise ValueError(f"matrix must be even (got {value}); use e.g. 256 or 512")
        return value


class GeometryConfig(_Section):
    """Tolerances of the series geometry check (a series outside them is quarantined whole).

    The only definition of these tolerances: ``dicomops.dicom.series`` takes this model as is.
    """

    orientation: float = Field(1e-3, gt=0, description="Max difference of direction cosines.")
    pixel_spacing_mm: float = Field(1e-3, gt=0, description="Max difference of PixelSpacing between slices.")
    spacing_relative: float = Field(0.1, gt=0, lt=1, description="Max |step - median| / median.")
    grid_drift: float = Field(0.5, gt=0, description=(
        "Max distance of any slice from the regular grid of the median step that preprocessing assumes, "
        "in steps: steps each within spacing_relative can add up (80 of 1.0 mm then 79 of 1.09 mm put the "
        "last slices 7 mm off)."))
    duplicate_mm: float = Field(1e-3, gt=0, description="Two slices closer than this share a position.")
    max_tilt_degrees: float = Field(0.5, ge=0)
    min_slices: int = Field(8, ge=1)


class DeidConfig(_Section):
    """De-identification. The key itself is a secret: it comes from Settings, never from here."""

    table_version: str = Field("dicomfields_2026c", description="Annex E table of dicom-anonymizer.")
    reid_key_path: Path | None = Field(
        None, description="Where to write the pseudonym → PatientID key; must be outside the work dir.")


class PrivacyConfig(_Section):
    """Differential privacy of the aggregates the gate releases to people (MLflow, Data Docs, cards).

    The unit protected is a patient: each contributes at most ``max_series_per_patient`` series to a
    release, and each release is an OpenDP Laplace count-by with a threshold (cells whose noisy count
    is below the threshold are suppressed, which also hides the presence of a rare category).
    """

    enabled: bool = Field(True, description="Release counts through OpenDP; off, no counts are released at all.")
    epsilon: float = Field(1.0, gt=0, le=10, description="Privacy loss of one release (one table of counts).")
    delta: float = Field(1e-6, gt=0, lt=1e-3, description="Chance a release is not epsilon-DP (suppression).")
    budget_epsilon: float = Field(8.0, gt=0, description="Total epsilon the ledger allows per dataset.")
    budget_delta: float = Field(1e-5, gt=0, lt=1, description="Total delta the ledger allows per dataset.")
    min_cell: int = Field(10, ge=1, description="Cells released below this noisy count are suppressed.")
    max_series_per_patient: int = Field(1, ge=1, le=100, description=(
        "Contribution bound: a patient's further series are left out of the released counts (1: each "
        "patient counted once). The noise and the threshold grow with it."))
    dataset: str | None = Field(None, description=(
        "The ledger's name for the data being budgeted. Default: each corpus version by its DVC hash, so a "
        "corpus that gains a batch starts a new budget; name one (e.g. the site's cohort) to bound every "
        "version together, since versions that share patients add up."))
    releases: tuple[tuple[str, ...], ...] = Field(
        (("vendor",), ("site",), ("month",), ("age_band", "sex")),
        description="Tables released after each ingest; each costs epsilon. Columns: vendor, site, month, "
                    "age_band, sex.")

    @field_validator("releases")
    @classmethod
    def _known_columns(cls, value: tuple[tuple[str, ...], ...]) -> tuple[tuple[str, ...], ...]:
        known = {"vendor", "site", "month", "age_band", "sex"}
        for group in value:
            if not group or set(group) - known:
                raise ValueError(f"release {list(group)} must name one or more of {sorted(known)}")
        return value


class IngestConfig(_Section):
    """The ingest gate: header index, geometry, Great Expectations, quarantine, de-identification."""

    max_invalid_fraction: float = Field(0.2, ge=0, le=1, description="Gate: max quarantined share of files.")
    workers: int = Field(2, ge=1, le=64)
    dask_address: str | None = Field(None, description="Run the per-file map steps on this Dask scheduler "
                                                       "(tcp://host:8786) instead of local processes.")
    allowed_modalities: tuple[str, ...] = Field(
        ALLOWED_MODALITIES, min_length=1,
        description="The only modality rule: the reader rejects other modalities and the Great "
                    "Expectations suite's modality expectation is built from this list.")
    max_rows_columns: int = Field(8192, ge=16)
    max_inflated_mb: int = Field(256, ge=1, description="Bound for deflated transfer syntaxes.")
    seconds_per_file: float = Field(30.0, gt=0, description="A file taking longer is quarantined.")
    sidecars: tuple[str, ...] = Field(
        SIDECAR_PATTERNS,
        description="Paths (relative to SRC, glob) of known non-image files: listed in "
                    "ingest/sidecars.csv, neither ingested nor quarantined.")
    geometry: GeometryConfig = GeometryConfig()
    expectations: list[ExpectationSpec] = Field(default_factory=default_expectations)
    deid: DeidConfig = DeidConfig()
    privacy: PrivacyConfig = PrivacyConfig()

    @model_validator(mode="before")
    @classmethod
    def _expectations_from_modalities(cls, data: Any) -> Any:
        """Without explicit expectations, build the default suite for the configured modalities."""
        if isinstance(data, dict) and "expectations" not in data:
            modalities = data.get("allowed_modalities", ALLOWED_MODALITIES)
            if isinstance(modalities, list | tuple) and modalities:
                return {**data, "expectations": default_expectations([str(m) for m in modalities])}
        return data

    @model_validator(mode="after")
    def _one_modality_rule(self) -> IngestConfig:
        for spec in self.expectations:
            if spec.kind == "in_set" and spec.column == "Modality" \
                    and set(spec.value_set or ()) != set(self.allowed_modalities):
                raise ValueError(
                    f"expectation {spec.name!r} allows Modality {spec.value_set} but allowed_modalities is "
                    f"{list(self.allowed_modalities)}; set allowed_modalities only, the suite follows it")
        return self


class PreprocessConfig(_Section):
    """HU volumes at a fixed spacing, windowed and normalised, cropped around the body; 2.5D slabs."""

    spacing_mm: tuple[float, float, float] = Field((1.0, 1.0, 1.0), description="Target voxel size (RAS).")
    window: Literal["lung", "soft_tissue", "bone", "header", "custom", "none"] = Field(
        "lung", description="A preset, the header's window, a custom one, or none (keep HU).")
    window_center: float | None = None
    window_width: float | None = None
    header_window_index: int = Field(0, ge=0, description="Which header window when there are several.")
    histogram_equalize: bool = False
    crop_xy: int = Field(320, ge=8, le=1024, description="In-plane size in voxels, centred on the body.")
    slab_slices: int = Field(3, ge=1, le=15, description="k adjacent slices as channels (odd).")
    negative_ratio: float = Field(2.0, ge=0, description=(
        "Random negative slices per positive slice (hard negatives, slices of non-actionable nodules, come besides). "
        "With hard negatives, 2 instead of 1 took the pooled out-of-fold AUC of the demo corpus 0.809 -> 0.883."))
    min_positive_voxels: int = Field(3, ge=1, description="Mask voxels that make a slice positive.")
    positive_area_share: float = Field(0.0, ge=0, le=1, description=(
        "A slice through an actionable nodule is positive where its cross-section is at least this share of the "
        "nodule's largest, and left out of training (neither positive nor negative) where it is a smaller cap. "
        "0: every slice with min_positive_voxels. 0.5 scored the same as 0 within the spread of two sampling "
        "seeds on the demo corpus (mean CV AUC 0.918 and 0.875 against 0.895 and 0.915), so it stays 0."))
    wall_positive_repeat: int = Field(1, ge=1, le=8, description=(
        "Sample each positive slice through a nodule that touches the chest wall, mediastinum or diaphragm "
        "(segmentation.data.wall_nodules) this many times instead of once; the training augments each copy "
        "on its own. The demo's classifier lifts such nodules 2.6 logits above its series' mean against 6.2 "
        "for the others; 3 left that at 2.3 and gave a mean CV AUC of 0.878 against 0.921 (README, Where it "
        "fails), so 1: once, as every other slice."))
    compress_images: bool = Field(False, description=(
        "Deflate the cached images as well as the masks. Off, the demo's 119 volumes take 1.53 GB instead of "
        "0.86 GB, and are written in 6 s instead of 26 and read in 0.5 s instead of 5.5 (one core), which the "
        "pipeline does four times. Entries already cached keep their form."))
    seed: int = Field(0, ge=0, le=2**32 - 1, description="Seeds numpy and torch: 0 to 2**32 - 1.")
    workers: int = Field(2, ge=1, le=64)
    dask_address: str | None = Field(None, description="Run the per-series map on this Dask scheduler instead "
                                                       "of local processes.")

    @field_validator("slab_slices")
    @classmethod
    def _odd_slab(cls, value: int) -> int:
        if value % 2 == 0:
            raise ValueError(f"slab_slices must be odd so a slab has a centre slice, got {value}")
        return value

    @field_validator("spacing_mm")
    @classmethod
    def _positive_spacing(cls, value: tuple[float, float, float]) -> tuple[float, float, float]:
        if min(value) <= 0:
            raise ValueError(f"spacing_mm must be positive, got {value}")
        return value

    @model_validator(mode="before")
    @classmethod
    def _ignored_window_values(cls, data: Any) -> Any:
        """A centre or width beside a window other than 'custom' was always ignored: a config of a
        registered version may carry them, so they are dropped, with a warning, not refused."""
        if isinstance(data, dict) and data.get("window", "lung") != "custom" and (
                data.get("window_center") is not None or data.get("window_width") is not None):
            logging.getLogger(__name__).warning(
                "preprocess.window_center and window_width apply only to window 'custom'; window '%s' ignores "
                "them: set window: custom, or remove them", data.get("window", "lung"))
            data = {**data, "window_center": None, "window_width": None}
        return data

    @model_validator(mode="after")
    def _window_settings(self) -> PreprocessConfig:
        center, width = self.window_center, self.window_width
        if self.window == "custom":
            if center is None or width is None:
                raise ValueError("window 'custom' needs window_center and window_width (HU), e.g. "
                                 "window_center: -600, window_width: 1500; or choose a preset window "
                                 "(lung, soft_tissue, bone), header or none")
            if width <= 0:
                raise ValueError(f"window_width must be above 0 HU, got {width}")
        return self


# Per architecture, what it trains at when the config does not say: the student at 128 px with a
# stride-1 first convolution, since at 192 px and stride 2 it is at a quarter of a coarser slab after
# two layers and cannot see a 6 mm nodule (fold 0 of the demo corpus: series AUC 0.779 against 0.409);
# and for 12 epochs with a patience of 6, since in 6 its held-out AUC has barely left chance, and its
# validation AUC falls for the first 2-3 epochs, where a patience of 3 keeps epoch 1's model. Demo
# corpus: fold 0's series AUC 0.657 after 6 epochs, 0.921 after 12; four folds 0.899 (README).
# Architectures absent here take the fields' own defaults.
STUDENT_DEFAULTS: dict[str, object] = {"input_size": 128, "stem_stride": 1, "epochs": 12, "patience": 6}
ARCHITECTURE_DEFAULTS: dict[str, dict[str, object]] = {
    "mobilenet-v3-small": STUDENT_DEFAULTS,
    "mobilenet-v3-small-minimal": STUDENT_DEFAULTS,
}


class TrainConfig(_Section):
    """Four-fold vendor-stratified cross-validation of a 2.5D slice classifier, then a final model."""

    architecture: Literal["resnet-slim", "resnet10", "densenet121", "mobilenet-v3-small", "mobilenet-v3-small-minimal",
                          "resnet3d-slim"] = Field(
        "resnet-slim", description=(
            "The network over k-slice slabs: MONAI's 2-D ResNet or DenseNet; mobilenet-v3-small, the "
            "lightweight student, or its minimalistic variant (3x3, ReLU, no squeeze-excitation: integer "
            "kernels for every activation, 1.3-1.4x the full student's FP32 throughput); resnet3d-slim, a 3-D ResNet over the slab as a volume (the teacher)."))
    input_size: int = Field(192, ge=32, le=512, description=(
        "Slabs are resized to this square size: 192 of the 320 mm crop is 1.67 mm pixels. Unset, it "
        "follows the architecture (ARCHITECTURE_DEFAULTS: the student's is 128)."))
    stem_stride: Literal[1, 2] = Field(2, description=(
        "Stride of the first convolution of resnet-slim (MONAI's conv1_t_stride) and of the student "
        "(mobilenet-v3-small); other networks ignore it. Unset, it follows the architecture "
        "(ARCHITECTURE_DEFAULTS). On the demo corpus, resnet-slim at 192 px and stride 2 "
        "against 128 px and stride 1: mean CV AUC 0.872 against 0.878, training 115 against 82 slabs/s, ONNX "
        "Runtime 1.8x faster at batch 32: the network learns its own downsampling of finer pixels instead of "
        "seeing the resize's. The student needs 1 at 128 px (fold 0: series AUC 0.779 against 0.409 at 2)."))
    n_splits: int = Field(4, ge=2, le=10)
    epochs: int = Field(6, ge=1, le=200, description="Unset, it follows the architecture (the student's is 12).")
    batch_size: int = Field(32, ge=1, le=1024)
    learning_rate: float = Field(2e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    patience: int = Field(3, ge=1, description=(
        "Early stopping: epochs without a better validation AUC. Unset, it follows the architecture (the student's is 6)."))
    loss: Literal["weighted_ce", "focal"] = "weighted_ce"
    ema_decay: float = Field(0.0, ge=0, lt=1, description=(
        "Validate, keep and return an exponential moving average of the weights with this decay per "
        "optimiser step (warmed up as min(decay, (1 + n) / (10 + n)) after n steps); 0: the last step's "
        "weights."))
    precise_bn: int = Field(0, ge=0, description=(
        "Before each epoch's validation, recompute batch norm's running statistics over this many "
        "of the training slabs (a fixed subset, without augmentation; training.loop.recompute_batch_norm); "
        "0: keep the ones training left. On the demo, 1024 steadied the validation but gave a mean CV AUC "
        "of 0.931 against 0.930 (README), so 0."))
    num_workers: int | None = Field(None, ge=0, le=16, description=(
        "DataLoader worker processes; unset: none when training on the CPU, where a worker's augmentation "
        "takes its time from the two threads of the step (fold 0 of the demo, an epoch 7.1-7.7 s in the "
        "training process against 9.8-9.9 s with one worker), and one per spare core, up to four, on CUDA, "
        "where they augment while the GPU computes."))
    aux_mask_weight: float = Field(0.0, ge=0, description=(
        "Weight of an auxiliary localisation loss (MONAI's DiceCELoss on a map of the slab's nodules from "
        "the ResNet's layer3 and layer4 features, training.model.NoduleMapHead); the head is dropped after "
        "training. 0: the slice label alone. On the demo's folds over four slab-sampling seeds, weight 1 "
        "with the actionable target gave a mean CV AUC of 0.932 against 0.932 without (README), so 0."))
    aux_mask_target: Literal["nodules", "actionable"] = Field("nodules", description=(
        "What the auxiliary map marks: every annotated nodule, or only those on slabs labelled positive."))
    flip_axes: tuple[Literal[0, 1], ...] = Field((0, 1), max_length=2, description=(
        "In-plane axes the training augmentation flips each slab along, each with probability 0.5 on its "
        "own: 0 left-right, 1 front to back. Against (0,), left-right only (the setting before 2026-12-07): "
        "on the demo's folds over four slab-sampling seeds a mean CV AUC of 0.946 against 0.939 (philips "
        "0.854 against 0.799, canon 0.948 against 0.990); on held-out corpora 0.917 and 0.927 (seed 20261202, "
        "two sampling seeds) and 0.895 (20261205) against 0.892, 0.903 and 0.856, no vendor lower (README)."))
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="auto: mixed precision on CUDA, bfloat16 autocast on CPUs with AMX/AVX-512 BF16, "
                            "else float32; the 3-D teacher (resnet3d-slim) stays float32 on CPU, where its "
                            "bfloat16 training gave NaN (training.loop.train_precision).")
    top_k_slices: int = Field(3, ge=1, description="The series score reads the k highest slice scores.")
    series_rule: Literal["top_k_mean", "top_k_contrast"] = Field("top_k_contrast", description=(
        "The series score (training.scoring.SeriesRule): top_k_mean, the mean of the k highest slice "
        "probabilities; top_k_contrast, how far the k highest slices' logits stand above the mean of "
        "all the series' slice logits (tanh of half the difference). Mean CV AUC 0.930 against 0.858 "
        "on the demo's folds, 0.908 against 0.868 on a corpus of another seed (README)."))
    leave_one_vendor_out: bool = Field(False, description="Also train on all vendors but one and score the held-out one.")
    distill_from: str | None = Field(None, description=(
        "The registered version to distil from: V, a version of this classifier, or MODEL/V, of another "
        "registered model such as the segmenter (dicomops-ct-nodule-seg/V, whose findings give slice "
        "targets). Each fold learns from that version's model of the same fold, the final model from its "
        "final model (same split and corpus, or training refuses)."))
    distill_alpha: float = Field(0.7, ge=0, le=1, description="Weight of the cross-entropy on the labels; the "
                                                              "KL term to the teacher takes 1 - alpha.")
    distill_temperature: float = Field(3.0, gt=0, description="Softmax temperature of the distillation term.")
    seed: int = Field(0, ge=0, le=2**32 - 1, description="Seeds numpy and torch: 0 to 2**32 - 1.")
    model_name: str = "dicomops-ct-classifier"
    promotion_margin: float = Field(0.005, ge=0)
    vendor_tolerance: float = Field(0.02, ge=0)
    min_auc: float = Field(0.8, ge=0, le=1, description="No version is promoted automatically under this mean AUC.")

    # What a version logged before a field existed trained with, where today's default differs.
    _BEFORE_DEFAULTS: ClassVar[dict[str, object]] = {"stem_stride": 1, "series_rule": "top_k_mean",
                                                     "flip_axes": (0,)}

    @field_validator("flip_axes")
    @classmethod
    def _distinct_flip_axes(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if len(set(value)) != len(value):
            raise ValueError(f"flip_axes must name each axis once (0 left-right, 1 front to back), got {list(value)}")
        return value

    @model_validator(mode="wrap")
    @classmethod
    def _architecture_defaults(cls, data: Any, handler: Any) -> TrainConfig:
        """Fields the config leaves unset take the architecture's defaults (``ARCHITECTURE_DEFAULTS``)
        before the class's own; they stay unset (``model_fields_set``), so a config re-validated with
        another architecture, as ``dicomops train --architecture`` does, takes that one's defaults."""
        if not isinstance(data, Mapping):
            return handler(data)
        arch = data.get("architecture", cls.model_fields["architecture"].default)
        filled = {k: v for k, v in ARCHITECTURE_DEFAULTS.get(arch, {}).items() if k not in data}
        model: TrainConfig = handler({**data, **filled})
        model.__pydantic_fields_set__.difference_update(filled)
        return model

    @classmethod
    def from_logged(cls, raw: Mapping[str, Any]) -> TrainConfig:
        """The config a registered version trained with, from its logged ``train_config.json`` (which
        also carries ``in_channels``): a field it predates takes the value it trained with, not the
        current default (a version from before ``stem_stride`` has a stride-1 first convolution)."""
        fields = {k: v for k, v in raw.items() if k != "in_channels"}
        return cls.model_validate(cls._BEFORE_DEFAULTS | fields)


class SegmentConfig(_Section):
    """Nodule localisation: a MONAI 3D U-Net on 1 mm patches, Dice + Focal loss, sliding-window
    inference, cross-validated in the classifier's own four folds and judged per nodule (FROC/CPM)."""

    enabled: bool = Field(True, description="Train the segmenter in the pipeline after the classifier.")
    channels: tuple[int, ...] = Field((8, 16, 32, 64), min_length=2, description="UNet feature maps per level.")
    strides: tuple[int, ...] = Field((2, 2, 2), min_length=1, description="UNet downsampling per level.")
    patch: tuple[int, int, int] = Field((32, 32, 32), description="Training patch (i, j, k) in 1 mm voxels.")
    roi: tuple[int, int, int] = Field((32, 32, 32), description=(
        "Sliding-window size at inference: the training patch's, since instance normalisation makes a "
        "window's output depend on its extent (160x160x64 windows: Dice 0.61 instead of 0.80 on fold 0)."))
    sw_batch_size: int = Field(16, ge=1, le=1024, description=(
        "Windows per forward pass at inference. On the demo's fold-1 model, 2 threads, bfloat16 on a Zen 5: "
        "0.55-0.58 s per series at 16, 0.61-0.65 at 8, 0.72 at 4, 0.67 at 32; the same probabilities."))
    overlap: float = Field(0.4, ge=0, lt=1, description=(
        "Sliding-window overlap. One fold-0 model of the demo corpus: Dice (>= 6 mm) 0.783 at 0.25, "
        "0.824 at 0.33, 0.836 at 0.4, 0.838 at 0.5, at 1.3, 1.6, 1.8 and 3.2 s per series."))
    positive_share: float = Field(0.5, gt=0, le=1, description="Share of patches centred on a nodule voxel.")
    balance_nodules: bool = Field(False, description=(
        "Positive patches centred on every nodule of a series equally often, instead of on every nodule voxel "
        "equally often (which gives a 14 mm nodule 100 times the patches of a 3 mm one). On the demo, two "
        "training seeds: CPM 0.955/0.960 -> 0.968/0.963, sensitivity under 6 mm 0.758/0.727 -> 0.788/0.788, "
        "series kappa 0.930 on average either way; on the held-out seed 20261202 CPM 0.970 -> 0.966 and "
        "sensitivity under 6 mm 0.815 -> 0.704, so off."))
    border_share: float = Field(0.4, ge=0, lt=1, description=(
        "Share of background centres on the lung border (hard negatives: partial volume there looks like "
        "ground glass); 0 samples it as often as the rest of the lung (14-18 % of centres). On the demo, "
        "0.4 against 0: series kappa 0.898 against 0.832 (philips 0.704 against 0.284), CPM 0.959 against 0.944."))
    thick_slice_share: float = Field(0.0, ge=0, le=1, description=(
        "Share of training patches shown as a scanner with 2 or 3 mm slices would see them, resampled back to "
        "1 mm (nnU-Net's low-resolution simulation, along the slices only). philips' 2 mm slices smear the "
        "lung's border and vessels near the volume's ends into blobs: its false findings. On the demo, 0.3 against "
        "0: series kappa 0.898 both, philips 0.704 both (one false series gone, another new), CPM 0.964 against "
        "0.962: no gain, so 0 (off)."))
    scale_share: float = Field(0.0, ge=0, le=1, description=(
        "Share of training patches whose content is shown shrunk or grown by a factor drawn from `scale_range` "
        "(nnU-Net's scaling augmentation, around the same centre): small nodules made from larger ones. On the "
        "demo, 0.3 against 0: series kappa 0.901 against 0.940, CPM 0.953 against 0.954, more nodules under 6 mm "
        "found (0.788 against 0.697) but not siemens' two part-solid ones of 3 mm; on the held-out seed "
        "20261202 the same figures; training 15 % slower. So 0 (off)."))
    scale_range: tuple[float, float] = Field((0.7, 1.4), description="Smallest and largest scale factor.")
    batch_size: int = Field(8, ge=1, le=256, description="Patches per optimiser step (all ranks together).")
    patches_per_epoch: int = Field(480, ge=8, description="Patches drawn per epoch.")
    epochs: int = Field(24, ge=1, le=500, description=(
        "16 gave a Dice (>= 6 mm) of 0.756 and 24 gave 0.777 on the demo, the loss still falling at 16."))
    learning_rate: float = Field(3e-3, gt=0)
    weight_decay: float = Field(1e-5, ge=0)
    focal_gamma: float = Field(2.0, ge=0)
    lambda_dice: float = Field(1.0, ge=0)
    lambda_focal: float = Field(1.0, ge=0)
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="As the classifier: bf16 autocast on CPUs with AMX/AVX-512 BF16, mixed on CUDA.")
    threshold: float = Field(0.5, gt=0, lt=1, description="Probability that makes a voxel nodule.")
    candidate_threshold: float = Field(0.1, gt=0, lt=1, description="Lowest probability a FROC candidate starts at.")
    finding_threshold: float = Field(0.75, gt=0, lt=1, description=(
        "Score (a candidate's highest probability) at which a segmented candidate of at least 3 mm is "
        "reported as a finding: the series-level present/absent call and the size categories."))
    seed: int = Field(0, ge=0, le=2**32 - 1, description="Seeds numpy and torch: 0 to 2**32 - 1.")
    model_name: str = "dicomops-ct-nodule-seg"
    promotion_margin: float = Field(0.005, ge=0, description="CPM gain over the champion that promotes.")
    vendor_tolerance: float = Field(0.05, ge=0, description="Largest CPM drop of any vendor a promotion allows.")
    min_cpm: float = Field(0.8, ge=0, le=1, description="No segmenter is promoted automatically under this CPM.")
    min_dice: float = Field(0.5, ge=0, le=1, description=(
        "No segmenter is promoted automatically under this mean Dice of nodules >= 6 mm (0: no floor); "
        "CPM alone does not show that it draws the nodules."))
    min_series_kappa: float = Field(0.4, ge=-1, le=1, description=(
        "No segmenter is promoted automatically under this series kappa (present/absent against the "
        "reference; -1: no floor)."))

    @model_validator(mode="after")
    def _divisible(self) -> SegmentConfig:
        if len(self.channels) != len(self.strides) + 1:
            raise ValueError(f"channels {self.channels} needs one entry more than strides {self.strides}")
        if not 0 < self.scale_range[0] <= self.scale_range[1]:
            raise ValueError(f"scale_range {self.scale_range} must be two factors above 0, the smaller first")
        if not self.candidate_threshold <= min(self.threshold, self.finding_threshold):
            raise ValueError(f"candidate_threshold {self.candidate_threshold} must not exceed threshold "
                             f"{self.threshold} or finding_threshold {self.finding_threshold}")
        if min(self.strides) < 1:
            raise ValueError(f"strides {self.strides} must each be at least 1")
        factor = int(np.prod(self.strides))
        for name in ("patch", "roi"):
            size = getattr(self, name)
            # The UNet halves a size per stride down to size / factor voxels: at least one per axis,
            # and more than one in all, since instance normalisation cannot normalise a single voxel.
            if min(size) < factor or all(s == factor for s in size):
                raise ValueError(f"{name} {size} must be at least {factor} (the product of strides "
                                 f"{self.strides}) on every axis and above {factor} on at least one: "
                                 f"the UNet's coarsest level needs more than one voxel")
            if any(s % factor for s in size):
                raise ValueError(f"{name} {size} must be divisible by {factor} (the product of strides)")
        return self


class ExportConfig(_Section):
    """ONNX export with parity checks, INT8 quantisation, TensorRT engines, a Triton repository."""

    opset: int = Field(18, ge=13, le=23, description="ONNX opset of the export (recorded in the model).")
    parity_samples: int = Field(256, ge=8, description="Validation slabs compared against the torch model.")
    parity_tolerance: float = Field(1e-4, gt=0, description="Max |Δ probability| ONNX vs torch; above it fails.")
    calibration_samples: int = Field(128, ge=8, description="Training slabs that calibrate INT8 ranges.")
    check_fold: int = Field(0, ge=0, description=(
        "Cross-validation fold whose training slabs calibrate INT8 and whose validation slabs check parity "
        "and the INT8 AUC. The final model saw both: the figures measure export fidelity, not generalisation."))
    int8_max_auc_drop: float = Field(0.01, ge=0, description="Max validation AUC lost by INT8; above it fails.")
    int8: Literal["ptq", "qat"] = Field("ptq", description=(
        "How the INT8 model is made: ptq, ONNX Runtime's static quantisation of the trained weights; qat, a "
        "quantisation-aware fine-tune (torchao PT2E) on the check fold's training slabs, served with the ranges it "
        "learnt (dicomops.export.qat)."))
    int8_float_head: Literal["auto", "always", "never"] = Field("auto", description=(
        "Run the INT8 graph's convolutions at the input's resolution (the stem; at a stride-1 stem also the next "
        "one) in float, with the weights they were quantised to: ONNX Runtime's integer kernels are slower than "
        "its float ones on so few channels. auto: timed at export on this machine, kept when the graph gets at "
        "least 5 % faster at max_batch (dicomops.export.quantize.float_head)."))
    qat_epochs: int = Field(1, ge=1, le=50, description="Epochs of quantisation-aware fine-tuning.")
    qat_learning_rate: float = Field(1e-4, gt=0)
    int8_held_out: bool = Field(False, description=(
        "Also judge FP32, PTQ and QAT INT8 of every fold's model on that fold's validation series, and the same "
        "fine-tune without fake quantisation as QAT's control, each against FP32 with a paired bootstrap "
        "interval (needs the version's fold models; several minutes per fold on 2 cores)."))
    max_batch: int = Field(32, ge=1, le=1024, description="Largest batch of the engines and of Triton.")
    preferred_batch_sizes: tuple[int, ...] = Field((8, 16, 32), description="Triton dynamic batching.")
    max_queue_delay_us: int = Field(2000, ge=0, description="Triton waits this long to fill a batch.")
    openvino: bool = Field(True, description=(
        "Also compile model.onnx and model.int8.onnx with OpenVINO's CPU plugin, check FP32 parity and the INT8 "
        "AUC against ONNX Runtime, and time both (the engines ov-fp32 and ov-int8 serve them; "
        "dicomops.export.openvino_engine)."))
    tensorrt_precisions: tuple[Literal["fp16", "int8"], ...] = ("fp16", "int8")
    tensorrt_parity_tolerance: float = Field(2e-2, gt=0, description="Max |Δ probability| TensorRT vs ONNX Runtime.")
    triton_platform: Literal["onnxruntime", "tensorrt"] = Field(
        "onnxruntime", description="What the Triton repository serves; tensorrt needs a built engine.")

    @field_validator("preferred_batch_sizes")
    @classmethod
    def _sorted_positive(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if any(v < 1 for v in value):
            raise ValueError("preferred_batch_sizes must be positive")
        return tuple(sorted(set(value)))

    @model_validator(mode="after")
    def _preferred_within_max(self) -> ExportConfig:
        if self.preferred_batch_sizes and max(self.preferred_batch_sizes) > self.max_batch:
            raise ValueError(f"preferred_batch_sizes {self.preferred_batch_sizes} exceed max_batch {self.max_batch}")
        return self


class MonitorConfig(_Section):
    """Drift monitoring of new batches against the serving model's training data, and the retrain it triggers.

    Stat tests: two-sample Kolmogorov–Smirnov for numerical columns and chi-square for categorical
    ones, both p-values, so the per-column false-alarm rate is the threshold whatever the batch size
    (distance measures such as Wasserstein have a noise floor that grows as batches shrink). Critical
    columns use a much smaller p-value and alone decide drift. Embeddings: a domain classifier whose
    ROC AUC is compared with the 95th percentile of chance (Evidently's bootstrap model method).
    """

    experiment: str = Field("dicomops-monitoring", description="MLflow experiment of monitoring runs.")
    alias: str = Field("champion", description="The model version being watched.")
    min_series: int = Field(10, ge=2, description="Fewer series in a batch give 'insufficient data'.")
    drift_share: float = Field(0.3, gt=0, le=1, description="Drift when this share of monitored columns drifts.")
    numeric_test: Literal["ks", "wasserstein"] = "ks"
    categorical_test: Literal["chisquare", "jensenshannon"] = "chisquare"
    column_p_value: float = Field(0.05, gt=0, lt=1, description="A column drifts when its test's p-value is below.")
    distance_threshold: float = Field(0.1, gt=0, description="For wasserstein/jensenshannon: drift at or above.")
    critical_columns: tuple[str, ...] = Field(
        ("Manufacturer", "ConvolutionKernel", "SliceThickness", "XRayTubeCurrent", "noise_hu"),
        description="Columns whose drift alone is drift (scanner, protocol, dose, image noise).")
    critical_p_value: float = Field(0.001, gt=0, lt=1, description="p-value threshold of critical columns.")
    embedding_quantile: float = Field(0.95, gt=0.5, lt=1, description="Domain classifier AUC quantile of chance.")
    quarantine_p_value: float = Field(0.001, gt=0, lt=1, description="Binomial test of the batch's quarantined share.")
    notification_block: str | None = Field(None, description="Prefect notification block ('type/name') to notify.")
    cooldown_hours: float = Field(24.0, ge=0, description="At most one drift-triggered retrain per model per cooldown.")
    retrain: Literal["subflow", "event", "off"] = Field(
        "subflow", description="On drift: run flows/retrain.py directly (embedded default), leave it to the "
                               "deployment trigger on the event (server), or only alert.")
    training_source: Path = Field(Path("data"), description="The original labelled corpus retraining starts from.")


class ServeConfig(_Section):
    """Inference: which version and engine, the Redis cache, and the online service's batching."""

    alias: str = Field("champion", description="Registry alias of the version that scores (unless a version is given).")
    engine: Literal["auto", "ort-fp32", "ort-int8", "ov-fp32", "ov-int8", "tensorrt"] = Field(
        "auto", description=("auto: TensorRT where a CUDA device and the extra are present, else ONNX Runtime FP32. "
                             "ov-fp32 and ov-int8: the same exported files on OpenVINO's CPU plugin."))
    threads: int = Field(2, ge=1, le=64, description="ONNX Runtime or OpenVINO threads per replica.")
    gate_workers: int = Field(1, ge=1, le=64, description=(
        "Processes of the online service's ingest gate per study. 1 runs it in the replica (about 3 s "
        "faster a study); a file that crashes a decoder then takes the replica down, and Ray restarts it."))
    write_back: bool = Field(True, description="Batch inference over a PACS stores an SR per series back in it.")
    localise: bool = Field(True, description=(
        "Results written back to a PACS also carry the promoted segmenter's nodules (an SR with each centre and "
        "diameter) and a SEG of their voxels; off, or with no promoted segmenter, the classifier's SR alone."))
    write_seg: bool = Field(True, description=(
        "With localise, the results also carry the SEG of the nodules' voxels. Off for a PACS or viewers that "
        "do not take SEGs (a PACS that drops them leaves every study answered in part): the segmenter's SR still "
        "gives each nodule's centre, diameter and solid part."))
    cache_ttl_s: int = Field(7 * 24 * 3600, ge=60, description="Lifetime of a cached volume or study manifest.")
    cache_maxmemory_mb: int = Field(1024, ge=16, description="Memory cap of the Redis dicomops starts (LRU beyond).")
    host: str = Field("127.0.0.1", description="Online service interface; keep loopback unless a proxy fronts it.")
    port: int = Field(8300, ge=1, le=65535, description="Online service port.")
    replicas: int = Field(1, ge=1, description="Scoring replicas (on the engine's cluster mode beyond one machine).")
    max_batch: int = Field(32, ge=1, le=1024, description="Dynamic batching: most slabs in one engine call.")
    batch_wait_ms: float = Field(5.0, ge=0, le=1000, description="Dynamic batching: longest wait to fill a batch.")
    ready_timeout_s: float = Field(300.0, gt=0, le=3600, description=(
        "Longest wait for the online service to answer through Ray's HTTP proxy once started. Ray gives its "
        "proxy a fixed 60 s and then fails the start, though the proxy goes on starting; on 2 busy cores it took "
        "longer, so the service waits by itself."))


class FeedbackConfig(_Section):
    """Readers' judgements of the model's results: who may give them, how conflicts resolve, when
    they call for a retrain."""

    reviewers: dict[str, Literal["reader", "senior"]] = Field(
        default_factory=dict, description="Reader id → role. Only these readers' feedback is taken; each "
                                          "one's token comes from DICOMOPS_REVIEWER_TOKENS (id=token,...).")
    conflict_rule: Literal["senior", "majority"] = Field(
        "senior", description="Readers who disagree on a series: a senior reader's label wins (then the "
                              "majority), or the majority alone; a tie leaves the series unresolved.")
    window_days: float = Field(90.0, gt=0, description="Agreement with readers over this rolling window.")
    min_cases: int = Field(10, ge=1, description="Fewer reader-labelled series give no agreement figure.")
    min_kappa: float = Field(0.6, ge=-1, le=1, description="Agreement below this calls for a retrain.")
    corrections: int = Field(20, ge=1, description="This many corrections since the last retrain call for one.")


class PipelineConfig(_Section):
    """Everything a pipeline run can be told; one section per stage."""

    synth: SynthConfig = SynthConfig()
    ingest: IngestConfig = IngestConfig()
    preprocess: PreprocessConfig = PreprocessConfig()
    train: TrainConfig = TrainConfig()
    segment: SegmentConfig = SegmentConfig()
    export: ExportConfig = ExportConfig()
    monitor: MonitorConfig = MonitorConfig()
    serve: ServeConfig = ServeConfig()
    feedback: FeedbackConfig = FeedbackConfig()
    experiment: str = Field("dicomops", description="MLflow experiment for pipeline runs.")

    @classmethod
    def from_yaml(cls, path: Path) -> PipelineConfig:
        """Load a config from YAML; keys that are not fields are an error, not ignored."""
        try:
            raw = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError as err:
            raise ValueError(f"config file {path} does not exist; pass an existing YAML file") from err
        except OSError as err:  # a folder, a file it may not read
            raise ValueError(f"cannot read the config file {path} ({err.strerror}); pass a readable YAML file") from err
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(err, "problem", None) or type(err).__name__
            raise ValueError(f"config file {path} is not valid YAML{where}: {problem}; fix it there") from err
        if not isinstance(raw, dict):
            raise ValueError(f"config file {path} must hold a mapping of sections, got {type(raw).__name__}")
        return cls.model_validate(raw)


def _project_dir() -> Path:
    return Path.cwd()


class Settings(BaseSettings):
    """Values that belong to the machine, not the experiment. Read from the environment."""

    model_config = SettingsConfigDict(env_prefix="DICOMOPS_", extra="ignore", frozen=True)

    work_dir: Path = Field(default_factory=lambda: _project_dir() / "work")
    mlflow_tracking_uri: str = Field(
        default_factory=lambda: f"sqlite:///{_project_dir() / 'mlflow' / 'mlflow.db'}",
        validation_alias="MLFLOW_TRACKING_URI",
    )
    mlflow_artifact_root: Path | None = Field(
        None, description="Where new experiments keep artifacts. Default: the folder 'artifacts' beside the "
                          "embedded store the tracking URI names (the SQLite file, or a file store's folder); "
                          "with a tracking server, the server's own artifact store.")
    deid_key: SecretStr | None = Field(
        None, description="Secret for UID remapping and pseudonyms; required outside the demo."
    )
    pacs_staging: Path = Field(
        default_factory=lambda: _project_dir() / "staging",
        description="Where a study retrieved from the PACS waits for the ingest gate (the PACS's own files, "
                    "with PHI: outside the work directory, removed once the study is handled).")
    http_budget_s: float = Field(
        120.0, ge=40, description="An outage of an HTTP server (MLflow, Prefect) ends a run within this many "
                                  "seconds, client and task retries included.")
    reviewer_tokens: SecretStr | None = Field(
        None, description="Each configured reviewer's token for the review endpoint: 'id=token,id=token'.")
    privacy_ledger: Path | None = Field(
        None, description="The privacy ledger shared by every work directory of a site (one budget per dataset). "
                          "Default: privacy/ledger.json in the work directory, which budgets that directory only.")
    reader_labels: Path = Field(
        default_factory=lambda: _project_dir() / "readers",
        description="The DVC-tracked source of readers' labels (labels.csv, pseudonymous UIDs only): each "
                    "feedback pass and each retrain records its version (<folder>.dvc beside it, pushed to the "
                    "default DVC remote).")
    work_lock_timeout_s: float = Field(
        10.0, ge=0, description="How long a flow waits for another writer of the same work directory before "
                                "it fails with the holder's name.")

    @field_validator("mlflow_artifact_root", mode="before")
    @classmethod
    def _blank_root_is_unset(cls, value: Any) -> Any:
        # An empty DICOMOPS_MLFLOW_ARTIFACT_ROOT would otherwise be Path(""), the current directory.
        return None if isinstance(value, str) and not value.strip() else value


def embedded_store_path(tracking_uri: str) -> Path | None:
    """The file or folder of the embedded store `tracking_uri` names, absolute; None for a server.

    ``sqlite:///rel.db`` is relative to the current directory and ``sqlite:////abs.db`` absolute, as
    SQLAlchemy reads them; ``file:`` URIs and bare paths are MLflow file stores.

    Raises:
        ValueError: an in-memory SQLite URI, which has no place for artifacts to sit beside.
    """
    uri = tracking_uri.strip()
    if uri.startswith("sqlite:"):
        database = uri[len("sqlite:"):].removeprefix("//").removeprefix("/").split("?", 1)[0]
        database = database.removeprefix("file:")  # SQLite's own URI filenames (?uri=true)
        if not database or database == ":memory:":
            raise ValueError(f"MLFLOW_TRACKING_URI {tracking_uri!r} is an in-memory SQLite store; name a file "
                             "(sqlite:////abs/path/mlflow.db) or set DICOMOPS_MLFLOW_ARTIFACT_ROOT")
        return Path(database).absolute()
    parts = urlsplit(uri)
    if parts.scheme == "file" and parts.netloc in ("", "localhost"):
        return Path(unquote(parts.path)).absolute()
    if not parts.scheme and uri and uri not in ("databricks", "databricks-uc"):  # MLflow's bare names
        return Path(uri).absolute()
    return None


def load_settings() -> Settings:
    """Read the settings now (call it when a flow or command starts, not at import).

    Without DICOMOPS_MLFLOW_ARTIFACT_ROOT, an embedded store keeps its artifacts in the folder
    ``artifacts`` beside it: ``sqlite:///<project>/mlflow/mlflow.db`` -> ``<project>/mlflow/artifacts``
    (what ``make clean`` removes and ``mlflow/server.sh`` serves).
    """
    settings = Settings()
    if settings.mlflow_artifact_root is not None:
        return settings.model_copy(update={"mlflow_artifact_root": settings.mlflow_artifact_root.absolute()})
    store = embedded_store_path(settings.mlflow_tracking_uri)
    if store is None:
        return settings
    return settings.model_copy(update={"mlflow_artifact_root": store.parent / "artifacts"})
