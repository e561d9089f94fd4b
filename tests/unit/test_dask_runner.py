"""The per-file and per-series map steps on a real Dask cluster (distributed.LocalCluster, two
worker processes) give exactly what the default local-process runner gives."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from dicomops import ingest
from dicomops.config import IngestConfig, PreprocessConfig
from dicomops.dicom.parallel import map_isolated
from dicomops.preprocessing.stage import preprocess_corpus

KEY = b"dask-test-key-0123456789abcdef0123"


def _explode(x: int) -> int:
    if x == 3:
        raise ValueError("bad item")
    return x * x


@pytest.fixture(scope="module")
def cluster():  # type: ignore[no-untyped-def]
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as c:
        yield c.scheduler_address


def _run(src: Path, work: Path, address: str | None) -> None:
    ingest.run(src, work, IngestConfig(workers=2, dask_address=address), KEY)
    preprocess_corpus(work, PreprocessConfig(spacing_mm=(2.0, 2.0, 2.0), crop_xy=160, workers=2,
                                             dask_address=address))


def test_item_errors_are_isolated_on_dask(cluster: str) -> None:
    out = map_isolated(_explode, [(i,) for i in range(6)], on_failure=lambda item, why: -1, chunk_size=2,
                       dask_address=cluster)
    assert out == [0, 1, 4, -1, 16, 25]


def _full_disk_from_three(x: int, seen: str) -> int:
    import errno
    import time

    Path(seen, str(x)).touch()
    time.sleep(0.05)  # 10 s for all 400 on two workers: stopping early leaves most never started
    if x >= 3:
        raise OSError(errno.ENOSPC, "No space left on device")
    return x


def test_a_full_disk_on_dask_is_raised_in_the_caller_and_stops_the_map(cluster: str, tmp_path: Path) -> None:
    """As with local processes: no item's failure, and the chunks not yet run are cancelled."""
    import errno

    with pytest.raises(OSError) as raised:
        map_isolated(_full_disk_from_three, [(i,) for i in range(400)], args=(str(tmp_path),),
                     on_failure=lambda item, why: why, chunk_size=8, dask_address=cluster)
    assert raised.value.errno == errno.ENOSPC and "ENOSPC" in str(raised.value)
    time.sleep(1.0)  # cancelled chunks that had started finish
    assert 8 <= len(list(tmp_path.iterdir())) < 300  # of 400 (all of them before): stopped early


def test_dask_runner_gives_the_default_runners_result(mixed_corpus: Path, tmp_path: Path, cluster: str) -> None:
    _run(mixed_corpus, tmp_path / "local", None)
    _run(mixed_corpus, tmp_path / "dask", cluster)
    for table in ("ingest/accepted.parquet", "ingest/quarantine.csv", "preprocessed/index.parquet",
                  "preprocessed/features.parquet", "preprocessed/slabs.parquet"):
        read = pd.read_parquet if table.endswith(".parquet") else pd.read_csv
        pd.testing.assert_frame_equal(read(tmp_path / "local" / table), read(tmp_path / "dask" / table))
    deid = sorted(p.relative_to(tmp_path / "local") for p in (tmp_path / "local" / "deid").rglob("*") if p.is_file())
    assert deid and all((tmp_path / "local" / p).read_bytes() == (tmp_path / "dask" / p).read_bytes() for p in deid)
    for volume in (tmp_path / "local" / "preprocessed" / "volumes").glob("*.npz"):
        with np.load(volume) as a, np.load(tmp_path / "dask" / "preprocessed" / "volumes" / volume.name) as b:
            assert all(np.array_equal(a[k], b[k]) for k in a.files)


@pytest.mark.usefixtures("prefect_harness")
def test_flows_on_prefect_dasks_task_runner_match_the_default(mixed_corpus: Path, tmp_path: Path, mlflow_env: str,
                                                              cluster: str) -> None:
    from flows.ingest import ingest as ingest_flow
    from flows.preprocess import preprocess as preprocess_flow
    from flows.runners import on_dask

    pre = PreprocessConfig(spacing_mm=(2.0, 2.0, 2.0), crop_xy=160, workers=2)
    for name, address in (("default", None), ("dask", cluster)):
        work = tmp_path / name
        on_dask(ingest_flow, address)(mixed_corpus, work, IngestConfig(workers=2, dask_address=address), "dask-test")
        on_dask(preprocess_flow, address)(work, pre.model_copy(update={"dask_address": address}), "dask-test")
    for table in ("ingest/accepted.parquet", "preprocessed/index.parquet", "preprocessed/features.parquet"):
        pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "default" / table),
                                      pd.read_parquet(tmp_path / "dask" / table))
