"""The serving parts that need no server: the cache's value format, its behaviour with Redis gone,
the engine choice and input checks, the manifest digest, the PACS query syntax."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import numpy as np
import pytest

from dicomops.export.contract import InputContract
from dicomops.serving import cache as vc
from dicomops.serving import engine as eng
from dicomops.serving.batch import parse_query, summarise
from dicomops.serving.predict import Answer, SeriesFinding, study_digest


def test_a_volume_comes_back_bit_identical_and_smaller() -> None:
    volume = np.random.default_rng(0).normal(size=(64, 64, 20)).astype(np.float16)
    volume[:, :, :10] = 0  # air compresses
    blob = vc.encode(volume)
    back = vc.decode(blob)
    assert back.dtype == np.float16 and back.shape == volume.shape
    assert np.array_equal(back.view(np.uint16), volume.view(np.uint16))
    assert len(blob) < volume.nbytes


@pytest.mark.parametrize("damage", ["flip", "truncate", "magic", "garbage"])
def test_a_damaged_entry_is_refused_not_returned(damage: str) -> None:
    blob = bytearray(vc.encode(np.arange(4096, dtype=np.float16).reshape(16, 16, 16)))
    if damage == "flip":
        blob[-5] ^= 0xFF
    elif damage == "truncate":
        blob = blob[: len(blob) // 2]
    elif damage == "magic":
        blob[:4] = b"JUNK"
    else:
        blob = bytearray(b"not a volume at all")
    with pytest.raises(vc.CorruptEntry):
        vc.decode(bytes(blob))


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_redis_unreachable_means_misses_counted_and_no_waiting_per_request() -> None:
    cache = vc.VolumeCache(f"redis://127.0.0.1:{_closed_port()}/0", password="x", timeout_s=0.5, backoff_s=30)
    assert cache.get_volume("k") is None  # the first call finds Redis gone
    t0 = time.perf_counter()
    for _ in range(50):
        assert cache.get_volume("k") is None
        cache.put_volume("k", np.zeros((2, 2, 2), np.float16))
    assert time.perf_counter() - t0 < 0.5  # backing off: no connection attempt per request
    stats = cache.stats.as_dict()
    assert stats["misses"] == 51 and stats["hits"] == 0 and stats["errors"] == 101 and stats["bytes_written"] == 0


def test_no_url_no_cache() -> None:
    assert vc.VolumeCache.from_env({}) is None
    assert vc.VolumeCache.from_env({vc.URL_ENV: "redis://127.0.0.1:1/0", vc.PASSWORD_ENV: "p"}) is not None


def test_the_redis_config_needs_a_password_and_keeps_to_loopback() -> None:
    from dicomops.serving.redis_server import config

    with pytest.raises(ValueError, match="DICOMOPS_REDIS_PASSWORD"):
        config(6379, "", 64)
    with pytest.raises(ValueError, match="quote"):
        config(6379, 'a"b', 64)
    text = config(6379, "s3cret", 64)
    assert "bind 127.0.0.1" in text and 'requirepass "s3cret"' in text and "maxmemory-policy allkeys-lru" in text
    assert 'save ""' in text and "appendonly no" in text


def test_auto_prefers_tensorrt_only_where_it_can_run(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(eng.tensorrt_engine, "availability", lambda: "no CUDA device")
    choice = eng.choose("auto", {"model.onnx", "model.int8.onnx"})
    assert choice.kind == "ort-fp32" and "no CUDA device" in choice.reason
    assert eng.choose("ort-int8", {"model.int8.onnx"}).file == "model.int8.onnx"
    with pytest.raises(ValueError, match="no CUDA device"):
        eng.choose("tensorrt", {"model.onnx"})
    monkeypatch.setattr(eng.tensorrt_engine, "availability", lambda: None)
    assert eng.choose("auto", {"model.onnx", "model.fp16.plan"}).kind == "tensorrt"
    no_plan = eng.choose("auto", {"model.onnx"})
    assert no_plan.kind == "ort-fp32" and "re-export" in no_plan.reason


def _contract() -> InputContract:
    return InputContract(channels=3, height=8, width=8, spacing_mm=(1.0, 1.0, 1.0), orientation="RAS", window="lung",
                         window_center=None, window_width=None, crop_xy=64, resize="area", value_range=(0.0, 1.0),
                         threshold=0.5, series_score="mean of the 3 highest slab probabilities")


def test_the_engine_refuses_slabs_that_do_not_fit_and_batches_the_rest() -> None:
    calls: list[int] = []

    def runner(x: np.ndarray) -> np.ndarray:
        calls.append(len(x))
        p = x.mean(axis=(1, 2, 3))
        return np.stack([1 - p, p], axis=1)

    engine = eng.Engine(eng.EngineChoice("ort-fp32", "test", "model.onnx"), _contract(), runner, max_batch=4)
    x = np.random.default_rng(1).random((10, 3, 8, 8), dtype=np.float32)
    assert np.allclose(engine.probabilities(x), x.mean(axis=(1, 2, 3)))
    assert calls == [4, 4, 2]
    with pytest.raises(ValueError, match=r"\(N, 3, 8, 8\)"):
        engine.probabilities(np.zeros((2, 1, 8, 8), np.float32))
    bad = x.copy()
    bad[0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        engine.probabilities(bad)


def test_the_study_digest_is_keyed_and_ignores_order() -> None:
    uids = ["1.2.3.4", "1.2.3.5", "1.2.3.6"]
    a = study_digest(b"k1", uids, "pre")
    assert a == study_digest(b"k1", list(reversed(uids)), "pre")
    assert a != study_digest(b"k2", uids, "pre")  # an outsider without the key cannot compute it
    assert a != study_digest(b"k1", uids[:2], "pre")  # a study that grew is a new study
    assert a != study_digest(b"k1", uids, "other preprocessing")
    assert "1.2.3" not in a


def test_query_syntax() -> None:
    assert parse_query("StudyDate=20261130, ModalitiesInStudy=CT") == {"StudyDate": "20261130",
                                                                       "ModalitiesInStudy": "CT"}
    assert parse_query("all") == {}
    with pytest.raises(ValueError, match="KEYWORD=VALUE"):
        parse_query("20261130")


def test_the_batch_summary_counts_studies_not_gate_notes() -> None:
    finding = SeriesFinding("s", "GE", 10, 0.9, True, 3, "miss")
    answers = [Answer("a", "scored", [finding], timings={"total_s": 1.0, "gate_s": 0.5}),
               Answer("b", "refused", reason="gate"), Answer("c", "failed"),
               Answer("(quarantined files)", "refused", quarantined_files=3)]
    s = summarise(answers)
    assert (s["studies"], s["studies_scored"], s["studies_refused"], s["studies_failed"]) == (3, 1, 1, 1)
    assert s["series_positive"] == 1 and s["quarantined_files"] == 3 and s["latency_p50_s"] == 1.0
    assert s["studies_partly_answered"] == 0
    partly = Answer("d", "scored", [finding], results_stored=1, reason="not every result was stored: ...")
    assert summarise([*answers, partly])["studies_partly_answered"] == 1


def test_a_pass_counts_the_studies_the_pacs_did_not_keep_every_result_of() -> None:
    from dicomops.pacs import watch

    outcomes = [watch.StudyOutcome("ST-A", "ingested", 1, 0, 2, f"{watch.NOT_ALL_STORED}: the PACS kept 2 of 3"),
                watch.StudyOutcome("ST-B", "ingested", 1, 0, 0, "no champion model: ingested, not scored"),
                watch.StudyOutcome("ST-C", "ingested", 1, 0, 3)]
    summary = watch.summarise(outcomes)
    assert (summary["ingested"], summary["partly_answered"], summary["results_stored"]) == (3, 1, 5)
    assert "3 ingested (1 not answered in full: the PACS did not keep every result)" in watch.describe(summary)
    assert "not answered in full" not in watch.describe(watch.summarise(outcomes[1:]))


def test_dicomops_serve_starts_the_cache_only_with_a_password_and_hands_it_to_the_worker() -> None:
    import shutil

    from dicomops.stack import Stack, start_cache

    stack = Stack("http://127.0.0.1:1/api", "http://127.0.0.1:1")
    env: dict[str, str] = {}
    start_cache(stack, env, 6390, 64)
    assert "DICOMOPS_REDIS_PASSWORD is not set" in stack.cache and vc.URL_ENV not in env
    env = {vc.URL_ENV: "redis://127.0.0.1:7777/0"}
    start_cache(stack, env, 6390, 64)
    assert "127.0.0.1:7777" in stack.cache
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    port = _closed_port()
    env = {vc.PASSWORD_ENV: "a-test-password"}
    start_cache(stack, env, port, 16)
    try:
        assert env[vc.URL_ENV] == f"redis://127.0.0.1:{port}/0" and f"export {vc.URL_ENV}=" in stack.cache
        cache = vc.VolumeCache(env[vc.URL_ENV], "a-test-password")
        assert cache.ping()
        assert not vc.VolumeCache(env[vc.URL_ENV], "wrong-password", backoff_s=0).ping()
        cache.put_volume("k", np.ones((4, 4, 4), np.float16))
        assert np.array_equal(cache.get_volume("k"), np.ones((4, 4, 4), np.float16))
    finally:
        stack.contexts.close()
    assert not vc.VolumeCache(env[vc.URL_ENV], "a-test-password", timeout_s=0.3).ping()  # stopped with the stack


def test_the_token_is_required_and_compared_whole() -> None:
    from dicomops.serving.online import TOKEN_ENV, RequestError, check_token

    env = {TOKEN_ENV: "s3cret-token"}
    check_token("Bearer s3cret-token", env)
    check_token("bearer  s3cret-token ", env)
    for header in (None, "", "Bearer", "Bearer s3cret", "Bearer s3cret-token-and-more", "Basic s3cret-token"):
        with pytest.raises(RequestError) as refused:
            check_token(header, env)
        assert refused.value.status == 401 and TOKEN_ENV in refused.value.message
    with pytest.raises(RequestError) as unconfigured:  # no token set: nobody gets in
        check_token("Bearer ", {})
    assert unconfigured.value.status == 503


def test_a_version_without_an_export_is_named_with_the_command_that_exports_it() -> None:
    from types import SimpleNamespace

    from dicomops.serving.champion import unexported_champion

    bare = SimpleNamespace(name="m", version="3", tags={"cv.auc": "0.9"})
    assert "dicomops export --version 3" in str(unexported_champion(bare))
    assert unexported_champion(SimpleNamespace(name="m", version="3", tags={"export.onnx.sha256": "ab"})) is None


def test_the_service_start_waits_for_its_own_health_route_and_says_what_to_change() -> None:
    """Ray gives its HTTP proxy a fixed 60 s; the service then waits for its own /healthz, as long
    as serve.ready_timeout_s allows: through 503s and refused connections to the first 200."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from dicomops.serving.ray_app import wait_until_serving

    asked: list[str] = []

    class Proxy(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            asked.append(self.path)
            self.send_response(200 if len(asked) > 3 else 503)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    with socket.socket() as s:  # a port nobody listens on for 0.3 s: connections refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    servers: list[ThreadingHTTPServer] = []

    def listen_late() -> None:
        servers.append(ThreadingHTTPServer(("127.0.0.1", port), Proxy))
        servers[0].serve_forever(poll_interval=0.05)

    late = threading.Timer(0.3, listen_late)
    late.start()
    try:
        waited = wait_until_serving(f"http://127.0.0.1:{port}", timeout_s=10, poll_s=0.05)
        assert asked == ["/healthz"] * 4  # three 503s, then the 200 it returned on
        assert 0.3 <= waited < 10
        server = servers[0]
        asked.clear()
        server.RequestHandlerClass = type("Down", (Proxy,), {"do_GET": lambda self: (
            self.send_response(503), self.end_headers())})
        tick = time.monotonic()
        with pytest.raises(RuntimeError, match=r"within 1 s \(last: HTTP 503\).*serve\.ready_timeout_s"):
            wait_until_serving(f"http://127.0.0.1:{port}", timeout_s=1, poll_s=0.05)
        assert 1 <= time.monotonic() - tick < 5
    finally:
        late.cancel()
        for server in servers:
            server.shutdown()
            server.server_close()
        late.join()


def test_a_body_is_never_read_past_its_cap() -> None:
    """A declared Content-Length over the cap is refused before a byte is read; a body that streams
    past it (chunked, or longer than declared) is refused at the chunk that crosses it."""
    import asyncio
    from collections.abc import AsyncIterator

    from dicomops.serving.online import RequestError, read_capped

    pulled: list[int] = []

    async def chunks(n: int, size: int = 1000) -> AsyncIterator[bytes]:
        for i in range(n):
            pulled.append(i)
            yield b"x" * size

    def read(declared: str | None, n: int) -> bytes:
        pulled.clear()
        return asyncio.run(read_capped(declared, chunks(n), 4500, "send less"))

    assert read("3000", 3) == b"x" * 3000 and read(None, 4) == b"x" * 4000
    with pytest.raises(RequestError) as err:
        read(str(10**12), 3)
    assert err.value.status == 413 and "1000000000000 bytes; at most 4500" in err.value.message
    assert "send less" in err.value.message and pulled == []  # nothing read
    for declared in (None, "4000"):  # chunked, and a body longer than it said
        with pytest.raises(RequestError) as err:
            read(declared, 1000)
        assert err.value.status == 413 and pulled == [0, 1, 2, 3, 4]  # stopped at the chunk past the cap
    with pytest.raises(RequestError) as err:
        read("lots", 1)
    assert err.value.status == 400


class _Registry:
    """An MLflow client whose run artifacts are a local folder: what fetch downloads, counted."""

    def __init__(self, root: Path) -> None:
        self.root, self.downloads = root, 0

    def download_artifacts(self, run_id: str, path: str, dst: str) -> str:
        import shutil

        self.downloads += 1
        source, target = self.root / path, Path(dst) / path
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target)
        else:
            shutil.copy(source, target)
        return str(target)


def test_a_version_exported_again_is_fetched_anew_and_one_unchanged_is_not(tmp_path: Path) -> None:
    """The served copy of a version (WORK/serving/<name>-v<N>) follows its export: after `dicomops
    export` runs again (new ONNX bytes, or a TensorRT plan built on a GPU) the next load fetches it
    anew instead of failing on the sha256 for good; an unchanged version is not downloaded again."""
    import types

    from dicomops.export.onnx_export import sha256
    from dicomops.serving.champion import expected_exports, fetch

    artifacts = tmp_path / "artifacts"
    (artifacts / "weights").mkdir(parents=True)
    (artifacts / "weights" / "preprocess_config.json").write_text("{}")
    (artifacts / "weights" / "train_config.json").write_text("{}")
    export = artifacts / "export"
    export.mkdir()
    (export / "model.onnx").write_bytes(b"first export")
    (export / "model.int8.onnx").write_bytes(b"first int8")
    (export / "manifest.json").write_text("{}")

    def version() -> types.SimpleNamespace:
        tags = {"export.onnx.sha256": sha256(export / "model.onnx"),
                "export.int8.sha256": sha256(export / "model.int8.onnx"),
                "export.triton": "m (onnxruntime_onnx)" + (", m-trt (tensorrt_plan)"
                                                           if (export / "model.fp16.plan").exists() else "")}
        return types.SimpleNamespace(name="m", version="3", run_id="r", tags=tags)

    registry, dest = _Registry(artifacts), tmp_path / "serving" / "m-v3"
    fetch(registry, version(), dest, expected=expected_exports(version()))
    first = registry.downloads
    fetch(registry, version(), dest, expected=expected_exports(version()))
    assert registry.downloads == first  # unchanged: the copy is used

    (export / "model.onnx").write_bytes(b"second export")
    fetch(registry, version(), dest, expected=expected_exports(version()))
    assert (dest / "export" / "model.onnx").read_bytes() == b"second export" and registry.downloads == 2 * first

    (export / "model.fp16.plan").write_bytes(b"a plan built on a GPU")  # no sha tag: by its presence
    fetch(registry, version(), dest, expected=expected_exports(version()))
    assert (dest / "export" / "model.fp16.plan").exists()
    assert [p.name for p in dest.parent.iterdir()] == ["m-v3"]  # nothing left aside


def test_an_unforeseen_error_is_a_500_without_its_message_and_a_full_disk_a_503(
        caplog: pytest.LogCaptureFixture) -> None:
    """The online service's answer to what no rule caught: the error's message may quote a header
    value, so neither the answer nor the log carries it; a full disk is asked again later."""
    import errno
    import logging

    from dicomops.serving.online import unexpected_error

    caplog.set_level(logging.INFO)
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device: '/work/staging/DOE^JANE'")
        except OSError as err:
            raise RuntimeError("writing the report failed") from err
    except RuntimeError as err:
        full = unexpected_error(err, "answering a study")
    assert (full.status, full.retry_after) == (503, 300)
    assert "ENOSPC" in full.message and "answering a study" in full.message
    other = unexpected_error(ValueError("PatientName DOE^JANE is odd"), "scoring slabs")
    assert (other.status, other.retry_after) == (500, None) and "ValueError" in other.message
    assert unexpected_error(OSError(errno.ENOENT, "gone"), "storing a review").status == 500
    said = full.message + other.message + caplog.text
    assert "DOE" not in said and "/work/staging" not in said


def test_a_study_answered_in_full_elsewhere_is_left_to_nobody_else_and_the_ledger_loses_no_row(
        tmp_path: Path) -> None:
    """A batch's or the online service's answer, all results kept, is the watch's `answered` row
    (the watch's handling then finds it handled); one answered in part, refused or failed is not.
    Writers in several threads (processes take the same file lock) lose no row."""
    from concurrent.futures import ThreadPoolExecutor

    import pandas as pd

    from dicomops.pacs import watch

    full = Answer("tok-full", "scored", [], 1, results_stored=2, images="IM-A")
    assert watch.record_answered(tmp_path, full, "predict --pacs (batch b1)")
    for other in (Answer("tok-part", "scored", [], 1, results_stored=1, reason=f"{watch.NOT_ALL_STORED}: 1 of 2"),
                  Answer("tok-none", "scored", [], 1, results_stored=0),
                  Answer("tok-ref", "refused", reason="no CT series"), Answer("tok-fail", "failed", reason="x")):
        assert not watch.record_answered(tmp_path, other, "the online service")
    assert watch.handled_tokens(tmp_path) == {"tok-full"}
    ledger = pd.read_csv(tmp_path / "pacs/studies.csv", keep_default_na=False)
    assert ledger.to_dict("records")[0] | {"handled_at": ""} == {
        "token": "tok-full", "status": "answered", "accepted_series": 1, "quarantined_files": 0,
        "results_stored": 2, "reason": "answered by predict --pacs (batch b1)", "handled_at": "", "images": "IM-A",
        "series_failed": 0, "failed_series": ""}
    # The watch takes it as answered while its images are those answered; with others (a series
    # that arrived after), as a study to answer again; a row written before digests, for any.
    assert watch._handled_here(tmp_path, "tok-full", "IM-A") == (False, "predict --pacs (batch b1)", False)
    assert watch._handled_here(tmp_path, "tok-full", "IM-B") == (False, "", False)
    watch._record(tmp_path, watch.StudyOutcome("tok-watch", "ingested", images="IM-C"))
    assert watch._handled_here(tmp_path, "tok-watch", "IM-C") == (True, "", True)
    assert watch._handled_here(tmp_path, "tok-watch", "IM-D") == (False, "", True)  # handled as it was before
    watch._record(tmp_path, watch.StudyOutcome("tok-old", "ingested"))
    assert watch._handled_here(tmp_path, "tok-old", "IM-E") == (True, "", True)

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda i: watch.record_answered(tmp_path, Answer(f"t{i}", "scored", [], 1, results_stored=1),
                                                      "the online service"), range(40)))
    assert watch.handled_tokens(tmp_path) == {"tok-full", "tok-watch", "tok-old"} | {f"t{i}" for i in range(40)}


def test_a_contract_made_without_the_newer_volume_settings_does_not_compare_them_as_none() -> None:
    """Made in code with the settings it had before 2026-12-06, a contract claimed histogram_equalize
    None and so on, and disagreed with every configuration on them."""
    from dicomops.config import PreprocessConfig

    contract = _contract()
    assert set(contract.unrecorded) == {"header_window_index", "histogram_equalize", "min_positive_voxels"}
    pre = PreprocessConfig(window="lung", crop_xy=64, slab_slices=3)
    assert contract.disagreements(pre) == []
    assert [d.split(":")[0] for d in contract.disagreements(pre.model_copy(update={"crop_xy": 96}))] == ["crop_xy"]


def test_a_retried_flow_run_that_gives_back_the_masked_folder_says_what_to_do() -> None:
    from pydantic import SecretStr

    from flows.scope import folder

    assert folder(SecretStr("/data/in")) == Path("/data/in") and folder(Path("/data/in")) == Path("/data/in")
    with pytest.raises(ValueError, match="start a new run"):
        folder("**********")
