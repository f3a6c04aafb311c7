"""`labelgate checkout MODEL_ID`: put back the raw data, eval set and model file a candidate
was built from -- its commit's dvc.lock and .dvc files, then their data from DVC's cache or the
DVC remote, the model checked against the ledger's sha256. The candidate's line comes from the
workspace's ledger, or, in a fresh clone whose registry is empty, from the registry mirrored on
the DVC remote (pipelines/mirror.py). What a candidate records: pipelines/lineage.py.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from pipelines import dvcrepo, gitrepo, lineage, mirror, registry
from pipelines.files import Busy, atomic_write_bytes, exclusive, sha256_bytes, sha256_file
from pipelines.layout import Layout
from pipelines.lineage import LineageError


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
    stage = lineage.model_stage(layout)
    model = lineage.rel(layout, layout.candidate_model)
    # what the commit holds, checked against what the ledger recorded
    files: dict[str, bytes] = {}
    for path in ("dvc.lock", *(f"{d}.dvc" for d in lin["data"])):
        text = gitrepo.show(root, rev, path)
        if text is None:
            raise LineageError(f"commit {rev[:12]} has no {path}")
        files[path] = text
    got = {"dvc_lock": sha256_bytes(files["dvc.lock"]),
           "data": {d: lineage.dvc_md5(files[f"{d}.dvc"], f"{d}.dvc") for d in lin["data"]},
           "md5": lineage.lock_md5(files["dvc.lock"], stage, model, "dvc.lock")}
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
            fetched_from = lineage.remote_name(layout)
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
