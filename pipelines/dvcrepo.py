"""The few DVC commands labelgate runs, as subprocesses with argument lists (no shell)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


class DvcError(RuntimeError):
    pass


def _env() -> dict[str, str]:
    env = dict(os.environ, DVC_NO_ANALYTICS="1")
    # dvc.yaml runs `python -m pipelines.<stage>`: make that the python running labelgate.
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    return env


def dvc(root: str | Path, *args: str) -> str:
    """Run `dvc ARGS` in `root`; return its output, or raise DvcError with the tail of it."""
    proc = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=root, env=_env(),
                          capture_output=True, text=True)
    out = proc.stdout + proc.stderr
    if proc.returncode != 0:
        tail = "\n".join(out.strip().splitlines()[-15:])
        raise DvcError(f"`dvc {' '.join(args)}` failed (exit {proc.returncode}):\n{tail}")
    return out


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


def repro_stage(root: str | Path, stage: str) -> str:
    """Run one dvc.yaml stage if its inputs changed (DVC skips it otherwise)."""
    return dvc(root, "repro", "--single-item", stage)
