"""The few git commands labelgate runs (lineage commits and reads), as subprocesses with
argument lists (no shell). labelgate never changes the user's git config, never commits what it
was not asked to, and leaves the rest of the index as it found it."""
from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

# Used for labelgate's own commits only, and only when git has no identity configured.
IDENTITY = ("labelgate", "labelgate@localhost")
TIMEOUT_S = 120  # a commit of a few small files takes ~20 ms; a hung signing prompt must end
SHA1 = re.compile(r"[0-9a-f]{40}")


class GitError(RuntimeError):
    pass


def git(root: str | Path, *args: str, ok: tuple[int, ...] = (0,)) -> subprocess.CompletedProcess:
    """`git ARGS` in `root` (bytes out); GitError with git's own message on an exit status
    outside `ok`."""
    try:
        proc = subprocess.run(["git", *args], cwd=root, capture_output=True, timeout=TIMEOUT_S)
    except FileNotFoundError:
        raise GitError("git is not installed (labelgate records lineage with it)") from None
    except subprocess.TimeoutExpired:
        raise GitError(f"`git {' '.join(args[:2])}` did not finish in {TIMEOUT_S} s (waiting "
                       "for a signing passphrase?)") from None
    if proc.returncode not in ok:
        err = (proc.stderr or proc.stdout).decode(errors="replace").strip()[-800:]
        raise GitError(f"`git {' '.join(args[:2])}` failed (exit {proc.returncode}): {err}")
    return proc


def in_git(root: str | Path) -> bool:
    return git(root, "rev-parse", "--is-inside-work-tree", ok=(0, 128)).returncode == 0


def head(root: str | Path) -> str | None:
    """HEAD's commit id; None on a branch with no commit yet."""
    return git(root, "rev-parse", "--verify", "-q", "HEAD^{commit}",
               ok=(0, 1)).stdout.decode().strip() or None


def has_commit(root: str | Path, rev: str) -> bool:
    """`rev` (a full commit id) is a commit this repository has."""
    return bool(SHA1.fullmatch(rev)) and git(root, "cat-file", "-e", f"{rev}^{{commit}}",
                                             ok=(0, 1, 128)).returncode == 0


def show(root: str | Path, rev: str, path: str) -> bytes | None:
    """The bytes of `path` (relative to `root`) in commit `rev`; None when it has no such file."""
    proc = git(root, "show", f"{rev}:./{path}", ok=(0, 128))
    return proc.stdout if proc.returncode == 0 else None


def known(root: str | Path, path: str | Path) -> bool:
    """git holds the exact content of `path` (committed somewhere, or at least staged): the
    file can be overwritten without losing anything."""
    oid = git(root, "hash-object", "--", str(path)).stdout.decode().strip()
    return git(root, "cat-file", "-e", oid, ok=(0, 1, 128)).returncode == 0


def ignored(root: str | Path, paths: list[str]) -> set[str]:
    """Those of `paths` a .gitignore rule covers."""
    return set(git(root, "check-ignore", "--", *paths, ok=(0, 1)).stdout.decode().splitlines())


def _identity(root: str | Path) -> tuple[list[str], str | None]:
    """`-c` options for labelgate's commit: none when git knows who the user is (config, or
    GIT_AUTHOR_* and GIT_COMMITTER_* variables); labelgate's own name and address otherwise,
    on this command line only."""
    args, missing = [], []
    for key, value, env in (("user.name", IDENTITY[0], "NAME"),
                            ("user.email", IDENTITY[1], "EMAIL")):
        if os.environ.get(f"GIT_AUTHOR_{env}") and os.environ.get(f"GIT_COMMITTER_{env}"):
            continue
        if not git(root, "config", "--get", key, ok=(0, 1)).stdout.strip():
            args += ["-c", f"{key}={value}"]
            missing.append(key)
    if not missing:
        return [], None
    return args, (f"git has no {' or '.join(missing)} configured here: labelgate's metadata "
                  f"commits are made as '{IDENTITY[0]} <{IDENTITY[1]}>' (set `git config "
                  "user.name` and `user.email` to make them as you)")


def commit_only(root: str | Path, paths: list[str], message: str) -> tuple[str, str | None]:
    """Commit `paths` as they are in the workspace, and nothing else the user staged; no
    commit when none of them changed. Returns (HEAD afterwards, a note when labelgate's own
    identity was used)."""
    git(root, "add", "--", *paths)
    changed = git(root, "diff", "--cached", "--quiet", "--", *paths, ok=(0, 1)).returncode
    rev = head(root)
    if rev and not changed:
        return rev, None
    ident, note = _identity(root)
    # --only: just these paths; --no-verify: a metadata commit by a tool, not the user's code,
    # which their hooks are there for
    git(root, *ident, "commit", "-q", "--no-verify", "-m", message, "--only", "--", *paths)
    return head(root), note
