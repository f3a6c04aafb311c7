"""Label Studio sync at scale, measured in one run against a real local Label Studio:

  full sync        first pull: every annotated task + its images            (goal >= 300 tasks/s)
  no-change sync   nothing changed since                                    (goal <= 3 s)
  incremental      after N annotations added / edited / deleted / skipped   (goal <= 10 s)
  naive            what a hand-rolled script does every time: full export + every image again

    python benchmarks/sync.py [--tasks 20000] [--changes 500] [--distinct]

Starts its own Label Studio (from .venv-studio) in a temp dir on a free port and stops it.
The pulls use the default settings of params.yaml (timeouts included), as a new user has them.
The tasks reference the 1,797 real digit scans of the demo, cycled: images are fetched once per
distinct URL, as a real sync does. With --distinct every task gets its own image file (a copy of
a scan with a few pixels changed), as in most real projects: then the first pull is bound by how
fast Label Studio serves images.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import socket
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from pipelines import demo, pull, settings, studio  # noqa: E402
from pipelines.labelconfig import choice_result  # noqa: E402
from pipelines.labelstudio import Studio  # noqa: E402

CLASSES = tuple(str(i) for i in range(10))


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _distinct_images(folder: Path, names: list[str], truth: list[int],
                     n: int) -> tuple[list[str], list[int]]:
    """`n` image files, each a scan with its index written into the corner pixels."""
    from PIL import Image
    out_names, out_truth = [], []
    for i in range(n):
        j = i % len(names)
        name = f"task-{i:06d}.png"
        img = Image.open(folder / names[j]).convert("L")
        px = img.load()
        for bit in range(17):  # 17 bits: up to 131,072 distinct files
            px[bit, 0] = 255 if (i >> bit) & 1 else 0
        img.save(folder / name)
        out_names.append(name)
        out_truth.append(truth[j])
    return out_names, out_truth


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", type=int, default=20_000)
    ap.add_argument("--changes", type=int, default=500)
    ap.add_argument("--distinct", action="store_true", help="one image file per task")
    ap.add_argument("--no-naive", action="store_true",
                    help="skip the naive baseline (one synchronous export of everything: "
                         "minutes at 100,000 tasks)")
    ap.add_argument("--params", default=str(Path(__file__).resolve().parent.parent / "params.yaml"))
    args = ap.parse_args(argv)
    base = settings.load(args.params)
    work = Path(tempfile.mkdtemp(prefix="labelgate-sync-bench-"))
    conn = studio.up(work / "studio", port=_port())
    try:
        admin = Studio(conn, read_timeout_s=600)  # seeding and the naive baseline only
        pid, _ = admin.ensure_project("sync benchmark", CLASSES)
        # the pulls: exactly what `labelgate pull` builds from params.yaml
        st = Studio(conn, connect_timeout_s=base.pull.connect_timeout_s,
                    read_timeout_s=base.pull.read_timeout_s, image_hosts=base.pull.image_hosts)
        params = dataclasses.replace(base, studio=dataclasses.replace(
            base.studio, project_title="sync benchmark"))
        folder = work / "studio" / "files" / "demo"
        names, truth = demo.write_images(folder)
        if args.distinct:
            names, truth = _distinct_images(folder, names, truth, args.tasks)
        admin.add_local_storage(pid, str(folder))
        user = admin.check()
        unlabeled = args.changes  # room for new annotations and skips later
        tasks = []
        for i in range(args.tasks):
            j = i % len(names)
            task = {"data": {"image": f"/data/local-files/?d=demo/{names[j]}"}}
            if i >= unlabeled:
                task["annotations"] = [{"result": choice_result(CLASSES[truth[j]]),
                                        "completed_by": user, "ground_truth": False}]
            tasks.append(task)
        t0 = time.perf_counter()
        for start in range(0, len(tasks), 2000):
            admin.import_tasks(pid, tasks[start:start + 2000])
        print(f"imported {args.tasks} tasks ({args.tasks - unlabeled} annotated) in "
              f"{time.perf_counter() - t0:.1f} s", flush=True)

        raw = work / "raw"
        first, t_full = _timed(lambda: pull.run(raw, studio=st, project_id=pid, params=params))
        print(f"first pull: {pull.describe(first)}", flush=True)
        same, t_same = _timed(lambda: pull.run(raw, studio=st, project_id=pid, params=params))
        # what pre-annotation asks for: the unlabeled tasks only (a filter, not a full listing)
        unl, t_unl = _timed(lambda: st.unlabeled_tasks(pid))
        print(f"unlabeled tasks: {len(unl)} of {args.tasks} listed in {t_unl:.2f} s", flush=True)
        assert same["snapshot"] is None, same

        # N changes, the way annotators make them: 40 % new labels, 40 % edits, 10 % deletes,
        # 10 % skips (one API call each; not timed)
        api = httpx.Client(base_url=conn.url, headers={"Authorization": f"Token {conn.api_key}"},
                           timeout=60)
        n_new = n_edit = int(args.changes * 0.4)
        n_del = n_skip = (args.changes - n_new - n_edit) // 2
        all_tasks = sorted(st.all_task_ids(pid))
        fresh, done = all_tasks[:unlabeled], all_tasks[unlabeled:]
        for tid in fresh[:n_new]:
            api.post(f"/api/tasks/{tid}/annotations/",
                     json={"result": choice_result("1"), "completed_by": user}).raise_for_status()
        for tid in fresh[n_new:n_new + n_skip]:
            api.post(f"/api/tasks/{tid}/annotations/",
                     json={"result": [], "was_cancelled": True,
                           "completed_by": user}).raise_for_status()
        targets = st.export_tasks(pid, done[:n_edit + n_del])
        for task in targets[:n_edit]:
            api.patch(f"/api/annotations/{task['annotations'][0]['id']}/",
                      json={"result": choice_result("8")}).raise_for_status()
        for task in targets[n_edit:n_edit + n_del]:
            api.delete(f"/api/annotations/{task['annotations'][0]['id']}/").raise_for_status()
        inc, t_inc = _timed(lambda: pull.run(raw, studio=st, project_id=pid, params=params))

        def naive():  # one synchronous whole-project export (it needs the long timeout)
            exported = json.loads(b"".join(admin._client.projects.exports.download_sync(
                pid, export_type="JSON")))
            for url in {t["data"]["image"] for t in exported}:
                st.fetch_image(url, max_bytes=params.pull.max_image_bytes)
            return len(exported)
        n_naive, t_naive = (0, float("nan")) if args.no_naive else _timed(naive)

        annotated = args.tasks - unlabeled
        print(f"\n| sync | tasks | seconds | tasks/s | goal |\n|---|---|---|---|---|\n"
              f"| full (first pull, {first['images_fetched']} distinct images) | {annotated} | "
              f"{t_full:.1f} | {annotated / t_full:,.0f} | >= 300 tasks/s |\n"
              f"| no change | {annotated} | {t_same:.2f} | | <= 3 s |\n"
              f"| incremental after {args.changes} changes ({inc['changed']} changed, "
              f"{inc['removed']} removed) | {inc['examined']} examined | {t_inc:.2f} | | <= 10 s |")
        if not args.no_naive:
            print(f"| naive: full export + every image again | {n_naive} | {t_naive:.1f} | "
                  f"{n_naive / t_naive:,.0f} | |")
            print(f"\nnaive / no-change = {t_naive / t_same:.0f}x   naive / incremental = "
                  f"{t_naive / t_inc:.1f}x")
    finally:
        studio.down(work / "studio")
    return 0


if __name__ == "__main__":
    sys.exit(main())
