"""A local Orthanc PACS with its DICOMweb plugin, for one machine, development and the tests.

The configuration is rendered from ``infra/orthanc/orthanc.json``, the template the Docker Compose
service also mounts, with this machine's values put in: the storage folder, the HTTP port, the users
(from DICOMOPS_PACS_USER / DICOMOPS_PACS_PASSWORD; there is no default password), StableAge, and
the DICOMweb plugin of the Debian package ``orthanc-dicomweb``. With an :class:`OrthancIndex`,
Orthanc keeps its index (patients, studies, series, instances, the changes feed) in PostgreSQL
through the plugin of the Debian package ``orthanc-postgresql`` instead of a SQLite file beside the
DICOM files: what a site whose PACS outgrows one machine runs (the Compose stack does).

Network exposure with Orthanc 1.10 (the Debian version), which has no option to choose the address
it binds:

- HTTP listens on every interface. ``RemoteAccessAllowed: false`` makes it refuse every client that
  is not on loopback (HTTP 401 even with the right password), and ``AuthenticationEnabled: true``
  asks loopback clients for the password too.
- The DICOM (DIMSE) port, when enabled, also listens on every interface, and has no password at
  all: by Orthanc's defaults any host that reaches it may C-ECHO and C-STORE, so anyone on the
  network could add studies. It is off unless asked for (``dicom_port``); turn it on only behind a
  host firewall that admits the modalities alone.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from dicomops.pacs.client import (
    _UNSAFE_IN_CONFIG,
    DICOMWEB_ROOT,
    PacsAuthError,
    PacsCredentials,
    PacsError,
    basic_auth_session,
    translate_errors,
)

TEMPLATE = Path(__file__).resolve().parents[2] / "infra" / "orthanc" / "orthanc.json"
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
INDEX_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancPostgreSQLIndex.so")
INDEX_PASSWORD_ENV = "DICOMOPS_PACS_INDEX_PASSWORD"
ORTHANC_EXECUTABLE = "Orthanc"
DEFAULT_STABLE_AGE_S = 10
LOOPBACK = "127.0.0.1"
# Inside the storage folder: Orthanc's database and files, its rendered configuration, its log.
DB, CONFIG, LOG = "db", "orthanc.json", "orthanc.log"


@dataclass(frozen=True)
class OrthancIndex:
    """Where Orthanc keeps its index in PostgreSQL: a database of its own (Orthanc creates its tables
    and locks the database against a second Orthanc); the DICOM files stay in the storage folder."""

    host: str
    port: int
    database: str
    user: str
    password: str = field(repr=False)

    def __post_init__(self) -> None:
        if not 1 <= self.port <= 65535:
            raise ValueError(f"the index's port must be a TCP port, 1-65535 (got {self.port})")
        for name, value in (("host", self.host), ("database", self.database), ("user", self.user),
                            ("password", self.password)):
            if not value:
                raise ValueError(f"the PACS index needs a {name}" + (f": set {INDEX_PASSWORD_ENV}"
                                                                     if name == "password" else ""))
            if _UNSAFE_IN_CONFIG.search(value):  # Orthanc expands ${...} in its configuration as text
                raise ValueError(f"the PACS index's {name} must not contain a control character, '\"', '\\' "
                                 "or '${': Orthanc would rewrite or misparse it")

    @classmethod
    def from_url(cls, url: str, password: str | None) -> OrthancIndex:
        """``postgresql://USER@HOST:PORT/DATABASE``; the password comes apart (an environment
        variable), never in the URL, which a process list or a shell history would show."""
        from urllib.parse import urlsplit

        parts = urlsplit(url)
        if parts.scheme not in ("postgresql", "postgres") or parts.password is not None \
                or not parts.path.strip("/") or not parts.hostname:
            shown = f"{parts.scheme}://{parts.hostname or ''}{parts.path}" if parts.scheme in ("postgresql", "postgres") \
                else "a URL of another scheme"  # 'user:password@host' parses as a scheme and a path
            raise ValueError(f"the PACS index must be postgresql://USER@HOST[:PORT]/DATABASE, without a password "
                             f"(set {INDEX_PASSWORD_ENV}); got {shown}")
        return cls(parts.hostname, parts.port or 5432, parts.path.strip("/"), parts.username or "orthanc",
                   password or "")

    def settings(self) -> dict[str, Any]:
        """The ``PostgreSQL`` section of Orthanc's configuration (its plugin's keys)."""
        return {"EnableIndex": True, "EnableStorage": False, "Host": self.host, "Port": self.port,
                "Database": self.database, "Username": self.user, "Password": self.password, "Lock": True,
                "MaximumConnectionRetries": 10, "ConnectionRetryInterval": 5}


def render_config(storage: Path, http_port: int, credentials: PacsCredentials, *,
                  stable_age_s: int = DEFAULT_STABLE_AGE_S, dicom_port: int | None = None,
                  template: Path = TEMPLATE, dicomweb_plugin: Path = DICOMWEB_PLUGIN,
                  index: OrthancIndex | None = None, index_plugin: Path = INDEX_PLUGIN) -> dict[str, Any]:
    """The Orthanc configuration for this machine: the template with storage, port, users, StableAge,
    the plugin and the network settings of this module's docstring put in.

    Args:
        storage: Orthanc's database and files go in ``storage/db``.
        http_port: HTTP port (REST API, DICOMweb below ``/dicom-web/``), answered on loopback only.
        stable_age_s: Seconds without a new instance before Orthanc reports a study as stable.
        dicom_port: Enable the DICOM server on this port; None (default) keeps it off. Read the
            module's docstring first: Orthanc 1.10 binds it on every interface, without a password.
        index: keep Orthanc's index in this PostgreSQL database (None: a SQLite file in ``storage/db``).

    Raises:
        ValueError: a bad argument, or a template that is not an Orthanc JSON object.
    """
    for name, port in (("http_port", http_port), ("dicom_port", dicom_port)):
        if port is not None and not 1 <= port <= 65535:
            raise ValueError(f"{name} must be a TCP port, 1-65535 (got {port})")
    if dicom_port is not None and dicom_port == http_port:
        raise ValueError(f"dicom_port and http_port must differ (both {http_port})")
    if stable_age_s < 1:
        raise ValueError(f"stable_age_s must be at least 1 second (got {stable_age_s})")
    if "${" in str(storage):
        raise ValueError(f"the storage folder {storage} must not contain '${{': Orthanc would expand it")
    try:
        config = json.loads(Path(template).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot read the Orthanc configuration template {template}: {err}") from err
    if not isinstance(config, dict):
        raise ValueError(f"the Orthanc configuration template {template} must hold a JSON object")
    config = copy.deepcopy(config)
    db = str(Path(storage).absolute() / DB)
    config.update({
        "StorageDirectory": db,
        "IndexDirectory": db,
        "HttpPort": int(http_port),
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": True,
        "RegisteredUsers": {credentials.user: credentials.password},
        "DicomServerEnabled": dicom_port is not None,
        "StableAge": int(stable_age_s),
        "Plugins": [str(dicomweb_plugin)],
        "DicomWeb": {**config.get("DicomWeb", {}), "Enable": True, "Root": DICOMWEB_ROOT},
    })
    if dicom_port is not None:
        config["DicomPort"] = int(dicom_port)
    if index is not None:
        config["Plugins"].append(str(index_plugin))
        config["PostgreSQL"] = index.settings()
    return config


def write_config(config: Mapping[str, Any], path: Path) -> Path:
    """Write `config` to `path` readable by its owner alone (mode 0600: it holds the password),
    atomically (temp file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)  # created 0600
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(config, handle, indent=2)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


@dataclass
class OrthancProcess:
    """A running Orthanc child process (leader of its own process group) and where to reach it."""

    process: subprocess.Popen[bytes]
    storage: Path
    http_port: int
    credentials: PacsCredentials = field(repr=False)
    log_offset: int = 0  # where this run's lines start in the log (it is appended to)

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        return self.url + DICOMWEB_ROOT

    @property
    def config(self) -> Path:
        return self.storage / CONFIG

    @property
    def log(self) -> Path:
        return self.storage / LOG

    @property
    def data(self) -> Path:
        return self.storage / DB

    def log_tail(self, chars: int = 3000) -> str:
        with contextlib.suppress(OSError):
            return self.log.read_text(errors="replace")[-chars:]
        return ""

    def listening(self) -> bool:
        """Whether this run's log says its HTTP server listens (not some other server on the port)."""
        with contextlib.suppress(OSError), open(self.log, "rb") as handle:
            handle.seek(self.log_offset)
            return f"HTTP server listening on port: {self.http_port} ".encode() in handle.read()
        return False

    def wait_ready(self, timeout_s: float = 30.0) -> None:
        """Return once this Orthanc listens and ``/system`` answers with the configured credentials.

        Raises:
            RuntimeError: Orthanc exited, or refused the credentials; the message ends with its log.
            TimeoutError: no answer within `timeout_s`.
        """
        deadline = time.monotonic() + timeout_s
        with basic_auth_session(self.credentials, self.url) as session:
            while True:
                if self.process.poll() is not None:
                    raise RuntimeError(f"Orthanc exited with code {self.process.returncode} while starting; "
                                       f"the end of {self.log}:\n{self.log_tail()}")
                if self.listening():
                    try:
                        with translate_errors("starting Orthanc", self.url):
                            session.get(self.url + "/system", timeout=2).raise_for_status()
                        return
                    except PacsAuthError as err:
                        raise RuntimeError(f"{err}; the end of {self.log}:\n{self.log_tail()}") from None
                    except PacsError:
                        pass  # listening, not answering yet
                if time.monotonic() > deadline:
                    raise TimeoutError(f"Orthanc did not answer on {self.url} within {timeout_s:.0f} s; the end "
                                       f"of {self.log}:\n{self.log_tail()}")
                time.sleep(0.1)

    def stop(self, timeout_s: float = 15.0) -> None:
        """SIGTERM to the process group, then SIGKILL after `timeout_s` (Orthanc 1.10 takes seconds)."""
        for sig, wait_s in ((signal.SIGTERM, timeout_s), (signal.SIGKILL, 5.0)):
            if self.process.poll() is not None:
                return
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(wait_s)

    def kill(self) -> None:
        """SIGKILL at once, as a crash or an OOM kill would."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(5.0)


def _port_free(port: int) -> bool:
    """Whether `port` can be bound on every interface, as Orthanc 1.10 binds it."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers do: TIME_WAIT is no conflict
        try:
            probe.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


@contextlib.contextmanager
def start_orthanc(storage: Path, http_port: int, credentials: PacsCredentials, *,
                  stable_age_s: int = DEFAULT_STABLE_AGE_S, dicom_port: int | None = None,
                  template: Path = TEMPLATE, dicomweb_plugin: Path = DICOMWEB_PLUGIN,
                  index: OrthancIndex | None = None, index_plugin: Path = INDEX_PLUGIN,
                  startup_timeout_s: float = 30.0) -> Iterator[OrthancProcess]:
    """Run ``Orthanc <storage>/orthanc.json`` as a child for the duration of the block.

    `storage` (created mode 0700) holds the database and files (``db/``), the rendered configuration
    (``orthanc.json``, mode 0600, rewritten at each start) and the log (``orthanc.log``). The block
    starts once ``/system`` answers with `credentials`; leaving it stops Orthanc (SIGTERM, then
    SIGKILL). Other arguments as in :func:`render_config`.

    Raises:
        ValueError: a bad argument, or the DICOMweb plugin is not installed.
        RuntimeError, TimeoutError: a port is in use, or Orthanc did not start (the message ends with
            its log).
    """
    import shutil

    if shutil.which(ORTHANC_EXECUTABLE) is None:
        raise ValueError(f"no {ORTHANC_EXECUTABLE} executable on PATH: install the Debian package 'orthanc'")
    if not Path(dicomweb_plugin).is_file():
        raise ValueError(f"no DICOMweb plugin at {dicomweb_plugin}: install the Debian package 'orthanc-dicomweb'")
    if index is not None and not Path(index_plugin).is_file():
        raise ValueError(f"no PostgreSQL index plugin at {index_plugin}: install the Debian package "
                         "'orthanc-postgresql'")
    storage = Path(storage).absolute()
    for port in (http_port, dicom_port):
        if port is not None and not _port_free(port):
            raise RuntimeError(f"port {port} is in use (another PACS?): choose another port")
    config = render_config(storage, http_port, credentials, stable_age_s=stable_age_s, dicom_port=dicom_port,
                           template=template, dicomweb_plugin=dicomweb_plugin, index=index, index_plugin=index_plugin)
    storage.mkdir(parents=True, exist_ok=True)
    os.chmod(storage, 0o700)
    write_config(config, storage / CONFIG)
    log: IO[bytes] = open(storage / LOG, "ab")  # noqa: SIM115 (lives as long as the process)
    log_offset = log.tell()
    try:
        process = subprocess.Popen([ORTHANC_EXECUTABLE, str(storage / CONFIG)], stdin=subprocess.DEVNULL,
                                   stdout=log, stderr=subprocess.STDOUT, cwd=storage, start_new_session=True)
    finally:
        log.close()
    orthanc = OrthancProcess(process, storage, http_port, credentials, log_offset)
    try:
        orthanc.wait_ready(startup_timeout_s)
        yield orthanc
    finally:
        orthanc.stop()
