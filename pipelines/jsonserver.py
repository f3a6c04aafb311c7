"""A small JSON-over-HTTP server that holds up against hostile clients (http.server underneath).

- Every request ends in a JSON answer with a clear status: 400 with the reason for a malformed
  request (http.server's own refusals included), 404/405/411/413/414/431 where they apply, 408
  for a request that does not arrive in time, 503 when every slot is taken, 500 only for a
  fault of ours (logged here with its traceback; the client gets one line).
- Bodies are bounded in size (`max_body_bytes`) and nesting (MAX_JSON_DEPTH); CPython's parser
  recursing on "[" x 10^6 is caught.
- Each connection has a read deadline for the whole request and an idle timeout per chunk, so a
  client sending one byte a second is cut off (slowloris); a fixed number of connections get a
  thread, the next is answered 503 at once.
- One request per connection (HTTP/1.0): the deadline is the connection's.

A service subclasses `JsonHandler` and implements `route(method, path)`.
"""
from __future__ import annotations

import io
import json
import logging
import socket
import threading
import time
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

log = logging.getLogger(__name__)

MAX_JSON_DEPTH = 32      # nesting levels a request body may have
MAX_REASON_CHARS = 300   # an error message quotes at most this much of what it is about


@dataclass(frozen=True)
class Limits:
    """What one client may hold. Defaults suit a caller on the same machine or network."""
    max_connections: int = 32      # handler threads; one more connection is answered 503
    read_deadline_s: float = 30.0  # the whole request (line, headers, body) must arrive by then
    idle_timeout_s: float = 10.0   # and no gap between two received chunks may be longer
    write_timeout_s: float = 10.0  # the whole answer must be taken by then
    max_body_bytes: int = 4_000_000


class HttpError(Exception):
    """Answered with `status` and this message: what the client got wrong (4xx), or a refusal
    the server chose (503 for a model file that fails its check, 502 for an upstream's)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def brief(text: str) -> str:
    """`text`, cut to MAX_REASON_CHARS (URLs and bodies can be megabytes)."""
    return text if len(text) <= MAX_REASON_CHARS else text[:MAX_REASON_CHARS] + "..."


def parse_body(raw: bytes) -> dict:
    """A JSON object nested at most MAX_JSON_DEPTH deep; HttpError (400) with the reason."""
    try:
        body = json.loads(raw or b"{}")
    except RecursionError:  # CPython's parser recurses once per level ("[" x 10^6)
        raise HttpError(400, f"request body nests deeper than {MAX_JSON_DEPTH} levels") from None
    except ValueError as exc:  # also UnicodeDecodeError and over-long integers
        raise HttpError(400, f"request body is not JSON: {brief(str(exc))}") from None
    if not isinstance(body, dict):
        raise HttpError(400, "request body must be a JSON object")
    stack = [(body, 1)]
    while stack:  # iterative: the depth check itself must not recurse
        node, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise HttpError(400, f"request body nests deeper than {MAX_JSON_DEPTH} levels")
        children = node.values() if isinstance(node, dict) else node
        stack.extend((c, depth + 1) for c in children if isinstance(c, (dict, list)))
    return body


class _DeadlineReader(io.RawIOBase):
    """The socket's bytes until a deadline for the whole request, with an idle timeout per
    chunk: TimeoutError once either passes."""

    def __init__(self, sock: socket.socket, limits: Limits) -> None:
        self.sock, self.limits = sock, limits
        self.deadline = time.monotonic() + limits.read_deadline_s
        self.received = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"request not received within {self.limits.read_deadline_s:g} s")
        self.sock.settimeout(min(left, self.limits.idle_timeout_s))
        n = self.sock.recv_into(buffer)
        self.received += n
        return n


class Server(ThreadingHTTPServer):
    """ThreadingHTTPServer with `limits.max_connections` handler slots: a connection beyond them
    is answered 503 by the accepting thread and never gets one."""

    daemon_threads = True
    request_queue_size = 128  # listen backlog; socketserver's 5 drops bursts of connections

    def __init__(self, address, handler: type[JsonHandler], *, limits: Limits) -> None:
        self.limits = limits
        self._slots = threading.BoundedSemaphore(limits.max_connections)
        super().__init__(address, handler)

    def process_request(self, request, client_address) -> None:
        if not self._slots.acquire(blocking=False):
            self._refuse(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def _refuse(self, request: socket.socket) -> None:
        """503, costing the accepting thread at most ~0.1 s: read what the client has sent (so
        closing does not reset the connection before it reads the answer), answer, close."""
        body = json.dumps({"error": "busy: every connection slot is taken; retry shortly"})
        try:
            request.settimeout(0.05)
            try:
                request.recv(65536)
            except TimeoutError:
                pass  # nothing sent yet: answer anyway
            request.sendall((f"HTTP/1.0 503 Service Unavailable\r\nContent-Type: "
                             f"application/json\r\nContent-Length: {len(body)}\r\n"
                             f"Retry-After: 1\r\nConnection: close\r\n\r\n{body}").encode())
        except OSError as exc:  # the client is gone: nobody to answer
            log.debug("could not send 503: %s", exc)
        finally:
            self.shutdown_request(request)


class JsonHandler(BaseHTTPRequestHandler):
    """One request per connection; subclasses implement `route` with `send_json` and
    `read_json_body`, and raise HttpError for what the client got wrong."""

    server: Server
    protocol_version = "HTTP/1.0"
    disable_nagle_algorithm = True  # headers and body are two writes: no 40 ms delayed-ACK wait

    def route(self, method: str, path: str) -> None:
        raise NotImplementedError

    def setup(self) -> None:
        super().setup()
        self.rfile.close()
        self._reader = _DeadlineReader(self.connection, self.server.limits)
        self.rfile = io.BufferedReader(self._reader)
        self._answered = False
        # what parse_request sets: a 408 may be due before the request line is complete
        self.command, self.requestline, self.request_version = "", "", "HTTP/1.0"

    def send_json(self, code: int, body: dict) -> None:
        if self._answered:
            return
        self._answered = True
        if self.request_version == "HTTP/0.9":
            self.request_version = "HTTP/1.0"  # a status line and headers, whatever was asked
        data = json.dumps(body).encode()  # ASCII: lone surrogates and all
        self.connection.settimeout(self.server.limits.write_timeout_s)
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None):
        """http.server's own refusals (bad request line, header too long, ...) in JSON."""
        self.close_connection = True
        self.send_json(code, {"error": brief(message or HTTPStatus(code).phrase)})

    def read_json_body(self) -> dict:
        if self.headers.get("Transfer-Encoding"):
            raise HttpError(411, "chunked bodies are not accepted; send Content-Length")
        values = self.headers.get_all("Content-Length") or []
        length = values[0].strip() if len(values) == 1 else ""
        if not (length.isascii() and length.isdigit()):
            raise HttpError(411, "exactly one numeric Content-Length header is required")
        if int(length) > self.server.limits.max_body_bytes:
            raise HttpError(413, f"request body over {self.server.limits.max_body_bytes} bytes")
        raw = self.rfile.read(int(length))
        if len(raw) < int(length):
            raise HttpError(400, f"request body ended after {len(raw)} of {length} bytes")
        return parse_body(raw)

    def handle_one_request(self) -> None:
        try:
            self.raw_requestline = self.rfile.readline(65537)
            if len(self.raw_requestline) > 65536:
                self.send_error(HTTPStatus.REQUEST_URI_TOO_LONG)
                return
            if not self.raw_requestline:
                self.close_connection = True
                return
            if not self.parse_request():
                return  # answered by send_error
            self.close_connection = True
            self.route(self.command, self.path.split("?", 1)[0].rstrip("/"))
        except TimeoutError:
            self.close_connection = True
            if self._reader.received:
                self._answer_quietly(408, "request not received in time: idle for "
                                     f"{self.server.limits.idle_timeout_s:g} s or longer than "
                                     f"{self.server.limits.read_deadline_s:g} s in all")
        except HttpError as exc:
            self._answer_quietly(exc.status, str(exc))
        except ConnectionError as exc:
            log.debug("client went away: %s", exc)
        except Exception:  # noqa: BLE001 - the request boundary: logged here, 500 to the client
            log.exception("internal error on %s", brief(self.requestline))
            self._answer_quietly(500, "internal error (see the server's log)")

    def _answer_quietly(self, code: int, message: str) -> None:
        try:
            self.send_json(code, {"error": message})
        except OSError as exc:  # the client is gone or stopped reading: nobody to answer
            log.debug("could not answer %d: %s", code, exc)

    def log_message(self, *args) -> None:  # quiet: requests may carry task data
        pass
