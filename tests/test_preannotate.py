"""Pre-annotations against the real Label Studio: the production model's suggestions with a
certainty score, the labeling stream ordered most-uncertain-first (Community "Uncertainty
sampling"), an older model's suggestions retired when production changes — and Label Studio
following the production pointer wherever it moves (rollback, approve), also across a crash
between the pointer change and the sync, and when Label Studio is down at that moment."""
from __future__ import annotations

import socket

import httpx
import pytest
import torch
import yaml

from pipelines import cli, net, preannotate, registry
from pipelines.inputspec import InputSpec
from pipelines.labelconfig import choice_result
from tests import factories, killpoints

CLASSES = tuple(str(i) for i in range(10))
DIGITS = InputSpec.legacy_gray(28)  # the demo's input: 28 x 28 gray


def make_production(reg, tmp_path, seed: int, *, arch: str = "smallcnn",
                    spec: InputSpec = DIGITS) -> str:
    """An (untrained) model made production through the registry: sha-verified like any other."""
    torch.manual_seed(seed)
    path = tmp_path / f"m{seed}.safetensors"
    net.save(net.build(arch, CLASSES, spec), path, arch=arch, classes=CLASSES, spec=spec)
    sha, _ = registry.store(reg, path)
    record = {"id": f"m{seed:04d}-{sha[:10]}", "sha256": sha, "eval_hash": "e" * 64,
              "dataset_version": "pulls-000001-x", "metrics": {}}
    registry.make_production(reg, record, via="gate",
                             previous=(registry.production(reg) or {}).get("id"))
    return record["id"]


def unlabeled_versions(st, pid) -> dict[int, list[str]]:
    """task id -> model_versions of its predictions, for every unlabeled task."""
    return {t["id"]: sorted(p["model_version"] for p in t["predictions"])
            for t in st.unlabeled_tasks(pid)}


def test_predictions_queue_and_retirement_on_a_real_label_studio(make_project, tmp_path):
    project = make_project(limit=30, eval_tasks=4, unlabeled_tasks=8)
    st, pid = project["studio"], project["id"]
    params = factories.params({"train.device": "cpu"})
    reg = tmp_path / "registry"

    first = make_production(reg, tmp_path, seed=1)
    out = preannotate.run(st, pid, reg, params=params)
    assert out == {"pushed": 8, "retired": 0, "model_version": first, "image_errors": 0}
    preds = st.predictions(pid)
    assert {p["model_version"] for p in preds} == {first} and len(preds) == 8
    first_score = {p["task"]: p["score"] for p in preds}
    # the Data Manager tab lists the unlabeled tasks most uncertain first (a listing takes no
    # task lock, unlike the labeling stream below)
    conn = st.conn
    auth = {"Authorization": f"Token {conn.api_key}"}
    views = httpx.get(f"{conn.url}/api/dm/views?project={pid}", headers=auth).json()
    view = next(v for v in views if v["data"].get("title") == preannotate.QUEUE_VIEW)
    listed = httpx.get(f"{conn.url}/api/tasks?project={pid}&view={view['id']}&fields=task_only",
                       headers=auth).json()["tasks"]
    assert [t["id"] for t in listed] == sorted(first_score, key=lambda t: (first_score[t], t))
    assert st.queue_settings(pid) == {"sampling": "Uncertainty sampling", "model_version": first}

    # someone else's suggestion on an unlabeled task is theirs: never retired
    foreign_task = listed[0]["id"]
    st.create_predictions(pid, [{"task": foreign_task, "model_version": "their-own-model",
                                 "score": 0.0, "result": choice_result("3")}])

    second = make_production(reg, tmp_path, seed=2)
    out = preannotate.run(st, pid, reg, params=params)
    assert out["pushed"] == 8 and out["retired"] == 8 and out["model_version"] == second
    preds = st.predictions(pid)
    assert {p["model_version"] for p in preds} == {second, "their-own-model"} and len(preds) == 9
    second_score = {p["task"]: p["score"] for p in preds if p["model_version"] == second}
    assert st.queue_settings(pid) == {"sampling": "Uncertainty sampling", "model_version": second}
    # The labeling stream (asked once, so no earlier task lock decides the answer) serves the
    # task the *new* model is least sure about. The two models disagree on which task that is,
    # so a stream still ranked by the first model's scores would serve another task; the
    # foreign suggestion's score 0.0 would win if the version were ignored.
    most_uncertain = min(second_score, key=lambda t: (second_score[t], t))
    assert most_uncertain != min(first_score, key=lambda t: (first_score[t], t))
    assert second_score[st.next_task_id(pid)] == second_score[most_uncertain]

    # nothing new: nothing pushed twice, nothing retired
    again = preannotate.run(st, pid, reg, params=params)
    assert again["pushed"] == 0 and again["retired"] == 0
    assert len(st.predictions(pid)) == 9


# -- Label Studio follows the pointer -------------------------------------------------------------

def workspace(tmp_path, project) -> dict:
    """A labelgate workspace on the test project, with three production models in a row
    (m1 -> m2 -> m3) and Label Studio showing m3."""
    root = tmp_path / "ws"
    root.mkdir()
    overrides = {"train.device": "cpu", "studio.project_title": project["title"]}
    (root / "params.yaml").write_text(yaml.safe_dump(factories.params_dict(overrides),
                                                     sort_keys=False))
    params = factories.params(overrides)
    reg = root / "models" / "registry"
    ids = [make_production(reg, tmp_path, seed=s) for s in (11, 12, 13)]
    st, pid = project["studio"], project["id"]
    preannotate.run(st, pid, reg, params=params)
    assert set(map(tuple, unlabeled_versions(st, pid).values())) == {(ids[2],)}
    return {"root": root, "reg": reg, "ids": ids, "st": st, "pid": pid, "params": params}


@pytest.fixture
def quiet_prefect(tmp_path, monkeypatch):
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect"))  # cli.main sets it otherwise


def test_rollback_moves_label_studio_to_the_rolled_back_model(make_project, studio_env,
                                                              quiet_prefect, tmp_path, capsys):
    project = make_project(limit=30, eval_tasks=4, unlabeled_tasks=6)
    w = workspace(tmp_path, project)
    m1, m2, m3 = w["ids"]
    assert cli.main(["--root", str(w["root"]), "rollback", "--reason", "complaints"]) == 0
    out = capsys.readouterr().out
    assert registry.production(w["reg"])["id"] == m2
    assert f"Label Studio follows {m2}: 6 unlabeled tasks" in out
    versions = unlabeled_versions(w["st"], w["pid"])
    assert len(versions) == 6 and set(map(tuple, versions.values())) == {(m2,)}
    assert w["st"].queue_settings(w["pid"])["model_version"] == m2
    # and forward again, by id
    assert cli.main(["--root", str(w["root"]), "rollback", "--to", m3, "--reason", "fixed"]) == 0
    versions = unlabeled_versions(w["st"], w["pid"])
    assert set(map(tuple, versions.values())) == {(m3,)}
    assert w["st"].queue_settings(w["pid"])["model_version"] == m3


def test_label_studio_down_during_a_rollback(make_project, label_studio, quiet_prefect,
                                             tmp_path, capsys, monkeypatch):
    project = make_project(limit=30, eval_tasks=4, unlabeled_tasks=6)
    w = workspace(tmp_path, project)
    m1, m2, m3 = w["ids"]
    with socket.socket() as s:      # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    monkeypatch.setenv("LABEL_STUDIO_URL", f"http://127.0.0.1:{closed}")
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", label_studio["conn"].api_key)
    assert cli.main(["--root", str(w["root"]), "rollback", "--reason", "complaints"]) == 0
    out = capsys.readouterr().out
    assert f"production is now {m2}" in out and "Label Studio sync pending" in out
    assert registry.production(w["reg"])["id"] == m2        # the pointer change stands
    assert registry.pending(w["reg"]) is None
    assert set(map(tuple, unlabeled_versions(w["st"], w["pid"]).values())) == {(m3,)}
    # the next run's reconcile (the flow calls it every run) makes them agree
    result = preannotate.run(w["st"], w["pid"], w["reg"], params=w["params"])
    assert result["model_version"] == m2 and result["retired"] == 6
    assert set(map(tuple, unlabeled_versions(w["st"], w["pid"]).values())) == {(m2,)}


@pytest.mark.slow  # a `labelgate` process killed mid-command, then the command again
def test_a_rollback_killed_before_its_sync_is_finished_by_its_re_run(make_project, studio_env,
                                                                      quiet_prefect, tmp_path,
                                                                      capsys):
    """Killed after the pointer moved, as it first connects to Label Studio: the pointer says m2,
    Label Studio still shows m3. Running the same command again finishes it — Label Studio
    shows m2 — and does not roll back a second time (to m1)."""
    project = make_project(limit=30, eval_tasks=4, unlabeled_tasks=6)
    w = workspace(tmp_path, project)
    m1, m2, m3 = w["ids"]
    command = ["--root", str(w["root"]), "rollback", "--reason", "complaints"]
    killed = killpoints.run("pipelines.cli", command, root=w["root"], kill_at_connect=0,
                            cwd=w["root"])
    assert killed.killed, killed.stderr[-2000:]
    assert registry.production(w["reg"])["id"] == m2
    assert registry.pending(w["reg"])["key"] == ["rollback", None]
    assert set(map(tuple, unlabeled_versions(w["st"], w["pid"]).values())) == {(m3,)}

    assert cli.main(command) == 0
    out = capsys.readouterr().out
    assert "finished an interrupted run of this command" in out
    assert registry.production(w["reg"])["id"] == m2 and registry.pending(w["reg"]) is None
    assert [e["event"] for e in registry.ledger(w["reg"])].count("rolled_back") == 1
    assert set(map(tuple, unlabeled_versions(w["st"], w["pid"]).values())) == {(m2,)}
    assert w["st"].queue_settings(w["pid"])["model_version"] == m2


def test_a_project_with_every_task_labeled_syncs_without_a_queue(make_project, tmp_path):
    """No unlabeled task: nothing to pre-annotate and no queue to order. Label Studio refuses
    (HTTP 400) an uncertainty queue for a model_version no prediction carries, which once
    failed the flow right after a PASS."""
    project = make_project(limit=20, eval_tasks=4, unlabeled_tasks=0)
    st, pid = project["studio"], project["id"]
    assert st.unlabeled_tasks(pid) == []
    reg = tmp_path / "registry"
    model_id = make_production(reg, tmp_path, seed=11)
    params = factories.params({"train.device": "cpu", "studio.project_title": project["title"]})
    result = preannotate.run(st, pid, reg, params=params)
    assert result["pushed"] == 0 and result["model_version"] == model_id, result
