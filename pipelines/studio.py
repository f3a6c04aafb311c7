"""The embedded Label Studio server: `labelgate studio up|down|status`.

Label Studio runs from its own virtualenv (`.venv-studio`): it pins python-json-logger, redis and
pytz below what Prefect needs, so the two can't share one. It binds to 127.0.0.1 only; its data
(SQLite, uploads, the SECRET_KEY that signs tokens) and a generated admin account live in a
git-ignored folder. The API key is written to a 0600 file there and never printed in full.
"""
from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from pipelines.files import atomic_write_json, read_json
from pipelines.labelstudio import Connection, credentials_file
from pipelines.process import stop_group

# First start runs migrations: ~37 s on 2 idle cores, over 180 s on the same 2 cores at load
# average 11 (measured); later starts ~4 s. Waiting only while the process lives costs nothing.
STARTUP_TIMEOUT_S = 600
STOP_TIMEOUT_S = 10      # SIGTERM -> exit takes ~1 s; then SIGKILL


class StudioError(RuntimeError):
    pass


# Label Studio 1.23's default SSRF block list (core/utils/io.py) without loopback.
BANNED_SUBNETS = (
    "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "169.254.0.0/16", "172.16.0.0/12",
    "192.0.0.0/24", "192.0.2.0/24", "192.88.99.0/24", "192.168.0.0/16", "198.18.0.0/15",
    "198.51.100.0/24", "203.0.113.0/24", "224.0.0.0/4", "233.252.0.0/24", "240.0.0.0/4",
    "255.255.255.255/32", "::/128", "::ffff:0:0/96", "::ffff:0:0:0/96", "64:ff9b::/96",
    "64:ff9b:1::/48", "100::/64", "2001:0000::/32", "2001:20::/28", "2001:db8::/32",
    "2002::/16", "fc00::/7", "fe80::/10", "ff00::/8")


def studio_bin() -> Path:
    """LABELGATE_STUDIO_BIN, else the `label-studio` of `.venv-studio` next to this checkout."""
    env = os.environ.get("LABELGATE_STUDIO_BIN")
    if env:
        return Path(env)
    return Path(__file__).resolve().parent.parent / ".venv-studio" / "bin" / "label-studio"


def _pid(studio_dir: Path) -> int | None:
    try:
        pid = int((studio_dir / "server.pid").read_text().strip())
        os.kill(pid, 0)
    except (FileNotFoundError, ValueError, ProcessLookupError, PermissionError):
        return None
    return pid


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=2.0).status_code == 200
    except httpx.HTTPError:
        return False


def _port_free(port: int) -> bool:
    """True unless a socket holds 127.0.0.1:`port`. SO_REUSEADDR, as Label Studio's own server
    (Django's runserver) sets it: the TIME-WAIT connections a just-stopped server leaves behind
    for ~60 s don't count (they made `studio up` after `studio down` refuse); a listener does."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def masked(key: str) -> str:
    return f"{key[:4]}…{key[-2:]}" if len(key) > 8 else "…"


def status(studio_dir: str | Path) -> dict:
    studio_dir = Path(studio_dir)
    creds_path = credentials_file(studio_dir)
    creds = read_json(creds_path) if creds_path.exists() else None
    pid = _pid(studio_dir)
    url = creds["url"] if creds else None
    return {"running": bool(pid and url and _healthy(url)), "pid": pid, "url": url,
            "data_dir": str(studio_dir)}


def up(studio_dir: str | Path, *, port: int) -> Connection:
    """Start (or reuse) the embedded server; return a connection to it."""
    studio_dir = Path(studio_dir).resolve()
    studio_dir.mkdir(parents=True, exist_ok=True)
    files_root = studio_dir / "files"
    files_root.mkdir(exist_ok=True)
    creds_path = credentials_file(studio_dir)
    if creds_path.exists():
        creds = read_json(creds_path)
    else:
        creds = {"url": f"http://127.0.0.1:{port}", "username": "admin@labelgate.local",
                 "password": secrets.token_urlsafe(18), "api_key": secrets.token_hex(20)}
        atomic_write_json(creds_path, creds)
        os.chmod(creds_path, 0o600)
    conn = Connection(url=creds["url"], api_key=creds["api_key"])
    if _pid(studio_dir) and _healthy(conn.url):
        return conn
    port = int(conn.url.rsplit(":", 1)[1])
    if not _port_free(port):
        # Label Studio would silently pick another port; refuse instead of guessing.
        raise StudioError(f"port {port} on 127.0.0.1 is taken by another program; free it or "
                          f"delete {creds_path} and set studio.port in params.yaml")
    exe = studio_bin()
    if not exe.exists():
        raise StudioError(f"Label Studio is not installed at {exe}; run `make setup` "
                          "(or set LABELGATE_STUDIO_BIN)")
    env = {k: v for k, v in os.environ.items() if not k.startswith("LABEL_STUDIO_")}
    env.update({
        "LABEL_STUDIO_BASE_DATA_DIR": str(studio_dir / "data"),
        "LABEL_STUDIO_USERNAME": creds["username"],
        "LABEL_STUDIO_PASSWORD": creds["password"],
        "LABEL_STUDIO_USER_TOKEN": creds["api_key"],      # applied on first start only
        "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true",
        "LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED": "true",
        "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT": str(files_root),  # default root is `/`
        "LABEL_STUDIO_DISABLE_SIGNUP_WITHOUT_LINK": "true",
        "SENTRY_DSN": "", "FRONTEND_SENTRY_DSN": "",
        "LABEL_STUDIO_LATEST_VERSION_CHECK": "false",
        "LABEL_STUDIO_COLLECT_ANALYTICS": "false",
        # This server is local-only (127.0.0.1); let it reach a local `labelgate backend`:
        # loopback leaves Label Studio's SSRF block list, every other reserved range stays.
        "ML_BLOCK_LOCAL_IP": "false",
        "USE_DEFAULT_BANNED_SUBNETS": "false",
        "USER_ADDITIONAL_BANNED_SUBNETS": ",".join(BANNED_SUBNETS),
    })
    log = open(studio_dir / "server.log", "ab")
    proc = subprocess.Popen(
        [str(exe), "start", "--no-browser", "--internal-host", "127.0.0.1", "--port", str(port),
         "--host", conn.url],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
        start_new_session=True)  # outlives the CLI call; `studio down` stops it
    (studio_dir / "server.pid").write_text(str(proc.pid))
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise StudioError(f"Label Studio exited with code {proc.returncode} while starting; "
                              f"see {studio_dir / 'server.log'}")
        if _healthy(conn.url):
            return conn
        time.sleep(0.5)
    down(studio_dir)
    raise StudioError(f"Label Studio did not answer {conn.url}/health within "
                      f"{STARTUP_TIMEOUT_S} s; see {studio_dir / 'server.log'}")


def down(studio_dir: str | Path) -> bool:
    """Stop the embedded server (SIGTERM to its process group). True if one was running."""
    studio_dir = Path(studio_dir)
    pid = _pid(studio_dir)
    if pid is None:
        return False
    if not stop_group(pid, timeout_s=STOP_TIMEOUT_S):
        return False
    (studio_dir / "server.pid").unlink(missing_ok=True)
    print(f"stopped Label Studio (pid {pid})", file=sys.stderr)
    return True
