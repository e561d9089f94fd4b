"""The PACS over DICOMweb: search (QIDO-RS), store (STOW-RS) and retrieve whole studies (WADO-RS).

A thin layer over :class:`dicomweb_client.DICOMwebClient`, which speaks the protocol; this module
adds what the clinical side needs around it: HTTP basic auth from the environment, bounded
timeouts, and a retrieval that leaves either the whole study in `dest` or nothing at all.

Identifiers. A StudyInstanceUID is an original identifier, and the URLs of DICOMweb carry it, so
the errors raised here say what failed (the verb, the HTTP status, the server's address) but never
chain the HTTP library's exception, whose message holds the full URL: no Prefect log or traceback
may receive an original identifier.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pydicom import Dataset

from dicomops.errors import DicomOpsError

USER_ENV = "DICOMOPS_PACS_USER"
PASSWORD_ENV = "DICOMOPS_PACS_PASSWORD"
URL_ENV = "DICOMOPS_PACS_URL"
DEFAULT_USER = "dicomops"
DEFAULT_URL = "http://127.0.0.1:8042"
DICOMWEB_ROOT = "/dicom-web/"
CONNECT_TIMEOUT_S = 5.0
# Any transfer syntax: the PACS sends each instance as it was stored, so pixels arrive untouched.
# Structured reports and segmentations (and their registration kin): results, not images.
RESULT_CLASSES = ("1.2.840.10008.5.1.4.1.1.88.", "1.2.840.10008.5.1.4.1.1.66.")
# Other objects a viewer or a modality stores beside the images, none of them an image the model
# reads: presentation states (a reader's annotations), encapsulated documents (a PDF report).
NOT_IMAGES = (*RESULT_CLASSES, "1.2.840.10008.5.1.4.1.1.11.", "1.2.840.10008.5.1.4.1.1.104.")
SEGMENTATION_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
AS_STORED = (("application/dicom", "*"),)
# STOW-RS failure reasons (PS3.4 Table B.2-1) that say the PACS could not take an instance now, not
# that it never will: "Refused: Out of Resources" (A7xx), "Processing failure" (0110), which Orthanc
# gives for every failure (a full disk among them), and none at all.
NO_REASON = -1  # a failed instance whose FailureReason is missing or not a number
TRANSIENT_REASONS = {*range(0xA700, 0xA800), 0x0110, NO_REASON}
STOW_CONFLICT = 409  # PS3.18: the PACS stored none of the instances; the body says why for each
STORED_LISTED_AFTER_S = (0.5, 1.5, 3.0)  # waits for a PACS to list what it said it stored
# Orthanc substitutes ${VAR} in its configuration file as text, before parsing the JSON: a password
# holding one of these would change or break the configuration it is written into.
_UNSAFE_IN_CONFIG = re.compile(r'[\x00-\x1f"\\]|\$\{')


class PacsError(DicomOpsError):
    """The PACS did not do what was asked (unreachable, an HTTP error, an incomplete study)."""


class PacsAuthError(PacsError):
    """The PACS refused the credentials (HTTP 401/403): retrying will not help."""


class PacsStoreRefused(PacsError):
    """The PACS answered a STOW-RS request and did not keep some of its instances, and will not if
    asked again: it refused them for a reason of theirs (a SOP class it does not store, a data set it
    cannot read), or refused some while storing others, or said it stored them and does not hold them
    (a filter that drops what it receives, such as Orthanc's ``ReceivedInstanceFilter``). `stored`
    is how many it kept."""

    def __init__(self, message: str, stored: int) -> None:
        super().__init__(message)
        self.stored = stored


class PacsRequestRefused(PacsError):
    """The DICOMweb client would not make the request: a UID the PACS holds that is not a valid DICOM
    UID cannot be put in a path. Asking again gives the same answer."""


@dataclass(frozen=True)
class PacsCredentials:
    """HTTP basic-auth credentials of the PACS; the password stays out of ``repr``."""

    user: str
    password: str = field(repr=False)

    def __post_init__(self) -> None:
        if not self.user or ":" in self.user or _UNSAFE_IN_CONFIG.search(self.user):
            raise ValueError(f"{USER_ENV} must be a non-empty name without ':', '\"', '\\', '${{' or control "
                             "characters (HTTP basic auth and Orthanc's configuration file both carry it)")
        if not self.password:
            raise ValueError(f"the PACS password is empty: set {PASSWORD_ENV}")
        if _UNSAFE_IN_CONFIG.search(self.password):
            raise ValueError(f"{PASSWORD_ENV} must not contain '\"', '\\', '${{' or control characters: Orthanc "
                             "expands ${{...}} in its configuration file as text before reading it as JSON")


def credentials_from_env(env: Mapping[str, str] | None = None) -> PacsCredentials:
    """The PACS credentials from DICOMOPS_PACS_USER (default ``dicomops``) and DICOMOPS_PACS_PASSWORD.

    There is no default password: without one this raises ValueError naming the variable.
    """
    env = os.environ if env is None else env
    password = env.get(PASSWORD_ENV, "")
    if not password:
        raise ValueError(f"no PACS password: set {PASSWORD_ENV} (and {USER_ENV}, default {DEFAULT_USER!r}); "
                         "there is no default password")
    return PacsCredentials(env.get(USER_ENV) or DEFAULT_USER, password)


def read_timeout_s(http_budget_s: float) -> float:
    """The longest silence accepted from the PACS within one request: a quarter of
    ``Settings.http_budget_s``, so a stalled server fails a request well inside the budget of a run,
    leaving room for the task's retries."""
    return max(http_budget_s / 4, CONNECT_TIMEOUT_S)


def basic_auth_session(credentials: PacsCredentials, url: str) -> Any:
    """A requests session with HTTP basic auth. For a PACS on loopback it ignores the environment's
    proxy settings, so a site's HTTP_PROXY never carries studies off the machine."""
    import requests

    session = requests.Session()
    session.auth = (credentials.user, credentials.password)
    if urlsplit(url).hostname in ("127.0.0.1", "localhost", "::1"):
        session.trust_env = False
    return session


def server_address(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}"


@contextlib.contextmanager
def translate_errors(what: str, server: str) -> Iterator[None]:
    """Turn the HTTP library's exceptions into :class:`PacsError` that name `what` failed and the
    server, not the URL (it holds UIDs). Not chained, for the same reason. dicomweb-client's own
    refusals (a ValueError quoting the UID it will not put in a path) become
    :class:`PacsRequestRefused`, without the UID."""
    import requests

    try:
        yield
    except requests.HTTPError as err:
        status = err.response.status_code if err.response is not None else 0
        if status in (401, 403):
            raise PacsAuthError(f"{what}: the PACS at {server} refused the credentials (HTTP {status}); check "
                                f"{USER_ENV} and {PASSWORD_ENV}") from None
        reason = err.response.reason if err.response is not None else ""
        raise PacsError(f"{what}: the PACS at {server} answered HTTP {status} {reason}".rstrip()) from None
    except requests.RequestException as err:
        raise PacsError(f"{what}: the PACS at {server} did not answer in full ({type(err).__name__}): is it "
                        f"running at that address (the one given, else {URL_ENV})") from None
    except ValueError as err:  # raised before any request: requests' own JSON errors are caught above
        raise PacsRequestRefused(f"{what}: the DICOMweb client would not ask the PACS at {server} "
                                 f"({type(err).__name__}: an identifier that is not a valid DICOM UID; the "
                                 "message is withheld: it quotes it); correct the study's UIDs in the PACS") from None


class _ClosingBoundary:
    """A requests response hook that records whether a multipart answer ended with its closing
    boundary (``--<boundary>--``).

    Orthanc 1.10 sends WADO-RS answers with neither a Content-Length nor chunked encoding: the body
    ends when the connection closes, so a server killed mid-answer looks to the HTTP client like a
    complete answer, and dicomweb-client then parses the cut-off last part as an instance of its
    own. Only the missing closing boundary tells the two apart. While the body streams, ``ended`` is
    False, so a part dicomweb-client yields once ``cut_off`` is True is that cut-off remainder.

    One client serves several threads (the online service's studies, a batch's prefetch), and a
    request is made and its answer read in one thread, so the state is the thread's: another
    thread's request never resets or sets what this one's answer said.
    """

    def __init__(self) -> None:
        self._state = threading.local()

    @property
    def ended(self) -> bool:
        return bool(getattr(self._state, "ended", False))

    @property
    def whole(self) -> bool:
        return bool(getattr(self._state, "whole", False))

    def reset(self) -> None:
        self._state.ended = self._state.whole = False

    @property
    def cut_off(self) -> bool:
        return self.ended and not self.whole

    def __call__(self, response: Any, *args: Any, **kwargs: Any) -> Any:
        content_type = response.headers.get("Content-Type", "")
        boundary = re.search(r'boundary="?([^";]+)"?', content_type)
        if not content_type.lower().startswith("multipart/") or boundary is None:
            return response
        closing = b"--" + boundary.group(1).encode() + b"--"
        stream = response.iter_content
        self.reset()

        def iter_content(*args: Any, **kwargs: Any) -> Iterator[bytes]:
            tail = b""
            for chunk in stream(*args, **kwargs):
                tail = (tail + chunk)[-(len(closing) + 64):]
                yield chunk
            self._state.whole = tail.rstrip().endswith(closing)
            self._state.ended = True

        response.iter_content = iter_content
        return response


class PacsClient:
    """Search, store and retrieve studies on a DICOMweb server (Orthanc's plugin here).

    Args:
        dicomweb_url: The DICOMweb root, e.g. ``http://127.0.0.1:8042/dicom-web``.
        credentials: HTTP basic auth (see :func:`credentials_from_env`).
        timeout_s: The longest silence accepted within one request (see :func:`read_timeout_s`).
            dicomweb-client's own retries are off: retrying is the job of the task that calls this.
    """

    def __init__(self, dicomweb_url: str, credentials: PacsCredentials, *, timeout_s: float = 30.0) -> None:
        from dicomweb_client import DICOMwebClient

        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive (got {timeout_s})")
        if urlsplit(dicomweb_url).scheme not in ("http", "https"):
            raise ValueError(f"dicomweb_url must be an http(s) URL (got {dicomweb_url!r})")
        self.url = dicomweb_url.rstrip("/")
        self.server = server_address(self.url)
        self._session = basic_auth_session(credentials, self.url)
        self._closing = _ClosingBoundary()
        self._web = DICOMwebClient(self.url, session=self._session, timeout=(CONNECT_TIMEOUT_S, timeout_s),
                                   callback=self._closing)
        self._web.set_http_retry_params(retry=False)

    @classmethod
    def from_env(cls, http_budget_s: float = 120.0, env: Mapping[str, str] | None = None,
                 url: str | None = None) -> PacsClient:
        """A client for Orthanc's root `url`, else DICOMOPS_PACS_URL (default ``http://127.0.0.1:8042``;
        the DICOMweb root is below it), with the credentials of :func:`credentials_from_env`."""
        env = os.environ if env is None else env
        base = (url or env.get(URL_ENV) or DEFAULT_URL).rstrip("/")
        return cls(base + DICOMWEB_ROOT, credentials_from_env(env), timeout_s=read_timeout_s(http_budget_s))

    def close(self) -> None:
        self._session.close()

    def __enter__(self) -> PacsClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def search_studies(self, *, limit: int | None = None, fields: Sequence[str] = (),
                       **filters: str) -> list[Dataset]:
        """QIDO-RS: the studies matching `filters` (DICOM keywords, e.g. ``PatientID="X"``,
        ``StudyDate="20240101-"``), each a dataset of its study-level attributes plus `fields`."""
        with translate_errors("searching studies", self.server):
            found = self._web.search_for_studies(limit=limit, fields=list(fields) or None,
                                                 search_filters=dict(filters) or None, get_remaining=limit is None)
        return [_from_json(study) for study in found]

    def store(self, datasets: Iterable[Dataset]) -> list[str]:
        """STOW-RS: store `datasets` in one request, then ask the PACS which of them it holds (a QIDO-RS
        listing per series): a PACS may answer "stored" for an instance a filter dropped. Return the
        SOPInstanceUIDs it holds, which are all of them or this raises.

        Raises:
            PacsStoreRefused: the PACS did not keep some instances and will not if asked again (see
                the class); the message names their SOP classes and the reasons, and says how to fix it.
            PacsError: the request failed, or every instance the PACS did not keep was refused for
                lack of resources, with a processing failure or with no reason, or not named in its
                answer (an outage: asking again later may succeed, and the results' UIDs are the
                same, so nothing is stored twice).
        """
        batch = list(datasets)
        if not batch:
            return []
        with translate_errors(f"storing {len(batch)} instances", self.server):
            answer = self._stow(batch)
        failures, accepted = _stow_outcome(answer)
        series = sorted({(str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID)) for ds in batch})
        for delay in (*STORED_LISTED_AFTER_S, None):
            held = set().union(*(self.instance_uids(study, one) for study, one in series))
            lost = [ds for ds in batch if str(ds.SOPInstanceUID) not in held]
            # Not listed and not refused (said stored, or not named): a PACS may index what it
            # received a moment later, so it is asked again before anything is decided.
            if delay is None or all(str(ds.SOPInstanceUID) in failures for ds in lost):
                break
            time.sleep(delay)
        if not lost:
            return [str(ds.SOPInstanceUID) for ds in batch]
        kept = len(batch) - len(lost)
        reasons = [failures.get(str(ds.SOPInstanceUID)) for ds in lost]
        said = [str(ds.SOPInstanceUID) in accepted for ds in lost]
        what = f"storing {len(batch)} instances: the PACS at {self.server} kept {kept} of them"
        lasting = [reason not in TRANSIENT_REASONS if reason is not None else stored
                   for reason, stored in zip(reasons, said, strict=True)]
        if not any(lasting):
            raise PacsError(f"{what} and not the rest ({_describe_lost(lost, reasons, said)}): a lack of resources, "
                            "a processing failure or an answer that said nothing of them; it may take them later")
        raise PacsStoreRefused(
            f"{what} and will not take the rest ({_describe_lost(lost, reasons, said)}); asking again gets the "
            "same answer: make the PACS store these objects (the SOP classes it accepts, its filters on what it "
            "receives), then answer the study again (dicomops predict --pacs StudyInstanceUID=<the study's UID>)",
            stored=kept)

    def _stow(self, batch: list[Dataset]) -> Dataset:
        """The PACS's STOW-RS answer: stored and failed instances. A 409 (none stored) carries the same answer in its body (DICOM
        JSON or XML); without a readable one it stays an HTTP error. A 200 or 202 whose body is not
        a DICOM answer is an empty one: :meth:`store` then goes by what the PACS lists."""
        import requests

        try:
            return self._web.store_instances(batch)
        except requests.HTTPError as err:
            if err.response is None or err.response.status_code != STOW_CONFLICT:
                raise
            try:
                return _conflict_answer(err.response)
            except Exception:
                raise err from None
        except (TypeError, KeyError, AttributeError):  # pydicom on JSON that is not a DICOM data set
            return Dataset()  # (an object of ours pydicom could not encode ends here too, and shows as lost)

    def instance_uids(self, study_uid: str, series_uid: str | None = None) -> set[str]:
        """QIDO-RS: the SOPInstanceUIDs of every instance the PACS holds now in the study (or in one
        of its series)."""
        with translate_errors("listing a study's instances", self.server):
            found = self._web.search_for_instances(study_instance_uid=study_uid, series_instance_uid=series_uid,
                                                   fields=["SOPInstanceUID"], get_remaining=True)
        return {str(item["00080018"]["Value"][0]) for item in found if item.get("00080018", {}).get("Value")}

    def image_instances(self, study_uid: str) -> dict[str, str]:
        """QIDO-RS: SOPInstanceUID → SeriesInstanceUID of the study's instances that are not results
        (SR or SEG, the kinds dicomops stores back) nor other non-images (:data:`NOT_IMAGES`: a
        reader's presentation state, a PDF): what a study's images are, before and after it is
        answered or annotated, in one request."""
        with translate_errors("listing a study's instances", self.server):
            found = self._web.search_for_instances(
                study_instance_uid=study_uid, fields=["SOPInstanceUID", "SOPClassUID", "SeriesInstanceUID"],
                get_remaining=True)
        images = {}
        for item in found:
            sop_class = str((item.get("00080016", {}).get("Value") or [""])[0])
            sop, series = item.get("00080018", {}).get("Value"), item.get("0020000E", {}).get("Value")
            if sop and series and not sop_class.startswith(NOT_IMAGES):
                images[str(sop[0])] = str(series[0])
        return images

    def report_instances(self, study_uid: str) -> list[tuple[str, str]]:
        """QIDO-RS: (SeriesInstanceUID, SOPInstanceUID) of every structured report in the study:
        dicomops's own and the readers' (a viewer's revision of a report is an SR too)."""
        return self._instances_of(study_uid, lambda sop_class: sop_class.startswith(RESULT_CLASSES[0]), "reports")

    def segmentation_instances(self, study_uid: str) -> list[tuple[str, str]]:
        """QIDO-RS: (SeriesInstanceUID, SOPInstanceUID) of every segmentation in the study: dicomops's
        own and the readers' (a viewer stores a corrected segmentation as a new SEG)."""
        return self._instances_of(study_uid, lambda sop_class: sop_class == SEGMENTATION_CLASS, "segmentations")

    def _instances_of(self, study_uid: str, wanted: Callable[[str], bool], what: str) -> list[tuple[str, str]]:
        with translate_errors(f"listing a study's {what}", self.server):
            found = self._web.search_for_instances(
                study_instance_uid=study_uid, fields=["SOPInstanceUID", "SOPClassUID", "SeriesInstanceUID"],
                get_remaining=True)
        out = []
        for item in found:
            sop_class = str((item.get("00080016", {}).get("Value") or [""])[0])
            sop, series = item.get("00080018", {}).get("Value"), item.get("0020000E", {}).get("Value")
            if sop and series and wanted(sop_class):
                out.append((str(series[0]), str(sop[0])))
        return sorted(out)

    def series_headers(self, study_uid: str, series_uid: str) -> list[Dataset]:
        """WADO-RS metadata: every instance's header of the series, without pixel data (the geometry a
        segmentation is laid over)."""
        with translate_errors("retrieving a series' headers", self.server):
            found = self._web.retrieve_series_metadata(study_uid, series_uid)
        return [_from_json(item) for item in found]

    def retrieve_instance(self, study_uid: str, series_uid: str, sop_uid: str) -> Dataset:
        """WADO-RS: one instance, as stored."""
        with translate_errors("retrieving an instance", self.server):
            return self._web.retrieve_instance(study_uid, series_uid, sop_uid, media_types=AS_STORED)

    def retrieve_study(self, study_uid: str, dest: Path) -> list[Path]:
        """WADO-RS: every instance of the study, as stored, into the new folder `dest`; return the files.

        The instances are written and fsynced into a temporary folder beside `dest`, checked against the
        instances the PACS listed before the transfer, and only then renamed to `dest` in one step. An
        outage, a truncated answer or a missing instance removes the temporary folder and raises
        :class:`PacsError`, so `dest` holds a whole study or does not exist. An answer that arrived whole
        (its closing boundary and every listed instance) is kept as the PACS stores it, defects and all:
        an instance stored with fewer pixel bytes than its rows and columns need is the file's own, for
        the ingest gate to quarantine with its reason, not an outage to retry forever. File names are
        ordinals (``00000.dcm``), never UIDs; the files themselves hold PHI, so `dest` belongs in a
        staging area outside the work directory.

        Raises:
            ValueError: `dest` exists already.
            PacsError: the study is unknown to the PACS, or the retrieval failed or came back incomplete.
        """
        dest = Path(dest)
        if dest.exists():
            raise ValueError(f"{dest} exists: retrieve into a new folder (remove what an earlier attempt left)")
        dest.parent.mkdir(parents=True, exist_ok=True)
        for stale in dest.parent.glob(f".{dest.name}.partial-*"):  # a killed process cannot clean up after itself
            shutil.rmtree(stale, ignore_errors=True)
        expected = self.instance_uids(study_uid)
        if not expected:
            raise PacsError(f"retrieving a study: the PACS at {self.server} holds no instance of it")
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.partial-", dir=dest.parent))
        try:
            received: set[str] = set()
            names: list[str] = []
            self._closing.reset()
            for ds in self._instances(study_uid):
                names.append(f"{len(names):05d}.dcm")
                _write_synced(ds, tmp / names[-1])
                received.add(str(ds.SOPInstanceUID))
            missing = len(expected - received)
            if missing:
                raise PacsError(f"retrieving a study: {missing} of the {len(expected)} instances the PACS at "
                                f"{self.server} listed did not arrive")
            _fsync_dir(tmp)
            os.rename(tmp, dest)
            _fsync_dir(dest.parent)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return [dest / name for name in names]

    def _instances(self, study_uid: str) -> Iterator[Dataset]:
        """The study's instances as they arrive. An answer cut off before its closing boundary, or a part
        that is not a whole instance, is a PacsError (the cut-off remainder is never yielded)."""
        import requests

        with translate_errors("retrieving a study", self.server):
            answer = self._web.iter_study(study_uid, media_types=AS_STORED)
            count = 0
            while True:
                try:
                    ds = next(answer)
                except StopIteration:
                    break
                except requests.RequestException:
                    raise
                except Exception as err:  # pydicom's, on a part cut short
                    if self._closing.cut_off:
                        break
                    raise PacsError(f"retrieving a study: a part of the answer of the PACS at {self.server} is not "
                                    f"DICOM ({type(err).__name__})") from None
                if self._closing.cut_off:
                    break
                if "SOPInstanceUID" not in ds:
                    raise PacsError(f"retrieving a study: part {count} of the answer of the PACS at {self.server} "
                                    "is not a whole DICOM instance")
                count += 1
                yield ds
        if self._closing.cut_off:
            raise PacsError(f"retrieving a study: the answer of the PACS at {self.server} was cut off after "
                            f"{count} instances (no closing boundary)")


def _stow_outcome(answer: Dataset) -> tuple[dict[str, int], set[str]]:
    """From a STOW-RS answer: the failed instances with their reasons (:data:`NO_REASON` when it
    gives none), and the instances it says it stored."""
    failures = {}
    for item in answer.get("FailedSOPSequence", None) or []:
        try:
            reason = int(item.get("FailureReason"))
        except (TypeError, ValueError):
            reason = NO_REASON
        failures[str(item.get("ReferencedSOPInstanceUID", ""))] = reason
    stored = {str(item.get("ReferencedSOPInstanceUID", "")) for item in answer.get("ReferencedSOPSequence", None) or []}
    return failures, stored


def _conflict_answer(response: Any) -> Dataset:
    """The DICOM answer in a 409's body, JSON or XML, with the parser dicomweb-client uses for a 200."""
    if "xml" in response.headers.get("Content-Type", ""):
        from xml.etree.ElementTree import fromstring

        from dicomweb_client.web import _load_xml_dataset

        return _load_xml_dataset(fromstring(response.content))
    body = response.json()
    if not isinstance(body, dict):
        raise TypeError("not a DICOM JSON data set")
    return _from_json(body)


def _describe_lost(lost: Sequence[Dataset], reasons: Sequence[int | None], said_stored: Sequence[bool]) -> str:
    """What the PACS did with each instance it did not keep, by SOP class (names of the standard, no
    identifier): "Segmentation Storage: refused, failure reason 0xC000", "reported stored, not found
    in its series", or "not found in its series, and not named in the answer"."""
    from pydicom.uid import UID

    parts = set()
    for ds, reason, said in zip(lost, reasons, said_stored, strict=True):
        sop_class = UID(str(ds.get("SOPClassUID", "")))
        kind = sop_class.name if sop_class.name != str(sop_class) else "an unknown SOP class"  # name: the UID itself
        if reason == NO_REASON:
            parts.add(f"{kind}: refused, no failure reason given")
        elif reason is not None:
            parts.add(f"{kind}: refused, failure reason 0x{reason:04X}")
        elif said:
            parts.add(f"{kind}: reported stored, not found in its series (dropped by a filter on the PACS?)")
        else:
            parts.add(f"{kind}: not found in its series, and not named in the answer")
    return "; ".join(sorted(parts))


def _from_json(item: dict[str, Any]) -> Dataset:
    """A DICOM JSON object (QIDO-RS, WADO-RS metadata) as a dataset, bulk data left out. pydicom's
    warnings about an odd value quote it (a study date, a name): ``dicomops/__init__.py`` keeps
    them from being issued."""
    return Dataset.from_json(item, bulk_data_uri_handler=lambda *_: b"")


def _write_synced(ds: Dataset, path: Path) -> None:
    with open(path, "xb") as handle:
        ds.save_as(handle, enforce_file_format=True)
        handle.flush()
        os.fsync(handle.fileno())


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
