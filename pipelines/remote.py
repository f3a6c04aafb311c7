"""`labelgate remote add | status | push`: the DVC remote a platform engineer sets up once.

`add` makes an s3:// URL the default DVC remote with its endpoint in DVC's own config
(`endpointurl`; default params.yaml storage.endpoint_url) and commits .dvc/config, so every
clone finds the remote; credentials never go there (the AWS environment or a profile).
`push` sends the workspace's data, eval set and model, then the registry
(pipelines/mirror.py); after that every run pushes by itself (lineage.push: auto). `status`
says whether the remote answers, and what of this workspace is there.
"""
from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

from pipelines import dvcrepo, gitrepo, lineage, mirror, registry
from pipelines.layout import Layout
from pipelines.mirror import (Published, RemoteError, RemoteInfo, configured, open_remote,
                              publish)

__all__ = ["RemoteError", "add", "push_all", "status"]
DEFAULT_NAME = "storage"


def _bytes(path) -> bytes | None:
    return path.read_bytes() if path.exists() else None


# -- configuration --------------------------------------------------------------------------------

def check_url(url: str) -> None:
    """An s3://BUCKET[/PREFIX] URL without credentials (they belong in the environment)."""
    parts = urlsplit(url)
    if parts.scheme != "s3" or not parts.hostname:
        raise RemoteError(f"{url!r} is not an s3://BUCKET/PREFIX URL (other DVC remotes: "
                          "`dvc remote add -d NAME URL`; labelgate pushes to any of them)")
    if "@" in parts.netloc or parts.query or parts.password:
        raise RemoteError("the remote URL carries credentials or options: give only "
                          "s3://BUCKET/PREFIX and keep keys in AWS_ACCESS_KEY_ID / "
                          "AWS_SECRET_ACCESS_KEY or a profile (never in .dvc/config, which "
                          "git shares)")


def check_endpoint(endpoint: str) -> None:
    parts = urlsplit(endpoint)
    if parts.scheme not in ("http", "https") or not parts.hostname or "@" in parts.netloc \
            or parts.query:
        raise RemoteError(f"endpoint {endpoint!r} is not http(s)://HOST[:PORT] (no user, "
                          "password or query: credentials come from the environment)")


def add(layout: Layout, url: str, *, endpoint: str, region: str = "", profile: str = "",
        name: str = DEFAULT_NAME) -> tuple[RemoteInfo, str | None, list[str]]:
    """Make `url` the default DVC remote (`dvc remote add -d`, its `endpointurl`, `region`,
    `profile` when given), and commit .dvc/config so clones find it. Returns (the remote, the
    commit or None outside git, notes)."""
    check_url(url)
    if endpoint:
        check_endpoint(endpoint)
    root = layout.root
    dvcrepo.dvc(root, "remote", "add", "--force", "--default", name, url)
    for option, value in (("endpointurl", endpoint), ("region", region),
                          ("profile", profile)):
        if value:
            dvcrepo.dvc(root, "remote", "modify", name, option, value)
        else:
            dvcrepo.dvc(root, "remote", "modify", "--unset", name, option)
    config = root / ".dvc" / "config"
    if lineage.SECRET.search(config.read_text(errors="replace")):
        return RemoteInfo(name, url, endpoint or None), None, [
            ".dvc/config holds credentials: not committed (move them to .dvc/config.local "
            "with `dvc remote modify --local` or to the environment)"]
    if not gitrepo.in_git(root):
        return RemoteInfo(name, url, endpoint or None), None, [
            f"{root} is not a git repository: .dvc/config is not committed"]
    rev, note = gitrepo.commit_only(root, [".dvc/config"],
                                    f"labelgate remote add: DVC remote {name} -> {url}")
    return RemoteInfo(name, url, endpoint or None), rev, [note] if note else []


# -- the commands: push, status -------------------------------------------------------------------

@dataclass(frozen=True)
class Pushed:
    remote: str
    seconds: dict[str, float]             # {"dvc push", "registry"}
    repaired: tuple[tuple[str, str], ...]  # (path, md5) the remote lacked and got again
    published: Published | None


def push_all(layout: Layout) -> Pushed:
    """`labelgate remote push`: the workspace's data/raw, data/eval and model (`dvc push`,
    then any of their objects the remote still lacks), then the registry."""
    started = time.monotonic()
    name, _ = lineage.push(layout, mode="always")
    h = lineage.hashes(layout)
    repaired = mirror.repair(layout, str(name),
                             {**h["data"], h["model"]["path"]: h["model"]["md5"]})
    seconds = {"dvc push": round(time.monotonic() - started, 3)}
    published = publish(layout)
    seconds["registry"] = published.seconds if published else 0.0
    return Pushed(remote=str(name), seconds=seconds, repaired=tuple(repaired),
                  published=published)


def describe_push(p: Pushed) -> str:
    lines = [f"pushed data/raw, data/eval and the model to DVC remote {p.remote!r} "
             f"({p.seconds['dvc push']:.1f} s)"]
    lines += [f"  {path} (md5 {md5}) was missing there: uploaded again" for path, md5 in p.repaired]
    pub = p.published
    if pub:
        lines.append(f"registry mirrored: {pub.ledger_lines} ledger lines ({pub.appended} new), "
                     f"production {pub.production or 'none'}, "
                     f"{len(pub.models_uploaded)} model(s) DVC had not pushed "
                     f"({pub.seconds:.1f} s)")
    return "\n".join(lines)


@dataclass(frozen=True)
class Status:
    remote: RemoteInfo | None
    reachable: bool
    problem: str | None            # why not reachable / what is wrong, in words
    credentials: str               # where they come from (names only, never values)
    local_lines: int
    mirrored_lines: int | None     # None: nothing published yet
    local_production: str | None
    mirrored_production: str | None
    workspace_objects: dict[str, bool]   # {data/raw, data/eval, model path: on the remote}


def _credentials(layout: Layout) -> str:
    names = [k for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                         "AWS_PROFILE") if os.environ.get(k)]
    local = layout.root / ".dvc" / "config.local"
    return (", ".join(names) + " in the environment" if names else "no AWS_* variables set") + (
        "; .dvc/config.local" if local.exists() else "")


def status(layout: Layout) -> Status:
    """What `labelgate remote status` prints: the remote, whether it answers, the registry
    mirror against the local registry, and whether the workspace's data and model are there."""
    info = configured(layout)
    reg = layout.registry
    local_lines = (_bytes(reg / registry.LEDGER) or b"").count(b"\n")
    prod = registry.production(reg)
    base = dict(remote=info, credentials=_credentials(layout), local_lines=local_lines,
                local_production=prod.id if prod else None)
    if info is None:
        return Status(reachable=False, problem="no DVC remote: `labelgate remote add "
                      "s3://BUCKET/PREFIX`", mirrored_lines=None, mirrored_production=None,
                      workspace_objects={}, **base)
    outs = {}
    if layout.dvc_lock.exists():
        with contextlib.suppress(lineage.LineageError, OSError):
            h = lineage.hashes(layout)
            outs = {**h["data"], h["model"]["path"]: h["model"]["md5"]}
    try:
        with open_remote(layout, info.name) as mirror:
            ledger = mirror.read(registry.LEDGER)
            pointer = mirror.read(registry.POINTER)
            objects = {path: mirror.has_object(md5) for path, md5 in outs.items()}
    except RemoteError as exc:
        return Status(reachable=False, problem=str(exc), mirrored_lines=None,
                      mirrored_production=None, workspace_objects={}, **base)
    mirrored_prod = json.loads(pointer).get("id") if pointer else None
    return Status(reachable=True, problem=None,
                  mirrored_lines=None if ledger is None else ledger.count(b"\n"),
                  mirrored_production=mirrored_prod, workspace_objects=objects, **base)


def describe_status(s: Status) -> str:
    if s.remote is None:
        return f"DVC remote        none ({s.problem})"
    lines = [f"DVC remote        {s.remote.name} -> {s.remote.url}"
             + (f" at {s.remote.endpoint}" if s.remote.endpoint else " (AWS S3)"),
             f"credentials       {s.credentials}"]
    if not s.reachable:
        return "\n".join([*lines, f"reachable         no: {s.problem}"])
    lines.append("reachable         yes")
    if s.mirrored_lines is None:
        lines.append(f"registry mirror   not published ({s.local_lines} local ledger lines): "
                     "`labelgate remote push`")
    else:
        behind = s.local_lines - s.mirrored_lines
        lines.append(f"registry mirror   {s.mirrored_lines} ledger lines, production "
                     f"{s.mirrored_production or 'none'}"
                     + (" (up to date)" if behind == 0 and s.mirrored_production ==
                        s.local_production else f" (local: {s.local_lines} lines, production "
                        f"{s.local_production or 'none'}: `labelgate remote push`)"))
    for path, there in s.workspace_objects.items():
        lines.append(f"  {path:36} {'on the remote' if there else 'NOT on the remote'}")
    return "\n".join(lines)
