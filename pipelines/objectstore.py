"""Object storage labelgate reads and writes itself: only the buckets listed in params.yaml
`storage.buckets`, only at `storage.endpoint_url`, with the user's own credentials (boto3's
default chain: AWS_* variables, ~/.aws files, `storage.profile`). Credentials are never logged
and never appear in a message or a repr.

The one module that imports boto3 (STYLE 10). Reads (`get`, `get_file`) take a hot path: each
GET is signed by `s3get.GetSigner` (SigV4, the credentials frozen per request so refreshing
ones keep working) and sent over one keep-alive connection per reader thread, because boto3's
`get_object` costs ~3 ms of client CPU per call (~340 objects/s on 2 cores) and a pull reads
tens of thousands of small images. Writes and listings go through boto3.
"""
from __future__ import annotations

import http.client
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlsplit

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, ProfileNotFound

from pipelines import settings
from pipelines.s3get import Connections, GetSigner
from pipelines.files import atomic_writer

ATTEMPTS = 4          # tries per request (1 + 3 retries) for timeouts, 5xx, 429, dropped connections
MAX_BACKOFF_S = 4.0   # backoff 0.5, 1, 2 s between tries, capped here
MAX_LIST_PAGES = 10_000   # ListObjectsV2 pages of 1,000 keys: 10 M keys at most per listing
MULTIPART_BYTES = 64 << 20  # put_file: one PUT up to 64 MiB, multipart above
_READ_CHUNK = 1 << 20       # get_file streams 1 MiB at a time
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_TRANSIENT_STATUS = frozenset({429, 500, 502, 503, 504})


class StorageError(RuntimeError):
    """What went wrong and what to do; never credentials. `transient`: a retry may succeed.
    `refused`: the credentials were refused (403), or there are none."""

    def __init__(self, message: str, *, transient: bool = False, refused: bool = False) -> None:
        super().__init__(message)
        self.transient, self.refused = transient, refused


@dataclass(frozen=True)
class ObjectRef:
    bucket: str
    key: str

    def __post_init__(self) -> None:
        if not _BUCKET.fullmatch(self.bucket or ""):
            raise ValueError(f"not an S3 bucket name: {self.bucket[:80]!r}")
        if not self.key or len(self.key.encode()) > 1024:
            raise ValueError(f"s3://{self.bucket}/ needs an object key of 1 to 1,024 bytes")

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.key}"

    @classmethod
    def parse(cls, uri: str) -> "ObjectRef":
        """`s3://bucket/key` -> ObjectRef; ValueError for anything else."""
        if not isinstance(uri, str) or not uri.startswith("s3://"):
            raise ValueError(f"not an s3:// URI: {str(uri)[:120]!r}")
        bucket, _, key = uri[len("s3://"):].partition("/")
        return cls(bucket, key)


def _status_error(uri: str, status: int, code: str, what: str) -> StorageError:
    """An S3 error answer as a StorageError. Only the error *code* is shown: S3's error bodies
    can name the access key id (SignatureDoesNotMatch echoes the string to sign)."""
    where = f"{what} {uri}"
    if status in _TRANSIENT_STATUS:
        return StorageError(f"the object store answered HTTP {status} {code} while {where}",
                            transient=True)
    if status == 404 or code in ("NoSuchKey", "NoSuchBucket"):
        return StorageError(f"{uri} does not exist ({code or 'HTTP 404'})")
    if status == 403 or code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
        return StorageError(
            f"the object store refused {where} (HTTP {status} {code}): the credentials in use "
            "(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, ~/.aws or storage.profile) are wrong or "
            "lack permission on that bucket", refused=True)
    if 300 <= status < 400 or code in ("PermanentRedirect", "AuthorizationHeaderMalformed"):
        return StorageError(
            f"the object store redirected {where} (HTTP {status} {code}): the bucket lives at "
            "another endpoint or region; set storage.endpoint_url / storage.region (redirects "
            "are never followed: only the configured endpoint is contacted)")
    return StorageError(f"the object store answered HTTP {status} {code} while {where}")


def _code(body: bytes) -> str:
    found = re.search(rb"<Code>([A-Za-z0-9.]{1,64})</Code>", body[:4096])
    return found.group(1).decode() if found else ""


class ObjectStore:
    """Reads and writes objects of the listed buckets at the configured endpoint (see the
    module docstring). Thread-safe: one instance serves a pull's `storage.workers` threads."""

    def __init__(self, storage: settings.Storage, *, connect_timeout_s: float = 5.0,
                 read_timeout_s: float = 30.0, attempts: int = ATTEMPTS) -> None:
        self.storage = storage
        self._buckets = frozenset(storage.buckets)
        self._attempts = max(1, attempts)
        try:
            self._session = boto3.session.Session(profile_name=storage.profile or None)
        except ProfileNotFound:
            raise StorageError(f"storage.profile {storage.profile!r} is not a profile in "
                               "~/.aws/config or ~/.aws/credentials") from None
        self.region = storage.region or self._session.region_name or "us-east-1"
        self.endpoint = (storage.endpoint_url.rstrip("/") if storage.endpoint_url
                         else f"https://s3.{self.region}.amazonaws.com")
        pool = max(storage.workers, 10)  # one connection per concurrent reader, keep-alive
        self._config = Config(
            region_name=self.region, max_pool_connections=pool,
            connect_timeout=connect_timeout_s, read_timeout=read_timeout_s,
            retries={"mode": "standard", "total_max_attempts": self._attempts},
            # aws-chunked bodies with CRC trailers (botocore >= 1.36's default) are refused by
            # many S3-compatible servers: checksums only where the API requires them
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            s3={"addressing_style": "path"})
        self._signer = GetSigner(region=self.region)
        self._client_obj = None
        self._lock = threading.Lock()
        self._http = Connections(self.endpoint, connect_timeout_s=connect_timeout_s,
                                 read_timeout_s=read_timeout_s)

    def __repr__(self) -> str:  # no credentials: the endpoint and the bucket names only
        return f"ObjectStore(endpoint={self.endpoint!r}, buckets={sorted(self._buckets)!r})"

    # -- the allow-list -----------------------------------------------------------------------
    def check(self, ref: ObjectRef) -> None:
        """StorageError unless `ref.bucket` is listed in storage.buckets."""
        if ref.bucket not in self._buckets:
            listed = ", ".join(sorted(self._buckets)) or "none"
            raise StorageError(
                f"bucket {ref.bucket!r} is not listed in params.yaml storage.buckets (listed: "
                f"{listed}); add it there to let labelgate read {ref.uri} with your credentials")

    def _url(self, ref: ObjectRef) -> str:
        # path-style: https://endpoint/bucket/key, the one form every S3 server takes (the
        # signer signs the path exactly as written, so the key is percent-encoded here once)
        return f"{self.endpoint}/{ref.bucket}/{quote(ref.key, safe='/~')}"

    def _credentials(self):
        creds = self._session.get_credentials()
        if creds is None:
            raise StorageError("no AWS credentials found for the object store: set "
                               "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or a profile in "
                               "storage.profile", refused=True)
        return creds.get_frozen_credentials()

    def _client(self):
        with self._lock:
            if self._client_obj is None:
                self._credentials()  # fail with our message, not boto3's, when there are none
                client = self._session.client("s3", endpoint_url=self.endpoint,
                                              config=self._config)
                client.meta.events.register("before-send.s3", self._only_endpoint)
                self._client_obj = client
            return self._client_obj

    def _only_endpoint(self, request, **_) -> None:
        """Every request boto3 sends goes to the configured endpoint (a region redirect to
        another host is refused, never followed)."""
        if not _same_origin(request.url, self.endpoint):
            raise StorageError(f"refused a request to {urlsplit(request.url).netloc!r}: only "
                               f"the configured endpoint {self.endpoint} is contacted "
                               "(storage.endpoint_url)")

    # -- retries ------------------------------------------------------------------------------
    def _retrying(self, fn):
        for attempt in range(1, self._attempts + 1):
            try:
                return fn()
            except StorageError as exc:
                if not exc.transient or attempt == self._attempts:
                    if exc.transient:
                        raise StorageError(f"{exc}; gave up after {attempt} attempts (is the "
                                           f"object store at {self.endpoint} up?)",
                                           transient=True) from None
                    raise
                time.sleep(min(0.5 * 2 ** (attempt - 1), MAX_BACKOFF_S))
        raise AssertionError("unreachable")

    # -- reads: the hot path ------------------------------------------------------------------
    def _open(self, ref: ObjectRef, *, max_bytes: int):
        """(connection, answer) of a GET answered 200 with a Content-Length, if any, within
        `max_bytes`; the body is still to be read."""
        self.check(ref)
        creds = self._credentials()
        url = self._url(ref)
        headers = self._signer.headers(url, access_key=creds.access_key,
                                       secret_key=creds.secret_key, token=creds.token)
        try:
            conn, resp = self._http.get(urlsplit(url).path, headers)
        except (OSError, http.client.HTTPException) as exc:
            raise StorageError(f"cannot reach the object store at {self.endpoint} while "
                               f"reading {ref.uri} ({type(exc).__name__})",
                               transient=True) from None
        if resp.status != 200:
            body = b""
            try:
                body = resp.read(4096)
            except (OSError, http.client.HTTPException):
                pass
            self._http.done(conn, resp)
            raise _status_error(ref.uri, resp.status, _code(body), "reading")
        declared = resp.getheader("content-length")
        if declared and declared.isdigit() and int(declared) > max_bytes:
            conn.close()  # the connection is dropped, not drained: the body is never read
            raise StorageError(f"{ref.uri} is larger than {max_bytes} bytes ({declared})")
        return conn, resp

    def _body(self, ref: ObjectRef, conn, resp, amount: int) -> bytes:
        try:
            return resp.read(amount)
        except (OSError, http.client.HTTPException) as exc:  # cut short: an error, never data
            conn.close()
            raise StorageError(f"reading {ref.uri} broke off ({type(exc).__name__})",
                               transient=True) from None

    def _read(self, ref: ObjectRef, *, max_bytes: int) -> tuple[bytes, str]:
        conn, resp = self._open(ref, max_bytes=max_bytes)
        etag = str(resp.getheader("etag", "")).strip('"')
        data = self._body(ref, conn, resp, max_bytes + 1)  # never more than cap + 1 in memory
        self._http.done(conn, resp)
        if len(data) > max_bytes:
            raise StorageError(f"{ref.uri} is larger than {max_bytes} bytes")
        return data, etag

    def get(self, ref: ObjectRef, *, max_bytes: int) -> bytes:
        """The object's bytes (at most `max_bytes`, else StorageError); retried when transient."""
        return self.get_tagged(ref, max_bytes=max_bytes)[0]

    def get_tagged(self, ref: ObjectRef, *, max_bytes: int) -> tuple[bytes, str]:
        """(bytes, ETag) of the object from one GET: the ETag of exactly these bytes, for
        telling later whether the object changed (`etags`)."""
        return self._retrying(lambda: self._read(ref, max_bytes=max_bytes))

    def get_file(self, ref: ObjectRef, path: Path, *, max_bytes: int) -> None:
        """Download to `path` atomically (temp file + fsync + rename), streamed, capped."""
        def once() -> None:
            conn, resp = self._open(ref, max_bytes=max_bytes)
            size = 0
            try:
                with atomic_writer(path) as f:
                    while chunk := self._body(ref, conn, resp, _READ_CHUNK):
                        size += len(chunk)
                        if size > max_bytes:
                            raise StorageError(f"{ref.uri} is larger than {max_bytes} bytes")
                        f.write(chunk)
            finally:
                self._http.done(conn, resp)
        self._retrying(once)

    # -- writes and listings: boto3 -----------------------------------------------------------
    def _boto(self, ref: ObjectRef, what: str, fn, *, uri: str | None = None):
        self.check(ref)
        uri = uri or ref.uri
        try:
            return fn(self._client())
        except ClientError as exc:
            err = exc.response.get("Error", {})
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
            raise _status_error(uri, int(status), str(err.get("Code", ""))[:64], what) from None
        except BotoCoreError as exc:  # connection refused, timeouts (boto3 retried them)
            raise StorageError(f"cannot reach the object store at {self.endpoint} while {what} "
                               f"{uri} ({type(exc).__name__}; retried {self._attempts} "
                               "times)", transient=True) from None

    def put_bytes(self, ref: ObjectRef, data: bytes) -> None:
        self._boto(ref, "writing", lambda c: c.put_object(Bucket=ref.bucket, Key=ref.key,
                                                          Body=data))

    def put_file(self, ref: ObjectRef, path: Path) -> None:
        """Upload a file; multipart above MULTIPART_BYTES (boto3's transfer manager)."""
        from boto3.s3.transfer import TransferConfig
        conf = TransferConfig(multipart_threshold=MULTIPART_BYTES,
                              multipart_chunksize=MULTIPART_BYTES, use_threads=True,
                              max_concurrency=min(self.storage.workers, 8))
        self._boto(ref, "writing", lambda c: c.upload_file(str(path), ref.bucket, ref.key,
                                                           Config=conf))

    def etags(self, bucket: str, prefix: str = "") -> dict[str, str]:
        """key -> ETag (quotes stripped) of every object under `prefix`: ListObjectsV2, 1,000
        keys per call, at most MAX_LIST_PAGES calls."""
        ref = ObjectRef(bucket, prefix or "-")  # the bucket check; the key is not used
        out: dict[str, str] = {}

        def listing(client) -> dict[str, str]:
            token = None
            for _ in range(MAX_LIST_PAGES):
                kwargs = {"Bucket": bucket, "Prefix": prefix, "MaxKeys": 1000}
                if token:
                    kwargs["ContinuationToken"] = token
                page = client.list_objects_v2(**kwargs)
                for obj in page.get("Contents") or []:
                    out[obj["Key"]] = str(obj.get("ETag", "")).strip('"')
                if not page.get("IsTruncated"):
                    return out
                token = page.get("NextContinuationToken")
            raise StorageError(f"s3://{bucket}/{prefix} holds more than "
                               f"{MAX_LIST_PAGES * 1000} objects; list a narrower prefix")
        return self._boto(ref, "listing", listing, uri=f"s3://{bucket}/{prefix}")

    def probe(self, bucket: str) -> None:
        """StorageError (transient when unreachable) unless the bucket answers a one-key
        listing: tells one object that keeps failing from an object store that is down."""
        self._boto(ObjectRef(bucket, "-"), "listing",
                   lambda c: c.list_objects_v2(Bucket=bucket, MaxKeys=1), uri=f"s3://{bucket}/")

    def close(self) -> None:
        self._http.close()
        if self._client_obj is not None:
            self._client_obj.close()


def _same_origin(url: str, base: str) -> bool:
    a, b = urlsplit(url), urlsplit(base)
    return (a.scheme, a.hostname, a.port) == (b.scheme, b.hostname, b.port)

