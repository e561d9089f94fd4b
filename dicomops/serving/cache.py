"""Preprocessed volumes in Redis, for the studies that are asked for again.

Keys are the preprocessing stage's own :func:`dicomops.preprocessing.stage.cache_key`: the hash of
the series' de-identified files (the gate's per-file sha256), the settings that change a volume and
the preprocessing code. A changed file, setting or line of code is a new key; nothing is ever
invalidated by hand. A second kind of entry, the *study manifest*, maps a keyed digest of a study's
instance list to its series' keys and the gate's verdict, so a repeated request finds its volumes
without retrieving or gating the study again. No entry holds an identifier: keys are hashes, values
are pixels and pseudonyms.

Values are the volume exactly as preprocessing stored it (float16, so a hit is bit-identical to a
recomputation), zstd-compressed, behind a header with the shape, dtype and the sha256 of the raw
bytes. Redis holds them under its own memory cap with LRU eviction (see
:func:`dicomops.serving.redis_server.config`) and each entry has a TTL.

The cache is an accelerator, never a dependency: Redis down, slow or holding a corrupt entry, the
caller recomputes and keeps answering. Each failure is logged (an outage once, not per request),
counted, and Redis is left alone for a few seconds so requests do not each wait for its timeout.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

URL_ENV, PASSWORD_ENV = "DICOMOPS_REDIS_URL", "DICOMOPS_REDIS_PASSWORD"
MAGIC = b"DOV1"
PREFIX = "dicomops:"


class CorruptEntry(ValueError):
    """A value that does not decode to what its header says."""


def encode(array: np.ndarray, level: int = 3) -> bytes:
    import zstandard

    raw = np.ascontiguousarray(array)
    header = json.dumps({"dtype": raw.dtype.str, "shape": list(raw.shape),
                         "sha256": hashlib.sha256(raw.tobytes()).hexdigest()}).encode()
    return MAGIC + struct.pack(">I", len(header)) + header + zstandard.ZstdCompressor(level=level).compress(raw.tobytes())


def decode(blob: bytes) -> np.ndarray:
    import zstandard

    try:
        if blob[:4] != MAGIC:
            raise CorruptEntry("not a dicomops volume entry")
        (n,) = struct.unpack(">I", blob[4:8])
        header = json.loads(blob[8:8 + n])
        raw = zstandard.ZstdDecompressor().decompress(blob[8 + n:])
    except CorruptEntry:
        raise
    except Exception as err:
        raise CorruptEntry(f"undecodable entry ({type(err).__name__})") from err
    if hashlib.sha256(raw).hexdigest() != header.get("sha256"):
        raise CorruptEntry("checksum mismatch")
    return np.frombuffer(raw, dtype=np.dtype(header["dtype"])).reshape(header["shape"]).copy()


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    errors: int = 0  # Redis unreachable or failing: the caller recomputed
    corrupt: int = 0  # an entry that did not decode: deleted, the caller recomputed
    bytes_read: int = 0
    bytes_written: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, **counts: int) -> None:
        with self.lock:
            for name, n in counts.items():
                setattr(self, name, getattr(self, name) + n)

    def as_dict(self) -> dict[str, float]:
        with self.lock:
            out: dict[str, float] = {k: getattr(self, k) for k in
                                     ("hits", "misses", "errors", "corrupt", "bytes_read", "bytes_written")}
        lookups = out["hits"] + out["misses"]
        out["hit_ratio"] = out["hits"] / lookups if lookups else 0.0
        return out


class VolumeCache:
    """Volumes and study manifests in one Redis database. `url` has no password: it comes from
    ``DICOMOPS_REDIS_PASSWORD`` (or `password`)."""

    def __init__(self, url: str, password: str | None = None, ttl_s: int = 7 * 24 * 3600,
                 timeout_s: float = 1.0, backoff_s: float = 5.0) -> None:
        import redis

        self.url, self.ttl_s, self.backoff_s = url, ttl_s, backoff_s
        password = password if password is not None else os.environ.get(PASSWORD_ENV)
        self.client = redis.Redis.from_url(url, password=password or None, socket_timeout=timeout_s,
                                           socket_connect_timeout=timeout_s)
        self.stats = CacheStats()
        self._down_until = 0.0
        self._state_lock = threading.Lock()

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **kwargs: Any) -> VolumeCache | None:
        """The cache at ``DICOMOPS_REDIS_URL``, or None (no cache) when it is not set."""
        env = os.environ if environ is None else environ
        url = env.get(URL_ENV)
        return cls(url, env.get(PASSWORD_ENV), **kwargs) if url else None

    # -- failure handling -------------------------------------------------------------------------
    def _available(self) -> bool:
        return time.monotonic() >= self._down_until

    def _failed(self, what: str, err: Exception) -> None:
        self.stats.add(errors=1)
        with self._state_lock:
            was_up = self._down_until <= time.monotonic()
            self._down_until = time.monotonic() + self.backoff_s
        if was_up:
            log.warning("redis cache: %s failed (%s: %s); recomputing, and not asking Redis again for %.0f s",
                        what, type(err).__name__, err, self.backoff_s)

    def _call(self, what: str, fn: Any, *args: Any) -> Any:
        if not self._available():
            self.stats.add(errors=1)
            return None
        try:
            return fn(*args)
        except Exception as err:  # redis.RedisError, OSError, timeouts: all mean "no cache now"
            self._failed(what, err)
            return None

    # -- volumes ----------------------------------------------------------------------------------
    def get_volume(self, key: str) -> np.ndarray | None:
        blob = self._call("GET", self.client.get, PREFIX + "volume:" + key)
        if blob is None:
            self.stats.add(misses=1)
            return None
        try:
            array = decode(blob)
        except CorruptEntry as err:
            log.warning("redis cache: entry %s is corrupt (%s); deleted, recomputing", key[:12], err)
            self.stats.add(corrupt=1, misses=1)
            self._call("DEL", self.client.delete, PREFIX + "volume:" + key)
            return None
        self.stats.add(hits=1, bytes_read=len(blob))
        return array

    def put_volume(self, key: str, array: np.ndarray) -> None:
        blob = encode(array)
        if self._call("SET", self.client.set, PREFIX + "volume:" + key, blob, self.ttl_s) is not None:
            self.stats.add(bytes_written=len(blob))

    # -- study manifests --------------------------------------------------------------------------
    def get_manifest(self, digest: str) -> dict[str, Any] | None:
        blob = self._call("GET", self.client.get, PREFIX + "study:" + digest)
        if blob is None:
            return None
        try:
            value = json.loads(blob)
            if not isinstance(value, dict) or "series" not in value:
                raise ValueError("no series")
            return value
        except ValueError:
            self.stats.add(corrupt=1)
            self._call("DEL", self.client.delete, PREFIX + "study:" + digest)
            return None

    def put_manifest(self, digest: str, manifest: Mapping[str, Any]) -> None:
        self._call("SET", self.client.set, PREFIX + "study:" + digest, json.dumps(manifest), self.ttl_s)

    # -- what the metrics show --------------------------------------------------------------------
    def metrics(self) -> dict[str, float]:
        """Client-side counts and, when Redis answers, its evictions and memory."""
        out = {f"cache.{k}": v for k, v in self.stats.as_dict().items()}
        info = self._call("INFO", self.client.info) if self._available() else None
        if info:
            out |= {"cache.evicted_keys": float(info.get("evicted_keys", 0)),
                    "cache.used_memory_bytes": float(info.get("used_memory", 0)),
                    "cache.maxmemory_bytes": float(info.get("maxmemory", 0))}
        return out

    def ping(self) -> bool:
        return bool(self._call("PING", self.client.ping))

    def close(self) -> None:
        self.client.close()
