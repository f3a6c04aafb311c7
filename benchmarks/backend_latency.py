"""`labelgate backend` latency, measured end to end against a real local Label Studio:

  one-image predict requests (the shape of an interactive request, and of "Retrieve predictions"
  on one task), sent by 1 and by 8 concurrent clients; each request makes the backend fetch the
  task's image, decode it and run the production model. Twice: with the images served by Label
  Studio (`/data/local-files/`, as the demo has them), and by a plain static file server listed
  in `pull.image_hosts` (as bucket storage would be), which shows the backend's own share.

    python benchmarks/backend_latency.py [--requests 200] [--clients 1 8] [--arch auto]

Starts its own Label Studio (from .venv-studio) in a temp dir on a free port, and the backend in
a separate process (as `labelgate backend` runs), so the clients do not share its interpreter.
The model is an untrained network of the chosen architecture (`--arch`, default: what `auto`
picks for params.yaml's input spec on the backend's device) at that input spec: inference cost
does not depend on the weights. Prints p50 / p95 / max in milliseconds and requests per second.
Timings depend on what else the machine is doing: say how loaded it was when you quote them.
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from pipelines import demo, settings, studio  # noqa: E402
from pipelines.labelstudio import Connection, Studio  # noqa: E402

CLASSES = tuple(str(i) for i in range(10))
REPO = Path(__file__).resolve().parent.parent


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _make_production(reg: Path, work: Path, *, arch: str, params: settings.Params) -> str:
    import torch

    from pipelines import archs, inputspec, net, registry
    from pipelines.device import pick_device
    torch.manual_seed(0)
    spec = inputspec.from_params(params)
    if not spec.mean:  # unmeasured (no training split here): a mid-grey normalisation
        spec = spec.with_stats((127.5,) * spec.channels, (64.0,) * spec.channels)
    arch = archs.resolve_arch(arch, spec, pick_device(params.train.device).type)
    path = work / "model.safetensors"
    net.save(net.build(arch, CLASSES, spec), path, arch=arch, classes=CLASSES, spec=spec)
    sha, _ = registry.store(reg, path)
    record = {"id": f"m0001-{sha[:10]}", "sha256": sha, "eval_hash": "e" * 64,
              "dataset_version": "benchmark", "metrics": {}}
    with registry.lock(reg):
        registry.make_production(reg, record, event="promoted", via="gate", previous=None)
    print(f"model: {arch} at {spec.height}x{spec.width}x{spec.channels}")
    return record["id"]


def _serve(conn: Connection, reg: str, port: int, params_path: str, image_host: str) -> None:
    """The backend process: what `labelgate backend` runs, on a given port."""
    from pipelines import backend
    from pipelines.device import pick_device
    params = settings.load(params_path)
    holder = backend.ModelHolder(reg, pick_device(params.train.device))
    server = backend.make_server(holder, Studio(conn, image_hosts=(image_host,)), params=params,
                                 port=port)
    server.serve_forever()


def _wait_up(url: str, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass  # not listening yet
        time.sleep(0.2)
    raise SystemExit(f"backend at {url} did not come up within {timeout_s:.0f} s")


def _load(url: str, tasks: list[dict], clients: int, requests: int) -> tuple[np.ndarray, float]:
    """Latencies (ms) of `requests` one-task predict calls spread over `clients` threads."""
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    counter = iter(range(requests))

    def client() -> None:
        with httpx.Client(timeout=60) as http:
            while True:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                t0 = time.perf_counter()
                r = http.post(url + "/predict", json={"tasks": [tasks[i % len(tasks)]]})
                ms = (time.perf_counter() - t0) * 1000
                body = r.json()
                with lock:
                    latencies.append(ms)
                    if r.status_code != 200 or "result" not in body["results"][0]:
                        errors.append(f"HTTP {r.status_code}: {str(body)[:200]}")

    threads = [threading.Thread(target=client) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise SystemExit(f"{len(errors)} requests failed, e.g. {errors[0]}")
    return np.array(latencies), wall


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=200, help="requests per measurement")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--params", default=str(REPO / "params.yaml"))
    ap.add_argument("--arch", default="auto", help="architecture of the production model")
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="labelgate-backend-bench-"))
    conn = studio.up(work / "studio", port=_port())
    server = static = None
    try:
        st = Studio(conn)
        pid, _ = st.ensure_project("backend benchmark", CLASSES)
        folder = work / "studio" / "files" / "demo"
        names, _ = demo.write_images(folder)
        st.add_local_storage(pid, str(folder))
        static_port = _port()
        static = subprocess.Popen(
            [sys.executable, "-m", "http.server", str(static_port), "--bind", "127.0.0.1",
             "--directory", str(folder)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        image_host = f"http://127.0.0.1:{static_port}"
        sources = {
            "images from Label Studio": [
                {"id": i + 1, "data": {"image": f"/data/local-files/?d=demo/{name}"}}
                for i, name in enumerate(names[:200])],
            "images from a static host": [
                {"id": i + 1, "data": {"image": f"{image_host}/{name}"}}
                for i, name in enumerate(names[:200])]}
        reg = work / "registry"
        _make_production(reg, work, arch=args.arch, params=settings.load(args.params))
        port = _port()
        server = multiprocessing.get_context("spawn").Process(
            target=_serve, args=(conn, str(reg), port, args.params, image_host), daemon=True)
        server.start()
        url = f"http://127.0.0.1:{port}"
        _wait_up(url)
        for tasks in sources.values():
            _load(url, tasks, 1, 20)  # warm-up: model load, first connections
        print(f"machine: {os.cpu_count()} CPUs, load average "
              f"{' '.join(f'{x:.2f}' for x in os.getloadavg())} (1/5/15 min)")
        for source, tasks in sources.items():
            for clients in args.clients:
                lat, wall = _load(url, tasks, clients, args.requests)
                p50, p95 = np.percentile(lat, [50, 95])
                print(f"{source}, {clients} client(s), {len(lat)} one-image requests: "
                      f"p50 {p50:.1f} ms, p95 {p95:.1f} ms, max {lat.max():.1f} ms, "
                      f"{len(lat) / wall:.1f} requests/s", flush=True)
    finally:
        if server is not None:
            server.terminate()
            server.join(10)
        if static is not None:
            static.terminate()
            static.wait(10)
        studio.down(work / "studio")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
