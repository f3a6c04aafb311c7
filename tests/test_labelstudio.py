"""pipelines.labelstudio against a real Label Studio, and against a misbehaving local HTTP server
for the faults a real one rarely shows on demand."""
from __future__ import annotations

import http.server
import threading
import time

import pytest

from pipelines.labelconfig import label_config
from pipelines.labelstudio import (Connection, ImageFetchError, LabelStudioError, Studio,
                                   connection_from_env)
from tests.conftest import free_port


U = "/data/upload/1"  # Label Studio's route for uploaded files: one the key may fetch


class _Recorder(http.server.BaseHTTPRequestHandler):
    """Stands in for Label Studio's media routes and a storage host: serves .../img (small
    bytes), .../big (over the cap), .../redirect (to `other`), .../slow (hangs), by the last
    path segment; records every request's path and Authorization header."""
    seen: list = []
    other = ""

    def do_GET(self):  # noqa: N802 (http.server's naming)
        type(self).seen.append((self.server.server_address[1], self.path,
                                self.headers.get("Authorization")))
        name = "/" + self.path.rsplit("/", 1)[-1]
        if name == "/redirect":
            self.send_response(302)
            self.send_header("Location", f"{type(self).other}/stolen")
            self.end_headers()
        elif name == "/big":
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"x" * 50_000)
        elif name == "/slow":
            time.sleep(3)
            self.send_response(200)
            self.end_headers()
        elif name in ("/flaky", "/throttled"):
            hits = sum(1 for _, p, _ in type(self).seen if p == self.path)
            if hits <= 2:  # fail twice, then serve
                self.send_response(503 if name == "/flaky" else 429)
                if name == "/throttled":
                    self.send_header("Retry-After", "1")
                self.end_headers()
            else:
                self.send_response(200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")
        elif name == "/truncated":
            self.send_response(200)
            self.send_header("Content-Length", "100")
            self.end_headers()
            self.wfile.write(b"0123456789")  # then the connection closes: 90 bytes short
            self.close_connection = True
        elif name == "/missing":
            self.send_response(404)
            self.end_headers()
        else:
            self.send_response(200)
            self.send_header("Content-Length", "5")
            self.end_headers()
            self.wfile.write(b"hello")

    def log_message(self, *args):
        pass


@pytest.fixture
def fault_servers():
    servers = []
    for _ in range(2):
        srv = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), _Recorder)
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        servers.append(srv)
    _Recorder.seen = []
    _Recorder.other = f"http://127.0.0.1:{servers[1].server_address[1]}"
    yield [f"http://127.0.0.1:{s.server_address[1]}" for s in servers]
    for srv in servers:
        srv.shutdown()


def test_image_fetch_sends_key_only_to_configured_host(fault_servers):
    origin, other = fault_servers
    st = Studio(Connection(origin, "secret-key-123"), read_timeout_s=1.0)
    assert st.fetch_image(f"{U}/img", max_bytes=100) == b"hello"
    with pytest.raises(ImageFetchError, match="redirect"):
        st.fetch_image(f"{U}/redirect", max_bytes=100)
    with pytest.raises(ImageFetchError, match="host not allowed"):
        st.fetch_image(f"{other}/img", max_bytes=100)
    with pytest.raises(ImageFetchError, match="larger than"):
        st.fetch_image(f"{U}/big", max_bytes=1000)
    other_port = int(other.rsplit(":", 1)[1])
    assert [s for s in _Recorder.seen if s[0] == other_port] == []  # never contacted
    assert {auth for _, _, auth in _Recorder.seen} == {"Token secret-key-123"}


def test_listed_storage_host_is_fetched_without_the_key(fault_servers):
    origin, storage = fault_servers
    st = Studio(Connection(origin, "secret-key-123"), read_timeout_s=1.0,
                image_hosts=(storage.upper().replace("HTTP://", "http://"),))  # host case-folded
    assert st.fetch_image(f"{storage}/img", max_bytes=100) == b"hello"
    assert st.fetch_image(f"{U}/img", max_bytes=100) == b"hello"
    with pytest.raises(ImageFetchError, match="redirect"):  # no redirects from storage either
        st.fetch_image(f"{storage}/redirect", max_bytes=100)
    with pytest.raises(ImageFetchError, match="pull.image_hosts"):  # another port: not listed
        st.fetch_image("http://127.0.0.1:1/img", max_bytes=100)
    storage_port = int(storage.rsplit(":", 1)[1])
    by_port = {(port, auth) for port, _, auth in _Recorder.seen}
    assert (storage_port, None) in by_port
    assert all(auth is None for port, auth in by_port if port == storage_port)
    assert any(auth == "Token secret-key-123" for port, auth in by_port if port != storage_port)


def test_image_fetch_times_out(fault_servers):
    st = Studio(Connection(fault_servers[0], "k"), read_timeout_s=0.5)
    # the server answers after 3 s: without a read timeout this would succeed
    with pytest.raises(LabelStudioError, match="ReadTimeout.*4 attempts"):
        st.fetch_image(f"{U}/slow", max_bytes=100)


def test_image_fetch_retries_5xx_and_honours_retry_after(fault_servers):
    st = Studio(Connection(fault_servers[0], "k"), read_timeout_s=2)
    assert st.fetch_image(f"{U}/flaky", max_bytes=100) == b"ok"
    t0 = time.monotonic()
    assert st.fetch_image(f"{U}/throttled", max_bytes=100) == b"ok"
    assert time.monotonic() - t0 >= 2.0  # two 429s with Retry-After: 1
    assert [p for _, p, _ in _Recorder.seen].count(f"{U}/throttled") == 3


def test_truncated_body_is_an_error_not_data(fault_servers):
    st = Studio(Connection(fault_servers[0], "k"), read_timeout_s=2)
    with pytest.raises(LabelStudioError, match="kept failing"):
        st.fetch_image(f"{U}/truncated", max_bytes=1000)


def test_missing_image_is_a_quarantine_reason(fault_servers):
    st = Studio(Connection(fault_servers[0], "k"), read_timeout_s=2)
    with pytest.raises(ImageFetchError, match="404"):
        st.fetch_image(f"{U}/missing", max_bytes=1000)
    assert [p for _, p, _ in _Recorder.seen].count(f"{U}/missing") == 1  # not retried


def test_unreachable_server_names_the_url():
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(LabelStudioError) as err:
        Studio(Connection(url, "k"), connect_timeout_s=1).check()
    assert url in str(err.value) and "LABEL_STUDIO_URL" in str(err.value)


def test_wrong_key_is_a_clear_error_without_the_key(label_studio):
    bad = "wrong-key-0123456789"
    with pytest.raises(LabelStudioError) as err:
        Studio(Connection(label_studio["conn"].url, bad)).check()
    msg = str(err.value)
    assert "LABEL_STUDIO_API_KEY" in msg and label_studio["conn"].url in msg
    assert bad not in msg and "sessionid" not in msg


def test_key_never_in_repr(label_studio):
    assert label_studio["conn"].api_key not in repr(label_studio["conn"])


def test_connection_from_env_requires_both(monkeypatch, tmp_path):
    monkeypatch.delenv("LABEL_STUDIO_URL", raising=False)
    monkeypatch.delenv("LABEL_STUDIO_API_KEY", raising=False)
    with pytest.raises(LabelStudioError, match="LABEL_STUDIO_URL"):
        connection_from_env(tmp_path)
    monkeypatch.setenv("LABEL_STUDIO_URL", "ftp://example")
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", "k")
    with pytest.raises(LabelStudioError, match="http"):
        connection_from_env(tmp_path)


def test_label_config_escapes_class_names():
    cfg = label_config(("a", '"><script>x</script>', "c&d"))
    assert "<script>" not in cfg and "&amp;" in cfg


def test_project_setup_and_classes(label_studio):
    st = Studio(label_studio["conn"])
    classes = ("cat", "dog", "a & b")
    pid, created = st.ensure_project("labelgate setup test", classes)
    again, created_again = st.ensure_project("labelgate setup test", classes)
    assert created and not created_again and again == pid
    config = st.labeling_config(pid)
    assert config.classes == classes and len(config.sha256) == 64
    assert (config.choices_name, config.image_name, config.image_key) == ("label", "image",
                                                                          "image")


# -- hostile image URLs ---------------------------------------------------------------------
# Label Studio's own API on its own origin, reached through every spelling a task could use.
API_PATHS = ["/api/current-user/token", "/api/current-user/whoami", "/api/users/",
             "/api/projects/", "/api/token/", "/user/account/", "/admin/", "/api/version",
             "/data/upload", "/data/uploads/1/x.png", "/data/local-filesx/?d=a",
             "/tasks/1/resolvex/", "/tasks/x/resolve/", "/health"]
TRAVERSALS = ["/data/upload/../../api/current-user/token",
              "/data/upload/%2e%2e/%2e%2e/api/current-user/token",
              "/data/upload/..%2f..%2fapi/current-user/token",
              "/data/upload/..%2F..%2Fapi/users/", "/data/upload/.%2e/api/users/",
              "/data/upload/..\\..\\api\\users", "/data/local-files/../api/users/",
              "/data/upload/./../api/projects/", "/tasks/1/resolve/../../api/users/"]
MALFORMED = ["http://[::1", "http://[name]/data/upload/1/x.png", "http://h:99999/x.png",
             "http://h:port/x.png", "http://[::1]]/x", "http://%zz/x", "",
             "/data/upload/1/x\x00.png", "/data/upload/1/x\n.png", "/data/upload/1/\x7f.png",
             "/data/upload/1/x .png", "\t/data/upload/1/x.png", "javascript:alert(1)",
             "file:///etc/passwd", "ftp://h/x.png", "data:image/png;base64,AAAA",
             "//user:pw@127.0.0.1/x.png", "http:///x.png", "http://user@/x.png",
             "/data/upload/1/" + "a" * 5000, "\u202e/data/upload/1/x.png"]


def _url_corpus(origin: str, other: str, n: int = 150) -> list[str]:
    """A seeded mix of hosts x paths x mutations, plus the fixed forms above."""
    import random
    rng = random.Random(1234)
    hosts = [origin, origin.replace("127.0.0.1", "localhost"), other, "", "//127.0.0.1",
             origin.upper(), origin + ":80", "http://[::1]", "https://" + origin[7:]]
    paths = API_PATHS + TRAVERSALS + [f"{U}/img", "/data/local-files/?d=a/b.png",
                                      "/tasks/3/presign/?fileuri=czM6Ly9i", "/projects/2/resolve/"]
    mutations = [lambda p: p, lambda p: p + "?x=1", lambda p: p + "#frag",
                 lambda p: p.replace("/", "//", 1), lambda p: p.upper(),
                 lambda p: p + "\x00", lambda p: p + "%00", lambda p: " " + p,
                 lambda p: p.replace("a", "%61"), lambda p: p + "/" + "b" * rng.randint(1, 6000)]
    out = [h + p for h in hosts for p in API_PATHS + TRAVERSALS]
    out += [rng.choice(mutations)(rng.choice(hosts) + rng.choice(paths)) for _ in range(n)]
    return out + MALFORMED


def test_key_fetches_only_media_routes_and_hostile_urls_are_reasons(fault_servers):
    """Every URL form ends in bytes or ImageFetchError/LabelStudioError -- never another
    exception -- and no request carrying the key reaches anything but a media route."""
    from pipelines.lstransport import MEDIA_ROUTES
    origin, other = fault_servers
    st = Studio(Connection(origin, "secret-key-123"), read_timeout_s=1.0)
    corpus = _url_corpus(origin, other)
    outcomes = {"bytes": 0, "refused": 0}
    for url in corpus:
        try:
            st.fetch_image(url, max_bytes=100_000)
            outcomes["bytes"] += 1
        except (ImageFetchError, LabelStudioError) as exc:
            assert str(exc) and "secret-key-123" not in str(exc)
            outcomes["refused"] += 1
    assert outcomes["refused"] > len(API_PATHS) + len(TRAVERSALS) + len(MALFORMED)
    assert outcomes["bytes"] > 0  # the corpus does contain real media URLs
    keyed = [path for _, path, auth in _Recorder.seen if auth]
    assert keyed, "media routes were fetched with the key"
    for path in keyed:
        bare = path.split("?", 1)[0]
        assert ".." not in bare and "%2e" not in bare.lower()
        assert any(r.fullmatch(bare) for r in MEDIA_ROUTES), path
    # the API itself was never asked anything, with or without the key
    assert not [p for _, p, _ in _Recorder.seen if p.lower().startswith(("/api", "//api"))]


def test_embedded_key_never_goes_to_another_server(monkeypatch, tmp_path):
    import json
    (tmp_path / "credentials.json").write_text(json.dumps(
        {"url": "http://127.0.0.1:8089", "api_key": "embedded-secret-key"}))
    monkeypatch.setenv("LABEL_STUDIO_URL", "http://192.0.2.10:8080")
    monkeypatch.delenv("LABEL_STUDIO_API_KEY", raising=False)
    with pytest.raises(LabelStudioError, match="LABEL_STUDIO_API_KEY") as err:
        connection_from_env(tmp_path)
    assert "embedded-secret-key" not in str(err.value)
    # the embedded server itself still gets it
    monkeypatch.setenv("LABEL_STUDIO_URL", "http://127.0.0.1:8089")
    assert connection_from_env(tmp_path).api_key == "embedded-secret-key"


@pytest.mark.parametrize("url,key,match", [
    ("http://[::1", "k", "not a valid URL"), ("http://h:99999", "k", "not a valid URL"),
    ("http://[name]:8080", "k", "not a valid URL"), ("http://", "k", "name a host"),
    ("http://h:8080/?token=x", "k", "query"), ("http://u:p@h:8080", "k", "user name"),
    ("ftp://example", "k", "http://"),
    ("http://127.0.0.1:8080", "clé-ünïcode", "non-ASCII"),
    ("http://127.0.0.1:8080", "key with space", "space"),
    ("http://127.0.0.1:8080", "key\x07", "control")])
def test_bad_environment_is_a_clear_error(monkeypatch, tmp_path, url, key, match):
    monkeypatch.setenv("LABEL_STUDIO_URL", url)
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", key)
    with pytest.raises(LabelStudioError, match=match):
        connection_from_env(tmp_path)
