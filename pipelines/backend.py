"""The production model as a Label Studio ML backend: `labelgate backend [--port 9090]`.

Speaks Label Studio's ML-backend protocol (GET /health, POST /setup, POST /predict), so Label
Studio can ask for predictions interactively or through "Retrieve predictions". It serves only
the registry's production model, verified against its sha256 before loading, and reloads it
when production changes (promotion, approval, rollback). It binds to 127.0.0.1 unless told
otherwise and fetches task images from the configured Label Studio only (pipelines.labelstudio
rules), decoding them with pipelines.images (its pixel and time budgets apply). The HTTP side
(JSON answers for everything, body bounds, read deadlines, connection slots) is
pipelines.jsonserver's.

A task that cannot be predicted (not an object, no image URL, an image that cannot be fetched
or decoded) gets `{"error": reason}` and no `result`: Label Studio creates no prediction for it
and logs the reason, and the request's other tasks are still predicted. Control names and the
image key come from the `label_config` Label Studio sends with each request.

Connect it in Label Studio: Project settings -> Model -> Connect model -> URL
http://127.0.0.1:9090. (The embedded Label Studio allows backends on local addresses; a server
you run yourself needs ML_BLOCK_LOCAL_IP=false for that, or the backend on a routable address.)
"""
from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path

import httpx
import numpy as np
import torch

from pipelines import images, labelconfig, predict, registry
from pipelines.jsonserver import HttpError, JsonHandler, Limits, Server, brief
from pipelines.labelstudio import AuthError, ImageFetchError, LabelStudioError, Studio
from pipelines.settings import Params

# Label Studio sends every task selected for "Retrieve predictions" in one call (~0.5-2 KB of
# JSON each; Limits.max_body_bytes = 4 MB) and waits ML_TIMEOUT_PREDICT = 100 s for the answer.
MAX_TASKS = 1000          # per predict call
PREDICT_BUDGET_S = 60.0   # image fetching per request: answered well within those 100 s
FETCH_WORKERS = 8         # image fetches in flight, all requests together
FETCHES_PER_REQUEST = 4   # so one big request leaves workers for interactive ones


class ModelHolder:
    """The production model, reloaded (and re-verified) when the registry's pointer changes."""

    def __init__(self, registry_dir: str | Path, device: torch.device) -> None:
        self.registry_dir, self.device = Path(registry_dir), device
        self._lock = threading.Lock()
        self._loaded: predict.Model | None = None
        self._sha: str | None = None

    def get(self) -> predict.Model | None:
        """The production model, or None while there is none."""
        pointer = registry.production(self.registry_dir)
        with self._lock:  # held only to swap models (a load is ~10 ms), never to predict
            if pointer is None:
                self._loaded, self._sha = None, None
            elif pointer.sha256 != self._sha:
                self._loaded = predict.load_production(self.registry_dir, device=self.device)
                # what was loaded, which a promotion since the read above may have moved on
                self._sha = self._loaded.pointer.sha256 if self._loaded else None
            return self._loaded


class _Job:
    def __init__(self, model: predict.Model, x: np.ndarray) -> None:
        self.model, self.x = model, x
        self.done = threading.Event()
        self.probs: np.ndarray | None = None
        self.error: BaseException | None = None


class Inference:
    """One thread runs the model; the images of concurrent requests waiting for it are stacked
    into one batch (no waiting window: whatever queued during the previous batch). Requests
    never hold a lock while inference runs."""

    # images stacked from queued requests (3 KB each at 32x32 RGB, 147 KB at 224x224: <= 150 MB);
    # predict.probabilities splits them into forward passes sized for the model's input
    MAX_BATCH = 1024

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._lock = threading.Lock()  # nothing is queued after the stop marker
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="labelgate-inference",
                                        daemon=True)
        self._thread.start()

    def predict(self, model: predict.Model, x: np.ndarray) -> np.ndarray:
        """`(N, H, W, C)` uint8 (the model's input spec) -> `(N, K)` class probabilities."""
        job = _Job(model, x)
        with self._lock:
            if self._closed:
                raise RuntimeError("the backend is shutting down")
            self._queue.put(job)
        job.done.wait()
        if job.error is not None:
            raise job.error
        return job.probs

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
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
                    probs = predict.probabilities(model, np.concatenate([j.x for j in group]))
                except Exception as exc:  # noqa: BLE001 - re-raised in each waiting request
                    for j in group:
                        j.error = exc
                else:
                    start = 0
                    for j in group:
                        j.probs, start = probs[start:start + len(j.x)], start + len(j.x)
                for j in group:
                    j.done.set()


class Predictor:
    """Tasks in, one answer per task out: fetch + decode in a bounded pool, then one batch."""

    def __init__(self, holder: ModelHolder, studio: Studio, *, params: Params,
                 budget_s: float = PREDICT_BUDGET_S) -> None:
        self.holder, self.studio, self.params, self.budget_s = holder, studio, params, budget_s
        self.inference = Inference()
        self._pool = ThreadPoolExecutor(FETCH_WORKERS, thread_name_prefix="labelgate-fetch")

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.inference.close()

    def _image(self, url: str, model: predict.Model) -> np.ndarray | str:
        """The model's input for one task, or why there is none. AuthError propagates: a key
        Label Studio refuses is a server-wide failure, not this task's."""
        try:
            data = self.studio.fetch_image(url, max_bytes=self.params.pull.max_image_bytes)
            return predict.to_input(model, data)
        except AuthError:
            raise
        except (ImageFetchError, images.BadImage) as exc:
            return brief(str(exc))
        except LabelStudioError as exc:
            return brief(f"image could not be fetched: {exc}")
        except (ValueError, httpx.InvalidURL) as exc:
            # a URL urllib or httpx cannot even parse; lstransport should refuse it first
            return brief(f"malformed image URL: {type(exc).__name__}: {exc}")

    def _images(self, urls: dict[int, str],
                model: predict.Model) -> dict[int, np.ndarray | str]:
        """Fetch with at most FETCHES_PER_REQUEST in flight; what is not done within the budget
        is reported per task (the next "Retrieve predictions" asks for those again)."""
        deadline = time.monotonic() + self.budget_s
        todo = iter(urls.items())
        pending: dict[Future, int] = {}
        out: dict[int, np.ndarray | str] = {}

        def submit() -> None:
            if (item := next(todo, None)) is not None:
                pending[self._pool.submit(self._image, item[1], model)] = item[0]

        for _ in range(FETCHES_PER_REQUEST):
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
        late = f"image not fetched within the request's {self.budget_s:g} s budget; ask again"
        for i in [*pending.values(), *(i for i, _ in todo)]:
            out[i] = late
        return out

    def predict(self, tasks: list,
                config: labelconfig.LabelingConfig) -> tuple[list[dict], str | None]:
        """One entry per task, in order: a prediction, or `{"error": reason}`."""
        model = self.holder.get()
        if model is None:
            return [{"error": "no production model yet"} for _ in tasks], None
        version, key = model.version, config.image_key
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
                out[i] = {"error": f"task.data.{brief(key)} is not an image URL"}
            else:
                urls[i] = url
        fetched = self._images(urls, model) if urls else {}
        good = [i for i, v in fetched.items() if isinstance(v, np.ndarray)]
        for i, v in fetched.items():
            if isinstance(v, str):
                out[i] = {"error": v}
        if good:
            probs = self.inference.predict(model, np.stack([fetched[i] for i in good]))
            answers = predict.predictions(model, probs, how=self.params.preannotate.uncertainty)
            for i, p in zip(good, answers):
                if config.classes and p.label not in config.classes:
                    out[i] = {"error": f"the model chose {brief(p.label)!r}, which the project's "
                                       "labeling config does not offer"}
                else:
                    out[i] = {"result": labelconfig.choice_result(p.label, config),
                              "score": round(p.certainty, 5)}
        return [{**o, "model_version": version} for o in out], version


class Handler(JsonHandler):
    server: BackendServer

    def _version(self) -> str | None:
        model = self.server.predictor.holder.get()
        return model.version if model else None

    def _config(self, body: dict) -> labelconfig.LabelingConfig:
        """The project's control names and image key, from the config Label Studio sends; the
        labelgate defaults for a caller that sends none."""
        text = body.get("label_config")
        if text is None:
            return labelconfig.DEFAULT
        if not isinstance(text, str):
            raise HttpError(400, "`label_config` must be the project's labeling config (XML)")
        try:
            return labelconfig.parse(text)
        except labelconfig.UnsupportedConfig as exc:
            raise HttpError(400, brief(str(exc))) from None

    def route(self, method: str, path: str) -> None:
        try:
            self._route(method, path)
        except registry.RegistryError as exc:
            # a production file that fails its sha256 check is never served
            raise HttpError(503, f"production model refused: {exc}") from None
        except AuthError as exc:
            raise HttpError(502, f"could not read task images: {exc}") from None

    def _route(self, method: str, path: str) -> None:
        if method == "GET" and path in ("/health", ""):
            self.send_json(200, {"status": "UP", "model_class": "labelgate",
                                 "model_version": self._version()})
            return
        if method != "POST" or path not in ("/setup", "/predict", "/webhook"):
            if method in ("GET", "POST"):
                raise HttpError(404, "not found: GET /health, POST /setup, /predict, /webhook")
            raise HttpError(405, f"method {brief(method)!r} not allowed: GET /health, "
                                 "POST /setup, /predict or /webhook")
        body = self.read_json_body()
        if path == "/setup":  # its `access_token` is Label Studio's: never used, never logged
            self.send_json(200, {"model_version": self._version()})
        elif path == "/webhook":
            self.send_json(200, {"status": "ignored: labelgate retrains through its own flow"})
        else:
            tasks = body.get("tasks")
            if not isinstance(tasks, list) or not 1 <= len(tasks) <= MAX_TASKS:
                raise HttpError(400, f"`tasks` must be a list of 1..{MAX_TASKS} tasks")
            results, version = self.server.predictor.predict(tasks, self._config(body))
            self.send_json(200, {"results": results, "model_version": version})


class BackendServer(Server):
    """The HTTP server plus what the backend owns while it runs: the predictor (its fetch pool
    and inference thread) and the process's torch thread count, restored by server_close."""

    def __init__(self, address, *, predictor: Predictor, limits: Limits) -> None:
        self.predictor = predictor
        # One image per request gains nothing from intra-op threads, and on a busy machine they
        # cost: batch-1 inference took 190-230 ms with 2 OpenMP threads on a loaded 2-core
        # machine, 1.5 ms with one. Concurrency comes from batching requests instead.
        self._torch_threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            super().__init__(address, Handler, limits=limits)
        except BaseException:
            self._release()
            raise

    def _release(self) -> None:
        self.predictor.close()
        torch.set_num_threads(self._torch_threads)

    def server_close(self) -> None:
        super().server_close()
        self._release()


def make_server(holder: ModelHolder, studio: Studio, *, params: Params, host: str = "127.0.0.1",
                port: int = 9090, limits: Limits = Limits()) -> BackendServer:
    return BackendServer((host, port), predictor=Predictor(holder, studio, params=params),
                         limits=limits)
