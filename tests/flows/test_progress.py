"""Long work shows progress: the library's progress lines reach the flow run's log in Prefect (the
UI's and the console's), from the flow and from its tasks; outside a run they stay in the console."""

from __future__ import annotations

import asyncio
import logging
import uuid
import warnings

import pytest
from prefect import flow, task
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId, LogFilterTextSearch
from prefect.client.schemas.sorting import LogSort
from prefect.context import get_run_context
from prefect.logging.handlers import APILogHandler

import flows  # noqa: F401  (routes dicomops.progress into Prefect)
from dicomops import progress

pytestmark = pytest.mark.usefixtures("prefect_harness")


@task
def _fold() -> None:
    progress.epoch("classifier fold 0", 1, 6, {"train_loss": 0.5, "samples_per_second": 40.2,
                                               "val_slice_auc": 0.8712, "lr": 1e-3})


@flow
def _training() -> uuid.UUID:
    _fold()
    progress.epoch("final segmenter", 24, 24, {"train_loss": 0.25})
    return get_run_context().flow_run.id  # type: ignore[union-attr]


def flow_log_messages(run_id: uuid.UUID | None = None, text: str = "epoch") -> list[str]:
    """The lines holding `text` that Prefect's API holds of the flow run's log (of every run
    without `run_id`), once the log worker has sent what it holds; newest first."""
    APILogHandler().flush()

    async def read() -> list[str]:
        where = LogFilter(text=LogFilterTextSearch(query=text))
        if run_id is not None:
            where.flow_run_id = LogFilterFlowRunId(any_=[run_id])
        async with get_client() as client:
            return [log.message for log in await client.read_logs(where, limit=200, sort=LogSort.TIMESTAMP_DESC)]

    return asyncio.run(read())


def test_progress_lines_reach_the_flow_runs_log() -> None:
    messages = flow_log_messages(_training())
    assert "classifier fold 0: epoch 1/6, loss 0.500, 40 samples/s, slice AUC 0.871" in messages
    assert "final segmenter: epoch 24/24, loss 0.250" in messages


def test_progress_outside_a_run_goes_to_the_console_only(caplog: pytest.LogCaptureFixture) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Prefect warns when a record reaches its API handler outside a run
        with caplog.at_level(logging.INFO, logger="dicomops.progress"):
            progress.epoch("segmenter fold 2", 3, 24, {"train_loss": 0.4})
    assert [r.getMessage() for r in caplog.records] == ["segmenter fold 2: epoch 3/24, loss 0.400"]
