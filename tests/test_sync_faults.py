"""A pull through a misbehaving proxy in front of the real Label Studio: transient 5xx are
retried, a non-JSON or truncated export is an error (never data), and nothing is written."""
from __future__ import annotations

import dataclasses
import http.server
import threading

import httpx
import pytest

from pipelines import pull, rawstore
from pipelines.labelstudio import Connection, LabelStudioError, Studio
from pipelines.settings import load
from tests.conftest import REPO, free_port

_HOP = {"transfer-encoding", "connection", "content-length", "content-encoding", "keep-alive"}


class _Proxy(http.server.BaseHTTPRequestHandler):
    upstream = ""
    faults: dict[str, list[str]] = {}   # path substring -> actions, consumed in order
    protocol_version = "HTTP/1.1"

    down = False  # the server is gone: connections drop, even kept-alive ones

    def _handle(self):
        if self.down:
            self.close_connection = True
            return
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        action = next((acts.pop(0) for key, acts in self.faults.items()
                       if key in self.path and acts), None)
        if action == "503":
            self._reply(503, b"busy", "text/plain")
            return
        if action == "html":
            self._reply(200, b"<html>maintenance</html>", "text/html")
            return
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP | {"host"}}
        r = httpx.request(self.command, self.upstream + self.path, headers=headers,
                          content=body, timeout=120)
        if action == "truncate":
            self.send_response(r.status_code)
            self.send_header("Content-Length", str(len(r.content)))
            self.end_headers()
            self.wfile.write(r.content[: len(r.content) // 2])
            self.close_connection = True
            return
        self._reply(r.status_code, r.content, r.headers.get("content-type", ""))

    def _reply(self, code: int, data: bytes, ctype: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_PATCH = do_DELETE = _handle

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def project(make_project):
    return make_project(limit=25, eval_tasks=5, unlabeled_tasks=3)


@pytest.fixture
def proxied(project, label_studio):
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), _Proxy)
    _Proxy.upstream, _Proxy.faults, _Proxy.down = label_studio["conn"].url, {}, False
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{srv.server_address[1]}"
    yield Studio(Connection(url, label_studio["conn"].api_key), read_timeout_s=60)
    srv.shutdown()


def _params(project):
    p = load(REPO / "params.yaml")
    return dataclasses.replace(p, studio=dataclasses.replace(p.studio,
                                                             project_title=project["title"]))


def test_transient_5xx_on_the_export_is_retried(project, proxied, tmp_path):
    _Proxy.faults = {"/export": ["503", "503"]}
    result = pull.run(tmp_path, studio=proxied, project_id=project["id"], params=_params(project))
    assert result["snapshot"] == "000001"
    assert _Proxy.faults["/export"] == []  # both faults were served, then the retry succeeded


@pytest.mark.parametrize("fault", ["html", "truncate"])
def test_non_json_or_truncated_export_is_an_error_and_writes_nothing(project, proxied,
                                                                     tmp_path, fault):
    _Proxy.faults = {"/export": [fault] * 10}
    with pytest.raises(LabelStudioError) as err:
        pull.run(tmp_path, studio=proxied, project_id=project["id"], params=_params(project))
    assert proxied.conn.url in str(err.value)
    # non-JSON is not retried (it will not get better); a cut-short body is, a bounded number
    # of times (it may be a dropped connection)
    served = 10 - len(_Proxy.faults["/export"])
    assert served == (1 if fault == "html" else 4)
    assert rawstore.snapshot_dirs(tmp_path) == []
    assert not (tmp_path / "pulls").exists() or not any((tmp_path / "pulls").iterdir())


def test_label_studio_gone_mid_pull_fails_cleanly_then_the_rerun_resumes(project, label_studio,
                                                                         tmp_path, monkeypatch):
    """Label Studio stops answering in the middle of a first pull (a restart): the pull ends
    with a clear error and no snapshot; once it is back, the re-run resumes (the export calls
    already made are not made again) and equals one uninterrupted pull."""
    monkeypatch.setattr(pull, "EXPORT_IDS_PER_CALL", 5)  # several calls on a small project
    port = free_port()
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", port), _Proxy)
    _Proxy.upstream, _Proxy.faults, _Proxy.down = label_studio["conn"].url, {}, False
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    studio = Studio(Connection(f"http://127.0.0.1:{port}", label_studio["conn"].api_key),
                    connect_timeout_s=1, read_timeout_s=30)
    real_export = studio.export_tasks
    calls = []

    def export_then_go_down(pid, ids):
        calls.append(ids)
        if len(calls) == 3:  # the server goes away between two export calls
            _Proxy.down = True
            srv.shutdown()
            srv.server_close()
        return real_export(pid, ids)
    monkeypatch.setattr(studio, "export_tasks", export_then_go_down)
    raw = tmp_path / "raw"
    with pytest.raises(LabelStudioError, match=f"Label Studio at http://127.0.0.1:{port}"):
        pull.run(raw, studio=studio, project_id=project["id"], params=_params(project))
    assert rawstore.snapshot_dirs(raw) == []

    _Proxy.down = False
    back = http.server.ThreadingHTTPServer(("127.0.0.1", port), _Proxy)  # restarted, same URL
    threading.Thread(target=back.serve_forever, daemon=True).start()
    try:
        monkeypatch.setattr(studio, "export_tasks", real_export)
        result = pull.run(raw, studio=studio, project_id=project["id"], params=_params(project))
    finally:
        back.shutdown()
    assert result["snapshot"] == "000001" and result["resumed"]["export_calls"] == 2
    clean = tmp_path / "clean"
    pull.run(clean, studio=Studio(label_studio["conn"]), project_id=project["id"],
             params=_params(project))
    a, b = rawstore.snapshot_dirs(raw)[0], rawstore.snapshot_dirs(clean)[0]
    for name in ("tasks.jsonl", "images.jsonl", "images.tar", "changes.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
