"""The read hot path of objectstore: SigV4-signed GETs over one keep-alive connection per thread.

Per object, botocore's signer (`S3SigV4Auth.add_auth`) costs ~400 us of CPU here and urllib3's
pool ~450 us more; on 2 cores, shared with the server in a benchmark, that is most of the
budget for 1,000 images/s. `GetSigner` caches the day's signing key (~20 us a request) and
produces byte-for-byte the headers botocore's signer produces for the same GET at the same
instant (tests/test_objectstore.py holds the two together); `Connections` keeps one stdlib
http.client connection per reader thread. Nothing else is signed here: writes and listings go
through boto3.
"""
from __future__ import annotations

import datetime
import hashlib
import hmac
import http.client
import ssl
import threading
from urllib.parse import urlsplit

EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()  # a GET's payload hash: no body


def host_header(url: str) -> str:
    """The Host value a GET to `url` carries (the port only when not the scheme's default)."""
    parts = urlsplit(url)
    default = {"http": 80, "https": 443}.get(parts.scheme)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    return host if parts.port in (None, default) else f"{host}:{parts.port}"


class GetSigner:
    """SigV4 for GETs to one S3 endpoint and region. Thread-safe; keeps one derived key (the
    HMAC of the secret with the day), never the secret itself."""

    def __init__(self, *, region: str, service: str = "s3") -> None:
        self.region, self.service = region, service
        self._lock = threading.Lock()
        self._cached: tuple[str, str, bytes] | None = None  # (access key, day, signing key)

    def _key(self, access_key: str, secret_key: str, day: str) -> bytes:
        cached = self._cached
        if cached and cached[0] == access_key and cached[1] == day:
            return cached[2]
        k = hmac.new(f"AWS4{secret_key}".encode(), day.encode(), hashlib.sha256).digest()
        for part in (self.region, self.service, "aws4_request"):
            k = hmac.new(k, part.encode(), hashlib.sha256).digest()
        with self._lock:
            self._cached = (access_key, day, k)
        return k

    def headers(self, url: str, *, access_key: str, secret_key: str, token: str | None,
                now: datetime.datetime | None = None) -> dict[str, str]:
        """Headers for `GET url` (its path already percent-encoded, no query string)."""
        stamp = (now or datetime.datetime.now(datetime.timezone.utc)).strftime("%Y%m%dT%H%M%SZ")
        day = stamp[:8]
        signed = {"host": host_header(url), "x-amz-content-sha256": EMPTY_SHA256,
                  "x-amz-date": stamp}
        if token:
            signed["x-amz-security-token"] = token
        names = sorted(signed)
        canonical = "\n".join(["GET", urlsplit(url).path or "/", "",
                               *(f"{n}:{' '.join(signed[n].split())}" for n in names), "",
                               ";".join(names), EMPTY_SHA256])
        scope = f"{day}/{self.region}/{self.service}/aws4_request"
        to_sign = "\n".join(["AWS4-HMAC-SHA256", stamp, scope,
                             hashlib.sha256(canonical.encode()).hexdigest()])
        signature = hmac.new(self._key(access_key, secret_key, day), to_sign.encode(),
                             hashlib.sha256).hexdigest()
        out = {"Host": signed["host"], "X-Amz-Content-SHA256": EMPTY_SHA256, "X-Amz-Date": stamp,
               "Authorization": (f"AWS4-HMAC-SHA256 Credential={access_key}/{scope}, "
                                 f"SignedHeaders={';'.join(names)}, Signature={signature}")}
        if token:
            out["X-Amz-Security-Token"] = token
        return out


class Connections:
    """One keep-alive HTTP(S) connection per thread to one endpoint (certificates verified);
    `connect_timeout_s` to connect, `read_timeout_s` for each read of the socket. Raises
    OSError / http.client.HTTPException for the caller to map."""

    def __init__(self, endpoint: str, *, connect_timeout_s: float, read_timeout_s: float) -> None:
        parts = urlsplit(endpoint)
        self._https = parts.scheme == "https"
        self._host, self._port = parts.hostname or "", parts.port
        self._connect_s, self._read_s = connect_timeout_s, read_timeout_s
        self._ssl = ssl.create_default_context() if self._https else None
        self._local = threading.local()
        self._lock = threading.Lock()
        self._all: list[tuple[threading.Thread, http.client.HTTPConnection]] = []

    def _conn(self) -> http.client.HTTPConnection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            if self._https:
                conn = http.client.HTTPSConnection(self._host, self._port,
                                                   timeout=self._connect_s, context=self._ssl)
            else:
                conn = http.client.HTTPConnection(self._host, self._port, timeout=self._connect_s)
            self._local.conn = conn
            with self._lock:  # connections of threads that ended are closed here, not leaked
                for thread, old in self._all:
                    if not thread.is_alive():
                        old.close()
                self._all = [(t, c) for t, c in self._all if t.is_alive()]
                self._all.append((threading.current_thread(), conn))
        return conn

    def get(self, path: str, headers: dict[str, str]
            ) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        """(connection, response) of `GET path`; read the body, then `done(conn, resp)`."""
        conn = self._conn()
        reused = conn.sock is not None
        while True:
            try:
                if conn.sock is None:
                    conn.connect()
                    conn.sock.settimeout(self._read_s)
                conn.request("GET", path, headers=headers)
                return conn, conn.getresponse()
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                conn.close()
                if not reused:
                    raise
                reused = False  # a kept-alive connection the server dropped while idle: once
                                # more on a new one, without counting it as a failed try
            except BaseException:
                conn.close()
                raise

    @staticmethod
    def done(conn: http.client.HTTPConnection, resp: http.client.HTTPResponse) -> None:
        """After the body was read: keep the connection when the answer ended cleanly."""
        if not resp.isclosed():
            conn.close()  # body left unread (too big, an error): never reuse mid-answer

    def close(self) -> None:
        with self._lock:
            for _, conn in self._all:
                conn.close()
            self._all.clear()
