"""Stopping the servers labelgate starts (Label Studio, Prefect): each runs in its own process
group, so one signal reaches the server and the workers it forked."""
from __future__ import annotations

import os
import signal
import time

# Every labelgate process and the ones it starts (dvc stages, Prefect workers' flow runs):
# no telemetry from any tool, and idle OpenMP threads sleep instead of spinning -- on a shared
# 2-core machine spinning threads stalled each other: 12 epochs of the emoji demo took
# 123-211 s, with PASSIVE 34-37 s. (cli._quiet_env sets them; work pools pass them on.)
QUIET_ENV = {"OMP_WAIT_POLICY": "PASSIVE", "GX_ANALYTICS_ENABLED": "false",
             "DVC_NO_ANALYTICS": "1"}


def stop_group(pid: int, *, timeout_s: float) -> bool:
    """SIGTERM the process group `pid` leads, wait up to `timeout_s` for its leader to exit,
    then SIGKILL the group. False if no such process was running."""
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return False
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if os.waitpid(pid, os.WNOHANG)[0] == pid:  # our own child (tests): reap it
                return True
        except ChildProcessError:
            pass  # started by another command (the usual CLI case)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    os.killpg(pid, signal.SIGKILL)
    return True
