"""Prefect flows, one per file; these are the deployment entrypoints in prefect.yaml.

Importing the package routes the library's progress logger (:mod:`dicomops.progress`: epochs,
losses, rates, never PHI) into the running flow's log, the console's and the UI's: what
``PREFECT_LOGGING_EXTRA_LOGGERS=dicomops.progress`` would do, done here so that every entry point
(the CLI, a worker, the tests) gets it without a setting. Outside a flow or task run those records
go to the console only. The rest of the library's logs stay out of Prefect's database.
"""

from __future__ import annotations

import logging

from prefect.context import FlowRunContext, TaskRunContext
from prefect.logging.handlers import APILogHandler

from dicomops.progress import PROGRESS


class _InRun(logging.Filter):
    """Records from inside a flow or task run only: the API accepts no other."""

    def filter(self, record: logging.LogRecord) -> bool:
        return FlowRunContext.get() is not None or TaskRunContext.get() is not None


def _route_progress() -> None:
    PROGRESS.setLevel(logging.INFO)
    if not any(isinstance(h, APILogHandler) for h in PROGRESS.handlers):
        handler = APILogHandler()
        handler.addFilter(_InRun())
        PROGRESS.addHandler(handler)


_route_progress()
