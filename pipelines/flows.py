"""The retraining flow: Label Studio -> pull -> version -> validate -> prepare -> train ->
evaluate -> gate -> promote -> pre-annotations. One Prefect task per stage, so each is visible
and retryable in the Prefect UI; the work itself is in the stage modules (dvc.yaml runs the
same commands). Only the tasks that touch the network retry.
"""
from __future__ import annotations

import time
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from pipelines import dvcrepo, preannotate, promote, pull, rawstore, review
from pipelines.files import Busy, atomic_write_json, exclusive, read_json, read_jsonl, sha256_file
from pipelines.labelstudio import LabelStudioError, Studio
from pipelines.layout import Layout
from pipelines.settings import Params, load

STAGES = ("validate", "prepare", "review", "train", "evaluate", "gate")  # dvc.yaml, in order


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


@task(name="stage")
def stage_task(root: str, stage: str) -> str:
    out = dvcrepo.repro_stage(root, stage)
    get_run_logger().info("dvc stage %s:\n%s", stage, "\n".join(out.strip().splitlines()[-6:]))
    return out


@task(name="promote")
def promote_task(root: str, dataset_version: str) -> dict:
    layout = Layout(root)
    metrics = {**read_json(layout.candidate_metrics),
               "train_class_counts": read_json(layout.prepared / "summary.json")
               .get("train_class_counts")}
    return promote.run(layout.candidate_model, layout.decision, layout.registry,
                       dataset_version=dataset_version, params_hash=sha256_file(layout.params),
                       metrics=metrics, code=promote.code_version(layout.root))


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
                       read_jsonl(layout.prepared / "resolved.jsonl"), layout.review_ledger)


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


def _retrain(layout: Layout, *, force: bool) -> dict:
    logger = get_run_logger()
    root = str(layout.root)
    dvcrepo.ensure_repo(root)
    pulled = pull_task(root)
    version = rawstore.dataset_version(layout.raw)
    last = read_json(layout.last_run) if layout.last_run.exists() else None
    if (pulled["snapshot"] is None and not force and last
            and last.get("dataset_version") == version and last.get("status") == "done"):
        summary = {**last, "status": "no-op", "pull": pulled, "checked_at": _now(),
                   "reason": "no new or changed annotations since the last run; not retraining"}
        logger.info(summary["reason"])
        atomic_write_json(layout.last_run, {**last, "checked_at": summary["checked_at"]})
        return summary
    version = version_task(root)
    for stage in STAGES:
        stage_task(root, stage)
    decision = read_json(layout.decision)
    create_markdown_artifact(markdown=layout.report.read_text(), key="gate-report",
                             description=f"gate verdict {decision['verdict']}")
    event = promote_task(root, version)
    pre = preannotate_task(root) if event["event"] == "promoted" else None
    flags = flag_task(root)
    summary = {"status": "done", "finished_at": _now(), "dataset_version": version,
               "pull": pulled, "validate": read_json(layout.validated / "summary.json"),
               "prepare": read_json(layout.prepared / "summary.json"),
               "train": read_json(layout.candidate_metrics),
               "verdict": decision["verdict"], "candidate_accuracy": decision["candidate_accuracy"],
               "production_accuracy": decision["production_accuracy"],
               "eval_hash": decision["eval_hash"], "promotion": event, "preannotate": pre,
               "review": {**read_json(layout.review / "summary.json"), **flags},
               "report": str(layout.report_html)}
    atomic_write_json(layout.last_run, summary)
    return summary


DEPLOYMENT = "labelgate-retrain/labelgate-retrain"  # flow name / deployment name


def deployment(root: str, cron: str):
    """The retraining flow as a Prefect deployment on `cron` (params.yaml `schedule.cron`)."""
    # concurrency_limit=1: Prefect queues a second run of this deployment until the first ends
    # (the run lock then still skips one started some other way)
    return retrain.to_deployment(name="labelgate-retrain", cron=cron, concurrency_limit=1,
                                 parameters={"root": str(Layout(root).root)})


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
