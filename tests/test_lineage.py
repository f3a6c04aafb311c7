"""Every candidate restorable: labelgate commits the DVC metadata a run changed, pushes data and
model to a DVC remote, names both in the ledger, and `labelgate checkout MODEL_ID` puts the
candidate's raw data, eval set and model file back, byte for byte.

The quick tests use a toy workspace (real git, real DVC, a one-line `train` stage); the slow one
builds two candidates with the real flow against the session's Label Studio and Prefect server.
"""
from __future__ import annotations

import hashlib
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from pipelines import cli, codestamp, dvcrepo, gate, lineage, promote, registry
from pipelines.files import sha256_file
from pipelines.labelconfig import choice_result
from pipelines.layout import Layout
from tests import factories
from tests.conftest import make_workspace, write_params

TOY_DVC_YAML = """\
stages:
  train:
    cmd: >-
      mkdir -p models/candidate && cat data/raw/* data/eval/* > models/candidate/model.safetensors
      && echo '{"n": 1}' > models/candidate/metrics.json
    deps: [data/raw, data/eval]
    outs: [models/candidate/model.safetensors]
    metrics:
      - models/candidate/metrics.json:
          cache: false
"""


def _git(root: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=root, check=True, capture_output=True,
                          text=True).stdout


def _toy(root: Path, *, git: bool = True) -> Layout:
    """A workspace with user code staged (never labelgate's to commit) and DVC set up."""
    root.mkdir(parents=True)
    (root / "dvc.yaml").write_text(TOY_DVC_YAML)
    write_params(root / "params.yaml")
    (root / "code.py").write_text("print('the user is editing this')\n")
    for folder in ("raw", "eval"):
        (root / "data" / folder).mkdir(parents=True)
        (root / "data" / folder / "0").write_text(f"{folder} 0\n")
    if git:
        _git(root, "init", "-q")
        _git(root, "add", "code.py", "dvc.yaml")
    layout = Layout(root)
    dvcrepo.ensure_repo(root)
    dvcrepo.add(root, layout.raw)
    dvcrepo.add(root, layout.eval)
    return layout


def _candidate(layout: Layout, *, push: str = "auto") -> tuple[dict, dict]:
    """What a flow run does after the stages: train, lineage, gate, promote (the real gate on
    a made-up evaluation at 50% accuracy: FAIL; the candidate line is written either way).
    Returns (ledger event, lineage dict)."""
    dvcrepo.repro_stage(layout.root, "train")
    rec, _ = lineage.record(layout, commit_enabled=True, push_mode=push, message="candidate")
    truth = np.arange(200) % 10
    ev, rows = factories.evaluation(truth, np.where(truth % 2 == 0, truth, (truth + 1) % 10),
                                    cand_sha=sha256_file(layout.candidate_model))
    folder = factories.write_evaluation(layout.evaluation.parent, ev, rows)
    gate.run(folder, layout.decision.parent, params=factories.params())
    event = promote.run(layout.candidate_model, layout.decision, layout.registry,
                        dataset_version="pulls-x", params_hash="p" * 64,
                        code=promote.code_version(layout.root), lineage=rec.as_dict())
    return event, rec.as_dict()


def _add_raw(layout: Layout, name: str) -> None:
    (layout.raw / name).write_text(f"raw {name}\n")
    dvcrepo.add(layout.root, layout.raw)


def _tree(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder`, by relative path: equal dicts = equal bytes."""
    return {p.relative_to(folder).as_posix(): sha256_file(p)
            for p in sorted(folder.rglob("*")) if p.is_file()}


# -- commit ---------------------------------------------------------------------------------------

def test_the_commit_holds_the_dvc_metadata_and_nothing_of_the_users(tmp_path):
    layout = _toy(tmp_path / "ws")
    event, lin = _candidate(layout)
    root = layout.root
    committed = set(_git(root, "show", "--name-only", "--format=", lin["commit"]).split())
    assert committed == {"dvc.lock", "data/raw.dvc", "data/eval.dvc", "data/.gitignore",
                         "models/candidate/.gitignore", "models/candidate/metrics.json",
                         ".dvc/config", ".dvc/.gitignore", ".dvcignore"}
    # the user's staged code stays staged, uncommitted
    assert _git(root, "status", "--porcelain", "--", "code.py", "dvc.yaml").splitlines() == [
        "A  code.py", "A  dvc.yaml"]
    # the ledger names that commit; its dvc.lock and .dvc files are the ones recorded
    line = registry.candidates(layout.registry)[event["id"]]
    assert line["lineage"] == lin and lin["commit"] == _git(root, "rev-parse", "HEAD").strip()
    lock = subprocess.run(["git", "show", f"{lin['commit']}:dvc.lock"], cwd=root,
                          capture_output=True, check=True).stdout
    assert hashlib.sha256(lock).hexdigest() == lin["dvc_lock"]
    assert lin["model"]["md5"] == hashlib.md5(layout.candidate_model.read_bytes()).hexdigest()
    assert lin["model"]["md5"] in lock.decode()
    for folder in ("raw", "eval"):
        dvc_file = _git(root, "show", f"{lin['commit']}:data/{folder}.dvc")
        assert lin["data"][f"data/{folder}"] in dvc_file
    # nothing changed since: a second record commits nothing and names the same commit
    again, _ = lineage.record(layout, commit_enabled=True, push_mode="never", message="again")
    assert again.commit == lin["commit"]


def test_without_a_git_identity_the_commit_is_labelgates_and_git_config_is_untouched(
        tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    for var in ("GIT_AUTHOR_NAME", "GIT_AUTHOR_EMAIL", "GIT_COMMITTER_NAME",
                "GIT_COMMITTER_EMAIL", "EMAIL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", str(home / ".gitconfig"))
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    layout = _toy(tmp_path / "ws")
    dvcrepo.repro_stage(layout.root, "train")
    rec, _ = lineage.record(layout, commit_enabled=True, push_mode="never", message="m")
    assert any("no user.name or user.email configured" in n for n in rec.notes), rec.notes
    author = _git(layout.root, "log", "-1", "--format=%an <%ae>|%cn <%ce>").strip()
    assert author == "labelgate <labelgate@localhost>|labelgate <labelgate@localhost>"
    assert not (home / ".gitconfig").exists()
    assert "user." not in (layout.root / ".git" / "config").read_text()


def test_a_workspace_outside_git_is_named_and_its_candidates_refuse_checkout(tmp_path):
    layout = _toy(tmp_path / "ws", git=False)
    event, lin = _candidate(layout)
    assert lin["commit"] is None
    assert any("is not a git repository" in n and "git init" in n for n in lin["notes"])
    with pytest.raises(lineage.LineageError, match="cannot be restored: no git commit"):
        lineage.checkout(layout, event["id"])


def test_remote_credentials_in_dvc_config_are_never_committed(tmp_path):
    layout = _toy(tmp_path / "ws")
    # an HTTP remote with its password in the shared config (not config.local); never pushed to
    dvcrepo.dvc(layout.root, "remote", "add", "-d", "store", "https://dvc.example.invalid/x")
    dvcrepo.dvc(layout.root, "remote", "modify", "store", "password", "hunter2")
    _, lin = _candidate(layout, push="never")
    committed = _git(layout.root, "show", "--name-only", "--format=", lin["commit"]).split()
    assert ".dvc/config" not in committed and "dvc.lock" in committed
    assert "hunter2" not in _git(layout.root, "log", "-p", "--all")
    assert any(".dvc/config holds remote credentials" in n for n in lin["notes"])


def test_push_always_without_a_remote_is_an_error_that_says_what_to_do(tmp_path):
    layout = _toy(tmp_path / "ws")
    dvcrepo.repro_stage(layout.root, "train")
    with pytest.raises(lineage.LineageError, match="dvc remote add -d"):
        lineage.record(layout, commit_enabled=True, push_mode="always", message="m")


# -- checkout -------------------------------------------------------------------------------------

@pytest.mark.slow
def test_checkout_puts_back_an_earlier_candidate_and_then_the_later_one(tmp_path):
    layout = _toy(tmp_path / "ws")
    first, _ = _candidate(layout)
    raw1, model1 = _tree(layout.raw), layout.candidate_model.read_bytes()
    _add_raw(layout, "1")
    second, _ = _candidate(layout)
    assert _tree(layout.raw) != raw1 and layout.candidate_model.read_bytes() != model1
    raw2, model2 = _tree(layout.raw), layout.candidate_model.read_bytes()
    restored = lineage.checkout(layout, first["id"])
    assert restored.fetched_from is None and restored.registry_blob == "present"
    assert _tree(layout.raw) == raw1 and layout.candidate_model.read_bytes() == model1
    lineage.checkout(layout, second["id"])  # the restored state is git's: nothing to refuse
    assert _tree(layout.raw) == raw2 and layout.candidate_model.read_bytes() == model2


def test_checkout_refuses_to_overwrite_uncommitted_work_and_changes_nothing(tmp_path):
    layout = _toy(tmp_path / "ws")
    first, _ = _candidate(layout)
    _add_raw(layout, "1")
    _candidate(layout)
    # a hand edit of dvc.lock that git has never seen
    lock = layout.dvc_lock.read_bytes()
    layout.dvc_lock.write_bytes(lock + b"# mine\n")
    with pytest.raises(lineage.LineageError, match=r"would overwrite changes .*dvc\.lock"):
        lineage.checkout(layout, first["id"])
    assert layout.dvc_lock.read_bytes() == lock + b"# mine\n"
    layout.dvc_lock.write_bytes(lock)
    # new raw data DVC has not cached
    raw = _tree(layout.raw)
    (layout.raw / "unsaved").write_text("not added\n")
    with pytest.raises(lineage.LineageError, match=r"data/raw \(modified"):
        lineage.checkout(layout, first["id"])
    assert _tree(layout.raw) == {**raw, "unsaved": sha256_file(layout.raw / "unsaved")}
    with pytest.raises(lineage.LineageError, match="no candidate 'm9999'"):
        lineage.checkout(layout, "m9999")


@pytest.mark.slow
def test_checkout_fetches_from_the_remote_when_the_cache_and_the_blob_are_gone(tmp_path):
    layout = _toy(tmp_path / "ws")
    dvcrepo.dvc(layout.root, "remote", "add", "-d", "store", str(tmp_path / "remote"))
    first, lin = _candidate(layout)
    assert lin["remote"] == "store"
    raw1, eval1, model1 = _tree(layout.raw), _tree(layout.eval), layout.candidate_model.read_bytes()
    _add_raw(layout, "1")
    _candidate(layout)
    shutil.rmtree(layout.root / ".dvc" / "cache")
    registry.blob_path(layout.registry, first["sha256"]).unlink()
    restored = lineage.checkout(layout, first["id"])
    assert restored.fetched_from == "store" and restored.registry_blob == "restored"
    assert _tree(layout.raw) == raw1 and _tree(layout.eval) == eval1
    assert layout.candidate_model.read_bytes() == model1
    assert sha256_file(registry.blob_path(layout.registry, first["sha256"])) == first["sha256"]


def test_checkout_without_cache_or_remote_says_so_and_leaves_the_workspace(tmp_path):
    layout = _toy(tmp_path / "ws")
    first, _ = _candidate(layout)
    _add_raw(layout, "1")
    _candidate(layout)
    raw, lock = _tree(layout.raw), layout.dvc_lock.read_bytes()
    shutil.rmtree(layout.root / ".dvc" / "cache")
    with pytest.raises(lineage.LineageError, match="not in the local DVC cache and no DVC "
                       "remote") as err:
        lineage.checkout(layout, first["id"])
    assert "the workspace is as it was" in str(err.value)
    assert _tree(layout.raw) == raw and layout.dvc_lock.read_bytes() == lock


# -- the real thing -------------------------------------------------------------------------------

def _label(project, n: int, label: str) -> list[int]:
    """Annotators label `n` of the project's unlabeled tasks as `label`."""
    st, pid = project["studio"], project["id"]
    api = httpx.Client(base_url=st.conn.url, timeout=30,
                       headers={"Authorization": f"Token {st.conn.api_key}"})
    ids = [t["id"] for t in st.unlabeled_tasks(pid)[:n]]
    for task_id in ids:
        api.post(f"/api/tasks/{task_id}/annotations/",
                 json={"result": choice_result(label)}).raise_for_status()
    assert len(ids) == n
    return ids


@pytest.mark.slow
def test_two_real_candidates_and_checkout_of_the_first_from_the_remote(
        make_project, label_studio, prefect_api, tmp_path, monkeypatch, capsys):
    from pipelines.flows import retrain
    for k, v in {"LABEL_STUDIO_URL": label_studio["conn"].url,
                 "LABEL_STUDIO_API_KEY": label_studio["conn"].api_key}.items():
        monkeypatch.setenv(k, v)
    project = make_project(limit=200, eval_tasks=40, unlabeled_tasks=30)
    root = make_workspace(tmp_path / "ws", **{
        "studio.project_title": project["title"], "train.epochs": 3, "review.epochs": 1,
        "review.folds": 2, "validate.min_per_class": 3, "gate.min_accuracy": 0.5})
    layout = Layout(root)
    assert cli.main(["--root", str(root), "pull"]) == 0
    assert cli.main(["--root", str(root), "evalset", "freeze"]) == 0
    remote = tmp_path / "dvc-remote"
    dvcrepo.dvc(root, "remote", "add", "-d", "backup", str(remote))

    first = retrain(root=str(root))
    assert first["status"] == "done", first
    one = {"raw": _tree(layout.raw), "eval": _tree(layout.eval),
           "model": sha256_file(layout.candidate_model)}
    # annotators keep working: the label data changes, the second run builds another candidate
    _label(project, 20, "7")
    second = retrain(root=str(root))
    assert second["status"] == "done" and second["pull"]["snapshot"] is not None, second
    assert _tree(layout.raw) != one["raw"]
    assert sha256_file(layout.candidate_model) != one["model"]
    with capsys.disabled():
        print(f"\nlineage step, seconds (commit; push to a local folder remote): first run "
              f"{first['lineage']['seconds']}, second run {second['lineage']['seconds']}")

    ids = [e["id"] for e in registry.ledger(layout.registry) if e.get("event") == "candidate"]
    assert len(ids) == 2
    cands = registry.candidates(layout.registry)
    for cand, run in zip((cands[i] for i in ids), (first, second)):
        lin = cand["lineage"]
        assert lin["remote"] == "backup" and lin["commit"] == run["lineage"]["commit"]
        # the code: labelgate's version + the train stamp's hash; then the workspace's commit
        stamp = (root / ".labelgate" / "code" / "train.sha256").read_bytes()
        assert cand["code_version"].startswith(
            f"labelgate {codestamp.version()} train-code {hashlib.sha256(stamp).hexdigest()[:12]}")
        assert f"; git {lin['commit']}" in cand["code_version"]
        lock = subprocess.run(["git", "show", f"{lin['commit']}:dvc.lock"], cwd=root,
                              capture_output=True, check=True).stdout
        assert hashlib.sha256(lock).hexdigest() == lin["dvc_lock"]
        assert lin["model"]["md5"] in lock.decode()
    # the user's code was never committed
    tracked = _git(root, "ls-files").split()
    assert not [p for p in tracked if p.startswith(("pipelines/", "validation/"))]
    assert "dvc.yaml" not in tracked and "params.yaml" not in tracked

    # this machine's DVC cache and the registry's copy of the first model are lost
    shutil.rmtree(root / ".dvc" / "cache")
    registry.blob_path(layout.registry, cands[ids[0]]["sha256"]).unlink()
    capsys.readouterr()
    started = time.monotonic()
    assert cli.main(["--root", str(root), "checkout", ids[0]]) == 0
    seconds = time.monotonic() - started
    out = capsys.readouterr().out
    with capsys.disabled():
        print(f"labelgate checkout from the remote (cache and registry blob gone): {seconds:.1f} s")
    assert f"restored {ids[0]}" in out and "fetched from DVC remote 'backup'" in out, out
    assert f"`labelgate checkout {ids[1]}` returns to the latest candidate" in out, out
    assert _tree(layout.raw) == one["raw"]
    assert _tree(layout.eval) == one["eval"]
    assert sha256_file(layout.candidate_model) == one["model"] == cands[ids[0]]["sha256"]
    assert sha256_file(registry.blob_path(layout.registry, one["model"])) == one["model"]
