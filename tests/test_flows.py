"""The whole loop: real Label Studio, Prefect's test harness, a real git + DVC repo, CPU training.

One workspace goes through a user's life in order: pull + freeze the eval set (CLI), first
retraining run (promotes, pre-annotates), a run with nothing new (no-op), `dvc repro` with
Label Studio down (same verdict, same model bytes), new labels (retrains, gates vs production),
one run at a time.
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time

import pytest

from pipelines import cli, registry, review
from pipelines.files import exclusive, read_json
from pipelines.labelstudio import choice_result
from pipelines.layout import Layout
from tests.conftest import free_port, make_workspace


@pytest.fixture(scope="module")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness
    with prefect_test_harness():
        yield


@pytest.fixture(scope="module")
def world(make_project, label_studio, prefect_harness, tmp_path_factory):
    project = make_project(limit=500, eval_tasks=100, unlabeled_tasks=15)
    root = make_workspace(tmp_path_factory.mktemp("ws"), **{
        "studio.project_title": project["title"], "train.epochs": 10,
        "validate.min_per_class": 5})
    env = {"LABEL_STUDIO_URL": label_studio["conn"].url,
           "LABEL_STUDIO_API_KEY": label_studio["conn"].api_key}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield {"root": root, "layout": Layout(root), "project": project}
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _retrain(root, **kw) -> dict:
    from pipelines.flows import retrain
    return retrain(root=str(root), **kw)


def test_first_run_pulls_validates_trains_and_promotes(world):
    root, layout, project = world["root"], world["layout"], world["project"]
    assert cli.main(["--root", str(root), "pull"]) == 0
    assert cli.main(["--root", str(root), "evalset", "freeze"]) == 0
    assert (root / "data" / "raw.dvc").exists() and (root / "data" / "eval.dvc").exists()
    eval_meta = read_json(layout.eval / "meta.json")
    assert eval_meta["n"] == 100

    summary = _retrain(root)
    assert summary["status"] == "done"
    v = summary["validate"]
    # nothing annotators did is lost: every exported task is accepted or quarantined
    assert v["accepted"] + v["quarantined"] == v["tasks"]
    assert v["quarantine_reasons"]["label"] == 1          # the stale class name "seven"
    assert v["quarantine_reasons"]["bad image"] == 2      # truncated PNG, text file
    assert summary["prepare"]["excluded_eval_overlap"] == 100
    assert summary["verdict"] == "PASS", summary
    assert summary["candidate_accuracy"] >= 0.9
    assert summary["promotion"]["event"] == "promoted"
    prod = registry.production(layout.registry)
    assert prod["sha256"] == read_json(layout.decision)["candidate_sha256"]
    # pre-annotations from the production model, tagged with its registry id
    preds = [p for p in project["studio"].predictions(project["id"])
             if p["model_version"] != review.REVIEW_VERSION]
    assert summary["preannotate"]["pushed"] == len(preds) == project["counts"]["unlabeled"]
    assert {p["model_version"] for p in preds} == {prod["id"]}
    # suspected label errors went back to Label Studio as review flags
    flags = project["studio"].predictions(project["id"], model_version=review.REVIEW_VERSION)
    assert summary["review"]["flagged"] == len(flags) == summary["review"]["suspects"] > 0
    report = layout.report.read_text()
    assert report.startswith("# Gate verdict: **PASS**")


def test_run_with_nothing_new_does_not_retrain(world):
    layout = world["layout"]
    before = layout.candidate_model.stat().st_mtime_ns
    summary = _retrain(world["root"])
    assert summary["status"] == "no-op" and "not retraining" in summary["reason"]
    assert layout.candidate_model.stat().st_mtime_ns == before
    # pre-annotations are not pushed twice
    project = world["project"]
    prod = registry.production(layout.registry)["id"]
    assert len(project["studio"].predictions(project["id"], model_version=prod)) == \
        project["counts"]["unlabeled"]


def test_dvc_repro_offline_reaches_the_same_verdict(world):
    layout = world["layout"]
    decision = read_json(layout.decision)
    env = dict(os.environ, LABEL_STUDIO_URL=f"http://127.0.0.1:{free_port()}",
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    proc = subprocess.run([sys.executable, "-m", "dvc", "repro", "--force"], cwd=world["root"],
                          env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    again = read_json(layout.decision)
    assert again["verdict"] == decision["verdict"]
    # deterministic CPU training: the very same weights, byte for byte
    assert again["candidate_sha256"] == decision["candidate_sha256"]
    assert again["candidate_accuracy"] == decision["candidate_accuracy"]


def test_new_labels_retrain_and_gate_against_production(world):
    project, layout = world["project"], world["layout"]
    st = project["studio"]
    first_prod = registry.production(layout.registry)
    # an annotator labels five of the pre-annotated tasks
    unlabeled = st.unlabeled_tasks(project["id"])[:5]
    user = st.check()
    for task in unlabeled:
        st.import_tasks(project["id"], [{"data": task["data"], "annotations": [
            {"result": choice_result("1"), "completed_by": user, "ground_truth": False}]}])
    summary = _retrain(world["root"])
    assert summary["status"] == "done"
    assert summary["pull"]["changed"] == 5
    assert summary["dataset_version"] != first_prod["dataset_version"]
    decision = read_json(layout.decision)
    # judged against production on the same eval images
    assert decision["production_id"] == first_prod["id"]
    names = [t["name"] for t in decision["tests"]]
    assert "accuracy vs production" in names and any(n.startswith("recall of class") for n in names)
    ledger = registry.ledger(layout.registry)
    assert [e["event"] for e in ledger].count("candidate") == 2


def test_one_run_at_a_time(world):
    layout = world["layout"]
    with exclusive(layout.run_lock):  # a run is in progress (another process in real life)
        summary = _retrain(world["root"])
    assert summary["status"] == "skipped" and "in progress" in summary["reason"]


def test_unreachable_label_studio_fails_clearly_and_writes_nothing(world, monkeypatch, capsys):
    layout = world["layout"]
    before = sorted(p.name for p in (layout.raw / "pulls").iterdir())
    url = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("LABEL_STUDIO_URL", url)
    assert cli.main(["--root", str(world["root"]), "pull"]) == 2
    err = capsys.readouterr().err
    assert url in err and "running" in err
    assert sorted(p.name for p in (layout.raw / "pulls").iterdir()) == before


def test_wrong_token_fails_clearly(world, monkeypatch, capsys):
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", "not-the-key")
    assert cli.main(["--root", str(world["root"]), "pull"]) == 2
    err = capsys.readouterr().err
    assert "LABEL_STUDIO_API_KEY" in err and "not-the-key" not in err


def test_cli_status_predict_and_rollback(world, capsys, tmp_path):
    root, layout = str(world["root"]), world["layout"]
    assert cli.main(["--root", root, "status"]) == 0
    out = capsys.readouterr().out
    prod = registry.production(layout.registry)
    assert prod["id"] in out
    # predict with the same preprocessing as training: eval images, known labels
    rows = [json.loads(l) for l in (layout.eval / "manifest.jsonl").read_text().splitlines()][:20]
    import tarfile
    paths = []
    with tarfile.open(layout.eval / "images.tar") as tar:
        for r in rows:
            p = tmp_path / f"{r['task_id']}.png"
            p.write_bytes(tar.extractfile(r["image_sha256"]).read())
            paths.append(str(p))
    (tmp_path / "junk.png").write_bytes(b"not an image")
    assert cli.main(["--root", root, "predict", *paths, str(tmp_path / "junk.png")]) == 1
    captured = capsys.readouterr()
    predicted = [line.split("\t")[1] for line in captured.out.splitlines()]
    assert len(predicted) == 20 and "junk.png" in captured.err
    correct = sum(p == r["label"] for p, r in zip(predicted, rows))
    assert correct >= 16  # production is ~95 % accurate on these
    # rollback is refused when there is nothing earlier, or goes back one model
    previous = prod.get("previous")
    rc = cli.main(["--root", root, "rollback", "--reason", "test"])
    if previous:
        assert rc == 0 and registry.production(layout.registry)["id"] == previous
    else:
        assert rc == 2 and registry.production(layout.registry)["id"] == prod["id"]


def test_installed_entry_point_help():
    exe = os.path.join(os.path.dirname(sys.executable), "labelgate")
    out = subprocess.run([exe, "--help"], capture_output=True, text=True, check=True).stdout
    for command in ("studio", "pull", "run", "evalset", "status", "serve", "predict", "demo"):
        assert command in out


def test_invalid_params_names_the_key(world, tmp_path, capsys):
    from tests.conftest import write_params
    ws = tmp_path / "ws"
    ws.mkdir()
    write_params(ws / "params.yaml", **{"train.epochs": "ten"})
    assert cli.main(["--root", str(ws), "status"]) == 2
    assert "train.epochs" in capsys.readouterr().err


def test_serve_deployment_uses_the_cron_from_params(world):
    from pipelines.flows import deployment
    from pipelines.settings import load
    params = load(world["layout"].params)
    dep = deployment(str(world["root"]), params.schedule.cron)
    assert dep.name == "labelgate-retrain"
    assert [s.schedule.cron for s in dep.schedules] == [params.schedule.cron]
    assert dep.parameters == {"root": str(world["layout"].root)}
    assert dep.concurrency_limit == 1                   # Prefect queues a second run


def test_cli_studio_status_without_server(tmp_path, capsys):
    from tests.conftest import write_params
    write_params(tmp_path / "params.yaml")
    assert cli.main(["--root", str(tmp_path), "studio", "status"]) == 0
    assert "not running" in capsys.readouterr().out


def test_flow_does_not_retry_a_refused_key(world, monkeypatch):
    from prefect import flow

    from pipelines import flows
    from pipelines.labelstudio import AuthError
    attempts = []
    real = flows._studio

    def counting(layout, params):
        attempts.append(1)
        return real(layout, params)
    monkeypatch.setattr(flows, "_studio", counting)
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", "revoked-key")

    @flow
    def just_pull(root: str):
        return flows.pull_task.with_options(retry_delay_seconds=0)(root)
    with pytest.raises(AuthError):
        just_pull(str(world["root"]))
    assert len(attempts) == 1  # retries=2, but a refused key is not transient
    # a server that is down is transient: all three attempts are made
    attempts.clear()
    monkeypatch.setenv("LABEL_STUDIO_URL", f"http://127.0.0.1:{free_port()}")
    with pytest.raises(flows.LabelStudioError):
        just_pull(str(world["root"]))
    assert len(attempts) == 3


# -- triggers -------------------------------------------------------------------------------------

def _annotate(world, n: int, *, skip_first: bool = False) -> None:
    """Annotators label `n` unlabeled tasks (the first one skipped, when asked)."""
    import httpx
    st, pid = world["project"]["studio"], world["project"]["id"]
    api = httpx.Client(base_url=st.conn.url, timeout=30,
                       headers={"Authorization": f"Token {st.conn.api_key}"})
    for i, task in enumerate(st.unlabeled_tasks(pid)[:n]):
        skipped = skip_first and i == 0
        api.post(f"/api/tasks/{task['id']}/annotations/", json={
            "result": [] if skipped else choice_result("4"),
            "was_cancelled": skipped}).raise_for_status()


def test_label_trigger_fires_once_for_a_burst(world):
    import threading
    from pipelines import trigger
    from pipelines.settings import load
    layout = world["layout"]
    params = dataclasses.replace(load(layout.params), schedule=dataclasses.replace(
        load(layout.params).schedule, min_new_labels=3, check_every_s=1))
    st = world["project"]["studio"]
    pid = world["project"]["id"]
    first = trigger.check(layout, params, st, pid)
    assert first["new_resolved_labels"] == 0 and not first["fire"]
    _annotate(world, 4, skip_first=True)          # a burst: 3 labels and a skip
    runs, stop = [], threading.Event()

    def start_run():
        runs.append(_retrain(world["root"]))      # the real flow, synchronously
    watcher = threading.Thread(target=trigger.watch, kwargs=dict(
        layout=layout, params=params, studio=st, project_id=pid, start_run=start_run,
        stop=stop, log=lambda msg: None))
    watcher.start()
    deadline = time.monotonic() + 240
    while not runs and time.monotonic() < deadline:
        time.sleep(0.5)
    time.sleep(3)                                   # three more checks after the run
    stop.set()
    watcher.join(timeout=60)
    assert len(runs) == 1 and runs[0]["status"] == "done"
    assert runs[0]["prepare"]["train"] > 0
    after = trigger.check(layout, params, st, pid)
    assert after["new_resolved_labels"] == 0 and not after["fire"]


def test_ten_simultaneous_triggers_produce_exactly_one_run(world):
    """New labels, then ten triggers at once: one run does the work; the others are skipped
    while it holds the lock (or, arriving after it ended, find nothing new: a no-op)."""
    import threading
    from concurrent.futures import ThreadPoolExecutor
    _annotate(world, 2)
    before = len(registry.ledger(world["layout"].registry))
    gate = threading.Barrier(10)

    def trigger(_):
        gate.wait()
        return _retrain(world["root"])
    with ThreadPoolExecutor(max_workers=10) as pool:
        results = list(pool.map(trigger, range(10)))
    statuses = [r["status"] for r in results]
    assert statuses.count("done") == 1, statuses
    assert statuses.count("skipped") >= 1 and set(statuses) <= {"done", "skipped", "no-op"}
    assert all("in progress" in r["reason"] for r in results if r["status"] == "skipped")
    done = next(r for r in results if r["status"] == "done")
    assert done["pull"]["changed"] == 2
    # one candidate at most was judged (none if its bytes equal production's)
    assert len(registry.ledger(world["layout"].registry)) - before <= 2
