"""`labelgate classes [--accept]`: the class list of params.yaml against Label Studio's.

A class added, removed, renamed or reordered in the project's labeling config stops every pull
(pipelines/pull.py): the labels of the data and the heads of the models would no longer mean
the same thing. `--accept` is the one way forward: base.classes in params.yaml becomes Label
Studio's list, in its order (the order is the model's output index), and the change is
committed to the workspace's git history with what changed, so it is recorded beside the data
versions it separates.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from pipelines import gitrepo, paramsfile, settings
from pipelines.files import atomic_write_bytes, read_json, read_jsonl
from pipelines.labelconfig import ClassChange, class_change
from pipelines.layout import Layout


class ClassesError(RuntimeError):
    pass


@dataclass(frozen=True)
class Accepted:
    change: ClassChange
    commit: str | None          # the git commit recording it; None outside git
    notes: tuple[str, ...]      # what else the user has to know or do


def compare(studio, params: settings.Params) -> ClassChange:
    """params.yaml's base.classes -> the live labeling config's classes."""
    project_id = studio.require_project(params.studio.project_title)
    return class_change(params.base.classes, studio.labeling_config(project_id).classes)


def accept(layout: Layout, change: ClassChange) -> Accepted:
    """Rewrite base.classes as `change.new` (comments kept), commit params.yaml when the
    workspace is a git repository, and say what it means for the eval set and the models."""
    if not change.changed:
        return Accepted(change=change, commit=None, notes=())
    text = layout.params.read_text(encoding="utf-8")
    try:
        new = paramsfile.set_values(text, {"base.classes": list(change.new)})
        settings.parse(yaml.safe_load(new), source=str(layout.params))
    except (paramsfile.ParamsEditError, settings.ParamsError) as exc:
        raise ClassesError(f"cannot adopt Label Studio's classes: {exc}") from None
    atomic_write_bytes(layout.params, new.encode("utf-8"))
    notes = list(_consequences(layout, change))
    commit = None
    if gitrepo.in_git(layout.root):
        rel = layout.params.relative_to(layout.root).as_posix()
        commit, note = gitrepo.commit_only(
            layout.root, [rel], f"labelgate classes --accept: {change.describe()}\n\n"
            f"base.classes was {list(change.old)}\nnow {list(change.new)}\n")
        if note:
            notes.append(note)
    else:
        notes.append(f"{layout.root} is not a git repository: the change is only in "
                     "params.yaml")
    return Accepted(change=change, commit=commit, notes=tuple(notes))


def _consequences(layout: Layout, change: ClassChange) -> list[str]:
    out = ["The next model gets a new output head for these classes: it trains from scratch "
           "or from the init weights (no warm start from production, whose head has the old "
           "classes) and the gate judges it as a first model (production predicts other "
           "classes, so it is not compared). Production keeps serving until then."]
    meta = layout.eval / "meta.json"
    if meta.exists():
        labels = {r["label"] for r in read_jsonl(layout.eval / "manifest.jsonl")}
        orphans = sorted(labels - set(change.new))
        missing = sorted(set(change.new) - labels)
        if orphans:
            out.append(f"The fixed eval set ({read_json(meta)['n']} images) has labels no "
                       f"longer in the list ({settings.brief(orphans)}): after relabeling "
                       "those ground-truth tasks in Label Studio, `labelgate pull` then "
                       "`labelgate evalset freeze --force`.")
        elif missing:
            out.append(f"The fixed eval set has no images of {settings.brief(missing)}: mark "
                       "ground truth for them in Label Studio, pull, then `labelgate evalset "
                       "freeze --force`.")
    if change.renamed or change.removed:
        out.append("Annotations that chose a renamed or removed name are quarantined by "
                   "validate (unknown label) until relabeled in Label Studio.")
    return out


def show(change: ClassChange, *, source: str | Path = "params.yaml",
         accepting: bool = False) -> str:
    if not change.changed:
        return f"base.classes in {source} matches Label Studio ({len(change.new)} classes)"
    return (f"Label Studio's classes differ from base.classes in {source}: "
            f"{change.describe()}.\n  params.yaml:  {settings.brief(change.old, first=12)}\n"
            f"  Label Studio: {settings.brief(change.new, first=12)}"
            + ("" if accepting else "\n`labelgate classes --accept` adopts Label Studio's list."))
