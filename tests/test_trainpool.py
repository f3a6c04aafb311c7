"""The train stage on its own Prefect work pool: a real Prefect server (`prefect_api`), a real
S3 API (`s3`), real `prefect worker start --pool ...` processes, each in its own empty working
dir and PREFECT_HOME -- nothing shared with the workspace but the S3 server. CPU training is
deterministic, so the candidate trained on the pool must be the very file `dvc repro train`
makes here.
"""
from __future__ import annotations

import io
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from pipelines import dvcrepo, packed, trainpool
from pipelines.files import sha256_file
from pipelines.inputspec import InputSpec
from pipelines.layout import Layout
from tests.conftest import make_workspace

pytestmark = pytest.mark.slow

HEARTBEAT_S = 2.0   # so a killed worker is noticed within 4 x 2 s


def _digit_like(k: int, rng: np.random.Generator) -> bytes:
    """28 x 28 gray PNG: class k is a bright bar at column 2 + 2.4 k, with noise (learnable in
    two epochs, so train's chance floor passes)."""
    img = rng.integers(0, 60, size=(28, 28), dtype=np.uint8)
    col = int(2 + 2.4 * k)
    img[4:24, col:col + 2] = 230
    buf = io.BytesIO()
    Image.fromarray(img, mode="L").save(buf, format="PNG")
    return buf.getvalue()


def _prepared(layout: Layout, spec: InputSpec) -> None:
    """data/prepared/{train,val} as prepare writes them (packed splits), without Label Studio."""
    rng = np.random.default_rng(7)
    for split, n in (("train", 300), ("val", 100)):
        y = [i % 10 for i in range(n)]
        packed.write_split(layout.prepared / split, (_digit_like(k, rng) for k in y), y=y,
                           task_id=list(range(1, n + 1)), sha256=[f"{i:064x}" for i in range(n)],
                           spec=spec)


def _tree(pid: int) -> list[int]:
    """`pid` and all its descendants (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


class Worker:
    """`prefect worker start --pool POOL` in its own empty dir and PREFECT_HOME."""

    def __init__(self, home: Path, pool: str, s3, *, drop: tuple[str, ...] = ()) -> None:
        home.mkdir(parents=True)
        # polls every second (Prefect's default: 10 s): the tests wait less
        env = {**{k: v for k, v in os.environ.items() if k not in drop}, **s3.env(),
               "PREFECT_HOME": str(home / ".prefect"), "PREFECT_WORKER_QUERY_SECONDS": "1",
               "PYTHONUNBUFFERED": "1"}
        self.log = home / "worker.log"
        self.proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "prefect"), "worker", "start", "--pool", pool,
             "--type", "process"], cwd=home, env=env, stdout=open(self.log, "wb"),
            stderr=subprocess.STDOUT, start_new_session=True)

    def tail(self, lines: int = 30) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def kill_all(self) -> None:
        """The machine is lost: the worker and every process under it, SIGKILL."""
        for pid in _tree(self.proc.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill_all()


@pytest.fixture(scope="module")
def rig(prefect_api, s3, tmp_path_factory):
    """A bucket, a process work pool with the labelgate-train deployment, and a template
    workspace (git + DVC, prepared splits, code stamps) the tests copy."""
    bucket = f"labelgate-pool-{uuid.uuid4().hex[:8]}"
    s3.client().create_bucket(Bucket=bucket)
    pool = f"labelgate-gpu-{uuid.uuid4().hex[:6]}"
    subprocess.run([str(Path(sys.executable).parent / "prefect"), "work-pool", "create", pool,
                    "--type", "process"], check=True, capture_output=True)
    root = make_workspace(tmp_path_factory.mktemp("pool") / "ws", **{
        "train.pool": pool, "train.exchange": f"s3://{bucket}/exchange",
        "train.pool_timeout_s": 300, "train.pool_heartbeat_s": HEARTBEAT_S,
        "train.epochs": 2, "storage.buckets": [bucket], "storage.endpoint_url": s3.endpoint})
    dvcrepo.ensure_repo(root)
    layout = Layout(root)
    from pipelines import inputspec, settings
    _prepared(layout, inputspec.from_params(settings.load(layout.params)))
    dvcrepo.refresh_stamps(root)
    return {"root": root, "pool": pool, "bucket": bucket, "s3": s3}


def _copy(rig, tmp_path, name: str) -> Layout:
    dest = tmp_path / name
    shutil.copytree(rig["root"], dest, symlinks=True)
    return Layout(dest)


def _lock_train(layout: Layout) -> dict:
    return yaml.safe_load(layout.dvc_lock.read_text())["stages"]["train"]


def _on_pool(layout: Layout, pool: str, **kw) -> dict:
    """The stage as flows.py runs it: a task inside a flow run (the pool run is its subflow).
    The deployment is (re)registered on `pool` first: another test's `labelgate deploy` may
    have put it on its own pool."""
    from prefect import flow
    trainpool.deployment(pool).apply()

    @flow(name="labelgate-test-pool-parent")
    def parent() -> dict:
        return trainpool.run_stage(layout.root, **kw)
    return parent()


def test_worker_killed_mid_training_fails_the_run_clearly_and_the_next_run_completes(
        rig, s3_env, tmp_path):
    from prefect.client.orchestration import get_client
    layout = _copy(rig, tmp_path, "ws")
    raw = yaml.safe_load(layout.params.read_text())
    raw["train"]["epochs"] = 400   # long enough to be killed in the middle
    layout.params.write_text(yaml.safe_dump(raw, sort_keys=False))
    worker = Worker(tmp_path / "box1", rig["pool"], rig["s3"])
    client = rig["s3"].client()
    killed = threading.Event()

    def kill_when_training() -> None:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and not killed.is_set():
            keys = [o["Key"] for o in client.list_objects_v2(
                Bucket=rig["bucket"], Prefix="exchange/jobs/").get("Contents", [])]
            for key in (k for k in keys if k.endswith("/beat.json")):
                beat = client.get_object(Bucket=rig["bucket"], Key=key)["Body"].read()
                if b'"train"' in beat:
                    time.sleep(1.0)   # in the middle of an epoch
                    worker.kill_all()
                    killed.set()
                    return
            time.sleep(0.5)

    killer = threading.Thread(target=kill_when_training, daemon=True)
    killer.start()
    try:
        t0 = time.monotonic()
        with pytest.raises(trainpool.PoolError, match="no heartbeat from the worker") as err:
            _on_pool(layout, rig["pool"])
        failed_after = time.monotonic() - t0
    finally:
        killed.set()
        killer.join()
        worker.stop()
    assert "marked Crashed" in str(err.value) and "next run trains again" in str(err.value)
    assert failed_after < 240
    assert not layout.candidate_model.exists()           # nothing half-placed
    with get_client(sync_client=True) as c:
        runs = [r for r in c.read_flow_runs() if r.name.startswith("train ")
                and r.parameters.get("job_id", "") in str(err.value)]
    assert len(runs) == 1 and runs[0].state.is_crashed(), runs
    # the next run, with a worker back on the pool, completes
    raw["train"]["epochs"] = 2
    layout.params.write_text(yaml.safe_dump(raw, sort_keys=False))
    worker = Worker(tmp_path / "box2", rig["pool"], rig["s3"])
    try:
        record = _on_pool(layout, rig["pool"])
    finally:
        worker.stop()
    assert record["status"] == "ran", record
    assert layout.candidate_model.is_file()
    assert "train" not in dvcrepo.stale(layout.root)


def test_retraining_run_on_one_pool_trains_on_the_other(
        make_project, prefect_api, studio_env, s3, tmp_path, capsys):
    """Two pools, two workers, as on two machines: the retraining deployment's worker (Label
    Studio's variables, the workspace) and the training pool's worker (S3 credentials only,
    an empty folder). `labelgate deploy` registers both deployments."""
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    from pipelines import cli
    from pipelines.files import read_json
    from pipelines.flows import DEPLOYMENT
    project = make_project(limit=120, eval_tasks=30, unlabeled_tasks=5)
    bucket = f"labelgate-pool-{uuid.uuid4().hex[:8]}"
    s3.client().create_bucket(Bucket=bucket)
    flows_pool, gpu_pool = (f"labelgate-{kind}-{uuid.uuid4().hex[:6]}" for kind in ("cpu", "gpu"))
    root = make_workspace(tmp_path / "ws", **{
        "studio.project_title": project["title"], "schedule.pool": flows_pool,
        "train.pool": gpu_pool, "train.exchange": f"s3://{bucket}/exchange",
        "train.pool_heartbeat_s": 5, "storage.buckets": [bucket],
        "storage.endpoint_url": s3.endpoint, "train.epochs": 2, "review.epochs": 1,
        "review.folds": 2, "validate.min_per_class": 3, "gate.min_accuracy": 0.3})
    layout = Layout(root)
    assert cli.main(["--root", str(root), "pull"]) == 0
    assert cli.main(["--root", str(root), "evalset", "freeze"]) == 0
    assert cli.main(["--root", str(root), "deploy"]) == 0
    capsys.readouterr()
    flows_box = Worker(tmp_path / "flows-box", flows_pool, s3)   # env: this test's (Label Studio)
    gpu_box = Worker(tmp_path / "gpu-box", gpu_pool, s3,
                     drop=("LABEL_STUDIO_URL", "LABEL_STUDIO_API_KEY"))
    client = get_client(sync_client=True)
    client.__enter__()
    try:
        run = run_deployment(DEPLOYMENT, timeout=0)
        deadline = time.monotonic() + 600
        while not (run := client.read_flow_run(run.id)).state.is_final():
            assert time.monotonic() < deadline, (run.state, flows_box.tail(), gpu_box.tail())
            assert flows_box.proc.poll() is None and gpu_box.proc.poll() is None
            time.sleep(2)
        assert run.state.is_completed(), (run.state, flows_box.tail(), gpu_box.tail())
        assert run.work_pool_name == flows_pool and run.infrastructure_pid
        trained = [r for r in client.read_flow_runs() if r.name.startswith("train ")
                   and r.work_pool_name == gpu_pool]
        assert len(trained) == 1 and trained[0].state.is_completed(), trained
        assert trained[0].infrastructure_pid    # the training worker's process ran it
    finally:
        flows_box.stop()
        gpu_box.stop()
        for name in (DEPLOYMENT, trainpool.TRAIN_DEPLOYMENT):
            client.delete_deployment(client.read_deployment_by_name(name).id)
        client.__exit__(None, None, None)
    summary = read_json(layout.last_run)
    assert summary["status"] == "done" and summary["stages"]["train"] == "ran", summary
    assert summary["stages"]["evaluate"] == "ran" and summary["verdict"] in (
        "PASS", "FAIL", "INCONCLUSIVE")
    assert summary["train"]["epochs"] == 2        # the pool's metrics.json, placed here
    # dvc.lock holds the pool's candidate: `dvc repro` finds train up to date
    assert "didn't change, skipping" in dvcrepo.repro_stage(root, "train")
    # the same data, params and code trained here (CPU: deterministic) give the same bytes,
    # and `dvc repro train` records the stage as the pool run did
    here = Layout(shutil.copytree(root, tmp_path / "here", symlinks=True))
    dvcrepo.repro_stage(here.root, "train", force=True)
    assert sha256_file(here.candidate_model) == sha256_file(layout.candidate_model)
    local, pooled = _lock_train(here), _lock_train(layout)
    assert (pooled["cmd"], pooled["deps"], pooled["params"]) == \
           (local["cmd"], local["deps"], local["params"])
    model = "models/candidate/model.safetensors"
    assert [o for o in pooled["outs"] if o["path"] == model] == \
           [o for o in local["outs"] if o["path"] == model]


def test_a_blob_changed_in_the_exchange_is_refused_by_name(s3_env, tmp_path):
    from pipelines.objectstore import ObjectStore
    from pipelines.settings import Storage
    from pipelines.trainjob import Blob, Exchange, JobError
    bucket = f"labelgate-pool-{uuid.uuid4().hex[:8]}"
    s3_env.client().create_bucket(Bucket=bucket)
    store = ObjectStore(Storage(buckets=(bucket,), endpoint_url=s3_env.endpoint, region="",
                                profile="", workers=4))
    ex = Exchange(store, f"s3://{bucket}/x")
    (tmp_path / "y.npy").write_bytes(b"labels" * 100)
    (blob,), sent = ex.upload({"data/prepared/train/y.npy": tmp_path / "y.npy"})
    assert sent["uploaded_bytes"] == 600
    assert ex.upload({"data/prepared/train/y.npy": tmp_path / "y.npy"})[1]["uploaded_bytes"] == 0
    ex.download((blob,), tmp_path / "ok")
    assert (tmp_path / "ok" / blob.name).read_bytes() == b"labels" * 100
    store.put_bytes(ex.blob_ref(blob.sha256), b"labelz" * 100)   # same size, other bytes
    with pytest.raises(JobError, match=f"data/prepared/train/y.npy .* not the recorded "
                                       f"{blob.sha256}"):
        ex.download((blob,), tmp_path / "bad")
    assert not (tmp_path / "bad" / blob.name).exists()
    for name in ("../../etc/passwd", "/abs/path", "a/./b", "a\\b"):
        with pytest.raises(JobError, match="refused a job file name"):
            Blob(name, blob.sha256, 1)
    store.close()


def test_a_worker_with_other_code_refuses_the_job():
    from pipelines import codestamp
    from pipelines.trainjob import JobError, TrainJob, check_code
    stamp = codestamp.stamp("train", "pipelines.train")
    job = TrainJob("20261130T000000Z-0123456789ab", "train", (), ("base",), None,
                   stamp + "# train.init: production -- warm start from nothing yet\n", "")
    check_code(job, "train", "pipelines.train")   # same code + the warm-start note: accepted
    lines = stamp.splitlines()
    edited = next(i for i, line in enumerate(lines) if line.endswith("  pipelines/loop.py"))
    lines[edited] = "0" * 64 + "  pipelines/loop.py"
    with pytest.raises(JobError, match="files that differ: pipelines/loop.py"):
        check_code(TrainJob(job.job_id, "train", (), ("base",), None,
                            "\n".join(lines) + "\n", ""), "train", "pipelines.train")
