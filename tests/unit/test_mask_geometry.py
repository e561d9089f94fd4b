"""A mask must be one of its series: the gate refuses a mask of other rows and columns, one whose
slice positions miss some or all of the series' slices, one with more nodule ids than its row
records, and a file larger than that series' mask can be (without inflating it); preprocessing turns
a mask that still does not lie on its volume into a failed series with a reason.

Until 2026-12-06 all of these passed the gate: a mask of another series or a shifted one became an
all-zero mask (a series with nodules learnt as free of them), a mask of other rows and columns
failed preprocessing as ``worker_error:ValueError`` with nothing to say what to change, and a
64 MiB archive of zeros was inflated in full and written into the de-identified corpus.

The corpus is test_mask_copy's (2 patients, 128 x 128, 8 slices; row 2 has 4 nodules, slices 1 mm
apart; row 1 none, slices 0.625 mm apart).
"""

from __future__ import annotations

import logging
import tracemalloc
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from dicomops import ingest
from dicomops.synthetic.sidecars import mask_path
from tests.unit import test_mask_copy
from tests.unit.test_mask_copy import KEY, MAPPER, _arrays, _copy, _rekeyed_mask

gated = test_mask_copy.gated  # its fixture: one gate run, for this module too

Arrays = dict[str, Any]  # a mask file's arrays by name


def _shifted(by: float) -> Callable[[Arrays], Arrays]:
    return lambda a: {"mask": a["mask"], "ipp_z": a["ipp_z"] + by}


def _with_voxel(value: int) -> Callable[[Arrays], Arrays]:
    def change(a: Arrays) -> Arrays:
        mask = a["mask"].copy()
        mask[0, 0, 0] = value
        return {"mask": mask, "ipp_z": a["ipp_z"]}
    return change


def _extended(a: Arrays) -> Arrays:
    """Two more slices at each end: the acquisition's, where the gate left the end slices out."""
    step = a["ipp_z"][1] - a["ipp_z"][0]
    z = np.concatenate([a["ipp_z"][0] - step * np.array([2.0, 1.0]), a["ipp_z"], a["ipp_z"][-1] + step * np.array([1.0, 2.0])])
    mask = np.concatenate([np.zeros((2, *a["mask"].shape[1:]), np.uint8), a["mask"], np.zeros((2, *a["mask"].shape[1:]), np.uint8)])
    return {"mask": mask, "ipp_z": z}


ROWS_COLUMNS = "a mask whose rows x columns are not its series' (a mask of another series, or resized)"
NONE_OF = "a mask whose 'ipp_z' holds none of its series' slice positions (a mask of another series)"
SOME_OF = "a mask whose 'ipp_z' lacks some of its series' slice positions (within 0.001 mm; shifted, or of part of the series)"
IDS = "a mask with nodule ids beyond the number of nodules its row records (nodules, nodule_count)"
TOO_LARGE = "a file larger than a mask of its series can be ('mask' of slices x rows x columns)"

# kind -> (what the second row's mask becomes, the reason the gate gives)
REFUSED: dict[str, tuple[Callable[[Arrays], Arrays], str]] = {
    "downsampled": (lambda a: {"mask": a["mask"][:, ::2, ::2].copy(), "ipp_z": a["ipp_z"]}, ROWS_COLUMNS),
    "columns cropped": (lambda a: {"mask": a["mask"][:, :, :96].copy(), "ipp_z": a["ipp_z"]}, ROWS_COLUMNS),
    "rows padded": (lambda a: {"mask": np.pad(a["mask"], ((0, 0), (0, 2), (0, 0))), "ipp_z": a["ipp_z"]}, ROWS_COLUMNS),
    "ipp_z off by a slice": (_shifted(1.0), SOME_OF),  # the series' slices are 1 mm apart: 7 of 8 match
    "ipp_z of half the series": (lambda a: {"mask": a["mask"][:4].copy(), "ipp_z": a["ipp_z"][:4]}, SOME_OF),
    "ipp_z entirely off": (_shifted(100.0), NONE_OF),
    "ipp_z off by more than the tolerance": (_shifted(2e-3), NONE_OF),
    "nodule id 5 of 4": (_with_voxel(5), IDS),
}


def _rekey(src: Path, work: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="dicomops.ingest"):
        ingest.rekey_labels(src, work, KEY)


def _assert_refused(work: Path, labels: pd.DataFrame, reason: str, caplog: pytest.LogCaptureFixture) -> None:
    """Row 2 (index 1) without a mask, said with its row number and reason and no value; row 1 keeps its own."""
    assert _rekeyed_mask(work, labels, 1) == ""
    assert not (work / "deid" / mask_path(MAPPER.uid(labels.SeriesInstanceUID[1]))).exists()
    assert (work / "deid" / _rekeyed_mask(work, labels, 0)).is_file()
    assert f"the mask_path of rows 2 names {reason}; those series have no mask" in caplog.text
    assert "leave mask_path empty" in caplog.text
    for value in (labels.PatientID[1], labels.SeriesInstanceUID[1], labels.mask_path[1]):
        assert value not in caplog.text


@pytest.mark.parametrize("kind", list(REFUSED))
def test_a_mask_that_does_not_fit_its_series_is_refused(
        kind: str, gated: tuple[Path, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    src, work, labels = _copy(gated, tmp_path)
    change, reason = REFUSED[kind]
    np.savez_compressed(src / labels.mask_path[1], **change(_arrays(src / labels.mask_path[1])))
    _rekey(src, work, caplog)
    _assert_refused(work, labels, reason, caplog)


def test_the_mask_of_another_series_is_refused(
        gated: tuple[Path, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Both series are 128 x 128: only the slice positions tell the first series' mask from the second's.
    It would have given the second series, with its 4 nodules, an all-zero mask."""
    src, work, labels = _copy(gated, tmp_path)
    labels.loc[1, "mask_path"] = labels.mask_path[0]
    labels.to_csv(src / "labels.csv", index=False)
    _rekey(src, work, caplog)
    _assert_refused(work, labels, NONE_OF, caplog)


@pytest.mark.parametrize("row, column, value", [(0, None, None), (1, "nodule_count", "2"), (1, "nodules", "")])
def test_a_mask_with_more_nodules_than_its_row_records_is_refused(
        row: int, column: str | None, value: str | None, gated: tuple[Path, Path], tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    """The segmenter raised on such a mask when it trained (every series of the run lost); the gate
    refuses the mask alone. Row 1 records no nodule; row 2 four, its mask ids 1 to 4: a row that
    says 2 (or records none) does not match it."""
    src, work, labels = _copy(gated, tmp_path)
    if column is None:  # the nodule-free series given one nodule
        np.savez_compressed(src / labels.mask_path[0], **_with_voxel(1)(_arrays(src / labels.mask_path[0])))
    else:
        changed = labels.copy()
        changed.loc[row, column] = value
        changed.to_csv(src / "labels.csv", index=False)
    _rekey(src, work, caplog)
    assert _rekeyed_mask(work, labels, row) == ""
    assert _rekeyed_mask(work, labels, 1 - row) != ""
    assert f"the mask_path of rows {row + 1} names {IDS}" in caplog.text


@pytest.mark.parametrize("kind", ["as generated", "two more slices at each end", "ipp_z within the tolerance"])
def test_a_mask_of_its_series_passes(
        kind: str, gated: tuple[Path, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """What the checks must let through: the generator's own mask (ids up to the record), slices beyond
    the series' ends (the gate may leave end slices out), positions off by less than preprocessing's
    tolerance."""
    src, work, labels = _copy(gated, tmp_path)
    given: Arrays = _arrays(src / labels.mask_path[1])
    if kind != "as generated":
        given = _extended(given) if kind.startswith("two") else _shifted(5e-4)(given)
        np.savez_compressed(src / labels.mask_path[1], **given)
    _rekey(src, work, caplog)
    assert caplog.text == ""
    written = _arrays(work / "deid" / _rekeyed_mask(work, labels, 1))
    np.testing.assert_array_equal(written["mask"], given["mask"])
    np.testing.assert_array_equal(written["ipp_z"], given["ipp_z"])
    assert written["mask"].max() == 4


def _zeros_bomb(path: Path, ipp_z: np.ndarray) -> None:
    """A mask of 4096 slices of 128 x 128 zeros: 64 MiB inflated, about 64 KiB on disk, written in
    1 MiB pieces (this test holds no 64 MiB)."""
    slices = 4096
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        with zf.open("mask.npy", "w", force_zip64=True) as fh:
            np.lib.format.write_array_header_1_0(fh, {"descr": "|u1", "fortran_order": False, "shape": (slices, 128, 128)})
            piece = bytes(1024**2)
            for _ in range(slices * 128 * 128 // len(piece)):
                fh.write(piece)
        with zf.open("ipp_z.npy", "w") as fh:
            np.lib.format.write_array(fh, ipp_z[0] - np.arange(slices, dtype=np.float64))


def _lying_header(path: Path, ipp_z: np.ndarray) -> None:
    """A mask whose .npy header declares 100,000 slices (1.6 GB) over 16 bytes of data: numpy
    allocates what the header says before it reads."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        with zf.open("mask.npy", "w") as fh:
            np.lib.format.write_array_header_1_0(fh, {"descr": "|u1", "fortran_order": False, "shape": (100_000, 128, 128)})
            fh.write(bytes(16))
        with zf.open("ipp_z.npy", "w") as fh:
            np.lib.format.write_array(fh, ipp_z)


def _large_on_disk(path: Path, ipp_z: np.ndarray) -> None:
    """A valid mask beside 4 MiB of stored noise: larger on disk than any mask of the series."""
    rng = np.random.default_rng(0)
    np.savez(path, mask=np.zeros((8, 128, 128), np.uint8), ipp_z=ipp_z,
             noise=rng.integers(0, 255, 4 * 1024**2, dtype=np.uint8))


@pytest.mark.parametrize("write", [_zeros_bomb, _lying_header, _large_on_disk], ids=lambda f: f.__name__.strip("_"))
def test_a_mask_larger_than_its_series_could_need_is_refused_without_inflating_it(
        write: Callable[[Path, np.ndarray], None], gated: tuple[Path, Path], tmp_path: Path,
        caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """The gate inflated any archive in full (the zeros: 64 MiB in memory, then written into the corpus)."""
    src, work, labels = _copy(gated, tmp_path)
    bad = src / labels.mask_path[1]
    write(bad, _arrays(bad)["ipp_z"])
    if write is _large_on_disk:  # refused from its size: never opened
        real_load = np.load

        def load(path: Path, *args: Any, **kwargs: Any) -> Any:
            assert Path(path) != bad, "the oversized file was opened"
            return real_load(path, *args, **kwargs)

        monkeypatch.setattr(np, "load", load)
    tracemalloc.start()
    try:
        _rekey(src, work, caplog)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    _assert_refused(work, labels, TOO_LARGE, caplog)
    assert peak < 8 * 1024**2, f"{peak / 1024**2:.0f} MiB allocated re-keying two series of 128 KiB masks"


def test_an_archive_member_that_is_no_array_is_refused(
        gated: tuple[Path, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """numpy returns a member without the .npy magic as raw bytes: the gate then asked bytes for their
    dtype, outside its try, and the whole re-keying stopped."""
    src, work, labels = _copy(gated, tmp_path)
    bad = src / labels.mask_path[1]
    ipp_z = _arrays(bad)["ipp_z"]
    with zipfile.ZipFile(bad, "w") as zf:
        zf.writestr("mask", b"not an array")
        with zf.open("ipp_z.npy", "w") as fh:
            np.lib.format.write_array(fh, ipp_z)
    _rekey(src, work, caplog)
    _assert_refused(work, labels, "a file that is not a readable .npz archive", caplog)


# Preprocessing given a mask the gate never saw (written into the corpus after it).
BYPASSED: dict[str, tuple[Callable[[Arrays], Arrays], str]] = {
    "downsampled": (REFUSED["downsampled"][0],
                    "the mask is 8 x 64 x 64 (slices x rows x columns) but the series' images are 128 x 128"),
    "ipp_z entirely off": (REFUSED["ipp_z entirely off"][0], "the mask has no slice at the position of 8 of the series' 8 slices"),
    "ipp_z off by a slice": (REFUSED["ipp_z off by a slice"][0], "the mask has no slice at the position of 1 of the series' 8 slices"),
}


@pytest.mark.parametrize("kind", list(BYPASSED))
def test_preprocessing_fails_the_series_whose_mask_does_not_lie_on_it_and_goes_on(
        kind: str, gated: tuple[Path, Path], tmp_path: Path) -> None:
    from dicomops.config import PreprocessConfig
    from dicomops.preprocessing.stage import preprocess_corpus

    _, work, labels = _copy(gated, tmp_path)
    mask_file = work / "deid" / _rekeyed_mask(work, labels, 1)
    change, detail = BYPASSED[kind]
    np.savez_compressed(mask_file, **change(_arrays(mask_file)))
    counts = preprocess_corpus(work, PreprocessConfig(workers=1, crop_xy=128))

    # The volume is the series', whatever its mask: preprocessed and monitored, its label withheld.
    assert (counts["computed"], counts["failed"], counts["labels_withheld"]) == (2, 0, 1)
    failures = pd.read_csv(work / "preprocessed/failures.csv", keep_default_na=False)
    bad, good = MAPPER.uid(labels.SeriesInstanceUID[1]), MAPPER.uid(labels.SeriesInstanceUID[0])
    assert failures.SeriesInstanceUID.tolist() == [bad]
    assert failures.reason.tolist() == ["mask_error"]
    assert failures.detail[0].startswith(detail) and "ingest again" in failures.detail[0]
    index = pd.read_parquet(work / "preprocessed/index.parquet").set_index("SeriesInstanceUID")
    assert index.label[bad] == -1 and index.label[good] == int(labels.label[0])


def test_a_series_whose_nodules_lost_their_mask_trains_neither_model(
        gated: tuple[Path, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The gate refused the second series' mask, but labels.csv still records its 4 nodules: without
    the mask every slice would teach the classifier "no nodule" and the segmenter would learn the
    nodules as background. Its label is withheld (preprocessed and monitored all the same), with a
    reason; the series whose mask passed trains as before."""
    from dicomops.config import PreprocessConfig
    from dicomops.layout import WorkLayout
    from dicomops.preprocessing.stage import NODULES_WITHOUT_MASK, preprocess_corpus

    src, work, labels = _copy(gated, tmp_path)
    np.savez_compressed(src / labels.mask_path[1], **REFUSED["downsampled"][0](_arrays(src / labels.mask_path[1])))
    _rekey(src, work, caplog)
    with caplog.at_level(logging.WARNING, logger="dicomops.preprocessing.stage"):
        counts = preprocess_corpus(work, PreprocessConfig(workers=1, crop_xy=128))
    refused, kept = (MAPPER.uid(labels.SeriesInstanceUID[i]) for i in (1, 0))
    assert counts["failed"] == 0 and counts["labels_withheld"] == 1
    index = pd.read_parquet(work / "preprocessed/index.parquet").set_index("SeriesInstanceUID")
    assert index.label[refused] == -1 and index.label[kept] == int(labels.label[0])
    assert set(pd.read_parquet(work / "preprocessed/features.parquet").SeriesInstanceUID) == {refused, kept}
    assert refused not in set(pd.read_parquet(work / "preprocessed/slabs.parquet").SeriesInstanceUID)
    assert WorkLayout(work).labelled_series().SeriesInstanceUID.tolist() == [kept]
    failures = pd.read_csv(work / "preprocessed/failures.csv", keep_default_na=False)
    assert failures.to_dict("records")[0]["SeriesInstanceUID"] == refused
    assert failures.reason.tolist() == [NODULES_WITHOUT_MASK] and "records 4 nodule(s)" in failures.detail[0]
    assert "1 labelled series have no mask they can be trained with" in caplog.text


@pytest.mark.parametrize("nodules, nodule_count", [("", "4"), ("[]", "4"), ('[{"diameter_mm": 5.0}]', "0")])
def test_either_count_of_nodules_withholds_a_label_without_a_mask(nodules: str, nodule_count: str) -> None:
    """The gate bounds a mask's ids by the fewer nodules a row records; a label without a mask is
    withheld where either count says there is one."""
    from dicomops.preprocessing.stage import unmasked_nodules

    labels = pd.DataFrame({"SeriesInstanceUID": ["a", "b"], "nodules": [nodules, "[]"],
                           "nodule_count": [nodule_count, "0"]}).set_index("SeriesInstanceUID")
    assert unmasked_nodules(labels, {"a", "b"}) == {"a": max(int(nodule_count), 1)}


def test_a_batch_whose_labels_were_withheld_lost_no_series(gated: tuple[Path, Path], tmp_path: Path) -> None:
    """The monitor counts a batch none of whose series preprocessed as lost; a withheld label is not
    a lost series (it was preprocessed and judged)."""
    from dicomops.monitoring.stage import quarantine_counts

    _, work, _ = _copy(gated, tmp_path)
    series = sorted(set(pd.read_parquet(work / "ingest/instances.parquet").SeriesInstanceUID))
    files = len(pd.read_parquet(work / "ingest/instances.parquet"))
    (work / "preprocessed").mkdir(exist_ok=True)
    for reason, lost in (("nodules_without_mask", 0), ("mask_error", 0), ("transform_error", files)):
        pd.DataFrame({"SeriesInstanceUID": series, "reason": reason, "detail": ""}).to_csv(
            work / "preprocessed/failures.csv", index=False)
        assert quarantine_counts(work)[0] == lost, reason


def test_a_mask_path_the_system_cannot_look_up_is_no_file_and_not_said(
        gated: tuple[Path, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A name too long for the file system raised OSError with the path in it, and ended the gate."""
    src, work, labels = _copy(gated, tmp_path)
    labels.loc[1, "mask_path"] = "masks/" + "Jane_Doe_" * 40 + ".npz"
    labels.to_csv(src / "labels.csv", index=False)
    _rekey(src, work, caplog)
    _assert_refused(work, labels, "no file", caplog)
    assert "Jane_Doe" not in caplog.text
