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


def port_free(port: int, bind: str = "127.0.0.1") -> bool:
    """Whether `port` can be bound on `bind` as redis-server binds it (a connection in TIME_WAIT is no
    conflict: servers bind with ``SO_REUSEADDR``)."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((bind, port))
        except OSError:
            return False
    return True


def start(port: int, password: str, maxmemory_mb: int = 1024, bind: str = "127.0.0.1",
          timeout_s: float = 15.0, workdir: Path | None = None) -> RedisServer:
    """Start ``redis-server`` and wait until it answers our password on `port`.

    A port another process holds is refused before anything starts: redis-server would exit with
    "Address already in use" while the other process went on accepting connections, and a client
    would then send the password and the cache's data to it. For the same reason the server counts
    as started only once this process is still running and answers AUTH and PING.
    """
    binary = shutil.which("redis-server")
    if binary is None:
        raise FileNotFoundError("redis-server is not installed: apt-get install redis-server, or name a Redis "
                                "that runs elsewhere in DICOMOPS_REDIS_URL")
    text = config(port, password, maxmemory_mb, bind, workdir)
    if not port_free(port, bind):
        raise RuntimeError(f"port {port} on {bind} is in use by another process (another Redis?): choose another "
                           "port for the cache")
    # Its log goes to an unnamed temporary file: a pipe nobody reads could fill and stall Redis.
    log = tempfile.TemporaryFile()  # noqa: SIM115 (lives as long as the server; closed by stop)
    process = subprocess.Popen([binary, "-"], stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT,
                               cwd=workdir, start_new_session=True)
    assert process.stdin is not None
    process.stdin.write(text.encode())
    process.stdin.close()
    server = RedisServer(process, port, bind, log)
    try:
        _wait_answering(server, password, timeout_s)
    except BaseException:  # a Ctrl-C or a stop signal too: no Redis is left behind
        server.stop()
        raise
    return server


def _wait_answering(server: RedisServer, password: str, timeout_s: float) -> None:
    """Return once `server`'s own process answers AUTH and PING; raise saying why not."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"redis-server exited with {server.process.returncode}: {_log_tail(server, password)}")
        # Still running after the answer: an answer from another process on the port does not count.
        if _answers(server.bind, server.port, password) and server.process.poll() is None:
            return
        time.sleep(0.05)
    raise TimeoutError(f"redis-server on {server.bind}:{server.port} did not answer AUTH and PING within "
                       f"{timeout_s:.0f} s: {_log_tail(server, password)}")


def _answers(bind: str, port: int, password: str) -> bool:
    """Whether a Redis on `bind`:`port` accepts `password` and answers PING."""
    import redis

    client = redis.Redis(host=bind, port=port, password=password, socket_timeout=0.5, socket_connect_timeout=0.2)
    try:
        return bool(client.ping())
    except (redis.RedisError, OSError):
        return False
    finally:
        client.close()


def _log_tail(server: RedisServer, password: str) -> str:
    """The end of `server`'s log, its password masked."""
    if server.log is None:
        return ""
    server.log.seek(0)
    return server.log.read().decode(errors="replace").replace(password, "***").strip()[-500:]
