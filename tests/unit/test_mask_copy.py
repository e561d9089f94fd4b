"""The masks `labels.csv` names, as they pass the gate: read as the generator's format and written
anew, never copied, so no file named as a mask (a DICOM file, a table of names, a link to either)
and no other array in a mask reaches the de-identified corpus.

The gate runs once on a small synthetic corpus (fixed seed, 2 patients, 128 x 128, 8 slices); each
test copies the source and the work directory, changes the labels or the masks, and re-keys them.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from dicomops import ingest
from dicomops.config import IngestConfig, SynthConfig
from dicomops.deid import KeyedMapper, scan_for_phi
from dicomops.synthetic import generate_corpus
from dicomops.synthetic.sidecars import mask_path

KEY = b"mask-copy-key-0123456789abcdef012"
MAPPER = KeyedMapper(KEY)


@pytest.fixture(scope="module")
def gated(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(source, work) of one gate run with the generator's own labels and masks."""
    root = tmp_path_factory.mktemp("gated")
    src, work = root / "src", root / "work"
    generate_corpus(src, SynthConfig(patients=2, seed=3, fault_rate=0.0, matrix=128, slices=8, workers=1))
    ingest.run(src, work, IngestConfig(workers=1), KEY)
    return src, work


def _copy(gated: tuple[Path, Path], tmp_path: Path) -> tuple[Path, Path, pd.DataFrame]:
    src, work = tmp_path / "src", tmp_path / "work"
    shutil.copytree(gated[0], src)
    shutil.copytree(gated[1], work)
    return src, work, _table(src / "labels.csv")


def _table(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, dtype=str, keep_default_na=False)


def _needles(src: Path) -> set[str]:
    """Every PHI value the generator wrote, plus the original UIDs."""
    labels = _table(src / "labels.csv")
    return set(_table(src / "phi.csv").value) | set(labels.SeriesInstanceUID) | set(labels.StudyInstanceUID)


def _rekeyed_mask(work: Path, labels: pd.DataFrame, row: int) -> str:
    """The mask_path the gate gave the series of `row` (0-based) of the source's labels."""
    rekeyed = _table(work / "deid/labels.csv").set_index("SeriesInstanceUID")
    return str(rekeyed.loc[MAPPER.uid(labels.SeriesInstanceUID[row]), "mask_path"])


def _arrays(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as npz:
        return {name: npz[name] for name in npz.files}


@pytest.mark.parametrize("named", ["a DICOM file", "the table of names"])
def test_a_mask_path_naming_another_file_of_the_corpus_leaks_nothing(
        named: str, gated: tuple[Path, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The gate copied the named file's bytes into WORK/deid/masks/: a whole DICOM file, PHI and all."""
    src, _, labels = _copy(gated, tmp_path)
    dicom = sorted((src / labels.series_dir[1]).iterdir())[0]
    labels.loc[1, "mask_path"] = dicom.relative_to(src).as_posix() if named == "a DICOM file" else "phi.csv"
    labels.to_csv(src / "labels.csv", index=False)
    work = tmp_path / "gated-again"
    with caplog.at_level(logging.WARNING, logger="dicomops.ingest"):
        summary = ingest.run(src, work, IngestConfig(workers=1), KEY)

    assert summary.accepted_series == 2 and summary.passed
    assert _rekeyed_mask(work, labels, 1) == ""
    other = mask_path(MAPPER.uid(labels.SeriesInstanceUID[0]))  # the other series keeps its mask
    assert [p.relative_to(work / "deid").as_posix() for p in (work / "deid/masks").iterdir()] == [other]
    assert scan_for_phi(work, _needles(src)) == []
    assert "mask_path of rows 2 names a file that is not a readable .npz archive" in caplog.text
    assert labels.mask_path[1] not in caplog.text and labels.PatientID[1] not in caplog.text


@pytest.mark.parametrize("linked", ["the file", "the masks folder"])
def test_a_mask_linked_from_outside_gives_only_a_mask(
        linked: str, gated: tuple[Path, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A link that leaves the source folder is read like a linked series folder, and what it gives is
    checked as any mask is: a report or a DICOM file outside is no mask; a mask outside loses its
    other arrays."""
    src, work, labels = _copy(gated, tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    name = _table(src / "phi.csv").value[0]
    first = _arrays(src / labels.mask_path[0])
    np.savez(elsewhere / "first.npz", **first, patient_name=np.array([name.encode()]))
    shutil.copy(sorted((src / labels.series_dir[1]).iterdir())[0], elsewhere / "second.npz")  # a DICOM file
    if linked == "the file":
        for row, target in ((0, "first.npz"), (1, "second.npz")):
            (src / labels.mask_path[row]).unlink()
            (src / labels.mask_path[row]).symlink_to(elsewhere / target)
    else:
        shutil.rmtree(src / "masks")
        (src / "masks").symlink_to(elsewhere)
        labels["mask_path"] = ["masks/first.npz", "masks/second.npz"]
        labels.to_csv(src / "labels.csv", index=False)
    with caplog.at_level(logging.WARNING, logger="dicomops.ingest"):
        ingest.rekey_labels(src, work, KEY)

    kept = _arrays(work / "deid" / _rekeyed_mask(work, labels, 0))
    assert set(kept) == {"mask", "ipp_z"}
    np.testing.assert_array_equal(kept["mask"], first["mask"])
    assert _rekeyed_mask(work, labels, 1) == ""
    assert "mask_path of rows 2 names a file that is not a readable .npz archive" in caplog.text
    assert scan_for_phi(work, _needles(src)) == []


def test_the_retrains_combined_corpus_keeps_its_linked_masks(gated: tuple[Path, Path], tmp_path: Path) -> None:
    """combine_sources links every mask to its source corpus, outside the combined folder: a gate that
    refused links leaving the folder would retrain the segmenter on no mask at all."""
    from dicomops.monitoring.stage import combine_sources

    src, work, labels = _copy(gated, tmp_path)
    combined = combine_sources([src], tmp_path / "combined")
    assert (combined / _table(combined / "labels.csv").mask_path[1]).is_symlink()
    ingest.rekey_labels(combined, work, KEY)
    for row in (0, 1):
        written, source = _arrays(work / "deid" / _rekeyed_mask(work, labels, row)), _arrays(src / labels.mask_path[row])
        np.testing.assert_array_equal(written["mask"], source["mask"])


def test_arrays_besides_the_mask_stay_behind(gated: tuple[Path, Path], tmp_path: Path) -> None:
    """The gate copied a mask file whole, with an array holding the patient's name."""
    src, work, labels = _copy(gated, tmp_path)
    phi = _table(src / "phi.csv")
    name = phi[(phi.PatientID == labels.PatientID[1]) & (phi.field == "patient_name")].value.item()
    source = _arrays(src / labels.mask_path[1])
    np.savez_compressed(src / labels.mask_path[1], **source, patient_name=np.array([name.encode()]),
                        patient_name_text=np.array([name]), nodules=np.array(['[{"diameter_mm": 8}]']))
    ingest.rekey_labels(src, work, KEY)

    written_path = work / "deid" / _rekeyed_mask(work, labels, 1)
    written = _arrays(written_path)
    assert set(written) == {"mask", "ipp_z"}
    np.testing.assert_array_equal(written["mask"], source["mask"])
    np.testing.assert_array_equal(written["ipp_z"], source["ipp_z"])
    data = written_path.read_bytes()
    assert scan_for_phi(work, _needles(src)) == []
    assert name.encode() not in data and name.encode("utf-32-le") not in data


def test_a_valid_mask_is_written_and_preprocessing_reads_it_the_same(gated: tuple[Path, Path], tmp_path: Path) -> None:
    """Written anew, the same arrays, dtypes and alignment to the slices; the same bytes each time, as
    the preprocessing and segmenter keys hash them."""
    from dicomops.preprocessing.stage import _aligned_mask

    src, work, labels = _copy(gated, tmp_path)
    again_src, again, _ = _copy(gated, tmp_path / "again")
    ingest.rekey_labels(src, work, KEY)
    ingest.rekey_labels(again_src, again, KEY)
    for row in (0, 1):
        source_path, rel = src / labels.mask_path[row], _rekeyed_mask(work, labels, row)
        written_path = work / "deid" / rel
        source, written = _arrays(source_path), _arrays(written_path)
        assert rel == mask_path(MAPPER.uid(labels.SeriesInstanceUID[row]))
        assert {k: (v.dtype, v.shape) for k, v in written.items()} == {k: (v.dtype, v.shape) for k, v in source.items()}
        np.testing.assert_array_equal(written["mask"], source["mask"])
        np.testing.assert_array_equal(written["ipp_z"], source["ipp_z"])
        slices, rows, columns = source["mask"].shape
        z = source["ipp_z"][::-1]  # the volume's order may be another than the acquisition's
        aligned = _aligned_mask(written_path, z, (columns, rows, slices))
        np.testing.assert_array_equal(aligned, _aligned_mask(source_path, z, (columns, rows, slices)))
        assert written_path.read_bytes() == (again / "deid" / rel).read_bytes()
    assert _arrays(src / labels.mask_path[1])["mask"].any()  # the positive series: a mask with nodules


def _bad_mask(kind: str, good: dict[str, np.ndarray], good_bytes: bytes, path: Path) -> None:
    """Write at `path` a mask file that is wrong in the way `kind` says."""
    mask, ipp_z = good["mask"], good["ipp_z"]
    if kind == "truncated":
        path.write_bytes(good_bytes[: len(good_bytes) // 2])
    elif kind == "garbage":
        path.write_bytes(b"PK\x03\x04" + bytes(range(256)) * 4)
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "one array (.npy)":
        with path.open("wb") as fh:
            np.save(fh, mask)
    elif kind == "pickled":
        np.savez(path, mask=np.array([mask], dtype=object), ipp_z=ipp_z)
    elif kind == "without ipp_z":
        np.savez(path, mask=mask)
    elif kind == "float mask":
        np.savez(path, mask=mask.astype(np.float32), ipp_z=ipp_z)
    elif kind == "2-d mask":
        np.savez(path, mask=mask[0], ipp_z=ipp_z[:1])
    elif kind == "ipp_z one short":
        np.savez(path, mask=mask, ipp_z=ipp_z[:-1])
    elif kind == "ipp_z with nan":
        np.savez(path, mask=mask, ipp_z=np.where(np.arange(len(ipp_z)) == 2, np.nan, ipp_z))
    elif kind == "a folder":
        path.mkdir()


BAD_MASKS = {
    "truncated": "a file that is not a readable .npz archive",
    "garbage": "a file that is not a readable .npz archive",
    "empty": "a file that is not a readable .npz archive",
    "pickled": "a file that is not a readable .npz archive",
    "one array (.npy)": "a single array, not a .npz archive of arrays",
    "without ipp_z": "a .npz without the arrays 'mask' and 'ipp_z'",
    "float mask": "a .npz whose 'mask' is not a uint8 array of slices x rows x columns",
    "2-d mask": "a .npz whose 'mask' is not a uint8 array of slices x rows x columns",
    "ipp_z one short": "a .npz whose 'ipp_z' is not one finite z position per slice of 'mask'",
    "ipp_z with nan": "a .npz whose 'ipp_z' is not one finite z position per slice of 'mask'",
    "a folder": "no file",
}


@pytest.mark.parametrize("kind", list(BAD_MASKS))
def test_a_file_that_is_no_mask_leaves_its_series_without_one_and_says_why(
        kind: str, gated: tuple[Path, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """No crash, no mask for that series only, and a warning with its row number and the reason, never
    the path (a site's may name the patient)."""
    src, work, labels = _copy(gated, tmp_path)
    given = f"masks/{labels.PatientID[1]}.npz"
    _bad_mask(kind, _arrays(src / labels.mask_path[1]), (src / labels.mask_path[1]).read_bytes(), src / given)
    # a row repeated word for word before it: the rows are still named as the file numbers them
    pd.concat([labels.iloc[[0, 0]], labels.iloc[[1]].assign(mask_path=given)]).to_csv(src / "labels.csv", index=False)
    with caplog.at_level(logging.WARNING, logger="dicomops.ingest"):
        ingest.rekey_labels(src, work, KEY)

    assert _rekeyed_mask(work, labels, 1) == ""
    assert not (work / "deid" / mask_path(MAPPER.uid(labels.SeriesInstanceUID[1]))).exists()
    assert (work / "deid" / _rekeyed_mask(work, labels, 0)).is_file()
    assert f"the mask_path of rows 3 names {BAD_MASKS[kind]}; those series have no mask" in caplog.text
    assert "leave mask_path empty" in caplog.text
    assert labels.PatientID[1] not in caplog.text
