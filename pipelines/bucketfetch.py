"""Task images that live in a bucket, read straight from it (never through Label Studio).

A task's image URL names a bucket object when it is `s3://bucket/key`, or Label Studio's link
to one: `<host>/tasks/N/resolve/?fileuri=<urlsafe base64 of s3://...>` (also `/presign/`, and
`/projects/N/...`; Label Studio 1.23's io_storages/urls.py and base_models.py). Objects of the
buckets listed in storage.buckets are read by `storage.workers` threads through
`objectstore.ObjectStore` with the user's own credentials; each read is verified (image
signature, size cap), hashed and staged to disk in its worker thread, so the main thread only
appends index lines. Links to other buckets keep going through Label Studio; a bare s3:// URI
of an unlisted bucket is that task's quarantine reason, naming the bucket to list.

`ImageReaders` routes each URL to its reader: this one, or Label Studio's (imagefetch.py).
"""
from __future__ import annotations

import base64
import os
import re
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from urllib.parse import parse_qs, unquote, urlsplit

from pipelines.files import append_jsonl, fsync_path, read_jsonl, sha256_bytes
from pipelines.imagefetch import StudioFetcher, bar, looks_like_image, not_an_image
from pipelines.objectstore import ObjectRef, ObjectStore, StorageError
from pipelines.labelstudio import Studio
from pipelines.settings import Params
from pipelines.staging import Staging

_LS_LINK = re.compile(r"/(?:tasks|projects)/\d+/(?:resolve|presign)/?$")  # path's end


class BucketUnreachable(RuntimeError):
    """The object store stopped answering altogether (after retries), or refuses the
    credentials for the whole bucket: the pull stops (a wrong key must not quarantine
    every task)."""


def bucket_ref(url: str) -> ObjectRef | None:
    """The bucket object a task image URL names (see the module docstring), or None when it
    names none (fetched through Label Studio as before). ValueError for a malformed s3:// URI."""
    if url.startswith("s3://"):
        return ObjectRef.parse(url)
    try:
        parts = urlsplit(url)
    except ValueError:
        return None
    if not parts.query or not _LS_LINK.search(parts.path):
        return None
    values = parse_qs(parts.query).get("fileuri") or []
    if len(values) != 1:
        return None
    encoded = values[0]
    try:  # Label Studio decodes base64 first, then falls back to percent-decoding
        uri = base64.urlsafe_b64decode(encoded.encode()).decode()
    except (ValueError, UnicodeDecodeError):
        uri = unquote(encoded)
    if not uri.startswith("s3://"):
        return None  # gs://, azure-blob://: through Label Studio
    try:
        return ObjectRef.parse(uri)
    except ValueError:
        return None


def unlisted_reason(bucket: str) -> str:
    return (f"image is in bucket {bucket!r}, which is not listed in params.yaml storage.buckets: "
            f"add {bucket!r} there (with AWS credentials that can read it) to read it straight "
            "from the bucket")


class BucketFetcher:
    """Bucket reads into the staging folder (same layout as `Staging.save_image`, plus each
    object's ETag in the index). A read that keeps failing while the bucket answers is that
    image's quarantine reason; a bucket that stops answering raises BucketUnreachable."""

    def __init__(self, store: ObjectStore, stage: Staging, *, max_bytes: int,
                 workers: int) -> None:
        self.store, self.stage, self.max_bytes = store, stage, max_bytes
        self.failed: dict[str, str] = {}     # url -> reason
        self.etags: dict[str, str] = self._staged_etags()  # url -> ETag of the staged bytes
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="bucket")
        self._pending: dict[str, tuple[ObjectRef, Future]] = {}
        self._blobs = stage.root / "images"
        self._blobs.mkdir(parents=True, exist_ok=True)

    def _staged_etags(self) -> dict[str, str]:
        index = self.stage.root / "images.jsonl"
        staged = self.stage.images()
        return {r["url"]: r["etag"] for r in (read_jsonl(index) if index.exists() else [])
                if r.get("etag") and staged.get(r["url"]) == r["sha256"]}

    def _one(self, ref: ObjectRef) -> tuple[str, str] | StorageError | str:
        """(sha256, ETag) of the staged bytes, or why not. Runs in a worker thread: the read,
        the hash and the blob write (fsynced; the folder is fsynced once per drain)."""
        try:
            data, etag = self.store.get_tagged(ref, max_bytes=self.max_bytes)
        except StorageError as exc:
            return exc
        if not looks_like_image(data):
            return not_an_image(data)
        sha = sha256_bytes(data)
        blob = self._blobs / sha
        if not blob.exists():
            tmp = self._blobs / f".{sha}.{uuid.uuid4().hex[:8]}.tmp"
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, blob)
        return sha, etag

    def queue(self, refs: dict[str, ObjectRef], *, again: bool = False) -> None:
        """Read these url -> object; `again`: even when staged (a changed object)."""
        for url, ref in refs.items():
            if url in self._pending or (not again and url in self.stage.images()):
                continue
            self.failed.pop(url, None)
            self._pending[url] = (ref, self._pool.submit(self._one, ref))

    def drain(self, *, wait: bool = False) -> None:
        """Stage what has finished (all of it with `wait`); BucketUnreachable when a read
        kept failing and the bucket no longer answers a listing either -- after staging
        every read that did finish, so the next pull does not make them again."""
        rows, transient = [], []
        for url in bar(list(self._pending), desc="bucket images", unit="img") if wait \
                else list(self._pending):
            ref, future = self._pending[url]
            if not wait and not future.done():
                continue
            got = future.result()
            del self._pending[url]
            if isinstance(got, tuple):
                rows.append({"url": url, "sha256": got[0], "etag": got[1]})
            elif isinstance(got, StorageError) and (got.transient or got.refused):
                transient.append((url, ref, got))
            else:
                self.failed[url] = str(got)
        self._commit(rows)
        for bucket in sorted({ref.bucket for _, ref, _ in transient}):
            self._probe(bucket, next(exc for _, r, exc in transient if r.bucket == bucket))
        for url, _, exc in transient:
            self.failed[url] = (f"this object kept failing while the bucket answered: {exc}"
                                if exc.transient else str(exc))

    def _probe(self, bucket: str, cause: StorageError) -> None:
        """Is it this object, or the whole bucket? A one-key listing tells."""
        try:
            self.store.probe(bucket)
        except StorageError as exc:
            if exc.transient:
                raise BucketUnreachable(
                    f"the object store at {self.store.endpoint} stopped answering while reading "
                    f"bucket {bucket!r} ({cause}). Nothing was written: the images read so far "
                    "are staged and the next pull resumes from them") from None
            if exc.refused:
                raise BucketUnreachable(
                    f"{cause}. Listing the bucket is refused too, so nothing was written (the "
                    "images read so far are staged; fix the credentials and pull again)") from None

    def _commit(self, rows: list[dict]) -> None:
        if not rows:
            return
        fsync_path(self._blobs)  # the blobs' renames are durable before the lines naming them
        append_jsonl(self.stage.root / "images.jsonl", rows)
        staged = self.stage.images()
        for row in rows:
            staged[row["url"]] = row["sha256"]
            self.etags[row["url"]] = row["etag"]

    def close(self) -> None:
        for _, future in self._pending.values():
            future.cancel()
        self._pool.shutdown(wait=True)


class ImageReaders:
    """Routes each task image URL to its reader: objects of the buckets listed in
    storage.buckets straight from the bucket (`storage.workers` at once), everything else
    through Label Studio (FETCH_WORKERS). An s3:// URI of a bucket not listed is refused with
    a reason naming the bucket; Label Studio's links to such a bucket go through Label Studio."""

    def __init__(self, studio: Studio, stage: Staging, *, params: Params,
                 store: ObjectStore | None) -> None:
        max_bytes = params.pull.max_image_bytes
        self.studio = StudioFetcher(studio, stage, max_bytes=max_bytes)
        self.bucket = (BucketFetcher(store, stage, max_bytes=max_bytes,
                                     workers=params.storage.workers) if store else None)
        self.listed = frozenset(params.storage.buckets if store else ())
        self.refused: dict[str, str] = {}  # url -> reason, decided without a request
        self.unlisted: set[str] = set()    # buckets named by s3:// URIs but not listed

    @property
    def failed(self) -> dict[str, str]:
        return {**self.studio.failed, **(self.bucket.failed if self.bucket else {}),
                **self.refused}

    def queue(self, urls: list[str]) -> None:
        through_studio, objects = [], {}
        for url in urls:
            try:
                ref = bucket_ref(url)
            except ValueError as exc:
                self.refused[url] = f"malformed s3:// image URL: {exc}"
                continue
            if ref is None:
                through_studio.append(url)
            elif ref.bucket in self.listed:
                objects[url] = ref
            elif url.startswith("s3://"):
                self.refused[url] = unlisted_reason(ref.bucket)
                self.unlisted.add(ref.bucket)
            else:
                through_studio.append(url)
        self.studio.queue(through_studio)
        if objects:
            self.bucket.queue(objects)

    def drain(self, *, wait: bool = False) -> None:
        self.studio.drain(wait=wait)
        if self.bucket:
            self.bucket.drain(wait=wait)

    def close(self) -> None:
        self.studio.close()
        if self.bucket:
            self.bucket.close()
