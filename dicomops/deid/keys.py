"""Keyed, consistent replacements: pseudonyms, UIDs and date offsets from one secret.

The same key gives the same pseudonym, UID and date offset in every batch, so a patient links
across batches without any mapping table; without the key nothing can be reversed.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import os
import secrets
from collections.abc import Iterable
from pathlib import Path

# Shifted dates land 8 to 10 years before the real ones: far enough that a shifted date can never
# be mistaken for (or collide with) a real study date of the same era.
DATE_SHIFT_MIN_DAYS = 2922
DATE_SHIFT_SPAN_DAYS = 730
MALFORMED_DATE = "malformed"


def patient_id_text(value: object) -> str:
    """One patient's ID as every keyed replacement of it reads it: each value stripped of the spaces
    and NULs DICOM pads LO values with (they are not significant), several values joined with a
    backslash as DICOM writes them. The gate's index, the de-identified file and the labels then
    name, and shift the dates of, one patient alike, however a writer padded the ID or a reader
    returned it (a string, or pydicom's list of values)."""
    if value is None:
        return ""
    if isinstance(value, bytes):  # a value pydicom left undecoded
        value = value.decode("latin-1")
    if isinstance(value, str):
        parts = value.split("\\")
    elif isinstance(value, Iterable):  # pydicom's MultiValue
        parts = [str(v) for v in value]
    else:
        parts = [str(value)]
    return "\\".join(part.strip(" \0") for part in parts)


class KeyedMapper:
    """Deterministic replacements derived from a secret key with HMAC-SHA256."""

    def __init__(self, key: bytes) -> None:
        if len(key) < 16:
            raise ValueError("the de-identification key must be at least 16 bytes; set DICOMOPS_DEID_KEY "
                             "to a long random string (e.g. `python -c 'import secrets; print(secrets.token_hex(32))'`)")
        self._key = key

    def _digest(self, kind: str, value: str) -> bytes:
        return hmac.new(self._key, f"{kind}\x1f{value}".encode(), hashlib.sha256).digest()

    def pseudonym(self, patient_id: str) -> str:
        """A stable patient pseudonym such as ``PX-3K7QZ2M9XA4D`` (of :func:`patient_id_text`)."""
        code = base64.b32encode(self._digest("patient", patient_id_text(patient_id))).decode()[:12]
        return f"PX-{code}"

    def uid(self, uid: str) -> str:
        """A stable replacement UID under the 2.25 root (a UUID written as an integer)."""
        return f"2.25.{int.from_bytes(self._digest('uid', uid)[:16], 'big')}"

    def token(self, kind: str, value: str) -> str:
        """A short stable name for an identifier (``ST-`` + 16 base32 characters for a study): how
        the work directory, logs and events name a clinical study without its UID."""
        return f"{kind[:2].upper()}-" + base64.b32encode(self._digest(kind, value)).decode()[:16]

    def code(self, kind: str, value: str) -> str:
        """A stable 16-character name (the most an SH value holds) for a site's own code or coding
        scheme: the same code maps alike in every batch, and nothing of the site's text shows."""
        return base64.b32encode(self._digest(kind, value)).decode()[:16]

    def date_offset_days(self, patient_id: str) -> int:
        """Days to subtract from every date of this patient (the same in every batch)."""
        n = int.from_bytes(self._digest("date", patient_id_text(patient_id))[:4], "big")
        return DATE_SHIFT_MIN_DAYS + n % DATE_SHIFT_SPAN_DAYS

    def shift_date(self, value: str, patient_id: str) -> str:
        """Shift a DA (``YYYYMMDD``) value; anything else becomes ``malformed``."""
        text = str(value).strip()
        try:
            date = dt.datetime.strptime(text[:8], "%Y%m%d").date()
        except ValueError:
            return MALFORMED_DATE
        if len(text) != 8:
            return MALFORMED_DATE
        try:
            return (date - dt.timedelta(days=self.date_offset_days(patient_id))).strftime("%Y%m%d")
        except OverflowError:  # a year within a decade of 0001 cannot be shifted back
            return MALFORMED_DATE

    def shift_datetime(self, value: str, patient_id: str) -> str:
        """Shift the date part of a DT value and keep its time part."""
        text = str(value).strip()
        shifted = self.shift_date(text[:8], patient_id)
        return MALFORMED_DATE if shifted == MALFORMED_DATE else shifted + text[8:]


def default_key_path() -> Path:
    base = Path(os.environ.get("XDG_CONFIG_HOME", Path.home() / ".config"))
    return base / "dicomops" / "deid.key"


def load_or_create_key(secret: str | None, path: Path | None = None) -> bytes:
    """The configured key, or this machine's key (created once, mode 0600, outside any work dir).

    A site sets ``DICOMOPS_DEID_KEY``; the embedded default keeps one key per machine so that
    batches ingested on it link to each other.
    """
    if secret:
        return secret.encode()
    path = path or default_key_path()
    if not path.exists():
        _create_key_file(path)
    key = path.read_text().strip()
    if not key:  # an empty key makes every pseudonym computable from the UIDs: never use one
        raise ValueError(f"the de-identification key file {path} is empty; restore it from its backup (or, before "
                         f"anything was ingested with it, delete it to have a new one made), or set DICOMOPS_DEID_KEY")
    return key.encode()


def _create_key_file(path: Path) -> None:
    """A new key at `path`, whole or not at all: written to a private file beside it, then linked into
    place, so that processes starting at once (the online service's replicas) all read the one
    key that won, never a file still being written (one once ran with an empty key)."""
    import tempfile

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, scratch = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)  # mode 0600
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_hex(32) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        try:
            os.link(scratch, path)
        except FileExistsError:  # another process made it first: theirs is the key
            pass
        except OSError as err:  # a file system without hard links (SMB, some FUSE and container volumes)
            raise OSError(err.errno, f"the de-identification key could not be made in {path.parent} ({err.strerror}: "
                                     "its file system has no hard links); set DICOMOPS_DEID_KEY, or XDG_CONFIG_HOME "
                                     "to a folder on a local disk") from err
    finally:
        os.unlink(scratch)


def key_from_settings() -> bytes:
    """The de-identification key for this process: DICOMOPS_DEID_KEY, else the machine's key."""
    from dicomops.config import load_settings

    secret = load_settings().deid_key
    return load_or_create_key(secret.get_secret_value() if secret else None)
