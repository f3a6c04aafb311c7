"""Prefect beyond one process: `labelgate deploy` puts the retraining deployment on a process
work pool, a real `prefect worker start --pool NAME` (its own process, as a user starts it)
runs a triggered and a cron-scheduled run, and the runs and the gate report are visible
through the Prefect API. Real Label Studio, real Prefect server, real git + DVC workspace."""
from __future__ import annotations

import os
import subprocess
import time
import uuid

import pytest

from pipelines import cli, workpool
from pipelines.files import read_json
from pipelines.flows import DEPLOYMENT, deployment, retrain
from pipelines.layout import Layout
from pipelines.prefect_server import prefect_bin
from pipelines.process import stop_group
from pipelines.settings import load
from tests.conftest import make_workspace, write_params

_RUN_TIMEOUT_S = 480    # both runs, on a loaded 2-core machine (idle: ~2 min, see the print)
_WORKER_ONLINE_S = 90   # `prefect worker start` -> ONLINE in its pool (idle: a few seconds)


def test_pooled_deployment_names_the_flow_by_module_path(tmp_path):
    """A worker imports the flow from installed labelgate: the entrypoint is a module path
    that resolves to the flow itself, not a file path of this checkout."""
    from prefect.flows import load_flow_from_entrypoint
    dep = deployment(str(tmp_path), "15 4 * * 1", pool="gpu-a", env=workpool.RUN_ENV)
    assert dep.entrypoint == "pipelines.flows.retrain"
    assert load_flow_from_entrypoint(dep.entrypoint).fn is retrain.fn
    assert dep.work_pool_name == "gpu-a"
    assert dep.job_variables == {"env": workpool.RUN_ENV}
    assert dep.parameters == {"root": str(Layout(tmp_path).root)}
    assert dep.concurrency_limit is None  # see flows.deployment: a paused run would be cancelled
    # the worker's flow run works in the workspace itself (no copy of the worker's folder)
    assert dep.storage.to_pull_step() == {"prefect.deployments.steps.set_working_directory": {
        "directory": str(Layout(tmp_path).root)}}
    assert [s.schedule.cron for s in dep.schedules] == ["15 4 * * 1"]
    served = deployment(str(tmp_path), "15 4 * * 1")   # `labelgate serve` without a pool
    assert served.work_pool_name is None and served.job_variables == {}


def test_deploy_without_a_pool_says_how_to_name_one(tmp_path, capsys):
    write_params(tmp_path / "params.yaml")
    assert load(tmp_path / "params.yaml").schedule.pool == ""
    assert cli.main(["--root", str(tmp_path), "deploy"]) == 2
    err = capsys.readouterr().err
    assert "--pool NAME" in err and "schedule.pool" in err
    assert not (Layout(tmp_path).state / "prefect" / "server.pid").exists()  # no server started


def test_worker_command_quotes_what_it_prints():
    assert (workpool.worker_command("gpu a", "http://10.0.0.5:4200/api")
            == "PREFECT_API_URL=http://10.0.0.5:4200/api prefect worker start --pool 'gpu a'")


def test_describe_names_one_worker_command_per_pool(tmp_path):
    done = [workpool.Registered(name="labelgate-retrain/labelgate-retrain", id="1",
                                pool="cpu", pool_created=True, pool_type="process"),
            workpool.Registered(name="labelgate-train/labelgate-train", id="2", pool="gpu",
                                pool_created=False, pool_type="process")]
    local = workpool.describe(done, api_url="http://127.0.0.1:4200/api", root=tmp_path)
    lines = local.splitlines()
    assert [ln.strip() for ln in lines if "worker start" in ln] == [
        "PREFECT_API_URL=http://127.0.0.1:4200/api prefect worker start --pool cpu",
        "PREFECT_API_URL=http://127.0.0.1:4200/api prefect worker start --pool gpu"]
    assert "(process pool, created now;" in lines[0] and "(process pool, existing;" in lines[1]
    assert str(tmp_path.resolve()) in local                 # where the workspace must be
    assert "this machine only" in local
    shared = workpool.describe(done, api_url="http://10.0.0.5:4200/api", root=tmp_path)
    assert "this machine only" not in shared


def test_deploy_puts_training_on_the_train_pool(prefect_api, tmp_path, capsys):
    """`--pool` names the flows' pool; train.pool gets the training deployment (no worker
    needed to register: both wait on their pools)."""
    from prefect.client.orchestration import get_client

    from pipelines import trainpool
    flows_pool, gpu_pool = (f"labelgate-{kind}-{uuid.uuid4().hex[:6]}" for kind in ("cpu", "gpu"))
    root = make_workspace(tmp_path / "ws", **{
        "train.pool": gpu_pool, "train.exchange": "s3://labelgate-exchange/jobs",
        "storage.buckets": ["labelgate-exchange"]})
    assert cli.main(["--root", str(root), "deploy", "--pool", flows_pool]) == 0
    out = capsys.readouterr().out
    assert f"--pool {flows_pool}" in out and f"--pool {gpu_pool}" in out
    with get_client(sync_client=True) as client:
        try:
            flows = client.read_deployment_by_name(DEPLOYMENT)
            train = client.read_deployment_by_name(trainpool.TRAIN_DEPLOYMENT)
            assert (flows.work_pool_name, train.work_pool_name) == (flows_pool, gpu_pool)
            assert {client.read_work_pool(p).type for p in (flows_pool, gpu_pool)} == {"process"}
        finally:
            for name in (DEPLOYMENT, trainpool.TRAIN_DEPLOYMENT):
                client.delete_deployment(client.read_deployment_by_name(name).id)
            for p in (flows_pool, gpu_pool):
                client.delete_work_pool(p)


def _wait_online(client, pool: str, worker, log) -> float:
    from prefect.client.schemas.filters import WorkerFilter, WorkerFilterStatus
    started = time.monotonic()
    while time.monotonic() - started < _WORKER_ONLINE_S:
        if client.read_workers_for_work_pool(pool, worker_filter=WorkerFilter(
                status=WorkerFilterStatus(any_=["ONLINE"]))):
            return time.monotonic() - started
        assert worker.poll() is None, f"the worker exited ({worker.returncode}):\n{_tail(log)}"
        time.sleep(0.5)
    pytest.fail(f"no worker ONLINE in pool {pool} after {_WORKER_ONLINE_S} s:\n{_tail(log)}")


def _tail(path, lines: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


@pytest.mark.slow
def test_a_worker_runs_the_triggered_and_the_scheduled_retraining_run(
        make_project, prefect_api, studio_env, tmp_path, capsys):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (ArtifactFilter, ArtifactFilterKey,
                                                DeploymentFilter, DeploymentFilterId,
                                                FlowRunFilter, FlowRunFilterId)
    from prefect.deployments import run_deployment
    project = make_project(limit=200, eval_tasks=40, unlabeled_tasks=5)
    pool = f"labelgate-test-{uuid.uuid4().hex[:8]}"
    # every minute: the first cron run comes due while the test runs (a real cron entry)
    root = make_workspace(tmp_path / "ws", **{
        "studio.project_title": project["title"], "schedule.pool": pool,
        "schedule.cron": "* * * * *", "train.epochs": 4, "review.epochs": 2,
        "review.folds": 2, "validate.min_per_class": 3, "gate.min_accuracy": 0.5})
    assert cli.main(["--root", str(root), "pull"]) == 0
    assert cli.main(["--root", str(root), "evalset", "freeze"]) == 0
    capsys.readouterr()
    assert cli.main(["--root", str(root), "deploy"]) == 0     # pool from schedule.pool
    out = capsys.readouterr().out
    assert f"prefect worker start --pool {pool}" in out and "(process pool, created now;" in out
    log = tmp_path / "worker.log"
    client = get_client(sync_client=True)
    client.__enter__()
    dep = client.read_deployment_by_name(DEPLOYMENT)
    try:
        assert client.read_work_pool(pool).type == "process"
        assert (dep.work_pool_name, dep.entrypoint) == (pool, "pipelines.flows.retrain")
        assert dep.parameters == {"root": str(Layout(root).root)}
        assert dep.job_variables == {"env": workpool.RUN_ENV}
        assert dep.pull_steps == [{"prefect.deployments.steps.set_working_directory": {
            "directory": str(Layout(root).root)}}]
        # a worker as a user starts it: its own process and folder, no source copy (the flow
        # is imported from installed labelgate); the Prefect and Label Studio variables of
        # this test's environment are the user's shell
        started = time.monotonic()
        with open(log, "wb") as sink:
            worker = subprocess.Popen([str(prefect_bin()), "worker", "start", "--pool", pool],
                                      cwd=tmp_path, env=dict(os.environ), stdout=sink,
                                      stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                      start_new_session=True)
        try:
            online = _wait_online(client, pool, worker, log)
            triggered = run_deployment(DEPLOYMENT, timeout=0)
            # `serve`'s label trigger meanwhile: a run is due or running, so it starts none
            said = []
            assert workpool.start_run(DEPLOYMENT, say=said.append) is None
            assert "no second run started" in said[0]
            runs = _wait_for_both(client, dep.id, triggered.id, worker, log, DeploymentFilter,
                                  DeploymentFilterId)
        finally:
            stop_group(worker.pid, timeout_s=20)
        ran = {r.id: r for r in runs}
        manual = [r.id for r in client.read_flow_runs(deployment_filter=DeploymentFilter(
            id=DeploymentFilterId(any_=[dep.id]))) if not r.auto_scheduled]
        assert manual == [triggered.id]
        assert "Downloading flow code" not in log.read_text()   # no copy of the worker's cwd
        for r in runs:
            assert r.state.type.value == "COMPLETED", (r.name, r.state, _tail(log))
            assert r.work_pool_name == pool
            # picked up by the worker: the worker's process ran it, not this one
            assert r.infrastructure_pid, r
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["gate-report"])),
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=list(ran))))
        # the run that came first trained and reported; the other found nothing new (no-op)
        assert len(artifacts) == 1, artifacts
        assert artifacts[0].description.startswith("gate verdict ")
        assert artifacts[0].data == Layout(root).report.read_text()
        summary = read_json(Layout(root).last_run)
        assert summary["status"] == "done" and summary["verdict"] in ("PASS", "FAIL",
                                                                        "INCONCLUSIVE")
        first = min(runs, key=lambda r: r.start_time)
        pickup = (first.start_time - first.expected_start_time).total_seconds()
        second = max(runs, key=lambda r: r.start_time)
        print(f"\nworker ONLINE after {online:.1f} s; first run "
              f"({'cron' if first.auto_scheduled else 'triggered'}) started {pickup:.1f} s "
              f"after it was due, ran {first.total_run_time.total_seconds():.1f} s; the "
              f"no-op run {second.total_run_time.total_seconds():.1f} s; both done "
              f"{time.monotonic() - started:.0f} s after the worker started; load "
              f"{os.getloadavg()[0]:.1f}")
    finally:
        client.delete_deployment(dep.id)     # its cron runs with it: nothing left scheduled
        client.delete_work_pool(pool)
        client.__exit__(None, None, None)


def _wait_for_both(client, deployment_id, triggered_id, worker, log, DeploymentFilter,
                   DeploymentFilterId) -> list:
    """The triggered run and the first cron run, once both are final."""
    deadline = time.monotonic() + _RUN_TIMEOUT_S
    while time.monotonic() < deadline:
        runs = client.read_flow_runs(deployment_filter=DeploymentFilter(
            id=DeploymentFilterId(any_=[deployment_id])))
        mine = [r for r in runs if r.id == triggered_id]
        cron = sorted((r for r in runs if r.auto_scheduled and r.state.is_final()),
                      key=lambda r: r.expected_start_time)
        if mine and mine[0].state.is_final() and cron:
            return [mine[0], cron[0]]
        assert worker.poll() is None, f"the worker exited ({worker.returncode}):\n{_tail(log)}"
        time.sleep(2)
    states = {r.name: (r.auto_scheduled, r.state.name) for r in runs}
    pytest.fail(f"runs not done after {_RUN_TIMEOUT_S} s: {states}\n{_tail(log)}")


@pytest.mark.slow
def test_serve_with_a_pool_registers_it_and_only_triggers(make_project, prefect_api,
                                                          studio_env, tmp_path):
    """`labelgate serve` with schedule.pool: the deployment goes on the pool, the worker
    command is printed, and the label trigger starts exactly one run on the pool (nothing runs
    it here: no worker; a later check sees it due and starts no second one)."""
    import signal
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    project = make_project(limit=30, eval_tasks=5, unlabeled_tasks=0)
    pool = f"labelgate-test-{uuid.uuid4().hex[:8]}"
    root = make_workspace(tmp_path / "ws", **{
        "studio.project_title": project["title"], "schedule.pool": pool,
        "schedule.min_new_labels": 1, "schedule.check_every_s": 1})
    out = tmp_path / "serve.log"
    labelgate = os.path.join(os.path.dirname(prefect_bin()), "labelgate")
    with open(out, "wb") as sink:
        serve = subprocess.Popen([labelgate, "--root", str(root), "serve"], stdout=sink,
                                 stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 env={**os.environ, "PYTHONUNBUFFERED": "1"})
    client = get_client(sync_client=True)
    client.__enter__()
    try:
        deadline = time.monotonic() + 180
        while "no second run started" not in out.read_text():
            assert serve.poll() is None, f"serve exited ({serve.returncode}):\n{_tail(out)}"
            assert time.monotonic() < deadline, _tail(out)
            time.sleep(1)
        serve.send_signal(signal.SIGINT)             # Ctrl-C
        assert serve.wait(timeout=60) == 0, _tail(out)
        text = out.read_text()
        assert f"prefect worker start --pool {pool}" in text
        assert f"triggering labelgate-retrain on work pool '{pool}'" in text
        dep = client.read_deployment_by_name(DEPLOYMENT)
        assert dep.work_pool_name == pool
        runs = [r for r in client.read_flow_runs(deployment_filter=DeploymentFilter(
            id=DeploymentFilterId(any_=[dep.id]))) if not r.auto_scheduled]
        assert len(runs) == 1 and runs[0].state.is_scheduled(), runs  # waits for a worker
        assert runs[0].work_pool_name == pool
    finally:
        if serve.poll() is None:
            serve.kill()
            serve.wait()
        try:
            client.delete_deployment(client.read_deployment_by_name(DEPLOYMENT).id)
            client.delete_work_pool(pool)
        finally:
            client.__exit__(None, None, None)
