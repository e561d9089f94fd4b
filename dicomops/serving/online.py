"""The online service's logic, apart from the engine that serves it over HTTP
(:mod:`dicomops.serving.ray_app`): authentication, requests, answers, errors.

Two requests:

- ``POST /v1/studies`` with ``{"study_instance_uid": "...", "write_back": false}``: the study from the
  PACS, scored by the one prediction path (:func:`dicomops.serving.predict.answer_pacs_study`): warm
  from the Redis cache when the PACS holds the same instances as when it was last scored, else
  retrieved, gated, preprocessed and scored; with ``write_back`` an SR per series goes to the PACS.
  A series that cannot be scored fails alone: the answer's ``status`` is ``partly_scored``, its
  ``failed_series`` lists it (original UID, reason code) and its ``warning`` says so; a study none
  of whose series could be scored is a 422 that lists them. With ``write_back``, a series the
  segmenter fails on is answered the same way (``partly_scored``, listed with the code
  ``segmenter_failed:<the error's type>``): its score and its classifier's SR go back, none of the
  segmenter's objects; a series whose classifier's SR cannot be written is listed with the code
  ``report_failed:<the error's type>``, its score in the answer and nothing written back for it (a
  study none of whose SRs could be written is a 422).
  The UID travels in the body, never the URL, so no access log holds it; the answer names the
  series by their original UIDs for the caller, and nothing is logged but counts and timings.
- ``POST /v1/slabs`` with an ``.npy`` body (float32, (N, C, H, W) in the model's input contract):
  the probability of each slab and, with ``?whole_series=true`` (the body is every slab of one
  series), the series' score and finding: the series rule reads the best slabs against all of the
  series' own, so the score of a few slabs cut around a nodule would not be the series'.

- ``POST /v1/feedback`` with a reader's own token: that reader accepts, rejects or corrects the
  result this service (or a batch) gave for a series (:mod:`dicomops.feedback.review`).

Every slab goes through the engine's dynamic batcher (`score`: a coroutine the engine batches
across requests), so concurrent studies share engine calls. The library path, the batch flow and
this service run the same code on the same exported engine and agree exactly.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import hmac
import io
import logging
import os
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dicomops.serving.champion import Champion
from dicomops.serving.engine import Engine

log = logging.getLogger(__name__)

TOKEN_ENV = "DICOMOPS_SERVE_TOKEN"
UID = re.compile(r"[0-9]+(\.[0-9]+)*")  # whole string: fullmatch (a `$` lets a final newline through)
MAX_SLABS = 4096
MAX_JSON_BYTES = 64 * 1024  # a study request or a review is a few hundred bytes
NPY_HEADER_BYTES = 4096  # numpy.save's header, padded: far less
# How long a request waits for another handler of its study (pacs-watch, a batch, another request):
# longer would tie up the replica's few study threads, which reviews share.
BUSY_WAIT_S = 5.0
STUDY_BODY = 'send JSON {"study_instance_uid": "<a DICOM UID>", "write_back": false}'


class RequestError(Exception):
    """An answer other than 200: its HTTP status and what the caller should change; `extra`: more
    fields of the answer's JSON beside ``error`` (a failed study's ``failed_series``)."""

    def __init__(self, status: int, message: str, retry_after: int | None = None,
                 extra: Mapping[str, Any] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.retry_after = status, message, retry_after
        self.extra = dict(extra or {})


def unexpected_error(err: Exception, doing: str) -> RequestError:
    """The answer to an error no rule foresaw while `doing` something: a 500 that names the error's
    type only (its message may quote a header value, so neither the answer nor the log carries it),
    or a 503 to ask again later when the machine ran out of something (a full disk: no request's
    fault, :func:`dicomops.errors.local_outage`)."""
    from dicomops.errors import local_outage

    if (what := local_outage(err)) is not None:
        log.error("online service: the machine ran out of resources while %s (%s)", doing, what)
        return RequestError(503, f"the service's machine ran out of resources ({what}) while {doing}; the "
                                 "answer may not have been recorded; asking again once it is fixed is safe "
                                 "(results keep their UIDs)", retry_after=300)
    log.error("online service: %s while %s", type(err).__name__, doing)
    return RequestError(500, f"internal error ({type(err).__name__}) while {doing}; the message is withheld "
                             "from this answer and the log (it may quote identifiers)")


async def read_capped(declared: str | None, chunks: AsyncIterator[bytes], limit: int, what: str) -> bytes:
    """A request's body, never read past `limit` bytes: a declared Content-Length over it is refused
    (413) before a byte is read, and a body that streams past it (chunked, or longer than declared)
    as soon as it does, so a replica never holds more than `limit` bytes of one request. `what`
    says what to send instead."""
    if declared is not None:
        if not declared.strip().isdigit():
            raise RequestError(400, "Content-Length is not a number")
        if int(declared) > limit:
            raise RequestError(413, f"a body of {int(declared)} bytes; at most {limit} are read here: {what}")
    body = bytearray()
    async for chunk in chunks:
        body += chunk
        if len(body) > limit:
            raise RequestError(413, f"a body of more than {limit} bytes; at most {limit} are read here: {what}")
    return bytes(body)


def check_token(header: str | None, environ: Mapping[str, str] | None = None) -> None:
    """``Authorization: Bearer <DICOMOPS_SERVE_TOKEN>``; compared in constant time."""
    expected = (os.environ if environ is None else environ).get(TOKEN_ENV, "")
    if not expected:
        raise RequestError(503, f"the service has no token configured; set {TOKEN_ENV} where it runs")
    scheme, _, given = (header or "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), expected.encode()):
        raise RequestError(401, f"missing or wrong token: send 'Authorization: Bearer <{TOKEN_ENV}>'")


class BatchedEngine:
    """The engine as the prediction path sees it, each slab submitted to the serving engine's
    dynamic batcher on its event loop; called from worker threads."""

    def __init__(self, engine: Engine, loop: asyncio.AbstractEventLoop,
                 score: Callable[[np.ndarray], Awaitable[float]]) -> None:
        self.inner, self.loop, self.score = engine, loop, score
        self.choice, self.contract = engine.choice, engine.contract

    def probabilities(self, slabs: np.ndarray) -> np.ndarray:
        x = self.inner.check(slabs)
        futures: list[concurrent.futures.Future[float]] = [
            asyncio.run_coroutine_threadsafe(self.score(s), self.loop) for s in x]  # type: ignore[arg-type]
        return np.array([f.result() for f in futures], dtype=np.float64)


@dataclass
class ServiceOptions:
    model_name: str
    alias: str | None
    version: str | None
    engine: str
    threads: int
    work: Path
    staging: Path
    ingest: Any  # IngestConfig
    key: bytes
    tracking_uri: str
    pacs_url: str | None
    cache_ttl_s: int
    http_budget_s: float = 120.0
    segmenter_name: str | None = None  # its champion's nodules and SEG join what is written back
    write_seg: bool = True  # serve.write_seg: the segmenter's SEG with its SR
    feedback: Any = None  # FeedbackConfig: who may review results at /v1/feedback
    use_cache: bool = True  # False (dicomops online --no-redis): no cache, whatever DICOMOPS_REDIS_URL says


def _reviewers(cfg: Any) -> tuple[Any, str]:
    """The configured reviewers and their tokens (DICOMOPS_REVIEWER_TOKENS), or None and why not.
    A mistake there turns reviews off with its reason; it never stops the scoring."""
    from dicomops.config import FeedbackConfig, load_settings
    from dicomops.feedback.store import Reviewers

    cfg = cfg or FeedbackConfig()
    tokens = load_settings().reviewer_tokens
    if not cfg.reviewers or tokens is None:
        return None, "no reviewers configured (feedback.reviewers and DICOMOPS_REVIEWER_TOKENS)"
    try:
        return Reviewers.from_config(cfg, tokens.get_secret_value()), ""
    except ValueError as err:
        log.error("online service: reviews are off: %s", err)
        return None, str(err)


class Service:
    """One replica's state: the loaded version, the cache, the PACS client."""

    def __init__(self, options: ServiceOptions) -> None:
        from dicomops.layout import WorkLayout
        from dicomops.pacs.client import PacsClient
        from dicomops.serving.cache import VolumeCache
        from dicomops.serving.champion import load_champion
        from dicomops.serving.segmenter import with_segmenter

        self.options = options
        self.champion: Champion = with_segmenter(
            load_champion(options.tracking_uri, options.model_name, options.alias, options.version,
                          options.engine, WorkLayout(options.work).serving, options.threads),  # type: ignore[arg-type]
            options.tracking_uri, options.segmenter_name, WorkLayout(options.work).serving, options.threads,
            options.write_seg)
        self.cache = VolumeCache.from_env(ttl_s=options.cache_ttl_s) if options.use_cache else None
        self.pacs: Any = None
        try:
            self.pacs = PacsClient.from_env(options.http_budget_s, url=options.pacs_url)
        except ValueError as err:  # no PACS credentials: slabs only
            log.warning("online service: no PACS (%s); /v1/studies answers 503", err)
        self.scratch = WorkLayout(options.work).serving / "scratch"
        self.requests = {"studies": 0, "slabs": 0, "feedback": 0, "errors": 0}
        # What /metrics says of the engine's batches: a count and a sum, not one entry per batch.
        self.engine_batches, self.engine_slabs = 0, 0
        self.reviewers, self.reviewers_error = _reviewers(options.feedback)

    # -- requests ---------------------------------------------------------------------------------
    def answer_study(self, body: Any, batched: Any) -> dict[str, Any]:
        """A study reference → its findings. Blocking: run it in a worker thread."""
        from dicomops.deid.keys import KeyedMapper
        from dicomops.pacs.client import PacsError, PacsRequestRefused
        from dicomops.pacs.staging import StudyBusyError
        from dicomops.pacs.watch import record_answered
        from dicomops.serving.batch import record
        from dicomops.serving.predict import answer_pacs_study, by_step, said_failures

        if not isinstance(body, dict) or not isinstance(body.get("study_instance_uid"), str) \
                or not UID.fullmatch(body["study_instance_uid"]) or len(body["study_instance_uid"]) > 64:
            raise RequestError(400, STUDY_BODY)
        write_back = body.get("write_back", False)
        if not isinstance(write_back, bool):
            raise RequestError(400, "write_back must be true or false")
        if self.pacs is None:
            raise RequestError(503, "this service has no PACS configured (DICOMOPS_PACS_URL, DICOMOPS_PACS_USER, "
                                    "DICOMOPS_PACS_PASSWORD); send slabs to /v1/slabs instead")
        study_uid = body["study_instance_uid"]
        champion = dataclasses.replace(self.champion, engine=batched)
        try:
            images = self.pacs.image_instances(study_uid)
            if not images:
                raise RequestError(404, "the PACS holds no image of that study; check the StudyInstanceUID")
            answer = answer_pacs_study(study_uid, self.pacs, self.options.staging, self.scratch, self.options.ingest,
                                       self.options.key, champion, self.cache, write_back=write_back,
                                       images=images, wait_s=BUSY_WAIT_S,  # pacs-watch then leaves it
                                       answered=lambda a: record_answered(self.options.work, a, "the online service"))
            mapper = KeyedMapper(self.options.key)
            originals = {mapper.uid(u): u for u in set(images.values())}
        except PacsRequestRefused as err:  # the same answer however often it is asked: not to be retried
            raise RequestError(422, f"the study cannot be retrieved as the PACS holds it, and nothing was written "
                                    f"back: {err}") from None
        except PacsError as err:
            raise RequestError(503, f"the PACS did not answer: {err}") from None
        except StudyBusyError as err:  # another request, pacs-watch or a batch is answering it now
            log.warning("online service: %s", err)
            raise RequestError(503, "the study is being answered by another request, pacs-watch or a batch; ask "
                                    f"again in a minute (waited {BUSY_WAIT_S:.0f} s)", retry_after=60) from None
        # For the caller only, by the original UIDs it knows the series by: neither logged nor recorded.
        failed = [{"series_instance_uid": originals.get(f.series), "reason": f.reason} for f in answer.failed_series]
        if answer.status != "scored":
            raise RequestError(422, f"the study was {answer.status} and nothing was written back: {answer.reason}",
                               extra={"failed_series": failed} if failed else None)
        # De-identified, as the batch flow keeps its results: what a reader's review is linked to.
        record(self.options.work, f"online-{answer.study}", [answer], self.champion, None)
        warnings = [answer.reason]  # the PACS did not keep every result
        not_scored, unwritten, unlocalised = by_step(answer.failed_series)
        if not_scored:
            warnings.append(f"{len(not_scored)} of its {answer.accepted_series} series could not be scored "
                            f"({said_failures(not_scored)}): failed_series names them, and nothing was "
                            "written back for them")
        if unwritten:
            warnings.append(f"the classifier's SR could not be written for {len(unwritten)} of its "
                            f"{answer.accepted_series} series ({said_failures(unwritten)}): failed_series names "
                            "them; they were scored, and nothing was written back for them")
        if unlocalised:
            warnings.append(f"the segmenter failed on {len(unlocalised)} of its {answer.accepted_series} series "
                            f"({said_failures(unlocalised)}): failed_series names them; their classifier's SR was "
                            "written back, none of the segmenter's objects")
        warning = "; ".join(filter(None, warnings))
        return {"status": "partly_scored" if failed else "scored", "warm": answer.warm,
                "accepted_series": answer.accepted_series, "quarantined_files": answer.quarantined_files,
                "results_stored": answer.results_stored, **({"warning": warning} if warning else {}),
                "model": self.champion.describe(),
                "series": [{"series_instance_uid": originals.get(f.series), "slices": f.slices,
                            "score": f.score, "present": f.present, "best_slice": f.best_z, "cache": f.cache}
                           for f in answer.findings],
                "failed_series": failed,
                "timings_s": {k: round(v, 4) for k, v in answer.timings.items()}}

    def review(self, body: Any, authorization: str | None) -> dict[str, Any]:
        """A configured reader's accept / reject / correction of a result this service gave."""
        from dicomops.feedback.review import ReviewError, submit

        if self.reviewers is None:
            raise RequestError(503, f"reviews are off here: {self.reviewers_error}")
        scheme, _, bearer = (authorization or "").partition(" ")
        try:
            return submit(body, bearer.strip() if scheme.lower() == "bearer" else "", self.reviewers,
                          self.options.work, self.options.key)
        except ReviewError as err:
            raise RequestError(err.status, err.message) from None

    @property
    def slab_bytes(self) -> int:
        """The largest /v1/slabs body read: MAX_SLABS slabs of the model's input, float32, as .npy."""
        return MAX_SLABS * 4 * int(np.prod(self.champion.contract.input_shape)) + NPY_HEADER_BYTES

    def parse_slabs(self, raw: bytes) -> np.ndarray:
        try:
            x = np.load(io.BytesIO(raw), allow_pickle=False)
        except Exception:
            raise RequestError(400, "send the slabs as one .npy array (numpy.save), float32, "
                                    "shape (N, C, H, W)") from None
        if x.ndim not in (3, 4):
            raise RequestError(400, f"an array of {x.ndim} dimensions: send slabs of shape (N, C, H, W), "
                                    "or one slab (C, H, W)")
        if x.ndim == 3:
            x = x[None]
        if len(x) > MAX_SLABS:
            raise RequestError(413, f"at most {MAX_SLABS} slabs per request")
        try:
            return self.champion.engine.check(x)
        except ValueError as err:
            raise RequestError(400, str(err)) from None

    def whole_series(self, value: str | None) -> bool:
        """The /v1/slabs query's ``whole_series``: true when the body is every slab of one series."""
        if value is None or value.lower() in ("false", "0"):
            return False
        if value.lower() in ("true", "1"):
            return True
        raise RequestError(400, "whole_series is true (the slabs are every slab of one series: its score and "
                                "finding come back too) or false (the slabs' probabilities only)")

    def check_series_length(self, slabs: np.ndarray, whole_series: bool) -> None:
        """A whole series has at least as many slabs as its rule reads: a 400 before any is scored."""
        top_k = self.champion.rule.top_k
        if whole_series and len(slabs) < top_k:
            raise RequestError(400, f"{len(slabs)} slabs cannot be a whole series: the series rule reads its "
                                    f"{top_k} highest; send every slab of the series, or leave out whole_series")

    def slabs_answer(self, probabilities: np.ndarray, whole_series: bool = False) -> dict[str, Any]:
        """The answer to /v1/slabs, or a 400 when the model gave no probability for some slab: finite
        values far outside its input range (3e38, say) overflow inside it. Only this request is
        refused: the model scores each slab on its own, so the other requests' slabs that shared its
        engine batch keep their probabilities. With `whole_series`, the series' score by the
        champion's rule and its finding at the champion's threshold (:meth:`check_series_length`
        has checked that there are enough slabs)."""
        from dicomops.training.scoring import series_score

        bad = np.flatnonzero(~np.isfinite(probabilities))
        if bad.size:
            c = self.champion.contract
            raise RequestError(400, f"the model gives no probability for {bad.size} of the {len(probabilities)} "
                                    f"slabs (the first: slab {bad[0]}): their values are outside what it takes; "
                                    f"send slabs preprocessed as its input contract says ({c.window} window, "
                                    f"values in [{c.value_range[0]:g}, {c.value_range[1]:g}])")
        out: dict[str, Any] = {"probabilities": [float(p) for p in probabilities], "model": self.champion.describe()}
        if whole_series:
            score = series_score(probabilities, self.champion.rule)
            out |= {"series_score": score, "present": bool(score >= self.champion.threshold)}
        else:
            out["series"] = "not scored: send every slab of one series with ?whole_series=true for its score and finding"
        return out

    def ready(self) -> dict[str, Any]:
        """What /readyz reports: the model, the engine, the cache and the PACS. Blocking (the cache
        pings Redis, up to its timeout when Redis hangs): run it in a worker thread."""
        cache = "off"
        if self.cache is not None:
            cache = "up" if self.cache.ping() else "down (recomputing)"
        return {"ready": True, "model": self.champion.describe(), "cache": cache,
                "pacs": "configured" if self.pacs is not None else "none"}

    def metrics(self) -> dict[str, float]:
        """What /metrics reports. Blocking (the cache asks Redis): run it in a worker thread."""
        out: dict[str, float] = {f"requests.{k}": float(v) for k, v in self.requests.items()}
        if self.engine_batches:
            out |= {"engine.batches": float(self.engine_batches),
                    "engine.mean_batch_size": self.engine_slabs / self.engine_batches}
        if self.cache is not None:
            out |= self.cache.metrics()
        return out

    def score_batch_sync(self, slabs: list[np.ndarray]) -> list[float]:
        """The engine call the batcher makes: one array of every slab it gathered."""
        t0 = time.perf_counter()
        self.engine_batches += 1
        self.engine_slabs += len(slabs)
        probs = self.champion.engine.probabilities(np.stack(slabs))
        log.debug("engine batch of %d in %.1f ms", len(slabs), 1000 * (time.perf_counter() - t0))
        return [float(p) for p in probs]
