"""The whole loop: a real Label Studio, real Prefect servers, a real git + DVC repo, CPU training.

No test depends on another having run, or on the order they run in:
- `trained` (one per module) is a workspace after a user's first day — pull, freeze the eval
  set, `labelgate run` as its own process on a user's own Label Studio with no Prefect
  configured (so it starts the workspace's embedded Prefect server). Tests only read it.
- `copy` is that workspace copied for one test, which may change it (never its Label Studio
  project: the copy shares it).
- `fresh_world` builds a new Label Studio project and workspace through a first run, for a
  test that changes what is in Label Studio (new labels, a rollback's suggestions).
In-process flow runs report to the suite's Prefect server (conftest `prefect_api`).
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time

import httpx
import pytest

from pipelines import cli, prefect_server, registry, review
from pipelines.files import exclusive, read_json
from pipelines.labelconfig import choice_result
from pipelines.layout import Layout
from tests.conftest import free_port, make_workspace, write_params

LABELGATE = os.path.join(os.path.dirname(sys.executable), "labelgate")


def _studio_env(label_studio) -> dict[str, str]:
    return {"LABEL_STUDIO_URL": label_studio["conn"].url,
            "LABEL_STUDIO_API_KEY": label_studio["conn"].api_key}


def _user_env(label_studio) -> dict[str, str]:
    """A user's shell: their own Label Studio, nothing about Prefect (labelgate runs its own)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "PREFECT_HOME")}
    return {**env, **_studio_env(label_studio)}


def _labelgate(root, *args, env, timeout=900) -> subprocess.CompletedProcess:
    return subprocess.run([LABELGATE, "--root", str(root), *args], env=env, capture_output=True,
                          text=True, timeout=timeout)


def _retrain(root, **kw) -> dict:
    from pipelines.flows import retrain
    return retrain(root=str(root), **kw)


def _flow_runs(api_url: str, flow_name: str = "labelgate-retrain") -> list[dict]:
    return httpx.post(f"{api_url}/flow_runs/filter", timeout=30, json={
        "flows": {"name": {"any_": [flow_name]}}, "sort": "START_TIME_ASC"}
    ).raise_for_status().json()


@pytest.fixture(scope="module")
def trained(make_project, label_studio, prefect_api, tmp_path_factory):
    project = make_project(limit=500, eval_tasks=100, unlabeled_tasks=15)
    root = make_workspace(tmp_path_factory.mktemp("ws"), **{
        "studio.project_title": project["title"], "train.epochs": 10,
        "validate.min_per_class": 5})
    layout = Layout(root)
    with pytest.MonkeyPatch.context() as mp:
        for k, v in _studio_env(label_studio).items():
            mp.setenv(k, v)
        assert cli.main(["--root", str(root), "pull"]) == 0
        assert cli.main(["--root", str(root), "evalset", "freeze"]) == 0
    assert not (layout.state / "prefect").exists()
    started = time.monotonic()
    proc = _labelgate(root, "run", env=_user_env(label_studio))
    seconds = time.monotonic() - started
    assert proc.returncode == 0, proc.stdout + proc.stderr
    print(f"\nfirst `labelgate run` (embedded Prefect server started): {seconds:.1f} s")
    yield {"root": root, "layout": layout, "project": project, "run": proc,
           "summary": read_json(layout.last_run), "prefect_home": layout.state / "prefect"}
    prefect_server.down(layout.state / "prefect")


@pytest.fixture
def copy(trained, tmp_path, label_studio, monkeypatch):
    """The trained workspace, copied for one test (without its Prefect server's state: the copy
    runs its own when it needs one). Label Studio variables set for in-process commands."""
    root = tmp_path / "ws"
    shutil.copytree(trained["root"], root, symlinks=True,
                    ignore=lambda d, names: ["prefect"] if d.endswith(".labelgate") else [])
    for k, v in _studio_env(label_studio).items():
        monkeypatch.setenv(k, v)
    yield {**trained, "root": root, "layout": Layout(root)}
    prefect_server.down(Layout(root).state / "prefect")


@pytest.fixture
def fresh_world(make_project, label_studio, prefect_api, tmp_path, monkeypatch):
    """Factory: a new Label Studio project and workspace after its first run (in this process,
    against the suite's Prefect server). Small and quick; a low accuracy floor so the first
    candidate is promoted."""
    for k, v in _studio_env(label_studio).items():
        monkeypatch.setenv(k, v)

    def make(**overrides) -> dict:
        project = make_project(limit=200, eval_tasks=40, unlabeled_tasks=15)
        root = make_workspace(tmp_path / "ws", **{
            "studio.project_title": project["title"], "train.epochs": 4, "review.epochs": 2,
            "review.folds": 2, "validate.min_per_class": 3, "gate.min_accuracy": 0.5,
            **overrides})
        assert cli.main(["--root", str(root), "pull"]) == 0
        assert cli.main(["--root", str(root), "evalset", "freeze"]) == 0
        first = _retrain(root)
        assert first["status"] == "done" and first["promotion"]["event"] == "promoted", first
        return {"root": root, "layout": Layout(root), "project": project, "first": first}
    return make


def _annotate(world, n: int, *, label: str = "4", skip_first: bool = False) -> list[int]:
    """Annotators label `n` unlabeled tasks (the first one skipped, when asked)."""
    st, pid = world["project"]["studio"], world["project"]["id"]
    api = httpx.Client(base_url=st.conn.url, timeout=30,
                       headers={"Authorization": f"Token {st.conn.api_key}"})
    ids = []
    for i, task in enumerate(st.unlabeled_tasks(pid)[:n]):
        skipped = skip_first and i == 0
        api.post(f"/api/tasks/{task['id']}/annotations/", json={
            "result": [] if skipped else choice_result(label),
            "was_cancelled": skipped}).raise_for_status()
        ids.append(task["id"])
    assert len(ids) == n
    return ids


# -- a user's first run -------------------------------------------------------------------------

@pytest.mark.slow
def test_first_run_pulls_validates_trains_and_promotes(trained):
    layout, project, summary = trained["layout"], trained["project"], trained["summary"]
    assert read_json(layout.eval / "meta.json")["n"] == 100
    assert (trained["root"] / "data" / "raw.dvc").exists()
    assert (trained["root"] / "data" / "eval.dvc").exists()
    assert summary["status"] == "done"
    v = summary["validate"]
    # nothing annotators did is lost: every exported task is accepted or quarantined
    assert v["accepted"] + v["quarantined"] == v["tasks"]
    assert v["quarantine_reasons"]["label"] == 1          # the stale class name "seven"
    assert v["quarantine_reasons"]["bad image"] == 1      # truncated PNG
    assert v["quarantine_reasons"]["image unavailable"] == 1  # text file: refused at the pull
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
    assert layout.report.read_text().startswith("# Gate verdict: **PASS**")
    out = trained["run"].stdout
    assert f"gate verdict     PASS -> promoted {prod['id']}" in out


@pytest.mark.slow
def test_run_on_a_users_label_studio_starts_and_keeps_the_embedded_prefect_server(trained):
    """No embedded Label Studio, no Prefect settings: the state folder and the server were made
    by `labelgate run`, and the server outlived it with the run, its task runs and the report."""
    from tests.test_prefect_server import ui_shows
    home = trained["prefect_home"]
    assert not trained["layout"].studio.exists()          # a user's own Label Studio
    s = prefect_server.status(home)
    assert s.running and (home / "prefect.db").exists()
    assert "starting the Prefect server at" in trained["run"].stderr
    runs = _flow_runs(s.api_url)
    assert [r["state_type"] for r in runs] == ["COMPLETED"]
    ui = prefect_server.ui_url(s.api_url)
    assert f"Prefect run      {ui}/runs/flow-run/{runs[0]['id']}" in trained["run"].stdout
    tasks = httpx.post(f"{s.api_url}/task_runs/filter", timeout=30, json={
        "flow_runs": {"id": {"any_": [runs[0]["id"]]}}}).raise_for_status().json()
    names = {t["name"] for t in tasks}
    assert {"train", "evaluate", "gate"} <= names, names  # one task run per dvc.yaml stage
    assert any(n.startswith("pull") for n in names) and any(n.startswith("promote") for n in names)
    ui_shows(ui, s.api_url, "labelgate-retrain", report_text="Gate verdict")


@pytest.mark.slow
def test_run_with_nothing_new_does_not_retrain(copy):
    layout, project = copy["layout"], copy["project"]
    before = layout.candidate_model.stat().st_mtime_ns
    summary = _retrain(copy["root"])
    assert summary["status"] == "no-op" and "not retraining" in summary["reason"]
    assert layout.candidate_model.stat().st_mtime_ns == before
    # pre-annotations are not pushed twice
    prod = registry.production(layout.registry)["id"]
    assert len(project["studio"].predictions(project["id"], model_version=prod)) == \
        project["counts"]["unlabeled"]


@pytest.mark.slow
def test_dvc_repro_offline_reaches_the_same_verdict(copy):
    layout = copy["layout"]
    decision = read_json(layout.decision)
    env = dict(os.environ, LABEL_STUDIO_URL=f"http://127.0.0.1:{free_port()}",
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    proc = subprocess.run([sys.executable, "-m", "dvc", "repro", "--force"], cwd=copy["root"],
                          env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    again = read_json(layout.decision)
    assert again["verdict"] == decision["verdict"]
    # deterministic CPU training: the very same weights, byte for byte
    assert again["candidate_sha256"] == decision["candidate_sha256"]
    assert again["candidate_accuracy"] == decision["candidate_accuracy"]


@pytest.mark.slow
def test_one_run_at_a_time(copy):
    with exclusive(copy["layout"].run_lock):  # a run is in progress (another process in real life)
        summary = _retrain(copy["root"])
    assert summary["status"] == "skipped" and "in progress" in summary["reason"]


@pytest.mark.slow
def test_prefect_server_killed_mid_run_is_started_again_by_the_next_run(copy, label_studio):
    """The embedded server dies (SIGKILL) while `labelgate run --force` trains: that run fails;
    the next `labelgate run` starts the server again and finishes."""
    root, home = copy["root"], copy["layout"].state / "prefect"
    env = _user_env(label_studio)
    run = subprocess.Popen([LABELGATE, "--root", str(root), "run", "--force"], env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 400
        while time.monotonic() < deadline:
            s = prefect_server.status(home)
            if s.running and [r["state_type"] for r in _flow_runs(s.api_url)] == ["RUNNING"]:
                break
            assert run.poll() is None, run.communicate()
            time.sleep(0.5)
        else:
            pytest.fail("the forced run never showed as RUNNING on the embedded server")
        os.killpg(s.pid, signal.SIGKILL)
        killed = time.monotonic()
        out, err = run.communicate(timeout=600)
    finally:
        if run.poll() is None:
            run.kill()
    print(f"\nthe run without its server ended after {time.monotonic() - killed:.0f} s "
          f"(exit {run.returncode})")
    assert run.returncode != 0, out + err
    assert not prefect_server.status(home).running
    started = time.monotonic()
    again = _labelgate(root, "run", env=env)
    print(f"the next run (server started again): {time.monotonic() - started:.0f} s")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "starting the Prefect server at" in again.stderr
    s2 = prefect_server.status(home)
    assert s2.running and s2.pid != s.pid
    assert [r["state_type"] for r in _flow_runs(s2.api_url)][-1] == "COMPLETED"
    assert "Prefect run      " in again.stdout


@pytest.mark.slow
def test_unreachable_label_studio_fails_clearly_and_writes_nothing(copy, monkeypatch, capsys):
    layout = copy["layout"]
    before = sorted(p.name for p in (layout.raw / "pulls").iterdir())
    url = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("LABEL_STUDIO_URL", url)
    assert cli.main(["--root", str(copy["root"]), "pull"]) == 2
    err = capsys.readouterr().err
    assert url in err and "running" in err
    assert sorted(p.name for p in (layout.raw / "pulls").iterdir()) == before


@pytest.mark.slow
def test_wrong_token_fails_clearly(copy, monkeypatch, capsys):
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", "not-the-key")
    assert cli.main(["--root", str(copy["root"]), "pull"]) == 2
    err = capsys.readouterr().err
    assert "LABEL_STUDIO_API_KEY" in err and "not-the-key" not in err


@pytest.mark.slow
def test_cli_status_and_predict(trained, capsys, tmp_path):
    root, layout = str(trained["root"]), trained["layout"]
    assert cli.main(["--root", root, "status"]) == 0
    prod = registry.production(layout.registry)
    assert prod["id"] in capsys.readouterr().out
    # predict with the same preprocessing as training: eval images, known labels
    rows = [json.loads(l) for l in (layout.eval / "manifest.jsonl").read_text().splitlines()][:20]
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


@pytest.mark.slow
def test_rollback_with_no_earlier_model_is_refused(copy, capsys):
    layout = copy["layout"]
    prod = registry.production(layout.registry)
    assert prod["previous"] is None                 # the first production model
    assert cli.main(["--root", str(copy["root"]), "rollback", "--reason", "test"]) == 2
    assert f"{prod['id']} has no previous production model" in capsys.readouterr().err
    assert registry.production(layout.registry) == prod


# gate margins no candidate can exceed: the second model is promoted whatever its accuracy
LENIENT_GATE = {"gate.max_accuracy_drop": 1.0, "gate.max_class_recall_drop": 1.0,
                "gate.max_class_precision_drop": 1.0, "gate.max_ece_increase": 1.0}


@pytest.mark.slow
def test_rollback_goes_back_to_the_previous_model(fresh_world, capsys):
    world = fresh_world(**LENIENT_GATE)
    layout = world["layout"]
    first = registry.production(layout.registry)
    _annotate(world, 5)
    second = _retrain(world["root"])
    assert second["promotion"]["event"] == "promoted", second
    assert registry.production(layout.registry)["previous"] == first["id"]
    assert cli.main(["--root", str(world["root"]), "rollback", "--reason", "test"]) == 0
    assert f"production is now {first['id']} (was {second['promotion']['id']})" in \
        capsys.readouterr().out
    now = registry.production(layout.registry)
    assert now["id"] == first["id"] and now["sha256"] == first["sha256"]


@pytest.mark.slow
def test_new_labels_retrain_and_gate_against_production(fresh_world):
    world = fresh_world(**{"gate.calibration_seeds": 2})
    project, layout = world["project"], world["layout"]
    st = project["studio"]
    first_prod = registry.production(layout.registry)
    # the first promotion measured this project's seed noise, once
    assert len(world["first"]["calibration"]["seeds"]) == 2, world["first"]["calibration"]
    noise_file = layout.registry / "noise.json"
    assert noise_file.exists()
    # an annotator labels five of the pre-annotated tasks
    user = st.check()
    for task in st.unlabeled_tasks(project["id"])[:5]:
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
    # ... and the second candidate was judged with it (no recalibration: same eval set, recipe)
    assert read_json(layout.evaluation)["seed_noise"]["seeds"]
    assert summary["calibration"] is None


# -- commands that need no trained workspace ---------------------------------------------------

def test_installed_entry_point_help():
    out = subprocess.run([LABELGATE, "--help"], capture_output=True, text=True, check=True).stdout
    for command in ("studio", "prefect", "pull", "run", "evalset", "status", "serve", "predict",
                    "demo"):
        assert command in out


def test_invalid_params_names_the_key(tmp_path, capsys):
    write_params(tmp_path / "params.yaml", **{"train.epochs": "ten"})
    assert cli.main(["--root", str(tmp_path), "status"]) == 2
    assert "train.epochs" in capsys.readouterr().err


def test_serve_deployment_uses_the_cron_from_params(tmp_path):
    from pipelines.flows import deployment
    from pipelines.settings import load
    write_params(tmp_path / "params.yaml", **{"schedule.cron": "15 4 * * 1"})
    params = load(tmp_path / "params.yaml")
    dep = deployment(str(tmp_path), params.schedule.cron)
    assert dep.name == "labelgate-retrain"
    assert [s.schedule.cron for s in dep.schedules] == ["15 4 * * 1"]
    assert dep.parameters == {"root": str(Layout(tmp_path).root)}
    # no Prefect concurrency limit: a paused (ask_reviewer) run loses its lease and is
    # cancelled with one; the run lock and workpool.start_run keep one run at a time
    assert dep.concurrency_limit is None


def test_cli_studio_status_without_server(tmp_path, capsys):
    write_params(tmp_path / "params.yaml")
    assert cli.main(["--root", str(tmp_path), "studio", "status"]) == 0
    assert "not running" in capsys.readouterr().out


@pytest.mark.slow
def test_flow_does_not_retry_a_refused_key(copy, monkeypatch):
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
        just_pull(str(copy["root"]))
    assert len(attempts) == 1  # retries=2, but a refused key is not transient


@pytest.mark.slow
def test_flow_retries_a_label_studio_that_is_down(copy, monkeypatch):
    from prefect import flow

    from pipelines import flows
    attempts = []
    real = flows._studio

    def counting(layout, params):
        attempts.append(1)
        return real(layout, params)
    monkeypatch.setattr(flows, "_studio", counting)
    monkeypatch.setenv("LABEL_STUDIO_URL", f"http://127.0.0.1:{free_port()}")

    @flow
    def just_pull(root: str):
        return flows.pull_task.with_options(retry_delay_seconds=0)(root)
    with pytest.raises(flows.LabelStudioError):
        just_pull(str(copy["root"]))
    assert len(attempts) == 3  # a server that is down is transient: all three attempts


# -- triggers -------------------------------------------------------------------------------------

@pytest.mark.slow
def test_label_trigger_fires_once_for_a_burst(fresh_world):
    import threading
    from pipelines import trigger
    from pipelines.settings import load
    world = fresh_world()
    layout = world["layout"]
    loaded = load(layout.params)
    params = dataclasses.replace(loaded, schedule=dataclasses.replace(
        loaded.schedule, min_new_labels=3, check_every_s=1))
    st, pid = world["project"]["studio"], world["project"]["id"]
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


@pytest.mark.slow
def test_ten_simultaneous_triggers_produce_exactly_one_run(fresh_world):
    """New labels, then ten triggers at once: one run does the work; the others are skipped
    while it holds the lock (or, arriving after it ended, find nothing new: a no-op)."""
    import threading
    from concurrent.futures import ThreadPoolExecutor
    world = fresh_world()
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
