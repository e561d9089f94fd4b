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
from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
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


async def _messages(run_id: uuid.UUID) -> list[str]:
    async with get_client() as client:
        logs = await client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])))
    return [log.message for log in logs]


def test_progress_lines_reach_the_flow_runs_log() -> None:
    run_id = _training()
    APILogHandler().flush()  # the log worker sends in batches: drain it
    messages = asyncio.run(_messages(run_id))
    assert "classifier fold 0: epoch 1/6, loss 0.500, 40 samples/s, slice AUC 0.871" in messages
    assert "final segmenter: epoch 24/24, loss 0.250" in messages


def test_progress_outside_a_run_goes_to_the_console_only(caplog: pytest.LogCaptureFixture) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Prefect warns when a record reaches its API handler outside a run
        with caplog.at_level(logging.INFO, logger="dicomops.progress"):
            progress.epoch("segmenter fold 2", 3, 24, {"train_loss": 0.4})
    assert [r.getMessage() for r in caplog.records] == ["segmenter fold 2: epoch 3/24, loss 0.400"]
