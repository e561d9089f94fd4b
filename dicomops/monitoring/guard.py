"""Keep alert-driven retraining from storming: one retrain at a time (a lock file), at most one
per model per cooldown (a failed one does not count), and none on the labelled pool the last one
learned from (a state file). Both live under ``WORK/monitoring/``."""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dicomops import io
from dicomops.layout import WorkLayout


@dataclass(frozen=True)
class Verdict:
    go: bool
    reason: str


def _state_path(work: Path) -> Path:
    return WorkLayout(work).retrain_state


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


_START_KEYS = ("started", "monitoring_run_id", "trigger")


def _entry(work: Path, model: str) -> dict[str, Any]:
    path = _state_path(work)
    return dict(io.read_json(path).get(model, {})) if path.exists() else {}


def _failure_note(model: str, entry: dict[str, Any]) -> str:
    failed = entry.get("last_failure")
    if not failed:
        return ""
    return (f"the last alert-triggered retrain of {model} (trigger={failed.get('trigger', '?')}, started at "
            f"{failed.get('started', '?')}) failed, so its start does not count toward the cooldown")


def check_cooldown(work: Path, model: str, cooldown_hours: float, now: dt.datetime | None = None) -> Verdict:
    """Whether an alert may retrain `model` now: not within `cooldown_hours` of the start of the last
    alert-triggered retrain that did not fail (:func:`cooldown_taken`). The reason names a failed
    retrain since, if there was one."""
    now = now or _now()
    entry = _entry(work, model)
    last, failed = entry.get("started"), _failure_note(model, entry)
    if last is None:
        return Verdict(True, failed or "no earlier alert-triggered retrain")
    elapsed = now - dt.datetime.fromisoformat(last)
    also = f"; {failed}" if failed else ""
    if elapsed < dt.timedelta(hours=cooldown_hours):
        wait = dt.timedelta(hours=cooldown_hours) - elapsed
        return Verdict(False, f"skipped: cooldown, the last alert-triggered retrain of {model} started at {last}; "
                              f"next allowed in {wait.total_seconds() / 3600:.1f} h (cooldown {cooldown_hours} h)"
                              + also)
    return Verdict(True, f"cooldown over (last retrain {last})" + also)


def record_start(work: Path, model: str, monitoring_run_id: str, now: dt.datetime | None = None,
                 trigger: str = "drift") -> None:
    path = _state_path(work)
    state = io.read_json(path) if path.exists() else {}
    state.setdefault(model, {}).update({"started": (now or _now()).isoformat(timespec="seconds"),
                                        "monitoring_run_id": monitoring_run_id, "trigger": trigger})
    io.write_json(path, state)


@contextmanager
def cooldown_taken(work: Path, model: str, monitoring_run_id: str, trigger: str = "drift",
                   now: dt.datetime | None = None) -> Iterator[None]:
    """Hold `model`'s cooldown for an alert's retrain, from its start (:func:`record_start`, taken
    under the retrain lock, so a second alert right behind it is skipped) for as long as it does not
    fail. A retrain that raises gives the cooldown back: the start recorded before it is restored
    (the feedback loop counts readers' feedback from that one, too) and the failed start is kept as
    ``last_failure``, which the next alert's :func:`check_cooldown` names. A process killed outright
    (no exception reaches this) keeps the cooldown."""
    before = _entry(work, model)
    record_start(work, model, monitoring_run_id, now=now, trigger=trigger)
    try:
        yield
    except BaseException:
        _give_back(work, model, before)
        raise
    path = _state_path(work)
    state = io.read_json(path)
    state.get(model, {}).pop("last_failure", None)
    io.write_json(path, state)


def _give_back(work: Path, model: str, before: dict[str, Any]) -> None:
    path = _state_path(work)
    state = io.read_json(path) if path.exists() else {}
    entry = state.setdefault(model, {})
    entry["last_failure"] = {key: entry.get(key) for key in _START_KEYS}
    for key in _START_KEYS:
        if key in before:
            entry[key] = before[key]
        else:
            entry.pop(key, None)
    io.write_json(path, state)


def pool_identity(*content_hashes: str) -> str:
    """What a retrain learns from, as one string: the content hashes of its folders (the combined
    labelled sources, the readers' labels), so the same labels in the same files are the same pool."""
    return "+".join(content_hashes)


def same_pool(work: Path, model: str, identity: str) -> str | None:
    """Why an alert's retrain of `model` has nothing new to learn (its pool is the one the last
    retrain learned from), or None. Such a retrain is skipped without using the cooldown: a
    drifted batch without labels changes nothing a retrain could learn."""
    path = _state_path(work)
    last = io.read_json(path).get(model, {}) if path.exists() else {}
    if last.get("pool") != identity:
        return None
    return (f"skipped: the labelled pool is the one the last retrain of {model} learned from (version "
            f"{last.get('pool_version', '?')}, started {last.get('started', '?')}): nothing new to learn; label "
            "the drifted studies (readers' reviews) or add a labelled batch, then retrain")


def record_pool(work: Path, model: str, identity: str, version: str) -> None:
    """The pool a retrain of `model` learned from, once it registered `version`."""
    path = _state_path(work)
    state = io.read_json(path) if path.exists() else {}
    state.setdefault(model, {}).update({"pool": identity, "pool_version": str(version)})
    io.write_json(path, state)


def last_start(work: Path, model: str) -> str:
    """When the last alert-triggered retrain of `model` that did not fail started (ISO, UTC), or ''
    if none did."""
    path = _state_path(work)
    return str(io.read_json(path).get(model, {}).get("started", "")) if path.exists() else ""


class RetrainLocked(RuntimeError):
    """Another retrain holds the lock."""


@contextmanager
def retrain_lock(work: Path, stale_hours: float = 12.0) -> Iterator[Path]:
    """An exclusive lock file; one older than `stale_hours` (a crashed holder) is taken over."""
    path = WorkLayout(work).retrain_lock
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and _now().timestamp() - path.stat().st_mtime > stale_hours * 3600:
        path.unlink(missing_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
    except FileExistsError as err:
        raise RetrainLocked(f"skipped: another retrain holds {path} ({path.read_text().strip()})") from err
    try:
        os.write(fd, f"pid {os.getpid()} since {_now().isoformat(timespec='seconds')}".encode())
        os.close(fd)
        yield path
    finally:
        path.unlink(missing_ok=True)
