"""`labelgate backend`: the production model behind Label Studio's ML-backend protocol, connected
to a real Label Studio that asks it for predictions; a new production model is picked up without
a restart. Hostile requests (a seeded corpus of bodies, image URLs and raw HTTP) each get a
well-formed JSON answer over real HTTP and leave the server answering; slow clients are cut off
and cannot hold more than the configured threads; a 16-bit 9,400 px PNG costs no memory."""
from __future__ import annotations

import contextlib
import http.client
import io
import json
import multiprocessing
import random
import select
import socket
import struct
import threading
import time
import zlib
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from pipelines import backend, jsonserver, net, predict, registry
from pipelines.device import pick_device
from tests import factories
from tests.conftest import free_port
from tests.test_preannotate import DIGITS, make_production

GOOD = "/data/local-files/?d=demo/digit-{:04d}.png"  # demo scans served by Label Studio


@contextlib.contextmanager
def running(reg: Path, studio, *, limits: backend.Limits = backend.Limits()):
    """A backend on a free port in this process, shut down and closed afterwards."""
    holder = backend.ModelHolder(reg, pick_device("cpu"))
    server = backend.make_server(holder, studio, params=factories.params({"train.device": "cpu"}),
                                 port=0, limits=limits)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def shared(make_project, tmp_path_factory):
    """One project and one production model, read (never changed) by the tests that use them."""
    project = make_project(limit=20, eval_tasks=2, unlabeled_tasks=5)
    tmp = tmp_path_factory.mktemp("backend")
    reg = tmp / "registry"
    version = make_production(reg, tmp, seed=1)
    return {"project": project, "studio": project["studio"], "reg": reg, "version": version}


@pytest.fixture
def served(shared):
    with running(shared["reg"], shared["studio"]) as (server, url):
        yield {**shared, "server": server, "url": url, "port": server.server_address[1]}


def _ls(project, method, path, **kw):
    conn = project["studio"].conn
    r = httpx.request(method, conn.url + path, timeout=120,
                      headers={"Authorization": f"Token {conn.api_key}"}, **kw)
    assert r.status_code < 300, (r.status_code, r.text[:500])
    return r.json() if r.content else None


def test_label_studio_gets_predictions_from_the_backend(make_project, tmp_path):
    project = make_project(limit=20, eval_tasks=2, unlabeled_tasks=5)
    studio, pid = project["studio"], project["id"]
    # one unlabeled task whose image is missing: it gets no prediction, the others still do
    studio.import_tasks(pid, [{"data": {"image": "/data/local-files/?d=demo/missing.png"}}])
    reg = tmp_path / "registry"
    first = make_production(reg, tmp_path, seed=1)
    with running(reg, studio) as (_, url):
        ml = _ls(project, "POST", "/api/ml", json={"url": url, "project": pid,
                                                     "title": "labelgate"})
        assert ml["state"] == "CO", ml  # Label Studio checked /health and /setup: connected
        unlabeled = {t["id"]: t["data"]["image"] for t in studio.unlabeled_tasks(pid)}
        assert len(unlabeled) == 6
        _ls(project, "POST", f"/api/dm/actions?id=retrieve_tasks_predictions&project={pid}",
            json={"selectedItems": {"all": False, "included": sorted(unlabeled)}})
    preds = [p for p in studio.predictions(pid) if p["task"] in unlabeled]
    broken = [i for i, image in unlabeled.items() if image.endswith("missing.png")]
    assert sorted(p["task"] for p in preds) == sorted(set(unlabeled) - set(broken))
    assert {p["model_version"] for p in preds} == {first}
    assert all(0.0 <= p["score"] <= 1.0 and p["result"][0]["value"]["choices"] for p in preds)


def test_health_setup_and_reload_on_promotion(shared, tmp_path):
    reg = tmp_path / "registry"
    first = make_production(reg, tmp_path, seed=1)
    with running(reg, shared["studio"]) as (_, url):
        assert httpx.get(url + "/health").json() == {
            "status": "UP", "model_class": "labelgate", "model_version": first}
        second = make_production(reg, tmp_path, seed=2)
        assert httpx.post(url + "/setup", json={"project": "1.0"}).json() == \
            {"model_version": second}
        # a tampered blob is never served: the reload verifies the sha256 first
        blob = registry.blob_path(reg, registry.production(reg)["sha256"])
        make_production(reg, tmp_path, seed=3)
        tampered = registry.blob_path(reg, registry.production(reg)["sha256"])
        tampered.write_bytes(blob.read_bytes())
        r = httpx.post(url + "/predict", json={"tasks": [{"data": {}}]})
        assert r.status_code == 503 and "does not match its recorded sha256" in r.json()["error"]


def test_concurrent_clients_get_their_own_predictions(served):
    """8 clients at once: batching across requests never mixes answers up. The latency is
    printed, not asserted (benchmarks/backend_latency.py measures it)."""
    urls = [GOOD.format(i) for i in range(8)]
    with httpx.Client(timeout=60) as http:
        alone = [http.post(served["url"] + "/predict",
                           json={"tasks": [{"data": {"image": u}}]}).json()["results"][0]
                 for u in urls]
    assert all("result" in a for a in alone)
    got: dict[int, list[dict]] = {i: [] for i in range(8)}
    times: list[float] = []

    def client(i: int) -> None:
        with httpx.Client(timeout=60) as http:
            for _ in range(5):
                t0 = time.perf_counter()
                r = http.post(served["url"] + "/predict",
                              json={"tasks": [{"data": {"image": urls[i]}}]})
                times.append((time.perf_counter() - t0) * 1000)
                got[i].append(r.json()["results"][0])

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(8):
        assert got[i] == [alone[i]] * 5
    p50, p95 = np.percentile(times, [50, 95])
    print(f"8 concurrent one-image clients, 40 requests: p50 {p50:.0f} ms, p95 {p95:.0f} ms "
          "(this machine, whatever else it was doing)")


class _Gated(torch.nn.Module):
    """A model whose first forward pass waits for `gate`: requests queue up behind it."""

    def __init__(self, inner: torch.nn.Module, gate: threading.Event) -> None:
        super().__init__()
        self.inner, self.gate, self.calls = inner, gate, []
        self.entered = threading.Event()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.calls:
            self.entered.set()
            self.gate.wait(30)
        self.calls.append(len(x))
        return self.inner(x)


def test_inference_batches_waiting_requests_and_never_mixes_models():
    torch.manual_seed(0)
    gate = threading.Event()
    digits, cpu = tuple("0123456789"), torch.device("cpu")
    spec = DIGITS
    gated = _Gated(net.build("smallcnn", digits, spec).eval(), gate)
    first = predict.Model(gated, "smallcnn", digits, spec, cpu)
    # a model swapped in while requests wait (a promotion)
    second = predict.Model(net.build("smallcnn", digits, spec).eval(), "smallcnn", digits, spec,
                           cpu)
    rng = np.random.default_rng(SEED)
    xs = [rng.integers(0, 256, (n, 28, 28, 1), dtype=np.uint8) for n in (1, 2, 1, 3, 1, 1, 2, 1)]
    models = [first, first, second, first, second, first, second, first]
    inference = backend.Inference()
    got: dict[int, np.ndarray] = {}
    try:
        blocker = threading.Thread(target=lambda: got.setdefault(
            -1, inference.predict(first, xs[0])))
        blocker.start()
        assert gated.entered.wait(30)  # the inference thread is busy with it now
        threads = [threading.Thread(target=lambda i=i: got.setdefault(
            i, inference.predict(models[i], xs[i]))) for i in range(len(xs))]
        for t in threads:
            t.start()
        _wait_for(lambda: inference._queue.qsize() == len(xs))
        gate.set()
        for t in [blocker, *threads]:
            t.join(30)
    finally:
        inference.close()
    # the blocked pass, then one batch per model for the eight waiting requests
    assert gated.calls == [1, sum(len(x) for x, m in zip(xs, models) if m is first)]
    for i, x in enumerate(xs):
        own = net.predict_proba(models[i].module, x, device=cpu)
        np.testing.assert_allclose(got[i], own, rtol=1e-5, atol=1e-6)


# -- the hostile corpus -------------------------------------------------------------------------

SEED = 20261130
CONTROL = [chr(c) for c in range(0x20)] + ["\x7f"]
HOSTILE_CHARS = CONTROL + list(" []\\%\"<>{}|^`") + ["é", "中", "\u202e", "\ufeff", "\ud800"]


def png16(side: int) -> bytes:
    """A valid 16-bit grayscale PNG of `side` x `side` px (a horizontal gradient), written by
    streaming zlib so building it never holds the image: ~2 MB for 9,400 px, 177 MB decoded."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return (struct.pack(">I", len(body)) + kind + body
                + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF))
    row = b"\x00" + (np.arange(side, dtype=">u2") * 7).tobytes()  # filter 0 + pixels
    z = zlib.compressobj(9)
    parts = [z.compress(row * min(256, side - i)) for i in range(0, side, 256)]
    parts.append(z.flush())
    ihdr = struct.pack(">IIBBBBB", side, side, 16, 0, 0, 0, 0)  # 16-bit grayscale
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"".join(parts))
            + chunk(b"IEND", b""))


def hostile_urls(studio_url: str, files: Path) -> list[object]:
    """Image URLs (and non-URLs) that must each become a per-task error: malformed, foreign,
    Label Studio's own API, traversal, non-images, and seeded single-character mutations of a
    good URL. Writes the hostile files they name into Label Studio's demo folder."""
    demo = files / "demo"
    (demo / "hostile-text.png").write_bytes(b"<html>not an image</html>")
    (demo / "hostile-empty.png").write_bytes(b"")
    (demo / "hostile-gif-header.gif").write_bytes(b"GIF89a" + b"\x00" * 10)
    fixed: list[object] = [
        "", None, 7, 1.5, True, [], {}, ["/data/local-files/?d=demo/digit-0001.png"],
        # malformed: control characters, NUL, whitespace, over-long, bad IPv6, [name] hosts
        "/data/local-files/?d=demo/digit-0001.png\x00", "\x00", "\r\n", " " * 10,
        "/data/local-files/?d=demo/" + "a" * 5_000, "/" + "%41" * 40_000, "/" + "x" * 1_000_000,
        "http://[::1", "http://[::1]x/a.png", "http://[name]/a.png", "http://[evil.com]/a.png",
        "http://[]/a.png", "http://[::1]:99999/a.png", "https://[fe80::1%25eth0]/a.png",
        "http://127.0.0.1:99999999/a.png", "http://a..b/a.png", "http://xn--/a.png",
        "http://\u0435xample.com/a.png", "http://ｅｘａｍｐｌｅ.com/a.png",
        # other schemes and hosts: never fetched with the key, never fetched at all
        "file:///etc/passwd", "ftp://example.com/a.png", "javascript:alert(1)",
        "data:image/png;base64," + __import__("base64").b64encode(
            factories.digit_png(1)).decode(), "gopher://127.0.0.1:70/", "//example.com/a.png",
        "\\\\evil\\share\\a.png", "http://169.254.169.254/latest/meta-data/",
        "http://127.0.0.1:1/a.png", studio_url.replace("127.0.0.1", "localhost") + GOOD.format(1),
        studio_url.replace("http://", "http://user:pw@") + GOOD.format(1),
        # Label Studio's own API on its own origin: never an image, never fetched with the key
        "/api/current-user/whoami", "/api/current-user/token", "/api/users/", "/api/projects/",
        "/user/account/", studio_url + "/api/projects",
        # traversal and things that are not images
        "/data/local-files/?d=../../../../etc/passwd", "/data/upload/../../../../etc/passwd",
        "/data/local-files/?d=demo/../../../../../etc/passwd", "/data/local-files/?d=/etc/passwd",
        "/data/local-files/?d=demo/missing.png", "/data/local-files/?d=demo/hostile-text.png",
        "/data/local-files/?d=demo/hostile-empty.png",
        "/data/local-files/?d=demo/hostile-gif-header.gif",
        "/data/local-files/?d=demo/broken-truncated.png",
        "/data/local-files/?d=demo/broken-not-an-image.png",
    ]
    rng = random.Random(SEED)
    mutated = []
    for _ in range(40):
        good = GOOD.format(rng.randrange(20))
        at = rng.randrange(len("/data/local-files/?d=demo/"), len(good) + 1)
        mutated.append(good[:at] + rng.choice(HOSTILE_CHARS) + good[at:])
    return fixed + mutated


def test_hostile_image_urls_become_per_task_errors(served, label_studio):
    urls = hostile_urls(served["studio"].conn.url, label_studio["files"])
    assert len(urls) >= 75
    good = [{"data": {"image": GOOD.format(i)}} for i in range(3)]
    tasks = [good[0], *({"id": i, "data": {"image": u}} for i, u in enumerate(urls)), *good[1:]]
    body = json.dumps({"tasks": tasks}).encode()  # ASCII: lone surrogates travel as \ud800
    r = httpx.post(served["url"] + "/predict", content=body, timeout=120)
    assert r.status_code == 200, r.text[:500]
    results = r.json()["results"]
    assert len(results) == len(tasks)
    for i in (0, len(tasks) - 2, len(tasks) - 1):  # the good tasks are predicted regardless
        assert results[i]["result"][0]["value"]["choices"], results[i]
    for url, res in zip(urls, results[1:-2]):
        assert "result" not in res and isinstance(res["error"], str) and res["error"], (url, res)
        assert len(res["error"]) <= jsonserver.MAX_REASON_CHARS + 3, (url, res)
    assert httpx.get(served["url"] + "/health").json()["status"] == "UP"


def hostile_bodies() -> list[tuple[str, bytes, int]]:
    """(name, POST /predict body, expected status): every malformed body is a 400 with a
    reason; bad tasks inside a good body are per-task errors (200); 413 over the size cap.
    Which tasks of a 200 are predicted is `_predictable`'s to say."""
    ok_task = {"data": {"image": GOOD.format(2)}}
    deep = lambda n: ("[" * n + "]" * n).encode()  # noqa: E731
    rng = random.Random(SEED)
    cases = [
        ("[ x 10^6", b"[" * 1_000_000, 400), ("{ x 10^5", b'{"a":' * 100_000, 400),
        ("nested 33", b'{"tasks": ' + deep(33) + b"}", 400),
        ("nested objects 1000", b'{"a":' * 1000 + b"1" + b"}" * 1000, 400),
        ("nested 30 beside a good task",
         json.dumps({"tasks": [ok_task]}).encode()[:-1] + b', "x": ' + deep(30) + b"}", 200),
        ("empty", b"", 400), ("not json", b"not json", 400), ("utf-16 garbage", b"\xff\xfe\x00", 400),
        ("invalid utf-8", b'{"tasks": "\xc3\x28"}', 400), ("truncated", b'{"tasks": [', 400),
        ("top-level list", b"[1, 2]", 400), ("top-level string", b'"tasks"', 400),
        ("top-level number", b"1e999999", 400), ("null", b"null", 400),
        ("5000-digit integer", b'{"tasks": ' + b"9" * 5000 + b"}", 400),
        ("tasks missing", b"{}", 400), ("tasks null", b'{"tasks": null}', 400),
        ("tasks object", b'{"tasks": {}}', 400), ("tasks string", b'{"tasks": "x"}', 400),
        ("tasks empty", b'{"tasks": []}', 400),
        ("too many tasks", json.dumps({"tasks": [ok_task] * (backend.MAX_TASKS + 1)}).encode(),
         400),
        ("over the size cap", b'{"x": "' + b"a" * backend.Limits().max_body_bytes + b'"}', 413),
        ("NaN and Infinity beside a good task",
         b'{"tasks": [' + json.dumps(ok_task).encode() + b'], "a": NaN, "b": -Infinity}', 200),
        ("duplicate keys", b'{"tasks": "x", "tasks": [' + json.dumps(ok_task).encode() + b"]}", 200),
        ("lone surrogate", b'{"tasks": [{"data": {"image": "\\ud800"}}]}', 200),
    ]
    laughs = ('<!DOCTYPE v [<!ENTITY a "aaaaaaaaaa">' + "".join(
        f'<!ENTITY {b} "{("&" + a + ";") * 10}">' for a, b in zip("abcdefgh", "bcdefghi"))
        + ']><View><Image name="i" value="$image"/><Choices name="c" toName="i">'
        '<Choice value="&i;"/></Choices></View>')
    for name, config in [("config not a string", 5), ("config not XML", "<View"),
                         ("config without controls", "<View/>"), ("config: billion laughs", laughs),
                         ("config nested 10^5", "<a>" * 100_000 + "</a>" * 100_000),
                         ("config: two images", "<View><Image name='a' value='$a'/>"
                                                "<Image name='b' value='$b'/></View>")]:
        cases.append((name, json.dumps({"tasks": [ok_task], "label_config": config}).encode(),
                      400))
    for name, bad in [("null task", None), ("number task", 5), ("list task", [ok_task]),
                      ("string task", "x"), ("data null", {"data": None}),
                      ("data list", {"data": [1]}), ("data string", {"data": "x"}),
                      ("no data", {"id": 1}), ("image number", {"data": {"image": 5}}),
                      ("image object", {"data": {"image": {"url": GOOD.format(1)}}}),
                      ("other key only", {"data": {"img": GOOD.format(1)}})]:
        cases.append((name, json.dumps({"tasks": [ok_task, bad]}).encode(), 200))
    for i in range(10):  # seeded byte-level damage of a good body
        body = bytearray(json.dumps({"tasks": [ok_task]}).encode())
        at = rng.randrange(len(body))
        body[at:at + 1] = bytes([rng.choice(b"[{]}\",:\\\x00\xff")])
        cases.append((f"damaged byte {i}", bytes(body), _status_for(bytes(body))))
    return cases


def _status_for(body: bytes) -> int:
    """The status a damaged body must get, from what Python's JSON parser and the protocol's
    rules make of it (computed, so the seeded damage may land anywhere)."""
    try:
        parsed = json.loads(body)
    except ValueError:
        return 400
    if not isinstance(parsed, dict) or not isinstance(parsed.get("tasks"), list) \
            or not parsed["tasks"]:
        return 400
    return 200


def _predictable(task: object) -> bool:
    """A task the backend must predict: an object whose data names one of the demo scans."""
    return (isinstance(task, dict) and isinstance(task.get("data"), dict)
            and isinstance(task["data"].get("image"), str)
            and task["data"]["image"] in {GOOD.format(i) for i in range(20)})


def _check_json_answer(status: int, body: bytes, want: int, what: str) -> dict:
    assert status == want, (what, status, body[:300])
    doc = json.loads(body)
    assert isinstance(doc, dict), what
    if want >= 400:
        assert isinstance(doc["error"], str) and doc["error"], (what, doc)
    return doc


def test_hostile_bodies_get_a_json_answer_with_a_clear_status(served):
    cases = hostile_bodies()
    assert len(cases) >= 45
    with httpx.Client(timeout=60) as http:
        for name, body, want in cases:
            r = http.post(served["url"] + "/predict", content=body,
                          headers={"Content-Type": "application/json"})
            doc = _check_json_answer(r.status_code, r.content, want, name)
            if want == 200:
                tasks = json.loads(body)["tasks"]
                assert len(doc["results"]) == len(tasks), name
                for task, res in zip(tasks, doc["results"]):
                    if _predictable(task):
                        assert res["result"][0]["value"]["choices"], (name, res)
                    else:
                        assert "result" not in res and res["error"], (name, task, res)
        assert http.get(served["url"] + "/health").json()["status"] == "UP"


def test_predictions_follow_the_projects_labeling_config(served):
    """Control names and the image key come from the config Label Studio sends, not from
    labelgate's defaults; a class the project does not offer is a per-task error."""
    classes = [str(i) for i in range(10)]
    config = ('<View><Image name="scan" value="$picture"/><Choices name="digit" toName="scan" '
              'choice="single">' + "".join(f'<Choice value="{c}"/>' for c in classes)
              + "</Choices></View>")
    task = {"data": {"picture": GOOD.format(4)}}
    r = httpx.post(served["url"] + "/predict", timeout=60,
                   json={"tasks": [task, {"data": {"image": GOOD.format(4)}}],
                         "label_config": config})
    ours, wrong_key = r.json()["results"]
    assert ours["result"][0]["from_name"] == "digit" and ours["result"][0]["to_name"] == "scan"
    assert ours["result"][0]["value"]["choices"][0] in classes
    assert wrong_key["error"] == "task.data.picture is not an image URL"
    fewer = config.replace('<Choice value="%s"/>' % ours["result"][0]["value"]["choices"][0], "")
    r = httpx.post(served["url"] + "/predict", timeout=60,
                   json={"tasks": [task], "label_config": fewer})
    assert "labeling config does not offer" in r.json()["results"][0]["error"]


def _raw(port: int, request: bytes, *, half_close: bool = False) -> tuple[int, dict, bytes]:
    """Send raw bytes, read one HTTP answer: (status, headers, body)."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(request)
        if half_close:
            s.shutdown(socket.SHUT_WR)
        resp = http.client.HTTPResponse(s, method=request.split(b" ", 1)[0].decode("latin-1"))
        resp.begin()
        return resp.status, dict(resp.getheaders()), resp.read()


HTTP_CASES = [  # (name, raw request, expected status)
    ("no Content-Length", b"POST /predict HTTP/1.0\r\n\r\n", 411),
    ("chunked", b"POST /predict HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
     411),
    ("negative length", b"POST /predict HTTP/1.0\r\nContent-Length: -1\r\n\r\n", 411),
    ("float length", b"POST /predict HTTP/1.0\r\nContent-Length: 1e3\r\n\r\n", 411),
    ("arabic-digit length", "POST /predict HTTP/1.0\r\nContent-Length: ٣\r\n\r\n{}}".encode(),
     411),
    ("two lengths", b"POST /predict HTTP/1.0\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}",
     411),
    ("huge length", b"POST /predict HTTP/1.0\r\nContent-Length: " + b"9" * 40 + b"\r\n\r\n", 413),
    ("garbage request line", b"garbage\r\n\r\n", 400),
    ("NUL in request line", b"GET /hea\x00lth HTTP/1.0\r\n\r\n", 404),
    ("bad version", b"GET /health HTTP/9.9\r\n\r\n", 505),
    ("http/0.9", b"GET /health\r\n\r\n", 200),
    ("over-long URI", b"GET /" + b"a" * 70_000 + b" HTTP/1.0\r\n\r\n", 414),
    ("over-long header", b"GET /health HTTP/1.0\r\nX: " + b"a" * 70_000 + b"\r\n\r\n", 431),
    ("101 headers", b"GET /health HTTP/1.0\r\n" + b"X: y\r\n" * 101 + b"\r\n", 431),
    ("PUT", b"PUT /predict HTTP/1.0\r\nContent-Length: 2\r\n\r\n{}", 405),
    ("DELETE", b"DELETE /predict HTTP/1.0\r\n\r\n", 405),
    ("HEAD", b"HEAD /health HTTP/1.0\r\n\r\n", 405),
    ("OPTIONS", b"OPTIONS * HTTP/1.0\r\n\r\n", 405),
    ("made-up method", b"FOO /predict HTTP/1.0\r\n\r\n", 405),
    ("unknown GET", b"GET /predict HTTP/1.0\r\n\r\n", 404),
    ("unknown POST", b"POST /train HTTP/1.0\r\nContent-Length: 2\r\n\r\n{}", 404),
    ("double-slash path", b"POST //predict HTTP/1.0\r\nContent-Length: 2\r\n\r\n{}", 400),
    ("query string", b"GET /health?x=1 HTTP/1.0\r\n\r\n", 200),
    ("webhook", b"POST /webhook HTTP/1.0\r\nContent-Length: 2\r\n\r\n{}", 200),
    ("setup with a list", b"POST /setup HTTP/1.0\r\nContent-Length: 2\r\n\r\n[]", 400),
]


@pytest.mark.parametrize("name, request_bytes, want", HTTP_CASES, ids=[c[0] for c in HTTP_CASES])
def test_malformed_http_gets_a_json_answer(served, name, request_bytes, want):
    status, headers, body = _raw(served["port"], request_bytes)
    if name != "HEAD":
        _check_json_answer(status, body, want, name)
    assert status == want and headers["Content-Type"] == "application/json"
    assert httpx.get(served["url"] + "/health").status_code == 200


def test_a_body_shorter_than_its_length_is_a_400(served):
    status, _, body = _raw(served["port"], b"POST /predict HTTP/1.0\r\nContent-Length: 100\r\n"
                                           b"\r\n{\"tasks\": [", half_close=True)
    assert "ended after 11 of 100 bytes" in _check_json_answer(status, body, 400, "short")["error"]


def test_oversized_request_is_refused_before_reading_it(served):
    conn = http.client.HTTPConnection("127.0.0.1", served["port"], timeout=5)
    conn.putrequest("POST", "/predict")
    conn.putheader("Content-Length", str(backend.Limits().max_body_bytes + 1))
    conn.endheaders()
    resp = conn.getresponse()  # answered without the body ever being sent
    assert resp.status == 413
    conn.close()


def test_binds_to_localhost_by_default(shared):
    server = backend.make_server(backend.ModelHolder(shared["reg"], pick_device("cpu")),
                                 shared["studio"], params=factories.params(), port=free_port())
    assert server.server_address[0] == "127.0.0.1"
    server.server_close()


# -- slow clients and connection slots ----------------------------------------------------------

def _handler_threads() -> int:
    return sum("process_request_thread" in t.name for t in threading.enumerate())


def _trickle(port: int, out: dict, key: int) -> None:
    """One byte a second of a predict request; stop as soon as the server answers or closes."""
    request = b"POST /predict HTTP/1.0\r\nContent-Length: 2\r\n\r\n{}"
    t0 = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        for i in range(len(request)):
            s.sendall(request[i:i + 1])
            readable, _, _ = select.select([s], [], [], 1.0)
            if readable:
                break
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    out[key] = (data, i + 1, time.monotonic() - t0)


def test_slow_clients_are_cut_off_and_cannot_take_more_than_the_slots(shared):
    limits = backend.Limits(max_connections=4, read_deadline_s=6.0, idle_timeout_s=3.0)
    with running(shared["reg"], shared["studio"], limits=limits) as (server, url):
        port = server.server_address[1]
        results: dict[int, tuple[bytes, int, float]] = {}
        threads = [threading.Thread(target=_trickle, args=(port, results, i)) for i in range(4)]
        for t in threads:
            t.start()
        _wait_for(lambda: _handler_threads() == 4)  # the slow clients hold every slot
        for _ in range(26):  # 30 slow clients in all: the rest are refused, without a thread
            status, headers, body = _raw(port, b"GET /health HTTP/1.0\r\n\r\n")
            _check_json_answer(status, body, 503, "over the slots")
            assert headers["Retry-After"] == "1"
        assert _handler_threads() == 4
        for t in threads:
            t.join(timeout=30)
        request_bytes = len(b"POST /predict HTTP/1.0\r\nContent-Length: 2\r\n\r\n{}")
        for data, sent, _ in results.values():
            # cut off by the read deadline, long before the request was complete
            assert sent < request_bytes, sent
            status = http.client.HTTPResponse(_Bytes(data))
            status.begin()
            _check_json_answer(status.status, status.read(), 408, "slowloris")
        assert len(results) == 4
        # a connection that sends nothing is closed after the idle timeout, unanswered
        with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
            assert s.recv(100) == b""
        assert httpx.get(url + "/health").json()["status"] == "UP"
        _wait_for(lambda: _handler_threads() == 0)


def _wait_for(condition, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


class _Bytes:
    """Bytes already received, shaped like the socket http.client.HTTPResponse reads from."""

    def __init__(self, data: bytes) -> None:
        self._data = data

    def makefile(self, mode: str) -> io.BytesIO:
        return io.BytesIO(self._data)


# -- the pixel budget -----------------------------------------------------------------------------

def _serve_in_child(reg: str, conn, port: int) -> None:
    from pipelines.labelstudio import Studio
    holder = backend.ModelHolder(reg, pick_device("cpu"))
    backend.make_server(holder, Studio(conn), params=factories.params({"train.device": "cpu"}),
                        port=port).serve_forever()


def _peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM in /proc status")


def test_a_huge_16_bit_png_is_refused_without_decoding_it(shared, label_studio):
    """One task naming a 9,400 x 9,400 16-bit PNG (2 MB on disk, 177 MB of pixels) once took
    the backend to 2.9 GB: now its peak memory does not move and the task gets a reason."""
    (label_studio["files"] / "demo" / "huge16.png").write_bytes(png16(9400))
    port = free_port()
    child = multiprocessing.get_context("spawn").Process(
        target=_serve_in_child, args=(str(shared["reg"]), shared["studio"].conn, port),
        daemon=True)
    child.start()
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            try:
                httpx.get(url + "/health", timeout=2)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "backend child did not start"
                time.sleep(0.2)
        one = {"data": {"image": GOOD.format(3)}}
        assert "result" in httpx.post(url + "/predict", json={"tasks": [one]},
                                      timeout=60).json()["results"][0]
        before = _peak_rss_mb(child.pid)
        huge = {"data": {"image": "/data/local-files/?d=demo/huge16.png"}}
        r = httpx.post(url + "/predict", json={"tasks": [huge, one]}, timeout=120)
        results = r.json()["results"]
        assert r.status_code == 200 and "result" in results[1]
        assert "result" not in results[0] and "too large" in results[0]["error"], results[0]
        grew = _peak_rss_mb(child.pid) - before
        assert grew < 150, f"peak memory grew by {grew:.0f} MB"
    finally:
        child.terminate()
        child.join(10)
