"""A DVC remote on the suite's S3 server (moto, tests/s3server.py): `labelgate remote add`
writes the endpoint into DVC's config and commits it, never a credential; a run's data, eval set
and model go there and the registry is mirrored beside them; a fresh clone in another folder —
no DVC cache, no registry, nothing shared but the S3 server — restores a candidate with
`dvc pull` + `labelgate checkout MODEL_ID`. An object deleted from the bucket is named by
checkout, which exits non-zero; an endpoint that does not answer is a clear error after retries.

Real git, real DVC (subprocesses, s3fs), a real S3 API; the candidate is built as
tests/test_lineage.py builds one (a one-line `train` stage, the real gate and promote), then
published as the flow does after promote.
"""
from __future__ import annotations

import hashlib
import socket
import subprocess
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from pipelines import cli, dvcrepo, gate, lineage, mirror, promote, registry
from pipelines.files import sha256_file
from pipelines.layout import Layout
from tests import factories
from tests.conftest import write_params
from tests.test_lineage import TOY_DVC_YAML


def _git(root: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=root, check=True, capture_output=True,
                          text=True).stdout


def _workspace(root: Path, *, data: bool = True, **params: object) -> Layout:
    """A workspace as `labelgate init` leaves it: dvc.yaml and params.yaml committed; `data`:
    data/raw and data/eval versioned (`dvc add`)."""
    root.mkdir(parents=True)
    (root / "dvc.yaml").write_text(TOY_DVC_YAML)
    write_params(root / "params.yaml", **params)
    (root / ".gitignore").write_text(".labelgate/\nmodels/registry/\n")
    for folder in ("raw", "eval"):
        (root / "data" / folder).mkdir(parents=True)
        (root / "data" / folder / "0").write_text(f"{folder} 0\n")
    _git(root, "init", "-q")
    dvcrepo.ensure_repo(root)
    _git(root, "add", "dvc.yaml", "params.yaml", ".gitignore", ".dvc")
    _git(root, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init")
    layout = Layout(root)
    if data:
        dvcrepo.add(root, layout.raw)
        dvcrepo.add(root, layout.eval)
    return layout


def _candidate(layout: Layout, *, right: bool) -> dict:
    """train -> lineage (commit + push) -> gate -> promote -> the registry published: what a
    run does. `right`: the made-up evaluation is all correct (PASS: production) or half."""
    dvcrepo.repro_stage(layout.root, "train")
    rec, _ = lineage.record(layout, commit_enabled=True, push_mode="auto", message="candidate")
    truth = np.arange(200) % 10
    ev, rows = factories.evaluation(
        truth, truth if right else np.where(truth % 2 == 0, truth, (truth + 1) % 10),
        cand_sha=sha256_file(layout.candidate_model))
    folder = factories.write_evaluation(layout.evaluation.parent, ev, rows)
    gate.run(folder, layout.decision.parent, params=factories.params())
    event = promote.run(layout.candidate_model, layout.decision, layout.registry,
                        dataset_version="pulls-x", params_hash="p" * 64,
                        code=promote.code_version(layout.root), lineage=rec.as_dict())
    published = mirror.publish(layout)
    assert published is not None and published.production == (
        registry.production(layout.registry) or {}).get("id")
    event["published_s"] = published.seconds   # for the figures printed below
    return event


def _tree(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): sha256_file(p)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _bucket(s3) -> str:
    name = f"h3-remote-{uuid.uuid4().hex[:12]}"
    s3.client().create_bucket(Bucket=name)
    return name


@pytest.mark.slow
def test_a_fresh_clone_restores_a_candidate_from_s3_and_names_a_missing_object(
        s3_env, tmp_path, capsys):
    s3 = s3_env
    bucket = _bucket(s3)
    layout = _workspace(tmp_path / "ws")
    root = layout.root

    # credentials in the URL are refused before anything is written
    assert cli.main(["--root", str(root), "remote", "add",
                     f"s3://AKIAX:{s3.env()['AWS_SECRET_ACCESS_KEY']}@{bucket}/ws"]) == 2
    assert "carries credentials" in capsys.readouterr().err
    assert "remote" not in (root / ".dvc" / "config").read_text()

    assert cli.main(["--root", str(root), "remote", "add", f"s3://{bucket}/ws",
                     "--endpoint", s3.endpoint]) == 0
    out = capsys.readouterr().out
    assert f"-> s3://{bucket}/ws at {s3.endpoint}; .dvc/config committed" in out, out
    committed = _git(root, "show", "HEAD:.dvc/config")
    assert f"url = s3://{bucket}/ws" in committed and f"endpointurl = {s3.endpoint}" in committed
    assert "remote = storage" in committed

    started = time.monotonic()
    first = _candidate(layout, right=True)
    first_s = time.monotonic() - started
    one = {"raw": _tree(layout.raw), "eval": _tree(layout.eval),
           "model": sha256_file(layout.candidate_model)}
    (layout.raw / "1").write_text("raw 1\n")
    dvcrepo.add(root, layout.raw)
    second = _candidate(layout, right=False)
    assert first["event"] == "promoted" and second["event"] != "promoted", (first, second)
    secret = s3.env()["AWS_SECRET_ACCESS_KEY"]
    assert secret not in _git(root, "log", "-p", "--all")

    # the bucket holds DVC's objects and the registry's bytes, one copy of each
    objects = {o["Key"]: o["Size"] for o in
               s3.client().list_objects_v2(Bucket=bucket, Prefix="ws/")["Contents"]}
    body = s3.client().get_object(Bucket=bucket, Key="ws/labelgate/registry/ledger.jsonl")
    assert body["Body"].read() == (layout.registry / registry.LEDGER).read_bytes()
    pointer = s3.client().get_object(Bucket=bucket, Key="ws/labelgate/registry/production.json")
    assert pointer["Body"].read() == (layout.registry / registry.POINTER).read_bytes()
    for event in (first, second):
        md5 = registry.candidates(layout.registry)[event["id"]]["lineage"]["model"]["md5"]
        assert f"ws/files/md5/{md5[:2]}/{md5[2:]}" in objects
    assert cli.main(["--root", str(root), "remote", "status"]) == 0
    status = capsys.readouterr().out
    assert "reachable         yes" in status and "(up to date)" in status, status
    assert "NOT on the remote" not in status and secret not in status

    # another machine: a clone of the workspace's git history, and the S3 server; nothing else
    clone = tmp_path / "elsewhere" / "ws"
    _git(tmp_path, "clone", "-q", str(root), str(clone))
    assert not (clone / ".dvc" / "cache").exists() and not (clone / "models" / "registry").exists()
    started = time.monotonic()
    dvcrepo.dvc(clone, "pull")
    pull_s = time.monotonic() - started
    started = time.monotonic()
    assert cli.main(["--root", str(clone), "checkout", first["id"]]) == 0
    checkout_s = time.monotonic() - started
    out = capsys.readouterr().out
    assert f"restored {first['id']}" in out and "read from DVC remote 'storage'" in out, out
    assert f"`labelgate checkout {second['id']}` returns to the latest candidate" in out, out
    restored = Layout(clone)
    assert _tree(restored.raw) == one["raw"] and _tree(restored.eval) == one["eval"]
    assert sha256_file(restored.candidate_model) == one["model"] == first["sha256"]
    assert not (clone / "models" / "registry").exists()  # the clone keeps no second registry
    # the clone's (empty) registry never replaces the one the workspace publishes
    with pytest.raises(mirror.RemoteError, match="another workspace publishes there"):
        mirror.publish(restored)
    assert s3.client().get_object(Bucket=bucket, Key="ws/labelgate/registry/ledger.jsonl")[
        "Body"].read() == (layout.registry / registry.LEDGER).read_bytes()
    assert not (clone / "models" / "registry").exists()
    with capsys.disabled():
        print(f"\nS3 remote (moto, 127.0.0.1): first candidate built + pushed + published "
              f"{first_s:.1f} s (of which registry publish {first['published_s']:.1f} s); "
              f"clone `dvc pull` {pull_s:.1f} s; checkout {checkout_s:.1f} s; "
              f"{len(objects)} objects, {sum(objects.values())} bytes")

    # a blob deleted from the bucket: a fresh clone's checkout names it and exits non-zero
    raw_one = hashlib.md5(b"raw 1\n").hexdigest()
    s3.client().delete_object(Bucket=bucket, Key=f"ws/files/md5/{raw_one[:2]}/{raw_one[2:]}")
    third = tmp_path / "third" / "ws"
    _git(tmp_path, "clone", "-q", str(root), str(third))
    lock_before = (third / "dvc.lock").read_bytes()
    assert cli.main(["--root", str(third), "checkout", second["id"]]) == 2
    err = capsys.readouterr().err
    assert f"lacks 1 file(s) of {second['id']}: data/raw/1 (md5 {raw_one})" in err, err
    assert "the workspace is as it was" in err
    assert (third / "dvc.lock").read_bytes() == lock_before
    # the workspace that has it puts it back (`dvc push` alone would not: the folder's listing
    # is still there, so DVC counts data/raw as pushed)
    assert cli.main(["--root", str(root), "remote", "push"]) == 0
    out = capsys.readouterr().out
    assert f"data/raw/1 (md5 {raw_one}) was missing there: uploaded again" in out, out
    assert s3.client().head_object(Bucket=bucket,
                                   Key=f"ws/files/md5/{raw_one[:2]}/{raw_one[2:]}")


def _dead_endpoint() -> str:
    with socket.socket() as s:   # a port nothing listens on: connections are refused
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


@pytest.mark.slow
def test_an_unreachable_remote_is_retried_then_a_clear_error(s3_env, tmp_path, monkeypatch,
                                                              capsys):
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")   # botocore's own retries off: ours are counted
    monkeypatch.setattr(mirror, "BACKOFF_S", 0.05)
    monkeypatch.setattr(dvcrepo, "BACKOFF_S", 0.05)
    dead = _dead_endpoint()
    layout = _workspace(tmp_path / "ws", **{"storage.endpoint_url": dead})
    started = time.monotonic()
    # no --endpoint: params.yaml storage.endpoint_url is the default
    assert cli.main(["--root", str(layout.root), "remote", "add",
                     f"s3://{_bucket(s3_env)}/x"]) == 0
    assert f"at {dead}; .dvc/config committed" in capsys.readouterr().out
    assert cli.main(["--root", str(layout.root), "remote", "status"]) == 1
    out = capsys.readouterr().out
    assert "reachable         no" in out and f"did not answer {mirror.ATTEMPTS} attempts" in out
    assert dead in out, out
    # a clone asked for a candidate: the registry mirror cannot be read -> exit 2, says why
    assert cli.main(["--root", str(layout.root), "checkout", "m0001-abcdef0123"]) == 2
    err = capsys.readouterr().err
    assert "did not answer" in err and "check the endpoint" in err, err
    # a run's push (`dvc push` in a subprocess): retried, then an error that says so
    with pytest.raises(dvcrepo.DvcError) as failed:
        lineage.push(layout, mode="auto")
    assert failed.value.transient and f"did not answer {dvcrepo.ATTEMPTS} attempts" in str(
        failed.value) and "Could not connect to the endpoint URL" in str(failed.value)
    with capsys.disabled():
        print(f"\nunreachable endpoint: status + checkout + push refused in "
              f"{time.monotonic() - started:.1f} s (3 attempts each, botocore retries off)")


def test_remote_add_refuses_what_is_not_an_s3_url_or_an_endpoint(tmp_path, capsys):
    layout = _workspace(tmp_path / "ws", data=False)
    for args, said in ((["gs://b/p"], "is not an s3://BUCKET/PREFIX URL"),
                       (["s3://b/p?access_key_id=x"], "carries credentials"),
                       (["s3://b/p", "--endpoint", "http://u:p@127.0.0.1:9"], "no user"),
                       ([], "needs the URL")):
        assert cli.main(["--root", str(layout.root), "remote", "add", *args]) == 2
        assert said in capsys.readouterr().err
    assert dvcrepo.remotes(layout.root) == ([], None)
