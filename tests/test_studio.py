"""pipelines.studio: the embedded Label Studio's lifecycle, on a real server.

Issue 10: `labelgate studio up` right after `studio down` refused for 40-65 s ("port ... is taken
by another program"): the port probe bound without SO_REUSEADDR and met the TIME-WAIT sockets
the stopped server left behind. These tests reproduce that state and check it no longer refuses,
while a port that really is taken still is.
"""
from __future__ import annotations

import socket

import httpx
import pytest

from pipelines import studio
from tests.conftest import free_port

TCP_TIME_WAIT = "06"  # st column of /proc/net/tcp


def _states(port: int) -> list[str]:
    """TCP states of every IPv4/IPv6 socket whose local port is `port` (Linux /proc)."""
    states = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = open(table).read().splitlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            if int(local.rsplit(":", 1)[1], 16) == port:
                states.append(state)
    return states


def _plain_bind_works(port: int) -> bool:
    """The old probe: bind without SO_REUSEADDR."""
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@pytest.mark.slow
def test_up_down_up_on_the_same_port_at_once(tmp_path):
    """Real Label Studio: first start ~40 s on 2 idle cores (migrations; measured 224 s at load
    average 12), the restart ~4 s idle (21 s at that load)."""
    data, port = tmp_path / "studio", free_port()
    conn = studio.up(data, port=port)
    try:
        assert conn.url == f"http://127.0.0.1:{port}"
        # A browser tab or a client with keep-alive holds a connection when the server stops:
        # the server's side of it is what lingers in TIME-WAIT on the server's port.
        with httpx.Client() as client:
            assert client.get(f"{conn.url}/health").status_code == 200
            assert studio.down(data)
        assert TCP_TIME_WAIT in _states(port), _states(port)   # the state the bug needed ...
        assert not _plain_bind_works(port)                       # ... and the old probe's refusal
        again = studio.up(data, port=port)   # at once, same port: the old probe refused here
        assert again == conn
        assert studio.status(data)["running"]
        projects = httpx.get(f"{again.url}/api/projects",
                             headers={"Authorization": f"Token {again.api_key}"}, timeout=30)
        assert projects.status_code == 200                       # the same account, same key
    finally:
        studio.down(data)
    assert not studio.status(data)["running"]


def test_a_port_that_is_really_taken_is_still_refused(tmp_path):
    """The probe must still see a listener (Label Studio would silently move to another port)."""
    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        assert not studio._port_free(port)
        with pytest.raises(studio.StudioError, match=f"port {port} on 127.0.0.1 is taken"):
            studio.up(tmp_path / "studio", port=port)
    assert studio._port_free(port)
    assert not (tmp_path / "studio" / "server.pid").exists()   # nothing was started


def test_a_bound_but_idle_port_is_refused():
    """Bound without listening, no SO_REUSEADDR: still someone else's port."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        assert not studio._port_free(holder.getsockname()[1])
