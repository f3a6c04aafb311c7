"""pull against a real Label Studio: snapshots, change detection, interruption, bad input."""
from __future__ import annotations

import json
import os

import httpx
import pytest

from pipelines import pull, rawstore
from pipelines.labelconfig import choice_result
from tests.conftest import REPO
from pipelines.settings import load


@pytest.fixture(scope="module")
def project(make_project):
    return make_project(limit=60, eval_tasks=10, unlabeled_tasks=5)


def _params(project):
    import dataclasses
    params = load(REPO / "params.yaml")
    return dataclasses.replace(params, studio=dataclasses.replace(
        params.studio, project_title=project["title"]))


def _api(project, method, path, **kw):
    conn = project["studio"].conn
    r = httpx.request(method, f"{conn.url}{path}", headers={"Authorization": f"Token {conn.api_key}"},
                      timeout=30, **kw)
    r.raise_for_status()
    return r.json() if r.content else None


def test_pull_snapshot_then_nothing_new(project, tmp_path):
    params = _params(project)
    first = pull.run(tmp_path, studio=project["studio"], project_id=project["id"], params=params)
    # every annotated task (labeled, skipped, bad) is exported; unlabeled ones are not
    annotated = project["counts"]["tasks"] - project["counts"]["unlabeled"]
    assert first["snapshot"] == "000001" and first["changed"] == annotated
    state = rawstore.load(tmp_path)
    assert len(state.tasks) == annotated
    assert all(row["sha256"] in state.packs for row in state.images.values() if row["sha256"])
    # the truncated PNG is stored (validate quarantines it); the text file named .png is
    # refused at the door: the versioned store holds image bytes only
    assert first["image_errors"] == 1
    (err,) = [row["error"] for row in state.images.values() if row["error"]]
    assert err.startswith("not an image")
    second = pull.run(tmp_path, studio=project["studio"], project_id=project["id"], params=params)
    assert second["snapshot"] is None and second["changed"] == 0
    assert len(rawstore.snapshot_dirs(tmp_path)) == 1


def test_edit_and_delete_become_a_new_snapshot(make_project, tmp_path):
    project = make_project(limit=30, eval_tasks=5, unlabeled_tasks=5)
    params = _params(project)
    st = project["studio"]
    pull.run(tmp_path, studio=st, project_id=project["id"], params=params)
    tasks = _api(project, "GET", f"/api/tasks?project={project['id']}&fields=all&page_size=100")
    tasks = tasks["tasks"] if isinstance(tasks, dict) else tasks
    labeled = [t for t in tasks if t["annotations"] and not t["annotations"][0]["was_cancelled"]]
    edited, deleted = labeled[0], labeled[1]
    _api(project, "PATCH", f"/api/annotations/{edited['annotations'][0]['id']}",
         json={"result": choice_result("3")})
    for ann in deleted["annotations"]:
        _api(project, "DELETE", f"/api/annotations/{ann['id']}")
    result = pull.run(tmp_path, studio=st, project_id=project["id"], params=params)
    assert result["snapshot"] == "000002"
    assert result["changed"] == 1 and result["removed"] == 1
    assert result["images_fetched"] == 0  # the edited task's image was already stored
    changes = json.loads((rawstore.snapshot_dirs(tmp_path)[-1] / "changes.json").read_text())
    assert changes == {"added": [], "changed": [edited["annotations"][0]["id"]],
                       "removed": sorted(a["id"] for a in deleted["annotations"])}
    line = pull.describe(result)  # the one-line summary people and the flow's log see
    assert "snapshot 000002: 1 task(s) new/changed, 1 removed" in line
    assert f"annotations +0 ~1 -{len(deleted['annotations'])}" in line
    assert "nothing new" in pull.describe(pull.run(tmp_path, studio=st, project_id=project["id"],
                                                   params=params))
    state = rawstore.load(tmp_path)
    assert deleted["id"] not in state.tasks
    ann = state.tasks[edited["id"]]["annotations"][0]
    assert ann["result"][0]["value"]["choices"] == ["3"]
    # the older snapshot still holds the deleted task: nothing is lost
    first = rawstore.snapshot_dirs(tmp_path)[0]
    assert str(deleted["id"]) in (first / "tasks.jsonl").read_text()


def test_interrupted_pull_rerun_equals_clean_pull(project, tmp_path, monkeypatch):
    params = _params(project)
    crashed, clean = tmp_path / "crashed", tmp_path / "clean"

    class Killed(BaseException):
        """Like SIGKILL arriving just before the commit: nothing after it runs."""

    real_rename = os.rename

    def crash(src, dst, *args, **kwargs):
        if ".tmp-" in str(src):
            raise Killed()
        return real_rename(src, dst, *args, **kwargs)
    monkeypatch.setattr(pull.os, "rename", crash)
    with pytest.raises(Killed):
        pull.run(crashed, studio=project["studio"], project_id=project["id"], params=params)
    monkeypatch.setattr(pull.os, "rename", real_rename)
    assert rawstore.snapshot_dirs(crashed) == []  # nothing half-written is visible
    pull.run(crashed, studio=project["studio"], project_id=project["id"], params=params)
    pull.run(clean, studio=project["studio"], project_id=project["id"], params=params)
    a, b = rawstore.snapshot_dirs(crashed), rawstore.snapshot_dirs(clean)
    assert [d.name for d in a] == [d.name for d in b] == ["000001"]
    assert not [p for p in (crashed / "pulls").iterdir() if p.name.startswith(".tmp-")]
    for name in ("tasks.jsonl", "images.jsonl", "images.tar", "removed.json"):
        assert (a[0] / name).read_bytes() == (b[0] / name).read_bytes(), name


def test_label_config_drift_stops_the_pull(project, tmp_path):
    import dataclasses
    params = _params(project)
    renamed = dataclasses.replace(params, base=dataclasses.replace(
        params.base, classes=params.base.classes[:-1] + ("nine",)))
    with pytest.raises(pull.PullError, match="nine"):
        pull.run(tmp_path, studio=project["studio"], project_id=project["id"], params=renamed)
    assert not (tmp_path / "pulls").exists() or rawstore.snapshot_dirs(tmp_path) == []


def test_incremental_sync_sees_skips_new_labels_task_deletes_and_matches_a_full_pull(
        make_project, tmp_path):
    project = make_project(limit=40, eval_tasks=5, unlabeled_tasks=8)
    params = _params(project)
    st, pid = project["studio"], project["id"]
    inc, full = tmp_path / "incremental", tmp_path / "full"
    first = pull.run(inc, studio=st, project_id=pid, params=params)
    assert first["mode"] == "full"
    assert pull.run(inc, studio=st, project_id=pid, params=params)["snapshot"] is None

    tasks = _api(project, "GET", f"/api/tasks?project={pid}&fields=all&page_size=100")
    tasks = tasks["tasks"] if isinstance(tasks, dict) else tasks
    unlabeled = [t for t in tasks if not t["annotations"]]
    labeled = [t for t in tasks if t["annotations"] and not t["annotations"][0]["was_cancelled"]]
    user = st.check()
    # a skip, a new label, and a whole task deleted
    _api(project, "POST", f"/api/tasks/{unlabeled[0]['id']}/annotations/",
         json={"result": [], "was_cancelled": True, "completed_by": user})
    _api(project, "POST", f"/api/tasks/{unlabeled[1]['id']}/annotations/",
         json={"result": choice_result("7"), "completed_by": user})
    _api(project, "DELETE", f"/api/tasks/{labeled[0]['id']}/")
    result = pull.run(inc, studio=st, project_id=pid, params=params)
    assert result["mode"] == "incremental"
    assert result["changed"] == 2 and result["removed"] == 1
    assert result["annotations"] == {"added": 2, "changed": 0,
                                     "removed": len(labeled[0]["annotations"])}
    state = rawstore.load(inc)
    assert labeled[0]["id"] not in state.tasks
    assert state.tasks[unlabeled[0]["id"]]["annotations"][0]["was_cancelled"]
    # nothing fetched twice that has not changed, and exactly the same dataset as one full pull
    assert pull.run(inc, studio=st, project_id=pid, params=params)["snapshot"] is None
    pull.run(full, studio=st, project_id=pid, params=params, full=True)
    fp = lambda s: {i: rawstore.fingerprint(t) for i, t in s.tasks.items()}  # noqa: E731
    assert fp(rawstore.load(inc)) == fp(rawstore.load(full))


def test_sync_killed_at_random_points_then_rerun_equals_one_clean_sync(project, tmp_path):
    """SIGKILL a real `python -m pipelines.pull` process at seeded random moments; each re-run
    must leave exactly what one uninterrupted sync leaves."""
    import random
    import signal
    import subprocess
    import sys
    import time

    import yaml
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["studio"]["project_title"] = project["title"]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    conn = project["studio"].conn
    env = dict(os.environ, LABEL_STUDIO_URL=conn.url, LABEL_STUDIO_API_KEY=conn.api_key)

    def start(raw_dir):
        log = open(tmp_path / f"{raw_dir.name}.log", "ab")  # noqa: SIM115 (the child owns it)
        return subprocess.Popen([sys.executable, "-m", "pipelines.pull", "--raw", str(raw_dir),
                                 "--params", str(tmp_path / "params.yaml")],
                                cwd=REPO, env=env, stdout=log, stderr=log)

    def finished(proc, raw_dir) -> bool:
        ok = proc.wait(timeout=300) == 0
        if not ok:
            print((tmp_path / f"{raw_dir.name}.log").read_text()[-3000:])
        return ok

    clean = tmp_path / "clean"
    t0 = time.monotonic()
    assert finished(start(clean), clean)
    duration = time.monotonic() - t0
    reference = {p.name: p.read_bytes() for p in rawstore.snapshot_dirs(clean)[0].iterdir()
                 if p.name != "meta.json"}
    rng = random.Random(7)
    for trial in range(int(os.environ.get("KILL_TRIALS", 3))):  # more: a stress run
        raw_dir = tmp_path / f"killed{trial}"
        proc = start(raw_dir)
        time.sleep(rng.uniform(0.3, 1.0) * duration)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert finished(start(raw_dir), raw_dir)  # the re-run
        snaps = rawstore.snapshot_dirs(raw_dir)
        assert [s.name for s in snaps] == ["000001"]
        got = {p.name: p.read_bytes() for p in snaps[0].iterdir() if p.name != "meta.json"}
        assert got == reference
        assert not [p for p in (raw_dir / "pulls").iterdir() if p.name.startswith(".tmp-")]


def test_concurrent_pulls_into_one_directory_take_turns(project, tmp_path):
    """The label trigger's pull and a flow's pull may meet: one writes the snapshot, the other
    waits and then finds nothing new. Never an error, never two snapshots of one change."""
    from concurrent.futures import ThreadPoolExecutor
    params = _params(project)
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda _: pull.run(tmp_path, studio=project["studio"],
                                                   project_id=project["id"], params=params),
                                range(2)))
    assert sorted(str(r["snapshot"]) for r in results) == ["000001", "None"]
    assert len(rawstore.snapshot_dirs(tmp_path)) == 1


def test_killed_first_pull_resumes_where_it_stopped(project, tmp_path, monkeypatch):
    """A first pull killed after some export calls and images resumes from its staging folder
    -- those calls are not made again -- and ends exactly like one uninterrupted pull."""
    from pipelines import staging
    params = _params(project)
    monkeypatch.setattr(pull, "EXPORT_IDS_PER_CALL", 7)  # several calls on a small project
    resumed, clean = tmp_path / "resumed", tmp_path / "clean"
    st = project["studio"]

    class Killed(BaseException):
        """Like SIGKILL: nothing after it runs."""

    calls = {"export": 0, "image": 0}
    real_export, real_fetch = st.export_tasks, st.fetch_image

    def export_then_die(pid, ids):
        calls["export"] += 1
        if calls["export"] == 4:
            raise Killed()
        return real_export(pid, ids)
    monkeypatch.setattr(st, "export_tasks", export_then_die)
    with pytest.raises(Killed):
        pull.run(resumed, studio=st, project_id=project["id"], params=params)
    assert rawstore.snapshot_dirs(resumed) == []
    assert len(list((staging.staging_dir(resumed) / "chunks").iterdir())) == 3

    # second attempt: dies after a few images (downloads run beside the export calls)
    calls["export"] = -10**9
    def fetch_then_die(url, **kw):
        calls["image"] += 1
        if calls["image"] == 6:
            raise Killed()
        return real_fetch(url, **kw)
    monkeypatch.setattr(st, "fetch_image", fetch_then_die)
    with pytest.raises(Killed):
        pull.run(resumed, studio=st, project_id=project["id"], params=params)
    staged_images = len(staging.Staging.open(resumed, project_id=project["id"],
                                             prev_seq=None).images())
    staged_chunks = len(list((staging.staging_dir(resumed) / "chunks").iterdir()))
    assert staged_images >= 3 and staged_chunks >= 3

    # third attempt, undisturbed: reuses what was staged
    made = []
    monkeypatch.setattr(st, "export_tasks", lambda pid, ids: made.append(ids) or real_export(pid, ids))
    monkeypatch.setattr(st, "fetch_image", real_fetch)
    result = pull.run(resumed, studio=st, project_id=project["id"], params=params)
    total_calls = -(-len(st.annotated_task_ids(project["id"])) // 7)
    # every staged export call is reused; only the rest are made
    assert result["resumed"]["export_calls"] == staged_chunks
    assert len(made) == total_calls - staged_chunks
    assert result["resumed"]["images"] == staged_images
    assert "resumed" in pull.describe(result)
    assert not staging.staging_dir(resumed).exists()  # removed once the snapshot is committed

    monkeypatch.setattr(st, "export_tasks", real_export)
    pull.run(clean, studio=st, project_id=project["id"], params=params)
    a, b = rawstore.snapshot_dirs(resumed)[0], rawstore.snapshot_dirs(clean)[0]
    for name in ("tasks.jsonl", "images.jsonl", "images.tar", "removed.json", "changes.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_staging_of_another_pull_is_not_reused(project, tmp_path):
    """A staging folder left by a pull of another project (or before the latest snapshot) is
    dropped, never mixed into this pull."""
    from pipelines import staging
    stale = staging.Staging.open(tmp_path, project_id=project["id"] + 999, prev_seq=None)
    stale.save_plan({"mode": "full", "watermark": None, "task_count": 1, "ids": [1]})
    stale.save_chunk(0, [{"id": 1, "data": {}, "annotations": [{"id": 5}]}])
    result = pull.run(tmp_path, studio=project["studio"], project_id=project["id"],
                      params=_params(project))
    assert "resumed" not in result
    assert result["changed"] == len(project["studio"].annotated_task_ids(project["id"]))
    assert all(t["data"] for t in rawstore.load(tmp_path).tasks.values())  # no stale task


def test_hostile_task_urls_are_quarantined_not_fatal_and_never_stored(make_project, label_studio,
                                                                      tmp_path):
    """Tasks whose image URL points at Label Studio's own API (its token among them), a path
    traversal the server answers with an error, or a malformed URL: each becomes that task's
    reason; the pull completes; the versioned store holds image bytes only."""
    project = make_project(limit=12, eval_tasks=2, unlabeled_tasks=0)
    st, pid = project["studio"], project["id"]
    conn = label_studio["conn"]
    user = st.check()
    hostile = ["/api/current-user/token", "/api/current-user/whoami", f"{conn.url}/api/users/",
               "/data/upload/../../api/current-user/token", "/data/local-files/?d=../../../etc/passwd",
               "/data/local-files/?d=%2e%2e/%2e%2e/etc/passwd", "http://[::1", "http://[name]/x.png",
               "/data/upload/1/x\x00.png", "/data/upload/" + "a" * 5000,
               "http://127.0.0.1:1/x.png", "/data/upload/1/missing.png"]
    st.import_tasks(pid, [{"data": {"image": url}, "annotations": [
        {"result": choice_result("3"), "completed_by": user}]} for url in hostile])
    result = pull.run(tmp_path, studio=st, project_id=pid, params=_params(project))
    assert result["snapshot"] == "000001"
    state = rawstore.load(tmp_path)
    rows = {row["url"]: row for row in state.images.values()}
    for url in hostile:
        assert rows[url]["sha256"] is None and rows[url]["error"], url
    # everything kept is an image, and the key is nowhere in the store
    for sha in state.packs:
        assert pull.looks_like_image(state.image_bytes(sha))
    blob = b"".join(p.read_bytes() for p in (tmp_path / "pulls").rglob("*") if p.is_file())
    assert conn.api_key.encode() not in blob


def test_image_signatures_cover_the_accepted_formats():
    from pipelines import images
    assert set(pull.IMAGE_SIGNATURES) == set(images.ALLOWED_FORMATS)


def test_a_thousand_class_mismatch_is_a_short_message(project, tmp_path):
    import dataclasses
    params = _params(project)
    many = dataclasses.replace(params, base=dataclasses.replace(
        params.base, classes=tuple(f"class-{i}" for i in range(1000))))
    with pytest.raises(pull.PullError) as err:
        pull.run(tmp_path, studio=project["studio"], project_id=project["id"], params=many)
    assert len(str(err.value)) < 800 and "1000 in all" in str(err.value)
