"""Atomic writes: every output appears whole or not at all (temp file in the same folder, rename)."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd


def _atomic(path: Path, write: Callable[[Path], object]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_bytes(path: Path, data: bytes) -> Path:
    return _atomic(path, lambda p: p.write_bytes(data))


def write_text(path: Path, text: str) -> Path:
    return _atomic(path, lambda p: p.write_text(text))


def write_json(path: Path, obj: Any) -> Path:
    return write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def write_parquet(path: Path, frame: pd.DataFrame) -> Path:
    return _atomic(path, lambda p: frame.to_parquet(p, index=False))


def write_csv(path: Path, frame: pd.DataFrame) -> Path:
    return _atomic(path, lambda p: frame.to_csv(p, index=False, lineterminator="\n"))


# Columns that name things (files, patients, DICOM objects): text, never numbers. Parsed, a PatientID
# 0001001 becomes 1001, a file 000011 becomes 11, a UID 1.20 becomes 1.2, and a file named NA a
# missing value; each then matches nothing.
NAME_COLUMNS = ("PatientID", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "source_path", "mask_path",
                "series_dir", "case", "mask")


def read_table(path: Path, **kwargs: Any) -> pd.DataFrame:
    """A CSV table as written: empty cells stay empty strings, and :data:`NAME_COLUMNS` stay text."""
    return pd.read_csv(path, keep_default_na=False, dtype=dict.fromkeys(NAME_COLUMNS, str), **kwargs)


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def write_npz(path: Path, compresslevel: int = 1, stored: tuple[str, ...] = (), **arrays: Any) -> Path:
    """Write arrays as a ``.npz`` readable by ``np.load``, atomically, with fixed zip timestamps.

    Level 1 deflate is several times faster than ``np.savez_compressed`` for a few percent more
    bytes; fixed timestamps make the bytes reproducible. The arrays named in `stored` are written
    without compression, for those read far more often than written (``np.load`` then copies
    instead of inflating them).
    """
    import zipfile

    import numpy as np

    def write(tmp: Path) -> None:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=compresslevel) as zf:
            for name, array in arrays.items():
                info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
                if name in stored:
                    info.compress_type = zipfile.ZIP_STORED
                else:
                    info.compress_type = zipfile.ZIP_DEFLATED
                    info._compresslevel = compresslevel  # type: ignore[attr-defined]
                with zf.open(info, "w", force_zip64=array.nbytes > 2**31) as fh:
                    np.lib.format.write_array(fh, np.ascontiguousarray(array), allow_pickle=False)

    return _atomic(path, write)
