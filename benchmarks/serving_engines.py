"""Online CPU serving of the ONNX model through engines with a built-in dynamic batcher, side by side.

Reproduce (the engines are not dependencies of dicomops; install them in a separate venv)::

    python3.11 -m venv /tmp/engines/venv
    /tmp/engines/venv/bin/pip install onnxruntime numpy httpx psutil "ray[serve]" litserve bentoml nvidia-pytriton
    /tmp/engines/venv/bin/python benchmarks/serving_engines.py --model /tmp/engines/model.onnx

The model is the ``dicomops export`` contract: input ``slab`` (N, 3, 128, 128) float32, output ``probability``
(N, 2), dynamic batch axis (``benchmarks/inference.py`` shows how to export one with random weights).

Engines: Ray Serve (``@serve.batch``), LitServe (``max_batch_size``/``batch_timeout``), BentoML (adaptive batching,
``@bentoml.api(batchable=True)``) and PyTriton (``@batch`` + Triton's dynamic batcher). Each runs as a subprocess of
this script (``--serve ENGINE``) with one replica/worker and an ONNX Runtime session of ``--threads`` intra-op threads,
once with dynamic batching on (max batch 32, ~5 ms wait) and once with it off (max batch 1). An asyncio httpx load
generator then runs C closed-loop clients, each sending one slab per request, for ``--seconds`` per C.

Payload: one slab as float16 bytes, base64 in a JSON body (``{"slab": "..."}``; BentoML's batchable API takes a
one-element list, ``{"slabs": ["..."]}``); PyTriton is spoken to in Triton's own KServe v2 protocol with the raw
float16 bytes after the JSON header (binary tensor extension). Memory is the summed RSS (and PSS, which counts shared
pages once) of the server's whole process tree, taken after the highest load.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import signal
import subprocess
import sys
import sysconfig
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ENGINES = ("ray", "litserve", "bentoml", "pytriton")
SHAPE = (3, 128, 128)
MAX_BATCH, WAIT_S = 32, 0.005
_ENV = "SERVING_ENGINES_CONFIG"  # JSON {"engine", "model", "batch", "threads"} for a server process's import


# --------------------------------------------------------------------------------------------------- model


def _session(model: str, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def _decode(b64: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(b64), np.float16).reshape(SHAPE).astype(np.float32)


def _run(session, slabs: np.ndarray) -> np.ndarray:
    return session.run(None, {"slab": np.ascontiguousarray(slabs, np.float32)})[0]


# --------------------------------------------------------------------------------------------------- servers


def serve_ray(model: str, batch: int, threads: int, port: int) -> None:
    import ray
    from ray import serve

    @serve.deployment(num_replicas=1, max_ongoing_requests=256, ray_actor_options={"num_cpus": 0})
    class RaySlab:
        def __init__(self) -> None:
            self.session = _session(model, threads)
            self.infer.set_max_batch_size(batch)
            self.infer.set_batch_wait_timeout_s(WAIT_S if batch > 1 else 0.0)

        @serve.batch(max_batch_size=MAX_BATCH, batch_wait_timeout_s=WAIT_S)
        async def infer(self, slabs: list[np.ndarray]) -> list[np.ndarray]:
            return list(await asyncio.to_thread(_run, self.session, np.stack(slabs)))

        async def __call__(self, request: Request) -> dict:
            slab = _decode((await request.json())["slab"])
            return {"probability": (await self.infer(slab)).tolist()}

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(RaySlab.bind(), route_prefix="/predict", blocking=True)


def _litserve_api(model: str, batch: int, threads: int):
    """The LitAPI class; module-level (built at import) since LitServe pickles it into spawned workers."""
    import litserve as ls

    class LitSlab(ls.LitAPI):
        def setup(self, device: str) -> None:
            self.session = _session(model, threads)

        def decode_request(self, request: dict) -> np.ndarray:
            return _decode(request["slab"])

        def batch(self, inputs: list[np.ndarray]) -> np.ndarray:
            return np.stack(inputs)

        def predict(self, x: np.ndarray) -> np.ndarray:
            return _run(self.session, x if x.ndim == 4 else x[None])  # unbatched: one (3, H, W) slab

        def unbatch(self, output: np.ndarray) -> list[np.ndarray]:
            return list(output)

        def encode_response(self, output: np.ndarray) -> dict:
            return {"probability": output.reshape(-1).tolist()}

    LitSlab.__qualname__ = "LitSlab"
    return LitSlab


def serve_litserve(model: str, batch: int, threads: int, port: int) -> None:
    import litserve as ls

    api = LitSlab(max_batch_size=batch, batch_timeout=WAIT_S if batch > 1 else 0.0, api_path="/predict")
    server = ls.LitServer(api, accelerator="cpu", devices=1, workers_per_device=1)
    server.run(host="127.0.0.1", port=port, num_api_servers=1, generate_client_file=False, log_level="warning")


def _bentoml_service(model: str, batch: int, threads: int):
    """The BentoML service class; built at import when ``bentoml serve`` loads this module in its workers."""
    import bentoml

    @bentoml.service(workers=1, traffic={"timeout": 60})
    class BentoSlab:
        def __init__(self) -> None:
            self.session = _session(model, threads)

        if batch > 1:
            # max_latency_ms is an SLO: requests whose estimated wait exceeds it are refused (503), keep it loose.
            @bentoml.api(route="/predict", batchable=True, max_batch_size=MAX_BATCH, max_latency_ms=10_000)
            def predict(self, slabs: list[str]) -> list[list[float]]:
                return _run(self.session, np.stack([_decode(s) for s in slabs])).tolist()
        else:

            @bentoml.api(route="/predict")
            def predict(self, slab: str) -> list[float]:
                return _run(self.session, _decode(slab)[None])[0].tolist()

    return BentoSlab


if os.environ.get(_ENV):  # in a server process: the classes that BentoML and LitServe import by name
    _CONFIG = json.loads(os.environ[_ENV])
    if _CONFIG["engine"] == "bentoml":
        BentoSlab = _bentoml_service(_CONFIG["model"], _CONFIG["batch"], _CONFIG["threads"])
    elif _CONFIG["engine"] == "litserve":
        LitSlab = _litserve_api(_CONFIG["model"], _CONFIG["batch"], _CONFIG["threads"])


def serve_bentoml(model: str, batch: int, threads: int, port: int) -> None:
    here = Path(__file__).resolve()
    command = [sys.executable, "-m", "bentoml", "serve", f"{here.stem}:BentoSlab", "--working-dir", str(here.parent),
               "--host", "127.0.0.1", "--port", str(port)]
    os.execv(sys.executable, command)


def serve_pytriton(model: str, batch: int, threads: int, port: int) -> None:
    from pytriton.decorators import batch as batched
    from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
    from pytriton.triton import Triton, TritonConfig

    session = _session(model, threads)

    @batched
    def infer(slab: np.ndarray) -> dict[str, np.ndarray]:
        return {"probability": _run(session, slab)}

    batcher = DynamicBatcher(max_queue_delay_microseconds=int(WAIT_S * 1e6) if batch > 1 else 0)
    config = TritonConfig(http_address="127.0.0.1", http_port=port, grpc_port=port + 1, metrics_port=port + 2)
    with Triton(config=config) as triton:
        triton.bind(model_name="slab", infer_func=infer, inputs=[Tensor(name="slab", dtype=np.float16, shape=SHAPE)],
                    outputs=[Tensor(name="probability", dtype=np.float32, shape=(2,))],
                    config=ModelConfig(max_batch_size=batch, batcher=batcher))
        triton.serve()


SERVERS = {"ray": serve_ray, "litserve": serve_litserve, "bentoml": serve_bentoml, "pytriton": serve_pytriton}


# --------------------------------------------------------------------------------------------------- client


@dataclass
class Request:
    """One engine's URL, body and headers for a single-slab request, and how to read the probability back."""

    url: str
    body: bytes
    headers: dict[str, str] = field(default_factory=lambda: {"content-type": "application/json"})

    @classmethod
    def for_engine(cls, engine: str, batch: int, port: int, slab: np.ndarray) -> Request:
        raw = slab.astype(np.float16).tobytes()
        url = f"http://127.0.0.1:{port}/predict"
        if engine == "pytriton":
            header = json.dumps({"inputs": [{"name": "slab", "shape": [1, *SHAPE], "datatype": "FP16",
                                             "parameters": {"binary_data_size": len(raw)}}],
                                 "outputs": [{"name": "probability", "parameters": {"binary_data": False}}]}).encode()
            headers = {"content-type": "application/octet-stream", "inference-header-content-length": str(len(header))}
            return cls(f"http://127.0.0.1:{port}/v2/models/slab/infer", header + raw, headers)
        b64 = base64.b64encode(raw).decode()
        body = {"slabs": [b64]} if engine == "bentoml" and batch > 1 else {"slab": b64}
        return cls(url, json.dumps(body).encode())


async def _post(client, request: Request) -> None:
    response = await client.post(request.url, content=request.body, headers=request.headers)
    response.raise_for_status()


async def wait_healthy(request: Request, process: subprocess.Popen, timeout: float) -> float:
    """Seconds from now until the first successful prediction (the server's own health routes differ)."""
    import httpx

    start = time.perf_counter()
    async with httpx.AsyncClient(timeout=10) as client:
        while time.perf_counter() - start < timeout:
            if process.poll() is not None:
                raise RuntimeError(f"server exited with {process.returncode}")
            try:
                await _post(client, request)
                return time.perf_counter() - start
            except httpx.HTTPError:
                await asyncio.sleep(0.25)
    raise TimeoutError(f"server not healthy after {timeout:.0f} s")


async def load(request: Request, clients: int, seconds: float) -> dict[str, float]:
    """C closed-loop clients for `seconds`: throughput, p50/p95 latency (ms), errors."""
    import httpx

    latencies: list[float] = []
    errors = 0
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:

        async def worker(deadline: float) -> None:
            nonlocal errors
            while (now := time.perf_counter()) < deadline:
                try:
                    await _post(client, request)
                    latencies.append(time.perf_counter() - now)
                except httpx.HTTPError:
                    errors += 1

        warm = time.perf_counter() + min(1.0, seconds / 4)
        await asyncio.gather(*(worker(warm) for _ in range(clients)))
        latencies.clear()
        errors = 0
        start = time.perf_counter()
        await asyncio.gather(*(worker(start + seconds) for _ in range(clients)))
        elapsed = time.perf_counter() - start
    ms = np.array(latencies) * 1e3 if latencies else np.array([np.nan])
    return {"rps": len(latencies) / elapsed, "p50": float(np.percentile(ms, 50)), "p95": float(np.percentile(ms, 95)),
            "errors": errors}


def tree_memory_mib(pid: int) -> tuple[float, float]:
    """Summed RSS and PSS (MiB) of a process and all its descendants."""
    import psutil

    root = psutil.Process(pid)
    rss = pss = 0
    for process in [root, *root.children(recursive=True)]:
        try:
            info = process.memory_full_info()
            rss, pss = rss + info.rss, pss + info.pss
        except psutil.Error:
            continue
    return rss / 2**20, pss / 2**20


# --------------------------------------------------------------------------------------------------- driver


def _stop(process: subprocess.Popen) -> None:
    """SIGINT the server's session (graceful shutdown of Ray/Triton), then SIGKILL what is left."""
    import psutil

    try:
        tree = [psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True)]
    except psutil.Error:
        tree = []
    for sig, wait in ((signal.SIGINT, 15), (signal.SIGKILL, 5)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        _, alive = psutil.wait_procs(tree, timeout=wait)
        if not alive:
            return
        for leftover in alive:
            with contextlib.suppress(psutil.Error):
                leftover.kill()


def bench_engine(engine: str, batch: int, args: argparse.Namespace) -> dict:
    """Start one server, time it to healthy, run every client count, read memory, stop it."""
    config = {"engine": engine, "model": str(args.model.resolve()), "batch": batch, "threads": args.threads}
    env = {**os.environ, _ENV: json.dumps(config)}
    if engine == "pytriton":  # the Python backend stub must load this interpreter's libpython, not the system one
        libdir = sysconfig.get_config_var("LIBDIR")
        env["LD_LIBRARY_PATH"] = ":".join(filter(None, [libdir, env.get("LD_LIBRARY_PATH")]))
    command = [sys.executable, str(Path(__file__).resolve()), "--serve", engine, "--batch", str(batch),
               "--model", str(args.model), "--threads", str(args.threads), "--port", str(args.port)]
    log = open(Path(args.log_dir) / f"{engine}_b{batch}.log", "w")  # noqa: SIM115 - closed in finally
    started = time.perf_counter()
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    slab = np.random.default_rng(0).random(SHAPE, np.float32)
    request = Request.for_engine(engine, batch, args.port, slab)
    result: dict = {"engine": engine, "batch": batch, "runs": {}}
    try:
        asyncio.run(wait_healthy(request, process, args.startup_timeout))
        result["startup_s"] = time.perf_counter() - started
        result["idle_mib"] = tree_memory_mib(process.pid)
        for clients in args.clients:
            result["runs"][clients] = asyncio.run(load(request, clients, args.seconds))
            print(f"  {engine:9s} batch={batch:<3d} C={clients:<3d} " + json.dumps(result["runs"][clients]), flush=True)
        result["loaded_mib"] = tree_memory_mib(process.pid)
    except (RuntimeError, TimeoutError) as error:
        result["error"] = str(error)
        print(f"  {engine} batch={batch}: {error} (see {log.name})", flush=True)
    finally:
        _stop(process)
        log.close()
    return result


def report(results: list[dict], clients: list[int]) -> None:
    head = f"{'engine':9s} {'batch':>5s} {'start s':>7s} {'RSS MiB':>8s} {'PSS MiB':>8s}"
    head += "".join(f" | C={c:<3d} {'req/s':>6s} {'p50':>6s} {'p95':>6s}" for c in clients)
    print("\n" + head + "\n" + "-" * len(head))
    for r in results:
        if "error" in r:
            print(f"{r['engine']:9s} {r['batch']:>5d}  FAILED: {r['error']}")
            continue
        rss, pss = r["loaded_mib"]
        line = f"{r['engine']:9s} {r['batch']:>5d} {r['startup_s']:>7.1f} {rss:>8.0f} {pss:>8.0f}"
        for c in clients:
            run = r["runs"][c]
            line += f" | {'':5s} {run['rps']:>6.1f} {run['p50']:>6.1f} {run['p95']:>6.1f}"
            line += "!" if run["errors"] else ""
        print(line)
    print("\nbatched / unbatched (throughput x, p95 x):")
    by_key = {(r["engine"], r["batch"]): r for r in results if "error" not in r}
    for engine in dict.fromkeys(r["engine"] for r in results):
        on, off = by_key.get((engine, MAX_BATCH)), by_key.get((engine, 1))
        if on and off:
            ratios = [f"C={c}: {on['runs'][c]['rps'] / off['runs'][c]['rps']:.2f}x / "
                      f"{on['runs'][c]['p95'] / off['runs'][c]['p95']:.2f}x" for c in clients]
            print(f"  {engine:9s} " + "   ".join(ratios))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=Path("/tmp/engines/model.onnx"))
    parser.add_argument("--engines", nargs="+", choices=ENGINES, default=list(ENGINES))
    parser.add_argument("--clients", nargs="+", type=int, default=[1, 8, 32, 64])
    parser.add_argument("--seconds", type=float, default=8.0, help="measured seconds per client count")
    parser.add_argument("--batch", nargs="+", type=int, default=[MAX_BATCH, 1], help="max batch sizes (1 = off)")
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--startup-timeout", type=float, default=180.0)
    parser.add_argument("--log-dir", default="/tmp/engines/logs")
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    parser.add_argument("--serve", choices=ENGINES, help=argparse.SUPPRESS)  # internal: run one server
    args = parser.parse_args()
    if args.serve:
        SERVERS[args.serve](str(args.model.resolve()), args.batch[0], args.threads, args.port)
        return
    Path(args.log_dir).mkdir(parents=True, exist_ok=True)
    results = [bench_engine(engine, batch, args) for engine in args.engines for batch in args.batch]
    report(results, args.clients)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
