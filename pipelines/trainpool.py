"""The train stage on another machine: the `labelgate-train` deployment on a Prefect work pool
(params.yaml `train.pool`, e.g. a GPU box running `prefect worker start --pool labelgate-gpu`).

    this run (flows.py)                         the pool's worker (train_job below)
    dvc.yaml deps of train  --upload-->  train.exchange  --download, verify sha256-->  temp dir
                                                         pipelines.train.run (the stage itself)
    models/candidate/*  <--verify sha256--  exchange  <--upload model, metrics, history--

Nothing is shared but the object store: the job names every file by sha256 (pipelines/
trainjob.py) and each side verifies what it got. The candidate lands where `dvc repro train`
would put it and `dvc commit` records the stage in dvc.lock, so evaluate, gate, ... run next and
a later `dvc repro` finds train up to date. A worker that dies mid-training stops its heartbeat
in the exchange: after 4 missed beats the run marks the pool's flow run Crashed and fails.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import socket
import tempfile
import threading
import time
import uuid
from pathlib import Path

from prefect import flow, get_run_logger, task

from pipelines import codestamp, dvcrepo, settings
from pipelines.files import fsync_path, utc_now
from pipelines.layout import Layout
from pipelines.objectstore import ObjectStore, StorageError
from pipelines.trainjob import Beat, Exchange, JobError, TrainJob, TrainResult, check_code

STAGE = "train"
TRAIN_DEPLOYMENT = "labelgate-train/labelgate-train"   # flow name / deployment name
FLOW_NAME, DEPLOYMENT_NAME = TRAIN_DEPLOYMENT.split("/")
MODULE = "pipelines.train"         # what the stage's command runs; the pool runs its run()
OUTPUTS = ("model.safetensors", "metrics.json", "history.csv")  # what train.run writes
MISSED_BEATS = 4                   # beats without news before a worker counts as gone
POLL_S = 2.0                       # seconds between looks at the pool run (2 small requests)


class PoolError(RuntimeError):
    """Training on the pool did not produce a candidate; the message says why and what to do."""


# -- on the pool's worker ---------------------------------------------------------------------

class _Heart:
    """Rewrites PREFIX/jobs/<id>/beat.json every `every_s` from a thread, with the phase."""

    def __init__(self, ex: Exchange, job_id: str, every_s: float) -> None:
        self.ex, self.job_id, self.every_s = ex, job_id, every_s
        self.phase, self.count = "download", 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="labelgate-heartbeat",
                                        daemon=True)

    def beat(self, phase: str | None = None) -> None:
        self.phase = phase or self.phase
        self.count += 1
        try:
            self.ex.put_json(self.ex.job_ref(self.job_id, "beat.json"), dataclasses.asdict(
                Beat(self.job_id, self.count, self.phase, utc_now())))
        except StorageError as exc:   # a missed beat; the watcher tolerates MISSED_BEATS - 1
            get_run_logger().warning("heartbeat not written: %s", exc)

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self.beat()

    def __enter__(self) -> "_Heart":
        self.beat()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.beat("failed" if exc[0] else "done")


@flow(name=FLOW_NAME, log_prints=True)
def train_job(exchange: str, job_id: str, storage: dict, heartbeat_s: float = 30.0) -> dict:
    """Train one job from the exchange: download and verify its files into a temp dir, run the
    train stage (pipelines.train.run), upload the outputs by sha256, write result.json."""
    from pipelines import train   # torch only on the worker (and after OMP_WAIT_POLICY is set)
    logger = get_run_logger()
    store = ObjectStore(settings.Storage(**{**storage, "buckets": tuple(storage["buckets"])}))
    try:
        ex = Exchange(store, exchange)
        job = TrainJob.from_json(ex.get_json(ex.job_ref(job_id, "job.json")))
        check_code(job, STAGE, MODULE)
        with _Heart(ex, job_id, heartbeat_s) as heart, \
                tempfile.TemporaryDirectory(prefix="labelgate-train-") as tmp:
            got = ex.download(job.inputs, Path(tmp) / "in")
            logger.info("downloaded %d files, %.1f MB in %.1f s", len(job.inputs),
                        got["bytes"] / 1e6, got["seconds"])
            params = settings.load(Path(tmp) / "in" / "params.yaml")
            if job.blob("init/weights.safetensors"):   # train.init: weights, the file travelled
                params = dataclasses.replace(params, train=dataclasses.replace(
                    params.train, init_weights=str(Path(tmp) / "in" / "init/weights.safetensors")))
            init = job.blob("init/model.safetensors")
            heart.beat("train")
            t0 = time.monotonic()
            try:
                metrics = train.run(Layout(Path(tmp) / "in").prepared, Path(tmp) / "out",
                                    params=params,
                                    init_model=Path(tmp) / "in" / init.name if init else None,
                                    init_model_sha256=job.init_model_sha256)
            except Exception as exc:   # the stage's own errors, said as `python -m` says them
                raise JobError(f"train failed on {socket.gethostname()}: {exc}") from exc
            trained_s = time.monotonic() - t0
            heart.beat("upload")
            outputs, sent = ex.upload({name: Path(tmp) / "out" / name for name in OUTPUTS})
            result = TrainResult(job_id, outputs, socket.gethostname(), metrics["device"],
                                 {"download": got["seconds"], "train": round(trained_s, 2),
                                  "upload": sent["seconds"]}, utc_now())
            ex.put_json(ex.job_ref(job_id, "result.json"), result.to_json())
    finally:
        store.close()
    logger.info("trained on %s (%s): %s", result.host, result.device, result.seconds)
    return result.to_json()


def deployment(pool: str | None = None):
    """The `labelgate-train` deployment (module-path entrypoint: a worker needs only labelgate
    installed, no source copy) on `pool`, params.yaml `train.pool`."""
    from prefect.types.entrypoint import EntrypointType
    return train_job.to_deployment(
        name=DEPLOYMENT_NAME, work_pool_name=pool or None,
        entrypoint_type=EntrypointType.MODULE_PATH,
        description="labelgate's train stage on this pool: data and model travel through "
                    "params.yaml train.exchange (started by the labelgate-retrain flow)")


# -- in the run that hands training to the pool -----------------------------------------------

def _inputs(layout: Layout, params: settings.Params, stage: dict) -> tuple[dict[str, Path],
                                                                           str | None]:
    """{job name: file} of what the stage reads: its dvc.yaml deps (the code stamp travels as
    text), params.yaml, and the model or weights train.init starts from. Also the init model's
    sha256 (train.init: production with a production model), else None."""
    from pipelines import registry
    files: dict[str, Path] = {}
    for dep in stage["deps"]:
        path = layout.root / dep
        if dep == codestamp.stamp_path(STAGE):
            continue
        for f in sorted(path.rglob("*")) if path.is_dir() else [path]:
            if f.is_file():
                files[f.relative_to(layout.root).as_posix()] = f
            elif not f.is_dir():
                raise PoolError(f"{f}: not a file; rerun `dvc repro prepare`")
    files["params.yaml"] = layout.params
    init_sha = None
    if params.train.init == "production" and (ptr := registry.production(layout.registry)):
        init_sha = ptr.sha256
        files["init/model.safetensors"] = registry.blob_path(layout.registry, ptr.sha256)
    if params.train.init == "weights" and params.train.init_weights:
        files["init/weights.safetensors"] = layout.root / params.train.init_weights
    missing = [f"{f} ({name})" for name, f in files.items() if not f.is_file()]
    if missing:
        raise PoolError(f"the train stage's inputs are missing: {', '.join(missing[:5])}; "
                        "`dvc repro prepare`, `labelgate checkout` or train.init_weights")
    return files, init_sha


def _check_deployment(client, pool: str) -> None:
    from prefect.exceptions import ObjectNotFound
    try:
        dep = client.read_deployment_by_name(TRAIN_DEPLOYMENT)
    except ObjectNotFound:
        raise PoolError(f"no deployment {TRAIN_DEPLOYMENT} on the Prefect server: run "
                        "`labelgate deploy` (it registers it on train.pool)") from None
    if dep.work_pool_name != pool:
        raise PoolError(f"deployment {TRAIN_DEPLOYMENT} runs on work pool "
                        f"{dep.work_pool_name!r}, params.yaml train.pool says {pool!r}: run "
                        "`labelgate deploy` again")


def _end(client, run_id, state, note: str) -> None:
    """Put the pool's flow run in a final state (its worker can no longer do it)."""
    client.set_flow_run_state(run_id, state(message=note), force=True)


def _await(client, run_id, ex: Exchange, job_id: str, *, pool: str, t: settings.Train,
           logger) -> TrainResult:
    """Watch the pool's flow run until it ends; its beats in the exchange say it is alive."""
    from prefect.states import Cancelled, Crashed
    started, count, seen, phase = time.monotonic(), None, None, None
    stale_s = MISSED_BEATS * t.pool_heartbeat_s
    while True:
        run = client.read_flow_run(run_id)
        if run.state is not None and run.state.is_completed():
            return TrainResult.from_json(ex.get_json(ex.job_ref(job_id, "result.json")))
        if run.state is not None and run.state.is_final():
            raise PoolError(f"training on pool {pool!r} ended {run.state.name} (flow run "
                            f"{run.name}): {run.state.message or 'see its log in the Prefect UI'}")
        try:
            beat = Beat(**ex.get_json(ex.job_ref(job_id, "beat.json")))
        except (StorageError, JobError, TypeError):
            beat = None   # not started yet (queued, or the worker is still starting)
        now = time.monotonic()
        if beat is not None and beat.count != count:
            count, seen = beat.count, now
            if beat.phase != phase:
                phase = beat.phase
                logger.info("pool %s: %s (flow run %s)", pool, phase, run.name)
        if seen is not None and now - seen > stale_s:
            note = (f"no heartbeat from the worker for {now - seen:.0f} s ({MISSED_BEATS} x "
                    f"train.pool_heartbeat_s {t.pool_heartbeat_s:g} s) during {phase}: the "
                    "worker was killed or its machine lost")
            _end(client, run_id, Crashed, note)
            raise PoolError(f"training on pool {pool!r} stopped: {note}; flow run {run.name} "
                            "marked Crashed. The next run trains again (check the worker)")
        if now - started > t.pool_timeout_s:
            where = phase or f"never started: is a worker polling pool {pool!r}?"
            note = (f"not finished within train.pool_timeout_s {t.pool_timeout_s:g} s (queue "
                    f"+ training; last phase: {where})")
            _end(client, run_id, Cancelled, note)
            raise PoolError(f"training on pool {pool!r}: {note}; flow run {run.name} cancelled")
        time.sleep(min(POLL_S, t.pool_heartbeat_s))


def _place(layout: Layout, stage: dict, ex: Exchange, result: TrainResult) -> dict:
    """The result's files, verified, where the stage's dvc.yaml outs are (temp dir beside
    them, then one rename each: a reader sees the old file or the new one)."""
    by_name = {b.name: b for b in result.outputs}
    outs = {Path(out).name: layout.root / out for out in stage["outs"]}
    if set(outs) != set(by_name):
        raise PoolError(f"the pool returned {sorted(by_name)}, dvc.yaml's train outs are "
                        f"{sorted(outs)}: the worker's labelgate differs from this one")
    folder = next(iter(outs.values())).parent
    folder.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.pool."))
    try:
        got = ex.download(result.outputs, tmp)
        for name, target in outs.items():
            fsync_path(tmp / name)
            os.replace(tmp / name, target)
        fsync_path(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return got


def run_stage(root: str | Path, *, force: bool = False, logger=None) -> dict:
    """The train stage of `root` on params.yaml train.pool, as `dvc repro --single-item train`
    would run it here: skipped when DVC says nothing it depends on changed (unless `force`).
    Returns {"status": "ran" | "skipped", ...figures}."""
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    logger = logger or get_run_logger()
    layout = Layout(root)
    params = settings.load(layout.params)
    t = params.train
    if not t.pool:
        raise PoolError("params.yaml train.pool is empty: train runs here (dvc repro train)")
    if not force and STAGE not in dvcrepo.stale(layout.root):
        return {"status": "skipped"}
    stage = dvcrepo.graph(layout.root)[STAGE]
    t0 = time.monotonic()
    store = ObjectStore(params.storage)
    try:
        with get_client(sync_client=True) as client:
            _check_deployment(client, t.pool)
            ex = Exchange(store, t.exchange)
            files, init_sha = _inputs(layout, params, stage)
            inputs, sent = ex.upload(files)
            job = TrainJob(f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-"
                           f"{uuid.uuid4().hex[:12]}", STAGE, inputs,
                           tuple(p if isinstance(p, str) else next(iter(p))
                                 for p in stage["params"]), init_sha,
                           (layout.root / codestamp.stamp_path(STAGE)).read_text("utf-8"),
                           utc_now())
            ex.put_json(ex.job_ref(job.job_id, "job.json"), job.to_json())
            logger.info("train job %s: %d files, %.1f MB (%.1f MB uploaded) in %.1f s to %s",
                        job.job_id, len(inputs), sent["bytes"] / 1e6,
                        sent["uploaded_bytes"] / 1e6, sent["seconds"], ex.ref("").uri)
            t1 = time.monotonic()
            run = run_deployment(TRAIN_DEPLOYMENT, timeout=0, flow_run_name=f"train {job.job_id}",
                                 parameters={"exchange": t.exchange, "job_id": job.job_id,
                                             "storage": dataclasses.asdict(params.storage),
                                             "heartbeat_s": t.pool_heartbeat_s})
            result = _await(client, run.id, ex, job.job_id, pool=t.pool, t=t, logger=logger)
            waited = time.monotonic() - t1
            got = _place(layout, stage, ex, result)
    except (StorageError, JobError) as exc:
        raise PoolError(f"training on pool {t.pool!r}: {exc}") from exc
    finally:
        store.close()
    t2 = time.monotonic()
    dvcrepo.dvc(layout.root, "commit", "--force", STAGE)   # dvc.lock: as `dvc repro train`
    record = {"status": "ran", "pool": t.pool, "job_id": job.job_id, "flow_run": str(run.id),
              "host": result.host, "device": result.device, "pool_seconds": result.seconds,
              "upload_bytes": sent["bytes"], "uploaded_bytes": sent["uploaded_bytes"],
              "seconds": {"upload": sent["seconds"], "wait": round(waited, 2),
                          "download": got["seconds"], "commit": round(time.monotonic() - t2, 2),
                          "total": round(time.monotonic() - t0, 2)}}
    logger.info("train on pool %s: %s", t.pool, record)
    return record


@task(name="stage", task_run_name="{stage} (pool)")
def stage_task(root: str, stage: str, force: bool = False) -> str:
    """flows.py's stage task for `train` when params.yaml train.pool is set."""
    if stage != STAGE:
        raise PoolError(f"only the {STAGE} stage runs on a pool, not {stage!r}")
    return run_stage(root, force=force)["status"]
