"""Counts over a raw input folder that carry no PHI: files and bytes, nothing read from headers."""

from __future__ import annotations

import os
from pathlib import Path


def count_files(root: Path) -> dict[str, float]:
    """Regular files and total bytes under `root` (symlinks to files followed, nothing opened)."""
    files = 0
    size = 0
    for dirpath, _dirs, names in os.walk(root, followlinks=False):
        for name in names:
            path = Path(dirpath) / name
            try:
                st = path.stat()
            except OSError:
                continue
            if path.is_file():
                files += 1
                size += st.st_size
    return {"input_files": float(files), "input_megabytes": round(size / 1e6, 3)}
