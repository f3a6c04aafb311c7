"""`labelgate backend`: the production model behind Label Studio's ML-backend protocol, connected
to a real Label Studio that asks it for predictions; bad requests are refused; a new production
model is picked up without a restart."""
from __future__ import annotations

import http.client
import json
import threading

import httpx
import pytest

from pipelines import backend, registry
from pipelines.device import pick_device
from tests import factories
from tests.conftest import free_port
from tests.test_preannotate import make_production


@pytest.fixture
def served(make_project, tmp_path):
    project = make_project(limit=20, eval_tasks=2, unlabeled_tasks=5)
    reg = tmp_path / "registry"
    first = make_production(reg, tmp_path, seed=1)
    params = factories.params({"train.device": "cpu"})
    holder = backend.ModelHolder(reg, pick_device("cpu"))
    port = free_port()
    server = backend.make_server(holder, project["studio"], params=params, port=port)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield {"project": project, "reg": reg, "first": first, "url": f"http://127.0.0.1:{port}",
           "port": port, "tmp": tmp_path}
    server.shutdown()


def _ls(project, method, path, **kw):
    conn = project["studio"].conn
    r = httpx.request(method, conn.url + path, timeout=60,
                      headers={"Authorization": f"Token {conn.api_key}"}, **kw)
    assert r.status_code < 300, (r.status_code, r.text[:500])
    return r.json() if r.content else None


def test_label_studio_gets_predictions_from_the_backend(served):
    project, url = served["project"], served["url"]
    pid = project["id"]
    ml = _ls(project, "POST", "/api/ml", json={"url": url, "project": pid, "title": "labelgate"})
    assert ml["state"] in ("CO", "Connected") or ml.get("url") == url
    unlabeled = [t["id"] for t in project["studio"].unlabeled_tasks(pid)]
    _ls(project, "POST", f"/api/dm/actions?id=retrieve_tasks_predictions&project={pid}",
        json={"selectedItems": {"all": False, "included": unlabeled}})
    preds = [p for p in project["studio"].predictions(pid) if p["task"] in unlabeled]
    assert sorted(p["task"] for p in preds) == sorted(unlabeled)
    assert {p["model_version"] for p in preds} == {served["first"]}
    assert all(0.0 <= p["score"] <= 1.0 and p["result"][0]["value"]["choices"] for p in preds)


def test_health_setup_and_reload_on_promotion(served):
    health = httpx.get(served["url"] + "/health").json()
    assert health == {"status": "UP", "model_class": "labelgate",
                      "model_version": served["first"]}
    second = make_production(served["reg"], served["tmp"], seed=2)
    assert httpx.post(served["url"] + "/setup", json={"project": "1.0"}).json() == \
        {"model_version": second}
    # a tampered blob is never served: the reload verifies the sha256 first
    blob = registry.blob_path(served["reg"], registry.production(served["reg"])["sha256"])
    make_production(served["reg"], served["tmp"], seed=3)
    tampered = registry.blob_path(served["reg"], registry.production(served["reg"])["sha256"])
    tampered.write_bytes(blob.read_bytes())
    r = httpx.post(served["url"] + "/predict", json={"tasks": [{"data": {}}]})
    assert r.status_code == 503 and "does not match its recorded sha256" in r.json()["error"]


@pytest.mark.parametrize("body, status", [
    (b"not json", 400), (b"[1, 2]", 400), (b'{"tasks": []}', 400), (b'{"tasks": "x"}', 400),
    (json.dumps({"tasks": [{}] * (backend.MAX_TASKS + 1)}).encode(), 400)])
def test_malformed_requests_are_refused(served, body, status):
    r = httpx.post(served["url"] + "/predict", content=body,
                   headers={"Content-Type": "application/json"})
    assert r.status_code == status and "error" in r.json()


def test_oversized_request_is_refused_before_reading_it(served):
    conn = http.client.HTTPConnection("127.0.0.1", served["port"], timeout=5)
    conn.putrequest("POST", "/predict")
    conn.putheader("Content-Length", str(backend.MAX_BODY_BYTES + 1))
    conn.endheaders()
    resp = conn.getresponse()  # answered without the body ever being sent
    assert resp.status == 413
    conn.close()


def test_binds_to_localhost_by_default(served):
    server = backend.make_server(backend.ModelHolder(served["reg"], pick_device("cpu")),
                                 served["project"]["studio"], params=factories.params(),
                                 port=free_port())
    assert server.server_address[0] == "127.0.0.1"
    server.server_close()
