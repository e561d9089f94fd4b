"""Where a study from the PACS lies while it is handled: ``STAGING/<token>``, the PACS's own files
(PHI), outside the work directory, removed as soon as the study is answered.

Three kinds of handler take studies from the PACS: a pacs-watch pass, a ``predict`` batch over a
query, and the online service's requests, and any two of them may take the same study at once (a
request for a study the watch is answering; two clicks on one study). The folder's name is the
study's token, so without a rule each would clear, fill and remove the other's files mid-gate. The
rule: a handler holds the study (:func:`held_study`) for as long as it uses the folder; the next
one waits, then finds the folder as a new handler does. The hold is an OS file lock
(``STAGING/.<token>.lock``, via ``filelock``) that the kernel releases when its holder dies, so a
crash never leaves a study held; the folder a killed holder left is cleared by the next.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock, Timeout

from dicomops.errors import DicomOpsError

WAIT_S = 900.0  # a study takes seconds to a minute; a holder past this is stuck, not busy


class StudyBusyError(DicomOpsError):
    """Another handler held the study for longer than the wait; nothing of it was touched."""


@contextlib.contextmanager
def held_study(staging: Path, token: str, wait_s: float = WAIT_S) -> Iterator[Path]:
    """``staging/<token>``, empty, held by this handler alone for the block, then removed.

    Raises:
        StudyBusyError: another handler held the study for `wait_s` seconds.
    """
    staging = Path(staging)
    staging.mkdir(parents=True, exist_ok=True)
    lock_path = staging / f".{token}.lock"
    # Released by the thread that answers, not always the one that fetched; never a soft lock (a file
    # that outlives a crashed holder): a file system without flock is an error that says so.
    lock = FileLock(str(lock_path), thread_local=False, fallback_to_soft=False)
    try:
        lock.acquire(timeout=wait_s)
    except Timeout:
        raise StudyBusyError(f"study {token} has been held by another handler (pacs-watch, a predict batch or the "
                             f"online service) for {wait_s:.0f} s; nothing of it was touched: try again later, "
                             f"or look for a stuck process holding .{token}.lock in the staging folder") from None
    except OSError as err:
        raise OSError(f"cannot lock {lock_path} ({type(err).__name__}: {err.strerror}): put the staging folder "
                      "(DICOMOPS_PACS_STAGING) on a local file system that supports flock") from None
    folder = staging / token
    try:
        shutil.rmtree(folder, ignore_errors=True)  # what a killed holder left
        yield folder
    finally:
        try:
            shutil.rmtree(folder, ignore_errors=True)
            lock_path.unlink(missing_ok=True)  # while held: a waiter on the old file sees it gone and opens anew
        finally:
            lock.release()


@dataclass
class Prefetched:
    """A study retrieved ahead into its held folder: where, in how many seconds, and how to let it go."""

    folder: Path
    seconds: float
    release: Callable[[], None]


def retrieve_held(retrieve: Callable[[Path], float], staging: Path, token: str) -> Prefetched:
    """Hold the study and run `retrieve(folder)` (which returns its seconds); the hold lasts until
    :attr:`Prefetched.release`, so a study fetched in one thread is answered in another. A failed
    retrieval releases it and raises."""
    hold = contextlib.ExitStack()
    folder = hold.enter_context(held_study(staging, token))
    try:
        seconds = retrieve(folder)
    except BaseException:
        hold.close()
        raise
    return Prefetched(folder, seconds, hold.close)
