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
