"""First pull of annotated tasks whose images live in a bucket, measured in one run, against
today's path through Label Studio's server:

  ceiling      the S3 server's own ceiling here: bare GETs signed beforehand (urllib3 keep-alive,
               no checks) from `storage.workers` threads -- what bounds the figures below
  export       Label Studio's task listing + export alone, no images (what the pull asks first)
  reader       labelgate's bucket reader alone (pipelines.objectstore, `storage.workers` threads,
               every object read, size-capped, checked as an image and hashed)
  bucket pull  `pull.run` as `labelgate pull` runs it: tasks exported from Label Studio, every
               image read straight from the bucket (storage.buckets / storage.endpoint_url)
  via studio   today's path: the same images served by Label Studio itself (local-files
               storage, the default pull), on a subset (--baseline)

    python benchmarks/bucket_pull.py [--tasks 20000] [--baseline 2000]

Starts its own S3 server (tests/s3server.py: moto's S3 service on 127.0.0.1) and its own Label
Studio (.venv-studio) in a temp dir, and stops both. The images are N distinct small PNGs (the
1,797 demo digit scans, cycled, each with its index written into its top row). The tasks are
created in Label Studio by bulk JSON import (`s3://bucket/key` in data.image, one annotation
each, 2,000 tasks per call), with the bucket connected as Label Studio's S3 import storage so
its viewers can open them; a storage sync plus one annotation call per task would cost ~100 ms a
task here, minutes at 20,000 (tests/test_studio_s3_storage.py covers the sync path).
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import os
import socket
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from pipelines import objectstore, pull, settings, studio  # noqa: E402
from pipelines.labelconfig import choice_result  # noqa: E402
from pipelines.labelstudio import EXPORT_IDS_PER_CALL, Studio  # noqa: E402
from tests import factories, s3server  # noqa: E402

CLASSES = tuple(str(i) for i in range(10))
IMPORT_BATCH = 2000   # tasks per import call (sync.py's figure: bigger calls time out when loaded)
CEILING_GETS = 4000   # bare GETs for the server's ceiling (~10 s at 450/s)


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _load() -> str:
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def _upload(s3: s3server.S3Server, bucket: str, keys: list[str], *, workers: int) -> float:
    """Seconds to put every image in the bucket (boto3, `workers` threads: a team's uploader)."""
    client = s3.client()
    client.create_bucket(Bucket=bucket)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(lambda ik: client.put_object(
            Bucket=bucket, Key=ik[1], Body=factories.distinct_png(ik[0]),
            ContentType="image/png"), enumerate(keys)))
    return time.perf_counter() - t0


def _ceiling(s3: s3server.S3Server, bucket: str, keys: list[str], *, workers: int) -> float:
    """GET/s the server answers to a minimal client: requests signed beforehand (SigV4 in the
    headers, as labelgate's reader sends them), one urllib3 keep-alive pool, the body read and
    dropped -- no checks, no hashing, no staging."""
    import urllib3
    from botocore.auth import S3SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials
    creds = Credentials(s3server.ACCESS_KEY, s3server.SECRET_KEY)
    signed = []
    for key in keys:
        req = AWSRequest(method="GET", url=f"{s3.endpoint}/{bucket}/{key}")
        S3SigV4Auth(creds, "s3", s3server.REGION).add_auth(req)
        signed.append((req.url, dict(req.headers.items())))
    http = urllib3.PoolManager(maxsize=workers, retries=False)

    def get(request: tuple[str, dict]) -> int:
        resp = http.request("GET", request[0], headers=request[1])
        assert resp.status == 200, resp.status
        return len(resp.data)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(get, signed))
    return len(keys) / (time.perf_counter() - t0)


def _reader(storage: settings.Storage, bucket: str, keys: list[str], *, max_bytes: int) -> float:
    """Objects/s through labelgate's reader, as the pull reads them (capped, checked, hashed)."""
    store = objectstore.ObjectStore(storage)

    def one(key: str) -> str:
        data = store.get(objectstore.ObjectRef(bucket, key), max_bytes=max_bytes)
        assert pull.looks_like_image(data)
        return hashlib.sha256(data).hexdigest()

    t0 = time.perf_counter()
    try:
        with ThreadPoolExecutor(storage.workers) as pool:
            shas = set(pool.map(one, keys))
    finally:
        store.close()
    assert len(shas) == len(keys), "the images are not distinct"
    return len(keys) / (time.perf_counter() - t0)


def _import(admin: Studio, pid: int, urls: list[str], truth: list[int]) -> float:
    user = admin.check()
    tasks = [{"data": {"image": url},
              "annotations": [{"result": choice_result(CLASSES[c]), "completed_by": user}]}
             for url, c in zip(urls, truth)]
    t0 = time.perf_counter()
    for start in range(0, len(tasks), IMPORT_BATCH):
        admin.import_tasks(pid, tasks[start:start + IMPORT_BATCH])
    return time.perf_counter() - t0


def _pull(raw: Path, st: Studio, pid: int, params: settings.Params) -> tuple[dict, float]:
    t0 = time.perf_counter()
    result = pull.run(raw, studio=st, project_id=pid, params=params)
    seconds = time.perf_counter() - t0
    print(pull.describe(result), flush=True)
    assert result["image_errors"] == 0, result
    return result, seconds


def _export_alone(st: Studio, pid: int) -> float:
    """Seconds for what the first pull asks Label Studio for, without images: the annotated
    task ids, then their export in calls of EXPORT_IDS_PER_CALL (run after the pull: SQLite's
    pages are warm)."""
    t0 = time.perf_counter()
    ids = st.annotated_task_ids(pid)
    for start in range(0, len(ids), EXPORT_IDS_PER_CALL):
        st.export_tasks(pid, ids[start:start + EXPORT_IDS_PER_CALL])
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", type=int, default=20_000, help="annotated tasks, one image each")
    ap.add_argument("--baseline", type=int, default=2_000,
                    help="tasks for today's path through Label Studio's server (0 = skip)")
    ap.add_argument("--params", default=str(Path(__file__).resolve().parent.parent / "params.yaml"))
    args = ap.parse_args(argv)
    base = settings.load(args.params)
    n, m = args.tasks, min(args.baseline, args.tasks)
    print(f"{n} tasks, {n} distinct images; {_load()} at start", flush=True)
    work = Path(tempfile.mkdtemp(prefix="labelgate-bucket-bench-"))
    s3 = s3server.start(log=work / "s3server.log")
    os.environ.update(s3.env())  # the user's own AWS credentials, as a shell would have them
    try:
        conn = studio.up(work / "studio", port=_port())
        bucket = f"labelgate-bench-{os.getpid()}"
        keys = [f"images/{i:06d}.png" for i in range(n)]
        truth = [factories.digit_label(i % factories.digit_count()) for i in range(n)]
        storage = dataclasses.replace(base.storage, buckets=(bucket,),
                                      endpoint_url=s3.endpoint, region=s3server.REGION)
        t_up = _upload(s3, bucket, keys, workers=8)
        print(f"uploaded {n} PNGs ({len(factories.distinct_png(0))} B each) in {t_up:.1f} s "
              f"({n / t_up:,.0f}/s)", flush=True)

        ceiling = _ceiling(s3, bucket, keys[:CEILING_GETS], workers=storage.workers)
        print(f"S3 server ceiling: {ceiling:,.0f} GET/s", flush=True)
        reader = _reader(storage, bucket, keys, max_bytes=base.pull.max_image_bytes)
        print(f"labelgate reader: {reader:,.0f} images/s", flush=True)

        admin = Studio(conn, read_timeout_s=600)  # seeding only
        st = Studio(conn, connect_timeout_s=base.pull.connect_timeout_s,
                    read_timeout_s=base.pull.read_timeout_s, image_hosts=base.pull.image_hosts)
        title = "bucket benchmark"
        pid, _ = admin.ensure_project(title, CLASSES)
        factories.s3_import_storage(admin, pid, bucket=bucket, prefix="images",
                                    endpoint=s3.endpoint, access_key=s3server.ACCESS_KEY,
                                    secret_key=s3server.SECRET_KEY, region=s3server.REGION)
        t_imp = _import(admin, pid, [f"s3://{bucket}/{k}" for k in keys], truth)
        print(f"imported {n} annotated tasks (s3:// URIs) in {t_imp:.1f} s", flush=True)
        params = dataclasses.replace(base, storage=storage, studio=dataclasses.replace(
            base.studio, project_title=title))
        first, t_pull = _pull(work / "raw-bucket", st, pid, params)
        assert first["images_fetched"] == n, first
        t_export = _export_alone(st, pid)
        print(f"Label Studio export alone: {n} tasks in {t_export:.1f} s", flush=True)

        t_ls = float("nan")
        if m:
            # today's path: the same first m images, served by Label Studio (local files)
            folder = work / "studio" / "files" / "bench"
            folder.mkdir(parents=True)
            for i in range(m):
                (folder / f"{i:06d}.png").write_bytes(factories.distinct_png(i))
            title_ls = "bucket benchmark via studio"
            pid_ls, _ = admin.ensure_project(title_ls, CLASSES)
            admin.add_local_storage(pid_ls, str(folder))
            _import(admin, pid_ls, [f"/data/local-files/?d=bench/{i:06d}.png" for i in range(m)],
                    truth[:m])
            ls_params = dataclasses.replace(base, studio=dataclasses.replace(
                base.studio, project_title=title_ls))
            via, t_ls = _pull(work / "raw-studio", st, pid_ls, ls_params)
            assert via["images_fetched"] == m, via

        bucket_rate = n / t_pull
        ls_rate = m / t_ls if m else float("nan")
        print(f"\n| path | images | seconds | images/s |\n|---|---|---|---|\n"
              f"| S3 server ceiling: bare GETs, {storage.workers} threads | "
              f"{min(CEILING_GETS, n)} | | {ceiling:,.0f} |\n"
              f"| labelgate reader alone (capped, checked, hashed) | {n} | | {reader:,.0f} |\n"
              f"| Label Studio task export alone, no images ({n} tasks) | | {t_export:.1f} | "
              f"({n / t_export:,.0f} tasks/s) |\n"
              f"| first pull from the bucket ({n} annotated tasks) | {n} | {t_pull:.1f} | "
              f"{bucket_rate:,.0f} |")
        if m:
            print(f"| today: through Label Studio's server ({m} tasks, local files) | {m} | "
                  f"{t_ls:.1f} | {ls_rate:,.0f} |")
            print(f"\nbucket pull / Label Studio path = {bucket_rate / ls_rate:.1f}x")
        print(f"bucket pull / server ceiling = {bucket_rate / ceiling:.2f}; reader / ceiling = "
              f"{reader / ceiling:.2f}; {_load()} at end")
    finally:
        studio.down(work / "studio")
        s3.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
