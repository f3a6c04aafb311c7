"""The embedded Prefect server: `labelgate prefect up|down|status`, started on demand by `run`,
`demo` and `serve`.

Without an API URL, Prefect starts a temporary server inside every command ("ephemeral mode"):
10-18 s per command, the runs vanish with it, and on a loaded machine it misses its start-up
window (`Timed out while attempting to connect to ephemeral Prefect API server`). labelgate
keeps one long-lived `prefect server start` per workspace instead, managed like the embedded
Label Studio: bound to 127.0.0.1, its SQLite database, log and pid file in the git-ignored state
folder (`.labelgate/prefect`), analytics off. Flow runs, task runs and artifacts stay visible in
its UI after a command ends.

A `PREFECT_API_URL` set by the user wins: labelgate then never starts a server, and only checks
that that one answers.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx

from pipelines.files import atomic_write_json, exclusive, read_json
from pipelines.process import stop_group

DEFAULT_PORT = 4200        # Prefect's own default; if taken, a free port is picked and recorded
STARTUP_TIMEOUT_S = 180    # idle 2 cores: ~10 s to answer; loaded: several times that
_HEALTH_TIMEOUT_S = 5.0    # one /api/health request; a busy server still answers well within
_STOP_TIMEOUT_S = 15       # SIGTERM -> exit; uvicorn drains open connections first


class PrefectServerError(RuntimeError):
    pass


@dataclass(frozen=True)
class ServerStatus:
    running: bool          # answers /api/health
    api_url: str | None    # http://127.0.0.1:PORT/api (the UI is the same origin, path /)
    pid: int | None
    home: Path             # PREFECT_HOME of the embedded server: database, log, pid file
    log: Path


def prefect_bin() -> Path:
    """The `prefect` command of the pipeline environment (the one running this code)."""
    return Path(sys.executable).parent / "prefect"


def ui_url(api_url: str) -> str:
    return api_url.rstrip("/").removesuffix("/api")


def _log(home: Path) -> Path:
    return home / "server.log"


def _pid_file(home: Path) -> Path:
    # Prefect's own name for its server pid: `PREFECT_HOME=... prefect server stop` works too
    return home / "server.pid"


def _recorded_port(home: Path) -> int | None:
    path = home / "server.json"
    return int(read_json(path)["port"]) if path.exists() else None


def _pid(home: Path) -> int | None:
    """The pid in the pid file if that process lives and is the Prefect server of this `home`
    (a pid is reused after a reboot; a copied workspace carries the original's pid file: never
    signal a stranger or another workspace's server)."""
    try:
        pid = int(_pid_file(home).read_text().strip())
        os.kill(pid, 0)
    except (FileNotFoundError, ValueError, ProcessLookupError, PermissionError):
        return None
    environ = Path(f"/proc/{pid}/environ")  # Linux; elsewhere the pid file is trusted
    try:
        if f"PREFECT_HOME={home.resolve()}".encode() not in environ.read_bytes().split(b"\0"):
            return None
    except FileNotFoundError:
        pass
    except PermissionError:  # another user's process: not ours
        return None
    return pid


def healthy(api_url: str, *, timeout: float = _HEALTH_TIMEOUT_S) -> bool:
    """True if a Prefect API answers `GET {api_url}/health` with `true`."""
    try:
        r = httpx.get(f"{api_url.rstrip('/')}/health", timeout=timeout)
        return r.status_code == 200 and r.json() is True
    except (httpx.HTTPError, ValueError):  # ValueError: an answer that is not JSON
        return False


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        # SO_REUSEADDR: a port whose last connections sit in TIME-WAIT is free to listen on
        # (the server sets it too); without it a restart right after `down` looks "taken"
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _listeners(port: int) -> list[tuple[str, str]]:
    """(local address, socket inode) of each TCP socket listening on `port` (Linux /proc; an
    empty list elsewhere). IPv4 addresses are little-endian hex: 0100007F is 127.0.0.1."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except FileNotFoundError:
            continue
        for row in rows:
            f = row.split()
            addr, hexport = f[1].rsplit(":", 1)
            if f[3] == "0A" and int(hexport, 16) == port:  # 0A: LISTEN
                found.append((addr, f[9]))
    return found


def _serves(pid: int, port: int) -> bool:
    """Is `pid` the process listening on `port`? (Two workspaces can race for one port; the
    loser must not take the winner's health answer for its own.) True where /proc is missing."""
    inodes = {inode for _, inode in _listeners(port)}
    fd_dir = Path(f"/proc/{pid}/fd")
    if not Path("/proc/net/tcp").exists() or not fd_dir.exists():
        return True
    try:
        return any(os.readlink(fd).removeprefix("socket:[").removesuffix("]") in inodes
                   for fd in fd_dir.iterdir())
    except (FileNotFoundError, PermissionError):  # fds come and go while we look
        return False


def _any_free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _api_url(port: int) -> str:
    return f"http://127.0.0.1:{port}/api"


def status(home: str | Path) -> ServerStatus:
    """The embedded server of `home` (whatever PREFECT_API_URL says)."""
    home = Path(home)
    pid, port = _pid(home), _recorded_port(home)
    url = _api_url(port) if port else None
    return ServerStatus(running=bool(pid and url and healthy(url)), api_url=url, pid=pid,
                        home=home, log=_log(home))


def _tail(path: Path, lines: int = 8) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"


def up(home: str | Path, *, port: int = DEFAULT_PORT, timeout_s: float = STARTUP_TIMEOUT_S,
       say: Callable[[str], None] | None = None) -> str:
    """Start (or reuse) the embedded server whose PREFECT_HOME is `home`; return its API URL.

    Waits up to `timeout_s` for `/api/health`, saying so every 15 s (a loaded machine can take
    minutes). Two commands starting it at once take turns (a lock in `home`): one server."""
    home = Path(home).resolve()
    home.mkdir(parents=True, exist_ok=True)
    say = say or (lambda msg: print(msg, file=sys.stderr, flush=True))
    with exclusive(home / "up.lock", wait=True):
        pid, recorded = _pid(home), _recorded_port(home)
        if pid and recorded:
            url = _api_url(recorded)
            if healthy(url):
                return url
            # alive but silent: still starting (another command started it), or stuck
            return _wait(home, url, pid, None, timeout_s, say)
        if pid:  # a server we cannot reach: stop it rather than start a second one
            down(home)
        exe = prefect_bin()
        if not exe.exists():
            raise PrefectServerError(f"Prefect is not installed at {exe}; run `make setup`")
        chosen = recorded or port
        for _ in range(3):  # a port taken between the check and the bind: try another
            if not _port_free(chosen):
                taken, chosen = chosen, _any_free_port()
                say(f"port {taken} on 127.0.0.1 is taken by another program; the Prefect "
                    f"server uses {chosen} (recorded in {home / 'server.json'})")
            try:
                return _start(home, exe, chosen, timeout_s, say)
            except _PortRaced:  # taken between the check and the bind (another workspace)
                continue
        raise PrefectServerError(f"no free port for the Prefect server; see {_log(home)}")


class _PortRaced(Exception):
    pass


def _start(home: Path, exe: Path, chosen: int, timeout_s: float,
           say: Callable[[str], None]) -> str:
    atomic_write_json(home / "server.json", {"port": chosen})
    env = {k: v for k, v in os.environ.items()
           if k not in ("PREFECT_API_URL", "PREFECT_API_KEY", "PREFECT_PROFILE")}
    env.update({
        "PREFECT_HOME": str(home),                  # database: home/prefect.db
        "PREFECT_SERVER_API_HOST": "127.0.0.1",     # the UI derives its API URL from these
        "PREFECT_SERVER_API_PORT": str(chosen),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_UI_SHOW_PROMOTIONAL_CONTENT": "false",
    })
    log_start = _log(home).stat().st_size if _log(home).exists() else 0
    with open(_log(home), "ab") as log:
        proc = subprocess.Popen(
            [str(exe), "server", "start", "--host", "127.0.0.1", "--port", str(chosen),
             "--analytics-off"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
            start_new_session=True)  # outlives the command; `labelgate prefect down` stops it
    _pid_file(home).write_text(str(proc.pid))
    url = _api_url(chosen)
    say(f"starting the Prefect server at {ui_url(url)} (log: {_log(home)})")
    try:
        return _wait(home, url, proc.pid, proc, timeout_s, say)
    except PrefectServerError:
        with open(_log(home), "rb") as f:
            f.seek(log_start)
            if b"already in use" in f.read():
                raise _PortRaced() from None
        raise


def _wait(home: Path, url: str, pid: int, proc: subprocess.Popen | None, timeout_s: float,
          say: Callable[[str], None]) -> str:
    start = time.monotonic()
    next_note = start + 15
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    while time.monotonic() - start < timeout_s:
        if healthy(url) and _serves(pid, port):
            return url
        exited = proc.poll() if proc is not None else (None if _pid(home) else "gone")
        if exited is not None:
            _pid_file(home).unlink(missing_ok=True)
            raise PrefectServerError(
                f"the Prefect server exited while starting (code {exited}); last lines of "
                f"{_log(home)}:\n{_tail(_log(home))}")
        if time.monotonic() >= next_note:
            say(f"waiting for the Prefect server at {url} ({time.monotonic() - start:.0f} s of "
                f"{timeout_s:.0f} s; the machine is busy?)")
            next_note += 15
        time.sleep(0.5)
    down(home)
    raise PrefectServerError(
        f"the Prefect server did not answer {url}/health within {timeout_s:.0f} s (is the "
        f"machine overloaded?); see {_log(home)}. Try again when the load drops "
        "(`labelgate prefect up` starts it alone), or run a Prefect server yourself and set "
        "PREFECT_API_URL to its API URL")


def down(home: str | Path) -> bool:
    """Stop the embedded server (SIGTERM to its process group). True if one was running."""
    home = Path(home)
    pid = _pid(home)
    if pid is None:
        _pid_file(home).unlink(missing_ok=True)
        return False
    if not stop_group(pid, timeout_s=_STOP_TIMEOUT_S):
        _pid_file(home).unlink(missing_ok=True)
        return False
    _pid_file(home).unlink(missing_ok=True)
    print(f"stopped the Prefect server (pid {pid})", file=sys.stderr)
    return True


def ensure(home: str | Path, *, port: int = DEFAULT_PORT,
           timeout_s: float = STARTUP_TIMEOUT_S) -> str:
    """The API URL this command's flows report to, set as PREFECT_API_URL for this process.

    The user's PREFECT_API_URL wins (checked: it must answer); otherwise the embedded server is
    started if it is not running. Call before flows run; Prefect's settings are refreshed if it
    was imported already."""
    user = os.environ.get("PREFECT_API_URL")
    if user:
        for _ in range(3):  # a busy server gets a few seconds
            if healthy(user):
                return user
            time.sleep(2)
        raise PrefectServerError(
            f"PREFECT_API_URL is {user}, but no Prefect API answers {user.rstrip('/')}/health. "
            "Start that server, fix the URL (it ends in /api), or unset PREFECT_API_URL to let "
            "labelgate run its own on 127.0.0.1")
    url = up(home, port=port, timeout_s=timeout_s)
    os.environ["PREFECT_API_URL"] = url
    if "prefect.context" in sys.modules:  # settings were read at import: read them again
        sys.modules["prefect.context"].refresh_global_settings_context()
    return url
