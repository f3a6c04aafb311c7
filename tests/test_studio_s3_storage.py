"""Label Studio's S3 import storage as teams set it up, against the suite's S3 server: the bucket's
objects become tasks (one per image, `s3://bucket/key`), annotators label them, and labelgate's
pull reads every image straight from the bucket with the user's own credentials -- never through
Label Studio, never with Label Studio's key or Label Studio's storage credentials.

The proof is twofold: after the sync, Label Studio's own access to the bucket is broken (its
storage now points at a dead endpoint) and the pull still gets every image; and a recording
proxy in front of the S3 server, the only endpoint labelgate is given, sees every image read,
signed with the user's key id, and never the Label Studio API key or Label Studio's storage key.
"""
from __future__ import annotations

import hashlib
import http.client
import json
import os
import subprocess
import sys
import tarfile
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import httpx
import pytest
import yaml

from pipelines.labelconfig import choice_result
from pipelines.labelstudio import Studio
from tests import factories, s3server
from tests.conftest import REPO, free_port

STUDIO_KEY_ID = "studio-reader"            # Label Studio's own storage credentials (made up:
STUDIO_SECRET = "studio-reader-secret"     # moto accepts any); labelgate must never send them
N_IMAGES = 12


class RecordingProxy:
    """A plain HTTP proxy on 127.0.0.1 in front of the S3 server: forwards every request as is
    and records (method, path with query, headers). labelgate is given this endpoint, so
    everything labelgate sends to object storage is on the record."""

    HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade",
           "proxy-authorization", "proxy-authenticate"}

    def __init__(self, upstream: str) -> None:
        self.seen: list[tuple[str, str, dict[str, str]]] = []
        up = urlsplit(upstream)
        proxy = self
        local = threading.local()

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _forward(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                proxy.seen.append((self.command, self.path, dict(self.headers.items())))
                if getattr(local, "conn", None) is None:
                    local.conn = http.client.HTTPConnection(up.hostname, up.port, timeout=30)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in proxy.HOP}
                try:
                    local.conn.request(self.command, self.path, body=body, headers=headers)
                    resp = local.conn.getresponse()
                    data = resp.read()
                except (OSError, http.client.HTTPException):
                    local.conn.close()
                    local.conn = None
                    self.send_error(502)
                    return
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in proxy.HOP and k.lower() != "content-length":
                        self.send_header(k, v)
                length_out = resp.getheader("Content-Length") if self.command == "HEAD" else None
                self.send_header("Content-Length", length_out or str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _forward

            def log_message(self, *args) -> None:  # the record is `seen`
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def proxy(s3):
    p = RecordingProxy(s3.endpoint)
    yield p
    p.close()


def _annotate(conn, task_id: int, label: str) -> None:
    """One annotation through Label Studio's API, as the labeling UI saves it."""
    resp = httpx.post(f"{conn.url}/api/tasks/{task_id}/annotations/",
                      headers={"Authorization": f"Token {conn.api_key}"},
                      json={"result": choice_result(label)}, timeout=60)
    resp.raise_for_status()


@pytest.mark.slow
def test_studio_s3_storage_tasks_are_pulled_from_the_bucket_never_through_studio(
        label_studio, studio_env, s3_env, proxy, tmp_path):
    conn = label_studio["conn"]
    studio = Studio(conn)
    classes = factories.params().base.classes

    # A team's bucket: images under a prefix, plus an object the storage's filter leaves out.
    bucket = f"lg-studio-{uuid.uuid4().hex[:12]}"
    images = {f"scans/{i:04d}.png": factories.distinct_png(i) for i in range(N_IMAGES)}
    factories.put_objects(s3_env.client(), bucket, images)
    factories.put_objects(s3_env.client(), bucket, {"scans/README.txt": b"not a task"},
                          content_type="text/plain")

    # Label Studio's S3 import storage at the custom endpoint, with its own credentials; the sync
    # creates one task per image.
    title = f"labelgate s3 {uuid.uuid4().hex[:8]}"
    project_id, created = studio.ensure_project(title, classes)
    assert created
    storage_id = factories.s3_import_storage(
        studio, project_id, bucket=bucket, prefix="scans", endpoint=s3_env.endpoint,
        access_key=STUDIO_KEY_ID, secret_key=STUDIO_SECRET, region=s3server.REGION)
    assert factories.sync_s3_storage(studio, storage_id) == N_IMAGES
    tasks = studio.export_tasks(project_id, sorted(studio.all_task_ids(project_id)))
    assert sorted(t["data"][factories.IMAGE_KEY] for t in tasks) == sorted(
        f"s3://{bucket}/{key}" for key in images)

    # Annotators label every task (through the API, as the labeling UI saves).
    truth = {}
    for task in tasks:
        key = task["data"][factories.IMAGE_KEY].split("/", 3)[3]
        truth[key] = classes[factories.digit_label(int(key[6:10]) % factories.digit_count())]
        _annotate(conn, task["id"], truth[key])

    # Label Studio loses its access to the bucket: its storage now points at a dead endpoint
    # (a PATCH without `bucket` is saved without Label Studio's connection check). Its viewers'
    # links lead there from now on.
    dead = f"http://127.0.0.1:{free_port()}"
    studio._client.import_storage.s3.update(id=storage_id, s3endpoint=dead)
    resolved = httpx.get(f"{conn.url}/api/tasks/{tasks[0]['id']}/",
                         headers={"Authorization": f"Token {conn.api_key}"},
                         timeout=60).json()["data"][factories.IMAGE_KEY]
    link = httpx.get(resolved, headers={"Authorization": f"Token {conn.api_key}"},
                     follow_redirects=False, timeout=60)
    assert link.status_code in (302, 303), link.status_code
    assert link.headers["location"].startswith(dead + "/"), link.headers["location"][:80]

    # labelgate's pull, configured as the README says: the bucket listed, the endpoint given
    # (here the recording proxy), the user's credentials from the AWS_* variables (s3_env).
    params_path = tmp_path / "params.yaml"
    params_path.write_text(yaml.safe_dump(factories.params_dict({
        "studio.project_title": title, "storage.buckets": [bucket],
        "storage.endpoint_url": proxy.endpoint, "storage.region": s3server.REGION}),
        sort_keys=False))
    raw = tmp_path / "data" / "raw"
    proc = subprocess.run(
        [sys.executable, "-m", "pipelines.pull", "--raw", str(raw), "--params", str(params_path),
         "--studio-dir", str(tmp_path / "studio")],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True,
        timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]

    # Every image is in the snapshot, byte for byte what the bucket holds, none quarantined.
    snap = raw / "pulls" / "000001"
    rows = [json.loads(line) for line in (snap / "images.jsonl").read_text().splitlines()]
    assert len(rows) == N_IMAGES
    assert [r for r in rows if r["error"]] == []
    want = {f"s3://{bucket}/{key}": hashlib.sha256(data).hexdigest()
            for key, data in images.items()}
    assert {r["url"]: r["sha256"] for r in rows} == want
    with tarfile.open(snap / "images.tar") as tar:
        assert sorted(tar.getnames()) == sorted(want.values())
    labels = {}
    for line in (snap / "tasks.jsonl").read_text().splitlines():
        task = json.loads(line)
        key = task["data"][factories.IMAGE_KEY].split("/", 3)[3]
        labels[key] = task["annotations"][0]["result"][0]["value"]["choices"][0]
    assert labels == truth

    # What reached object storage from labelgate: every image read from the bucket, signed with
    # the user's key id; never Label Studio's API key, never Label Studio's storage key.
    got = {urlsplit(path).path for method, path, _ in proxy.seen if method == "GET"}
    assert {f"/{bucket}/{key}" for key in images} <= got
    for method, path, headers in proxy.seen:
        sent = path + "\n" + "\n".join(f"{k}: {v}" for k, v in headers.items())
        assert conn.api_key not in sent, (method, path)
        assert STUDIO_KEY_ID not in sent and STUDIO_SECRET not in sent, (method, path)
        auth = {k.lower(): v for k, v in headers.items()}.get("authorization", "")
        assert f"Credential={s3server.ACCESS_KEY}/" in auth, (method, path)
