"""The few DVC commands labelgate runs, as subprocesses with argument lists (no shell), and the
stage graph of dvc.yaml, read once so the flow runs every stage DVC knows, in DVC's order."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import yaml

from pipelines import codestamp


class DvcError(RuntimeError):
    """A DVC command failed; `transient`: its output names a network fault worth retrying."""

    def __init__(self, message: str, *, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient


# What DVC (boto/s3fs, requests, ssh) prints when a remote did not answer, or answered "try
# again": connection refused or reset, timeouts, throttling, 5xx. Missing objects (NoSuchKey)
# and refused credentials are not transient: retrying cannot fix them.
_TRANSIENT = re.compile(
    r"Could not connect to the endpoint URL|Connect timeout|Read timeout|timed out"
    r"|Connection (?:refused|reset|aborted)|ConnectionError|ServiceUnavailable|SlowDown"
    r"|InternalError|RequestTimeout|Temporary failure|\(50[0234]\)", re.I)
ATTEMPTS = 3          # a transient fault: the command is run up to 3 times
BACKOFF_S = 2.0       # seconds before the 2nd attempt, doubled before each later one


def transient(text: str) -> bool:
    """DVC's output says the remote could not be reached or asked to try again."""
    return bool(_TRANSIENT.search(text))


# DVC ends `add`/`repro` with advice for someone typing commands: "To track the changes with
# git, run: git add ...", "To enable auto staging, run: dvc config core.autostage true" and
# "Use `dvc push` to send your updates to remote storage." In a flow log they repeat after every
# stage, and the user cannot act on them there: labelgate decides what is committed and pushed.
# Not `--quiet`: that also drops "Running stage 'x'" / "Stage 'x' didn't change, skipping", the
# lines that say what a run did. Not `core.autostage`: that would `git add` behind the user's
# back. The exact texts (DVC 3.67, pinned in constraints.txt) are held by tests/test_dvc_deps.py.
_HINTS = re.compile(
    r"\n?To track the changes with git, run:\n\n(?:\t[^\n]*\n?)+"
    r"|\n?To enable auto staging, run:\n\n\tdvc config core\.autostage true\n?"
    r"|Use `dvc push` to send your updates to remote storage\.\n?")


def quiet_hints(text: str) -> str:
    """`text` without DVC's git-staging and push advice."""
    return _HINTS.sub("", text)


def _env() -> dict[str, str]:
    env = dict(os.environ, DVC_NO_ANALYTICS="1")
    # dvc.yaml runs `python -m pipelines.<stage>`: make that the python running labelgate.
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    return env


def _run(root: str | Path, args: tuple[str, ...]) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=root, env=_env(),
                          capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join(quiet_hints(proc.stdout + proc.stderr).strip().splitlines()[-15:])
        raise DvcError(f"`dvc {' '.join(args)}` failed (exit {proc.returncode}):\n{tail}",
                       transient=transient(proc.stdout + proc.stderr))
    return proc


def _retried(root: str | Path, *args: str) -> str:
    """`dvc ARGS`, run again after a transient fault (ATTEMPTS in all, BACKOFF_S doubling);
    the last error says how many attempts were made."""
    for attempt in range(1, ATTEMPTS + 1):
        try:
            return dvc(root, *args)
        except DvcError as exc:
            if not exc.transient or attempt == ATTEMPTS:
                if exc.transient:
                    raise DvcError(f"{exc}\n(the remote did not answer {ATTEMPTS} attempts in "
                                   "a row: check the network, the endpoint and that the "
                                   "server is up)", transient=True) from exc
                raise
            time.sleep(BACKOFF_S * 2 ** (attempt - 1))
    raise AssertionError("unreachable")


def dvc(root: str | Path, *args: str) -> str:
    """Run `dvc ARGS` in `root`; return its output (advice lines dropped), or raise DvcError
    with the tail of it."""
    proc = _run(root, args)
    return quiet_hints(proc.stdout + proc.stderr)


def ensure_repo(root: str | Path) -> None:
    """`dvc init` once (inside git when there is one, else --no-scm)."""
    root = Path(root)
    if (root / ".dvc").exists():
        return
    in_git = subprocess.run(["git", "rev-parse", "--is-inside-work-tree"], cwd=root,
                            capture_output=True, text=True).returncode == 0
    dvc(root, "init", *([] if in_git else ["--no-scm"]))


def add(root: str | Path, path: str | Path) -> None:
    """Version a folder (data/raw, data/eval): a .dvc file git can commit."""
    dvc(root, "add", str(Path(path).resolve().relative_to(Path(root).resolve())))


def repro_stage(root: str | Path, stage: str, *, force: bool = False) -> str:
    """Run one dvc.yaml stage if its inputs changed (DVC skips it otherwise; `force`: always)."""
    return dvc(root, "repro", "--single-item", *(["--force"] if force else []), stage)


# -- the stage graph --------------------------------------------------------------------------

def _paths(entries: list | None, *, uncached: bool = False) -> list[str]:
    """dvc.yaml deps/outs entries (`path` or `{path: {options}}`) -> normalised paths (only
    those marked `cache: false`, with `uncached`)."""
    out = []
    for entry in entries or []:
        items = [(entry, {})] if isinstance(entry, str) else list(entry.items())
        for path, options in items:
            if not uncached or (options or {}).get("cache", True) is False:
                out.append(os.path.normpath(path))
    return out


def _overlap(a: str, b: str) -> bool:
    """One path is the other or lies inside it (a dep on a folder's file, or on a folder)."""
    return a == b or a.startswith(b + os.sep) or b.startswith(a + os.sep)


def graph(root: str | Path) -> dict[str, dict]:
    """dvc.yaml's stages in file order: {name: {"cmd", "deps", "outs", "uncached", "params"}},
    outs including metrics and plots; `uncached`: the outs marked `cache: false` (git keeps
    those, DVC only hashes them). Refuses what DVC would expand (foreach/matrix) rather than
    guess at it."""
    path = Path(root) / "dvc.yaml"
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise DvcError(f"cannot read {path}: {exc}") from exc
    stages = {}
    for name, body in (doc.get("stages") or {}).items():
        if not isinstance(body, dict) or "cmd" not in body:
            raise DvcError(f"{path}: stage {name!r} has no cmd (foreach/matrix stages are not "
                           "supported by labelgate's flow)")
        stages[name] = {"cmd": " ".join(body["cmd"]) if isinstance(body["cmd"], list)
                        else str(body["cmd"]),
                        "deps": _paths(body.get("deps")),
                        "outs": _paths(body.get("outs")) + _paths(body.get("metrics"))
                        + _paths(body.get("plots")),
                        "uncached": [p for key in ("outs", "metrics", "plots")
                                     for p in _paths(body.get(key), uncached=True)],
                        "params": list(body.get("params") or [])}
    return stages


def stages(root: str | Path) -> tuple[str, ...]:
    """dvc.yaml's stages in an order DVC accepts: every stage after the stages whose outputs it
    depends on; among independent stages, dvc.yaml's order. The flow runs exactly these, so a
    stage added to dvc.yaml is never skipped."""
    g = graph(root)
    needs = {name: {other for other, o in g.items() if other != name
                    and any(_overlap(d, out) for d in s["deps"] for out in o["outs"])}
             for name, s in g.items()}
    order: list[str] = []
    while len(order) < len(g):
        ready = [n for n in g if n not in order and needs[n] <= set(order)]
        if not ready:
            cycle = sorted(n for n in g if n not in order)
            raise DvcError(f"dvc.yaml: stages {cycle} depend on each other in a cycle")
        order.append(ready[0])
    return tuple(order)


def refresh_stamps(root: str | Path) -> None:
    """Write the code stamps as the `codestamp` stage would: its command, in `root`, with the
    python the stages run with -- so the code measured is the code `dvc repro` would import
    (the installed package, or a checkout's own files when `root` holds them)."""
    proc = subprocess.run([sys.executable, *codestamp.COMMAND.split()[1:]], cwd=root,
                          env=_env(), capture_output=True, text=True)
    if proc.returncode != 0:
        raise DvcError(f"`{codestamp.COMMAND}` failed (exit {proc.returncode}): "
                       f"{(proc.stdout + proc.stderr).strip()[-800:]}")


def stale(root: str | Path) -> dict[str, list[str]]:
    """What DVC says changed since each stage (and each .dvc file) was last recorded: data,
    code, params or outputs, as `{stage: ["changed deps: params.yaml train.epochs (modified)",
    ...]}`; empty when everything is up to date. Stages marked `always_changed` (evaluate:
    production moves outside DVC) are not counted for that alone. The code stamps
    (pipelines/codestamp.py) are refreshed first: without that an upgraded labelgate would
    look unchanged until the `codestamp` stage ran."""
    if codestamp.STAGE in graph(root):
        refresh_stamps(root)
    stdout = _run(root, ("status", "--json")).stdout   # warnings go to stderr
    try:
        report = json.loads(stdout.strip() or "{}")
    except json.JSONDecodeError as exc:
        raise DvcError(f"`dvc status --json` did not answer JSON ({exc}): "
                       f"{stdout[:300]!r}") from exc
    out: dict[str, list[str]] = {}
    for name, entries in report.items():
        reasons = []
        for entry in entries:
            if entry == "always changed":
                continue
            if isinstance(entry, dict):
                for kind, what in entry.items():
                    reasons.append(f"{kind}: {_describe(what)}")
            else:
                reasons.append(str(entry))
        if reasons:
            out[name] = reasons
    return out


def _describe(what: object) -> str:
    """`{"params.yaml": {"train.epochs": "modified"}, "data/raw": "modified"}` -> text."""
    if not isinstance(what, dict):
        return str(what)
    parts = []
    for path, state in what.items():
        if isinstance(state, dict):
            parts += [f"{path} {key} ({s})" for key, s in state.items()]
        else:
            parts.append(f"{path} ({state})")
    return ", ".join(parts)


# -- remotes, and moving cached data between the workspace, the cache and a remote -----------
# Targets are .dvc files and stage names, never output paths: DVC 3.67 given
# `push data/raw.dvc models/candidate/model.safetensors` pushed data/raw and silently skipped
# the model ("2 files pushed", the model's md5 absent from the remote); the stage name
# (`train`) pushes, fetches and checks out its outputs every time.

def remote_config(root: str | Path) -> tuple[dict[str, dict[str, str]], str | None]:
    """({remote name: {option: value}}, the default remote's name or None) as DVC sees them,
    every config level merged (repo, local, global, system), e.g.
    ({"storage": {"url": "s3://b/p", "endpointurl": "http://..."}}, "storage")."""
    # `dvc config --list`, not `dvc remote list`: that one is a table that wraps long URLs onto
    # extra lines. One call (~1 s of DVC start-up), read once per command.
    out: dict[str, dict[str, str]] = {}
    default = None
    for line in dvc(root, "config", "--list").splitlines():
        if m := re.fullmatch(r"remote\.(.+)\.([^.=]+)=(.*)", line):
            out.setdefault(m.group(1), {})[m.group(2)] = m.group(3)
        elif line.startswith("core.remote="):
            default = line.split("=", 1)[1].strip() or None
    return out, default


def remotes(root: str | Path) -> tuple[list[str], str | None]:
    """The DVC remotes `root` sees and the default one (None when unset)."""
    config, default = remote_config(root)
    return list(config), default


def outs_status(root: str | Path, targets: list[str]) -> dict[str, str]:
    """`{out path: state}` for the outputs of `targets` whose workspace copy is not what the
    metadata records: "modified", "new", "deleted" or "not in cache" (DVC reports that one
    before comparing). Empty: every output matches and is cached. Changed deps are left out:
    they say whether a stage would rerun, not what is on disk."""
    stdout = _run(root, ("status", "--json", *targets)).stdout
    try:
        report = json.loads(stdout.strip() or "{}")
    except json.JSONDecodeError as exc:
        raise DvcError(f"`dvc status --json` did not answer JSON ({exc}): "
                       f"{stdout[:300]!r}") from exc
    out: dict[str, str] = {}
    for entries in report.values():
        for entry in entries:
            if isinstance(entry, dict):
                out.update({os.path.normpath(p): str(state)
                            for p, state in (entry.get("changed outs") or {}).items()})
    return out


def push(root: str | Path, targets: list[str], *, remote: str) -> str:
    """Send the cached data of `targets` (.dvc files, stage names) to `remote` (retried after
    a transient fault)."""
    return _retried(root, "push", "--remote", remote, *targets)


def fetch(root: str | Path, targets: list[str], *, remote: str) -> str:
    """Bring the cached data of `targets` from `remote` into the local cache (what is there
    already is not downloaded again; retried after a transient fault)."""
    return _retried(root, "fetch", "--remote", remote, *targets)


def checkout(root: str | Path, targets: list[str]) -> str:
    """Make the workspace copies of `targets`' outputs what their metadata records, from the
    local cache. `--force`: the caller has checked that nothing it replaces is lost (without
    it DVC asks before replacing a workspace copy it has not cached, e.g. after the cache was
    lost, and with no terminal to ask on it refuses)."""
    return dvc(root, "checkout", "--force", *targets)
