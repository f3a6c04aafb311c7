"""pull: Label Studio -> a new immutable snapshot in data/raw (only what changed since the last).

Not a dvc.yaml stage: it reads a changing outside world. Its output is versioned with `dvc add`
afterwards, and everything downstream is reproducible from it with Label Studio down.

    python -m pipelines.pull --raw data/raw
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tqdm import tqdm

from pipelines import rawstore
from pipelines.files import (atomic_write_bytes, atomic_write_json, atomic_write_jsonl,
                             sha256_bytes, tar_bytes)
from pipelines.labelstudio import ImageFetchError, LabelStudioError, Studio
from pipelines.settings import Params

FETCH_WORKERS = 8  # concurrent image downloads; Label Studio serves ~13 ms per image


class PullError(RuntimeError):
    pass


def _fetch_all(studio: Studio, urls: list[str], *, max_bytes: int) -> dict[str, bytes | str]:
    """url -> bytes, or url -> reason (str) for images that can't be fetched safely."""
    def one(url: str) -> tuple[str, bytes | str]:
        try:
            return url, studio.fetch_image(url, max_bytes=max_bytes)
        except ImageFetchError as exc:
            return url, str(exc)
    with ThreadPoolExecutor(max_workers=FETCH_WORKERS) as pool:
        # progress bar on a terminal only (disable=None): logs and CI stay clean
        return dict(tqdm(pool.map(one, urls), total=len(urls), desc="images", unit="img",
                         disable=None, leave=False, file=sys.stderr))


def run(raw_dir: str | Path, *, studio: Studio, project_id: int, params: Params) -> dict:
    """Write `data/raw/pulls/NNNNNN/` with the tasks that changed; return a summary.
    Returns `{"snapshot": None, ...}` and writes nothing when nothing changed."""
    raw_dir = Path(raw_dir)
    rawstore.clean_partial(raw_dir)
    prev = rawstore.latest_meta(raw_dir)
    if prev and prev["project_id"] != project_id:
        raise PullError(f"{raw_dir} holds pulls of Label Studio project {prev['project_id']}, "
                        f"not {project_id}; use another data directory for another project")
    classes, config_sha256 = studio.project_classes(project_id)
    live_classes = tuple(classes)
    if live_classes != params.base.classes:
        added = sorted(set(live_classes) - set(params.base.classes))
        gone = sorted(set(params.base.classes) - set(live_classes))
        raise PullError(
            "The labeling config in Label Studio no longer matches base.classes in params.yaml "
            f"(in Label Studio only: {added or 'none'}; in params.yaml only: {gone or 'none'}; "
            f"order: {list(live_classes)}). If the change is intended, update base.classes, "
            "then pull again.")

    exported = studio.export_annotated(project_id)
    cursor: dict[str, str] = prev["cursor"] if prev else {}
    url_sha: dict[str, str] = dict(prev["url_sha"]) if prev else {}
    new_cursor = {str(t["id"]): rawstore.fingerprint(t) for t in exported}
    changed = [t for t in exported if cursor.get(str(t["id"])) != new_cursor[str(t["id"])]]
    removed = sorted(int(k) for k in cursor if k not in new_cursor)
    summary = {"exported": len(exported), "changed": len(changed), "removed": len(removed)}
    if not changed and not removed:
        return {"snapshot": None, **summary}

    key = params.studio.image_key
    urls = sorted({t["data"][key] for t in changed
                   if isinstance(t.get("data", {}).get(key), str) and t["data"][key] not in url_sha})
    t0 = time.monotonic()
    fetched = _fetch_all(studio, urls, max_bytes=params.pull.max_image_bytes)
    new_blobs: dict[str, bytes] = {}
    for url, got in fetched.items():
        if isinstance(got, bytes):
            sha = sha256_bytes(got)
            url_sha[url] = sha
            new_blobs[sha] = got

    image_rows = []
    for task in changed:
        url = task.get("data", {}).get(key)
        row = {"task_id": task["id"], "url": url if isinstance(url, str) else None,
               "sha256": None, "error": None}
        if not isinstance(url, str):
            row["error"] = f"task has no image URL in data.{key}"
        elif url in url_sha:
            row["sha256"] = url_sha[url]
        else:
            row["error"] = fetched[url]
        image_rows.append(row)

    seq = int(prev["seq"]) + 1 if prev else 1
    root = raw_dir / rawstore.PULLS
    tmp = root / f".tmp-{seq:06d}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    atomic_write_jsonl(tmp / "tasks.jsonl", changed)
    atomic_write_jsonl(tmp / "images.jsonl", image_rows)
    atomic_write_json(tmp / "removed.json", removed)
    if new_blobs:
        atomic_write_bytes(tmp / "images.tar", tar_bytes(new_blobs))
    summary.update(images_fetched=len(new_blobs),
                   image_errors=sum(1 for r in image_rows if r["error"]),
                   fetch_seconds=round(time.monotonic() - t0, 2))
    atomic_write_json(tmp / "meta.json", {
        "seq": seq, "pulled_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "label_studio_url": studio.conn.url, "project_id": project_id,
        "classes": list(live_classes), "label_config_sha256": config_sha256, "counts": summary,
        "cursor": new_cursor, "url_sha": url_sha})
    os.rename(tmp, root / f"{seq:06d}")  # the commit point: all of the snapshot or none of it
    return {"snapshot": f"{seq:06d}", **summary}


def main(argv: list[str] | None = None) -> int:
    from pipelines import settings
    from pipelines.labelstudio import connection_from_env
    ap = argparse.ArgumentParser(prog="python -m pipelines.pull", description=__doc__)
    ap.add_argument("--raw", default="data/raw")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--studio-dir", default=".labelgate/studio")
    args = ap.parse_args(argv)
    try:
        params = settings.load(args.params)
        studio = Studio(connection_from_env(args.studio_dir),
                        connect_timeout_s=params.pull.connect_timeout_s,
                        read_timeout_s=params.pull.read_timeout_s)
        studio.check()
        result = run(args.raw, studio=studio, project_id=studio.require_project(params.studio.project_title),
                     params=params)
    except (LabelStudioError, PullError, settings.ParamsError) as exc:
        print(f"pull failed: {exc}", file=sys.stderr)
        return 2
    print(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
