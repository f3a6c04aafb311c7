"""pipelines.registry and pipelines.promote: one production pointer that changes only by an atomic
rename, a content-addressed blob store checked on every load, an append-only ledger."""
from __future__ import annotations

import os

os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")

import dataclasses  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from pipelines import gate, net, promote, registry  # noqa: E402
from pipelines.inputspec import InputSpec  # noqa: E402
from pipelines.files import read_json, sha256_file  # noqa: E402
from pipelines.registry import RegistryError  # noqa: E402
from tests import factories, killpoints  # noqa: E402

CLASSES = tuple(str(i) for i in range(10))
SPEC = InputSpec.legacy_gray(28)
CPU = torch.device("cpu")
EVAL_HASH = "e" * 64


def make_model(path, seed: int):
    """A freshly built net saved via net.save; distinct seeds give distinct files."""
    torch.manual_seed(seed)
    model = net.build("smallcnn", CLASSES, SPEC).eval()
    net.save(model, path, arch="smallcnn", classes=CLASSES, spec=SPEC)
    return model


def predictions(accuracy: float, n: int = 200, seed: int = 0):
    """(y_true, y_pred) with exactly round(accuracy * n) correct. The same seed gives the same
    labels and nested error sets: a higher accuracy only fixes mistakes of a lower one."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, len(CLASSES), n)
    pred = y.copy()
    wrong = rng.permutation(n)[:n - round(accuracy * n)]
    pred[wrong] = (y[wrong] + 1) % len(CLASSES)
    return y, pred


def gate_decision(tmp_path, model_file, accuracy: float, *, production: dict | None = None,
                  name: str = "gate"):
    """Run the real gate on an evaluation of `model_file` at `accuracy`: decision.json exactly as
    gate.run writes it (candidate_sha256 = the file's sha256). Returns (path, decision)."""
    y, pred = predictions(accuracy)
    prod_pred = predictions(production["accuracy"])[1] if production else None
    ev, rows = factories.evaluation(
        y, pred, prod_pred, cand_sha=sha256_file(model_file), cand_conf=accuracy,
        prod_conf=production["accuracy"] if production else 0.9, eval_hash=EVAL_HASH,
        **({"prod_id": production["id"], "prod_sha": production["sha256"]} if production else {}))
    folder = factories.write_evaluation(tmp_path / f"{name}-evaluation", ev, rows)
    decision = gate.run(folder, tmp_path / name, params=factories.params())
    return tmp_path / name / "decision.json", decision


def promote_run(model_file, decision_path, reg, **kw):
    return promote.run(model_file, decision_path, reg, dataset_version="pulls-000001-abc",
                       params_hash="p" * 64, code=promote.code_version(), **kw)


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture
def first(tmp_path):
    """A registry whose production is model A (promoted through a PASS decision)."""
    reg = tmp_path / "registry"
    a_file = tmp_path / "a" / "model.safetensors"
    a_model = make_model(a_file, seed=1)
    decision_path, decision = gate_decision(tmp_path, a_file, 0.95, name="gate-a")
    assert decision["verdict"] == "PASS"
    event = promote_run(a_file, decision_path, reg)
    return {"tmp": tmp_path, "reg": reg, "a_file": a_file, "a_model": a_model, "a_event": event,
            "a_sha": sha256_file(a_file)}


def test_pass_makes_the_candidate_production(first):
    reg, sha, event = first["reg"], first["a_sha"], first["a_event"]
    assert event["event"] == "promoted" and event["verdict"] == "PASS"
    pointer = registry.production(reg)
    assert pointer["id"] == event["id"] and pointer["sha256"] == sha
    assert pointer["via"] == "gate" and pointer["previous"] is None
    assert pointer["eval_hash"] == EVAL_HASH
    blob = registry.blob_path(reg, sha)
    assert blob.exists() and sha256_file(blob) == sha
    assert [e["event"] for e in registry.ledger(reg)] == ["candidate", "promoted"]
    assert all(e["id"] == event["id"] for e in registry.ledger(reg))
    loaded, loaded_pointer = registry.load_production(reg, device=CPU)
    assert loaded.classes == CLASSES and loaded.spec == SPEC and loaded_pointer == pointer
    assert loaded.arch == "smallcnn" and same_weights(loaded.module, first["a_model"])


def test_no_production_yet(tmp_path):
    assert registry.production(tmp_path / "registry") is None
    assert registry.load_production(tmp_path / "registry", device=CPU) is None
    assert registry.ledger(tmp_path / "registry") == []


def test_fail_leaves_production_unchanged_and_records_the_candidate(first):
    tmp, reg = first["tmp"], first["reg"]
    pointer_bytes = (reg / registry.POINTER).read_bytes()
    b_file = tmp / "b" / "model.safetensors"
    make_model(b_file, seed=2)
    prod = registry.production(reg)
    decision_path, decision = gate_decision(
        tmp, b_file, 0.80, production={"id": prod["id"], "sha256": prod["sha256"],
                                       "accuracy": 0.95}, name="gate-b")
    assert decision["verdict"] == "FAIL"
    result = promote_run(b_file, decision_path, reg)
    assert result["event"] == "rejected" and result["verdict"] == "FAIL"
    assert (reg / registry.POINTER).read_bytes() == pointer_bytes
    events = registry.ledger(reg)
    assert [e["event"] for e in events] == ["candidate", "promoted", "candidate", "rejected"]
    cand = events[-2]
    assert cand["sha256"] == sha256_file(b_file) and cand["verdict"] == "FAIL"
    assert cand["tests"] == decision["tests"] and cand["production_at_gate"] == prod["id"]
    assert cand["code_version"] and cand["params_hash"] and cand["dataset_version"]
    assert events[-1]["by"] == "gate" and "accuracy vs production" in events[-1]["reason"]
    # kept (content-addressed, verified) so a reviewer could still look at it; not production
    assert registry.blob_path(reg, sha256_file(b_file)).exists()
    # the same failed candidate again: nothing new
    again = promote_run(b_file, decision_path, reg)
    assert again["event"] == "unchanged" and len(registry.ledger(reg)) == len(events)


def test_promoting_production_again_is_a_no_op(first):
    _, decision = gate_decision(first["tmp"], first["a_file"], 0.95, name="gate-a2")
    result = promote_run(first["a_file"], first["tmp"] / "gate-a2" / "decision.json", first["reg"])
    assert result["event"] == "unchanged" and result["id"] == first["a_event"]["id"]
    assert len(registry.ledger(first["reg"])) == 2


def promote_b(first, seed=2):
    tmp, reg = first["tmp"], first["reg"]
    b_file = tmp / f"b{seed}" / "model.safetensors"
    b_model = make_model(b_file, seed=seed)
    prod = registry.production(reg)
    decision_path, decision = gate_decision(
        tmp, b_file, 0.96, production={"id": prod["id"], "sha256": prod["sha256"],
                                       "accuracy": 0.95}, name=f"gate-b{seed}")
    assert decision["verdict"] == "PASS"
    return b_file, b_model, decision_path


@pytest.mark.parametrize("crash_at", ["atomic_write_json", "os.replace"])
def test_crash_during_promotion_keeps_the_previous_production(first, monkeypatch, crash_at):
    reg = first["reg"]
    pointer_bytes = (reg / registry.POINTER).read_bytes()
    b_file, b_model, decision_path = promote_b(first)

    if crash_at == "atomic_write_json":
        def crash(*args, **kwargs):
            raise OSError("simulated crash before the pointer was written")
        monkeypatch.setattr(registry, "atomic_write_json", crash)
    else:
        real_replace = os.replace

        def crash(src, dst, *args, **kwargs):  # the rename that would commit the new pointer
            if os.path.basename(dst) == registry.POINTER:
                raise OSError("simulated crash at the commit rename")
            return real_replace(src, dst, *args, **kwargs)
        monkeypatch.setattr(os, "replace", crash)

    with pytest.raises(OSError, match="simulated crash"):
        promote_run(b_file, decision_path, reg)
    monkeypatch.undo()

    assert (reg / registry.POINTER).read_bytes() == pointer_bytes
    loaded, pointer = registry.load_production(reg, device=CPU)
    model = loaded.module
    assert pointer["sha256"] == first["a_sha"]
    assert same_weights(model, first["a_model"])
    assert not [p.name for p in reg.iterdir() if p.name.startswith(f".{registry.POINTER}")]

    # after the crash, running promote again finishes the job
    event = promote_run(b_file, decision_path, reg)
    assert event["event"] == "promoted"
    loaded, pointer = registry.load_production(reg, device=CPU)
    model = loaded.module
    assert pointer["sha256"] == sha256_file(b_file) and pointer["previous"] == first["a_event"]["id"]
    assert same_weights(model, b_model)


def test_tampered_blob_is_refused(first):
    reg, sha = first["reg"], first["a_sha"]
    blob = registry.blob_path(reg, sha)
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit, in the weights
    blob.write_bytes(bytes(data))
    with pytest.raises(RegistryError, match="does not match its recorded sha256"):
        registry.load_production(reg, device=CPU)


def test_missing_blob_is_refused(first):
    registry.blob_path(first["reg"], first["a_sha"]).unlink()
    with pytest.raises(RegistryError, match="missing"):
        registry.load_production(first["reg"], device=CPU)


def test_set_production_refuses_a_pointer_to_a_bad_blob(first):
    reg = first["reg"]
    pointer_bytes = (reg / registry.POINTER).read_bytes()
    with pytest.raises(RegistryError):
        registry.set_production(reg, dataclasses.replace(registry.production(reg),
                                                         id="m9999-x", sha256="0" * 64))
    assert (reg / registry.POINTER).read_bytes() == pointer_bytes


def test_rollback_restores_the_previous_model(first):
    reg = first["reg"]
    b_file, b_model, decision_path = promote_b(first)
    b_event = promote_run(b_file, decision_path, reg)
    assert registry.production(reg)["id"] == b_event["id"]

    pointer = registry.rollback(reg, reason="bad predictions in review")
    assert pointer["id"] == first["a_event"]["id"] and pointer["sha256"] == first["a_sha"]
    assert pointer["via"] == "rollback" and pointer["rolled_back_from"] == b_event["id"]
    # `previous` is A's own predecessor (none): a second rollback goes further back, it does
    # not toggle back to B
    assert pointer["previous"] is None
    with pytest.raises(RegistryError, match="no previous production model"):
        registry.rollback(reg)
    assert registry.production(reg).to_json() == pointer       # the command returns its JSON
    model = registry.load_production(reg, device=CPU)[0].module
    assert same_weights(model, first["a_model"])
    last = registry.ledger(reg)[-1]
    assert last["event"] == "rolled_back" and last["id"] == first["a_event"]["id"]
    assert last["reason"] == "bad predictions in review"
    # and forward again, by id
    registry.rollback(reg, to=b_event["id"])
    model = registry.load_production(reg, device=CPU)[0].module
    assert same_weights(model, b_model)


def test_rollback_errors(first, tmp_path):
    with pytest.raises(RegistryError, match="no production model"):
        registry.rollback(tmp_path / "empty")
    with pytest.raises(RegistryError, match="no previous production model"):
        registry.rollback(first["reg"])  # A was the first model
    with pytest.raises(RegistryError, match="never a production model"):
        registry.rollback(first["reg"], to="m0042-0123456789")
    assert registry.production(first["reg"])["sha256"] == first["a_sha"]


def test_model_changed_after_gating_is_refused(first):
    tmp, reg = first["tmp"], first["reg"]
    c_file = tmp / "c" / "model.safetensors"
    make_model(c_file, seed=3)
    decision_path, decision = gate_decision(tmp, c_file, 0.99, name="gate-c")
    assert decision["verdict"] == "PASS"
    ledger_before = (reg / registry.LEDGER).read_bytes()
    make_model(c_file, seed=4)  # retrained in place after the gate ran
    assert sha256_file(c_file) != decision["candidate_sha256"]
    with pytest.raises(RegistryError, match="changed after it was gated"):
        promote_run(c_file, decision_path, reg)
    assert (reg / registry.LEDGER).read_bytes() == ledger_before
    assert registry.production(reg)["sha256"] == first["a_sha"]
    assert not registry.blob_path(reg, sha256_file(c_file)).exists()


def test_ledger_is_append_only_across_promotions(first):
    reg = first["reg"]
    before = (reg / registry.LEDGER).read_bytes()
    b_file, _, decision_path = promote_b(first)
    promote_run(b_file, decision_path, reg)
    after = (reg / registry.LEDGER).read_bytes()
    assert after.startswith(before) and len(after) > len(before)
    ids = [e["id"] for e in registry.ledger(reg) if e["event"] == "candidate"]
    assert len(ids) == len(set(ids)) == 2
    assert read_json(reg / registry.POINTER)["id"] == ids[-1]


# -- reviewers: approve / reject, re-baseline, ledger recovery ------------------------------------

def gated_b(first, accuracy: float, *, seed: int = 5, **params):
    """Model B gated against production A (0.95) at `accuracy`, with gate params overridden."""
    tmp, reg = first["tmp"], first["reg"]
    b_file = tmp / f"r{seed}" / "model.safetensors"
    make_model(b_file, seed=seed)
    prod = registry.production(reg)
    y, pred = predictions(accuracy)
    ev, rows = factories.evaluation(
        y, pred, predictions(0.95)[1], cand_sha=sha256_file(b_file), cand_conf=accuracy,
        prod_conf=0.95, eval_hash=prod["eval_hash"], prod_id=prod["id"], prod_sha=prod["sha256"])
    folder = factories.write_evaluation(tmp / f"ev-{seed}", ev, rows)
    decision = gate.run(folder, tmp / f"gate-{seed}",
                        params=factories.params({f"gate.{k}": v for k, v in params.items()}))
    return b_file, tmp / f"gate-{seed}" / "decision.json", decision


def test_inconclusive_waits_for_a_reviewer_who_approves_it(first):
    reg = first["reg"]
    # 4 of 200 images newly wrong, none newly right: a 2 % drop, but p = 1/16 (could be noise)
    b_file, path, decision = gated_b(first, 0.93, on_inconclusive="ask_reviewer")
    assert decision["verdict"] == "INCONCLUSIVE"
    event = promote_run(b_file, path, reg)
    assert event["event"] == "pending_review"
    assert registry.production(reg)["id"] == first["a_event"]["id"]     # production kept
    pointer = registry.approve(reg, event["id"], reason="drop is in class 3 noise", reviewer="ana")
    assert pointer["id"] == event["id"] and pointer["via"] == "approved"
    assert pointer["reviewer"] == "ana" and pointer["previous"] == first["a_event"]["id"]
    kinds = [e["event"] for e in registry.ledger(reg)]
    assert kinds[-3:] == ["pending_review", "approved", "promoted"]
    model = registry.load_production(reg, device=CPU)[0].module              # verified blob
    with pytest.raises(RegistryError, match="already the production model"):
        registry.approve(reg, event["id"], reason="again", reviewer="ana")
    # and back: rollback restores A, naming who
    back = registry.rollback(reg, reason="complaints", reviewer="bo")
    assert back["id"] == first["a_event"]["id"] and back["reviewer"] == "bo"


def test_inconclusive_keeps_production_by_default(first):
    b_file, path, decision = gated_b(first, 0.93)
    assert decision["verdict"] == "INCONCLUSIVE"
    event = promote_run(b_file, path, first["reg"])
    assert event["event"] == "rejected"
    assert registry.ledger(first["reg"])[-1]["reason"] == "inconclusive: production kept"


def test_approving_a_failed_candidate_needs_an_explicit_override(first):
    reg = first["reg"]
    b_file, path, decision = gated_b(first, 0.80)
    assert decision["verdict"] == "FAIL"
    model_id = promote_run(b_file, path, reg)["id"]
    with pytest.raises(RegistryError, match="--override-fail"):
        registry.approve(reg, model_id, reason="ship it", reviewer="ana")
    assert registry.production(reg)["id"] == first["a_event"]["id"]
    pointer = registry.approve(reg, model_id, reason="known label bug", reviewer="ana",
                               override_fail=True)
    assert pointer["id"] == model_id
    assert registry.ledger(reg)[-2]["override_fail"] is True


def test_reject_is_recorded_and_production_cannot_be_rejected(first):
    reg = first["reg"]
    b_file, path, _ = gated_b(first, 0.93, on_inconclusive="ask_reviewer")
    model_id = promote_run(b_file, path, reg)["id"]
    event = registry.reject(reg, model_id, reason="looks off", reviewer="ana")
    assert event["event"] == "rejected" and event["reviewer"] == "ana"
    with pytest.raises(RegistryError, match="rollback"):
        registry.reject(reg, first["a_event"]["id"], reason="x", reviewer="ana")
    with pytest.raises(RegistryError, match="no candidate"):
        registry.reject(reg, "m9999-nope", reason="x", reviewer="ana")


def test_rebaseline_then_an_old_candidate_cannot_be_approved(first):
    reg = first["reg"]
    b_file, path, _ = gated_b(first, 0.93, on_inconclusive="ask_reviewer")
    model_id = promote_run(b_file, path, reg)["id"]
    event = registry.rebaseline(reg, eval_hash="f" * 64, accuracy=0.91, reason="new eval set",
                                reviewer="ana")
    assert event["old_eval_hash"] == EVAL_HASH and event["eval_hash"] == "f" * 64
    pointer = registry.production(reg)
    assert pointer["eval_hash"] == "f" * 64 and pointer["metrics"]["eval_accuracy"] == 0.91
    assert pointer["id"] == first["a_event"]["id"]
    with pytest.raises(RegistryError, match="gated on eval set"):
        registry.approve(reg, model_id, reason="x", reviewer="ana")


def test_a_registry_from_before_plans_gets_its_missing_ledger_line(first):
    """Registries written by labelgate before plans existed could hold a pointer renamed without
    its ledger line; the next command completes the ledger, marked `recovered`."""
    reg = first["reg"]
    b_file, _, _ = promote_b(first)
    sha, _ = registry.store(reg, b_file)
    old = registry.production(reg)
    registry.set_production(reg, dataclasses.replace(
        old, id="m0002-legacy", sha256=sha, since="2026-01-01T00:00:00Z", previous=old.id))
    with registry.lock(reg):
        assert registry.reconcile(reg) is None
    last = registry.ledger(reg)[-1]
    assert last["event"] == "promoted" and last["recovered"] is True
    assert last["id"] == "m0002-legacy" and last["since"] == "2026-01-01T00:00:00Z"
    n = len(registry.ledger(reg))
    with registry.lock(reg):
        registry.reconcile(reg)
    assert len(registry.ledger(reg)) == n                         # once


def test_a_pending_plan_is_completed_by_the_next_command_whatever_it_is(first, monkeypatch):
    """A promotion killed after its plan: the old model stays production until the next
    registry command (here a reviewer's reject of another candidate) completes the plan first."""
    reg = first["reg"]
    b_file, _, decision_path = promote_b(first)
    real = registry.set_production

    def crash(*args, **kwargs):
        raise OSError("simulated crash before the pointer rename")
    monkeypatch.setattr(registry, "set_production", crash)
    with pytest.raises(OSError, match="simulated crash"):
        promote_run(b_file, decision_path, reg)
    monkeypatch.setattr(registry, "set_production", real)
    assert registry.production(reg)["sha256"] == first["a_sha"]       # still the old model
    assert registry.pending(reg)["key"][0] == "promote"
    with pytest.raises(RegistryError, match="no candidate"):
        registry.reject(reg, "m9999-none", reason="x", reviewer="ana")
    # the failed reject still completed the plan: B is production, its line written once
    assert registry.production(reg)["sha256"] == sha256_file(b_file)
    assert registry.pending(reg) is None
    assert [e["event"] for e in registry.ledger(reg)] == ["candidate", "promoted", "candidate",
                                                          "promoted"]


# -- a real kill at every write event -------------------------------------------------------------

def registry_state(reg) -> dict:
    """What a registry holds, minus wall-clock times: ledger lines, pointer, every file (no plan
    left pending, no temp files), blob contents."""
    def timeless(d):
        return {k: v for k, v in d.items() if k not in ("at", "since")}
    pointer = registry.production(reg)
    return {"ledger": [timeless(e) for e in registry.ledger(reg)],
            "pointer": timeless(pointer) if pointer else None,
            "files": sorted(str(p.relative_to(reg)) for p in reg.rglob("*")),
            "blobs": {p.name: sha256_file(p) for p in (reg / registry.BLOBS).iterdir()}}


@pytest.fixture
def ws(tmp_path, monkeypatch):
    """A workspace (params.yaml, models/registry) whose production is A; no Label Studio is
    configured, so the reviewer commands' sync reports itself pending at once."""
    for var in ("LABEL_STUDIO_URL", "LABEL_STUDIO_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect"))  # cli.main sets it otherwise
    root = tmp_path / "ws"
    root.mkdir()
    (root / "params.yaml").write_text((factories.REPO / "params.yaml").read_text())
    reg = root / "models" / "registry"
    a_file = root / "a" / "model.safetensors"
    make_model(a_file, seed=1)
    path, _ = gate_decision(root, a_file, 0.95, name="gate-a")
    a_id = promote_run(a_file, path, reg)["id"]
    return {"tmp": root, "reg": reg, "a_id": a_id, "runs": tmp_path / "runs"}


def kill_everywhere(ws, module: str, args, rerun) -> int:
    """Run `python -m module args(root)` on a copy of the workspace uninterrupted (the expected
    state), then, on a fresh copy for each of its write events, SIGKILL it right before that
    event and `rerun(root)` the same command in this process: the state must be the expected
    one. `args`/`rerun` take the copy's root. Returns the number of write events."""
    def copy(name):
        dest = ws["runs"] / name
        shutil.copytree(ws["tmp"], dest, symlinks=True)
        return dest
    ref = copy("reference")
    full = killpoints.run(module, args(ref), root=ref / "models" / "registry", cwd=ref)
    assert full.returncode == 0, full.stderr[-2000:]
    expected = registry_state(ref / "models" / "registry")
    assert expected["pointer"] is not None and full.events
    for k, event in enumerate(full.events):
        root = copy(f"kill-{k}")
        killed = killpoints.run(module, args(root), root=root / "models" / "registry",
                                kill_at=k, cwd=root)
        assert killed.killed, (k, event, killed.returncode, killed.stderr[-2000:])
        out = rerun(root)
        got = registry_state(root / "models" / "registry")
        assert got == expected, f"killed before write {k} ({event}); re-run said {out!r}"
    return len(full.events)


def promote_args(b_dir: str, gate_dir: str):
    def args(root):
        return ["--model", str(root / b_dir / "model.safetensors"),
                "--decision", str(root / gate_dir / "decision.json"),
                "--registry", str(root / "models" / "registry"), "--raw", str(root / "none"),
                "--params", str(root / "params.yaml")]
    return args


def promote_again(args):
    def rerun(root):
        cwd = os.getcwd()
        os.chdir(root)  # code_version() reads the git repo of the working folder (none here)
        try:
            assert promote.main(args(root)) == 0
        finally:
            os.chdir(cwd)
    return rerun


@pytest.mark.parametrize("accuracy, verdict, last", [
    (0.96, "PASS", "promoted"), (0.93, "INCONCLUSIVE", "pending_review"),
    (0.80, "FAIL", "rejected")])
def test_promote_killed_at_every_write_ends_as_one_uninterrupted_run(ws, accuracy, verdict,
                                                                    last):
    b_file, decision_path, decision = gated_b(ws, accuracy, on_inconclusive="ask_reviewer")
    assert decision["verdict"] == verdict
    args = promote_args(b_file.parent.name, decision_path.parent.name)
    n = kill_everywhere(ws, "pipelines.promote", args, promote_again(args))
    ledger = registry.ledger(ws["runs"] / "reference" / "models" / "registry")
    assert [e["event"] for e in ledger][-2:] == ["candidate", last]
    assert n >= 7  # lock, blob (temp + rename), plan (temp + rename), ledger lines, plan removal


def cli_again(*command):
    def rerun(root):
        from pipelines import cli
        rc = cli.main(["--root", str(root), *command])
        assert rc == 0
    return rerun


@pytest.mark.slow  # one `labelgate` process per write event (~10 s each when busy)
def test_approve_killed_at_every_write_writes_one_approved_line(ws, capsys):
    b_file, path, _ = gated_b(ws, 0.93, on_inconclusive="ask_reviewer")
    b_id = promote_run(b_file, path, ws["reg"])["id"]
    command = ("approve", b_id, "--reason", "checked", "--reviewer", "ana")
    kill_everywhere(ws, "pipelines.cli", lambda root: ["--root", str(root), *command],
                    cli_again(*command))
    ledger = registry.ledger(ws["runs"] / "reference" / "models" / "registry")
    assert [e["event"] for e in ledger][-3:] == ["pending_review", "approved", "promoted"]
    assert "Label Studio sync pending" in capsys.readouterr().out


@pytest.mark.slow  # one `labelgate` process per write event (~10 s each when busy)
def test_rollback_killed_at_every_write_goes_back_one_model(ws, capsys):
    reg = ws["reg"]
    ids = [ws["a_id"]]
    for seed in (11, 12):  # B and C, each PASSing over the one before
        b_file, path, decision = gated_b(ws, 0.96, seed=seed)
        assert decision["verdict"] == "PASS"
        ids.append(promote_run(b_file, path, reg)["id"])
    assert registry.production(reg)["id"] == ids[2]
    command = ("rollback", "--reason", "complaints", "--reviewer", "bo")
    n = kill_everywhere(ws, "pipelines.cli", lambda root: ["--root", str(root), *command],
                        cli_again(*command))
    for k in range(n):  # every re-run: B, not A
        assert registry.production(ws["runs"] / f"kill-{k}" / "models" / "registry")["id"] == ids[1]
    out = capsys.readouterr().out
    assert out.count("finished an interrupted run of this command") >= 1


@pytest.mark.slow  # one `labelgate` process per write event (~10 s each when busy)
def test_reject_killed_at_every_write_writes_one_line(ws):
    b_file, path, _ = gated_b(ws, 0.93, on_inconclusive="ask_reviewer")
    b_id = promote_run(b_file, path, ws["reg"])["id"]
    command = ("reject", b_id, "--reason", "looks off", "--reviewer", "ana")
    kill_everywhere(ws, "pipelines.cli", lambda root: ["--root", str(root), *command],
                    cli_again(*command))
    ledger = registry.ledger(ws["runs"] / "reference" / "models" / "registry")
    assert [e["event"] for e in ledger][-2:] == ["pending_review", "rejected"]


def test_a_second_rollback_during_the_first_ones_sync_is_a_second_rollback(first):
    """A plan pending while its command still runs (here: in its Label Studio sync) is not an
    interrupted one: a second reviewer's rollback waits for it, then goes back one more."""
    import threading
    reg = first["reg"]
    ids = [first["a_event"]["id"]]
    for seed in (21, 22):
        b_file, _, decision_path = promote_b(first, seed=seed)
        ids.append(promote_run(b_file, decision_path, reg)["id"])
    in_sync, release = threading.Event(), threading.Event()

    def slow_sync():
        in_sync.set()
        assert release.wait(30)
    results = {}
    first_rollback = threading.Thread(target=lambda: results.setdefault(
        "first", registry.rollback(reg, reason="one", reviewer="ana", then=slow_sync)))
    first_rollback.start()
    assert in_sync.wait(30)
    second = threading.Thread(target=lambda: results.setdefault(
        "second", registry.rollback(reg, reason="two", reviewer="bo", then=lambda: None)))
    second.start()
    second.join(1.0)
    assert second.is_alive()                       # waiting for the first command to finish
    release.set()
    first_rollback.join(30)
    second.join(30)
    assert results["first"]["id"] == ids[1] and "resumed" not in results["first"]
    assert results["second"]["id"] == ids[0] and "resumed" not in results["second"]
    assert registry.production(reg)["id"] == ids[0]


def test_a_follow_up_a_crashed_command_owed_is_run_by_the_next_command(first):
    reg = first["reg"]
    b_file, _, decision_path = promote_b(first)
    promote_run(b_file, decision_path, reg)
    c_file, c_path, _ = gated_b(first, 0.93, on_inconclusive="ask_reviewer")
    c_id = promote_run(c_file, c_path, reg)["id"]

    def crash():
        raise OSError("killed during the sync")
    with pytest.raises(OSError, match="killed during the sync"):
        registry.rollback(reg, reason="x", reviewer="ana", then=crash)
    assert registry.production(reg)["id"] == first["a_event"]["id"]   # the writes are made
    assert registry.pending(reg)["then"] is True                      # the sync is owed
    calls = []
    registry.reject(reg, c_id, reason="no", reviewer="ana", then=lambda: calls.append(1))
    assert calls == [1] and registry.pending(reg) is None
    # nothing owed, nothing run
    registry.reject(reg, c_id, reason="still no", reviewer="ana", then=lambda: calls.append(2))
    assert calls == [1]
    assert [e["event"] for e in registry.ledger(reg)].count("rolled_back") == 1


def test_stale_temp_files_of_a_killed_writer_are_removed_under_the_lock(first):
    reg = first["reg"]
    stale = [reg / ".production.json.abcd1234.tmp", reg / "blobs" / ".x.safetensors.k_9zq0aa.tmp"]
    for p in stale:
        p.write_bytes(b"half")
    foreign = [reg / "notes.tmp", reg / ".production.json.tmp"]   # not our naming pattern
    for p in foreign:
        p.write_bytes(b"keep")
    with registry.lock(reg):
        pass
    assert not any(p.exists() for p in stale)
    assert all(p.read_bytes() == b"keep" for p in foreign)


def test_history_approve_and_reject_from_the_command_line(tmp_path, capsys):
    from pipelines import cli
    root = tmp_path / "ws"
    root.mkdir()
    (root / "params.yaml").write_text((factories.REPO / "params.yaml").read_text())
    reg = root / "models" / "registry"
    a_file = tmp_path / "a" / "model.safetensors"
    make_model(a_file, seed=1)
    path, _ = gate_decision(tmp_path, a_file, 0.95, name="cli-a")
    a_id = promote_run(a_file, path, reg)["id"]
    first = {"tmp": tmp_path, "reg": reg}
    b_file, b_path, decision = gated_b(first, 0.93, on_inconclusive="ask_reviewer")
    b_id = promote_run(b_file, b_path, reg)["id"]
    assert cli.main(["--root", str(root), "history"]) == 0
    out = capsys.readouterr().out
    assert a_id in out and b_id in out and "pending_review" in out and "INCONCLUSIVE" in out
    assert cli.main(["--root", str(root), "approve", b_id, "--reason", "checked the flips",
                     "--reviewer", "ana"]) == 0
    assert registry.production(reg)["id"] == b_id
    assert cli.main(["--root", str(root), "reject", b_id, "--reason", "x"]) == 2
    assert "use `labelgate rollback`" in capsys.readouterr().err
    assert cli.main(["--root", str(root), "rollback", "--reason", "back"]) == 0
    assert registry.production(reg)["id"] == a_id
    assert cli.main(["--root", str(root), "history"]) == 0
    assert "ana checked the flips" in capsys.readouterr().out
