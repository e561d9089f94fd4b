"""Which task runner a stage flow uses: Prefect's default, or a Dask cluster through prefect-dask."""

from __future__ import annotations

from typing import Any, TypeVar

F = TypeVar("F")


def on_dask(flow: F, address: str | None) -> F:
    """`flow` with its tasks submitted to the Dask scheduler at `address` (prefect-dask's
    ``DaskTaskRunner``); the per-file and per-series maps inside those tasks then fan out over the
    same cluster. Without an address, the flow as it is."""
    if not address:
        return flow
    try:
        from prefect_dask import DaskTaskRunner
    except ImportError as err:
        raise RuntimeError("a dask_address is set, and running on Dask needs prefect-dask: "
                           "pip install -e '.[dask]' (make venv installs it), or leave dask_address unset") from err

    result: Any = flow.with_options(task_runner=DaskTaskRunner(address=address))  # type: ignore[attr-defined]
    return result


FLOWS = {name: f"flows.{name}:{name}" for name in
         ("ingest", "preprocess", "train", "segment", "export", "monitor", "retrain", "pipeline", "feedback")}
FLOWS["pacs-watch"] = "flows.pacs_watch:pacs_watch"
FLOWS["predict"] = "flows.predict:predict"


def load_flow(name: str, dask_address: str | None = None) -> Any:
    """The flow `name` (on Dask when `dask_address` is set): what the CLI calls through the
    ``dicomops.flows`` entry point, so that the library never imports this package."""
    import importlib

    if name not in FLOWS:
        raise ValueError(f"unknown flow {name!r}; one of {', '.join(FLOWS)}")
    module, attribute = FLOWS[name].split(":")
    return on_dask(getattr(importlib.import_module(module), attribute), dask_address)
