"""The few DVC commands labelgate runs, as subprocesses with argument lists (no shell), and the
stage graph of dvc.yaml, read once so the flow runs every stage DVC knows, in DVC's order."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import yaml


class DvcError(RuntimeError):
    pass


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
        raise DvcError(f"`dvc {' '.join(args)}` failed (exit {proc.returncode}):\n{tail}")
    return proc


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

def _paths(entries: list | None) -> list[str]:
    """dvc.yaml deps/outs entries (`path` or `{path: {options}}`) -> normalised paths."""
    out = []
    for entry in entries or []:
        for path in ([entry] if isinstance(entry, str) else list(entry)):
            out.append(os.path.normpath(path))
    return out


def _overlap(a: str, b: str) -> bool:
    """One path is the other or lies inside it (a dep on a folder's file, or on a folder)."""
    return a == b or a.startswith(b + os.sep) or b.startswith(a + os.sep)


def graph(root: str | Path) -> dict[str, dict]:
    """dvc.yaml's stages in file order: {name: {"cmd", "deps", "outs", "params"}}, outs
    including metrics and plots. Refuses what DVC would expand (foreach/matrix) rather than
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


def stale(root: str | Path) -> dict[str, list[str]]:
    """What DVC says changed since each stage (and each .dvc file) was last recorded: data,
    code, params or outputs, as `{stage: ["changed deps: params.yaml train.epochs (modified)",
    ...]}`; empty when everything is up to date. Stages marked `always_changed` (evaluate:
    production moves outside DVC) are not counted for that alone."""
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
