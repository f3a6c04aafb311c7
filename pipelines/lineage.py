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
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import yaml

from pipelines import dvcrepo, gitrepo, registry
from pipelines.files import Busy, atomic_write_bytes, exclusive, sha256_bytes, sha256_file
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
    dvc_files = [_rel(layout, layout.raw) + ".dvc", _rel(layout, layout.eval) + ".dvc"]
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
    needed = {"dvc.lock", _rel(layout, layout.raw) + ".dvc", _rel(layout, layout.eval) + ".dvc"}
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


def _rel(layout: Layout, path: Path) -> str:
    return path.relative_to(layout.root).as_posix()


# -- hashes ---------------------------------------------------------------------------------------

def _model_stage(layout: Layout) -> str:
    model = _rel(layout, layout.candidate_model)
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


def _dvc_md5(text: bytes, what: str) -> str:
    outs = _yaml(text, what).get("outs") or [{}]
    return str(outs[0].get("md5"))


def _lock_md5(text: bytes, stage: str, path: str, what: str) -> str:
    outs = ((_yaml(text, what).get("stages") or {}).get(stage) or {}).get("outs") or []
    found = next((o.get("md5") for o in outs if os.path.normpath(o.get("path", "")) == path),
                 None)
    if not found:
        raise LineageError(f"{what} records no {path} for stage {stage!r}")
    return str(found)


def hashes(layout: Layout) -> dict:
    """{"dvc_lock", "data", "model"}: the workspace's DVC metadata, as a Lineage holds it."""
    stage = _model_stage(layout)
    model = _rel(layout, layout.candidate_model)
    lock = layout.dvc_lock.read_bytes()
    return {"dvc_lock": sha256_bytes(lock),
            "data": {_rel(layout, d): _dvc_md5(Path(f"{d}.dvc").read_bytes(),
                                               f"{_rel(layout, d)}.dvc")
                     for d in (layout.raw, layout.eval)},
            "model": {"path": model, "stage": stage,
                      "md5": _lock_md5(lock, stage, model, "dvc.lock")}}


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
    return [f"{_rel(layout, layout.raw)}.dvc", f"{_rel(layout, layout.eval)}.dvc",
            _model_stage(layout)]


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


# -- checkout -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Restored:
    """What `checkout` put back."""
    model_id: str
    commit: str
    files: tuple[str, ...]         # metadata files written from the commit
    data: dict[str, str]           # {"data/raw": md5, "data/eval": md5}
    model: str                     # workspace path of the model file (sha256-verified)
    sha256: str
    fetched_from: str | None       # the DVC remote that supplied missing data, if any
    registry_blob: str             # "present" | "restored" | "not kept here" (a clone's)
    ledger: str = "local"          # where the candidate's line was read: local | DVC remote 'x'
    latest: str | None = None      # the latest candidate in that ledger


def _recoverable(root: Path, path: Path, new: bytes) -> bool:
    """Overwriting `path` with `new` loses nothing: it is absent, already `new`, or git has
    its exact content."""
    return not path.exists() or path.read_bytes() == new or gitrepo.known(root, path)


def checkout(layout: Layout, model_id: str) -> Restored:
    """Put back the raw data, eval set and model file candidate `model_id` was built from:
    its commit's dvc.lock and .dvc files (and the uncached metrics beside them) into the
    workspace, then their data from DVC's cache — fetched from the DVC remote when the cache
    lacks it. Refuses, changing nothing, when that would overwrite work git or DVC does not
    have. One retraining run or checkout at a time (the run lock)."""
    try:
        with exclusive(layout.run_lock):
            return _checkout(layout, model_id)
    except gitrepo.GitError as exc:
        raise LineageError(str(exc)) from exc
    except Busy:
        raise LineageError("a retraining run is in progress; run `labelgate checkout` when it "
                           "has finished") from None


def _checkout(layout: Layout, model_id: str) -> Restored:
    root = layout.root
    record, ledger_from, latest = _record(layout, model_id)
    lin = record.get("lineage") or {}
    rev = lin.get("commit")
    if not rev:
        why = "; ".join(lin.get("notes") or []) or "it was built before labelgate recorded lineage"
        raise LineageError(f"{model_id} cannot be restored: no git commit holds its DVC "
                           f"metadata ({why})")
    if not isinstance(rev, str) or not gitrepo.SHA1.fullmatch(rev):
        raise LineageError(f"{model_id}'s ledger line names a malformed commit {rev!r}")
    if not gitrepo.in_git(root) or not gitrepo.has_commit(root, rev):
        raise LineageError(f"{model_id} was built from commit {rev[:12]}, which this "
                           "repository does not have (another clone? `git fetch` it)")
    stage = _model_stage(layout)
    model = _rel(layout, layout.candidate_model)
    # what the commit holds, checked against what the ledger recorded
    files: dict[str, bytes] = {}
    for path in ("dvc.lock", *(f"{d}.dvc" for d in lin["data"])):
        text = gitrepo.show(root, rev, path)
        if text is None:
            raise LineageError(f"commit {rev[:12]} has no {path}")
        files[path] = text
    got = {"dvc_lock": sha256_bytes(files["dvc.lock"]),
           "data": {d: _dvc_md5(files[f"{d}.dvc"], f"{d}.dvc") for d in lin["data"]},
           "md5": _lock_md5(files["dvc.lock"], stage, model, "dvc.lock")}
    want = {"dvc_lock": lin["dvc_lock"], "data": lin["data"], "md5": lin["model"]["md5"]}
    if got != want:
        raise LineageError(f"commit {rev[:12]} does not hold what the ledger recorded for "
                           f"{model_id} ({got} != {want}): refusing to restore it")
    for path in dvcrepo.graph(root)[stage]["uncached"]:  # metrics.json, history.csv
        text = gitrepo.show(root, rev, path)
        if text is not None:
            files[path] = text
    targets = [*(f"{d}.dvc" for d in lin["data"]), stage]
    data_paths = [*lin["data"], model]
    # refuse before changing anything
    lost = [p for p, text in files.items() if not _recoverable(root, root / p, text)]
    present = [t for t in targets if t == stage or (root / t).exists()]
    lost += [f"{p} ({state}: not in DVC's cache)"
             for p, state in dvcrepo.outs_status(root, present).items()
             if p in data_paths and state in ("modified", "new")]
    if lost:
        raise LineageError(f"`labelgate checkout {model_id}` would overwrite changes that "
                           f"neither git nor DVC has: {', '.join(lost)}. Commit them (`dvc "
                           "commit`, `git commit`) or discard them, then run it again")
    before = {p: (root / p).read_bytes() if (root / p).exists() else None for p in files}
    fetched_from, touched = None, False
    try:
        for path, text in files.items():
            atomic_write_bytes(root / path, text)
        if any(s == "not in cache" for p, s in dvcrepo.outs_status(root, targets).items()
               if p in data_paths):
            fetched_from = remote_name(layout)
            if fetched_from is None:
                raise LineageError(f"{model_id}'s data or model is not in the local DVC cache "
                                   "and no DVC remote is configured to fetch it from")
            _fetch(layout, model_id, targets, fetched_from,
                   outs={**lin["data"], model: lin["model"]["md5"]})
        touched = True
        dvcrepo.checkout(root, targets)
        left = {p: s for p, s in dvcrepo.outs_status(root, targets).items() if p in data_paths}
        if left:
            raise LineageError(f"after `dvc checkout`, DVC still reports {left}")
        registry.verify(layout.candidate_model, record["sha256"])
    except (LineageError, dvcrepo.DvcError, registry.RegistryError) as exc:
        _undo(root, before, targets if touched else [], exc)
        raise LineageError(f"{exc} (the workspace is as it was)") from exc
    if ledger_from != "local":   # a clone: its registry is not this candidate's; left alone
        return Restored(model_id=model_id, commit=rev, files=tuple(files),
                        data=dict(lin["data"]), model=model, sha256=record["sha256"],
                        fetched_from=fetched_from, registry_blob="not kept here",
                        ledger=ledger_from, latest=latest)
    blob = registry.blob_path(layout.registry, record["sha256"])
    state = "present"
    with registry.lock(layout.registry):
        if not blob.exists() or sha256_file(blob) != record["sha256"]:
            blob.unlink(missing_ok=True)
            registry.store(layout.registry, layout.candidate_model)
            state = "restored"
    return Restored(model_id=model_id, commit=rev, files=tuple(files), data=dict(lin["data"]),
                    model=model, sha256=record["sha256"], fetched_from=fetched_from,
                    registry_blob=state, ledger=ledger_from, latest=latest)


def _record(layout: Layout, model_id: str) -> tuple[Mapping, str, str | None]:
    """(model_id's candidate line, where it was read: "local" or "DVC remote NAME", the latest
    candidate's id there). The workspace's own ledger first; a fresh clone's is empty, so then
    the registry mirrored on the DVC remote (pipelines/mirror.py)."""
    local = registry.candidates(layout.registry)
    if model_id in local:
        return local[model_id], "local", list(local)[-1]
    from pipelines import mirror  # imports this module
    info = mirror.configured(layout)
    mirrored = mirror.read(layout, info) if info else None
    record = mirrored.candidate(model_id) if mirrored else None
    if record is None:
        where = (f"in the ledger or in the registry mirrored on DVC remote {mirrored.remote!r}"
                 if mirrored else "in the ledger" + ("" if local or info else
                                                     " (a fresh clone? add the DVC remote the "
                                                     "registry is published to)"))
        raise LineageError(f"no candidate {model_id!r} {where}; see `labelgate history`")
    ids = [e.id for e in mirrored.events if e.event == "candidate"]
    return record, f"DVC remote {mirrored.remote!r}", ids[-1]


def _fetch(layout: Layout, model_id: str, targets: list[str], remote: str, *,
           outs: dict[str, str]) -> None:
    """`dvc fetch` the targets' data from `remote` (retried when the remote did not answer);
    when objects are missing there, name each: its path and DVC md5."""
    from pipelines import mirror  # imports this module
    try:
        dvcrepo.fetch(layout.root, targets, remote=remote)
        return
    except dvcrepo.DvcError as exc:
        if exc.transient:
            raise LineageError(f"DVC remote {remote!r} is unreachable: {exc}") from exc
        failed = exc
    missing = mirror.missing_objects(layout, remote, outs)
    if not missing:
        raise LineageError(str(failed)) from failed
    named = ", ".join(f"{path} (md5 {md5})" for path, md5 in missing[:10])
    more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
    raise LineageError(f"DVC remote {remote!r} lacks {len(missing)} file(s) of {model_id}: "
                       f"{named}{more}. They were never pushed there or were deleted; push "
                       "them again from a workspace whose DVC cache has them: `labelgate remote "
                       "push` there (plain `dvc push` skips a folder whose listing is on the "
                       "remote)") from failed


def _undo(root: Path, before: dict[str, bytes | None], targets: list[str],
          cause: Exception) -> None:
    """Put the metadata files (and, once `dvc checkout` ran, their data) back as they were."""
    for path, text in before.items():
        if text is None:
            (root / path).unlink(missing_ok=True)
        else:
            atomic_write_bytes(root / path, text)
    if targets:
        try:
            dvcrepo.checkout(root, targets)
        except dvcrepo.DvcError as exc:
            raise LineageError(f"{cause}; putting the data back failed too: {exc}") from exc
