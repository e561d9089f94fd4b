"""A study staged from the PACS is held by one handler at a time (pacs-watch, a batch, the online
service): a second waits and never clears, fills or removes the first's files; a killed holder
releases it at once and its files are cleared by the next; nothing is left behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from dicomops.pacs.staging import StudyBusyError, held_study, retrieve_held

TOKEN = "ST-0123456789abcdef"


def _holder(staging: Path, seconds: float) -> subprocess.Popen[bytes]:
    """Another process that holds the study, stages a file and says so on stdout, then sleeps."""
    code = textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from dicomops.pacs.staging import held_study
        with held_study(Path({str(staging)!r}), {TOKEN!r}) as folder:
            folder.mkdir()
            (folder / "00000.dcm").write_bytes(b"theirs")
            print("held", flush=True)
            time.sleep({seconds})
    """)
    process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, start_new_session=True)
    assert process.stdout is not None and process.stdout.readline().strip() == b"held"
    return process


def test_a_second_handler_waits_for_the_first_and_never_touches_its_files(tmp_path: Path) -> None:
    holder = _holder(tmp_path, seconds=1.5)
    theirs = tmp_path / TOKEN / "00000.dcm"
    t0 = time.monotonic()
    with held_study(tmp_path, TOKEN) as folder:
        waited = time.monotonic() - t0
        assert holder.wait(5) == 0  # it finished its hold with its file in place: this one waited
        assert not folder.exists()  # and found the folder as a new handler does
    assert waited > 0.5, waited
    assert not theirs.exists() and list(tmp_path.iterdir()) == [], list(tmp_path.iterdir())


def test_a_killed_holder_releases_the_study_and_its_files_are_cleared_by_the_next(tmp_path: Path) -> None:
    holder = _holder(tmp_path, seconds=60)
    os.killpg(holder.pid, signal.SIGKILL)
    holder.wait(5)
    assert (tmp_path / TOKEN / "00000.dcm").exists()  # PHI a crash left
    t0 = time.monotonic()
    with held_study(tmp_path, TOKEN, wait_s=5) as folder:
        assert time.monotonic() - t0 < 2 and not folder.exists()
    assert list(tmp_path.iterdir()) == []


def test_a_study_held_past_the_wait_is_busy_and_left_as_it_is(tmp_path: Path) -> None:
    holder = _holder(tmp_path, seconds=60)
    try:
        with pytest.raises(StudyBusyError, match=f"study {TOKEN} has been held by another handler"), \
                held_study(tmp_path, TOKEN, wait_s=0.3):
            pytest.fail("entered a study another process holds")
        assert (tmp_path / TOKEN / "00000.dcm").read_bytes() == b"theirs"
    finally:
        os.killpg(holder.pid, signal.SIGKILL)
        holder.wait(5)


def test_threads_of_one_process_wait_for_each_other_too(tmp_path: Path) -> None:
    """The online service answers requests in a thread pool: two requests for one study."""
    inside, overlaps = [0], []

    def handle() -> None:
        with held_study(tmp_path, TOKEN) as folder:
            inside[0] += 1
            overlaps.append(inside[0])
            folder.mkdir()
            time.sleep(0.2)
            inside[0] -= 1

    threads = [threading.Thread(target=handle) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert overlaps == [1, 1, 1] and list(tmp_path.iterdir()) == []


def test_a_study_fetched_ahead_stays_held_until_released_and_a_failed_fetch_lets_go(tmp_path: Path) -> None:
    def retrieve(folder: Path) -> float:
        folder.mkdir()
        (folder / "00000.dcm").write_bytes(b"ours")
        return 0.25

    with ThreadPoolExecutor(1) as pool:  # fetched in a worker thread that lives on, as a batch's prefetch
        pool.submit(time.sleep, 0).result()
        open_fds = len(os.listdir("/proc/self/fd"))
        fetched = pool.submit(retrieve_held, retrieve, tmp_path, TOKEN).result()
        assert fetched.seconds == 0.25 and (fetched.folder / "00000.dcm").exists()
        with pytest.raises(StudyBusyError), held_study(tmp_path, TOKEN, wait_s=0.2):
            pass
        fetched.release()  # in this thread: the lock is let go here, its file closed
        assert len(os.listdir("/proc/self/fd")) == open_fds
    fetched.release()  # the batch may let go of a study twice (answered, then its finally)
    assert list(tmp_path.iterdir()) == []

    def cut(folder: Path) -> float:
        folder.mkdir()
        raise ConnectionError("the PACS went away")

    with pytest.raises(ConnectionError):
        retrieve_held(cut, tmp_path, TOKEN)
    with held_study(tmp_path, TOKEN, wait_s=0.2):
        pass
    assert list(tmp_path.iterdir()) == []
