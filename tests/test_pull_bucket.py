"""pull with task images in a bucket: read straight from the bucket (a real S3 API, moto's, on
127.0.0.1) with the user's AWS credentials, never through Label Studio (a real Label Studio,
which holds no storage for these tasks and so could not serve one of them); a bucket that
stops answering mid-pull; an object changed after an earlier pull."""
from __future__ import annotations

import base64
import hashlib
import json
import uuid
from urllib.parse import quote

import pytest

from pipelines import pull, rawstore, staging
from pipelines.labelconfig import choice_result
from pipelines.labelstudio import Studio
from pipelines.objectstore import ObjectStore
from tests import factories
from tests.s3faults import FaultProxy


def _project(label_studio) -> tuple[Studio, int]:
    st = Studio(label_studio["conn"])
    pid, _ = st.ensure_project(f"bucket pull {uuid.uuid4().hex[:8]}",
                               tuple(str(i) for i in range(10)))
    return st, pid


def _import(st: Studio, pid: int, urls: list[str]) -> list[int]:
    user = st.check()
    return st.import_tasks(pid, [{"data": {"image": url}, "annotations": [
        {"result": choice_result(str(i % 10)), "completed_by": user}]}
        for i, url in enumerate(urls)])


def _bucket(s3, n: int, *, first: int = 0) -> tuple[str, dict[str, bytes]]:
    name = f"pull-{uuid.uuid4().hex[:12]}"
    objects = {f"scans/{i:04d}.png": factories.distinct_png(i) for i in range(first, first + n)}
    factories.put_objects(s3.client(), name, objects)
    return name, objects


def _params(endpoint: str, *buckets: str, **more):
    return factories.params({"storage.buckets": list(buckets), "storage.endpoint_url": endpoint,
                             "storage.workers": 8, **more})


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_bucket_images_come_from_the_bucket_not_label_studio(label_studio, s3_env, tmp_path):
    bucket, objects = _bucket(s3_env, 22)
    factories.put_objects(s3_env.client(), bucket, {"scans/page.png": b"<html>login</html>"})
    st, pid = _project(label_studio)
    keys = sorted(objects)
    b64 = base64.urlsafe_b64encode(f"s3://{bucket}/{keys[20]}".encode()).decode()
    links = {  # Label Studio's own links to a bucket object: it holds no storage, answers 404
        f"{label_studio['conn'].url}/tasks/1/resolve/?fileuri={b64}": keys[20],
        f"/projects/{pid}/presign/?fileuri={quote(f's3://{bucket}/{keys[21]}', safe='')}":
            keys[21]}
    direct = {f"s3://{bucket}/{k}": k for k in keys[:20]}
    bad = {f"s3://{bucket}/scans/missing.png": "does not exist",
           f"s3://{bucket}/scans/page.png": "not an image",
           "s3://Bad_Bucket/x.png": "malformed s3:// image URL",
           "s3://team-b-images/a.png": "'team-b-images', which is not listed in params.yaml "
                                       "storage.buckets: add 'team-b-images' there",
           "s3://team-b-images/b.png": "not listed",
           "s3://team-c-images/c.png": "not listed"}
    _import(st, pid, [*direct, *links, *bad])

    result = pull.run(tmp_path, studio=st, project_id=pid,
                      params=_params(s3_env.endpoint, bucket))
    assert result["snapshot"] == "000001" and result["images_fetched"] == 22
    state = rawstore.load(tmp_path)
    rows = {row["url"]: row for row in state.images.values()}
    for url, key in {**direct, **links}.items():
        assert rows[url]["sha256"] == _sha(objects[key]) and not rows[url]["error"], url
        assert state.image_bytes(rows[url]["sha256"]) == objects[key]
    for url, reason in bad.items():
        assert rows[url]["sha256"] is None and reason in rows[url]["error"], (url, rows[url])
    assert result["unlisted_buckets"] == ["team-b-images", "team-c-images"]
    said = pull.describe(result)
    assert said.count("not listed in params.yaml storage.buckets") == 1, said
    assert "team-b-images, team-c-images" in said
    meta = json.loads((rawstore.snapshot_dirs(tmp_path)[0] / "meta.json").read_text())
    assert set(meta["url_etag"]) == {*direct, *links}  # ETags kept to spot changed objects
    blob = b"".join(p.read_bytes() for p in (tmp_path / "pulls").rglob("*") if p.is_file())
    assert label_studio["conn"].api_key.encode() not in blob
    assert s3_env.env()["AWS_SECRET_ACCESS_KEY"].encode() not in blob


def test_changed_object_is_recorded_as_a_changed_image(label_studio, s3_env, tmp_path):
    bucket, objects = _bucket(s3_env, 6)
    st, pid = _project(label_studio)
    urls = [f"s3://{bucket}/{k}" for k in sorted(objects)]
    ids = _import(st, pid, urls + [urls[0]])  # two tasks show the first image
    params = _params(s3_env.endpoint, bucket)
    assert pull.run(tmp_path, studio=st, project_id=pid, params=params)["snapshot"] == "000001"
    old = _sha(objects["scans/0000.png"])

    replaced = factories.distinct_png(900)  # same key, other bytes: the team re-uploaded it
    s3_env.client().put_object(Bucket=bucket, Key="scans/0000.png", Body=replaced)
    result = pull.run(tmp_path, studio=st, project_id=pid, params=params)
    assert result["snapshot"] == "000002" and result["changed"] == 0  # Label Studio: unchanged
    assert result["images_changed"] == 1 and "changed in the bucket" in pull.describe(result)
    snap = rawstore.snapshot_dirs(tmp_path)[-1]
    change, = json.loads((snap / "changes.json").read_text())["images_changed"]
    assert change == {"url": urls[0], "change": "image changed", "old_sha256": old,
                      "new_sha256": _sha(replaced), "error": None, "etag": change["etag"],
                      "task_ids": sorted([ids[0], ids[-1]])}
    state = rawstore.load(tmp_path)  # what validate reads: the latest row per task
    for task_id in (ids[0], ids[-1]):
        assert state.images[task_id]["sha256"] == _sha(replaced)
        assert state.image_bytes(_sha(replaced)) == replaced
    assert state.images[ids[1]]["sha256"] == _sha(objects["scans/0001.png"])
    assert len(state.tasks) == 7  # the tasks themselves are kept from snapshot 1
    # the old bytes stay in snapshot 1: the earlier dataset version is still restorable
    assert rawstore.load(tmp_path, upto=1).images[ids[0]]["sha256"] == old

    again = pull.run(tmp_path, studio=st, project_id=pid, params=params)
    assert again["snapshot"] is None  # recorded once, not on every pull
    s3_env.client().delete_object(Bucket=bucket, Key="scans/0001.png")
    gone = pull.run(tmp_path, studio=st, project_id=pid, params=params)
    assert gone["snapshot"] is None and gone["images_gone"] == 1
    assert "gone from the bucket" in pull.describe(gone)


@pytest.mark.slow
def test_bucket_unreachable_mid_pull_then_next_pull_resumes(label_studio, s3_env, tmp_path):
    """The bucket stops answering after 10 reads (connections hang, as behind a dead network
    path): each read is retried, then the pull stops with a clear error and writes no
    snapshot; the next pull reuses the staged images and completes."""
    bucket, objects = _bucket(s3_env, 30)
    st, pid = _project(label_studio)
    urls = [f"s3://{bucket}/{k}" for k in sorted(objects)]
    _import(st, pid, urls)
    front = FaultProxy(s3_env.endpoint)
    try:
        params = _params(front.endpoint, bucket, **{"pull.read_timeout_s": 1,
                                                    "pull.connect_timeout_s": 1})
        store = ObjectStore(params.storage, connect_timeout_s=1, read_timeout_s=1, attempts=2)
        front.hang_after(10)
        with pytest.raises(pull.PullError, match="stopped answering.*next pull resumes"):
            pull.run(tmp_path, studio=st, project_id=pid, params=params, store=store)
        assert rawstore.snapshot_dirs(tmp_path) == []  # nothing half-written
        hung = [u.split(bucket, 1)[1] for u in urls[10:]]
        assert max(front.gets(k) for k in hung) >= 2  # retried before giving up
        staged = staging.Staging.open(tmp_path, project_id=pid, prev_seq=None).images()
        assert len(staged) >= 5  # the reads that finished (10 unless a slow one was retried)

        front.heal()
        store.close()
        store = ObjectStore(params.storage)  # default timeouts: a loaded machine is no outage
        result = pull.run(tmp_path, studio=st, project_id=pid, params=params, store=store)
        assert result["snapshot"] == "000001" and result["image_errors"] == 0
        assert result["resumed"]["images"] == len(staged)
        rows = {r["url"]: r["sha256"] for r in rawstore.load(tmp_path).images.values()}
        assert rows == {u: _sha(objects[u.split(f"{bucket}/", 1)[1]]) for u in urls}
        store.close()
    finally:
        front.close()


def test_refused_credentials_stop_the_pull_instead_of_quarantining_every_task(
        label_studio, s3_env, tmp_path, monkeypatch):
    bucket, objects = _bucket(s3_env, 3)
    st, pid = _project(label_studio)
    _import(st, pid, [f"s3://{bucket}/{k}" for k in sorted(objects)])
    front = FaultProxy(s3_env.endpoint)
    try:
        front.canned = (403, b"<Error><Code>InvalidAccessKeyId</Code></Error>", {})
        with pytest.raises(pull.PullError, match="refused.*fix the credentials"):
            pull.run(tmp_path, studio=st, project_id=pid, params=_params(front.endpoint, bucket))
        assert rawstore.snapshot_dirs(tmp_path) == []
    finally:
        front.close()
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(pull.PullError, match="no AWS credentials found"):
        pull.run(tmp_path, studio=st, project_id=pid, params=_params(s3_env.endpoint, bucket))
    assert rawstore.snapshot_dirs(tmp_path) == []
