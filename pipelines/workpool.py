"""Prefect work pools: `labelgate deploy` and `labelgate serve` with `schedule.pool` set.

One machine runs the Prefect server; workers on any machine (`prefect worker start --pool
NAME`) execute labelgate's deployments. `register` creates the process work pool if it is
missing and registers the retraining deployment on it (cron `schedule.cron`, one run at a
time, parameter `root` = this workspace's absolute path) and, when `train.pool` is set, the
training deployment on that pool. Deployments name their flow by module path
(`pipelines.flows.retrain`), so a worker needs labelgate installed, not a copy of the source.

What a retraining worker needs: this workspace (a git + DVC repository) at the same path, as
runs start there (the deployment's pull step sets it as the working directory), the Label
Studio variables (LABEL_STUDIO_URL, LABEL_STUDIO_API_KEY), storage credentials if images live
in a bucket, and PREFECT_API_URL. Secrets stay in the worker's environment, never in a
deployment. The training pool's workers need no workspace (pipelines/trainpool.py).
"""
from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path

from pipelines.prefect_server import PrefectServerError
from pipelines.process import QUIET_ENV
from pipelines.settings import Params

POOL_TYPE = "process"  # a worker runs each flow run as a child process on its own machine

# Added to every pooled flow run's environment: what `labelgate` sets for its own commands
# and a bare `prefect worker start` does not.
RUN_ENV = dict(QUIET_ENV)


class WorkPoolError(PrefectServerError):
    """A pool or deployment could not be set up; the message says what to do."""


@dataclass(frozen=True)
class Registered:
    name: str           # flow/deployment, e.g. "labelgate-retrain/labelgate-retrain"
    id: str             # the deployment's id on the Prefect server
    pool: str
    pool_created: bool  # True if this call created the pool
    pool_type: str      # "process" unless the user made the pool themselves


def ensure_pool(name: str) -> tuple[bool, str]:
    """Create the work pool `name` (type process, Prefect's default job template) unless it
    exists; return (created, its type). Any existing pool is kept as it is: a user's own
    docker or kubernetes pool works too when its image has labelgate installed (and, for
    the retraining flow, the workspace mounted at the same path)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
    from prefect.workers.process import ProcessWorker
    with get_client(sync_client=True) as client:
        try:
            return False, client.read_work_pool(name).type
        except ObjectNotFound:
            pass
        try:
            client.create_work_pool(WorkPoolCreate(
                name=name, type=POOL_TYPE,
                base_job_template=ProcessWorker.get_default_base_job_template()))
        except ObjectAlreadyExists:  # made by another `labelgate deploy` meanwhile
            return False, client.read_work_pool(name).type
    return True, POOL_TYPE


def _apply(dep, pool: str) -> Registered:
    created, kind = ensure_pool(pool)
    try:
        deployment_id = dep.apply(work_pool_name=pool)
    except Exception as exc:  # the API's own errors vary (HTTP, validation): name the step
        raise WorkPoolError(f"registering deployment {dep.flow_name}/{dep.name} on work pool "
                            f"{pool!r} failed: {exc}") from exc
    return Registered(name=f"{dep.flow_name}/{dep.name}", id=str(deployment_id), pool=pool,
                      pool_created=created, pool_type=kind)


def pool_name(params: Params, pool: str = "") -> str:
    """`pool`, else params.yaml `schedule.pool`; WorkPoolError if neither names one."""
    if not (pool or params.schedule.pool):
        raise WorkPoolError("no work pool: pass --pool NAME or set schedule.pool in "
                            "params.yaml (e.g. labelgate-cpu)")
    return pool or params.schedule.pool


def register(root: str | Path, params: Params, *, pool: str = "") -> list[Registered]:
    """Register labelgate's deployments on their pools (created if missing): the retraining
    flow on `pool` (default: params.yaml `schedule.pool`), the training job on `train.pool`
    when set."""
    from pipelines.flows import deployment
    pool = pool_name(params, pool)
    done = [_apply(deployment(str(root), params.schedule.cron, pool=pool, env=RUN_ENV), pool)]
    if params.train.pool:  # the train stage hands training to this pool (trainpool.py)
        from pipelines import trainpool
        done.append(_apply(trainpool.deployment(params.train.pool), params.train.pool))
    return done


def worker_command(pool: str, api_url: str) -> str:
    """The shell line that starts a worker for `pool` against the server at `api_url`."""
    return (f"PREFECT_API_URL={shlex.quote(api_url)} prefect worker start --pool "
            f"{shlex.quote(pool)}")


def describe(done: list[Registered], *, api_url: str, root: str | Path) -> str:
    """What `labelgate deploy` / `serve` print: what was registered and how to start workers."""
    lines = [f"deployment {r.name} on work pool {r.pool!r} ({r.pool_type} pool, "
             f"{'created now' if r.pool_created else 'existing'}; deployment id {r.id})"
             for r in done]
    lines.append("start a worker per pool, on a machine with labelgate installed and "
                 "LABEL_STUDIO_URL / LABEL_STUDIO_API_KEY (and storage credentials) set; the "
                 f"retraining pool's workers need this workspace at {Path(root).resolve()}:")
    lines += [f"  {worker_command(pool, api_url)}"
              for pool in dict.fromkeys(r.pool for r in done)]
    if "://127.0.0.1" in api_url or "://localhost" in api_url:
        lines.append("(this Prefect server listens on this machine only: for workers "
                     "elsewhere run one they can reach and set PREFECT_API_URL to it)")
    return "\n".join(lines)


def start_run(deployment_name: str, *, say=print) -> str | None:
    """Start one run of `deployment_name` (the label trigger's action), unless one is already
    due, waiting for its slot, running or paused for a reviewer: a burst of labels is one run,
    not a queue of them (cron runs still in the future do not count). The new run's id, or
    None."""
    import datetime

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (FlowRunFilter, FlowRunFilterDeploymentId,
                                                FlowRunFilterState, FlowRunFilterStateType)
    from prefect.deployments import run_deployment
    now = datetime.datetime.now(datetime.timezone.utc)
    with get_client(sync_client=True) as client:
        dep = client.read_deployment_by_name(deployment_name)
        active = [r for r in client.read_flow_runs(flow_run_filter=FlowRunFilter(
            deployment_id=FlowRunFilterDeploymentId(any_=[dep.id]),
            state=FlowRunFilterState(type=FlowRunFilterStateType(
                any_=["SCHEDULED", "PENDING", "RUNNING", "PAUSED"]))))
            if r.state.type.value != "SCHEDULED" or r.expected_start_time <= now]
    if active:
        say(f"a {deployment_name} run is already {active[0].state.name.lower()} "
            f"({active[0].name}): no second run started")
        return None
    return str(run_deployment(deployment_name, timeout=0).id)
