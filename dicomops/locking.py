"""One writer at a time per work directory.

A stage that writes ``WORK`` holds ``WORK/.lock`` (an OS file lock through ``filelock``, released
by the kernel when the holder dies, so a crash leaves no stale lock). The holder's description
(process, host, flow, start time) sits in ``WORK/.lock.holder`` so that a second writer can say who
is in the way. The lock is re-entrant within a process: the pipeline flow holds it and the stage
flows it calls take it again without waiting on themselves.
"""

from __future__ import annotations

import datetime as dt
import os
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

from dicomops.errors import WorkDirLockedError
from dicomops.layout import WorkLayout

_guard = threading.Lock()
_held: dict[Path, tuple[FileLock, int]] = {}


def _holder_file(lock: Path) -> Path:
    return lock.with_name(lock.name + ".holder")


def describe_holder(work: Path) -> str:
    """Who holds the work directory's lock, as its holder recorded it ('' when nobody wrote it)."""
    path = _holder_file(WorkLayout(work).lock)
    return path.read_text().strip() if path.exists() else ""


@contextmanager
def hold(work: Path, holder: str, timeout: float = 10.0) -> Iterator[None]:
    """Hold the lock of `work` for the block; wait up to `timeout` seconds for another holder, then
    raise :class:`WorkDirLockedError` naming it."""
    layout = WorkLayout(work)
    layout.root.mkdir(parents=True, exist_ok=True)
    key = layout.lock.resolve()
    with _guard:
        entry = _held.get(key)
        if entry is not None:
            _held[key] = (entry[0], entry[1] + 1)
    if entry is None:
        lock = FileLock(str(key), timeout=timeout, thread_local=False)
        try:
            lock.acquire()
        except Timeout as err:
            who = describe_holder(work) or "another process (no description recorded)"
            raise WorkDirLockedError(
                f"{layout.root} is being written by {who}; waited {timeout:g} s. Wait for it to finish, "
                f"use another --work, or raise DICOMOPS_WORK_LOCK_TIMEOUT_S to wait longer") from err
        _holder_file(key).write_text(f"{holder} (pid {os.getpid()} on {socket.gethostname()}, since "
                                     f"{dt.datetime.now(dt.UTC).isoformat(timespec='seconds')})\n")
        with _guard:
            _held[key] = (lock, 1)
    try:
        yield
    finally:
        with _guard:
            lock, count = _held[key]
            if count > 1:
                _held[key] = (lock, count - 1)
            else:
                del _held[key]
                _holder_file(key).unlink(missing_ok=True)
                lock.release()
