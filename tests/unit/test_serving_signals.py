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

from dicomops.stack import Stack, interrupt_on

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs POSIX signals and /proc")
ROOT = Path(__file__).resolve().parents[2]

# A stand-in for `prefect server start` / `prefect worker start`: one grandchild in its group, one
# that starts a session of its own; writes their pids to a file named after itself, then waits.
CHILD = textwrap.dedent("""
    import os, pathlib, subprocess, sys, time
    same = subprocess.Popen(["sleep", "300"], stdout=subprocess.DEVNULL)
    alone = subprocess.Popen(["sleep", "300"], stdout=subprocess.DEVNULL, start_new_session=True)
    report = pathlib.Path(sys.argv[1]) / f"child-{os.getpid()}.json"
    report.with_suffix(".tmp").write_text(f"[{same.pid}, {alone.pid}]")
    report.with_suffix(".tmp").rename(report)
    time.sleep(300)
""")

SCRIPT = textwrap.dedent("""
    import json, pathlib, signal, sys
    from dicomops.stack import Stack, run_until_signal

    reports = pathlib.Path(sys.argv[2])
    stack = Stack("http://127.0.0.1:1/api", "http://127.0.0.1:1")
    for _ in range(2):
        stack.spawn([sys.executable, "-c", sys.argv[1], str(reports)])
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    (reports / "script.tmp").write_text(json.dumps([p.pid for p in stack.processes]))
    (reports / "script.tmp").rename(reports / "script.json")
    reason = run_until_signal(stack, poll=0.1)
    restored = all(signal.getsignal(s) is before[s] for s in before)
    (reports / "result.json").write_text(json.dumps({"reason": reason, "restored": restored}))
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


def _start_script(reports: Path) -> tuple[subprocess.Popen[bytes], list[int]]:
    """The script with its stack running, and every pid it started (children, then grandchildren).

    The processes report through files written whole (write, then rename), not through a pipe: a
    pipe read with select() misses lines already in the reader's buffer, which once made this
    harness wait for output it had already received.
    """
    script = subprocess.Popen([sys.executable, "-c", SCRIPT, CHILD, str(reports)], cwd=ROOT,
                              env={**os.environ, "PYTHONPATH": str(ROOT)},
                              start_new_session=True)  # no signal meant for the test runner's group reaches it
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and script.poll() is None:
        if (reports / "script.json").exists() and len(list(reports.glob("child-*.json"))) == 2:
            break
        time.sleep(0.05)
    else:
        script.kill()
        pytest.fail(f"the script's stack did not come up (script exit code {script.poll()}); "
                    f"reports: {sorted(p.name for p in reports.iterdir())}")
    children = json.loads((reports / "script.json").read_text())
    grandchildren = [pid for report in reports.glob("child-*.json") for pid in json.loads(report.read_text())]
    assert sorted(int(r.stem.split("-")[1]) for r in reports.glob("child-*.json")) == sorted(children)
    while not _catches(script.pid, signal.SIGTERM) and time.monotonic() < deadline:
        time.sleep(0.02)  # until run_until_signal has installed its handlers
    return script, children + grandchildren


def _catches(pid: int, sig: int) -> bool:
    status = Path(f"/proc/{pid}/status").read_text()
    caught = next(line for line in status.splitlines() if line.startswith("SigCgt:")).split()[1]
    return bool(int(caught, 16) >> (sig - 1) & 1)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_a_stop_signal_stops_every_process_of_the_stack(sig: signal.Signals, tmp_path: Path) -> None:
    script, pids = _start_script(tmp_path)
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
