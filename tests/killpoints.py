"""Kill a real process at each of its write events: run a labelgate entry point (`python -m
MODULE ARGS`) in a subprocess that SIGKILLs itself right before its Nth write under a folder.

The process watches itself through Python's audit hooks (PEP 578), not through a hook in
labelgate's code: the events are file opens for writing (creations, appends, mkstemp), renames,
removals, truncations and directory creations, and (counted apart) network connections. SIGKILL
cannot be caught, so whatever the process had not written stays unwritten, exactly as after
`kill -9`.

Plain functions, no fixtures (tests/conftest.py is owned elsewhere).
"""
from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

_DRIVER = r'''
import os, signal, sys, runpy
root = os.path.realpath(os.environ["KILLPOINTS_ROOT"])
kill_at = int(os.environ.get("KILLPOINTS_AT", "-1"))
connect_kill_at = int(os.environ.get("KILLPOINTS_CONNECT_AT", "-1"))
count = connects = 0
WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

def _path(p):
    if isinstance(p, int):
        try:
            return os.readlink(f"/proc/self/fd/{p}")
        except OSError:
            return ""
    try:
        return os.path.realpath(os.fsdecode(p))
    except (TypeError, ValueError):
        return ""

def hook(event, args):
    global count, connects
    if event == "socket.connect":
        if connects == connect_kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        connects += 1
        return
    if event == "open":
        path, mode, flags = args
        if not (flags or 0) & WRITE and not (mode and any(c in str(mode) for c in "wax+")):
            return
    elif event == "os.rename":
        path = args[1]  # named by what it replaces
    elif event in ("os.remove", "os.rmdir", "os.mkdir", "os.truncate"):
        path = args[0]
    else:
        return
    path = _path(path)
    if path != root and not path.startswith(root + os.sep):
        return
    if count == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
    sys.stderr.write(f"KILLPOINT {count} {event} {os.path.relpath(path, root)}\n")
    count += 1

sys.addaudithook(hook)
module = sys.argv[1]
sys.argv = [module] + sys.argv[2:]
runpy.run_module(module, run_name="__main__", alter_sys=True)
'''


@dataclass(frozen=True)
class Run:
    returncode: int
    events: list[str]      # "event relative/path", in order
    stdout: str
    stderr: str

    @property
    def killed(self) -> bool:
        return self.returncode == -9


def run(module: str, args: list[str], *, root: Path, kill_at: int | None = None,
        kill_at_connect: int | None = None, env: dict[str, str] | None = None,
        cwd: Path | None = None, timeout_s: float = 300) -> Run:
    """`python -m module args`, killed right before its write event number `kill_at` (0-based)
    under `root`, or right before its network connection number `kill_at_connect`, or run to
    the end (both None), listing its write events."""
    full_env = {**os.environ, **(env or {}), "KILLPOINTS_ROOT": str(root),
                "KILLPOINTS_AT": str(-1 if kill_at is None else kill_at),
                "KILLPOINTS_CONNECT_AT": str(-1 if kill_at_connect is None else kill_at_connect),
                "PYTHONDONTWRITEBYTECODE": "1",
                "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", _DRIVER, module, *args], env=full_env,
                          cwd=cwd or REPO, capture_output=True, text=True, timeout=timeout_s)
    events = [line.split(" ", 2)[2] for line in proc.stderr.splitlines()
              if line.startswith("KILLPOINT ")]
    return Run(proc.returncode, events, proc.stdout, proc.stderr)
