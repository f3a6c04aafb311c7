"""pull: Label Studio -> a new immutable snapshot in data/raw (only what changed since the last).

Not a dvc.yaml stage: it reads a changing outside world. Its output is versioned with `dvc add`
afterwards, and everything downstream is reproducible from it with Label Studio down.

    python -m pipelines.pull --raw data/raw
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
import uuid
from pathlib import Path

from pipelines import rawstore
from pipelines.bucketfetch import BucketUnreachable, ImageReaders
from pipelines.files import atomic_write_json, atomic_write_jsonl, exclusive, read_json, utc_now
from pipelines.imagechanges import changed_objects, image_changes
from pipelines.imagefetch import FETCH_WORKERS, IMAGE_SIGNATURES, bar, looks_like_image
from pipelines.labelstudio import (EXPORT_IDS_PER_CALL, LabelStudioError, Studio,
                                   connection_from_env)
from pipelines.labelconfig import DEFAULT, UnsupportedConfig, class_change
from pipelines.objectstore import ObjectStore, StorageError
from pipelines.staging import Staging
from pipelines.settings import Params, brief

__all__ = ["FETCH_WORKERS", "IMAGE_SIGNATURES", "looks_like_image", "run", "describe", "main"]

OVERLAP_S = 5     # re-list tasks updated this long before the last watermark: a save whose
                  # timestamp was taken just before its commit landed (seconds at most)


class PullError(RuntimeError):
    pass


def connect(studio_dir: str | Path, params: Params) -> Studio:
    """The configured Label Studio (env, else the embedded server's credentials), with the
    timeouts from params.yaml `pull`, key checked: fails fast with an actionable message."""
    studio = Studio(connection_from_env(studio_dir),
                    connect_timeout_s=params.pull.connect_timeout_s,
                    read_timeout_s=params.pull.read_timeout_s,
                    image_hosts=params.pull.image_hosts)
    studio.check()
    return studio


def _plan(studio: Studio, project_id: int, base: dict | None, seen: dict[str, str], *,
          full: bool) -> dict:
    """What this pull will read, decided once and staged (a resumed pull reuses it).

    Full (first pull, or asked for): every task with an annotation, listed by id. Incremental:
    any annotation created, edited, deleted or skipped bumps its task's updated_at, so tasks
    updated since the last watermark (minus an overlap for commits that land late) are all
    that can have changed; of those, only tasks whose updated_at differs from what the last
    sync saw (`seen`) are exported again. Deleted tasks bump nothing: they show up as a task
    count lower than expected, and only then are all task ids listed (`alive`)."""
    # The watermark and the task count are read *before* listing: a change landing during
    # this sync is either in the listing or after the watermark, never lost in between.
    watermark = studio.newest_update(project_id)
    task_count = studio.task_count(project_id)
    if full or not base or not base.get("watermark"):
        return {"mode": "full", "watermark": watermark, "task_count": task_count,
                "ids": studio.annotated_task_ids(project_id)}
    listed = studio.tasks_updated_since(project_id, _minus(base["watermark"], OVERLAP_S))
    created = sum(1 for r in listed if r["created_at"] > base["watermark"])
    alive = None
    if base.get("task_count") is None or base["task_count"] + created != task_count:
        alive = sorted(studio.all_task_ids(project_id))
    return {"mode": "incremental", "watermark": watermark, "task_count": task_count,
            "ids": [r["id"] for r in listed if seen.get(str(r["id"])) != r["updated_at"]],
            "listed": listed, "alive": alive}


def _export(studio: Studio, project_id: int, ids: list[int], stage: Staging,
            fetcher: ImageReaders, image_key: str, known: dict[str, str]) -> tuple[list[dict], int]:
    """(exported tasks, export calls reused from an earlier attempt): one bounded call per
    EXPORT_IDS_PER_CALL ids, each staged as soon as it arrives; the new image URLs of its
    annotated tasks (not in `known`) go to the fetcher right away."""
    out, reused = [], 0
    with bar(total=len(ids), desc="tasks", unit="task") as progress:
        for index, start in enumerate(range(0, len(ids), EXPORT_IDS_PER_CALL)):
            chunk = ids[start:start + EXPORT_IDS_PER_CALL]
            tasks = stage.chunk(index)
            if tasks is None:
                tasks = studio.export_tasks(project_id, chunk)
                stage.save_chunk(index, tasks)
            else:
                reused += 1
            out.extend(tasks)
            fetcher.queue(sorted({t["data"][image_key] for t in tasks if t.get("annotations")
                                  and isinstance((t.get("data") or {}).get(image_key), str)
                                  and t["data"][image_key] not in known}))
            fetcher.drain()
            progress.update(len(chunk))
    return out, reused


def _sync_state_path(raw_dir: Path) -> Path:
    """Beside data/raw, not in it: it changes on every sync, the versioned data does not."""
    return raw_dir.parent / f".{raw_dir.name}.sync.json"


def _save_sync_state(path: Path, *, seq: int, watermark: str | None, task_count: int,
                     seen: dict[str, str]) -> None:
    # Only an accelerator: losing it costs one re-listing from the snapshot's own watermark.
    atomic_write_json(path, {"seq": seq, "watermark": watermark, "task_count": task_count,
                             "seen": seen})


def _minus(iso: str, seconds: float) -> str:
    t = datetime.datetime.strptime(iso, "%Y-%m-%dT%H:%M:%S.%fZ") - datetime.timedelta(seconds=seconds)
    return t.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def run(raw_dir: str | Path, *, studio: Studio, project_id: int, params: Params,
        full: bool = False, store: ObjectStore | None = None) -> dict:
    """Write `data/raw/pulls/NNNNNN/` with the tasks that changed; return a summary. Pulls into
    one data directory take turns (the label trigger's and a flow's may meet). Images in the
    buckets of params.yaml `storage.buckets` are read from the bucket (`store`, else one made
    from params with the pull's timeouts)."""
    raw_dir = Path(raw_dir)
    own = store is None and bool(params.storage.buckets)
    if own:
        store = ObjectStore(params.storage, connect_timeout_s=params.pull.connect_timeout_s,
                            read_timeout_s=params.pull.read_timeout_s)
    try:
        with exclusive(raw_dir.parent / f".{raw_dir.name}.lock", wait=True):
            return _run(raw_dir, studio=studio, project_id=project_id, params=params,
                        full=full, store=store)
    finally:
        if own:
            store.close()


def _run(raw_dir: Path, *, studio: Studio, project_id: int, params: Params,
         full: bool, store: ObjectStore | None) -> dict:
    """The pull itself (see `run`): `{"snapshot": None, ...}` and nothing written when nothing
    changed. The first pull, and any with `full=True`, compares every annotated task (a
    reconciliation: it also catches changes Label Studio makes without touching timestamps,
    such as bulk label renames). A pull that was killed resumes from its staging folder."""
    started = time.monotonic()
    rawstore.clean_partial(raw_dir)
    prev = rawstore.latest_meta(raw_dir)
    if prev and prev["project_id"] != project_id:
        raise PullError(f"{raw_dir} holds pulls of Label Studio project {prev['project_id']}, "
                        f"not {project_id}; use another data directory for another project")
    try:
        config = studio.labeling_config(project_id)
    except UnsupportedConfig as exc:
        raise PullError(f"Label Studio project {project_id} cannot be used: {exc}") from None
    live_classes = config.classes
    if prev and prev.get("controls", DEFAULT.as_meta()) != config.as_meta():
        raise PullError(
            f"The labeling config's controls changed since the last pull (was "
            f"{prev.get('controls', DEFAULT.as_meta())}, now {config.as_meta()}): annotations "
            "made before and after name different controls. Pull into a new data directory "
            "(a fresh `labelgate init`) or change the config back.")
    if live_classes != params.base.classes:
        change = class_change(params.base.classes, live_classes)
        raise PullError(
            "The class list in Label Studio's labeling config is not base.classes in "
            f"params.yaml: {change.describe()} (params.yaml {brief(params.base.classes)}, "
            f"Label Studio {brief(live_classes)}). Nothing was pulled. If the change is "
            "intended, `labelgate classes --accept` adopts Label Studio's list (the next model "
            "gets a new head and is judged as a first model); otherwise change the config back "
            "in Label Studio.")

    cursor: dict[str, dict] = prev["cursor"] if prev else {}
    url_sha: dict[str, str] = dict(prev["url_sha"]) if prev else {}
    # Where the last sync left off: the local sync state when it belongs to the latest
    # snapshot (it also advances on syncs that found nothing), else the snapshot's own meta.
    state_path = _sync_state_path(raw_dir)
    local = read_json(state_path) if state_path.exists() else None
    base = local if prev and local and local.get("seq") == prev["seq"] else prev
    seen: dict[str, str] = dict(base.get("seen") or {}) if base else {}

    stage = Staging.open(raw_dir, project_id=project_id, prev_seq=prev["seq"] if prev else None)
    plan = stage.plan()
    if plan is not None and full and plan["mode"] != "full":
        stage.discard()
        plan = None
    resumed = plan is not None
    images_reused = len(stage.images()) if resumed else 0
    if plan is None:
        plan = stage.save_plan(_plan(studio, project_id, base, seen, full=full))
    url_etag: dict[str, str] = dict(prev.get("url_etag") or {}) if prev else {}
    fetcher = ImageReaders(studio, stage, params=params, store=store)
    t0 = time.monotonic()
    try:
        # objects read in an earlier pull whose ETag changed since: read again, beside the export
        moved, vanished = changed_objects(store, url_etag) if store and url_etag else ({}, [])
        if moved:
            fetcher.bucket.queue(moved, again=True)
        exported, reused = _export(studio, project_id, plan["ids"], stage, fetcher,
                                   config.image_key, url_sha)
        fetcher.drain(wait=True)
    except StorageError as exc:  # the ETag listing
        raise PullError(f"cannot list the ETags of earlier pulled bucket images, needed to "
                        f"find changed ones: {exc}") from None
    except BucketUnreachable as exc:
        raise PullError(str(exc)) from None
    finally:
        fetcher.close()
    current = {str(t["id"]): t for t in exported if t.get("annotations")}
    if plan["mode"] == "full":
        gone = set(cursor) - set(current)
        seen = {k: t["updated_at"] for k, t in current.items() if t.get("updated_at")}
    else:
        gone = ({str(i) for i in plan["ids"]} - set(current)) & set(cursor)
        seen.update({str(r["id"]): r["updated_at"] for r in plan["listed"]})
        if plan["alive"] is not None:
            alive = {str(i) for i in plan["alive"]}
            gone |= set(cursor) - alive
            seen = {k: v for k, v in seen.items() if k in alive}
    watermark, task_count = plan["watermark"], plan["task_count"]

    new_cursor = {k: v for k, v in cursor.items() if k not in gone}
    new_cursor.update({k: rawstore.fingerprint(t) for k, t in current.items()})
    changed = [t for k, t in sorted(current.items(), key=lambda kv: int(kv[0]))
               if cursor.get(k) != new_cursor[k]]
    removed = sorted(int(k) for k in gone)
    summary = {"mode": plan["mode"], "examined": len(current), "changed": len(changed),
               "removed": len(removed)}
    if resumed:
        summary["resumed"] = {"export_calls": reused, "images": images_reused}
    key = config.image_key
    failed = fetcher.failed
    staged_etags = fetcher.bucket.etags if fetcher.bucket else {}
    changes_seen = image_changes(raw_dir, moved, url_sha, url_etag, stage.images(),
                                 staged_etags, failed,
                                 skip={str(t["id"]) for t in changed} | gone)
    if vanished:
        summary["images_gone"] = len(vanished)  # stored copies kept: what annotators saw
    if fetcher.unlisted:
        summary["unlisted_buckets"] = sorted(fetcher.unlisted)
    if not changed and not removed and not changes_seen:
        if prev:
            _save_sync_state(state_path, seq=prev["seq"], watermark=watermark,
                             task_count=task_count, seen=seen)
        stage.discard()
        return {"snapshot": None, **summary, "seconds": round(time.monotonic() - started, 2)}

    urls = sorted({t["data"][key] for t in changed
                   if isinstance(t.get("data", {}).get(key), str) and t["data"][key] not in url_sha})
    new_shas = {c["new_sha256"] for c in changes_seen if c["new_sha256"]}
    for url in urls:
        if url in stage.images():
            url_sha[url] = stage.images()[url]
            new_shas.add(url_sha[url])
            if url in staged_etags:
                url_etag[url] = staged_etags[url]

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
            row["error"] = failed[url]
        image_rows.append(row)
    # tasks whose image changed in the bucket while the task did not: a row with the new bytes
    image_rows += [{"task_id": tid, "url": c["url"], "sha256": c["new_sha256"],
                    "error": c["error"]} for c in changes_seen for tid in c["other_tasks"]]

    seq = int(prev["seq"]) + 1 if prev else 1
    root = raw_dir / rawstore.PULLS
    tmp = root / f".tmp-{seq:06d}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    atomic_write_jsonl(tmp / "tasks.jsonl", changed)
    atomic_write_jsonl(tmp / "images.jsonl", image_rows)
    atomic_write_json(tmp / "removed.json", removed)
    changes = rawstore.change_set(cursor, new_cursor,
                                  [str(t["id"]) for t in changed] + [str(r) for r in removed])
    if changes_seen:
        changes["images_changed"] = [{k: v for k, v in c.items() if k != "other_tasks"}
                                     for c in changes_seen]
    atomic_write_json(tmp / "changes.json", changes)
    if new_shas:
        stage.write_tar(new_shas, tmp / "images.tar")
    # What each pre-annotated answer started from, for the acceptance audit (the export names
    # only the prediction's id). One listing, and only when a changed annotation has one.
    parents = {int(a["parent_prediction"]) for t in changed for a in t.get("annotations") or []
               if isinstance(a.get("parent_prediction"), int)}
    if parents:
        atomic_write_jsonl(tmp / "predictions.jsonl",
                           sorted(studio.predictions(project_id, ids=parents),
                                  key=lambda r: r["id"]))
    summary.update(annotations={k: len(changes[k]) for k in ("added", "changed", "removed")},
                   images_fetched=len(new_shas),
                   images_changed=len(changes_seen),
                   image_errors=sum(1 for r in image_rows if r["error"]),
                   fetch_seconds=round(time.monotonic() - t0, 2))
    atomic_write_json(tmp / "meta.json", {
        "seq": seq, "pulled_at": utc_now(),
        "label_studio_url": studio.conn.url, "project_id": project_id,
        "classes": list(live_classes), "label_config_sha256": config.sha256,
        "controls": config.as_meta(), "counts": summary,
        "cursor": new_cursor, "url_sha": url_sha, "url_etag": url_etag, "watermark": watermark,
        "task_count": task_count})
    os.rename(tmp, root / f"{seq:06d}")  # the commit point: all of the snapshot or none of it
    _save_sync_state(state_path, seq=seq, watermark=watermark, task_count=task_count, seen=seen)
    stage.discard()  # a kill before this leaves a staging folder the next pull drops (owner)
    return {"snapshot": f"{seq:06d}", **summary, "seconds": round(time.monotonic() - started, 2)}


def describe(result: dict) -> str:
    """The one-line summary of a pull, for people and logs."""
    head = (f"pull {result['mode']}: {result['examined']} task(s) examined in "
            f"{result.get('seconds', 0):.1f} s")
    if result.get("resumed"):
        head += (f" (resumed: {result['resumed']['export_calls']} export call(s) and "
                 f"{result['resumed']['images']} image(s) from the interrupted pull)")
    if not result["snapshot"]:
        return f"{head}; nothing new in Label Studio" + _bucket_notes(result)
    ann = result.get("annotations", {})
    text = (f"{head}; snapshot {result['snapshot']}: {result['changed']} task(s) new/changed, "
            f"{result['removed']} removed; annotations +{ann.get('added', 0)} "
            f"~{ann.get('changed', 0)} -{ann.get('removed', 0)}; {result['images_fetched']} "
            f"image(s) fetched, {result['image_errors']} failed (quarantined at validation)")
    if result.get("images_changed"):
        text += (f"; {result['images_changed']} image(s) changed in the bucket since an earlier "
                 "pull (recorded in changes.json; their tasks now use the new bytes)")
    return text + _bucket_notes(result)


def _bucket_notes(result: dict) -> str:
    """Bucket facts said once per pull, however many tasks they concern."""
    text = ""
    if result.get("unlisted_buckets"):
        names = ", ".join(result["unlisted_buckets"])
        text += (f"; images in bucket(s) not listed in params.yaml storage.buckets: {names} "
                 "(their tasks are quarantined: list the bucket(s) there to read them)")
    if result.get("images_gone"):
        text += (f"; {result['images_gone']} image(s) pulled earlier are gone from the bucket "
                 "(the stored copies are kept)")
    return text


def main(argv: list[str] | None = None) -> int:
    from pipelines import settings
    ap = argparse.ArgumentParser(prog="python -m pipelines.pull", description=__doc__)
    ap.add_argument("--raw", default="data/raw")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--studio-dir", default=".labelgate/studio")
    ap.add_argument("--full", action="store_true", help="reconcile every annotated task")
    args = ap.parse_args(argv)
    try:
        params = settings.load(args.params)
        studio = connect(args.studio_dir, params)
        result = run(args.raw, studio=studio, project_id=studio.require_project(params.studio.project_title),
                     params=params, full=args.full)
    except (LabelStudioError, PullError, StorageError, settings.ParamsError) as exc:
        print(f"pull failed: {exc}", file=sys.stderr)
        return 2
    print(describe(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
