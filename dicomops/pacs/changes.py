"""Orthanc's changes feed: which studies have become stable (no new instance for StableAge seconds),
and a cursor that remembers how far the feed has been handled.

DICOMweb has no verb for "what is new", so this reads Orthanc's own REST API: ``GET /changes``
lists numbered changes (a new instance, a stable series, a stable study, ...) in order, and
``GET /studies/{id}`` gives a study's StudyInstanceUID. A caller handles each stable study, then
advances its :class:`Cursor`, so a crash between the two repeats a study rather than losing it::

    page = feed.poll(cursor.value)
    for study in page.studies:
        handle(study.study_uid)       # retrieve, gate, answer...
        cursor.advance(study.seq)
    cursor.advance(page.last)         # past the changes that were not stable studies

The cursor file holds the sequence number alone: no UID, no Orthanc identifier.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dicomops.pacs.client import (
    CONNECT_TIMEOUT_S,
    PacsCredentials,
    PacsError,
    basic_auth_session,
    server_address,
    translate_errors,
)

log = logging.getLogger(__name__)

STABLE_STUDY = "StableStudy"
DEFAULT_LIMIT = 100


@dataclass(frozen=True)
class StableStudy:
    """A study Orthanc reports as stable: change number `seq`; its identifiers stay out of ``repr``
    (the Orthanc id is a hash of the PatientID and StudyInstanceUID)."""

    seq: int
    orthanc_id: str = field(repr=False)
    study_uid: str = field(repr=False)


@dataclass(frozen=True)
class ChangesPage:
    """One read of the feed: the stable studies among changes ``since+1 .. last``, and whether the
    feed had no more changes after `last` at the time of the read."""

    studies: tuple[StableStudy, ...]
    last: int
    done: bool

    def __iter__(self) -> Iterator[StableStudy]:
        return iter(self.studies)


class ChangesFeed:
    """Reads Orthanc's changes feed over its REST API.

    Args:
        orthanc_url: Orthanc's root, e.g. ``http://127.0.0.1:8042`` (not the DICOMweb root).
        credentials: HTTP basic auth, as for :class:`dicomops.pacs.client.PacsClient`.
        timeout_s: The longest silence accepted within one request.
    """

    def __init__(self, orthanc_url: str, credentials: PacsCredentials, *, timeout_s: float = 30.0) -> None:
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive (got {timeout_s})")
        self.url = orthanc_url.rstrip("/")
        self.server = server_address(self.url)
        self._session = basic_auth_session(credentials, self.url)
        self._timeout = (CONNECT_TIMEOUT_S, timeout_s)

    def close(self) -> None:
        self._session.close()

    def __enter__(self) -> ChangesFeed:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _get(self, path: str, what: str, **params: Any) -> Any:
        with translate_errors(what, self.server):
            response = self._session.get(self.url + path, params=params, timeout=self._timeout)
            response.raise_for_status()
            return response.json()

    def poll(self, since: int, limit: int = DEFAULT_LIMIT) -> ChangesPage:
        """The stable studies among the (at most `limit`) changes after `since`.

        A study deleted from Orthanc between its change and this read is left out, with a warning
        naming the change number only.

        Raises:
            ValueError: a negative `since`, or `limit` outside 1-4096.
            PacsError: Orthanc did not answer, refused the credentials, or answered nonsense.
        """
        if since < 0:
            raise ValueError(f"since must be a change number, 0 or more (got {since})")
        if not 1 <= limit <= 4096:
            raise ValueError(f"limit must be 1-4096 (got {limit})")
        answer = self._get("/changes", "reading the changes feed", since=since, limit=limit)
        try:
            changes = list(answer["Changes"])
            last, done = int(answer["Last"]), bool(answer["Done"])
        except (KeyError, TypeError, ValueError) as err:
            raise PacsError(f"reading the changes feed: {self.server} did not answer as Orthanc does "
                            f"({type(err).__name__})") from None
        studies = []
        for change in changes:
            if change.get("ChangeType") != STABLE_STUDY:
                continue
            seq, orthanc_id = int(change["Seq"]), str(change["ID"])
            uid = self._study_uid(orthanc_id, seq)
            if uid is not None:
                studies.append(StableStudy(seq, orthanc_id, uid))
        # An empty page reports Last as the newest change overall, which may lie behind `since` after
        # Orthanc's database was replaced; never send the caller backwards.
        return ChangesPage(tuple(studies), max(last, since), done)

    def last(self) -> int:
        """The newest change number Orthanc holds (``/changes?last``): a cursor set there leaves every
        study already in the PACS behind."""
        answer = self._get("/changes", "reading the changes feed", last="")
        try:
            return int(answer["Last"])
        except (KeyError, TypeError, ValueError) as err:
            raise PacsError(f"reading the changes feed: {self.server} did not answer as Orthanc does "
                            f"({type(err).__name__})") from None

    def stable_studies(self, since: int, limit: int = DEFAULT_LIMIT) -> Iterator[StableStudy]:
        """Every stable study after `since`, page after page until the feed is drained. Advance the
        cursor to each one's ``seq`` once it is handled; :meth:`poll` also says how far the pages went."""
        while True:
            page = self.poll(since, limit)
            yield from page.studies
            if page.done or page.last <= since:
                return
            since = page.last

    def _study_uid(self, orthanc_id: str, seq: int) -> str | None:
        import requests

        try:
            with translate_errors("reading a stable study", self.server):
                response = self._session.get(f"{self.url}/studies/{orthanc_id}", timeout=self._timeout)
                if response.status_code == requests.codes.not_found:
                    log.warning("change %d: the stable study is no longer in the PACS; skipped", seq)
                    return None
                response.raise_for_status()
                return str(response.json()["MainDicomTags"]["StudyInstanceUID"])
        except (KeyError, TypeError, ValueError):
            raise PacsError(f"reading a stable study (change {seq}): {self.server} sent no StudyInstanceUID") from None


class Cursor:
    """How far the changes feed has been handled: one sequence number in a small JSON file.

    The file is replaced atomically (temp file, fsync, rename), so a crash leaves the old value or
    the new one, never a torn file. It holds ``{"since": N}`` and nothing else.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._value = self._read()

    def _read(self) -> int:
        if not self.path.exists():
            return 0
        try:
            data = json.loads(self.path.read_text())
            if not isinstance(data, dict) or set(data) != {"since"} or type(data["since"]) is not int \
                    or data["since"] < 0:
                raise ValueError('expected {"since": <change number, 0 or more>}')
        except ValueError as err:
            raise ValueError(f"the changes cursor {self.path} is damaged ({err}); fix it or delete it to read "
                             "the feed from the start again (studies already handled are recognised "
                             "as duplicates)") from err
        return int(data["since"])

    @property
    def value(self) -> int:
        """The last change number handled; the feed is read from the next one."""
        return self._value

    def follow(self, feed: ChangesFeed) -> int:
        """The cursor's value for `feed`: as it is, unless the feed's newest change lies behind it.
        Then the feed is not the one the cursor was kept for (Orthanc's index was replaced, as by
        ``dicomops pacs start --index-url``, or restored from a backup, or ``DICOMOPS_PACS_URL``
        names another PACS), whose change numbers start again at 1: kept, the cursor would leave
        every study below it unread, silently. It is set back to 0, with a warning; the studies
        already handled are recognised as duplicates by their tokens.

        Raises:
            PacsError: the feed did not answer.
        """
        newest = feed.last()
        if newest < self._value:
            log.warning("the PACS's changes feed ends at change %d, behind this cursor's %d (%s): its index was "
                        "replaced or restored, or this is another PACS; reading its feed from the start (studies "
                        "already handled are recognised as duplicates)", newest, self._value, self.path)
            self._write(0)
        return self._value

    def advance(self, seq: int) -> None:
        """Record that every change up to `seq` is handled. Call it only after the handling is safe.

        Raises:
            ValueError: `seq` lies behind the cursor (it never moves back, but by :meth:`follow`).
        """
        if type(seq) is not int:
            raise TypeError(f"seq must be an int (got {type(seq).__name__})")
        if seq < self._value:
            raise ValueError(f"the changes cursor never moves back (at {self._value}, asked for {seq})")
        if seq == self._value and self.path.exists():
            return
        self._write(seq)

    def _write(self, seq: int) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w") as handle:
                json.dump({"since": seq}, handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        dir_fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        self._value = seq
