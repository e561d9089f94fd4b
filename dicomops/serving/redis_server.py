"""A Redis for the cache: Debian's ``redis-server`` on loopback, password on, memory capped with LRU
eviction, nothing written to disk (a cache needs no persistence). The configuration, password
included, goes in on stdin (``redis-server -``), so it never shows in the process list or a file.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO


def config(port: int, password: str, maxmemory_mb: int, bind: str = "127.0.0.1", workdir: Path | None = None) -> str:
    if not password:
        raise ValueError("the cache's Redis needs a password: set DICOMOPS_REDIS_PASSWORD")
    if any(c in password for c in '"\\\n\r '):
        raise ValueError("DICOMOPS_REDIS_PASSWORD must not contain a quote, backslash, space or newline")
    lines = [f"bind {bind}", f"port {port}", "protected-mode yes", f'requirepass "{password}"',
             f"maxmemory {maxmemory_mb}mb", "maxmemory-policy allkeys-lru", 'save ""', "appendonly no",
             "loglevel warning", "logfile \"\""]
    if workdir is not None:
        lines.append(f'dir "{workdir}"')
    return "\n".join(lines) + "\n"


@dataclass
class RedisServer:
    process: subprocess.Popen[bytes]
    port: int
    bind: str
    log: IO[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{self.bind}:{self.port}/0"

    def stop(self, timeout: float = 10.0) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.log is not None:
            self.log.close()


def start(port: int, password: str, maxmemory_mb: int = 1024, bind: str = "127.0.0.1",
          timeout_s: float = 15.0, workdir: Path | None = None) -> RedisServer:
    """Start ``redis-server`` and wait until it answers on `port`."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise FileNotFoundError("redis-server is not installed; apt-get install redis-server (or run without "
                                "the cache: leave DICOMOPS_REDIS_URL unset)")
    text = config(port, password, maxmemory_mb, bind, workdir)
    # Its log goes to an unnamed temporary file: a pipe nobody reads could fill and stall Redis.
    log = tempfile.TemporaryFile()  # noqa: SIM115 (lives as long as the server; closed by stop)
    process = subprocess.Popen([binary, "-"], stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT,
                               cwd=workdir, start_new_session=True)
    assert process.stdin is not None
    process.stdin.write(text.encode())
    process.stdin.close()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            log.seek(0)
            err = log.read().decode(errors="replace").replace(password, "***")
            raise RuntimeError(f"redis-server exited with {process.returncode}: {err.strip()[-500:]}")
        try:
            with socket.create_connection((bind, port), timeout=0.2):
                return RedisServer(process, port, bind, log)
        except OSError:
            time.sleep(0.05)
    process.kill()
    raise TimeoutError(f"redis-server did not listen on {bind}:{port} within {timeout_s:.0f} s")
