"""One input that kills or hangs its worker costs that input only."""

from __future__ import annotations

import os
import time

from dicomops.dicom.parallel import map_isolated


def _work(x: int) -> int:
    if x == 5:
        os._exit(3)  # a segfault or OOM kill looks like this to the pool
    if x == 13:
        time.sleep(60)
    return x * 2


def test_crash_and_hang_cost_one_item_each() -> None:
    start = time.monotonic()
    results = map_isolated(_work, [(i,) for i in range(30)], on_failure=lambda item, why: why,
                           workers=2, chunk_size=8, seconds_per_item=1.0)
    assert results[5] == "worker_crashed" and results[13] == "timeout"
    assert [r for i, r in enumerate(results) if i not in (5, 13)] == [
        2 * i for i in range(30) if i not in (5, 13)]
    assert time.monotonic() - start < 30


def test_in_process_mode_keeps_order() -> None:
    assert map_isolated(lambda x: x + 1, [(i,) for i in range(5)], on_failure=lambda i, w: w,
                        workers=1) == [1, 2, 3, 4, 5]


def _disk_full_at_three(x: int) -> int:
    import errno

    if x >= 3:
        raise OSError(errno.ENOSPC, "No space left on device")
    if x == 2:
        raise ValueError("an input of its own making")
    return x


def test_a_full_disk_is_raised_in_the_caller_and_stops_the_map() -> None:
    """No input's failure: map_isolated raises it, where an input's own error is its result; it
    stops there, since every input left would meet it too."""
    import errno

    import pytest

    seen: list[int] = []

    def counted(x: int) -> int:
        seen.append(x)
        return _disk_full_at_three(x)

    for workers, func in ((1, counted), (2, _disk_full_at_three)):
        with pytest.raises(OSError) as raised:
            map_isolated(func, [(i,) for i in range(400)], on_failure=lambda item, why: why, workers=workers,
                         chunk_size=8)
        assert raised.value.errno == errno.ENOSPC and "ENOSPC" in str(raised.value)
    assert seen == [0, 1, 2, 3]  # in-process: stopped at the first
    assert map_isolated(_disk_full_at_three, [(i,) for i in range(3)], on_failure=lambda item, why: why,
                        workers=1) == [0, 1, "worker_error:ValueError"]
