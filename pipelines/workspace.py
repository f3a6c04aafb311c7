"""`labelgate init`: a ready workspace for a user's own Label Studio project.

The project's labeling config says what the pipeline needs (the Image and Choices control
names, the task data key, the classes in config order); a few task images say what input spec
to start from. The workspace gets params.yaml (labelgate's own, every key and comment, with
those values filled in), dvc.yaml (stages whose code is the installed labelgate package: see
pipelines/codestamp.py), .gitignore, .dvcignore, a README, git + DVC, and a first commit, so
`labelgate pull` and `labelgate run` work there with labelgate pip-installed.
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path

import yaml

from pipelines import codestamp, dvcrepo, gitrepo, paramsfile, settings
from pipelines.labelconfig import LabelingConfig, UnsupportedConfig
from pipelines.layout import Layout
from pipelines.lstransport import Connection, ImageFetchError, LabelStudioError

SAMPLE_IMAGES = 8              # task images looked at to suggest the input spec (seconds at most)
SMALL_SIDE_PX = 64             # shorter side at most this: a small image (icons, CIFAR, digits)
PHOTO_SIZE_PX = 224            # torchvision's ImageNet models' input: the photo default
MID_SIZE_PX = 128              # shorter side between the two
COLOUR_CHROMA = 4.0            # mean max-min channel spread (0..255) above which an image is colour:
                               # gray JPEGs stored as RGB measure 0..2, colour photos 15+
WIDE_ASPECT = 1.6              # median long/short side above which a centre crop loses too much: pad
WRITTEN = ("params.yaml", "dvc.yaml", ".gitignore", ".dvcignore", "README.md")


class InitError(RuntimeError):
    """The workspace cannot be made; says why and what to do."""


@dataclass(frozen=True)
class Project:
    id: int
    title: str
    config: LabelingConfig


@dataclass(frozen=True)
class Suggestion:
    """The input spec suggested from sampled task images, and why (a params.yaml comment)."""
    channels: int
    height: int
    width: int
    resize: str
    why: str

    def as_values(self) -> dict[str, object]:
        return {"input.channels": self.channels, "input.height": self.height,
                "input.width": self.width, "input.resize": self.resize}


_template = settings.template


# -- the project ---------------------------------------------------------------------------------

def find_project(studio, project: int | str) -> Project:
    """The project named by id (an int or a string of digits) or exact title, with its
    labeling config read (InitError when labelgate cannot train on it, saying what it can)."""
    wanted = str(project).strip()
    # Studio has no public "all projects" listing; this reads the same SDK listing find_project does
    with studio._call("listing projects"):
        listed = [(p.id, p.title or "") for p in studio._client.projects.list(page_size=100)]
    if wanted.isdigit() and any(pid == int(wanted) for pid, _ in listed):
        pid = int(wanted)
    else:
        hits = [pid for pid, title in listed if title == wanted]
        if not hits:
            titles = settings.brief([t for _, t in listed])
            raise InitError(f"no Label Studio project with id or title {wanted!r} at "
                            f"{studio.conn.url} (projects: {titles})")
        if len(hits) > 1:
            raise InitError(f"{len(hits)} Label Studio projects are titled {wanted!r} (ids "
                            f"{hits}); give the id, or rename one (labelgate finds the project "
                            "by its title, which must be unique)")
        pid = hits[0]
    title = dict(listed)[pid]
    if sum(1 for _, t in listed if t == title) > 1:
        raise InitError(f"project {pid}'s title {title!r} is shared with another project; "
                        "labelgate finds the project by its title (studio.project_title), so "
                        "rename one in Label Studio first")
    try:
        config = studio.labeling_config(pid)
    except UnsupportedConfig as exc:
        raise InitError(f"Label Studio project {pid} ({title!r}) cannot be used: {exc}") from None
    return Project(id=pid, title=title, config=config)


def sample_images(studio, project: Project, *, n: int = SAMPLE_IMAGES,
                  max_bytes: int) -> tuple[list[bytes], list[str]]:
    """(image bytes, reasons for the ones that failed) of up to `n` tasks spread over the
    project, fetched through the pipeline's own transport (the key only to Label Studio's media
    routes)."""
    ids = sorted(studio.all_task_ids(project.id))
    if not ids:
        return [], []
    picked = sorted({ids[i * len(ids) // min(n, len(ids))] for i in range(min(n, len(ids)))})
    blobs, failed = [], []
    for task in studio.export_tasks(project.id, picked):
        url = (task.get("data") or {}).get(project.config.image_key)
        try:
            blobs.append(studio.fetch_image(url, max_bytes=max_bytes))
        except (ImageFetchError, LabelStudioError) as exc:
            failed.append(f"task {task.get('id')}: {exc}")
    return blobs, failed


def _chroma(data: bytes) -> float:
    """Mean spread between the colour channels (0 = gray), on a <= 64 px thumbnail."""
    import numpy as np
    from pipelines import images
    # within the decode budgets, JPEG at reduced size, transparency composited (on white, as a
    # browser shows it) without Pillow's palette-transparency warning per image
    img = images.convert(images.decode(data, draft=lambda w, h: (64, 64)), channels=3,
                         background=(255, 255, 255))
    img.thumbnail((64, 64))
    x = np.asarray(img, dtype=np.int16)
    return float((x.max(axis=2) - x.min(axis=2)).mean())


def suggest_input(blobs: list[bytes], *, failed: int = 0) -> Suggestion | None:
    """channels from colour (any sampled image in colour: 3), size from the median shorter
    side (small images near their own size, stretched: every pixel counts and the object fills
    the frame; photos 224 px, shorter side resized then centre-cropped, or padded when they
    are much wider than tall). None when no sample decoded."""
    from pipelines import images
    seen = []
    for data in blobs:
        try:
            info = images.inspect(data)     # refuses bombs and broken files before decoding
            seen.append((info.width, info.height, _chroma(data)))
        except (images.BadImage, OSError, ValueError):
            failed += 1
    if not seen:
        return None
    colour = max(c for _, _, c in seen) > COLOUR_CHROMA
    short = statistics.median(min(w, h) for w, h, _ in seen)
    aspect = statistics.median(max(w, h) / min(w, h) for w, h, _ in seen)
    if short <= SMALL_SIDE_PX:
        size, resize = max(16, min(SMALL_SIDE_PX, 4 * round(short / 4))), "stretch"
    else:
        size = PHOTO_SIZE_PX if short >= PHOTO_SIZE_PX else MID_SIZE_PX
        resize = "pad" if aspect > WIDE_ASPECT else "crop"
    why = (f"labelgate init sampled {len(seen)} task image(s)"
           + (f" ({failed} unreadable)" if failed else "")
           + f": {'colour' if colour else 'gray'}, median shorter side {short:g} px, "
           f"median aspect {aspect:.2f}\n-> {3 if colour else 1} channel(s), {size} x {size}, "
           f"{resize}. Change these before the first `labelgate run` if they do not fit.")
    return Suggestion(channels=3 if colour else 1, height=size, width=size, resize=resize,
                      why=why)


# -- the workspace ----------------------------------------------------------------------------

def params_text(project: Project, suggestion: Suggestion | None,
                overrides: dict[str, object] | None = None, *, unread: str = "") -> str:
    """labelgate's params.yaml with the project's values, the suggestion and `overrides`
    (dotted keys) filled in; checked by the settings loader (InitError names the key)."""
    values: dict[str, object] = {"base.classes": list(project.config.classes),
                                 "studio.project_title": project.title}
    notes = {}
    if suggestion:
        values.update(suggestion.as_values())
        notes["input"] = suggestion.why
    else:
        notes["input"] = (f"labelgate init sampled no task image ({unread or 'no tasks yet'}):"
                          "\nthis is labelgate's default input spec; set it before the first "
                          "`labelgate run`")
    values.update(overrides or {})
    try:
        text = paramsfile.set_values(_template("params.yaml"), values, notes=notes)
        settings.parse(yaml.safe_load(text), source="params.yaml")
    except (paramsfile.ParamsEditError, settings.ParamsError) as exc:
        raise InitError(f"cannot write params.yaml for project {project.id}: {exc}") from None
    return text


def _check_dest(dest: Path, *, force: bool) -> None:
    if dest.exists() and not dest.is_dir():
        raise InitError(f"{dest} exists and is not a folder")
    if dest.is_dir() and any(dest.iterdir()) and not force:
        raise InitError(f"{dest} is not empty; choose a new folder, or pass --force to write "
                        f"labelgate's files ({', '.join(WRITTEN)}) into it")


def init(dest: Path, *, connection: Connection, project: int | str,
         overrides: dict[str, object] | None = None, force: bool = False,
         sample: int = SAMPLE_IMAGES) -> Path:
    """Write a workspace for Label Studio `project` into `dest` (see the module docstring);
    returns its resolved path. Nothing is written when the project cannot be used."""
    from pipelines.labelstudio import Studio
    dest = Path(dest).expanduser().resolve()
    _check_dest(dest, force=force)
    template = settings.parse(yaml.safe_load(_template("params.yaml")), source="params.yaml")
    studio = Studio(connection, connect_timeout_s=template.pull.connect_timeout_s,
                    read_timeout_s=template.pull.read_timeout_s)
    try:
        studio.check()
        found = find_project(studio, project)
        blobs, failed = sample_images(studio, found, n=sample,
                                      max_bytes=template.pull.max_image_bytes)
    finally:
        studio.close()
    suggestion = suggest_input(blobs, failed=len(failed))
    text = params_text(found, suggestion, overrides, unread=(
        f"{len(failed)} unreadable, e.g. {failed[0][:120]}" if failed else ""))
    dvc_yaml = codestamp.workspace_dvc_yaml(_template("dvc.yaml"))
    dest.mkdir(parents=True, exist_ok=True)
    files = {"params.yaml": text, "dvc.yaml": dvc_yaml, ".gitignore": _template("gitignore"),
             ".dvcignore": _template("dvcignore"), "README.md": readme(found, dest)}
    for name, content in files.items():
        (dest / name).write_text(content, encoding="utf-8")
    if not (dest / ".git").exists():
        gitrepo.git(dest, "init", "-q")
    dvcrepo.ensure_repo(dest)
    # data/raw versioned from the start (empty): a first pull that finds no annotation yet, and
    # a run, then have a dataset to name instead of a DVC error about a missing folder
    raw = Layout(dest).raw
    if not raw.exists():
        raw.mkdir(parents=True)
        dvcrepo.add(dest, raw)
    paths = [*files, *(p for p in (".dvc/config", ".dvc/.gitignore", "data/raw.dvc",
                                   "data/.gitignore") if (dest / p).exists())]
    gitrepo.commit_only(dest, paths, f"labelgate init: Label Studio project {found.id} "
                                     f"({len(found.config.classes)} classes)")
    return dest


def readme(project: Project, dest: Path) -> str:
    """The workspace's README.md: what it is for and the next commands."""
    classes = ", ".join(project.config.classes[:10]) + (
        f", … ({len(project.config.classes)} in all)" if len(project.config.classes) > 10 else "")
    return f"""# labelgate workspace: {project.title}

Label Studio project {project.id} (`<Image name="{project.config.image_name}"
value="${project.config.image_key}">`, `<Choices name="{project.config.choices_name}">`),
classes in config order: {classes}.

{next_steps(dest)}
"""


def next_steps(dest: Path) -> str:
    return f"""Next steps (LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY set, as for `labelgate init`):

    cd {dest}
    labelgate pull              # annotations and images -> data/raw (versioned by DVC)
    labelgate evalset freeze    # the fixed eval set: tasks with a ground-truth annotation
    labelgate run               # validate, prepare, train, evaluate, gate, report (Prefect)

Review params.yaml first: the input section holds the suggested input spec and why; the gate
section holds the promotion rules. Every run commits its DVC metadata to this git repository,
so each candidate model can be restored with `labelgate checkout MODEL_ID`. A class added,
removed or renamed in Label Studio later stops the pull with the change spelled out;
`labelgate classes --accept` adopts it."""
