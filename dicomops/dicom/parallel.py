"""Map a function over many inputs in worker processes, so that one input can only cost itself.

A worker that crashes (segfault, out-of-memory kill) or hangs takes down its chunk, never the
batch: the chunk is retried item by item in a fresh pool, and the item that kills or stalls a
worker on its own gets a failure result instead.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from multiprocessing import get_context
from typing import Any, TypeVar

T = TypeVar("T")
R = TypeVar("R")
WORKER_START_S = 120.0  # the longest a restarted pool's first worker may take to start


class _ItemError:
    """An exception raised by the mapped function for one item (the rest of the chunk goes on).
    One that says the machine ran out of something (:func:`dicomops.errors.local_outage`: a full
    disk) is no item's failure: it is raised again in the caller, once the pool is done."""

    def __init__(self, err: BaseException) -> None:
        from dicomops.errors import local_outage, local_outage_errno

        self.reason = f"worker_error:{type(err).__name__}"
        self.outage = local_outage(err)
        self.errno = local_outage_errno(err)


def _call(func: Callable[..., R], item: tuple[Any, ...], args: tuple[Any, ...]) -> R | _ItemError:
    try:
        return func(*item, *args)
    except Exception as err:
        return _ItemError(err)


def _run_chunk(func: Callable[..., R], chunk: Sequence[Any], args: tuple[Any, ...]) -> list[R | _ItemError]:
    return [_call(func, item, args) for item in chunk]


def _kill(pool: ProcessPoolExecutor) -> None:
    for proc in list(getattr(pool, "_processes", {}).values()):
        proc.kill()
    pool.shutdown(wait=False, cancel_futures=True)


def map_isolated(
    func: Callable[..., R],
    items: Sequence[tuple[Any, ...]],
    *,
    args: tuple[Any, ...] = (),
    on_failure: Callable[[tuple[Any, ...], str], R],
    workers: int = 2,
    chunk_size: int = 64,
    seconds_per_item: float = 30.0,
    progress: Callable[[int, int], None] | None = None,
    initializer: Callable[[], None] | None = None,
    dask_address: str | None = None,
) -> list[R]:
    """``[func(*item, *args) for item in items]``, in parallel and isolated; results keep item order.

    Args:
        func: a top-level function (it is pickled to the workers) that returns a small result.
        items: argument tuples, one per call.
        args: extra arguments appended to every call.
        on_failure: builds the result for an item whose worker crashed (``"worker_crashed"``), ran
            past its time (``"timeout"``) or raised (``"worker_error:<ExceptionType>"``).
        workers: processes; 1 runs in this process (no crash isolation, for tests and debugging).
        chunk_size: items per task; small results per item keep pickling cheap.
        seconds_per_item: a chunk may take ``len(chunk) * seconds_per_item`` seconds.
        progress: called with (items done, items total).
        initializer: run once in each worker process (e.g. to pin library thread counts).
        dask_address: run the chunks on this Dask scheduler instead of local processes; a chunk
            whose worker dies is retried item by item, and an item that kills a worker on its own,
            or outlasts its allowance, gets a failure result, as with local processes.

    Raises:
        OSError: `func` met the machine running out of something (a full disk, no file handles:
            :func:`dicomops.errors.local_outage`) for some item: that is no input's failure.
    """
    total = len(items)
    results: list[Any] = [None] * total
    if dask_address:
        return _map_dask(func, items, args, on_failure, dask_address, chunk_size, seconds_per_item, progress,
                         initializer)
    if workers <= 1:
        for i, item in enumerate(items):
            results[i] = _call(func, item, args)
            if _outage(results[i]):  # every item left would meet it too
                break
            if progress and (i % 64 == 63 or i == total - 1):
                progress(i + 1, total)
        return _resolve(results, items, on_failure)

    queue: list[list[int]] = [list(range(i, min(i + chunk_size, total))) for i in range(0, total, chunk_size)]
    suspects: list[int] = []  # items of a chunk that broke the pool: retried one at a time
    ctx = get_context("spawn")
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=initializer)
    running: dict[Future[list[Any]], tuple[list[int], float, bool]] = {}

    # Two chunks per worker in flight keep workers busy while the main process unpickles results;
    # a queued chunk's allowance therefore covers the chunk ahead of it too.
    in_flight = 2 * workers

    def submit(idx: list[int], suspect: bool) -> None:
        fut = pool.submit(_run_chunk, func, [items[i] for i in idx], args)
        allowance = seconds_per_item * len(idx) * (1 if suspect else 2)
        running[fut] = (idx, time.monotonic() + allowance, suspect)

    try:
        while queue or suspects or running:
            if suspects:
                if not running:
                    submit([suspects.pop(0)], True)
            else:
                while queue and len(running) < in_flight:
                    submit(queue.pop(0), False)
            deadline = min(d for _, d, _ in running.values())
            finished, _ = wait(running, timeout=max(deadline - time.monotonic(), 0.01),
                               return_when=FIRST_COMPLETED)
            broken = stop = False
            for fut in finished:
                idx, _, suspect = running.pop(fut)
                try:
                    for i, r in zip(idx, fut.result(), strict=True):
                        results[i] = r
                        stop = stop or _outage(r)
                except BrokenProcessPool:
                    broken = True
                    if suspect:
                        results[idx[0]] = on_failure(items[idx[0]], "worker_crashed")
                    else:
                        suspects.extend(idx)
            if stop:  # the machine ran out of something: the chunks left would meet it too (finally kills them)
                break
            now = time.monotonic()
            overdue = {f for f, (_, d, _) in running.items() if d <= now}
            if broken or overdue:
                for fut, (idx, _, _suspect) in running.items():
                    if fut in overdue and len(idx) == 1:
                        results[idx[0]] = on_failure(items[idx[0]], "timeout")
                    elif fut in overdue or broken:
                        suspects.extend(idx)
                    else:
                        queue.insert(0, idx)
                running.clear()
                _kill(pool)
                pool = _started(ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=initializer))
            if progress:
                progress(sum(r is not None for r in results), total)
    finally:
        _kill(pool) if running else pool.shutdown(wait=True)
    return _resolve(results, items, on_failure)


def _started(pool: ProcessPoolExecutor) -> ProcessPoolExecutor:
    """`pool` once a worker has started (a fresh interpreter importing the mapped function's module:
    a third of a second idle, seconds on a busy machine), so that the next item's allowance, counted
    from its submission, is the item's own: on a pool restarted after a crash or a hang, a healthy
    item was otherwise recorded as a timeout when the machine was busy."""
    with contextlib.suppress(Exception):  # a pool that cannot start shows on the item submitted next
        pool.submit(int).result(timeout=WORKER_START_S)
    return pool


def _outage(result: Any) -> bool:
    return isinstance(result, _ItemError) and bool(result.outage)


def _resolve(results: list[Any], items: Sequence[tuple[Any, ...]],
             on_failure: Callable[[tuple[Any, ...], str], R]) -> list[R]:
    for r in results:
        if _outage(r):
            raise OSError(r.errno, f"a worker ran out of resources ({r.outage}); nothing was recorded "
                                            "against the inputs: free them, then run again")
    return [on_failure(item, r.reason) if isinstance(r, _ItemError) else r
            for item, r in zip(items, results, strict=True)]


def _map_dask(func: Callable[..., R], items: Sequence[tuple[Any, ...]], args: tuple[Any, ...],
              on_failure: Callable[[tuple[Any, ...], str], R], address: str, chunk_size: int,
              seconds_per_item: float, progress: Callable[[int, int], None] | None,
              initializer: Callable[[], None] | None) -> list[R]:
    """`map_isolated` on a Dask cluster (``distributed``), with the same failure semantics."""
    from distributed import Client, as_completed, get_worker, worker_client

    total = len(items)
    results: list[Any] = [None] * total
    try:  # already on a Dask worker (a Prefect task on the DaskTaskRunner): fan out from here
        get_worker()
        connection: Any = worker_client()
    except ValueError:
        connection = Client(address)
    with connection as client:
        if initializer is not None:
            client.run(initializer)

        def submit(idx: list[int]) -> Any:
            return client.submit(_run_chunk, func, [items[i] for i in idx], args, pure=False,
                                 retries=0, key=f"dicomops-chunk-{idx[0]}-{len(idx)}-{time.monotonic_ns()}")

        chunks = [list(range(i, min(i + chunk_size, total))) for i in range(0, total, chunk_size)]
        stop = False
        for attempt in ("chunk", "item"):
            futures = {submit(idx): idx for idx in chunks}
            retry: list[list[int]] = []
            deadline = time.monotonic() + seconds_per_item * max(chunk_size, 1) * 2 + 60
            try:
                for fut in as_completed(list(futures), timeout=max(deadline - time.monotonic(), 1)):
                    idx = futures[fut]
                    try:
                        for i, r in zip(idx, fut.result(), strict=True):
                            results[i] = r
                            stop = stop or _outage(r)
                    except Exception:  # KilledWorker, a worker lost mid-chunk: retry its items alone
                        if attempt == "chunk" and len(idx) > 1:
                            retry.extend([i] for i in idx)
                        else:
                            results[idx[0]] = on_failure(items[idx[0]], "worker_crashed")
                    if progress:
                        progress(sum(r is not None for r in results), total)
                    if stop:  # the machine ran out of something: the chunks left would meet it too
                        break
            except TimeoutError:
                for fut, idx in futures.items():
                    if not fut.done():
                        fut.cancel()
                        for i in idx:
                            results[i] = on_failure(items[i], "timeout")
            if stop:
                client.cancel([f for f in futures if not f.done()])
                break
            chunks = retry
            if not chunks:
                break
        for idx in [] if stop else chunks:  # still failing after the item-by-item pass
            results[idx[0]] = on_failure(items[idx[0]], "worker_crashed")
    return _resolve(results, items, on_failure)

