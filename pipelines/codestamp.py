"""What code each dvc.yaml stage runs, as small stamp files DVC can depend on.

A stage's command is `python -m pipelines.<stage>`: in a user's workspace that code lives in the
installed labelgate package, not beside dvc.yaml, so a dvc.yaml dep on `pipelines/train.py`
would name a file that is not there. Instead the `codestamp` stage (always run, about a second) writes
`.labelgate/code/<stage>.sha256`: labelgate's version and the sha256 of every file of the
stage module's import closure (lazy imports included, as Python would load them), and each
stage depends on its stamp. Same code -> the same bytes -> DVC skips the stage; an upgrade or an
edit of any file the stage imports -> a changed dep -> DVC reruns it, and `dvc status` says so.

    python -m pipelines.codestamp            # in the workspace: stamps for the stages of dvc.yaml

Imports nothing heavy (stdlib + yaml): it runs before every `dvc repro`.
"""
from __future__ import annotations

import argparse
import ast
import functools
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import re
import sys
from pathlib import Path

import yaml

STAMPS = Path(".labelgate") / "code"   # workspace-relative; git-ignored local state
STAGE = "codestamp"                    # the dvc.yaml stage that writes the stamps (this module)
COMMAND = "python -m pipelines.codestamp"
PACKAGES = ("pipelines", "validation")  # labelgate's own top-level packages
CMD_MODULE = re.compile(r"^python -m ((?:pipelines|validation)\.\w+)(?:\s|$)")


def stamp_path(stage: str) -> str:
    """The workspace-relative stamp file a stage depends on (posix, as dvc.yaml writes it)."""
    return (STAMPS / f"{stage}.sha256").as_posix()


def _package_dirs() -> dict[str, Path]:
    """Where Python loads labelgate's packages from in this interpreter (an installed wheel,
    an editable checkout, or the cwd for `python -m` inside a checkout)."""
    dirs = {}
    for package in PACKAGES:
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise RuntimeError(f"cannot find labelgate's package {package!r} in {sys.executable}")
        dirs[package] = Path(list(spec.submodule_search_locations)[0]).resolve()
    return dirs


def module_file(name: str, dirs: dict[str, Path]) -> Path | None:
    """The file Python would load for module `name`, if it is one of labelgate's."""
    top, *rest = name.split(".")
    if top not in dirs:
        return None
    base = dirs[top].joinpath(*rest)
    for candidate in (base.with_suffix(".py") if rest else None, base / "__init__.py"):
        if candidate is not None and candidate.is_file():
            return candidate
    return None


def _imported(path: Path, dirs: dict[str, Path]) -> set[str]:
    """labelgate modules `path` imports anywhere (a lazy import inside a function runs too),
    with the parent packages Python imports on the way."""
    return set(_imported_cached(path, tuple(sorted(dirs.items()))))


@functools.lru_cache(maxsize=1024)   # each file is parsed once per process, not once per stage
def _imported_cached(path: Path, dirs_items: tuple) -> frozenset[str]:
    dirs = dict(dirs_items)
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            # `from pipelines import audit` imports the module pipelines.audit
            names.update(f"{node.module}.{a.name}" for a in node.names
                         if module_file(f"{node.module}.{a.name}", dirs))
    ours = {n for n in names if module_file(n, dirs)}
    return frozenset(ours | {".".join(n.split(".")[:i]) for n in ours
                             for i in range(1, n.count(".") + 1)})


def closure(module: str, dirs: dict[str, Path] | None = None) -> dict[str, Path]:
    """`{"pipelines/train.py": file}`: `module` and every labelgate module it imports,
    transitively, by package-relative path."""
    dirs = dirs or _package_dirs()
    if module_file(module, dirs) is None:
        raise RuntimeError(f"no labelgate module {module!r} in {sys.executable}")
    seen, todo = set(), [module]
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(_imported(module_file(name, dirs), dirs))
    out = {}
    for name in seen:
        path = module_file(name, dirs)
        top = name.split(".")[0]
        out[f"{top}/{path.relative_to(dirs[top]).as_posix()}"] = path
    return dict(sorted(out.items()))


def version() -> str:
    try:
        return importlib.metadata.version("labelgate")
    except importlib.metadata.PackageNotFoundError:  # a bare checkout on PYTHONPATH
        return "unknown"


def stamp(stage: str, module: str) -> str:
    """The stamp text of one stage: version, then `sha256  path` per file (sha256sum style)."""
    files = closure(module)
    lines = [f"# labelgate {version()}: code of dvc.yaml stage {stage!r} (python -m {module}),"
             " sha256 of each file it imports"]
    lines += [f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {rel}" for rel, p in files.items()]
    return "\n".join(lines) + "\n"


def stamped_stages(doc: dict) -> dict[str, str]:
    """`{stage: module}` of the dvc.yaml stages that depend on their stamp file."""
    out = {}
    for name, body in (doc.get("stages") or {}).items():
        deps = [d if isinstance(d, str) else next(iter(d)) for d in body.get("deps") or []]
        match = CMD_MODULE.match(" ".join(str(body.get("cmd", "")).split()))
        if stamp_path(name) in deps and match:
            out[name] = match.group(1)
    return out


def write(root: str | Path) -> list[str]:
    """(Re)write the stamps of the stages in `root`/dvc.yaml; a stamp whose text is unchanged
    is not touched. Returns the stages whose stamp changed."""
    root = Path(root)
    doc = yaml.safe_load((root / "dvc.yaml").read_text(encoding="utf-8")) or {}
    changed = []
    folder = root / STAMPS
    folder.mkdir(parents=True, exist_ok=True)
    for stage, module in stamped_stages(doc).items():
        path = root / stamp_path(stage)
        text = stamp(stage, module) + (_warm_start(root) if stage == WARM_STAGE else "")
        if not path.exists() or path.read_text(encoding="utf-8") != text:
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(text, encoding="utf-8")
            os.replace(tmp, path)
            changed.append(stage)
    return changed


WARM_STAGE = "train"
REGISTRY = Path("models") / "registry" / "production.json"   # registry.POINTER in models/registry


def _warm_start(root: Path) -> str:
    """The one input of `train` that lives outside DVC: with `train.init: production` the
    candidate starts from the production model, so the stamp names that model's sha256 and a
    promotion reruns train (and `dvc repro` of an old commit restores the same start, the blob
    coming back with `labelgate checkout`). With any other init, nothing: a promotion then
    leaves train alone."""
    try:
        init = ((yaml.safe_load((root / "params.yaml").read_text(encoding="utf-8")) or {})
                .get("train") or {}).get("init")
    except (OSError, yaml.YAMLError):
        return ""   # the stage itself reports an unreadable params file, with the key
    if init != "production":
        return ""
    try:
        sha = json.loads((root / REGISTRY).read_text(encoding="utf-8")).get("sha256")
    except FileNotFoundError:
        sha = None
    except (OSError, ValueError) as exc:
        raise RuntimeError(f"{root / REGISTRY}: cannot read the production pointer ({exc})") from None
    return f"# train.init: production -- warm start from {sha or 'nothing yet (from scratch)'}\n"


# -- dvc.yaml for a workspace ------------------------------------------------------------------

def code_stage() -> dict:
    return {"cmd": COMMAND, "always_changed": True,
            "outs": [{STAMPS.as_posix(): {"cache": False}}]}


def is_code_path(path: str) -> bool:
    return path.split("/")[0] in PACKAGES and path.endswith(".py")


def stamped(doc: dict) -> dict:
    """dvc.yaml (parsed) with every stage's code-file deps (pipelines/*.py, validation/*.py,
    which exist only in labelgate's checkout) replaced by its stamp, and the `codestamp` stage that
    writes the stamps put first. A dvc.yaml that already uses stamps comes back unchanged."""
    stages = dict(doc.get("stages") or {})
    out_stages = {STAGE: stages.pop(STAGE, code_stage())}
    for name, body in stages.items():
        body = dict(body)
        deps = list(body.get("deps") or [])
        code = [d for d in deps if isinstance(d, str) and is_code_path(d)]
        if code or stamp_path(name) in deps:
            deps = [d for d in deps if d not in code and d != stamp_path(name)]
            deps.append(stamp_path(name))
            body["deps"] = deps
        out_stages[name] = body
    return {**doc, "stages": out_stages}


def workspace_dvc_yaml(text: str) -> str:
    """The text of a workspace's dvc.yaml from labelgate's own (comments kept when it already
    uses stamps; otherwise re-written from the parsed stages)."""
    doc = yaml.safe_load(text) or {}
    new = stamped(doc)
    if new == doc:
        return text
    head = ("# labelgate's stages. The code of each stage is the installed labelgate package:\n"
            "# the `codestamp` stage writes .labelgate/code/<stage>.sha256 (labelgate's version and the\n"
            "# sha256 of every module the stage imports) and each stage depends on its stamp, so\n"
            "# an upgrade or a code change reruns exactly the stages it touches.\n")
    return head + yaml.safe_dump(new, sort_keys=False, allow_unicode=True, width=100)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipelines.codestamp", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default=".", help="the workspace (holds dvc.yaml)")
    args = ap.parse_args(argv)
    changed = write(args.root)
    print(f"code stamps: {', '.join(changed) if changed else 'unchanged'} (labelgate {version()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
