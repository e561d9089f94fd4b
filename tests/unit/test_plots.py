"""Reviewer pictures: outcome ordering and captions, per-vendor confusion counts, Grad-CAM saliency,
the sample grid's layout, and the ingest picture's manufacturer → vendor key mapping."""

from __future__ import annotations

from pathlib import Path

import matplotlib
import matplotlib.colors
import matplotlib.figure
import matplotlib.image
import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from dicomops import io
from dicomops.config import TrainConfig
from dicomops.ingest import plot_ingest
from dicomops.layout import WorkLayout
from dicomops.training import plots
from dicomops.training.model import build_model
from dicomops.training.saliency import default_target_layer, saliency_map, saliency_maps

matplotlib.use("Agg")


@pytest.fixture()
def saved_figures(monkeypatch: pytest.MonkeyPatch) -> list[matplotlib.figure.Figure]:
    """Every figure saved during the test, kept for inspection after the code under test closed it."""
    from matplotlib.figure import Figure

    figures: list[Figure] = []
    original = Figure.savefig

    def record(self: Figure, *args: object, **kwargs: object) -> None:
        figures.append(self)
        original(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", record)
    return figures


def _preds() -> pd.DataFrame:
    """Ten series at threshold 0.5: 3 FP, 2 FN, 3 TP, 2 TN, over two vendors."""
    rows = [  # uid, vendor, label, score
        ("1.2.840.AAAA0001", "ge", 0, 0.70),  # FP
        ("1.2.840.AAAA0002", "ge", 0, 0.95),  # FP, most confident
        ("1.2.840.AAAA0003", "canon", 0, 0.50),  # FP: at the threshold counts as positive
        ("1.2.840.AAAA0004", "canon", 1, 0.10),  # FN, most confident
        ("1.2.840.AAAA0005", "ge", 1, 0.40),  # FN
        ("1.2.840.AAAA0006", "ge", 1, 0.90),  # TP
        ("1.2.840.AAAA0007", "canon", 1, 0.99),  # TP, most confident
        ("1.2.840.AAAA0008", "canon", 1, 0.60),  # TP
        ("1.2.840.AAAA0009", "ge", 0, 0.05),  # TN, most confident
        ("1.2.840.AAAA0010", "canon", 0, 0.30),  # TN
    ]
    frame = pd.DataFrame(rows, columns=["SeriesInstanceUID", "vendor", "label", "score"])
    return frame.assign(best_z=2, fold=[i % 2 for i in range(len(frame))])


# -- pure helpers --------------------------------------------------------------------------------


def test_outcomes_at_threshold() -> None:
    preds = _preds()
    got = list(plots.outcomes(preds.label, preds.score, 0.5))
    assert got == ["FP", "FP", "FP", "FN", "FN", "TP", "TP", "TP", "TN", "TN"]


def test_pick_samples_puts_errors_first_most_confident_first() -> None:
    picks = plots.pick_samples(_preds(), 0.5, n=12)
    assert list(picks.outcome) == ["FP", "FP", "FP", "FN", "FN", "TP", "TP", "TP", "TN", "TN"]
    assert list(picks.SeriesInstanceUID.str[-2:]) == ["02", "01", "03", "04", "05", "07", "06", "08", "09", "10"]


def test_pick_samples_keeps_a_third_for_correct_series() -> None:
    # n=6: errors get 6 - 2 = 4 places shared FP, FN in turn; TP and TN one each.
    picks = plots.pick_samples(_preds(), 0.5, n=6)
    assert list(picks.outcome) == ["FP", "FP", "FN", "FN", "TP", "TN"]
    assert list(picks.SeriesInstanceUID.str[-2:]) == ["02", "01", "04", "05", "07", "09"]


def test_pick_samples_gives_unused_places_back_to_errors() -> None:
    preds = _preds()
    only_errors_and_one_tp = preds[preds.SeriesInstanceUID.str[-2:].isin(["01", "02", "03", "04", "05", "07"])]
    picks = plots.pick_samples(only_errors_and_one_tp, 0.5, n=6)
    assert list(picks.outcome) == ["FP", "FP", "FP", "FN", "FN", "TP"]
    with pytest.raises(ValueError, match="n must be at least 1"):
        plots.pick_samples(preds, 0.5, n=0)


def test_sample_caption_names_outcome_vendor_series_truth_and_score() -> None:
    row = plots.pick_samples(_preds(), 0.5).iloc[0]
    heading, details = plots.sample_caption(row)
    assert heading == "FP · false positive"
    assert details == "ge · series …AAAA0002\ntruth: no nodule · score 0.95"
    fn = plots.pick_samples(_preds(), 0.5).iloc[3]
    assert plots.sample_caption(fn) == ("FN · missed nodule", "canon · series …AAAA0004\ntruth: nodule · score 0.10")
    assert plots.short_series_id("25.1234") == "25.1234"


def test_confusion_counts_per_vendor_and_all() -> None:
    table = plots.confusion_counts(_preds(), 0.5)
    assert list(table.index) == ["all", "canon", "ge"]
    assert table.loc["all"].to_dict() == {"TP": 3, "FP": 3, "FN": 2, "TN": 2, "n": 10}
    assert table.loc["canon"].to_dict() == {"TP": 2, "FP": 1, "FN": 1, "TN": 1, "n": 5}
    assert table.loc["ge"].to_dict() == {"TP": 1, "FP": 2, "FN": 1, "TN": 1, "n": 5}


# -- saliency --------------------------------------------------------------------------------------


class _BlobDetector(nn.Module):
    """Nodule evidence = mean of the positive part of a 3×3 brightness detector: only bright spots
    (mean above 0.5 over the slab) raise the score."""

    def __init__(self, k: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(k, 1, 3, padding=1)
        with torch.no_grad():
            self.conv.weight.fill_(1.0 / (9 * k))
            self.conv.bias.fill_(-0.5)
        self.head = nn.Linear(1, 2)
        with torch.no_grad():
            self.head.weight.copy_(torch.tensor([[0.0], [10.0]]))
            self.head.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv(x)).mean(dim=(2, 3)))


def _blob_slab(k: int = 3, size: int = 64, centre: tuple[int, int] = (44, 18)) -> torch.Tensor:
    rng = np.random.default_rng(0)
    image = rng.normal(0.2, 0.03, size=(k, size, size)).astype(np.float32)
    yy, xx = np.mgrid[:size, :size]
    image[:, (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= 25] = 0.9
    return torch.from_numpy(image)


def test_saliency_peaks_on_the_region_that_drives_the_output() -> None:
    model = _BlobDetector(3)
    slab = _blob_slab()
    heat = saliency_map(model, slab)
    assert heat.shape == (64, 64)
    assert heat.min() >= 0.0 and heat.max() == pytest.approx(1.0)
    blob = np.zeros((64, 64), bool)
    yy, xx = np.mgrid[:64, :64]
    blob[(yy - 44) ** 2 + (xx - 18) ** 2 <= 25] = True
    assert heat[blob].mean() > 0.5
    assert heat[~blob].mean() < 0.05
    assert np.unravel_index(heat.argmax(), heat.shape) in {(y, x) for y, x in zip(*np.nonzero(blob), strict=True)}


def test_saliency_is_zero_without_nodule_evidence() -> None:
    flat = torch.full((3, 32, 32), 0.2)
    assert np.all(saliency_map(_BlobDetector(3), flat) == 0.0)


def test_saliency_of_the_project_model_leaves_the_model_untouched() -> None:
    torch.manual_seed(0)
    model = build_model(TrainConfig(), 3).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    maps = saliency_maps(model, torch.rand(2, 3, 64, 64))
    assert maps.shape == (2, 64, 64)
    assert np.isfinite(maps).all() and maps.min() >= 0.0 and maps.max() <= 1.0
    assert default_target_layer(model) == "layer4"
    assert all(not m._forward_hooks and not m._backward_hooks for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="expects 3"):
        saliency_maps(model, torch.rand(1, 5, 64, 64))
    with pytest.raises(ValueError, match=r"\(k, H, W\)"):
        saliency_map(model, torch.rand(1, 3, 64, 64))


# -- pictures ------------------------------------------------------------------------------------


def _work_with_volumes(tmp_path: Path, preds: pd.DataFrame) -> WorkLayout:
    """A preprocessed cache with one small (X, Y, Z) volume per series and the index naming it."""
    layout = WorkLayout(tmp_path / "work")
    pre = layout.preprocessed
    pre.volumes.mkdir(parents=True)
    rng = np.random.default_rng(1)
    rows = []
    for i, row in enumerate(preds.itertuples()):
        image = rng.uniform(0, 0.3, size=(48, 48, 5)).astype(np.float16)
        mask = np.zeros(image.shape, np.uint8)
        if row.label:
            image[20:26, 10:16, :] = 0.9
            mask[20:26, 10:16, 2] = 1
        np.savez_compressed(pre.entry(f"k{i}"), image=image, mask=mask)
        rows.append({"SeriesInstanceUID": row.SeriesInstanceUID, "path": f"volumes/k{i}.npz"})
    io.write_parquet(pre.index, pd.DataFrame(rows))
    return layout


def _boxes_overlap(a: object, b: object) -> bool:
    return bool(a.x0 < b.x1 - 1 and b.x0 < a.x1 - 1 and a.y0 < b.y1 - 1 and b.y0 < a.y1 - 1)  # type: ignore[attr-defined]


def test_sample_grid_captions_are_legible_and_clear_of_the_images(tmp_path: Path, saved_figures: list) -> None:
    preds = _preds()
    layout = _work_with_volumes(tmp_path, preds)
    out = plots.sample_grid(layout, preds, 0.5, tmp_path / "samples.png")
    assert out.stat().st_size > 10_000
    fig = saved_figures[-1]
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig.set_dpi(plots.DPI)  # measured at the dpi the PNG is saved with
    renderer = FigureCanvasAgg(fig).get_renderer()
    fig.draw(renderer)
    panels = [ax for ax in fig.axes if ax.images]
    assert len(panels) == 10
    image_boxes = [ax.get_window_extent(renderer) for ax in panels]
    for ax in panels:
        for text in (ax.title, ax.xaxis.label):
            assert text.get_fontsize() >= 10
            box = text.get_window_extent(renderer)
            assert not any(_boxes_overlap(box, image) for image in image_boxes), text.get_text()
    assert [ax.title.get_text().split(" ·")[0] for ax in panels] == ["FP"] * 3 + ["FN"] * 2 + ["TP"] * 3 + ["TN"] * 2
    assert {ax.spines["top"].get_edgecolor() for ax in panels[:3]} == {matplotlib.colors.to_rgba(plots.OUTCOME_COLOURS["FP"])}
    assert "no model given" in fig.get_suptitle()
    assert matplotlib.image.imread(out).shape[1] == plots.GRID_COLUMNS * 320  # 3.2 in per panel at 100 dpi


def test_sample_grid_with_fold_models_draws_an_overlay(tmp_path: Path, saved_figures: list) -> None:
    preds = _preds()
    layout = _work_with_volumes(tmp_path, preds)
    torch.manual_seed(0)
    models = {0: build_model(TrainConfig(), 3).eval(), 1: build_model(TrainConfig(), 3).eval()}
    out = plots.sample_grid(layout, preds, 0.5, tmp_path / "samples.png", models=models, input_size=64, n=4)
    assert out.stat().st_size > 10_000
    fig = saved_figures[-1]
    panels = [ax for ax in fig.axes if ax.images]
    assert len(panels) == 4 and all(len(ax.images) == 2 for ax in panels)  # slice + Grad-CAM
    assert "Grad-CAM of the fold model" in fig.get_suptitle()
    with pytest.raises(ValueError, match=r"no model for fold\(s\) \[1\]"):
        plots.sample_grid(layout, preds, 0.5, tmp_path / "x.png", models={0: models[0]}, input_size=64)
    with pytest.raises(ValueError, match="fold"):
        plots.sample_grid(layout, preds.drop(columns="fold"), 0.5, tmp_path / "x.png", models=models)


def test_confusion_by_vendor_draws_one_matrix_per_vendor_and_all(tmp_path: Path, saved_figures: list) -> None:
    out = plots.confusion_by_vendor(_preds(), 0.5, tmp_path / "confusion.png")
    assert out.stat().st_size > 5_000
    panels = [ax for ax in saved_figures[-1].axes if ax.images]
    assert [ax.get_title() for ax in panels] == ["all", "canon", "ge"]
    # Shares of the truth row only: an exact count (of an outcome cell of one series) never leaves.
    canon = [t.get_text() for t in panels[1].texts]  # TN, FP, FN, TP
    assert canon == ["50%", "50%", "33%", "67%"]


def _ingest_work(tmp_path: Path, labels: bool, released: bool = True) -> Path:
    work = tmp_path / "work"
    paths = WorkLayout(work).ingest
    io.write_json(paths.summary, {"files": 10, "quarantined_files": 1, "accepted_series": 4,
                                  "reasons": {"not_dicom": 1}})
    io.write_parquet(paths.series, pd.DataFrame({
        "SeriesInstanceUID": ["s1", "s2", "s3", "s4"],
        "Manufacturer": ["TOSHIBA", "TOSHIBA", "GE MEDICAL SYSTEMS", "SIEMENS"]}))
    if labels:
        io.write_csv(paths.deid / "labels.csv", pd.DataFrame({
            "SeriesInstanceUID": ["s1", "s2", "s3"], "vendor": ["canon", "canon", "ge"], "label": [1, 0, 1]}))
    if released:  # what the gate released through OpenDP (dicomops.feedback.privacy): noisy, a cell suppressed
        io.write_csv(paths.released / "released_counts.csv", pd.DataFrame({
            "release": ["series by vendor"] * 3 + ["series by site"], "cell": ["GE MEDICAL SYSTEMS", "SIEMENS",
                                                                              "TOSHIBA", "SI-X"],
            "count": [15, 17, 22, 40], "epsilon": 1.0, "delta": 6e-7, "threshold": 14}))
    return work


def test_plot_ingest_shows_released_counts_per_manufacturer_with_the_vendor_key(
        tmp_path: Path, saved_figures: list) -> None:
    out = plot_ingest(_ingest_work(tmp_path, labels=True))
    assert out.stat().st_size > 5_000
    ax = saved_figures[-1].axes[1]
    bars = {t.get_text(): p.get_width() for t, p in zip(ax.get_yticklabels(), ax.patches, strict=True)}
    # The released (noisy) counts, never the exact ones (2, 1, 1 here: every one would be suppressed).
    assert bars == {"GE MEDICAL SYSTEMS → ge": 15, "SIEMENS → no label, not in CV": 17, "TOSHIBA → canon": 22}
    assert "vendor key in CV" in ax.get_title() and "\u03b5 = 1" in ax.get_title()


def test_plot_ingest_before_labels_says_there_is_no_key(tmp_path: Path, saved_figures: list) -> None:
    plot_ingest(_ingest_work(tmp_path, labels=False))
    ax = saved_figures[-1].axes[1]
    assert {t.get_text() for t in ax.get_yticklabels()} == {"GE MEDICAL SYSTEMS → no label, not in CV",
                                                            "SIEMENS → no label, not in CV",
                                                            "TOSHIBA → no label, not in CV"}
    assert "no labels.csv yet" in ax.get_title()


def test_plot_ingest_without_a_release_draws_no_count(tmp_path: Path, saved_figures: list) -> None:
    plot_ingest(_ingest_work(tmp_path, labels=True, released=False))
    ax = saved_figures[-1].axes[1]
    assert len(ax.patches) == 0 and "nothing released" in ax.get_title()
    assert "budget is spent" in " ".join(t.get_text() for t in ax.texts)
