"""A real Orthanc (Debian's ``orthanc`` and ``orthanc-dicomweb``) on a free loopback port, with its
storage in tmp and a password from the test's environment, for tests that import its fixtures::

    from .orthanc_fixture import orthanc  # noqa: F401  (a fixture: pytest finds it by name)

Also: a small synthetic CT study, and a proxy that cuts an answer off mid-transfer (an outage).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from dicomops.pacs.client import PASSWORD_ENV, USER_ENV, PacsCredentials, credentials_from_env
from dicomops.pacs.orthanc import DICOMWEB_PLUGIN, OrthancProcess, start_orthanc
from dicomops.synthetic.corpus import SeriesPlan, write_series

from .conftest import free_port

STABLE_AGE_S = 1


def pacs_credentials() -> PacsCredentials:
    """DICOMOPS_PACS_USER / DICOMOPS_PACS_PASSWORD of the test's environment, else a throwaway pair."""
    env = {USER_ENV: os.environ.get(USER_ENV) or "integration",
           PASSWORD_ENV: os.environ.get(PASSWORD_ENV) or secrets.token_urlsafe(18)}
    return credentials_from_env(env)


def require_orthanc() -> None:
    if shutil.which("Orthanc") is None or not DICOMWEB_PLUGIN.is_file():
        pytest.skip("Orthanc or its DICOMweb plugin is not installed (make integration installs the Debian "
                    "packages orthanc and orthanc-dicomweb)")


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancProcess]:
    """One Orthanc for the module: StableAge 1 s, DICOM off, auth on, loopback only."""
    require_orthanc()
    with start_orthanc(tmp_path_factory.mktemp("orthanc") / "pacs", free_port(), pacs_credentials(),
                       stable_age_s=STABLE_AGE_S) as server:
        yield server


def synthetic_study(out: Path, slices: int = 4, matrix: int = 64, index: int = 1, vendor: str = "philips") -> list[Path]:
    """One synthetic CT series (a study of its own, fake PHI) of `slices` files under `out`; Philips
    writes RLE Lossless, so the PACS stores compressed pixels."""
    plan = SeriesPlan(index=index, seed=17, scenario="baseline", vendor=vendor, label=0, nodule_count=0,
                      fault=None, fault_detail="", matrix=matrix, slices=slices)
    write_series(plan, out)
    return sorted(p for p in (out / plan.case / "series-1").iterdir() if p.is_file())


@contextlib.contextmanager
def pacs_start(args: list[str], env: dict[str, str], port: int, credentials: PacsCredentials,
               timeout_s: float = 60) -> Iterator[subprocess.Popen]:
    """``dicomops pacs start --port PORT *args`` as a child, yielded once its Orthanc answers
    ``/system`` (or the child exited, or `timeout_s` passed: the caller's next request says why);
    killed on leaving the block if it still runs. :func:`stop_by_sigterm` ends it as an operator would."""
    import sys

    import requests

    from .conftest import ROOT

    proc = subprocess.Popen([sys.executable, "-m", "dicomops.cli", "pacs", "start", "--port", str(port), *args],
                            env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if requests.get(f"http://127.0.0.1:{port}/system", auth=(credentials.user, credentials.password),
                                timeout=2).ok:
                    break
            except requests.ConnectionError:
                time.sleep(0.2)
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def stop_by_sigterm(proc: subprocess.Popen) -> str:
    """SIGTERM to a :func:`pacs_start` child, once it has printed its addresses; all it printed."""
    import signal

    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=30)
    return str(output)


@dataclass
class CuttingProxy:
    """A loopback TCP proxy to `port` that relays answers until `cut_after` bytes of the answer that
    holds `marker` (by default a multipart, WADO-RS, answer) have passed, then calls `on_cut` (e.g.
    kill the server) and drops the connection. With `on_post`, the answer cut is the one to a POST
    instead (a STOW-RS: the PACS answers once it has kept what it received, and no marker in its
    bytes tells it from a QIDO-RS answer)."""

    port: int
    cut_after: int
    on_cut: Callable[[], None]
    marker: bytes = b"multipart/related"
    on_post: bool = False

    def __post_init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self.cut = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self._listener.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        upstream = socket.create_connection(("127.0.0.1", self.port))
        posted = threading.Event()  # this connection's request is a POST
        threading.Thread(target=self._pipe, args=(client, upstream, posted), daemon=True).start()
        relayed: int | None = None  # bytes of the answer to cut relayed so far
        try:
            while data := upstream.recv(4096):
                if relayed is None and (posted.is_set() if self.on_post else self.marker in data):
                    relayed = 0
                if relayed is not None and relayed + len(data) >= self.cut_after:
                    client.sendall(data[: self.cut_after - relayed])
                    self.on_cut()
                    self.cut.set()
                    return
                client.sendall(data)
                if relayed is not None:
                    relayed += len(data)
        except OSError:
            pass
        finally:
            for sock in (client, upstream):  # shutdown first: the other thread's recv holds the socket open
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket, posted: threading.Event) -> None:
        try:
            while data := src.recv(4096):
                if data.startswith(b"POST "):
                    posted.set()
                dst.sendall(data)
        except OSError:
            pass
