"""Stopping a long-lived command as a person stops it.

Ctrl-C in a terminal sends SIGINT to the whole foreground process group. A command that
started servers of its own (a local Ray and its Serve replicas, Prefect's temporary server)
would see them die at the same instant, then wait on dead servers while stopping: minutes,
and tracebacks. So `skyeye serve`, `skyeye schedule up` and `skyeye server up` run as a
child in a session of its own, with everything it starts; this process, the only one the
terminal signals, relays the stop to the child as one SIGTERM (which the command handles
as Ctrl-C: finish in-flight work, record, stop its servers in order), waits, and after
`STOP_GRACE_S` kills whatever of the child's group is left.
"""
from __future__ import annotations

import os
import signal
import subprocess
import time

SUPERVISED_ENV = "SKYEYE_SUPERVISED"  # set in the child: it runs the command itself
STOP_GRACE_S = 12.0                   # the child's own stop; the whole stop stays under 15 s


def supervised() -> bool:
    return os.environ.get(SUPERVISED_ENV) == "1"


def _kill_group(pgid: int, sig: int) -> bool:
    """Send `sig` to the group; False when none of it is left."""
    try:
        os.killpg(pgid, sig)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def supervise(argv: list[str], grace_s: float = STOP_GRACE_S) -> int:
    """Run `argv` as the supervised child; relay SIGINT / SIGTERM to it as SIGTERM; return its
    exit status (0 when it stopped because it was asked to and did so cleanly)."""
    child = subprocess.Popen(argv, env={**os.environ, SUPERVISED_ENV: "1"}, start_new_session=True)
    asked: list[float] = []

    def relay(signum, _frame) -> None:
        if not asked:
            asked.append(time.monotonic())
            if child.poll() is None:
                try:
                    os.kill(child.pid, signal.SIGTERM)
                except ProcessLookupError:  # it ended on its own meanwhile
                    pass

    signal.signal(signal.SIGINT, relay)
    signal.signal(signal.SIGTERM, relay)
    while True:
        try:
            code = child.wait(timeout=0.2)
            break
        except subprocess.TimeoutExpired:
            if asked and time.monotonic() - asked[0] > grace_s:
                print(f"did not stop within {grace_s:g} s: killed", flush=True)
                _kill_group(child.pid, signal.SIGKILL)
                code = child.wait()
                break
    # whatever the child started and left behind in its group (a server it could not stop)
    if _kill_group(child.pid, signal.SIGTERM):
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline and _kill_group(child.pid, 0):
            time.sleep(0.1)
        _kill_group(child.pid, signal.SIGKILL)
    if asked and code in (0, -signal.SIGTERM):
        return 0
    return 128 - code if code < 0 else code  # killed by a signal: as a shell reports it
