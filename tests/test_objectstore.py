"""objectstore against a real S3 API (moto's S3 service, tests/s3server.py), faults injected by
a misbehaving front (tests/s3faults.py): allow-list, size cap, retries, credentials."""
from __future__ import annotations

import datetime
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from pipelines import objectstore, settings
from pipelines.objectstore import ObjectRef, ObjectStore, StorageError
from tests import s3server
from tests.s3faults import FaultProxy


def _storage(endpoint: str, *buckets: str, workers: int = 4) -> settings.Storage:
    return settings.Storage(buckets=tuple(buckets), endpoint_url=endpoint, region="",
                            profile="", workers=workers)


@pytest.fixture
def bucket(s3_env):
    name = f"os-{uuid.uuid4().hex[:12]}"
    s3_env.client().create_bucket(Bucket=name)
    return name


@pytest.fixture
def proxy(s3_env):
    front = FaultProxy(s3_env.endpoint)
    yield front
    front.close()


def test_signer_makes_botocores_headers(monkeypatch):
    import botocore.auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials
    from pipelines.s3get import GetSigner
    now = datetime.datetime(2026, 11, 30, 23, 59, 59, tzinfo=datetime.timezone.utc)
    monkeypatch.setattr(botocore.auth, "get_current_datetime", lambda: now.replace(tzinfo=None))
    for url, token in [("http://127.0.0.1:9000/b-1/a/x%20y%2Bz%C3%A9.png", None),
                       ("https://s3.eu-west-1.amazonaws.com/b.2/k~1", "session-token")]:
        theirs = AWSRequest(method="GET", url=url)
        botocore.auth.S3SigV4Auth(Credentials("AKIDEXAMPLE", "s3cr3t", token), "s3",
                                  "eu-west-1").add_auth(theirs)
        mine = GetSigner(region="eu-west-1").headers(url, access_key="AKIDEXAMPLE",
                                                     secret_key="s3cr3t", token=token, now=now)
        for name in ("Authorization", "X-Amz-Date", "X-Amz-Content-SHA256"):
            assert mine[name] == theirs.headers[name], name
        assert mine.get("X-Amz-Security-Token") == theirs.headers.get("X-Amz-Security-Token")


def test_round_trip_listing_and_file_download(s3_env, bucket, tmp_path):
    store = ObjectStore(_storage(s3_env.endpoint, bucket))
    odd = ObjectRef(bucket, "dir one/ünï+cødé (1).png")
    store.put_bytes(odd, b"\x89PNG\r\n\x1a\nhello")
    assert store.get(odd, max_bytes=100) == b"\x89PNG\r\n\x1a\nhello"
    data, etag = store.get_tagged(odd, max_bytes=100)
    assert store.etags(bucket, "dir one/") == {odd.key: etag}
    # more than one page of ListObjectsV2 (1,000 keys per call)
    client = s3_env.client()
    with ThreadPoolExecutor(8) as pool:  # boto3 clients are thread-safe
        list(pool.map(lambda i: client.put_object(Bucket=bucket, Key=f"many/{i:05d}", Body=b"x"),
                      range(1005)))
    assert len(store.etags(bucket, "many/")) == 1005
    src = tmp_path / "src.bin"
    src.write_bytes(b"y" * 3000)
    store.put_file(ObjectRef(bucket, "blob"), src)
    store.get_file(ObjectRef(bucket, "blob"), tmp_path / "out.bin", max_bytes=3000)
    assert (tmp_path / "out.bin").read_bytes() == src.read_bytes()
    with pytest.raises(StorageError, match="larger than 2999 bytes"):
        store.get_file(ObjectRef(bucket, "blob"), tmp_path / "capped.bin", max_bytes=2999)
    assert not (tmp_path / "capped.bin").exists()  # atomic: nothing at the path
    with pytest.raises(StorageError, match="does not exist") as missing:
        store.get(ObjectRef(bucket, "nope.png"), max_bytes=10)
    assert not missing.value.transient
    store.close()


def test_only_listed_buckets_and_no_request_for_others(proxy, bucket):
    store = ObjectStore(_storage(proxy.endpoint, bucket))
    with pytest.raises(StorageError, match="not listed in params.yaml storage.buckets") as exc:
        store.get(ObjectRef("someone-elses", "secret.png"), max_bytes=10)
    assert "someone-elses" in str(exc.value) and not exc.value.transient
    for call in (lambda: store.put_bytes(ObjectRef("someone-elses", "k"), b"x"),
                 lambda: store.etags("someone-elses"), lambda: store.probe("someone-elses")):
        with pytest.raises(StorageError, match="not listed"):
            call()
    assert proxy.requests == []  # refused before any request
    with pytest.raises(ValueError):
        ObjectRef.parse("https://example.com/b/k")
    with pytest.raises(ValueError):
        ObjectRef.parse("s3://Not_A_Bucket/k")


def test_redirect_to_another_endpoint_is_refused_not_followed(proxy, bucket):
    elsewhere = FaultProxy(proxy.endpoint)  # would answer, if anyone came
    try:
        proxy.fail_next(1, status=307, body=b"",
                        headers={"Location": f"{elsewhere.endpoint}/{bucket}/k.png"})
        store = ObjectStore(_storage(proxy.endpoint, bucket))
        with pytest.raises(StorageError, match="redirects are never followed"):
            store.get(ObjectRef(bucket, "k.png"), max_bytes=10)
        assert elsewhere.requests == []
    finally:
        elsewhere.close()


def test_region_redirects_of_writes_and_listings_are_refused(proxy, bucket):
    proxy.canned = (301, b"<Error><Code>PermanentRedirect</Code></Error>",
                    {"x-amz-bucket-region": "eu-west-1"})
    store = ObjectStore(_storage(proxy.endpoint, bucket))
    for call in (lambda: store.put_bytes(ObjectRef(bucket, "k"), b"x"),
                 lambda: store.etags(bucket)):
        with pytest.raises(StorageError, match="redirects are never followed"):
            call()
    assert all(path.startswith(f"/{bucket}") for _, path in proxy.requests)


def test_big_files_go_up_in_parts(s3_env, bucket, tmp_path, monkeypatch):
    monkeypatch.setattr(objectstore, "MULTIPART_BYTES", 5 << 20)  # S3's smallest part
    src = tmp_path / "model.safetensors"
    src.write_bytes(bytes(range(256)) * (44 << 10))  # 11 MiB: three parts
    store = ObjectStore(_storage(s3_env.endpoint, bucket))
    store.put_file(ObjectRef(bucket, "blobs/m"), src)
    assert store.etags(bucket, "blobs/")["blobs/m"].endswith("-3")  # a multipart ETag
    store.get_file(ObjectRef(bucket, "blobs/m"), tmp_path / "back", max_bytes=12 << 20)
    assert (tmp_path / "back").read_bytes() == src.read_bytes()


def test_transient_failures_are_retried_then_give_up(proxy, bucket, s3_env):
    s3_env.client().put_object(Bucket=bucket, Key="k.png", Body=b"abc")
    store = ObjectStore(_storage(proxy.endpoint, bucket), attempts=3)
    proxy.fail_next(2, status=503)
    assert store.get(ObjectRef(bucket, "k.png"), max_bytes=10) == b"abc"
    assert proxy.gets("k.png") == 3
    proxy.fail_next(3, status=500, body=b"<Error><Code>InternalError</Code></Error>")
    with pytest.raises(StorageError, match="gave up after 3 attempts") as exc:
        store.get(ObjectRef(bucket, "k.png"), max_bytes=10)
    assert exc.value.transient and "InternalError" in str(exc.value)


def test_timeouts_are_transient_and_bounded(proxy, bucket):
    store = ObjectStore(_storage(proxy.endpoint, bucket), read_timeout_s=0.5, attempts=2)
    proxy.hang_after(0)
    with pytest.raises(StorageError, match="gave up after 2 attempts") as exc:
        store.get(ObjectRef(bucket, "k.png"), max_bytes=10)
    assert exc.value.transient
    proxy.heal()


def test_credentials_never_in_messages_or_repr(proxy, bucket, s3_env):
    # AWS's SignatureDoesNotMatch body echoes the access key id and the string to sign
    leaky = (f"<Error><Code>SignatureDoesNotMatch</Code><AWSAccessKeyId>{s3server.ACCESS_KEY}"
             f"</AWSAccessKeyId><StringToSign>{s3server.SECRET_KEY}</StringToSign></Error>")
    store = ObjectStore(_storage(proxy.endpoint, bucket))
    messages = [repr(store), str(store.__dict__.get("storage"))]
    proxy.canned = (403, leaky.encode(), {"Content-Type": "application/xml"})
    for call in (lambda: store.get(ObjectRef(bucket, "k.png"), max_bytes=10),
                 lambda: store.put_bytes(ObjectRef(bucket, "k.png"), b"x"),
                 lambda: store.etags(bucket)):
        with pytest.raises(StorageError, match="credentials in use") as exc:
            call()
        messages.append(str(exc.value))
        assert exc.value.__cause__ is None  # no chained botocore error to print either
    for text in messages:
        assert s3server.ACCESS_KEY not in text and s3server.SECRET_KEY not in text


def test_no_credentials_and_unknown_profile_are_clear(s3, bucket, monkeypatch, tmp_path):
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance-metadata lookups
    store = ObjectStore(_storage(s3.endpoint, bucket))
    with pytest.raises(StorageError, match="no AWS credentials found"):
        store.get(ObjectRef(bucket, "k.png"), max_bytes=10)
    with pytest.raises(StorageError, match="storage.profile 'team-a' is not a profile"):
        ObjectStore(settings.Storage(buckets=(bucket,), endpoint_url=s3.endpoint, region="",
                                     profile="team-a", workers=4))
    (tmp_path / "creds").write_text(f"[team-a]\naws_access_key_id = {s3server.ACCESS_KEY}\n"
                                    f"aws_secret_access_key = {s3server.SECRET_KEY}\n")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "creds"))
    s3.client().put_object(Bucket=bucket, Key="k.png", Body=b"abc")
    by_profile = ObjectStore(settings.Storage(buckets=(bucket,), endpoint_url=s3.endpoint,
                                              region="", profile="team-a", workers=4))
    assert by_profile.get(ObjectRef(bucket, "k.png"), max_bytes=10) == b"abc"


class _Chunked(BaseHTTPRequestHandler):
    """An endpoint that streams an endless chunked body with no Content-Length."""
    protocol_version = "HTTP/1.1"
    sent = 0

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        chunk = b"\x89PNG" + b"\0" * 65532
        try:
            for _ in range(10_000):  # 655 MB if nobody stops reading
                self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                type(self).sent += len(chunk)
        except OSError:
            pass


def test_cap_is_enforced_while_reading_without_a_content_length(s3_env):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Chunked)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        store = ObjectStore(_storage(f"http://127.0.0.1:{server.server_address[1]}", "b-1"))
        with pytest.raises(StorageError, match="larger than 100000 bytes"):
            store.get(ObjectRef("b-1", "endless.png"), max_bytes=100_000)
        store.close()
    finally:
        server.shutdown()
        server.server_close()
    assert _Chunked.sent < 50_000_000  # the reader stopped it long before the end

