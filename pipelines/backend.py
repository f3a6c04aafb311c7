"""The production model as a Label Studio ML backend: `labelgate backend [--port 9090]`.

Speaks Label Studio's ML-backend protocol (GET /health, POST /setup, POST /predict), so Label
Studio can ask for predictions interactively or through "Retrieve predictions". It serves only
the registry's production model, verified against its sha256 before loading, and reloads it
when production changes (promotion, approval, rollback). It binds to 127.0.0.1 unless told
otherwise and fetches task images from the configured Label Studio only (pipelines.labelstudio
rules), decoding them with pipelines.images (its pixel and time budgets apply).

Every request ends in a JSON answer: 400 (with the reason) for a malformed request, 408 for one
that does not arrive in time, 503 when all connection slots are taken or the production file
fails its check, 500 only for a fault of ours (logged here, never a traceback to the client).
A task that cannot be predicted (no image URL, an image that cannot be fetched or decoded) gets
`{"error": reason}` without a `result`: Label Studio creates no prediction for it and logs the
reason, and the other tasks of the request are still predicted.

Connect it in Label Studio: Project settings -> Model -> Connect model -> URL
http://127.0.0.1:9090. (The embedded Label Studio allows backends on local addresses; a server
you run yourself needs ML_BLOCK_LOCAL_IP=false for that, or the backend on a routable address.)
"""
from __future__ import annotations

import io
import json
import logging
import queue
import socket
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import numpy as np
import torch

from pipelines import images, net, registry
from pipelines.labelstudio import (AuthError, ImageFetchError, LabelStudioError, Studio,
                                   choice_result)
from pipelines.preannotate import certainty
from pipelines.settings import Params

log = logging.getLogger(__name__)

# Label Studio sends every task selected for "Retrieve predictions" in one call (~0.5-2 KB of
# JSON per task) and waits ML_TIMEOUT_PREDICT = 100 s for the answer.
MAX_BODY_BYTES = 4_000_000
MAX_TASKS = 1000         # per predict call
MAX_JSON_DEPTH = 32      # Label Studio's task JSON nests ~6 deep
MAX_REASON_CHARS = 300   # a per-task error quotes at most this much (URLs can be megabytes)


@dataclass(frozen=True)
class Limits:
    """What one client may hold. Defaults suit Label Studio on the same machine or network."""
    max_connections: int = 32      # handler threads; one more connection is answered 503
    read_deadline_s: float = 30.0  # the whole request (line, headers, body) must arrive by then
    idle_timeout_s: float = 10.0   # and no gap between two received chunks may be longer
    write_timeout_s: float = 10.0  # the whole answer must be taken by then
    predict_budget_s: float = 60.0  # image fetching per request; stays under Label Studio's 100 s
    fetch_workers: int = 8         # image fetches in flight, all requests together
    fetches_per_request: int = 4   # so one big request leaves workers for interactive ones


class ModelHolder:
    """The production model, reloaded (and re-verified) when the registry's pointer changes."""

    def __init__(self, registry_dir: str | Path, device: torch.device) -> None:
        self.registry_dir, self.device = Path(registry_dir), device
        self._lock = threading.Lock()
        self._loaded: tuple | None = None
        self._sha: str | None = None

    def get(self):
        """(model, classes, image_size, pointer), or None while there is no production model."""
        pointer = registry.production(self.registry_dir)
        with self._lock:  # held only to swap models (a load is ~10 ms), never to predict
            if pointer is None:
                self._loaded, self._sha = None, None
            elif pointer["sha256"] != self._sha:
                self._loaded = registry.load_production(self.registry_dir, device=self.device)
                self._sha = pointer["sha256"]
            return self._loaded


class _Job:
    def __init__(self, model: torch.nn.Module, x: np.ndarray) -> None:
        self.model, self.x = model, x
        self.done = threading.Event()
        self.probs: np.ndarray | None = None
        self.error: BaseException | None = None


class Inference:
    """One thread runs the model; the images of concurrent requests waiting for it are stacked
    into one batch (no waiting window: whatever queued during the previous batch). Requests
    never hold a lock while inference runs."""

    MAX_BATCH = 1024  # images per forward pass: 784 B each at 28x28

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="labelgate-inference",
                                        daemon=True)
        self._thread.start()

    def predict(self, model: torch.nn.Module, x: np.ndarray) -> np.ndarray:
        """`(N, S, S)` uint8 -> `(N, K)` class probabilities."""
        job = _Job(model, x)
        self._queue.put(job)
        job.done.wait()
        if job.error is not None:
            raise job.error
        return job.probs

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while (first := self._queue.get()) is not None:
            jobs, n = [first], len(first.x)
            while n < self.MAX_BATCH:
                try:
                    job = self._queue.get_nowait()
                except queue.Empty:
                    break
                if job is None:
                    self._queue.put(None)  # stop after this batch
                    break
                jobs.append(job)
                n += len(job.x)
            for model in {id(j.model): j.model for j in jobs}.values():
                group = [j for j in jobs if j.model is model]
                try:
                    probs = net.predict_proba(model, np.concatenate([j.x for j in group]),
                                              device=self.device)
                except Exception as exc:  # noqa: BLE001 - re-raised in each waiting request
                    for j in group:
                        j.error = exc
                else:
                    start = 0
                    for j in group:
                        j.probs, start = probs[start:start + len(j.x)], start + len(j.x)
                for j in group:
                    j.done.set()


def _reason(text: str) -> str:
    return text if len(text) <= MAX_REASON_CHARS else text[:MAX_REASON_CHARS] + "..."


class Predictor:
    """Tasks in, one answer per task out: fetch + decode in a bounded pool, then one batch."""

    def __init__(self, holder: ModelHolder, studio: Studio, *, params: Params,
                 limits: Limits) -> None:
        self.holder, self.studio, self.params, self.limits = holder, studio, params, limits
        self.inference = Inference(holder.device)
        self._pool = ThreadPoolExecutor(limits.fetch_workers, thread_name_prefix="labelgate-fetch")

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.inference.close()

    def _image(self, url: str, size: int) -> np.ndarray | str:
        """The model's input for one task, or why there is none. AuthError propagates: a key
        Label Studio refuses is a server-wide failure, not this task's."""
        try:
            data = self.studio.fetch_image(url, max_bytes=self.params.pull.max_image_bytes)
            return images.to_array(data, size)
        except AuthError:
            raise
        except (ImageFetchError, images.BadImage) as exc:
            return _reason(str(exc))
        except LabelStudioError as exc:
            return _reason(f"image could not be fetched: {exc}")
        except (ValueError, httpx.InvalidURL) as exc:
            # a URL httpx or urllib cannot even parse; labelstudio.py should already refuse it
            return _reason(f"malformed image URL: {type(exc).__name__}: {exc}")

    def _images(self, urls: dict[int, str], size: int) -> dict[int, np.ndarray | str]:
        """Fetch with at most `fetches_per_request` in flight; what is not done within
        `predict_budget_s` is reported per task (the next "Retrieve predictions" asks again)."""
        deadline = time.monotonic() + self.limits.predict_budget_s
        todo = iter(urls.items())
        pending: dict[Future, int] = {}
        out: dict[int, np.ndarray | str] = {}

        def submit() -> None:
            if (item := next(todo, None)) is not None:
                pending[self._pool.submit(self._image, item[1], size)] = item[0]

        for _ in range(self.limits.fetches_per_request):
            submit()
        try:
            while pending:
                done, _ = wait(pending, timeout=max(0.0, deadline - time.monotonic()),
                               return_when=FIRST_COMPLETED)
                if not done:
                    break
                for future in done:
                    out[pending.pop(future)] = future.result()
                    submit()
        finally:
            for future in pending:
                future.cancel()
        late = f"image not fetched within the {self.limits.predict_budget_s:g} s request budget"
        for i in [*pending.values(), *(i for i, _ in todo)]:
            out[i] = late
        return out

    def predict(self, tasks: list) -> tuple[list[dict], str | None]:
        """One entry per task, in order: a prediction, or `{"error": reason}`."""
        loaded = self.holder.get()
        if loaded is None:
            return [{"error": "no production model yet"} for _ in tasks], None
        model, classes, size, pointer = loaded
        version, key = pointer["id"], self.params.studio.image_key
        out: list[dict] = [{} for _ in tasks]
        urls: dict[int, str] = {}
        for i, task in enumerate(tasks):
            data = task.get("data") if isinstance(task, dict) else None
            url = data.get(key) if isinstance(data, dict) else None
            if not isinstance(task, dict):
                out[i] = {"error": "task is not a JSON object"}
            elif not isinstance(data, dict):
                out[i] = {"error": "task.data is not a JSON object"}
            elif not isinstance(url, str) or not url:
                out[i] = {"error": f"task.data.{key} is not an image URL"}
            else:
                urls[i] = url
        fetched = self._images(urls, size) if urls else {}
        good = [i for i, v in fetched.items() if isinstance(v, np.ndarray)]
        for i, v in fetched.items():
            if isinstance(v, str):
                out[i] = {"error": v}
        if good:
            probs = self.inference.predict(model, np.stack([fetched[i] for i in good]))
            scores = certainty(probs, self.params.preannotate.uncertainty)
            for i, p, s in zip(good, probs, scores):
                out[i] = {"result": choice_result(classes[int(p.argmax())]),
                          "score": round(float(s), 5)}
        return [{**o, "model_version": version} for o in out], version


class ClientError(Exception):
    """The request is malformed; answered with `status` and this message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def parse_body(raw: bytes) -> dict:
    """A JSON object, within MAX_JSON_DEPTH; ClientError (400) with the reason otherwise."""
    try:
        body = json.loads(raw or b"{}")
    except RecursionError:  # CPython's parser recurses once per level ("[" x 10^6)
        raise ClientError(400, f"request body nests deeper than {MAX_JSON_DEPTH} levels") from None
    except ValueError as exc:  # also UnicodeDecodeError and over-long integers
        raise ClientError(400, f"request body is not JSON: {_reason(str(exc))}") from None
    if not isinstance(body, dict):
        raise ClientError(400, "request body must be a JSON object")
    stack = [(body, 1)]
    while stack:  # iterative: the depth check itself must not recurse
        node, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise ClientError(400, f"request body nests deeper than {MAX_JSON_DEPTH} levels")
        children = node.values() if isinstance(node, dict) else node
        stack.extend((c, depth + 1) for c in children if isinstance(c, (dict, list)))
    return body


class _DeadlineReader(io.RawIOBase):
    """The socket's bytes, until a deadline for the whole request and an idle timeout per
    chunk: a client sending one byte a second is cut off at the deadline (slowloris)."""

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
    """A ThreadingHTTPServer with a fixed number of handler slots: a connection beyond them is
    answered 503 at once instead of getting a thread. Owns the process's torch thread count
    while it runs (restored by server_close)."""

    daemon_threads = True
    request_queue_size = 128  # listen backlog; socketserver's 5 drops bursts of connections

    def __init__(self, address, handler, *, predictor: Predictor, limits: Limits) -> None:
        self.predictor, self.limits = predictor, limits
        self._slots = threading.BoundedSemaphore(limits.max_connections)
        # One image per request gains nothing from intra-op threads, and on a busy machine they
        # cost: batch-1 inference took 190-230 ms with 2 OpenMP threads on a loaded 2-core
        # machine, 1.5 ms with one. Concurrency comes from batching requests instead.
        self._torch_threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            super().__init__(address, handler)
        except BaseException:
            self._release_resources()
            raise

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
        """503 on the accepting thread, bounded to ~0.1 s: read what the client already sent (so
        closing does not reset the connection before it reads the answer), answer, close."""
        body = json.dumps({"error": "backend busy: all connection slots are taken; retry"})
        try:
            request.settimeout(0.05)
            try:
                request.recv(65536)
            except TimeoutError:
                pass  # the client has not sent its request yet; answer anyway
            request.sendall((f"HTTP/1.0 503 Service Unavailable\r\nContent-Type: "
                             f"application/json\r\nContent-Length: {len(body)}\r\n"
                             f"Retry-After: 1\r\nConnection: close\r\n\r\n{body}").encode())
        except OSError as exc:  # the client is gone: nobody to answer
            log.debug("could not send 503: %s", exc)
        finally:
            self.shutdown_request(request)

    def _release_resources(self) -> None:
        self.predictor.close()
        torch.set_num_threads(self._torch_threads)

    def server_close(self) -> None:
        super().server_close()
        self._release_resources()


class Handler(BaseHTTPRequestHandler):
    """One request per connection (HTTP/1.0): the read deadline is the connection's."""

    server: Server
    protocol_version = "HTTP/1.0"
    disable_nagle_algorithm = True  # headers and body are two writes: no 40 ms delayed-ACK wait

    def setup(self) -> None:
        super().setup()
        self.rfile.close()
        self._reader = _DeadlineReader(self.connection, self.server.limits)
        self.rfile = io.BufferedReader(self._reader)
        self._answered = False
        # what parse_request would set: a 408 may be due before the request line is complete
        self.command, self.requestline, self.request_version = "", "", "HTTP/1.0"

    def _send(self, code: int, body: dict, *, retry_after: int | None = None) -> None:
        if self._answered:
            return
        self._answered = True
        if self.request_version == "HTTP/0.9":
            self.request_version = "HTTP/1.0"  # answer with a status line and headers regardless
        data = json.dumps(body).encode()
        self.connection.settimeout(self.server.limits.write_timeout_s)
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if retry_after is not None:
            self.send_header("Retry-After", str(retry_after))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None):
        """http.server's own refusals (bad request line, header too long, ...) in JSON."""
        self.close_connection = True
        self._send(code, {"error": _reason(message or HTTPStatus(code).phrase)})

    def handle_one_request(self) -> None:
        try:
            self.raw_requestline = self.rfile.readline(65537)
            if len(self.raw_requestline) > 65536:
                self.requestline, self.request_version, self.command = "", "", ""
                self.send_error(HTTPStatus.REQUEST_URI_TOO_LONG)
                return
            if not self.raw_requestline:
                self.close_connection = True
                return
            if not self.parse_request():
                return  # answered by send_error
            self.close_connection = True
            self._dispatch()
        except TimeoutError:
            self.close_connection = True
            if self._reader.received:
                self._answer_quietly(408, "request not received in time: the connection was "
                                     f"idle {self.server.limits.idle_timeout_s:g} s or took over "
                                     f"{self.server.limits.read_deadline_s:g} s")
        except ClientError as exc:
            self._answer_quietly(exc.status, str(exc))
        except registry.RegistryError as exc:
            # a production file that fails its sha256 check is never served
            self._answer_quietly(503, f"production model refused: {exc}")
        except ConnectionError as exc:
            log.debug("client went away: %s", exc)
        except Exception:  # noqa: BLE001 - the request boundary: logged here, 500 to the client
            log.exception("labelgate backend: internal error on %s", self.requestline[:200])
            self._answer_quietly(500, "internal error in the labelgate backend (see its log)")

    def _answer_quietly(self, code: int, message: str) -> None:
        try:
            self._send(code, {"error": message})
        except OSError as exc:  # the client is gone or stopped reading: nobody to answer
            log.debug("could not answer %d: %s", code, exc)

    def _read_body(self) -> dict:
        if self.headers.get("Transfer-Encoding"):
            raise ClientError(411, "chunked bodies are not accepted; send Content-Length")
        length = self.headers.get_all("Content-Length") or []
        if len(length) != 1 or not length[0].strip().isascii() or not length[0].strip().isdigit():
            raise ClientError(411, "exactly one numeric Content-Length header is required")
        size = int(length[0])
        if size > MAX_BODY_BYTES:
            raise ClientError(413, f"request body over {MAX_BODY_BYTES} bytes")
        raw = self.rfile.read(size)
        if len(raw) < size:
            raise ClientError(400, f"request body ended after {len(raw)} of {size} bytes")
        return parse_body(raw)

    def _version(self) -> str | None:
        loaded = self.server.predictor.holder.get()
        return loaded[3]["id"] if loaded else None

    def _dispatch(self) -> None:
        path = self.path.split("?", 1)[0].rstrip("/")
        if self.command == "GET":
            if path in ("/health", ""):
                self._send(200, {"status": "UP", "model_class": "labelgate",
                                 "model_version": self._version()})
            else:
                self._send(404, {"error": "not found"})
            return
        if self.command != "POST":
            self._send(405, {"error": f"method {self.command[:20]!r} not allowed: GET "
                                      "/health, POST /setup, /predict or /webhook"})
            return
        if path not in ("/setup", "/predict", "/webhook"):
            self._send(404, {"error": "not found"})
            return
        body = self._read_body()
        if path == "/setup":
            self._send(200, {"model_version": self._version()})
        elif path == "/webhook":
            self._send(200, {"status": "ignored: labelgate retrains through its own flow"})
        else:
            tasks = body.get("tasks")
            if not isinstance(tasks, list) or not 1 <= len(tasks) <= MAX_TASKS:
                raise ClientError(400, f"`tasks` must be a list of 1..{MAX_TASKS} tasks")
            try:
                results, version = self.server.predictor.predict(tasks)
            except AuthError as exc:
                self._send(502, {"error": f"could not read task images: {exc}"})
                return
            self._send(200, {"results": results, "model_version": version})

    def log_message(self, *args) -> None:  # quiet: requests may carry task data
        pass


def make_server(holder: ModelHolder, studio: Studio, *, params: Params, host: str = "127.0.0.1",
                port: int = 9090, limits: Limits = Limits()) -> Server:
    predictor = Predictor(holder, studio, params=params, limits=limits)
    return Server((host, port), Handler, predictor=predictor, limits=limits)
