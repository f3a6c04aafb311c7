"""A misbehaving HTTP front for the S3 test server (fault injection: allowed by the rules; the
S3 server behind it is real). It forwards every request to `upstream` unless told to fail:

    proxy = FaultProxy(s3.endpoint)          # .endpoint is what storage.endpoint_url names
    proxy.fail_next(2, status=503)            # the next 2 requests answer 503 SlowDown
    proxy.hang_after(10)                      # after 10 more GETs of objects: never answer
    proxy.heal()
    proxy.requests                            # [(method, path)] of every request received

A hung request holds its connection open without answering, as a server behind a dead network
path does; `heal()` releases them (they then get 503).
"""
from __future__ import annotations

import http.client
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit


class FaultProxy:
    def __init__(self, upstream: str) -> None:
        self.upstream = urlsplit(upstream)
        self.requests: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        self._fail: list[tuple[int, bytes, dict]] = []
        self._hang_after: int | None = None
        self._healed = threading.Event()
        self.canned: tuple[int, bytes, dict] | None = None  # answer every request with this
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def _handle(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                action = proxy._decide(self.command, self.path)
                if action == "hang":
                    proxy._healed.wait(60)
                    action = (503, b"<Error><Code>SlowDown</Code></Error>", {})
                if action is None:
                    action = proxy._forward(self.command, self.path, dict(self.headers), body)
                status, data, headers = action
                self.send_response(status)
                for k, v in headers.items():
                    if k.lower() not in ("content-length", "transfer-encoding", "connection"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle

        class Server(ThreadingHTTPServer):
            def handle_error(self, request, client_address) -> None:
                pass  # a client that gave up on a hung request: nothing to report

        self._server = Server(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        self._local = threading.local()

    # -- what to do -------------------------------------------------------------------------
    def fail_next(self, n: int, *, status: int = 503,
                  body: bytes = b"<Error><Code>SlowDown</Code></Error>",
                  headers: dict | None = None) -> None:
        with self._lock:
            self._fail += [(status, body, headers or {})] * n

    def hang_after(self, n_gets: int) -> None:
        """Object GETs after the next `n_gets` hang (listings hang too, from then on)."""
        with self._lock:
            self._hang_after = n_gets
            self._healed.clear()

    def heal(self) -> None:
        with self._lock:
            self._hang_after, self._fail, self.canned = None, [], None
        self._healed.set()

    def gets(self, path_part: str = "") -> int:
        return sum(1 for m, p in self.requests if m == "GET" and path_part in p)

    def _decide(self, method: str, path: str):
        with self._lock:
            self.requests.append((method, path))
            if self.canned is not None:
                return self.canned
            if self._fail:
                return self._fail.pop(0)
            if self._hang_after is not None:
                if self._hang_after <= 0:
                    return "hang"
                if method == "GET" and "list-type" not in path:
                    self._hang_after -= 1
            return None

    def _forward(self, method: str, path: str, headers: dict, body: bytes):
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = http.client.HTTPConnection(
                self.upstream.hostname, self.upstream.port, timeout=30)
        try:
            conn.request(method, path, body=body or None, headers=headers)
            resp = conn.getresponse()
            return resp.status, resp.read(), dict(resp.getheaders())
        except (OSError, http.client.HTTPException):
            self._local.conn = None
            conn.close()
            raise

    def close(self) -> None:
        self.heal()
        self._server.shutdown()
        self._server.server_close()
