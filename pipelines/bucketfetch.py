"""Task images that live in a bucket, read straight from it (never through Label Studio).

A task's image URL names a bucket object when it is `s3://bucket/key`, or Label Studio's link
to one: `<host>/tasks/N/resolve/?fileuri=<urlsafe base64 of s3://...>` (also `/presign/`, and
`/projects/N/...`; Label Studio 1.23's io_storages/urls.py and base_models.py). Objects of the
buckets listed in storage.buckets are read by `storage.workers` threads through
`objectstore.ObjectStore` with the user's own credentials; each read is verified (image
signature, size cap), hashed and staged to disk in its worker thread, so the main thread only
appends index lines. Links to other buckets keep going through Label Studio; a bare s3:// URI
of an unlisted bucket is that task's quarantine reason, naming the bucket to list.

An object that changed after an earlier pull is found by listing the ETags of the objects
earlier pulls recorded (`changed_objects`) and fetched again.
"""
from __future__ import annotations

import base64
import os
import re
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from urllib.parse import parse_qs, unquote, urlsplit

from pipelines.files import append_jsonl, fsync_path, read_jsonl, sha256_bytes
from pipelines.imagefetch import bar, looks_like_image, not_an_image
from pipelines.objectstore import ObjectRef, ObjectStore, StorageError
from pipelines.staging import Staging

_LS_LINK = re.compile(r"/(?:tasks|projects)/\d+/(?:resolve|presign)/?$")  # path's end
MAX_LISTINGS = 64  # ETag listings per bucket and pull: one per folder of known keys, else one


class BucketUnreachable(RuntimeError):
    """The object store stopped answering altogether (after retries): the pull stops."""


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
        kept failing and the bucket no longer answers a listing either."""
        urls = list(self._pending)
        rows, probed = [], set()
        try:
            for url in bar(urls, desc="bucket images", unit="img") if wait else urls:
                ref, future = self._pending[url]
                if not wait and not future.done():
                    continue
                got = future.result()
                del self._pending[url]
                if isinstance(got, tuple):
                    rows.append({"url": url, "sha256": got[0], "etag": got[1]})
                elif isinstance(got, StorageError) and got.transient:
                    if ref.bucket not in probed:
                        self._probe(ref.bucket, got)
                        probed.add(ref.bucket)
                    self.failed[url] = f"this object kept failing while the bucket answered: {got}"
                else:
                    self.failed[url] = str(got)
        finally:
            self._commit(rows)  # what was read stays staged, even when the pull stops here

    def _probe(self, bucket: str, cause: StorageError) -> None:
        try:
            self.store.probe(bucket)
        except StorageError as exc:
            if exc.transient:
                raise BucketUnreachable(
                    f"the object store at {self.store.endpoint} stopped answering while reading "
                    f"bucket {bucket!r} ({cause}). Nothing was written: the images read so far "
                    "are staged and the next pull resumes from them") from None

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


def _prefixes(keys: list[str]) -> list[str]:
    """The folders to list: each known key's folder, or their common prefix when there are
    more than MAX_LISTINGS folders."""
    folders = sorted({k[:k.rfind("/") + 1] for k in keys})
    if len(folders) <= MAX_LISTINGS:
        return folders
    return [os.path.commonprefix(folders)]


def changed_objects(store: ObjectStore, url_etag: dict[str, str]) -> tuple[dict[str, ObjectRef],
                                                                        list[str]]:
    """({url: object} whose listed ETag differs from the one recorded, [urls no longer
    listed]) over the recorded bucket images of listed buckets: ListObjectsV2 of the folders
    they sit in, 1,000 keys a call (20,000 known objects in one folder: 20 calls)."""
    wanted: dict[str, dict[str, list[str]]] = {}  # bucket -> key -> urls
    for url in url_etag:
        try:
            ref = bucket_ref(url)
        except ValueError:
            continue
        if ref is not None and ref.bucket in store.storage.buckets:
            wanted.setdefault(ref.bucket, {}).setdefault(ref.key, []).append(url)
    changed, gone = {}, []
    for bucket, keys in sorted(wanted.items()):
        listed: dict[str, str] = {}
        for prefix in _prefixes(list(keys)):
            listed.update(store.etags(bucket, prefix))
        for key, urls in keys.items():
            for url in urls:
                if key not in listed:
                    gone.append(url)
                elif listed[key] != url_etag[url]:
                    changed[url] = ObjectRef(bucket, key)
    return changed, sorted(gone)

