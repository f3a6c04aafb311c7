"""Small builders shared by the unit tests: settings with overrides, images (real digit scans and
hand-made ones), Label Studio export-style tasks, raw-store snapshots written in exactly the
layout `pipelines.pull.run` writes and `pipelines.rawstore.load` reads, and evaluations and gate
decisions built through the stages' own record types (pipelines/records.py), never hand-copied
dicts.

Plain functions, no pytest fixtures: tests/conftest.py is owned elsewhere.
"""
from __future__ import annotations

import copy
import functools
import io
import json
import struct
import tarfile
import zlib
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from pipelines import rawstore, records, settings
from pipelines.files import sha256_bytes

REPO = Path(__file__).resolve().parents[1]
PARAMS_YAML = REPO / "params.yaml"
IMAGE_KEY = "image"          # the <Image value="$image"> of the config labelgate writes
SCAN_SIDE = 32               # pipelines/demo.py saves the 8x8 scans upscaled to 32x32
DELETE = object()            # an override value that removes the key


# -- settings -----------------------------------------------------------------------------------

def params_dict(overrides: Mapping[str, object] | None = None) -> dict:
    """The repo's params.yaml as a plain dict, with dotted overrides applied
    (`{"train.epochs": 2}`; a value of `DELETE` removes the key or section)."""
    raw = yaml.safe_load(PARAMS_YAML.read_text())
    for dotted, value in (overrides or {}).items():
        *parents, leaf = dotted.split(".")
        node = raw
        for part in parents:
            node = node[part]
        if value is DELETE:
            del node[leaf]
        else:
            node[leaf] = copy.deepcopy(value)
    return raw


def params(overrides: Mapping[str, object] | None = None, /, **more: object) -> settings.Params:
    """`Params` parsed (through the real loader's checks) from the repo's params.yaml, with
    dotted overrides: `params({"train.epochs": 2})` or `params(**{"train.epochs": 2})`."""
    return settings.parse(params_dict({**(overrides or {}), **more}))


# -- images -------------------------------------------------------------------------------------

def png_bytes(array: np.ndarray, mode: str | None = None) -> bytes:
    """PNG of a uint8 array: (H, W) -> L, (H, W, 3) -> RGB, (H, W, 4) -> RGBA."""
    array = np.asarray(array)
    if mode is None and array.dtype != np.uint8:
        array = array.astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(array, mode).save(buf, format="PNG")
    return buf.getvalue()


@functools.lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits
    d = load_digits()
    return d.images, d.target


def digit_count() -> int:
    return len(_digits()[1])


@functools.lru_cache(maxsize=4096)
def digit_png(i: int) -> bytes:
    """Scan `i` of scikit-learn's 1,797 real handwritten digits, as pipelines/demo.py saves it:
    8x8 (0..16) -> uint8 -> bicubic 32x32 grayscale PNG."""
    img = _digits()[0][i]
    pixels = (img * (255 / 16)).clip(0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels, "L").resize((SCAN_SIDE, SCAN_SIDE),
                                        Image.Resampling.BICUBIC).save(buf, format="PNG")
    return buf.getvalue()


def digit_label(i: int) -> int:
    return int(_digits()[1][i])


def digits_by_class(per_class: int | Mapping[int, int], *, start: int = 0) -> list[tuple[int, bytes, int]]:
    """`[(scan index, png bytes, true class)]`: the first `per_class` scans of each class (an int
    for every class, or {class: n}), in scan order, from scan `start` on."""
    want = ({c: per_class for c in range(10)} if isinstance(per_class, int)
            else {int(k): v for k, v in per_class.items()})
    taken = {c: 0 for c in want}
    out = []
    for i in range(start, digit_count()):
        c = digit_label(i)
        if c in want and taken[c] < want[c]:
            taken[c] += 1
            out.append((i, digit_png(i), c))
    short = {c: want[c] - taken[c] for c in want if taken[c] < want[c]}
    assert not short, f"not enough scans of classes {short}"
    return out


def png_header_only_bomb(width: int, height: int) -> bytes:
    """A valid, tiny 1-bit grayscale PNG (every pixel black) that declares `width` x `height`.
    Written by hand, streaming the zlib data, so building it never allocates the full image
    (Pillow would hold one byte per pixel: 400 MB for 20000 x 20000)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return (struct.pack(">I", len(body)) + kind + body
                + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF))
    row = b"\x00" * (1 + (width + 7) // 8)        # filter byte + packed 1-bit pixels
    z = zlib.compressobj(9)
    parts, left = [], height
    while left:
        n = min(left, 1024)
        parts.append(z.compress(row * n))
        left -= n
    parts.append(z.flush())
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit, grayscale
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"".join(parts))
            + chunk(b"IEND", b""))


# -- Label Studio tasks -------------------------------------------------------------------------

def ls_task(task_id: int, label_or_labels: str | None | list[str | None], *, url: str,
            cancelled: bool | list[bool] = False, ground_truth: bool | list[bool] = False) -> dict:
    """A task as Label Studio's JSON export has it: one annotation per label, each by a different
    annotator (user ids 1, 2, ...), with `result` = `choice_result(label)`. A label of None is an
    annotation that chose nothing (`result: []`); a cancelled annotation is a skip (`result: []`,
    `was_cancelled: true`). `cancelled`/`ground_truth` are one bool for all or one per label."""
    labels = ([label_or_labels] if label_or_labels is None or isinstance(label_or_labels, str)
              else list(label_or_labels))
    n = len(labels)
    skips = list(cancelled) if isinstance(cancelled, (list, tuple)) else [cancelled] * n
    gts = list(ground_truth) if isinstance(ground_truth, (list, tuple)) else [ground_truth] * n
    assert len(skips) == n and len(gts) == n
    # imported here, not at the top: the GPU check machine runs tests/test_train.py without
    # the Label Studio SDK installed
    from pipelines.labelconfig import choice_result
    annotations = []
    for i, (label, skip, gt) in enumerate(zip(labels, skips, gts)):
        annotations.append({
            "id": task_id * 100 + i + 1, "completed_by": i + 1, "task": task_id, "project": 1,
            "result": [] if skip or label is None else choice_result(label),
            "was_cancelled": bool(skip), "ground_truth": bool(gt),
            "created_at": "2025-01-01T00:00:00.000000Z",
            "updated_at": f"2025-01-01T00:00:{i:02d}.000000Z",
            "lead_time": 3.5, "prediction": {}, "result_count": 0 if skip else 1})
    return {"id": task_id, "data": {IMAGE_KEY: url}, "annotations": annotations,
            "predictions": [], "drafts": [], "meta": {}, "project": 1, "inner_id": task_id,
            "total_annotations": sum(not s for s in skips),
            "cancelled_annotations": sum(bool(s) for s in skips), "total_predictions": 0,
            "created_at": "2025-01-01T00:00:00.000000Z",
            "updated_at": "2025-01-01T00:00:00.000000Z"}


def task_url(name: str) -> str:
    return f"/data/local-files/?d=demo/{name}"


def image_row(task_id: int, url: str | None, *, sha256: str | None = None,
              error: str | None = None) -> dict:
    """One images.jsonl row, as pull writes it."""
    return {"task_id": task_id, "url": url, "sha256": sha256, "error": error}


# -- raw store ----------------------------------------------------------------------------------

def write_snapshot(raw_dir: str | Path, tasks: list[dict], blobs: Mapping[str, bytes] | Iterable[bytes],
                   image_rows: list[dict], removed: list[int] = [], seq: int = 1,  # noqa: B006
                   *, project_id: int = 1) -> Path:
    """Write `raw_dir/pulls/<seq>/` as `pipelines.pull.run` does: tasks.jsonl, images.jsonl,
    removed.json, images.tar (members named by sha256, sorted, PAX; only if there are blobs) and
    meta.json (seq, project_id, cursor of every task seen so far, url_sha). `blobs` is
    {sha256: bytes} or just the bytes (named by their sha256 here)."""
    if not isinstance(blobs, Mapping):
        blobs = {sha256_bytes(b): b for b in blobs}
    for sha, data in blobs.items():
        assert sha256_bytes(data) == sha, "blob not named by its sha256"
    raw_dir = Path(raw_dir)
    prev = rawstore.latest_meta(raw_dir)
    assert (prev["seq"] if prev else 0) < seq, "snapshots are written in sequence order"
    snap = raw_dir / rawstore.PULLS / f"{seq:06d}"
    snap.mkdir(parents=True, exist_ok=False)

    def jsonl(rows: list[dict]) -> str:
        return "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows)

    (snap / "tasks.jsonl").write_text(jsonl(tasks))
    (snap / "images.jsonl").write_text(jsonl(image_rows))
    (snap / "removed.json").write_text(json.dumps(sorted(int(t) for t in removed)))
    if blobs:
        with tarfile.open(snap / "images.tar", "w:", format=tarfile.PAX_FORMAT) as tar:
            for sha in sorted(blobs):
                info = tarfile.TarInfo(sha)
                info.size = len(blobs[sha])
                tar.addfile(info, io.BytesIO(blobs[sha]))
    cursor = dict(prev["cursor"]) if prev else {}
    url_sha = dict(prev["url_sha"]) if prev else {}
    for task_id in removed:
        cursor.pop(str(task_id), None)
    cursor.update({str(t["id"]): rawstore.fingerprint(t) for t in tasks})
    url_sha.update({r["url"]: r["sha256"] for r in image_rows if r.get("url") and r.get("sha256")})
    meta = {"seq": seq, "pulled_at": "2025-01-01T00:00:00Z",
            "label_studio_url": "http://127.0.0.1:8089", "project_id": project_id,
            "classes": list(params().base.classes),
            "counts": {"exported": len(cursor), "changed": len(tasks), "removed": len(removed),
                       "images_fetched": len(blobs),
                       "image_errors": sum(1 for r in image_rows if r.get("error"))},
            "cursor": cursor, "url_sha": url_sha}
    (snap / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return snap


def write_store(raw_dir: str | Path, entries: list[tuple[dict, bytes | str | None]],
                *, removed: list[int] = [], seq: int = 1) -> Path:  # noqa: B006
    """A snapshot from `(task, image)` pairs: image bytes (stored, row with its sha256), a str
    (a fetch error row) or None (no row at all)."""
    blobs, rows = {}, []
    for task, image in entries:
        url = task["data"].get(IMAGE_KEY)
        if isinstance(image, bytes):
            sha = sha256_bytes(image)
            blobs[sha] = image
            rows.append(image_row(task["id"], url, sha256=sha))
        elif isinstance(image, str):
            rows.append(image_row(task["id"], url, error=image))
    return write_snapshot(raw_dir, [t for t, _ in entries], blobs, rows, removed=removed, seq=seq)


# -- evaluations and decisions (pipelines/records.py) --------------------------------------------

def evaluation(truth, cand, prod=None, *, classes=tuple(str(c) for c in range(10)),
               cand_conf=0.9, prod_conf=0.9, size_bytes=500_000, macs=12_000_000,
               cand_sha="a" * 64, prod_id="m0001-abcdef0123", prod_sha="b" * 64,
               eval_hash="e" * 64, judged_on=None, image_sha256=None, task_ids=None
               ) -> tuple[records.Evaluation, records.Predictions]:
    """What pipelines.evaluate writes, built through the same record types, from per-image
    class indices (`prod` None: no production model). Confidences are one number for all
    images or one per image; `judged_on`: the eval set production was judged on (default
    `eval_hash`); image sha256s and task ids (1000, 1001, ...) are made up unless given."""
    from pipelines.metrics import classification
    truth, cand = np.asarray(truth), np.asarray(cand)
    n = len(truth)
    production = None
    if prod is not None:
        prod = np.asarray(prod)
        production = records.ProductionEval(
            id=prod_id, sha256=prod_sha, judged_on_eval_hash=judged_on or eval_hash,
            dataset_version=None, train_class_counts=None,
            **classification(truth, prod, classes))
    ev = records.Evaluation(
        eval_hash=eval_hash, eval_n=n, classes=classes, production=production,
        candidate=records.CandidateEval(sha256=cand_sha, size_bytes=size_bytes,
                                        macs_per_image=macs,
                                        **classification(truth, cand, classes)))
    predictions = records.Predictions(
        task_id=np.arange(1000, 1000 + n) if task_ids is None else task_ids,
        image_sha256=([f"{i:064x}" for i in range(n)] if image_sha256 is None
                      else image_sha256),
        truth=truth, cand_pred=cand, cand_conf=np.broadcast_to(np.asarray(cand_conf, float), (n,)),
        prod_pred=prod,
        prod_conf=None if prod is None else np.broadcast_to(np.asarray(prod_conf, float), (n,)))
    return ev, predictions


def write_evaluation(folder: Path, ev: records.Evaluation,
                     predictions: records.Predictions) -> Path:
    """`folder` as pipelines.evaluate leaves reports/evaluation."""
    return records.write_evaluation(folder, ev, predictions)


def decision(candidate_sha256: str, *, verdict: str = "PASS", failed: Iterable[str] = (),
             candidate_accuracy: float = 0.95, eval_hash: str = "e" * 64,
             production_id: str | None = None, production_accuracy: float | None = None,
             on_inconclusive: str = "keep_production") -> records.Decision:
    """A gate decision, as pipelines.gate writes it, without running the gate: one passing
    test ("accuracy floor") unless `failed` names the failing ones."""
    failed = list(failed)
    tests = [records.GateTest(name=name, result="fail", passed=False, value=1.0,
                              threshold=0.0, p_value=None, detail="made by tests/factories")
             for name in failed] or [
        records.GateTest(name="accuracy floor", result="pass", passed=True,
                         value=candidate_accuracy, threshold=0.0, p_value=None,
                         detail="made by tests/factories")]
    return records.Decision(verdict=verdict, action=f"{verdict} (tests/factories)",
                            tests=tuple(tests), candidate_sha256=candidate_sha256,
                            candidate_accuracy=candidate_accuracy, production_id=production_id,
                            production_accuracy=production_accuracy, eval_hash=eval_hash,
                            on_inconclusive=on_inconclusive)


# -- object storage and Label Studio's S3 import storage (issue 12) -------------------------------

def distinct_png(i: int) -> bytes:
    """Scan `i % 1797` with `i` written into the first 17 pixels of its top row (255 = bit set),
    as benchmarks/sync.py --distinct does: a different file for every i < 131,072."""
    pixels = np.array(Image.open(io.BytesIO(digit_png(i % digit_count()))).convert("L"))
    for bit in range(17):
        pixels[0, bit] = 255 if (i >> bit) & 1 else 0
    return png_bytes(pixels)


def put_objects(client, bucket: str, objects: Mapping[str, bytes], *,
                content_type: str = "image/png") -> None:
    """Upload `{key: bytes}` to `bucket` (created if missing) with a boto3 S3 client, as a
    team's upload job does."""
    if bucket not in {b["Name"] for b in client.list_buckets().get("Buckets", [])}:
        client.create_bucket(Bucket=bucket)
    for key, data in objects.items():
        client.put_object(Bucket=bucket, Key=key, Body=data, ContentType=content_type)


def s3_import_storage(studio, project_id: int, *, bucket: str, prefix: str, endpoint: str,
                      access_key: str, secret_key: str, region: str = "us-east-1",
                      regex_filter: str = r".*\.(png|jpe?g)$", presign: bool = True) -> int:
    """Connect Label Studio's S3 import storage to a project as teams set it up (Cloud Storage ->
    Amazon S3): every object under `prefix` matching `regex_filter` becomes a task whose data is
    `s3://bucket/key` ("Treat every bucket object as a source file" = use_blob_urls). The
    credentials are Label Studio's own (stored in its database; never labelgate's). Label
    Studio's serializer lists the prefix once before saving: a wrong endpoint, bucket or empty
    prefix is refused here. Returns the storage id."""
    created = studio._client.import_storage.s3.create(
        project=project_id, title=f"bucket {bucket}", bucket=bucket, prefix=prefix,
        regex_filter=regex_filter, use_blob_urls=True, presign=presign,
        presign_ttl=15,                      # minutes a presigned link from Label Studio lives
        s3endpoint=endpoint, region_name=region,
        aws_access_key_id=access_key, aws_secret_access_key=secret_key)
    return created.id


def sync_s3_storage(studio, storage_id: int, *, timeout_s: float = 600.0) -> int:
    """Run the storage's sync (the "Sync Storage" button) and wait for it to finish; returns the
    number of tasks it created. Without Redis, Label Studio syncs inside the request; with a
    queue the status moves through queued/in_progress, hence the wait (0.5 s polls)."""
    import time
    storage = studio._client.import_storage.s3.sync(id=storage_id)
    deadline = time.monotonic() + timeout_s
    while storage.status not in ("completed", "failed"):
        if time.monotonic() > deadline:
            raise TimeoutError(f"S3 storage {storage_id} sync still {storage.status} after "
                               f"{timeout_s:.0f} s")
        time.sleep(0.5)
        storage = studio._client.import_storage.s3.get(id=storage_id)
    if storage.status == "failed":
        raise RuntimeError(f"S3 storage {storage_id} sync failed: {storage.traceback}")
    return int(storage.last_sync_count or 0)
