"""Bucket objects that changed after an earlier pull: found by listing the ETags of the objects
earlier pulls read (each pull's meta.json keeps url -> ETag), read again, and recorded as a
changed image (changes.json `images_changed`), so a dataset never silently mixes labels made on
one picture with the bytes of another.
"""
from __future__ import annotations

import os
from pathlib import Path

from pipelines import rawstore
from pipelines.bucketfetch import bucket_ref
from pipelines.objectstore import ObjectRef, ObjectStore

MAX_LISTINGS = 64  # ETag listings per bucket and pull: one per folder of known keys, else one


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


def image_changes(raw_dir: Path, moved: dict[str, ObjectRef], url_sha: dict[str, str],
                   url_etag: dict[str, str], staged: dict[str, str],
                   staged_etags: dict[str, str], failed: dict[str, str], *,
                   skip: set[str]) -> list[dict]:
    """The bucket objects read again because their ETag changed since an earlier pull whose
    bytes differ now (or can no longer be read): one change record each, with every task
    showing it (`other_tasks`: those this snapshot does not carry already). Updates url_sha
    and url_etag; a failed re-read drops the url's sha (its tasks are quarantined with the
    reason) and keeps the old ETag, so the next pull tries again."""
    if not moved:
        return []
    tasks_of: dict[str, list[int]] = {}
    for task_id, row in rawstore.load(raw_dir).images.items():
        if row.get("url") in moved:
            tasks_of.setdefault(row["url"], []).append(task_id)
    out = []
    for url in sorted(moved):
        old, new, error = url_sha.get(url), staged.get(url), None
        if url in failed or new is None:
            new, error = None, ("the image changed in the bucket after an earlier pull and "
                                f"reading it again failed: {failed.get(url, 'not read')}")
            url_sha.pop(url, None)
        else:
            url_etag[url] = staged_etags.get(url, url_etag[url])
            if new == old:
                continue  # a new ETag, the same bytes (re-uploaded)
            url_sha[url] = new
        ids = sorted(tasks_of.get(url, []))
        out.append({"url": url, "change": "image changed", "old_sha256": old,
                    "new_sha256": new, "error": error, "etag": url_etag.get(url),
                    "task_ids": ids, "other_tasks": [i for i in ids if str(i) not in skip]})
    return out
