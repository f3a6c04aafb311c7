"""How labelgate talks to Label Studio: the connection, its checks, the HTTP transport.

Security rules kept here, in one place:
- the API key comes from the environment (or the embedded server's git-ignored credentials file),
  is never logged, and is never part of an error message or a repr; the embedded server's key
  only ever goes to the embedded server;
- with the key, only Label Studio's own media routes are fetched (`MEDIA_ROUTES`); storage
  hosts listed in `pull.image_hosts` are fetched without it; nothing else is contacted;
  redirects are refused, so the key can't follow one to another host; every fetch has
  connect/read timeouts and a byte cap;
- every call maps failures to one exception type with a message that says what to do, and
  retries only what can pass (5xx, 429 honouring Retry-After, timeouts, dropped connections).

`pipelines/labelstudio.py` builds the pipeline's reads and writes on top of `Transport`.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urljoin, urlsplit

import httpx
from label_studio_sdk import LabelStudio
from label_studio_sdk.core.api_error import ApiError

from pipelines import settings


class LabelStudioError(RuntimeError):
    """Label Studio is unreachable, refused the key, or answered something unusable.
    `transient` marks failures worth retrying (5xx, 429, timeouts, dropped connections)."""

    def __init__(self, message: str, *, transient: bool = False,
                 retry_after: float | None = None) -> None:
        super().__init__(message)
        self.transient = transient
        self.retry_after = retry_after  # seconds the server asked us to wait (Retry-After)


class AuthError(LabelStudioError):
    """The key was refused (401/403): retrying will not help."""


def _retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds form; dates are rare from LS)."""
    return float(value) if value and value.strip().isdigit() else None


FETCH_ATTEMPTS = 4        # per call: 1 try + 3 retries
MAX_BACKOFF_S = 10.0      # cap on one wait, Retry-After included
IMAGE_DEADLINE_S = 60.0   # overall, per image, retries included


class ImageFetchError(ValueError):
    """One image could not be fetched safely; the task is quarantined with this reason."""


MAX_URL_CHARS = 4096  # browsers and proxies cap around 2-8 k; longer is not a real image URL

# The only Label Studio routes the API key may fetch: where it serves task media (uploads,
# local files, storage proxies). Anything else on its origin -- /api/..., /user/... -- would
# let whoever can create a task read the pipeline's own API answers (its token among them)
# into the dataset. Paths after the base path of LABEL_STUDIO_URL; matched before any request.
MEDIA_ROUTES = (
    re.compile(r"/data/upload/[^?#]+"),                    # files uploaded through the UI/API
    re.compile(r"/data/local-files/?"),                    # local-files storage (?d=...)
    re.compile(r"/storage-data/uploaded/?"),               # uploads behind cloud storage
    re.compile(r"/(?:tasks|projects)/\d+/(?:resolve|presign)/?"),  # bucket proxies
)


def _checked_image_url(base: str, url: object) -> tuple[str, str]:
    """(absolute URL, path) of a task's image URL, or ImageFetchError saying what is wrong with
    it. Untrusted input: over-long, control characters, malformed hosts and ports all end
    here as a reason, never as an exception from the URL parser or the HTTP client."""
    if not isinstance(url, str) or not url.strip():
        raise ImageFetchError("image URL is empty or not a string")
    if len(url) > MAX_URL_CHARS:
        raise ImageFetchError(f"image URL is {len(url)} characters long (limit {MAX_URL_CHARS})")
    if any(not ch.isprintable() or ch.isspace() for ch in url):
        raise ImageFetchError("image URL contains whitespace or control characters")
    try:
        absolute = urljoin(base + "/", url)
        parts = urlsplit(absolute)
        parts.port  # noqa: B018 -- raises ValueError on a bad port
        httpx.URL(absolute)
    except (ValueError, httpx.InvalidURL) as exc:
        raise ImageFetchError(f"malformed image URL ({str(exc)[:120]})") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ImageFetchError(f"image URL must be http(s) with a host ({url[:120]!r})")
    if parts.username or parts.password:
        raise ImageFetchError("image URL carries user:password credentials; refused")
    return absolute, parts.path


def _is_media_path(path: str, base_path: str) -> bool:
    """Is `path` one of Label Studio's media routes (under LABEL_STUDIO_URL's own path)?
    Dot segments, encoded slashes/dots and backslashes are refused outright: servers and
    proxies disagree on how to normalise them, so they could reach another route."""
    lowered = path.lower()
    if "\\" in path or "%2f" in lowered or "%2e" in lowered or "%5c" in lowered:
        return False
    if any(seg in (".", "..") for seg in path.split("/")):
        return False
    if base_path and not path.startswith(base_path + "/"):
        return False
    rest = path[len(base_path):]
    return any(route.fullmatch(rest) for route in MEDIA_ROUTES)


def _origin(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    return parts.scheme.lower(), parts.netloc.lower()


@dataclass(frozen=True)
class Connection:
    url: str
    api_key: str = field(repr=False)  # never shown, never logged

    @property
    def origin(self) -> tuple[str, str]:
        return _origin(self.url)


def credentials_file(studio_dir: str | Path) -> Path:
    return Path(studio_dir) / "credentials.json"


def connection_from_env(studio_dir: str | Path | None = None) -> Connection:
    """LABEL_STUDIO_URL / LABEL_STUDIO_API_KEY, else the embedded server's credentials file,
    checked (settings.check_studio_env): a clear error, never a traceback, for a malformed URL
    or a key no HTTP header can carry."""
    url = os.environ.get("LABEL_STUDIO_URL")
    key = os.environ.get("LABEL_STUDIO_API_KEY")
    if not key and studio_dir is not None and credentials_file(studio_dir).exists():
        creds = json.loads(credentials_file(studio_dir).read_text())
        # The embedded server's key belongs to the embedded server: never send it to another
        # origin that LABEL_STUDIO_URL happens to name.
        if url and not _same_origin(url, creds["url"]):
            raise LabelStudioError(
                "LABEL_STUDIO_URL names another server than the embedded one but "
                "LABEL_STUDIO_API_KEY is not set; the embedded server's key is only ever sent "
                "to the embedded server. Set LABEL_STUDIO_API_KEY to a key of that Label "
                "Studio (Account & Settings), or unset LABEL_STUDIO_URL.")
        url, key = url or creds["url"], creds["api_key"]
    if not url or not key:
        raise LabelStudioError(
            "No Label Studio configured: set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY, "
            "or start the embedded server with `labelgate studio up`.")
    try:
        url = settings.check_studio_env(url, key)
    except settings.ParamsError as exc:
        raise LabelStudioError(str(exc)) from None
    return Connection(url=url, api_key=key)


def _same_origin(a: str, b: str) -> bool:
    try:
        return _origin(a) == _origin(b) and urlsplit(a).port == urlsplit(b).port
    except ValueError:  # a malformed URL is no origin of ours
        return False


class Transport:
    """A connection to one Label Studio: the SDK client, the raw JSON/image client, error
    mapping and the one retry loop. `Transport(conn).check()` fails fast with an actionable
    message."""

    def __init__(self, conn: Connection, *, connect_timeout_s: float = 5.0,
                 read_timeout_s: float = 60.0, image_hosts: tuple[str, ...] = ()) -> None:
        self.conn = conn
        # other origins images may come from (storage hosts); they never get the API key
        self._image_hosts = frozenset(_origin(h) for h in image_hosts)
        self._timeout = httpx.Timeout(read_timeout_s, connect=connect_timeout_s)
        self._client = LabelStudio(base_url=conn.url, api_key=conn.api_key,
                                   httpx_client=httpx.Client(timeout=self._timeout,
                                                             follow_redirects=False))
        # Image fetches get their own client: no redirects, same timeouts; the key is added per
        # request, and only after the origin check.
        self._http = httpx.Client(timeout=self._timeout, follow_redirects=False)

    # -- error mapping ------------------------------------------------------------------------
    @contextlib.contextmanager
    def _call(self, what: str) -> Iterator[None]:
        url = self.conn.url
        try:
            yield
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            raise LabelStudioError(
                f"Cannot reach Label Studio at {url} while {what} ({type(exc).__name__}). "
                "Check that the server is running (`labelgate studio status`) and that "
                "LABEL_STUDIO_URL points at it.", transient=True) from None
        except httpx.TimeoutException as exc:
            raise LabelStudioError(f"Label Studio at {url} timed out while {what} "
                                   f"({type(exc).__name__}).", transient=True) from None
        except httpx.HTTPError as exc:
            # a body cut short (RemoteProtocolError) lands here: an error, never data
            raise LabelStudioError(f"HTTP error talking to Label Studio at {url} while {what}: "
                                   f"{type(exc).__name__}", transient=True) from None
        except ApiError as exc:
            # str(ApiError) embeds response headers (session cookies): never show it whole.
            if exc.status_code in (401, 403):
                raise AuthError(
                    f"Label Studio at {url} rejected the API key (HTTP {exc.status_code}) while "
                    f"{what}. Check LABEL_STUDIO_API_KEY: it may be wrong, revoked or rotated.") from None
            body = exc.body if isinstance(exc.body, (dict, list, str)) else repr(exc.body)
            raise LabelStudioError(f"Label Studio at {url} answered HTTP {exc.status_code} while "
                                   f"{what}: {str(body)[:300]}",
                                   transient=exc.status_code in (429, 500, 502, 503, 504),
                                   retry_after=_retry_after(
                                       {k.lower(): v for k, v in (exc.headers or {}).items()}
                                       .get("retry-after"))) from None
        except json.JSONDecodeError:
            raise LabelStudioError(f"Label Studio at {url} sent a response that is not JSON "
                                   f"while {what}.") from None

    def _retrying(self, fn, *, deadline_s: float | None = None):
        """Call `fn` again on transient failures (5xx, 429, timeouts, dropped connections), with
        bounded backoff, honouring Retry-After, within an optional overall deadline. The one
        retry loop: image fetches and the streamed exports (the SDK retries its other calls
        itself, but not those)."""
        deadline = time.monotonic() + deadline_s if deadline_s else None
        for attempt in range(1, FETCH_ATTEMPTS + 1):
            try:
                return fn()
            except LabelStudioError as exc:
                if not exc.transient:
                    raise
                wait = min(exc.retry_after or 0.25 * 2 ** attempt, MAX_BACKOFF_S)
                if attempt == FETCH_ATTEMPTS or (deadline and time.monotonic() + wait > deadline):
                    raise LabelStudioError(f"{exc} It kept failing: gave up after {attempt} "
                                           "attempts.", transient=True) from None
                time.sleep(wait)
        raise AssertionError("unreachable")

    def check(self) -> int:
        """Fail fast if unreachable or the key is wrong; return the user id."""
        with self._call("checking the API key"):
            return self._client.users.whoami().id

    # -- raw JSON ---------------------------------------------------------------------------
    def _get_json(self, path: str, params: dict, what: str) -> object:
        """GET a JSON API path on the configured origin, retried like the streamed exports.
        Used where the SDK's per-row pydantic models cost more than the server (listing 8,000
        task ids: 4.6 s of model construction vs 0.05 s of json.loads)."""
        def once() -> object:
            with self._call(what):
                resp = self._http.get(f"{self.conn.url}{path}", params=params,
                                      headers={"Authorization": f"Token {self.conn.api_key}"})
                if not 200 <= resp.status_code < 300:
                    raise ApiError(status_code=resp.status_code, body=resp.text[:300],
                                   headers=dict(resp.headers))
                return resp.json()
        return self._retrying(once)

    # -- images -------------------------------------------------------------------------------
    def fetch_image(self, url: str, *, max_bytes: int) -> bytes:
        """Bytes of a task's image. With the API key only from Label Studio's own media routes
        (`MEDIA_ROUTES`); without it from an origin listed in `pull.image_hosts`; nothing else,
        refused before any request. No redirects; capped size. 5xx/429 (honouring
        Retry-After), timeouts and dropped connections are retried with bounded backoff within
        an overall deadline. Raises ImageFetchError for what is wrong with this image
        (quarantine-worthy: malformed URL, other route, 404, too big, redirect) and
        LabelStudioError when the fetch kept failing (see `image_failure` for telling one bad
        image from a server that is down)."""
        absolute, path = _checked_image_url(self.conn.url, url)
        origin = _origin(absolute)
        if origin == self.conn.origin:
            if not _is_media_path(path, urlsplit(self.conn.url).path.rstrip("/")):
                raise ImageFetchError(
                    f"image URL points at a Label Studio route that does not serve media "
                    f"({path[:120]!r}); only uploads, local files and storage proxies are "
                    "fetched with the API key")
            with_key = True
        elif origin in self._image_hosts:
            with_key = False
        else:
            raise ImageFetchError(
                f"image host not allowed: {urlsplit(absolute).netloc[:120]!r} (images come from "
                f"Label Studio at {self.conn.origin[1]} or an origin listed in pull.image_hosts)")
        def once() -> bytes:
            with self._call(f"downloading image {path[:120]}"):
                try:
                    return self._fetch_once(absolute, max_bytes=max_bytes, with_key=with_key)
                except httpx.InvalidURL as exc:  # what our checks did not foresee
                    raise ImageFetchError(f"malformed image URL ({str(exc)[:120]})") from None
        return self._retrying(once, deadline_s=IMAGE_DEADLINE_S)

    def alive(self) -> bool:
        """Does Label Studio answer and accept the key right now? Tells a server-wide failure
        (stop the pull) from one image that keeps failing (quarantine that task)."""
        try:
            self.check()
        except LabelStudioError:
            return False
        return True

    def _fetch_once(self, absolute: str, *, max_bytes: int, with_key: bool) -> bytes:
        # Transport failures (timeouts, resets, a body cut short of its Content-Length) are
        # raised by httpx and mapped to transient errors by `_call`: never data.
        headers = {"Authorization": f"Token {self.conn.api_key}"} if with_key else {}
        with self._http.stream("GET", absolute, headers=headers) as resp:
            if resp.status_code in (401, 403):
                raise ApiError(status_code=resp.status_code, body="image download refused")
            if resp.status_code == 429 or resp.status_code >= 500:
                raise LabelStudioError(
                    f"Label Studio at {self.conn.url} answered HTTP {resp.status_code} for an "
                    "image.", transient=True,
                    retry_after=_retry_after(resp.headers.get("retry-after")))
            if resp.is_redirect:
                raise ImageFetchError(f"image URL redirects (HTTP {resp.status_code}); "
                                      "redirects are refused")
            if resp.status_code != 200:
                raise ImageFetchError(f"image download failed: HTTP {resp.status_code}")
            declared = resp.headers.get("content-length")
            if declared and declared.isdigit() and int(declared) > max_bytes:
                raise ImageFetchError(f"image larger than {max_bytes} bytes ({declared})")
            chunks, size = [], 0
            for chunk in resp.iter_bytes():
                size += len(chunk)
                if size > max_bytes:
                    raise ImageFetchError(f"image larger than {max_bytes} bytes")
                chunks.append(chunk)
        return b"".join(chunks)

    def close(self) -> None:
        self._http.close()
