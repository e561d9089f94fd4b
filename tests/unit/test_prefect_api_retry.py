"""The stack's calls to the Prefect API retry what Prefect's own client retries (its server answers
503 while its SQLite database is locked) and nothing else."""

from __future__ import annotations

import json
import threading
import urllib.error
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

import pytest

from dicomops import stack


class _Scripted(BaseHTTPRequestHandler):
    """Answers the statuses in `script` in turn, then 200 with the request's method and body."""

    script: ClassVar[list[int]] = []
    seen: ClassVar[list[tuple[str, str, bytes]]] = []

    def _answer(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        type(self).seen.append((self.command, self.path, body))
        status = type(self).script.pop(0) if type(self).script else 200
        payload = json.dumps({"method": self.command, "body": body.decode()}).encode() if status == 200 else b"{}"
        self.send_response(status)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    do_GET = do_PATCH = _answer

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    monkeypatch.setattr(stack, "API_FIRST_DELAY_S", 0.01)
    monkeypatch.setenv("PREFECT_CLIENT_MAX_RETRIES", "5")
    _Scripted.script, _Scripted.seen = [], []
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Scripted)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_a_locked_database_answered_503_is_asked_again_with_the_same_body(server: str) -> None:
    _Scripted.script = [503, 503, 429]
    answer = stack._api("PATCH", f"{server}/deployments/x/schedules/y", {"active": False})
    assert answer == {"method": "PATCH", "body": '{"active": false}'}
    assert [(m, p, b) for m, p, b in _Scripted.seen] == [("PATCH", "/deployments/x/schedules/y", b'{"active": false}')] * 4


def test_a_client_error_is_not_retried(server: str) -> None:
    _Scripted.script = [404, 503]
    with pytest.raises(urllib.error.HTTPError) as err:
        stack._api("GET", f"{server}/deployments/name/a/b")
    assert err.value.code == 404 and len(_Scripted.seen) == 1


@pytest.mark.parametrize("setting", [None, "2"])
def test_a_server_that_stays_unavailable_fails_after_the_retries_prefects_client_would_make(
        server: str, setting: str | None, monkeypatch: pytest.MonkeyPatch) -> None:
    if setting is None:
        monkeypatch.delenv("PREFECT_CLIENT_MAX_RETRIES", raising=False)
    else:
        monkeypatch.setenv("PREFECT_CLIENT_MAX_RETRIES", setting)
    _Scripted.script = [503] * 10
    with pytest.raises(urllib.error.HTTPError) as err:
        stack._api("GET", f"{server}/health")
    assert err.value.code == 503 and len(_Scripted.seen) == (6 if setting is None else 3)
