"""`labelgate` — the command line. Each command is a thin wrapper over a module's function."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from pipelines.layout import Layout


def _quiet_env(layout: Layout) -> None:
    """Per-workspace Prefect home; no telemetry from any tool. Before Prefect is imported."""
    os.environ.setdefault("PREFECT_HOME", str(layout.state / "prefect"))
    # Prefect makes its home without parents: with no .labelgate/ yet (a user's own Label
    # Studio, no embedded one) it had no database and every run timed out
    Path(os.environ["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)
    # flows report to a long-lived server (`_prefect`), never to a temporary per-command one
    # (10-18 s each, gone afterwards, and it misses its start-up window on a busy machine)
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from pipelines.process import QUIET_ENV  # read when torch loads, here and in every stage
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)


def _prefect(layout: Layout) -> str:
    """The Prefect API this command reports to: the user's PREFECT_API_URL, else the embedded
    server (started if needed). Before flows are imported."""
    from pipelines import prefect_server
    return prefect_server.ensure(layout.state / "prefect")


def _connect(layout: Layout, params):
    from pipelines.pull import connect
    return connect(layout.studio, params)


def cmd_studio(args, layout: Layout, params) -> int:
    from pipelines import studio
    if args.action == "up":
        conn = studio.up(layout.studio, port=params.studio.port)
        print(f"Label Studio running at {conn.url} (API key {studio.masked(conn.api_key)}, "
              f"full key in {layout.studio / 'credentials.json'})")
    elif args.action == "down":
        if not studio.down(layout.studio):
            print("Label Studio was not running")
    else:
        s = studio.status(layout.studio)
        print(f"Label Studio: {'running at ' + s['url'] if s['running'] else 'not running'} "
              f"(data in {s['data_dir']})")
    return 0


def cmd_prefect(args, layout: Layout, params) -> int:
    from pipelines import prefect_server
    home = layout.state / "prefect"
    user = os.environ.get("PREFECT_API_URL")
    if user:
        if args.action == "up":
            prefect_server.ensure(home)  # only checks that it answers
        state = "answers" if prefect_server.healthy(user) else "does NOT answer"
        print(f"PREFECT_API_URL is set: labelgate uses the Prefect server at {user} "
              f"({state}) and starts or stops none of its own")
        return 0 if args.action == "down" or state == "answers" else 1
    s = prefect_server.status(home)
    if args.action == "up":
        url = prefect_server.up(home)
        print(f"Prefect server running at {prefect_server.ui_url(url)} (API {url}; data and "
              f"log in {home})")
    elif args.action == "down":
        if not prefect_server.down(home):
            print("the Prefect server was not running")
    else:
        print(f"Prefect server: "
              + (f"running at {prefect_server.ui_url(s.api_url)} (pid {s.pid})" if s.running
                 else "not running (`labelgate run` starts it)")
              + f"; data and log in {home}")
    return 0


def cmd_pull(args, layout: Layout, params) -> int:
    from pipelines import dvcrepo, pull
    st = _connect(layout, params)
    result = pull.run(layout.raw, studio=st, project_id=st.require_project(
        params.studio.project_title), params=params, full=getattr(args, "full", False))
    dvcrepo.ensure_repo(layout.root)
    dvcrepo.add(layout.root, layout.raw)  # a no-op when nothing changed
    print(pull.describe(result))
    return 0


def _reviewer(args) -> str:
    import getpass
    return args.reviewer or getpass.getuser()


def cmd_evalset(args, layout: Layout, params) -> int:
    from pipelines import dvcrepo, evalset, rawstore
    if args.action == "rebaseline":
        return _rebaseline(args, layout, params)
    meta = evalset.freeze(rawstore.load(layout.raw), layout.eval, params=params, force=args.force)
    dvcrepo.ensure_repo(layout.root)
    dvcrepo.add(layout.root, layout.eval)
    print(f"froze the eval set: {meta['n']} images, hash {meta['hash'][:12]} "
          f"({len(meta['skipped'])} ground-truth tasks unusable)")
    return 0


def _rebaseline(args, layout: Layout, params) -> int:
    """Judge production on the (new) fixed eval set and record why, so gates can compare again."""
    from pipelines import evalset, predict, registry
    from pipelines.device import pick_device
    if not args.reason:
        print("labelgate evalset rebaseline: --reason is required (it goes into the ledger)",
              file=sys.stderr)
        return 2
    ev = evalset.load(layout.eval, params=params)
    model = predict.load_production(layout.registry, device=pick_device(params.train.device))
    if model is None:
        raise registry.RegistryError("no production model to re-baseline")
    accuracy = float((predict.probabilities(model, ev.x).argmax(1) == ev.y).mean())
    from pipelines.studiosync import StudioSync
    sync = StudioSync(layout.studio, layout.registry, params)
    event = registry.rebaseline(layout.registry, eval_hash=ev.hash, accuracy=accuracy,
                                reason=args.reason, reviewer=_reviewer(args), then=sync)
    print(f"re-baselined {model.version} on eval set {ev.hash[:12]} (was "
          f"{str(event['old_eval_hash'])[:12]}): accuracy {accuracy:.4f} on {len(ev.y)} images"
          + (" (finished an interrupted run of this command)" if event.get("resumed") else ""))
    if sync.message:
        print(sync.message)
    _publish(layout)
    return 0


def _publish(layout: Layout) -> None:
    """The registry changed: mirror it to the DVC remote (pipelines/mirror.py) so a clone
    elsewhere sees it. A failure is a warning: the change is made here, and `labelgate remote
    push` sends it when the remote answers."""
    from pipelines import mirror
    if not (layout.root / ".dvc").is_dir():  # not a DVC repository: no remote to mirror to
        return
    try:
        mirror.publish(layout)
    except mirror.RemoteError as exc:
        print(f"warning: registry not mirrored to the DVC remote ({exc}); run "
              "`labelgate remote push` when it answers", file=sys.stderr)


def cmd_approve(args, layout: Layout, params) -> int:
    from pipelines import registry
    from pipelines.studiosync import StudioSync
    sync = StudioSync(layout.studio, layout.registry, params)
    pointer = registry.approve(layout.registry, args.id, reason=args.reason,
                               reviewer=_reviewer(args), override_fail=args.override_fail,
                               then=sync)
    print(f"production is now {pointer['id']} (approved by {pointer['reviewer']}; was "
          f"{pointer['previous'] or 'none'})"
          + (" (finished an interrupted run of this command)" if pointer.get("resumed") else ""))
    if sync.message:
        print(sync.message)
    _publish(layout)
    return 0


def cmd_reject(args, layout: Layout, params) -> int:
    from pipelines import registry
    from pipelines.studiosync import StudioSync
    # the sync runs only when an interrupted approve/rollback still owes Label Studio one
    sync = StudioSync(layout.studio, layout.registry, params)
    registry.reject(layout.registry, args.id, reason=args.reason, reviewer=_reviewer(args),
                    then=sync)
    print(f"rejected {args.id}; production unchanged")
    if sync.message:
        print(sync.message)
    _publish(layout)
    return 0


def cmd_calibrate(args, layout: Layout, params) -> int:
    from pipelines import calibrate
    out = layout.state / "calibration"
    # asked for by name, it runs even where the flow never calibrates (calibration_seeds: 0)
    seeds = args.seeds or params.gate.calibration_seeds or 3
    result = calibrate.run(layout.prepared, layout.eval, out, params=params, seeds=seeds,
                           registry_dir=layout.registry)
    acc = result["accuracy"]
    print(f"{len(result['seeds'])} seeds: fixed-eval accuracy {acc['mean']:.4f} ± "
          f"{acc['std']:.4f} (min {acc['min']:.4f}, max {acc['max']:.4f})")
    print(f"the gate's margins from now on (the configured ones, widened to gate.noise_z "
          f"{params.gate.noise_z:g} x the seed spread):")
    for key, value in result["proposed"].items():
        print(f"  {key}: {value}    # configured {result['current'][key]}")
    worst = result["widest_recall_margin"]
    print(f"  widest class recall margin: {worst['margin']:.3f} ({worst['class']!r})")
    print(f"stored in {layout.registry / 'noise.json'} (the flow recalibrates when the eval set "
          f"or the recipe changes); details: {out / 'calibration.json'}")
    return 0


def cmd_history(args, layout: Layout, params) -> int:
    from pipelines import registry
    with registry.lock(layout.registry):
        registry.reconcile(layout.registry)
    events = registry.ledger(layout.registry)
    if not events:
        print("no candidates yet")
        return 0
    from pipelines.records import ProductionChange
    current = registry.production(layout.registry)
    print(f"{'at':20}  {'event':14}  {'model':16}  {'verdict':12}  {'eval acc':8}  who / why")
    for e in events[-args.limit:]:
        verdict, acc, who = _history_columns(e)
        mark = (" *" if isinstance(e, ProductionChange) and current and e.id == current.id
                else "")
        print(f"{e.at:20}  {e.event:14}  {e.id:16}  {verdict or '':12}  "
              f"{'' if acc is None else f'{acc:.4f}':8}  {who}{mark}")
    print("(* = production now)")
    return 0


def _history_columns(e) -> tuple[str | None, float | None, str]:
    """(verdict, eval accuracy, who / why) of a ledger event (pipelines/records.py)."""
    from pipelines.records import (Approved, Candidate, ProductionChange, Rebaselined,
                                   Rejected)

    def words(*parts: str | None) -> str:
        return " ".join(p for p in parts if p)
    match e:
        case Candidate():
            return e.verdict, e.eval_accuracy, ""
        case ProductionChange(pointer=p):
            return None, p.eval_accuracy, words(p.reviewer, p.reason)
        case Approved():
            return e.verdict, None, words(e.reviewer, e.reason)
        case Rejected():
            return None, None, words(e.reviewer or e.by, e.reason)
        case Rebaselined():
            return None, e.eval_accuracy, words(e.reviewer, e.reason)
    return None, None, ""


def _print_run(summary: dict, layout: Layout) -> None:
    if summary["status"] == "skipped":
        print(f"skipped: {summary['reason']}")
        return
    if summary["status"] == "no-op":
        print(f"{summary['reason']}. Production unchanged; last verdict "
              f"{summary.get('verdict')} on dataset {summary.get('dataset_version')}.")
        return
    v, p, t = summary["validate"], summary["prepare"], summary["train"]
    reasons = ", ".join(f"{k} {n}" for k, n in sorted(v["quarantine_reasons"].items()))
    prod = summary["production_accuracy"]
    event = summary["promotion"]
    print(f"dataset version  {summary['dataset_version']}")
    print(f"tasks pulled     {v['tasks']} annotated tasks in {v['snapshots']} snapshot(s)")
    print(f"accepted         {v['accepted']}")
    print(f"quarantined      {v['quarantined']}" + (f"  ({reasons})" if reasons else ""))
    print(f"prepared         train {p['train']}, val {p['val']}, disputed {p['disputed']}, "
          f"excluded as eval images {p['excluded_eval_overlap']} (+ "
          f"{p.get('excluded_near_duplicates', 0)} near-duplicates)")
    print(f"trained          {t['epochs']} epochs on {t['device']} in {t['seconds']} s, "
          f"val accuracy {t['val_acc']:.4f}")
    print(f"fixed eval set   candidate accuracy {summary['candidate_accuracy']:.4f}"
          + (f", production {prod:.4f}" if prod is not None else ", no production model yet")
          + f" (eval set {summary['eval_hash'][:12]})")
    print(f"gate verdict     {summary['verdict']} -> {event['event']} {event.get('id', '')}")
    if summary.get("reviewer"):
        print(f"reviewer         {summary['reviewer']['says']}")
    if summary.get("preannotate"):
        print(f"pre-annotations  {summary['preannotate']['pushed']} unlabeled tasks "
              f"({summary['preannotate'].get('model_version')})")
    if summary.get("review"):
        r = summary["review"]
        print(f"label review     {r['suspects']} suspected label errors, {r['flagged']} newly "
              f"flagged in Label Studio ({r['open']} open; {r['relabeled']} relabeled, "
              f"{r['confirmed']} confirmed since the last run)")
    print(f"review report    {summary['report']}")


def cmd_run(args, layout: Layout, params) -> int:
    from pipelines.prefect_server import ui_url
    api = _prefect(layout)
    from pipelines.flows import retrain
    state = retrain(root=str(layout.root), force=args.force, return_state=True)
    summary = state.result()  # raises what the flow raised
    _print_run(summary, layout)
    print(f"Prefect run      {ui_url(api)}/runs/flow-run/{state.state_details.flow_run_id}")
    return 0


def cmd_demo(args, layout: Layout, params) -> int:
    from pipelines import datasets, demo, studio
    ds = datasets.get(args.dataset)
    conn = studio.up(layout.studio, port=params.studio.port)
    st = _connect(layout, params)
    # digits: this checkout is the workspace; another set gets its own, made by `labelgate init`
    title, classes = ((params.studio.project_title, params.base.classes) if ds.name == "digits"
                      else (ds.project_title, ds.classes))
    project_id, created = st.ensure_project(title, classes)
    if created:
        counts = demo.seed(st, project_id, layout.studio / "files", classes, dataset=ds.name)
        print(f"demo project created and seeded ({ds.name}: {ds.about}): {counts}")
    else:
        print(f"reusing Label Studio project {project_id}")
    work = layout
    if ds.name != "digits":
        _prefect(layout)  # the checkout's Prefect server serves the demo workspace's runs too
        work = Layout(demo.workspace(layout.state / "demos" / ds.name, studio=st,
                                     project_id=project_id, dataset=ds, studio_dir=layout.studio))
        from pipelines import settings
        params = settings.load(work.params)
        print(f"demo workspace   {work.root}  (made by `labelgate init`)")
    if not (work.eval / "meta.json").exists():
        cmd_pull(args, work, params)
        cmd_evalset(argparse.Namespace(action="freeze", force=False), work, params)
    rc = cmd_run(argparse.Namespace(force=False), work, params)
    print(f"annotators       {conn.url}/projects/{project_id}  "
          f"(login in {layout.studio / 'credentials.json'})")
    if work != layout:
        print(f"next             labelgate --root {work.root} run | status | history")
    return rc


def cmd_status(args, layout: Layout, params) -> int:
    from pipelines import rawstore, registry
    from pipelines.files import read_json
    prod = registry.production(layout.registry)
    if prod:
        acc = prod.eval_accuracy
        print(f"production model  {prod.id} since {prod.since} (fixed-eval accuracy "
              f"{'not recorded' if acc is None else f'{acc:.4f}'}, via {prod.via})")
    else:
        print("production model  none")
    print(f"dataset version   {rawstore.dataset_version(layout.raw)}")
    if layout.last_run.exists():
        last = read_json(layout.last_run)
        print(f"last run          {last.get('finished_at')} verdict {last.get('verdict')}"
              + (f", last checked {last['checked_at']}" if last.get("checked_at") else ""))
    else:
        print("last run          none")
    return 0


def cmd_rollback(args, layout: Layout, params) -> int:
    from pipelines import registry
    from pipelines.studiosync import StudioSync
    sync = StudioSync(layout.studio, layout.registry, params)
    pointer = registry.rollback(layout.registry, to=args.to, reason=args.reason,
                                reviewer=_reviewer(args), then=sync)
    print(f"production is now {pointer['id']} (was {pointer['rolled_back_from']})"
          + (" (finished an interrupted run of this command)" if pointer.get("resumed") else ""))
    if sync.message:
        print(sync.message)
    _publish(layout)
    return 0


def cmd_checkout(args, layout: Layout, params) -> int:
    from pipelines import lineage
    r = lineage.checkout(layout, args.id)
    latest = r.latest
    print(f"restored {r.model_id} as built from commit {r.commit[:12]}"
          + ("" if r.ledger == "local" else f" (its ledger line read from {r.ledger})") + ":")
    for path, md5 in r.data.items():
        print(f"  {path:36} DVC md5 {md5}")
    print(f"  {r.model:36} sha256 {r.sha256[:16]}… (verified against the ledger)")
    print(f"  {', '.join(r.files)} from commit {r.commit[:12]}")
    print("data " + (f"fetched from DVC remote {r.fetched_from!r}" if r.fetched_from
                     else "from the local DVC cache")
          + ("; the registry's copy of the model was missing and is back" if
             r.registry_blob == "restored" else ""))
    print("Other stage outputs are as they were (`dvc status` names them; `labelgate run` "
          "rebuilds them); `git status` shows the restored DVC metadata"
          + (f"; `labelgate checkout {latest}` returns to the latest candidate."
             if latest != r.model_id else "."))
    return 0


def cmd_remote(args, layout: Layout, params) -> int:
    from pipelines import remote
    if args.action == "add":
        if not args.url:
            raise remote.RemoteError("`labelgate remote add` needs the URL: s3://BUCKET/PREFIX")
        endpoint = params.storage.endpoint_url if args.endpoint is None else args.endpoint
        info, rev, notes = remote.add(layout, args.url, endpoint=endpoint,
                                      region=params.storage.region,
                                      profile=params.storage.profile, name=args.name)
        print(f"DVC remote {info.name!r} (default) -> {info.url}"
              + (f" at {info.endpoint}" if info.endpoint else " (AWS S3)")
              + (f"; .dvc/config committed ({rev[:12]})" if rev else ""))
        for note in notes:
            print(f"- {note}")
        print("Credentials come from the environment (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY"
              " or a profile). Next: `labelgate remote push`, then every run pushes.")
        return 0
    if args.action == "push":
        print(remote.describe_push(remote.push_all(layout)))
        return 0
    report = remote.status(layout)
    print(remote.describe_status(report))
    return 0 if report.reachable else 1


def cmd_deploy(args, layout: Layout, params) -> int:
    from pipelines import workpool
    pool = workpool.pool_name(params, args.pool)  # no pool named: say so before any server
    api = _prefect(layout)  # before Prefect is imported: it reads its settings then
    done = workpool.register(layout.root, params, pool=pool)
    print(workpool.describe(done, api_url=api, root=layout.root))
    return 0


def cmd_serve(args, layout: Layout, params) -> int:
    import functools
    import signal
    import threading
    api = _prefect(layout)  # before Prefect is imported: it reads its settings then
    from prefect import serve
    from pipelines import trigger, workpool
    from pipelines.flows import DEPLOYMENT, deployment
    from pipelines.prefect_server import ui_url
    print(f"Prefect UI: {ui_url(api)}")
    studio = _connect(layout, params)
    project_id = studio.require_project(params.studio.project_title)
    # a trigger while a run is due, waiting or running starts none (a burst is one run)
    start_run = functools.partial(workpool.start_run, DEPLOYMENT)
    if params.schedule.pool:  # the pool's workers run the flows; this process only triggers
        print(workpool.describe(workpool.register(layout.root, params), api_url=api,
                                root=layout.root))
        print(f"triggering labelgate-retrain on work pool {params.schedule.pool!r} when >= "
              f"{params.schedule.min_new_labels} new resolved labels exist (checked every "
              f"{params.schedule.check_every_s:g} s; cron {params.schedule.cron!r} runs are "
              "scheduled by the Prefect server); Ctrl-C to stop")
        # Ctrl-C / SIGTERM end the watcher after the check in progress: a KeyboardInterrupt
        # raised inside Prefect's or httpx's client calls could be swallowed there (seen: a
        # SIGINT left `serve` running); a second Ctrl-C stops at once
        stop = threading.Event()

        def _stop(signum, frame) -> None:
            print("stopping after the current check (Ctrl-C again to stop now)", flush=True)
            stop.set()
            signal.signal(signal.SIGINT, signal.default_int_handler)

        signal.signal(signal.SIGINT, _stop)
        signal.signal(signal.SIGTERM, _stop)
        try:
            trigger.watch(layout, params, studio, project_id, stop=stop, start_run=start_run)
        except KeyboardInterrupt:
            pass
        return 0
    stop = threading.Event()
    watcher = threading.Thread(target=trigger.watch, daemon=True, kwargs=dict(
        layout=layout, params=params, studio=studio, project_id=project_id, stop=stop,
        start_run=start_run))
    print(f"serving labelgate-retrain on cron {params.schedule.cron!r} and when "
          f">= {params.schedule.min_new_labels} new resolved labels exist (checked every "
          f"{params.schedule.check_every_s:g} s); Ctrl-C to stop")
    watcher.start()
    try:
        serve(deployment(str(layout.root), params.schedule.cron))
    finally:
        stop.set()
    return 0


def cmd_backend(args, layout: Layout, params) -> int:
    from pipelines import backend
    from pipelines.device import pick_device
    holder = backend.ModelHolder(layout.registry, pick_device(params.train.device))
    server = backend.make_server(holder, _connect(layout, params), params=params,
                                 host=args.host, port=args.port)
    model = holder.get()
    print(f"labelgate ML backend on http://{args.host}:{args.port} serving "
          f"{model.version if model else 'no model yet'} (reloads on promotion); Ctrl-C "
          "to stop")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


def cmd_predict(args, layout: Layout, params) -> int:
    from pipelines import predict
    from pipelines.device import pick_device
    model = predict.load_production(layout.registry, device=pick_device(params.train.device))
    if model is None:
        print("no production model yet: run `labelgate run` first", file=sys.stderr)
        return 1
    answers = predict.predict_images(model, args.images, lambda path: Path(path).read_bytes(),
                                     how=params.preannotate.uncertainty, errors=(OSError,))
    for path, p in answers:
        if isinstance(p, predict.Unreadable):
            print(f"{path}: cannot read: {p.reason}", file=sys.stderr)
        else:
            print(f"{path}\t{p.label}\t{p.probability:.4f}\t({model.version})")
    return 1 if any(isinstance(p, predict.Unreadable) for _, p in answers) else 0


def cmd_init(args, layout: Layout) -> int:
    """No workspace yet: runs before params.yaml is read (see `main`)."""
    import yaml
    from pipelines import lstransport, workspace
    overrides = {}
    for item in args.set or ():
        key, sep, value = item.partition("=")
        if not sep or "." not in key:
            print(f"labelgate init: --set wants KEY=VALUE with a dotted params key "
                  f"(e.g. gate.min_accuracy=0.8), got {item!r}", file=sys.stderr)
            return 2
        overrides[key.strip()] = yaml.safe_load(value)
    conn = lstransport.connection_from_env(layout.studio)
    dest = workspace.init(Path(args.dir), connection=conn, project=args.project,
                          overrides=overrides, force=args.force)
    doc = yaml.safe_load((dest / "params.yaml").read_text(encoding="utf-8"))
    names, spec = doc["base"]["classes"], doc["input"]
    print(f"labelgate workspace for Label Studio project {doc['studio']['project_title']!r} "
          f"written to {dest}")
    print(f"  classes ({len(names)}): " + ", ".join(names[:10]) + (" …" if len(names) > 10
                                                                  else ""))
    print(f"  input spec: {spec['channels']} channel(s), {spec['height']} x {spec['width']}, "
          f"{spec['resize']} (the `input` section of params.yaml says why)")
    print("  params.yaml, dvc.yaml, .gitignore, .dvcignore, README.md; git + DVC initialised, "
          "first commit made\n")
    print(workspace.next_steps(dest))
    return 0


def cmd_classes(args, layout: Layout, params) -> int:
    from pipelines import classes
    st = _connect(layout, params)
    change = classes.compare(st, params)
    print(classes.show(change, source=layout.params, accepting=args.accept))
    if not args.accept or not change.changed:
        return 1 if change.changed and not args.accept else 0
    done = classes.accept(layout, change)
    print(f"\nbase.classes in {layout.params} is now Label Studio's list"
          + (f" (commit {done.commit[:12]})" if done.commit else ""))
    for note in done.notes:
        print(f"- {note}")
    print("Next: `labelgate pull`, then `labelgate run`.")
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="labelgate", description=(
        "Label Studio annotations -> validated, versioned data -> a CNN that is promoted only "
        "when it passes regression tests on a fixed eval set."))
    ap.add_argument("--root", default=".", help="workspace (holds params.yaml, dvc.yaml)")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")
    s = sub.add_parser("studio", help="embedded Label Studio server: up | down | status")
    s.add_argument("action", choices=("up", "down", "status"))
    s.set_defaults(fn=cmd_studio)
    s = sub.add_parser("prefect", help="embedded Prefect server (flow runs, UI): up | down | "
                       "status; PREFECT_API_URL, if set, names your own instead")
    s.add_argument("action", choices=("up", "down", "status"))
    s.set_defaults(fn=cmd_prefect)
    s = sub.add_parser("demo", help="start Label Studio and Prefect, seed a demo project, run "
                       "the flow")
    from pipelines import datasets
    s.add_argument("--dataset", default="digits", choices=datasets.names(),
                   help="digits: 1,797 gray digit scans, in this checkout; emoji: 1,319 colour "
                   "Twemoji drawings in 6 Unicode groups, in its own workspace under "
                   ".labelgate/demos/")
    s.set_defaults(fn=cmd_demo)
    s = sub.add_parser("pull", help="pull new/changed annotations into data/raw (dvc add)")
    s.add_argument("--full", action="store_true",
                   help="compare every annotated task (reconciliation), not only updated ones")
    s.set_defaults(fn=cmd_pull)
    s = sub.add_parser("run", help="the whole retraining flow (Prefect)")
    s.add_argument("--force", action="store_true",
                   help="rerun every stage even when nothing changed")
    s.set_defaults(fn=cmd_run)
    s = sub.add_parser("evalset", help="freeze the fixed eval set from ground truth; "
                       "rebaseline production on a changed one")
    s.add_argument("action", choices=("freeze", "rebaseline"))
    s.add_argument("--force", action="store_true", help="replace an existing eval set")
    s.add_argument("--reason", default="", help="why the eval set changed (ledger)")
    s.add_argument("--reviewer", help="recorded in the ledger (default: your user name)")
    s.set_defaults(fn=cmd_evalset)
    for name, fn, what in (("approve", cmd_approve, "make a gated candidate production"),
                           ("reject", cmd_reject, "turn a candidate down")):
        s = sub.add_parser(name, help=what)
        s.add_argument("id", help="registry id (see `labelgate history`)")
        s.add_argument("--reason", required=True, help="recorded in the ledger")
        s.add_argument("--reviewer", help="recorded in the ledger (default: your user name)")
        if name == "approve":
            s.add_argument("--override-fail", action="store_true",
                           help="approve a candidate that FAILED the gate (recorded)")
        s.set_defaults(fn=fn)
    s = sub.add_parser("calibrate", help="retrain with k seeds; the gate's margins follow the "
                       "measured seed noise (the flow does this once production exists)")
    s.add_argument("--seeds", type=int, default=None,
                   help="trainings (default: gate.calibration_seeds)")
    s.set_defaults(fn=cmd_calibrate)
    s = sub.add_parser("history", help="the ledger: every candidate and decision")
    s.add_argument("--limit", type=int, default=50)
    s.set_defaults(fn=cmd_history)
    sub.add_parser("status", help="production model, last run, dataset version"
                   ).set_defaults(fn=cmd_status)
    s = sub.add_parser("rollback", help="put the previous production model back")
    s.add_argument("--to", help="registry id to restore (default: the previous one)")
    s.add_argument("--reason", default="", help="recorded in the ledger")
    s.add_argument("--reviewer", help="recorded in the ledger (default: your user name)")
    s.set_defaults(fn=cmd_rollback)
    s = sub.add_parser("remote", help="the DVC remote (S3): add URL [--endpoint] | status | "
                       "push (data, eval set, models and the registry)")
    s.add_argument("action", choices=("add", "status", "push"))
    s.add_argument("url", nargs="?", help="add: s3://BUCKET/PREFIX (no credentials in it)")
    s.add_argument("--endpoint", help="add: an S3-compatible server's URL (default: "
                   "storage.endpoint_url; \"\" = AWS)")
    s.add_argument("--name", default="storage", help="add: the DVC remote's name")
    s.set_defaults(fn=cmd_remote)
    s = sub.add_parser("checkout", help="restore the raw data, eval set and model file a "
                       "candidate was built from (git + DVC)")
    s.add_argument("id", help="registry id (see `labelgate history`)")
    s.set_defaults(fn=cmd_checkout)
    sub.add_parser("serve", help="Prefect deployment: cron + the new-labels trigger (params.yaml; "
                   "with schedule.pool set, the pool's workers run the flows)"
                   ).set_defaults(fn=cmd_serve)
    s = sub.add_parser("deploy", help="register the retraining deployment on a Prefect work "
                       "pool (created if missing) for `prefect worker start --pool NAME`")
    s.add_argument("--pool", default="", help="work pool name (default: schedule.pool; "
                   "train.pool gets the training deployment)")
    s.set_defaults(fn=cmd_deploy)
    s = sub.add_parser("backend", help="serve the production model as a Label Studio ML "
                       "backend")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=9090)
    s.set_defaults(fn=cmd_backend)
    s = sub.add_parser("init", help="a new workspace for an existing Label Studio project "
                       "(LABEL_STUDIO_URL / LABEL_STUDIO_API_KEY): params.yaml from its labeling "
                       "config and sampled images, dvc.yaml, git + DVC")
    s.add_argument("dir", help="the new workspace folder (must be empty unless --force)")
    s.add_argument("--project", required=True, help="Label Studio project id or exact title")
    s.add_argument("--force", action="store_true", help="write into a non-empty folder")
    s.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="a params.yaml value, e.g. --set gate.min_accuracy=0.8 (repeatable)")
    s.set_defaults(fn=cmd_init, no_workspace=True)
    s = sub.add_parser("classes", help="compare base.classes with Label Studio's labeling "
                       "config; --accept adopts Label Studio's list")
    s.add_argument("--accept", action="store_true",
                   help="rewrite base.classes from Label Studio (recorded in git)")
    s.set_defaults(fn=cmd_classes)
    s = sub.add_parser("predict", help="classify images with the production model")
    s.add_argument("images", nargs="+", metavar="IMAGE")
    s.set_defaults(fn=cmd_predict)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    layout = Layout(args.root)
    if getattr(args, "no_workspace", False):  # `init`: no params.yaml, no Prefect
        return _no_workspace(args, layout)
    _quiet_env(layout)
    from pipelines import settings
    from pipelines.dvcrepo import DvcError
    from pipelines.evalset import EvalSetError
    from pipelines.labelstudio import LabelStudioError
    from pipelines.lineage import LineageError
    from pipelines.prefect_server import PrefectServerError
    from pipelines.pull import PullError
    from pipelines.records import RecordError
    from pipelines.registry import RegistryError
    from pipelines.studio import StudioError
    from pipelines.classes import ClassesError
    try:
        params = settings.load(layout.params)
        return args.fn(args, layout, params)
    except (settings.ParamsError, LabelStudioError, PullError, StudioError, DvcError,
            EvalSetError, RegistryError, PrefectServerError, LineageError, RecordError,
            ClassesError) as exc:
        print(f"labelgate {args.command}: {exc}", file=sys.stderr)
        return 2


def _no_workspace(args, layout: Layout) -> int:
    from pipelines.dvcrepo import DvcError
    from pipelines.gitrepo import GitError
    from pipelines.labelstudio import LabelStudioError
    from pipelines.workspace import InitError
    try:
        return args.fn(args, layout)
    except (InitError, LabelStudioError, DvcError, GitError) as exc:
        print(f"labelgate {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
