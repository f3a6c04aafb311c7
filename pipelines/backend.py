"""The production model as a Label Studio ML backend: `labelgate backend [--port 9090]`.

Speaks Label Studio's ML-backend protocol (GET /health, POST /setup, POST /predict), so Label
Studio can ask for predictions interactively or through "Retrieve predictions". It serves only
the registry's production model, verified against its sha256 before loading, and reloads it
when production changes (promotion, approval, rollback). It binds to 127.0.0.1 unless told
otherwise, refuses request bodies over MAX_BODY_BYTES and malformed JSON with a 4xx, and
fetches task images from the configured Label Studio only (pipelines.labelstudio rules).

Connect it in Label Studio: Project settings -> Model -> Connect model -> URL
http://127.0.0.1:9090. (The embedded Label Studio allows backends on local addresses; a server
you run yourself needs ML_BLOCK_LOCAL_IP=false for that, or the backend on a routable address.)
"""
from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import torch

from pipelines import images, net, registry
from pipelines.labelstudio import ImageFetchError, LabelStudioError, Studio, choice_result
from pipelines.preannotate import certainty
from pipelines.settings import Params

MAX_BODY_BYTES = 1_000_000   # a predict call carries task JSON, never images
MAX_TASKS = 100              # per predict call


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
        with self._lock:
            if pointer is None:
                self._loaded, self._sha = None, None
            elif pointer["sha256"] != self._sha:
                self._loaded = registry.load_production(self.registry_dir, device=self.device)
                self._sha = pointer["sha256"]
            return self._loaded


def predict_tasks(holder: ModelHolder, studio: Studio, tasks: list[dict], *,
                  params: Params) -> tuple[list[dict], str | None]:
    """One result per task (Label Studio requires as many results as tasks): a choice with a
    certainty score, or an empty result for a task whose image cannot be used."""
    loaded = holder.get()
    if loaded is None:
        return [{"result": [], "score": 0.0} for _ in tasks], None
    model, classes, size, pointer = loaded
    arrays, where = [], []
    for i, task in enumerate(tasks):
        url = (task.get("data") or {}).get(params.studio.image_key)
        if not isinstance(url, str):
            continue
        try:
            arrays.append(images.to_array(studio.fetch_image(
                url, max_bytes=params.pull.max_image_bytes), size))
            where.append(i)
        except (ImageFetchError, images.BadImage):
            continue
    out = [{"result": [], "score": 0.0, "model_version": pointer["id"]} for _ in tasks]
    if arrays:
        probs = net.predict_proba(model, np.stack(arrays), device=holder.device)
        scores = certainty(probs, params.preannotate.uncertainty)
        for i, p, s in zip(where, probs, scores):
            out[i] = {"result": choice_result(classes[int(p.argmax())]),
                      "score": round(float(s), 5), "model_version": pointer["id"]}
    return out, pointer["id"]


def make_server(holder: ModelHolder, studio: Studio, *, params: Params, host: str = "127.0.0.1",
                port: int = 9090) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def _send(self, code: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _version(self) -> str | None:
            loaded = holder.get()
            return loaded[3]["id"] if loaded else None

        def handle_one_request(self):
            try:
                super().handle_one_request()
            except registry.RegistryError as exc:
                # a production file that fails its sha256 check is never served
                self._send(503, {"error": f"production model refused: {exc}"})

        def do_GET(self):  # noqa: N802 (http.server's naming)
            if self.path.rstrip("/") in ("/health", ""):
                self._send(200, {"status": "UP", "model_class": "labelgate",
                                 "model_version": self._version()})
            else:
                self._send(404, {"error": "not found"})

        def do_POST(self):  # noqa: N802
            length = self.headers.get("Content-Length", "")
            if not length.isdigit():
                self._send(411, {"error": "Content-Length required"})
                return
            if int(length) > MAX_BODY_BYTES:
                self._send(413, {"error": f"request body over {MAX_BODY_BYTES} bytes"})
                self.close_connection = True
                return
            try:
                body = json.loads(self.rfile.read(int(length)) or b"{}")
            except (ValueError, UnicodeDecodeError):
                self._send(400, {"error": "request body is not JSON"})
                return
            if not isinstance(body, dict):
                self._send(400, {"error": "request body must be a JSON object"})
                return
            path = self.path.rstrip("/")
            if path == "/setup":
                self._send(200, {"model_version": self._version()})
            elif path == "/predict":
                tasks = body.get("tasks")
                if (not isinstance(tasks, list) or not tasks or len(tasks) > MAX_TASKS
                        or not all(isinstance(t, dict) for t in tasks)):
                    self._send(400, {"error": f"`tasks` must be a list of 1..{MAX_TASKS} "
                                              "task objects"})
                    return
                try:
                    results, version = predict_tasks(holder, studio, tasks, params=params)
                except LabelStudioError as exc:
                    self._send(502, {"error": f"could not read task images: {exc}"})
                    return
                self._send(200, {"results": results, "model_version": version})
            elif path == "/webhook":
                self._send(200, {"status": "ignored: labelgate retrains through its own flow"})
            else:
                self._send(404, {"error": "not found"})

        def log_message(self, *args):  # quiet: requests may carry task data
            pass

    return ThreadingHTTPServer((host, port), Handler)
