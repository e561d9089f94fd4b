"""Config checks that refuse at load time what would otherwise fail the run later: a custom window
without its level and width (every series failed, the reason lost), and segmenter patch or window
sizes the UNet cannot take (a tensor size error 20 s into training); and the preprocessing stage
when every series fails."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pydantic
import pytest

from dicomops.config import PipelineConfig, PreprocessConfig, SegmentConfig, SynthConfig


@pytest.mark.parametrize("settings", [
    {},
    {"window": "lung"}, {"window": "soft_tissue"}, {"window": "bone"}, {"window": "none"},
    {"window": "header", "header_window_index": 1},
    {"window": "custom", "window_center": -600, "window_width": 1500},
    {"window": "custom", "window_center": 0.0, "window_width": 0.5},
])
def test_valid_window_settings_stay_valid(settings: dict[str, object]) -> None:
    cfg = PreprocessConfig(**settings)
    assert PreprocessConfig.model_validate_json(cfg.model_dump_json()) == cfg  # what the workers read back


@pytest.mark.parametrize(("settings", "match"), [
    ({"window": "custom"}, "window 'custom' needs window_center and window_width"),
    ({"window": "custom", "window_center": 40}, "needs window_center and window_width"),
    ({"window": "custom", "window_width": 400}, "needs window_center and window_width"),
    ({"window": "custom", "window_center": 40, "window_width": -400}, "window_width must be above 0"),
    ({"window": "custom", "window_center": 40, "window_width": 0}, "window_width must be above 0"),
])
def test_window_settings_that_would_fail_are_refused(settings: dict[str, object], match: str) -> None:
    with pytest.raises(pydantic.ValidationError, match=match):
        PreprocessConfig(**settings)


@pytest.mark.parametrize("settings", [
    {"window": "lung", "window_center": 40, "window_width": 400}, {"window_width": 400},
    {"window": "header", "window_center": 40}, {"window": "none", "window_width": 400},
])
def test_a_centre_or_width_a_preset_ignores_is_dropped_with_a_warning(settings: dict[str, object],
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    """Not refused: a registered version's stored configuration may carry them, and it must load."""
    cfg = PreprocessConfig(**settings)
    assert (cfg.window_center, cfg.window_width) == (None, None)
    assert "apply only to window 'custom'" in caplog.text and "set window: custom, or remove them" in caplog.text


def test_a_yaml_custom_window_without_level_is_refused_at_load(tmp_path: Path) -> None:
    path = tmp_path / "custom.yaml"
    path.write_text("preprocess:\n  window: custom\n")
    with pytest.raises(pydantic.ValidationError, match="needs window_center and window_width"):
        PipelineConfig.from_yaml(path)
    path.write_text("preprocess:\n  window: custom\n  window_center: -600\n  window_width: 1500\n")
    assert PipelineConfig.from_yaml(path).preprocess.window_width == 1500


@pytest.mark.parametrize("field", ["patch", "roi"])
@pytest.mark.parametrize("size", [(0, 0, 0), (-8, -8, -8), (32, 32, 0), (32, -16, 32), (4, 32, 32), (8, 8, 8)])
def test_sizes_below_the_unets_smallest_are_refused(field: str, size: tuple[int, int, int]) -> None:
    with pytest.raises(pydantic.ValidationError, match=r"must be at least 8 \(the product of strides"):
        SegmentConfig(**{field: size})


def test_the_smallest_sizes_the_unet_takes_are_accepted() -> None:
    SegmentConfig(patch=(8, 8, 16), roi=(16, 8, 8))  # a coarsest level of 1 x 1 x 2 voxels
    SegmentConfig(channels=(4, 8), strides=(2,), patch=(2, 2, 4), roi=(16, 16, 8))
    SegmentConfig(channels=(4, 8, 16), strides=(2, 1), patch=(4, 2, 2), roi=(2, 4, 2))
    with pytest.raises(pydantic.ValidationError, match="divisible by 8"):  # the older check stands
        SegmentConfig(patch=(48, 48, 20))


@pytest.mark.parametrize("strides", [(0,), (2, -2)])
def test_strides_below_one_are_refused(strides: tuple[int, ...]) -> None:
    channels = tuple(4 * 2 ** i for i in range(len(strides) + 1))
    with pytest.raises(pydantic.ValidationError, match="must each be at least 1"):
        SegmentConfig(channels=channels, strides=strides)


@pytest.fixture(scope="module")
def small_work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two small clean series, ingested."""
    from dicomops import ingest
    from dicomops.config import IngestConfig
    from dicomops.synthetic import generate_corpus

    root = tmp_path_factory.mktemp("all-fail")
    generate_corpus(root / "src", SynthConfig(patients=2, seed=7, fault_rate=0.0, matrix=128, slices=8, workers=1))
    ingest.run(root / "src", root / "work", IngestConfig(workers=1, max_invalid_fraction=1.0),
               b"config-checks-key-0123456789abcdef")
    return root / "work"


def test_every_series_failing_is_an_error_with_its_reasons(small_work: Path) -> None:
    from dicomops.layout import WorkLayout
    from dicomops.preprocessing import stage

    # A valid config that no series can take: each header holds fewer windows than this index.
    cfg = PreprocessConfig(window="header", header_window_index=20, workers=1, crop_xy=128)
    layout = WorkLayout(small_work)
    n = pd.read_parquet(layout.ingest.accepted).SeriesInstanceUID.nunique()
    assert n >= 2  # several series, one reason counted once
    from dicomops.errors import PreprocessingFailedError

    with pytest.raises(PreprocessingFailedError, match=rf"all {n} series failed to preprocess: {n} x transform_error "
                                         r"\(e\.g\. ValueError: header_window_index 20 but the header has only"):
        stage.preprocess_corpus(small_work, cfg)
    pre = layout.preprocessed
    failures = pd.read_csv(pre.failures)
    assert len(failures) == n and set(failures.reason) == {"transform_error"}
    assert failures.detail.str.startswith("ValueError: header_window_index 20").all()  # the message, not the type
    # What the tracking task logs after the stage: a figure that says there is nothing, not a KeyError.
    assert stage.plot_samples(small_work).exists()


def test_a_config_file_that_is_not_yaml_or_not_a_file_is_a_clear_error(tmp_path: Path) -> None:
    from dicomops.config import PipelineConfig

    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  epochs: 2\n   input_size: [1, 2\n")
    with pytest.raises(ValueError, match=r"bad.yaml is not valid YAML at line \d+, column \d+"):
        PipelineConfig.from_yaml(bad)
    with pytest.raises(ValueError, match="cannot read the config file"):
        PipelineConfig.from_yaml(tmp_path)


def test_hashing_a_work_directory_with_nothing_ingested_says_what_to_run(tmp_path: Path) -> None:
    from dicomops.preprocessing.stage import corpus_content_hash

    with pytest.raises(FileNotFoundError, match="run 'dicomops ingest SRC --work"):
        corpus_content_hash(tmp_path)


@pytest.mark.parametrize("seed", [-1, 2**32])
def test_a_seed_numpy_cannot_take_is_refused_naming_the_setting(seed: int) -> None:
    """numpy's seeds run from 0 to 2**32 - 1; outside, training failed inside numpy without naming
    the setting (a bug hunt's find)."""
    from pydantic import ValidationError

    from dicomops.config import PreprocessConfig, SegmentConfig, TrainConfig

    for section in (TrainConfig, SegmentConfig, PreprocessConfig):
        with pytest.raises(ValidationError, match="seed"):
            section(seed=seed)


def test_flip_axes_from_yaml_are_the_in_plane_axes_and_others_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  flip_axes: [0, 1]\n")
    assert PipelineConfig.from_yaml(path).train.flip_axes == (0, 1)
    assert PipelineConfig().train.flip_axes == (0, 1)  # since 2026-12-07 (README, *Where it fails*)
    # A version logged before the setting trained with left-right flips only, and its QAT fine-tune
    # (export.qat, from TrainConfig.from_logged) augments as it did.
    from dicomops.config import TrainConfig

    logged = TrainConfig().model_dump(mode="json")
    del logged["flip_axes"]
    assert TrainConfig.from_logged(logged).flip_axes == (0,)
    assert TrainConfig.from_logged(TrainConfig().model_dump(mode="json")).flip_axes == (0, 1)
    for axes in ("[2]", "[0, 0]", "[0, 1, 0]"):
        path.write_text(f"train:\n  flip_axes: {axes}\n")
        with pytest.raises(pydantic.ValidationError, match="flip_axes"):
            PipelineConfig.from_yaml(path)
