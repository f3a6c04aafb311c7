"""Multi-node training as a cluster runs it: two `torchrun` launchers, each a "node" with its own
working directory and its own copy of the prepared data, meeting through torchrun's c10d
rendezvous on 127.0.0.1 (gloo on CPU), each running `python -m pipelines.train`.

Each node is pinned to one core (taskset) so that a process has the threads it would have as
one of two processes on one 2-core machine: the same world, the same threads, the same model
file byte for byte as `torchrun --nproc_per_node 2` (CPU kernels pick their reduction order by
thread count, so unpinned runs differ in the last bits).

The training split has 129 images at batch 16: the last global batch holds 1 image for 2 ranks
(one rank got an empty batch, whose loss is NaN, before loop.steps_per_epoch dropped it)."""
from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import uuid

import numpy as np
import pytest
import torch
import yaml

from pipelines import loop, net, packed, world
from pipelines.files import read_json, sha256_file
from tests import factories
from tests.test_train import BASE, write_prepared

SLOW = pytest.mark.slow   # the torchrun tests: ~15-45 s each on 2 cores (start-up, rendezvous)

TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")
OVERRIDES = {**BASE, "train.epochs": 3}
TIMEOUT_S = 200   # a launcher that outlives this hangs (exit barrier 300 s, rendezvous join 600 s)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cores() -> list[int]:
    """Two cores to pin the two nodes to (the same one twice on a 1-core machine)."""
    cores = sorted(os.sched_getaffinity(0))
    return [cores[0], cores[1 % len(cores)]]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("nodes")
    sizes = write_prepared(root / "prepared")
    (root / "params.yaml").write_text(yaml.safe_dump(factories.params_dict(OVERRIDES)))
    _one_more_row(root / "prepared" / "train")   # 129 = 8 x 16 + 1
    return {"root": root, "sizes": {**sizes, "train": sizes["train"] + 1}}


def _one_more_row(split_dir):
    """The split again with its first image once more (under another task id)."""
    tr = packed.read_split(split_dir)
    rows = [*range(len(tr)), 0]
    packed.write_split(split_dir, (factories.png_bytes(np.asarray(tr.x[i])[..., 0]) for i in rows),
                       y=tr.y[rows], task_id=[*tr.task_id, 10_000], sha256=[*tr.sha256, "f" * 64],
                       spec=tr.spec)


def _node_dir(prepared, where, name: str):
    """A node's own working directory: params.yaml and data/prepared copied in (as `git clone`
    + `dvc pull prepare` would put them there); no file shared with the other node."""
    node = where / name
    shutil.copytree(prepared["root"] / "prepared", node / "data" / "prepared")
    shutil.copy(prepared["root"] / "params.yaml", node / "params.yaml")
    return node


def _launch(nodes, *, port: int) -> list[tuple[int, str]]:
    """Start one torchrun launcher per node directory (as on each machine of a cluster), wait
    for all; (exit code, output) per node."""
    run_id = f"labelgate-{uuid.uuid4().hex[:8]}"
    procs = []
    for node, core in zip(nodes, _cores()):
        log = open(node / "torchrun.log", "w")
        procs.append((subprocess.Popen(
            ["taskset", "-c", str(core), TORCHRUN, "--nnodes", "2", "--nproc_per_node", "1",
             "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}",
             "--rdzv_id", run_id, "-m", "pipelines.train", "--prepared", "data/prepared",
             "--out", "models/candidate", "--params", "params.yaml"],
            cwd=node, stdout=log, stderr=subprocess.STDOUT), log, node))
    results = []
    try:
        for proc, log, node in procs:
            rc = proc.wait(timeout=TIMEOUT_S)
            log.close()
            results.append((rc, (node / "torchrun.log").read_text()))
    finally:
        for proc, log, _ in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            log.close()
    return results


@SLOW
def test_two_nodes_train_one_model_equal_to_two_processes_on_one_node(prepared, tmp_path):
    nodes = [_node_dir(prepared, tmp_path, "node-a"), _node_dir(prepared, tmp_path, "node-b")]
    results = _launch(nodes, port=_free_port())
    for rc, out in results:
        assert rc == 0, out[-3000:]
    # One writer: global rank 0, on whichever launcher the rendezvous made node 0.
    written = [n for n in nodes if (n / "models" / "candidate").exists()]
    assert len(written) == 1, written
    # ... and the other node says where the model is
    other = results[1 - nodes.index(written[0])][1]
    assert f"train: node 1 of 2 done; rank 0 writes the outputs, on {socket.gethostname()} " \
        "(to its --out)" in other
    out = written[0] / "models" / "candidate"
    assert sorted(p.name for p in out.iterdir()) == ["history.csv", "metrics.json",
                                                     "model.safetensors"]
    metrics = read_json(out / "metrics.json")
    assert metrics["processes"] == 2 and metrics["nodes"] == 2
    assert metrics["train_images"] == prepared["sizes"]["train"]
    assert metrics["epochs"] == OVERRIDES["train.epochs"] and metrics["device"] == "cpu"
    loaded = net.load(out / "model.safetensors", device=torch.device("cpu"))
    assert loaded.arch == "smallcnn"

    # The same world on one machine: two processes, one launcher, the same two cores.
    single = tmp_path / "single"
    proc = subprocess.run(
        ["taskset", "-c", ",".join(map(str, sorted(set(_cores())))), TORCHRUN,
         "--nproc_per_node", "2", "--master_port", str(_free_port()), "-m", "pipelines.train",
         "--prepared", str(prepared["root"] / "prepared"), "--out", str(single),
         "--params", str(prepared["root"] / "params.yaml")],
        capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    one_node = read_json(single / "metrics.json")
    assert one_node["processes"] == 2 and one_node["nodes"] == 1
    # Same ranks, same threads (1 per process either way): the same bytes.
    assert sha256_file(out / "model.safetensors") == sha256_file(single / "model.safetensors")
    assert (out / "history.csv").read_bytes() == (single / "history.csv").read_bytes()
    assert metrics["val_acc"] == one_node["val_acc"]


def _change_one_label(nodes):
    y_path = nodes[1] / "data" / "prepared" / "train" / "y.npy"
    y = np.load(y_path)
    y[0] = (y[0] + 1) % 10
    np.save(y_path, y)


def _remove_split(nodes):
    shutil.rmtree(nodes[1] / "data" / "prepared" / "val")


def _learn_nothing(nodes):
    """Both nodes alike, with a learning rate too small to learn anything in one epoch."""
    for node in nodes:
        raw = yaml.safe_load((node / "params.yaml").read_text())
        raw["train"].update(lr=1e-7, epochs=1)
        (node / "params.yaml").write_text(yaml.safe_dump(raw))


@SLOW
@pytest.mark.parametrize("spoil, expected", [
    (_change_one_label, r"node 1 \(host .*, rank 1\) has another train split than node 0 .*"
                        r"same git commit.*`dvc pull prepare`"),
    (_remove_split, r"node [01] \(host .*, rank [01]\) cannot train: .*val: not a prepared "
                    r"split.*same git commit.*`dvc pull prepare`"),
    (_learn_nothing, r"validation accuracy .* no better than chance"),
], ids=["other-data", "no-data", "chance-model"])
def test_a_failure_on_one_node_fails_every_node_promptly_with_a_clear_error(prepared, tmp_path,
                                                                            spoil, expected):
    """A node that pulled another data version (or none) would otherwise train on other rows
    under the same indices, silently: now no rank trains and every node says which one differs
    and what to run. A chance-level model fails on every rank, not only on rank 0: a rank that
    exited 0 kept its node's launcher in torchrun's exit barrier for 300 s, and that launcher
    then exited 0 (measured), so a scheduler saw half a success (TIMEOUT_S catches a return)."""
    nodes = [_node_dir(prepared, tmp_path, "node-a"), _node_dir(prepared, tmp_path, "node-b")]
    spoil(nodes)
    results = _launch(nodes, port=_free_port())
    for rc, out in results:
        assert rc != 0, out[-3000:]
        assert "train failed: " in out, out[-3000:]
        msg = out[out.index("train failed: "):].splitlines()[0]
        assert re.search(expected, msg), msg
    for node in nodes:
        assert not (node / "models" / "candidate" / "model.safetensors").exists()


# -- the parts, in one process ----------------------------------------------------------------------

def test_a_last_batch_smaller_than_the_world_is_dropped():
    assert loop.steps_per_epoch(129, 16) == 9                 # one process: every image
    assert loop.steps_per_epoch(129, 16, world=2) == 8        # 1 image for 2 ranks: dropped
    assert loop.steps_per_epoch(130, 16, world=2) == 9        # 2 images: one each
    assert loop.steps_per_epoch(128, 16, world=2) == 8
    assert loop.steps_per_epoch(3, 16, world=4) == 0          # fit refuses: too few images


def test_facts_change_with_a_label_an_image_or_a_setting_and_nothing_else(prepared, tmp_path):
    params = factories.params(OVERRIDES)
    split = packed.read_split(prepared["root"] / "prepared" / "train")

    def facts(p=params, s=split, **init):
        return world.facts(p, {"train": s}, init_model=init.get("model"),
                           init_model_sha256=init.get("sha"))

    base = facts()
    assert facts() == base
    y = split.y.copy()
    y[5] = (y[5] + 1) % 10
    relabelled = facts(s=packed.Split(split.x, y, split.task_id, split.sha256, split.spec))
    sha = split.sha256.copy()
    sha[5] = "0" * 64
    other_image = facts(s=packed.Split(split.x, split.y, split.task_id, sha, split.spec))
    more_epochs = facts(p=factories.params({**OVERRIDES, "train.epochs": 4}))
    for changed in (relabelled, other_image, more_epochs):
        differ = {k for k in base if changed[k] != base[k]}
        assert len(differ) == 1, differ
    assert "production model to warm-start from" not in base
    warm = {**OVERRIDES, "train.init": "production"}
    a = facts(p=factories.params(warm), sha="a" * 64)
    assert a != facts(p=factories.params(warm), sha="b" * 64)
    assert a["production model to warm-start from"] != \
        facts(p=factories.params(warm))["production model to warm-start from"]   # none there


def test_one_process_needs_no_group_and_reports_its_own_problem():
    w = world.init("cpu")
    assert (w.rank, w.size, w.nodes, w.local_size) == (0, 1, 1, 1)
    world.agree(w, {"train split": "x"})                      # nothing to compare
    with pytest.raises(world.WorldError, match="^data/prepared/val: missing$"):
        world.agree(w, None, problem="data/prepared/val: missing")
