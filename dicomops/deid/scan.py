"""Search a folder for PHI values: the check that nothing leaked past the ingest gate.

Each file is read the way its format stores text (DICOM element values including private tags and
nested sequences, Parquet cells, SQLite rows, members of zip archives, plain bytes for everything
else), so a value hidden by compression or encoding is still found.
"""

from __future__ import annotations

import functools
import hashlib
import io
import re
import sqlite3
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pydicom

MIN_NEEDLE = 4


@dataclass(frozen=True)
class Hit:
    path: str
    needle: str
    where: str  # the element, column or table holding it


def _dicom_texts(data: bytes) -> list[tuple[str, str]]:
    """Header bytes (up to the pixel data) plus every element value, nested and private included."""
    fh = io.BytesIO(data)
    try:
        ds = pydicom.dcmread(fh, stop_before_pixels=True, force=False)
    except Exception:
        return [("bytes", data.decode("latin-1"))]
    texts = [("header-bytes", data[: fh.tell()].decode("latin-1"))]
    meta = getattr(ds, "file_meta", None)
    for container in ([meta] if meta is not None else []) + [ds]:
        for elem in container.iterall():
            if elem.VR in ("SQ", "OW", "OF", "OD", "OL"):
                continue
            value = elem.value
            if isinstance(value, bytes):
                texts.append((str(elem.tag), value[:65536].decode("latin-1")))
            else:
                texts.append((str(elem.tag), str(value)))
    return texts


def _parquet_texts(path: Path) -> list[tuple[str, str]]:
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    texts = [("schema", str(table.schema))]
    for name in table.column_names:
        texts.append((name, "\n".join(map(str, table.column(name).to_pylist()))))
    return texts


def _sqlite_texts(path: Path) -> list[tuple[str, str]]:
    texts: list[tuple[str, str]] = []
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        tables = [r[0] for r in con.execute("select name from sqlite_master where type='table'")]
        for table in tables:
            rows = con.execute(f'select * from "{table}"').fetchall()
            texts.append((table, "\n".join(" ".join(map(str, r)) for r in rows)))
    finally:
        con.close()
    return texts


def _texts(path: Path) -> list[tuple[str, str]]:
    data = path.read_bytes()
    if data[128:132] == b"DICM":
        return _dicom_texts(data)  # pixel data is not text; the header is scanned twice over
    texts = [("bytes", data.decode("latin-1"))]
    try:
        if path.suffix.lower() == ".parquet" or data[:4] == b"PAR1":
            texts += _parquet_texts(path)
        elif data[:16] == b"SQLite format 3\x00":
            texts += _sqlite_texts(path)
        elif zipfile.is_zipfile(io.BytesIO(data)):
            with zipfile.ZipFile(io.BytesIO(data)) as zf:
                for name in zf.namelist():
                    texts.append((name, zf.read(name).decode("latin-1")))
    except Exception as err:
        texts.append(("parse-error", type(err).__name__))
    return texts


_TOKEN = re.compile(r"[a-z0-9]+")
# A UUID is one token wherever it stands: the servers past the gate (Prefect's run and event ids)
# write thousands, one in 65,536 has a middle group such as ``0010`` (a patient ID some real files
# carry; CI of aad1f4e), and in a SQLite file's bytes one often follows a record's header byte or
# the column before it with no separator between them.
_UUID = re.compile(r"[0-9a-f]{8}(?:-[0-9a-f]{4}){3}-[0-9a-f]{12}")


def _tokens(text: str) -> list[str]:
    """`text`'s alphanumeric tokens, lower case, each UUID one token."""
    lowered = text.lower()
    if "-" not in lowered:
        return _TOKEN.findall(lowered)
    tokens: list[str] = []
    start = 0
    for match in _UUID.finditer(lowered):
        tokens += _TOKEN.findall(lowered, start, match.start())
        tokens.append(match.group())
        start = match.end()
    return tokens + _TOKEN.findall(lowered, start)


class _Matcher:
    """Finds needles as runs of whole alphanumeric tokens, in one pass over a text's tokens.

    Token matching ignores separators (``DOE^JANE`` matches ``Doe Jane``) and never matches inside a
    longer token, so a date such as ``20230915`` is not reported inside a numeric UID, nor a short
    number inside a UUID.
    """

    def __init__(self, needles: list[str] | set[str]) -> None:
        self.by_first: dict[str, list[tuple[tuple[str, ...], str]]] = {}
        for needle in needles:
            tokens = tuple(_tokens(needle))
            if not tokens or sum(map(len, tokens)) < MIN_NEEDLE:
                continue
            self.by_first.setdefault(tokens[0], []).append((tokens, needle))

    def find(self, text: str) -> set[str]:
        tokens = _tokens(text)
        found: set[str] = set()
        for i, token in enumerate(tokens):
            for seq, needle in self.by_first.get(token, ()):
                if len(seq) == 1 or tuple(tokens[i : i + len(seq)]) == seq:
                    found.add(needle)
        return found


@functools.cache
def _shipped() -> frozenset[tuple[int, str]]:
    """(size, sha256) of the third-party files the package ships and copies into reports (the Data
    Docs' scripts, stylesheets and fonts): a byte-identical copy was not derived from any data."""
    from dicomops.validation.docs import ASSETS_DIR

    return frozenset((p.stat().st_size, hashlib.sha256(p.read_bytes()).hexdigest())
                     for p in ASSETS_DIR.rglob("*") if p.is_file())


def _is_shipped(path: Path) -> bool:
    size = path.stat().st_size
    if not any(size == known for known, _ in _shipped()):
        return False
    return (size, hashlib.sha256(path.read_bytes()).hexdigest()) in _shipped()


def scan_for_phi(root: Path, needles: list[str] | set[str]) -> list[Hit]:
    """Every file under `root` (or `root` itself, a file) holding any needle, matched
    case-insensitively on whole tokens.

    Needles with fewer than four alphanumeric characters are ignored: they would match by chance.
    Files byte-identical to one the package ships (Font Awesome's stylesheet names an icon
    "university") are skipped; any change to such a copy makes it scanned again.
    """
    matcher = _Matcher(needles)
    hits: list[Hit] = []
    root = Path(root)
    if not root.exists() or not matcher.by_first:
        return hits
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    for path in (p for p in files if not _is_shipped(p)):
        for where, text in _texts(path):
            for needle in sorted(matcher.find(text)):
                hits.append(Hit(str(path), needle, where))
    return hits
