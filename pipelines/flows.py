"""The retraining flow: Label Studio -> pull -> version -> the dvc.yaml stages (validate ->
prepare -> review -> train -> evaluate -> gate -> report) -> lineage (commit the DVC metadata,
push data and model to the DVC remote) -> promote -> Label Studio reconciled with production
(pre-annotations, review flags). One Prefect task per stage, so each is visible
and retryable in the Prefect UI; the work itself is in the stage modules, the stages and their
order come from dvc.yaml (pipelines/dvcrepo.stages). Only the tasks that touch the network
retry.

Whether to retrain is DVC's call: `dvc status` knows each stage's data, code and params, so a
params.yaml or code edit retrains as new labels do; nothing changed -> a no-op run (`--force`
reruns every stage anyway). Label Studio is reconciled with the production model on every run,
no-op included: production may have moved since (approve, rollback).
"""
from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from pipelines import (calibrate, dvcrepo, lineage, preannotate, promote, pull, rawstore,
                       registry, review, reviewer, trainpool)
from pipelines.files import (Busy, atomic_write_json, exclusive, read_json, read_jsonl, sha256_file,
                             utc_now)
from pipelines.labelstudio import LabelStudioError, Studio
from pipelines.layout import Layout
from pipelines.records import Decision
from pipelines.settings import Params, load

def _studio(layout: Layout, params: Params) -> Studio:
    return pull.connect(layout.studio, params)


def _transient(task, task_run, state) -> bool:
    """Retry what can pass (server down, timeout), not a refused key or a config problem."""
    exc = state.result(raise_on_failure=False)
    return isinstance(exc, LabelStudioError) and exc.transient


@task(name="pull", retries=2, retry_delay_seconds=5, retry_condition_fn=_transient)
def pull_task(root: str) -> dict:
    layout, params = Layout(root), load(Path(root) / "params.yaml")
    studio = _studio(layout, params)
    project_id = studio.require_project(params.studio.project_title)
    result = pull.run(layout.raw, studio=studio, project_id=project_id, params=params)
    get_run_logger().info(pull.describe(result))
    return result


@task(name="version")
def version_task(root: str) -> str:
    layout = Layout(root)
    dvcrepo.add(root, layout.raw)
    return rawstore.dataset_version(layout.raw)


@task(name="what changed")
def changes_task(root: str) -> dict[str, list[str]]:
    """DVC's view of what changed since each stage last ran (empty: nothing)."""
    return dvcrepo.stale(root)


@task(name="stage", task_run_name="{stage}")
def stage_task(root: str, stage: str, force: bool = False) -> str:
    out = dvcrepo.repro_stage(root, stage, force=force)
    get_run_logger().info("dvc stage %s:\n%s", stage, "\n".join(out.strip().splitlines()[-6:]))
    return "skipped" if "didn't change, skipping" in out else "ran"


def _push_failed(task, task_run, state) -> bool:
    """Retry a failed `dvc push` (a remote's network), not a git or configuration problem."""
    return isinstance(state.result(raise_on_failure=False), dvcrepo.DvcError)


@task(name="lineage", retries=2, retry_delay_seconds=5, retry_condition_fn=_push_failed)
def lineage_task(root: str, dataset_version: str) -> dict:
    """Commit the DVC metadata the stages changed and push data and model to the DVC remote,
    so the candidate promote records can be restored (`labelgate checkout`). A retry commits
    nothing new: the commit is already HEAD."""
    layout, params = Layout(root), load(Path(root) / "params.yaml")
    message = (f"labelgate run: DVC metadata of a candidate (dataset {dataset_version}, model "
               f"sha256 {sha256_file(layout.candidate_model)[:12]})")
    record, seconds = lineage.record(layout, commit_enabled=params.lineage.commit,
                                     push_mode=params.lineage.push, message=message)
    logger = get_run_logger()
    for note in record.notes:
        logger.warning(note)
    logger.info("lineage: commit %s, pushed to %s (commit %.1f s, push %.1f s)",
                (record.commit or "none")[:12], record.remote or "no remote",
                seconds["commit"], seconds["push"])
    return {**record.as_dict(), "seconds": seconds}


@task(name="promote")
def promote_task(root: str, dataset_version: str, lineage_record: dict) -> dict:
    layout = Layout(root)
    metrics = {**read_json(layout.candidate_metrics),
               "train_class_counts": read_json(layout.prepared / "summary.json")
               .get("train_class_counts")}
    return promote.run(layout.candidate_model, layout.decision, layout.registry,
                       dataset_version=dataset_version, params_hash=sha256_file(layout.params),
                       metrics=metrics, code=promote.code_version(layout.root),
                       lineage=lineage_record)


@task(name="preannotate", retries=2, retry_delay_seconds=5, retry_condition_fn=_transient)
def preannotate_task(root: str) -> dict:
    layout, params = Layout(root), load(Path(root) / "params.yaml")
    studio = _studio(layout, params)
    project_id = studio.require_project(params.studio.project_title)
    return preannotate.run(studio, project_id, layout.registry, params=params)


@task(name="flag label errors", retries=2, retry_delay_seconds=5, retry_condition_fn=_transient)
def flag_task(root: str) -> dict:
    """Suspected label errors (data/review) back to Label Studio for review; outcomes of
    earlier flags recorded in the flag ledger."""
    layout, params = Layout(root), load(Path(root) / "params.yaml")
    studio = _studio(layout, params)
    project_id = studio.require_project(params.studio.project_title)
    return review.flag(studio, project_id, read_jsonl(layout.review / "suspects.jsonl"),
                       read_jsonl(layout.prepared / "resolved.jsonl"), layout.review_ledger,
                       limit=read_json(layout.review / "summary.json")["flag_limit"])


def _remote_transient(task, task_run, state) -> bool:
    from pipelines.mirror import RemoteError
    exc = state.result(raise_on_failure=False)
    return isinstance(exc, RemoteError) and exc.transient


@task(name="publish registry", retries=2, retry_delay_seconds=5,
      retry_condition_fn=_remote_transient)
def publish_task(root: str) -> dict | None:
    """The registry (ledger, production pointer, models DVC lacks) mirrored to the DVC remote,
    so that a clone elsewhere can `labelgate checkout MODEL_ID` (pipelines/mirror.py). No
    remote configured: nothing to do."""
    import dataclasses

    from pipelines import mirror
    pub = mirror.publish(Layout(root))
    if pub:
        get_run_logger().info("registry mirrored to DVC remote %s: %d ledger lines (%d new), "
                              "production %s, %.1f s", pub.remote, pub.ledger_lines,
                              pub.appended, pub.production, pub.seconds)
    return dataclasses.asdict(pub) if pub else None


@task(name="calibrate")
def calibrate_task(root: str, eval_hash: str) -> dict | None:
    """Seed-to-seed noise of this project's recipe (models/registry/noise.json), once a
    project has a production model and again when the eval set or recipe changes: from then
    on the gate's margins are at least noise_z x that spread (pipelines/calibrate.py)."""
    layout, params = Layout(root), load(Path(root) / "params.yaml")
    if registry.production(layout.registry) is None:
        return None
    return calibrate.ensure(layout.prepared, layout.eval, layout.state / "calibration",
                            layout.registry, params=params, eval_hash=eval_hash)


@flow(name="labelgate-retrain", log_prints=True)
def retrain(root: str = ".", force: bool = False) -> dict:
    """One retraining run. Returns a summary dict (also written to .labelgate/last_run.json)."""
    layout = Layout(root)
    logger = get_run_logger()
    try:
        with exclusive(layout.run_lock):
            return _retrain(layout, force=force)
    except Busy:
        logger.warning("another retraining run is in progress (%s); this trigger is skipped",
                       layout.run_lock)
        return {"status": "skipped", "reason": "another run is in progress"}


NO_OP = ("nothing changed since the last run: no new or changed annotations, and DVC reports "
         "every stage's data, code and params.yaml section up to date; not retraining "
         "(`labelgate run --force` reruns every stage anyway)")


def _lock_hash(layout: Layout) -> str | None:
    """dvc.lock's sha256: what the stages last produced from what. A run that ended between
    the stages and promotion leaves it different from the last finished run's."""
    return sha256_file(layout.dvc_lock) if layout.dvc_lock.exists() else None


def _promote(layout: Layout, dataset_version: str, lin: dict,
             decision: Decision) -> tuple[dict, dict | None]:
    """promote, then, when the gate says INCONCLUSIVE and gate.on_inconclusive is
    ask_reviewer, the run pauses for the reviewer's answer in the Prefect UI (or `labelgate
    approve/reject`), before Label Studio follows production. (promote's event, what the
    reviewer step did or None)."""
    root = str(layout.root)
    event = promote_task(root, dataset_version,
                         {k: v for k, v in lin.items() if k != "seconds"})
    asked = reviewer.ask(layout.registry, event, decision,
                         wait_s=load(layout.params).gate.reviewer_wait_s)
    return event, asked


def _retrain(layout: Layout, *, force: bool) -> dict:
    logger = get_run_logger()
    root = str(layout.root)
    dvcrepo.ensure_repo(root)
    pulled = pull_task(root)
    last = read_json(layout.last_run) if layout.last_run.exists() else None
    changed = changes_task(root)
    if (not force and not changed and last and last.get("status") == "done"
            and last.get("dvc_lock") == _lock_hash(layout)):
        logger.info(NO_OP)
        pre = preannotate_task(root)
        checked = utc_now()
        atomic_write_json(layout.last_run, {**last, "checked_at": checked})
        return {**last, "status": "no-op", "pull": pulled, "checked_at": checked,
                "reason": NO_OP, "preannotate": pre}
    logger.info("retraining: " + ("--force" if force else "; ".join(
        f"{stage}: {', '.join(why)}" for stage, why in changed.items())
        or "the last run did not finish"))
    version = version_task(root)
    # train.pool: the train stage runs on that Prefect work pool (pipelines/trainpool.py)
    on_pool = load(layout.params).train.pool
    stages = {stage: (trainpool.stage_task if on_pool and stage == trainpool.STAGE
                      else stage_task)(root, stage, force)
              for stage in dvcrepo.stages(root)}
    decision = Decision.read(layout.decision)
    create_markdown_artifact(markdown=layout.report.read_text(), key="gate-report",
                             description=f"gate verdict {decision.verdict}")
    # before promote: the commit it names must exist, holding this candidate's dvc.lock
    lin = lineage_task(root, version)
    event, asked = _promote(layout, version, lin, decision)
    published = publish_task(root)  # after the reviewer: the ledger has the decision too
    # every run, whatever the verdict: production may have moved since the last one
    pre = preannotate_task(root)
    flags = flag_task(root)
    calibration = calibrate_task(root, decision.eval_hash)
    summary = {"status": "done", "finished_at": utc_now(), "dataset_version": version,
               "changed": changed, "stages": stages, "dvc_lock": _lock_hash(layout),
               "pull": pulled, "validate": read_json(layout.validated / "summary.json"),
               "prepare": read_json(layout.prepared / "summary.json"),
               "train": read_json(layout.candidate_metrics),
               "verdict": decision.verdict, "candidate_accuracy": decision.candidate_accuracy,
               "production_accuracy": decision.production_accuracy,
               "eval_hash": decision.eval_hash, "lineage": lin, "promotion": event,
               "reviewer": asked, "registry_mirror": published, "preannotate": pre, "calibration": calibration,
               "review": {**read_json(layout.review / "summary.json"), **flags},
               "report": str(layout.report_html)}
    atomic_write_json(layout.last_run, summary)
    return summary


DEPLOYMENT = "labelgate-retrain/labelgate-retrain"  # flow name / deployment name


def deployment(root: str, cron: str, *, pool: str = "", env: dict[str, str] | None = None):
    """The retraining flow as a Prefect deployment on `cron` (params.yaml `schedule.cron`).

    `pool` "": for `labelgate serve`, which runs it in its own process. A work pool name: run
    by that pool's workers (pipelines/workpool.py registers it), which import the flow by
    module path (`pipelines.flows.retrain`: labelgate installed, no copy of the source) and
    add `env` to their own environment (never secrets: those stay in the worker's)."""
    from prefect.runner.storage import LocalStorage
    from prefect.types.entrypoint import EntrypointType
    root = str(Layout(root).root)
    pooled = (dict(work_pool_name=pool, job_variables={"env": dict(env or {})},
                   entrypoint_type=EntrypointType.MODULE_PATH) if pool else {})
    # No Prefect concurrency limit: the server revokes a run's concurrency lease when it
    # pauses for a reviewer (gate.on_inconclusive: ask_reviewer) and the engine then cancels
    # the run at its next lease renewal (~4 min; measured with Prefect 3.8.8). One run at a
    # time is kept by the workspace's run lock (a second run is skipped and says so) and by
    # workpool.start_run (no trigger run while one is due, running or paused).
    dep = retrain.to_deployment(name="labelgate-retrain", cron=cron,
                                parameters={"root": root}, **pooled)
    if pool:
        # the pull step `set_working_directory(root)`: without one, a worker copies the folder
        # it was started in (a home directory, say) into a temporary folder for every run
        dep.storage = LocalStorage(root)
    return dep
