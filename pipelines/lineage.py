"""Lineage: every candidate can be put back — its raw data, its eval set and its model file.

After the dvc.yaml stages ran and before promotion, `record` commits the DVC metadata the run
changed (dvc.lock, data/raw.dvc, data/eval.dvc, the .gitignore files DVC writes beside cached
outputs, the uncached metrics dvc.lock hashes, DVC's own config files — never code, params.yaml
or dvc.yaml) and, when a DVC remote is configured, pushes data/raw, data/eval and the model
there. The candidate's ledger line carries what it returns (`Lineage`): the commit, dvc.lock's
sha256, DVC's md5 of each data folder and of the model. `checkout` runs it backwards.

Model blobs: the candidate model is an output of a dvc.yaml stage (`train`), so DVC already
caches its bytes under the md5 dvc.lock records, and pushing that stage puts them in the remote.
The registry's blob (models/registry/blobs/<sha256>.safetensors) is a second copy of the same
bytes, named by sha256. So nothing more is `dvc add`ed: `checkout` brings the model back from
the cache or the remote, checks it against the ledger's sha256, and puts a lost registry blob
back from it. The ledger and the production pointer stay outside git and DVC: they are the
history that approve/reject/rollback append to between runs, not a version of anything. With
a remote, they are mirrored beside DVC's objects (pipelines/mirror.py): `checkout` in a fresh
clone, whose registry is empty, reads the candidate's line from there.
"""
from __future__ import annotations

import dataclasses
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from pipelines import dvcrepo, gitrepo
from pipelines.files import sha256_bytes
from pipelines.layout import Layout

# Options of .dvc/config that carry credentials: such a config is never committed by labelgate.
SECRET = re.compile(r"^\s*(password|secret_access_key|session_token|access_key_id|"
                     r"client_secret|gdrive_client_secret|account_key|sas_token|"
                     r"connection_string|token|key_secret)\s*=", re.M | re.I)


class LineageError(RuntimeError):
    pass


@dataclass(frozen=True)
class Lineage:
    """What a candidate was built from, as its ledger line records it."""
    commit: str | None      # git commit whose tree holds this dvc.lock and these .dvc files
    dvc_lock: str           # sha256 of dvc.lock's bytes
    data: dict[str, str]    # {"data/raw": md5, "data/eval": md5}: each .dvc file's outs md5
    model: dict[str, str]   # {"path", "stage", "md5"}: the model as dvc.lock records it
    remote: str | None      # DVC remote data and model were pushed to (None: not pushed)
    notes: tuple[str, ...] = ()  # why there is no commit or no push, when so

    def as_dict(self) -> dict:
        return {**dataclasses.asdict(self), "notes": list(self.notes)}


# -- commit -------------------------------------------------------------------------------------

def _metadata(layout: Layout) -> list[str]:
    """Workspace-relative paths of the DVC metadata labelgate commits, those that exist."""
    root = layout.root
    dvc_files = [rel(layout, layout.raw) + ".dvc", rel(layout, layout.eval) + ".dvc"]
    cached: list[str] = [p[:-len(".dvc")] for p in dvc_files]
    uncached: list[str] = []
    for stage in dvcrepo.graph(root).values():
        cached += [p for p in stage["outs"] if p not in stage["uncached"]]
        uncached += stage["uncached"]
    ignores = sorted({os.path.join(os.path.dirname(p), ".gitignore") for p in cached})
    paths = ["dvc.lock", *dvc_files, *ignores, *uncached, ".dvcignore", ".dvc/.gitignore",
             ".dvc/config"]
    return [p for p in dict.fromkeys(os.path.normpath(p) for p in paths)
            if (root / p).is_file()]


def commit(layout: Layout, *, message: str) -> tuple[str | None, list[str]]:
    """Commit the DVC metadata that changed (see the module docstring) and only that: the
    user's other staged or unstaged changes stay as they were. Returns (the commit whose tree
    holds the workspace's dvc.lock — HEAD when nothing changed — or None when the workspace
    is not a git repository, notes for the log)."""
    root = layout.root
    if not gitrepo.in_git(root):
        return None, [f"{root} is not a git repository: this candidate's DVC metadata is not "
                      "committed, so `labelgate checkout` cannot restore it (`git init` the "
                      "workspace; labelgate then commits dvc.lock and data/*.dvc after each run)"]
    if not layout.dvc_lock.exists():
        raise LineageError("no dvc.lock: the dvc.yaml stages have not run")
    notes = []
    paths = _metadata(layout)
    config = root / ".dvc" / "config"
    if ".dvc/config" in paths and SECRET.search(config.read_text(errors="replace")):
        paths.remove(".dvc/config")
        notes.append(".dvc/config holds remote credentials: not committed (keep them in "
                     ".dvc/config.local: `dvc remote modify --local REMOTE OPTION VALUE`)")
    skipped = gitrepo.ignored(root, paths)
    needed = {"dvc.lock", rel(layout, layout.raw) + ".dvc", rel(layout, layout.eval) + ".dvc"}
    if skipped & needed:
        raise LineageError(f"git ignores {', '.join(sorted(skipped & needed))}: labelgate cannot "
                           "commit the candidate's DVC metadata (remove the .gitignore rule, or "
                           "set lineage.commit: false)")
    rev, note = gitrepo.commit_only(root, [p for p in paths if p not in skipped], message)
    if note:
        notes.append(note)
    if gitrepo.show(root, rev, "dvc.lock") != layout.dvc_lock.read_bytes():
        raise LineageError(f"commit {rev[:12]} does not hold the workspace's dvc.lock")
    return rev, notes


def rel(layout: Layout, path: Path) -> str:
    return path.relative_to(layout.root).as_posix()


# -- hashes ---------------------------------------------------------------------------------------

def model_stage(layout: Layout) -> str:
    model = rel(layout, layout.candidate_model)
    for name, stage in dvcrepo.graph(layout.root).items():
        if model in stage["outs"] and model not in stage["uncached"]:
            return name
    raise LineageError(f"no dvc.yaml stage caches {model}: the model cannot be versioned")


def _yaml(text: bytes, what: str) -> dict:
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise LineageError(f"{what} is not valid YAML: {str(exc)[:200]}") from None
    if not isinstance(doc, dict):
        raise LineageError(f"{what} is not a DVC metadata file")
    return doc


def dvc_md5(text: bytes, what: str) -> str:
    outs = _yaml(text, what).get("outs") or [{}]
    return str(outs[0].get("md5"))


def lock_md5(text: bytes, stage: str, path: str, what: str) -> str:
    outs = ((_yaml(text, what).get("stages") or {}).get(stage) or {}).get("outs") or []
    found = next((o.get("md5") for o in outs if os.path.normpath(o.get("path", "")) == path),
                 None)
    if not found:
        raise LineageError(f"{what} records no {path} for stage {stage!r}")
    return str(found)


def hashes(layout: Layout) -> dict:
    """{"dvc_lock", "data", "model"}: the workspace's DVC metadata, as a Lineage holds it."""
    stage = model_stage(layout)
    model = rel(layout, layout.candidate_model)
    lock = layout.dvc_lock.read_bytes()
    return {"dvc_lock": sha256_bytes(lock),
            "data": {rel(layout, d): dvc_md5(Path(f"{d}.dvc").read_bytes(),
                                               f"{rel(layout, d)}.dvc")
                     for d in (layout.raw, layout.eval)},
            "model": {"path": model, "stage": stage,
                      "md5": lock_md5(lock, stage, model, "dvc.lock")}}


# -- push -----------------------------------------------------------------------------------------

def remote_name(layout: Layout, *, seen: tuple[list[str], str | None] | None = None
                ) -> str | None:
    """The DVC remote labelgate pushes to and fetches from: the default one, or the only one.
    `seen`: dvcrepo.remotes' answer when the caller has it already."""
    names, default = seen or dvcrepo.remotes(layout.root)
    if default or not names:
        return default
    if len(names) == 1:
        return names[0]
    raise LineageError(f"DVC has several remotes ({', '.join(names)}) and no default: pick one "
                       "with `dvc remote default NAME`")


def push(layout: Layout, *, mode: str) -> tuple[str | None, list[str]]:
    """Push data/raw, data/eval and the model stage's outputs (`mode` auto: when a DVC remote
    is configured; always: a missing remote is an error; never). (remote or None, notes)."""
    if mode == "never":
        return None, []
    remote = remote_name(layout)
    if remote is None:
        if mode == "always":
            raise LineageError("lineage.push is `always` but DVC has no remote: add one with "
                               "`dvc remote add -d NAME URL`")
        return None, ["no DVC remote configured: data and model stay in this machine's DVC "
                      "cache only (`dvc remote add -d NAME URL` to back them up)"]
    dvcrepo.push(layout.root, _targets(layout), remote=remote)
    return remote, []


def _targets(layout: Layout) -> list[str]:
    return [f"{rel(layout, layout.raw)}.dvc", f"{rel(layout, layout.eval)}.dvc",
            model_stage(layout)]


def record(layout: Layout, *, commit_enabled: bool, push_mode: str,
           message: str) -> tuple[Lineage, dict[str, float]]:
    """Commit (when enabled) and push (per `push_mode`), then describe the candidate now in
    the workspace. Returns the lineage and how long each step took, in seconds."""
    seconds, notes = {}, []
    t0 = time.monotonic()
    rev = None
    if commit_enabled:
        try:
            rev, said = commit(layout, message=message)
        except gitrepo.GitError as exc:
            raise LineageError(f"{exc} (set lineage.commit: false to build candidates that "
                               "cannot be restored)") from exc
        notes += said
    else:
        notes.append("lineage.commit is off: this candidate's DVC metadata is not committed, "
                     "so `labelgate checkout` cannot restore it")
    seconds["commit"] = round(time.monotonic() - t0, 3)
    t0 = time.monotonic()
    remote, said = push(layout, mode=push_mode)
    notes += said
    seconds["push"] = round(time.monotonic() - t0, 3)
    return Lineage(commit=rev, remote=remote, notes=tuple(notes), **hashes(layout)), seconds


# -- checkout: pipelines/restore.py ------------------------------------------------------------

def checkout(layout: Layout, model_id: str):
    """Put back what candidate `model_id` was built from (pipelines/restore.py: `checkout`)."""
    from pipelines import restore  # restore imports this module
    return restore.checkout(layout, model_id)
