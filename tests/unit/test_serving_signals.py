"""`dicomops serve` stops everything it started on SIGTERM and SIGHUP exactly as on Ctrl-C:
its children, the children they started in their own group, and those that left for a session of
their own (as Prefect's worker starts flow runs), with the previous signal handlers restored."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from dicomops.serving import Stack, interrupt_on

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs POSIX signals and /proc")
ROOT = Path(__file__).resolve().parents[2]

# A stand-in for `prefect server start` / `prefect worker start`: one grandchild in its group, one
# that starts a session of its own; prints their pids, then waits.
CHILD = textwrap.dedent("""
    import subprocess, sys, time
    same = subprocess.Popen(["sleep", "300"], stdout=subprocess.DEVNULL)
    alone = subprocess.Popen(["sleep", "300"], stdout=subprocess.DEVNULL, start_new_session=True)
    print(same.pid, alone.pid, flush=True)
    time.sleep(300)
""")

SCRIPT = textwrap.dedent("""
    import json, pathlib, signal, sys
    from dicomops.serving import Stack, run_until_signal

    stack = Stack("http://127.0.0.1:1/api", "http://127.0.0.1:1")
    for _ in range(2):
        stack.spawn([sys.executable, "-c", sys.argv[1]])
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    print(json.dumps({"children": [p.pid for p in stack.processes]}), flush=True)
    reason = run_until_signal(stack, poll=0.1)
    restored = all(signal.getsignal(s) is before[s] for s in before)
    pathlib.Path(sys.argv[2]).write_text(json.dumps({"reason": reason, "restored": restored}))
""")


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie waiting for a reaper has stopped too
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _launch(result: Path, seconds: float = 15.0) -> tuple[subprocess.Popen[str], list[int]] | None:
    """Start the script; every pid it started (children and grandchildren) once all have reported,
    or None (everything it started killed) if they have not within `seconds`."""
    import select

    script = subprocess.Popen([sys.executable, "-c", SCRIPT, CHILD, str(result)], cwd=ROOT, stdout=subprocess.PIPE,
                              text=True, env={**os.environ, "PYTHONPATH": str(ROOT)},
                              start_new_session=True)  # no signal meant for the test runner's group reaches it
    assert script.stdout is not None
    children: list[int] = []
    grandchildren: list[int] = []
    deadline = time.monotonic() + seconds
    while not children or len(grandchildren) < 4:  # the children share the script's stdout: any order
        ready, _, _ = select.select([script.stdout], [], [], max(0.0, deadline - time.monotonic()))
        line = script.stdout.readline() if ready else ""
        if not line:
            for pid in [script.pid, *children, *grandchildren]:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGKILL)
            script.wait()
            script.stdout.close()
            return None
        if line.startswith("{"):
            children = json.loads(line)["children"]
        else:
            grandchildren += [int(pid) for pid in line.split()]
    return script, children + grandchildren


def _start_script(result: Path) -> tuple[subprocess.Popen[str], list[int]]:
    """The script with its stack running, and every pid it started.

    Starting the harness is retried once: on a loaded 2-core CI machine it was seen, rarely, not to
    come up (before any signal is sent, so not the behaviour under test).
    """
    started = _launch(result) or _launch(result)
    assert started is not None, "the script's stack did not come up twice in a row"
    script, pids = started
    assert len(pids) == 6
    deadline = time.monotonic() + 10
    while not _catches(script.pid, signal.SIGTERM) and time.monotonic() < deadline:
        time.sleep(0.02)  # until run_until_signal has installed its handlers
    return script, pids


def _catches(pid: int, sig: int) -> bool:
    status = Path(f"/proc/{pid}/status").read_text()
    caught = next(line for line in status.splitlines() if line.startswith("SigCgt:")).split()[1]
    return bool(int(caught, 16) >> (sig - 1) & 1)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_a_stop_signal_stops_every_process_of_the_stack(sig: signal.Signals, tmp_path: Path) -> None:
    script, pids = _start_script(tmp_path / "result.json")
    try:
        assert all(_running(pid) for pid in pids)
        script.send_signal(sig)
        assert script.wait(timeout=15) == 0  # it stopped the stack and returned, not died of the signal
        assert json.loads((tmp_path / "result.json").read_text()) == {"reason": sig.name, "restored": True}
        deadline = time.monotonic() + 5
        while any(_running(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [pid for pid in pids if _running(pid)] == []
    finally:
        script.kill()
        if script.stdout:
            script.stdout.close()
        for pid in pids:  # never leave a sleeper behind, whatever failed
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_stop_kills_what_ignores_sigterm_after_the_timeout() -> None:
    stack = Stack("api", "ui")
    with stack:
        stubborn = stack.spawn([sys.executable, "-c", "import signal, time\n"
                                "signal.signal(signal.SIGTERM, signal.SIG_IGN)\ntime.sleep(300)"])
        deadline = time.monotonic() + 10
        while not _ignores_sigterm(stubborn.pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        start = time.monotonic()
        stack.stop(timeout=1.0)
        assert stubborn.returncode == -signal.SIGKILL and 1.0 <= time.monotonic() - start < 5
    assert stack.processes == [stubborn]  # leaving the block stopped it once more: harmless


def _ignores_sigterm(pid: int) -> bool:
    status = Path(f"/proc/{pid}/status").read_text()
    ignored = next(line for line in status.splitlines() if line.startswith("SigIgn:")).split()[1]
    return bool(int(ignored, 16) >> (signal.SIGTERM - 1) & 1)


def test_interrupt_on_raises_once_then_restores_the_handlers() -> None:
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt, match="SIGTERM"), interrupt_on() as interrupts:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(1)  # the handler runs before this returns
    assert interrupts.received == [signal.SIGTERM] and not interrupts.armed
    assert signal.getsignal(signal.SIGTERM) is before
