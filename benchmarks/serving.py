"""The online service, side by side in one run: dynamic batching on vs off, a study cold vs warm from
Redis, memory, and the cache's hit ratio under a replayed workload.

Reproduce: ``.venv/bin/python benchmarks/serving.py`` (``--quick`` for a short run). Needs the
``online`` extra (Ray Serve) and Debian's ``orthanc``, ``orthanc-dicomweb`` and ``redis-server``.
Everything lives in a temporary folder, removed at the end.

- Model: a champion trained for one epoch on a small synthetic corpus at the default input size
  (3 × 128 × 128 slabs), promoted and exported like any other (speed does not depend on the weights).
- Batching: the service on Ray Serve with ``@serve.batch`` at max batch 32 (5 ms wait) and, as the
  baseline, at max batch 1 (every slab its own engine call); C closed-loop clients (1, 8, 32, 64)
  each POST one slab (``/v1/slabs``, .npy) for ``--seconds``; throughput and p50/p95 latency. The
  clients share the machine's cores with the service, as they would on one box.
- Per study (``--slices`` slices of ``--matrix``², one series): cold = ``/v1/studies`` with
  ``write_back`` (QIDO, WADO-RS retrieval, the ingest gate, preprocessing, scoring, SR stored back),
  then warm = the same request again without write-back (the volume and the study's manifest from
  Redis: no retrieval, gate or preprocessing). p50 and p95 of each, and the ratio.
- Memory: resident set of the replica process, and of every Ray process together (RSS and PSS, which
  counts shared pages once), after the load; Redis's own ``used_memory``.
- Replay: a sequence of study requests where 30 % repeat an earlier study; the cache's hit ratio and
  the p50 of repeats vs first requests.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import secrets
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

MODEL = "bench-classifier"
KEY = b"benchmark-serving-key-0123456789"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def build_champion(root: Path) -> str:
    """A one-epoch champion at the default input size, promoted and exported; its tracking URI."""
    from prefect.testing.utilities import prefect_test_harness

    from dicomops import ingest
    from dicomops.config import (
        ExportConfig,
        IngestConfig,
        PreprocessConfig,
        SynthConfig,
        TrainConfig,
    )
    from dicomops.preprocessing.stage import preprocess_corpus
    from dicomops.synthetic import generate_corpus
    from flows.export import export
    from flows.train import train

    pre = PreprocessConfig(workers=2)
    cfg = TrainConfig(epochs=1, batch_size=32, num_workers=0, model_name=MODEL, min_auc=0.0)
    generate_corpus(root / "src", SynthConfig(patients=16, seed=5, fault_rate=0.0, matrix=256, slices=24, workers=2))
    uri = f"sqlite:///{root / 'mlflow' / 'mlflow.db'}"
    os.environ["MLFLOW_TRACKING_URI"] = uri
    os.environ["DICOMOPS_MLFLOW_ARTIFACT_ROOT"] = str(root / "mlflow" / "artifacts")
    with prefect_test_harness(server_startup_timeout=120):
        ingest.run(root / "src", root / "work", IngestConfig(workers=2), KEY)
        preprocess_corpus(root / "work", pre)
        result = train(work=root / "work", config=cfg, preprocess_config=pre, experiment="bench")
        assert result["promoted"], result
        export(work=root / "work", config=ExportConfig(int8_max_auc_drop=1.0), model_name=MODEL, alias="champion")
    return uri


def write_studies(out: Path, count: int, first: int, slices: int, matrix: int) -> list[Path]:
    from dicomops.synthetic.corpus import SeriesPlan, write_series

    folders = []
    for i in range(first, first + count):
        plan = SeriesPlan(index=i, seed=23, scenario="baseline", vendor=("ge", "siemens", "philips", "canon")[i % 4],
                          label=0, nodule_count=0, fault=None, fault_detail="", matrix=matrix, slices=slices)
        write_series(plan, out)
        folders.append(out / plan.case / "series-1")
    return folders


def send(pacs: Any, folder: Path) -> str:
    import pydicom

    datasets = [pydicom.dcmread(p) for p in sorted(folder.iterdir())]
    pacs.store(datasets)
    return str(datasets[0].StudyInstanceUID)


def wait_stable(url: str, credentials: Any, uids: set[str], timeout_s: float = 120.0) -> None:
    from dicomops.pacs.changes import ChangesFeed

    deadline = time.monotonic() + timeout_s
    with ChangesFeed(url, credentials) as feed:
        while time.monotonic() < deadline:
            if uids <= {s.study_uid for s in feed.stable_studies(0)}:
                return
            time.sleep(0.2)
    raise TimeoutError("studies did not become stable")


async def slab_load(url: str, token: str, body: bytes, clients: int, seconds: float) -> dict[str, float]:
    import httpx

    latencies: list[float] = []
    errors = 0
    stop = time.perf_counter() + seconds
    headers = {"Authorization": f"Bearer {token}"}
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:
        async def worker() -> None:
            nonlocal errors
            while time.perf_counter() < stop:
                t0 = time.perf_counter()
                r = await client.post(f"{url}/v1/slabs", content=body, headers=headers)
                if r.status_code == 200:
                    latencies.append(time.perf_counter() - t0)
                else:
                    errors += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        elapsed = time.perf_counter() - t0
    return {"rps": len(latencies) / elapsed, "p50_ms": 1000 * pct(latencies, 50), "p95_ms": 1000 * pct(latencies, 95),
            "errors": float(errors)}


def memory() -> dict[str, float]:
    import psutil

    replica, total_rss, total_pss = 0.0, 0.0, 0.0
    for p in psutil.process_iter(["name", "cmdline"]):
        text = (p.info["name"] or "") + " " + " ".join((p.info["cmdline"] or [])[:3])
        if "ray" not in text.lower() and "raylet" not in text and "gcs_server" not in text:
            continue
        try:
            full = p.memory_full_info()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        total_rss += full.rss
        total_pss += getattr(full, "pss", full.rss)
        if "ServeReplica" in text:
            replica = max(replica, float(full.rss))
    mb = 1024 * 1024
    return {"replica_rss_mb": replica / mb, "ray_rss_mb": total_rss / mb, "ray_pss_mb": total_pss / mb}


def ask(url: str, token: str, uid: str, write_back: bool) -> tuple[float, dict[str, Any]]:
    import httpx

    t0 = time.perf_counter()
    r = httpx.post(f"{url}/v1/studies", json={"study_instance_uid": uid, "write_back": write_back},
                   headers={"Authorization": f"Bearer {token}"}, timeout=300)
    elapsed = time.perf_counter() - t0
    if r.status_code != 200:
        raise RuntimeError(f"study request answered {r.status_code}: {r.text[:300]}")
    return elapsed, r.json()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--studies", type=int, default=8)
    parser.add_argument("--slices", type=int, default=60)
    parser.add_argument("--matrix", type=int, default=256)
    parser.add_argument("--clients", default="1,8,32,64")
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--replay", type=int, default=20, help="study requests in the replayed workload")
    parser.add_argument("--quick", action="store_true", help="3 studies, 4 s per load level, a replay of 10")
    args = parser.parse_args()
    if args.quick:
        args.studies, args.seconds, args.replay = 3, 4.0, 10
    clients = [int(c) for c in args.clients.split(",")]

    from dicomops.config import IngestConfig
    from dicomops.pacs.client import PASSWORD_ENV, URL_ENV, USER_ENV, PacsClient, PacsCredentials
    from dicomops.pacs.orthanc import start_orthanc
    from dicomops.serving import ray_app, redis_server
    from dicomops.serving.cache import PASSWORD_ENV as REDIS_PASSWORD_ENV
    from dicomops.serving.cache import URL_ENV as REDIS_URL_ENV
    from dicomops.serving.online import TOKEN_ENV, ServiceOptions

    root = Path(tempfile.mkdtemp(prefix="dicomops-bench-serving-"))
    token, redis_password = secrets.token_urlsafe(24), secrets.token_urlsafe(18)
    credentials = PacsCredentials("bench", secrets.token_urlsafe(18))
    started = time.perf_counter()
    try:
        t0 = time.perf_counter()
        uri = build_champion(root)
        print(f"champion trained and exported in {time.perf_counter() - t0:.0f} s")
        rng = np.random.default_rng(0)
        slab = io.BytesIO()
        np.save(slab, rng.random((1, 3, 128, 128), dtype=np.float32))
        env = {TOKEN_ENV: token, "DICOMOPS_DEID_KEY": KEY.decode(), USER_ENV: credentials.user,
               PASSWORD_ENV: credentials.password, REDIS_PASSWORD_ENV: redis_password}
        os.environ.update(env)
        results: dict[str, Any] = {"batching": {}, "study": {}, "replay": {}, "study_load": {}}
        with start_orthanc(root / "pacs", free_port(), credentials, stable_age_s=1) as orthanc:
            os.environ[URL_ENV] = orthanc.url
            redis = redis_server.start(free_port(), redis_password, maxmemory_mb=512, workdir=root)
            os.environ[REDIS_URL_ENV] = redis.url
            options = ServiceOptions(model_name=MODEL, alias="champion", version=None, engine="auto", threads=2,
                                     work=root / "serve-work", staging=root / "staging", ingest=IngestConfig(workers=1),
                                     key=b"", tracking_uri=uri, pacs_url=None, cache_ttl_s=3600)
            try:
                folders = write_studies(root / "studies", args.studies + args.replay, 1000, args.slices, args.matrix)
                with PacsClient(orthanc.dicomweb_url, credentials) as pacs:
                    uids = [send(pacs, f) for f in folders]
                wait_stable(orthanc.url, credentials, set(uids))
                # Batching on first: its run also fills the cache the warm-study load of both runs reads.
                for label, batch in (("on", 32), ("off", 1)):
                    t0 = time.perf_counter()
                    url = ray_app.start(options, ray_app.Scaling(max_batch=batch, batch_wait_s=0.005),
                                        port=free_port())
                    print(f"service with batching {label} (max batch {batch}) up in {time.perf_counter() - t0:.1f} s")
                    asyncio.run(slab_load(url, token, slab.getvalue(), 4, 2.0))  # warm-up
                    for c in clients:
                        r = asyncio.run(slab_load(url, token, slab.getvalue(), c, args.seconds))
                        results["batching"][(label, c)] = r
                        print(f"  {c:>3} slab clients: {r['rps']:7.1f} req/s, p50 {r['p50_ms']:7.1f} ms, "
                              f"p95 {r['p95_ms']:7.1f} ms, errors {r['errors']:.0f}")
                    if label == "on":
                        results["memory_after_load"] = memory()
                        results["study"] = cold_then_warm(url, token, uids[: args.studies])
                        results["replay"] = replay(url, token, uids[: args.studies], uids[args.studies:],
                                                   args.replay)
                        results["memory"] = memory()
                    for c in STUDY_CLIENTS:
                        r = asyncio.run(study_load(url, token, uids[: args.studies], c, args.seconds))
                        results["study_load"][(label, c)] = r
                        print(f"  {c:>3} warm-study clients: {r['rps']:6.2f} studies/s, p50 {r['p50_ms']:7.1f} ms, "
                              f"p95 {r['p95_ms']:7.1f} ms, errors {r['errors']:.0f}")
                    ray_app.stop()
                results["redis_used_mb"] = results["replay"]["after"].get("dicomops_cache_used_memory_bytes", 0) / 2**20
            finally:
                ray_app.stop()
                redis.stop()
        report(args, clients, results, time.perf_counter() - started)
    finally:
        shutil.rmtree(root, ignore_errors=True)


STUDY_CLIENTS = (1, 4, 8)


def cold_then_warm(url: str, token: str, uids: list[str]) -> dict[str, Any]:
    """Each study cold (retrieved, gated, preprocessed, scored, SR stored), then warm from Redis."""
    cold, warm, steps = [], [], {}
    for uid in uids:
        elapsed, answer = ask(url, token, uid, write_back=True)
        assert not answer["warm"] and answer["results_stored"] >= 1, answer
        cold.append(elapsed)
        for step, seconds in answer["timings_s"].items():
            steps.setdefault(("cold", step), []).append(seconds)
        elapsed, answer = ask(url, token, uid, write_back=False)
        assert answer["warm"], answer
        warm.append(elapsed)
        for step, seconds in answer["timings_s"].items():
            steps.setdefault(("warm", step), []).append(seconds)
    return {"cold": cold, "warm": warm, "steps": steps}


def replay(url: str, token: str, seen_before: list[str], fresh: list[str], requests: int) -> dict[str, Any]:
    """`requests` study requests, 30 % of them repeating a study asked for earlier in the replay."""
    rng = np.random.default_rng(1)
    fresh, seen = list(fresh), []
    first, repeat = [], []
    before = redis_stats(url, token)
    for i in range(requests):
        if seen and rng.random() < 0.3:
            elapsed, _ = ask(url, token, seen[int(rng.integers(len(seen)))], write_back=False)
            repeat.append(elapsed)
        else:
            uid = fresh.pop() if fresh else seen_before[i % len(seen_before)]
            elapsed, _ = ask(url, token, uid, write_back=False)
            (repeat if uid in seen else first).append(elapsed)
            seen.append(uid)
    return {"first": first, "repeat": repeat, "before": before, "after": redis_stats(url, token)}


async def study_load(url: str, token: str, uids: list[str], clients: int, seconds: float) -> dict[str, float]:
    """C closed-loop clients asking for cached studies in turn: every slab of every study through
    the batcher, no retrieval, gate or preprocessing."""
    import httpx

    latencies: list[float] = []
    errors = 0
    stop = time.perf_counter() + seconds
    headers = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(timeout=300) as client:
        async def worker(offset: int) -> None:
            nonlocal errors
            i = offset
            while time.perf_counter() < stop:
                t0 = time.perf_counter()
                r = await client.post(f"{url}/v1/studies", json={"study_instance_uid": uids[i % len(uids)]},
                                      headers=headers)
                if r.status_code == 200 and r.json()["warm"]:
                    latencies.append(time.perf_counter() - t0)
                else:
                    errors += 1
                i += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(worker(k) for k in range(clients)))
        elapsed = time.perf_counter() - t0
    return {"rps": len(latencies) / elapsed, "p50_ms": 1000 * pct(latencies, 50), "p95_ms": 1000 * pct(latencies, 95),
            "errors": float(errors)}


def redis_stats(url: str, token: str) -> dict[str, float]:
    import httpx

    text = httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {token}"}, timeout=30).text
    return {k: float(v) for k, v in (line.split() for line in text.splitlines() if line.strip())}


def report(args: argparse.Namespace, clients: list[int], r: dict[str, Any], run_s: float) -> None:
    print(f"\n# Online serving on Ray Serve, {os.cpu_count()} cores, run took {run_s / 60:.1f} min\n")
    print("Dynamic batching (one slab per request, /v1/slabs):\n")
    print("| clients | off req/s | off p50 / p95 ms | on req/s | on p50 / p95 ms | throughput on/off |")
    print("|---|---|---|---|---|---|")
    for c in clients:
        off, on = r["batching"][("off", c)], r["batching"][("on", c)]
        print(f"| {c} | {off['rps']:.1f} | {off['p50_ms']:.0f} / {off['p95_ms']:.0f} | {on['rps']:.1f} | "
              f"{on['p50_ms']:.0f} / {on['p95_ms']:.0f} | {on['rps'] / off['rps']:.2f}x |")
    print("\nDynamic batching on whole studies (warm from Redis: every slab of a study through the batcher):\n")
    print("| clients | off studies/s | off p50 / p95 ms | on studies/s | on p50 / p95 ms | throughput on/off |")
    print("|---|---|---|---|---|---|")
    for c in STUDY_CLIENTS:
        off, on = r["study_load"][("off", c)], r["study_load"][("on", c)]
        print(f"| {c} | {off['rps']:.2f} | {off['p50_ms']:.0f} / {off['p95_ms']:.0f} | {on['rps']:.2f} | "
              f"{on['p50_ms']:.0f} / {on['p95_ms']:.0f} | {on['rps'] / off['rps']:.2f}x |")
    cold, warm = r["study"]["cold"], r["study"]["warm"]
    print(f"\nPer study ({args.slices} slices of {args.matrix}², {len(cold)} studies): cold (retrieve, gate, "
          f"preprocess, score, SR stored) p50 {pct(cold, 50):.2f} s, p95 {pct(cold, 95):.2f} s; warm from Redis "
          f"p50 {pct(warm, 50):.3f} s, p95 {pct(warm, 95):.3f} s; cold/warm {pct(cold, 50) / pct(warm, 50):.0f}x")
    for kind in ("cold", "warm"):
        parts = [f"{step.removesuffix('_s')} {pct(v, 50):.3f}" for (k, step), v in r["study"]["steps"].items()
                 if k == kind]
        print(f"  {kind}, p50 s per step inside the service: {', '.join(parts)}")
    rep = r["replay"]
    hits = rep["after"].get("dicomops_cache_hits", 0) - rep["before"].get("dicomops_cache_hits", 0)
    misses = rep["after"].get("dicomops_cache_misses", 0) - rep["before"].get("dicomops_cache_misses", 0)
    print(f"Replay ({args.replay} requests, 30 % repeats): volume-cache hit ratio {hits / max(hits + misses, 1):.2f} "
          f"({hits:.0f} hits, {misses:.0f} misses); first requests p50 {pct(rep['first'], 50):.2f} s, repeats p50 "
          f"{pct(rep['repeat'], 50):.3f} s")
    for label in ("memory_after_load", "memory"):
        m = r[label]
        print(f"Memory ({'after the slab load' if label == 'memory_after_load' else 'after the studies'}): replica "
              f"RSS {m['replica_rss_mb']:.0f} MB; every Ray process together RSS {m['ray_rss_mb']:.0f} MB, "
              f"PSS {m['ray_pss_mb']:.0f} MB")
    print(f"Redis used_memory after the replay: {r['redis_used_mb']:.1f} MB (cap 512 MB, LRU)")


if __name__ == "__main__":
    main()
