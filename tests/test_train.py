"""pipelines.train on real digit scans: outputs, determinism, streaming == resident, the input
spec and normalisation in the model file, init from weights / warm start from production,
divergence and chance-level models caught with readable errors."""
from __future__ import annotations

import csv
import dataclasses
import math
import re

import numpy as np
import pytest
import torch

from pipelines import archs, finetune, inputspec, loop, net, packed, settings, train
from pipelines.files import read_json, sha256_file
from tests import factories

PER_CLASS = 16           # 160 real scans: 128 train, 32 val
EPOCHS = 3
BATCH = 16
CPU = torch.device("cpu")
# the small CNN at a quick CPU setting; every test states what it changes
BASE = {"train.epochs": EPOCHS, "train.batch_size": BATCH, "train.lr": 0.003,
        "train.device": "cpu", "train.arch": "smallcnn", "train.warmup": 0.1}


def train_params(**overrides):
    return factories.params({**BASE, **overrides})


def write_prepared(folder, *, per_class: int = PER_CLASS, params=None) -> dict:
    """prepared/train and prepared/val as pipelines/prepare.py writes them (packed.write_split)."""
    spec = inputspec.from_params(params or train_params())
    digits = factories.digits_by_class(per_class)
    blobs = [data for _, data, _ in digits]
    y = np.array([cls for _, _, cls in digits], dtype=np.int64)
    task_id = np.arange(1, len(y) + 1, dtype=np.int64)
    val = task_id % 5 == 0
    sizes = {}
    for name, mask in (("train", ~val), ("val", val)):
        idx = np.nonzero(mask)[0]
        packed.write_split(folder / name, (blobs[i] for i in idx), y=y[idx], task_id=task_id[idx],
                           sha256=[f"{i:064x}" for i in task_id[idx]], spec=spec)
        sizes[name] = len(idx)
    return sizes


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    sizes = write_prepared(root / "prepared")
    params = train_params()
    metrics = train.run(root / "prepared", root / "out", params=params)
    return {"root": root, "sizes": sizes, "params": params, "metrics": metrics,
            "out": root / "out", "prepared": root / "prepared"}


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_writes_model_history_and_metrics(trained):
    out = trained["out"]
    rows = _rows(out / "history.csv")
    assert [int(r["epoch"]) for r in rows] == list(range(1, EPOCHS + 1))  # one row per epoch
    assert set(rows[0]) == {"epoch", "train_loss", "train_acc", "val_loss", "val_acc"}
    assert all(math.isfinite(float(r[k])) for r in rows for k in r)
    m = read_json(out / "metrics.json")
    assert m == trained["metrics"]
    assert m["device"] == "cpu" and m["epochs"] == EPOCHS and m["arch"] == "smallcnn"
    assert m["resident"] is True and m["init"] == "from scratch"
    assert m["train_images"] == trained["sizes"]["train"]
    assert m["val_images"] == trained["sizes"]["val"]
    assert m["val_acc"] == float(rows[-1]["val_acc"]) and m["val_loss"] == float(rows[-1]["val_loss"])
    assert not [p for p in out.iterdir() if p.suffix == ".tmp"]


def test_it_learns_something(trained):
    rows = _rows(trained["out"] / "history.csv")
    assert float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"])
    assert trained["metrics"]["val_acc"] > 2 / len(trained["params"].base.classes)


def test_model_file_carries_arch_classes_spec_and_measured_normalisation(trained):
    loaded = net.load(trained["out"] / "model.safetensors", device=CPU)
    assert loaded.classes == trained["params"].base.classes and loaded.arch == "smallcnn"
    split = packed.read_split(trained["prepared"] / "train")
    mean, std = inputspec.channel_stats(np.asarray(split.x))
    assert loaded.spec.mean == pytest.approx(mean) and loaded.spec.std == pytest.approx(std)
    assert loaded.spec.mean[0] > 1.0                   # measured on the scans, not a default
    assert torch.allclose(loaded.module.mean, torch.tensor(mean, dtype=torch.float32))
    assert (loaded.spec.height, loaded.spec.width, loaded.spec.channels) == (28, 28, 1)
    val = packed.read_split(trained["prepared"] / "val")
    probs = net.predict_proba(loaded.module, np.asarray(val.x), device=CPU)
    assert probs.shape == (len(val.y), 10) and np.allclose(probs.sum(1), 1.0, atol=1e-5)
    # the saved model is the one whose val accuracy was reported
    assert (probs.argmax(1) == val.y).mean() == pytest.approx(trained["metrics"]["val_acc"], abs=1e-4)


def test_given_normalisation_is_used_as_is(trained, tmp_path):
    params = train_params(**{"input.mean": [10.0], "input.std": [50.0], "train.epochs": 2})
    train.run(trained["prepared"], tmp_path / "out", params=params)
    assert net.read_meta(tmp_path / "out" / "model.safetensors").spec.mean == (10.0,)


def test_two_runs_give_byte_identical_model_files(trained):
    again = train.run(trained["prepared"], trained["root"] / "again", params=trained["params"])
    assert (trained["out"] / "model.safetensors").read_bytes() == \
        (trained["root"] / "again" / "model.safetensors").read_bytes()
    assert (trained["out"] / "history.csv").read_bytes() == \
        (trained["root"] / "again" / "history.csv").read_bytes()
    assert again["val_acc"] == trained["metrics"]["val_acc"]


def test_streaming_gives_the_resident_model_bit_for_bit(trained, tmp_path):
    """A budget of 0 MB streams both splits from their memory maps through the prefetch thread;
    same permutation, same augmentation draws: the same weights and curves."""
    params = train_params(**{"train.resident_max_mb": 0.0, "train.shift_px": 2})
    metrics = train.run(trained["prepared"], tmp_path / "stream", params=params)
    assert metrics["resident"] is False
    assert (tmp_path / "stream" / "model.safetensors").read_bytes() == \
        (trained["out"] / "model.safetensors").read_bytes()
    assert (tmp_path / "stream" / "history.csv").read_bytes() == \
        (trained["out"] / "history.csv").read_bytes()


def test_another_seed_gives_another_model(trained, tmp_path):
    params = train_params(**{"base.seed": trained["params"].base.seed + 1, "train.epochs": 2})
    train.run(trained["prepared"], tmp_path / "out", params=params)
    assert (tmp_path / "out" / "model.safetensors").read_bytes() != \
        (trained["out"] / "model.safetensors").read_bytes()


def test_train_model_from_arrays(trained):
    """What review's out-of-fold models and calibrate use: arrays in, a module out."""
    split = packed.read_split(trained["prepared"] / "train")
    spec = inputspec.from_params(trained["params"])
    model, history = train.train_model(split.x, split.y, arch="smallcnn", spec=spec,
                                       classes=trained["params"].base.classes,
                                       params=trained["params"], epochs=2, seed=5)
    assert len(history) == 2 and "val_acc" not in history[0]
    assert isinstance(model, net.Classifier) and not model.training
    assert model.mean.item() > 1.0                     # measured on x
    again, _ = train.train_model(split.x, split.y, arch="smallcnn", spec=spec,
                                 classes=trained["params"].base.classes,
                                 params=trained["params"], epochs=2, seed=5)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                 again.state_dict().values()))


def test_settings_arch_list_is_the_registry(trained):
    assert ("auto", *settings.TRAIN_ARCHS) == archs.NAMES


def test_prepared_with_another_input_spec_is_a_clear_error(trained, tmp_path):
    params = train_params(**{"input.height": 32, "input.width": 32})
    with pytest.raises(train.TrainingError, match="input height .*rerun prepare"):
        train.run(trained["prepared"], tmp_path / "out", params=params)


def test_old_npz_prepare_output_is_a_clear_error(tmp_path):
    (tmp_path / "prepared").mkdir()
    np.savez(tmp_path / "prepared" / "train.npz", x=np.zeros((1, 28, 28), np.uint8))
    with pytest.raises(train.TrainingError, match="rerun `dvc repro prepare`"):
        train.run(tmp_path / "prepared", tmp_path / "out", params=train_params())


# -- init: weights file, warm start from production, frozen backbone -----------------------------

def test_warm_start_loads_a_matching_production_model(trained, tmp_path, capsys):
    prod = trained["out"] / "model.safetensors"
    params = train_params(**{"train.init": "production", "train.epochs": 2})
    metrics = train.run(trained["prepared"], tmp_path / "warm", params=params, init_model=prod)
    assert metrics["init"].startswith("warm start from production")
    assert "warm start from production" in capsys.readouterr().err
    # one more epoch from the trained model beats one epoch from scratch
    scratch = train.run(trained["prepared"], tmp_path / "scratch",
                        params=train_params(**{"train.epochs": 2}))
    assert metrics["val_loss"] < scratch["val_loss"]


def test_warm_start_from_another_class_list_trains_from_scratch_and_says_why(trained, tmp_path):
    other = factories.params({**BASE, "base.classes": [str(9 - i) for i in range(10)]})
    prod_dir = tmp_path / "prod"
    train.run(trained["prepared"], prod_dir, params=dataclasses.replace(
        other, train=dataclasses.replace(other.train, epochs=2)))
    params = train_params(**{"train.init": "production", "train.epochs": 2})
    metrics = train.run(trained["prepared"], tmp_path / "out", params=params,
                        init_model=prod_dir / "model.safetensors")
    assert metrics["init"].startswith("trained from scratch: the classes changed")
    first = train.run(trained["prepared"], tmp_path / "first", params=params)  # no production
    assert first["init"] == "trained from scratch: no production model yet"


def test_init_from_a_weights_file_and_a_wrong_hash_is_refused(trained, tmp_path):
    loaded = net.load(trained["out"] / "model.safetensors", device=CPU)
    weights = finetune.save_backbone(loaded.module, tmp_path / "backbone.safetensors")
    good = sha256_file(weights)
    params = train_params(**{"train.init": "weights", "train.init_weights": str(weights),
                             "train.init_sha256": good, "train.epochs": 2,
                             "train.freeze_backbone": True})
    train.run(trained["prepared"], tmp_path / "ft", params=params)
    tuned = net.load(tmp_path / "ft" / "model.safetensors", device=CPU).module.state_dict()
    start = loaded.module.state_dict()
    # frozen: the backbone (BatchNorm statistics included) is the file's, the head is new
    assert all(torch.equal(tuned[k], start[k]) for k in start if k.startswith("backbone."))
    assert not torch.equal(tuned["head.weight"], start["head.weight"])
    bad = dataclasses.replace(params, train=dataclasses.replace(params.train,
                                                                init_sha256="0" * 64))
    with pytest.raises(train.TrainingError, match="sha256"):
        train.run(trained["prepared"], tmp_path / "bad", params=bad)
    assert not (tmp_path / "bad" / "model.safetensors").exists()


def test_cli_init_model_flag(trained, tmp_path):
    import yaml
    overrides = {**BASE, "train.init": "production", "train.epochs": 2}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(factories.params_dict(overrides)))
    rc = train.main(["--prepared", str(trained["prepared"]), "--out", str(tmp_path / "out"),
                     "--params", str(tmp_path / "params.yaml"),
                     "--init-model", str(trained["out"] / "model.safetensors")])
    assert rc == 0
    assert read_json(tmp_path / "out" / "metrics.json")["init"].startswith("warm start")
    rc = train.main(["--prepared", str(trained["prepared"]), "--out", str(tmp_path / "o2"),
                     "--params", str(tmp_path / "params.yaml"),
                     "--init-model", str(tmp_path / "nothing.safetensors")])
    assert rc == 1


def test_cli_init_registry_reads_the_production_pointer(trained, tmp_path):
    """What dvc.yaml runs: --init-registry models/registry. No production yet: from scratch;
    then the pointer's blob, checked against the pointer's sha256."""
    import yaml
    from pipelines import registry
    overrides = {**BASE, "train.init": "production", "train.epochs": 2}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(factories.params_dict(overrides)))
    reg = tmp_path / "registry"
    args = ["--prepared", str(trained["prepared"]), "--params", str(tmp_path / "params.yaml"),
            "--init-registry", str(reg)]
    assert train.main([*args, "--out", str(tmp_path / "first")]) == 0
    assert read_json(tmp_path / "first" / "metrics.json")["init"].endswith("no production model yet")
    sha, _ = registry.store(reg, trained["out"] / "model.safetensors")
    registry.set_production(reg, registry.production_pointer(
        {"id": "m0001", "sha256": sha, "dataset_version": "d", "eval_hash": "e" * 64,
         "metrics": {}}, at="2026-01-01T00:00:00Z", via="test", previous=None))
    assert train.main([*args, "--out", str(tmp_path / "warm")]) == 0
    assert read_json(tmp_path / "warm" / "metrics.json")["init"].startswith("warm start")


# -- errors ----------------------------------------------------------------------------------------

def test_divergence_raises_naming_epoch_and_step(trained, tmp_path):
    # params.yaml refuses lr > 1 now; the loop's own NaN check is tested past the loader
    params = train_params()
    params = dataclasses.replace(params, train=dataclasses.replace(params.train, lr=1e12,
                                                                   warmup=0.0))
    with pytest.raises(train.TrainingError) as err:
        train.run(trained["prepared"], tmp_path / "out", params=params)
    msg = str(err.value)
    m = re.search(r"epoch (\d+), step (\d+)", msg)
    assert m, msg
    assert 1 <= int(m.group(1)) <= EPOCHS
    assert 1 <= int(m.group(2)) <= math.ceil(trained["sizes"]["train"] / BATCH)
    assert "train.lr" in msg
    assert not (tmp_path / "out" / "model.safetensors").exists()  # no half-trained candidate


def test_out_of_gpu_memory_is_a_clear_message(trained, tmp_path, monkeypatch):
    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    monkeypatch.setattr(train, "fit", oom)
    with pytest.raises(train.TrainingError, match="batch_size_cuda.*resident_max_mb"):
        train.run(trained["prepared"], tmp_path / "out", params=train_params())
    assert not (tmp_path / "out" / "model.safetensors").exists()  # nothing to promote


def _labels_nobody_trained_on(folder, source, params):
    """Validation labels all set to a class absent from training: what a swapped class order or
    a broken export looks like to the trainer."""
    spec = inputspec.from_params(params)
    tr, va = packed.read_split(source / "train"), packed.read_split(source / "val")
    keep = tr.y != 9
    for name, split, y, rows in (("train", tr, tr.y[keep], np.nonzero(keep)[0]),
                                 ("val", va, np.full_like(va.y, 9), np.arange(len(va.y)))):
        packed.write_split(folder / name, (factories.png_bytes(np.asarray(split.x)[i][..., 0])
                                           for i in rows),
                           y=y, task_id=split.task_id[rows], sha256=split.sha256[rows], spec=spec)


def test_a_model_no_better_than_chance_fails_without_writing_one(trained, tmp_path):
    _labels_nobody_trained_on(tmp_path / "prepared", trained["prepared"], trained["params"])
    with pytest.raises(train.TrainingError) as err:
        train.run(tmp_path / "prepared", tmp_path / "out", params=trained["params"])
    msg = str(err.value)
    assert "no better than chance" in msg
    for what in ("train.lr", "train.batch_size", "labels"):
        assert what in msg
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_main_exits_non_zero_on_a_chance_model(trained, tmp_path, capsys):
    import yaml
    _labels_nobody_trained_on(tmp_path / "prepared", trained["prepared"], trained["params"])
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(factories.params_dict(BASE)))
    rc = train.main(["--prepared", str(tmp_path / "prepared"), "--out", str(tmp_path / "out"),
                     "--params", str(tmp_path / "params.yaml")])
    assert rc == 1
    assert "train failed: validation accuracy" in capsys.readouterr().err
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_empty_validation_split_is_a_clear_error(trained, tmp_path):
    spec = inputspec.from_params(trained["params"])
    tr = packed.read_split(trained["prepared"] / "train")
    packed.write_split(tmp_path / "prepared" / "train",
                       (factories.png_bytes(np.asarray(x)[..., 0]) for x in tr.x[:8]),
                       y=tr.y[:8], task_id=tr.task_id[:8], sha256=tr.sha256[:8], spec=spec)
    packed.write_split(tmp_path / "prepared" / "val", iter([]), y=[], task_id=[], sha256=[],
                       spec=spec)
    with pytest.raises(train.TrainingError, match="validation split .* is empty"):
        train.run(tmp_path / "prepared", tmp_path / "out", params=trained["params"])


# -- the loop plan (batch and lr actually used) ----------------------------------------------------

def test_lr_scales_with_batch_and_cuda_settings_apply_only_on_cuda():
    t = train_params(**{"train.batch_size": 512}).train
    lp = train.plan(t, CPU)
    assert lp.batch_size == 512 and not lp.autocast and not lp.compile
    assert lp.lr == pytest.approx(t.lr * math.sqrt(512 / 128))       # AdamW: sqrt
    sgd = train_params(**{"train.batch_size": 512, "train.optimizer": "sgd", "train.lr": 0.1})
    assert train.plan(sgd.train, CPU).lr == pytest.approx(0.4)       # SGD: linear
    lp_cuda = train.plan(t, torch.device("cuda"))
    assert lp_cuda.batch_size == t.batch_size_cuda and lp_cuda.autocast


def test_cuda_batch_shrinks_to_keep_enough_steps_on_small_datasets():
    """Found on an H100: 128 images at batch 2048 meant one step per epoch at an lr scaled for
    2048, and training diverged. The CUDA batch now leaves >= MIN_STEPS_PER_EPOCH steps."""
    t = train_params(**{"train.batch_size": 32, "train.batch_size_cuda": 2048}).train
    cuda = torch.device("cuda")
    small = train.plan(t, cuda, n_train=128)
    assert small.batch_size == 32                      # never below the CPU batch
    mid = train.plan(t, cuda, n_train=10_000)          # 10000 // 32 = 312 -> 256
    assert mid.batch_size == 256 and 10_000 / mid.batch_size >= loop.MIN_STEPS_PER_EPOCH
    assert "train.batch_size_cuda 2048" in mid.note
    assert train.plan(t, cuda, n_train=1_000_000).batch_size == 2048
    assert train.plan(t, cuda, n_train=1_000_000).note == ""


def test_batch_larger_than_the_split_is_clamped_and_lr_follows_it():
    """`train.batch_size: 1000000000` once meant lr 5.6 on a 128-image split."""
    t = train_params(**{"train.batch_size": 65_536}).train
    lp = train.plan(t, CPU, n_train=128)
    assert lp.batch_size == 128 and lp.lr == pytest.approx(t.lr)
    assert "train.batch_size 65536" in lp.note and "128 images" in lp.note
    cuda = train.plan(train_params(**{"train.batch_size": 256}).train, torch.device("cuda"),
                      n_train=100)
    assert cuda.batch_size == 100 and "train.batch_size_cuda" in cuda.note
    assert train.plan(t, CPU, n_train=100_000).note == ""


def test_chance_floor():
    assert train.chance_floor(10) == pytest.approx(0.15)
    assert train.chance_floor(2) == pytest.approx(0.6)   # not 0.75
    assert train.chance_floor(1000) == pytest.approx(0.0015)


def test_cuda_requested_without_cuda_falls_back_with_one_notice(monkeypatch, capsys):
    from pipelines.device import pick_device
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pick_device("cuda").type == "cpu"
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "CUDA" in err and "CPU" in err
    assert pick_device("auto").type == "cpu" and capsys.readouterr().err == ""


# -- DDP and CUDA ------------------------------------------------------------------------------------

def test_ddp_two_processes_on_gloo_match_one_process(tmp_path):
    """torchrun with 2 CPU processes (gloo) vs one process, same data and seed. Permutation and
    augmentation are shared across ranks and gradients are averaged, so the only difference is
    the dropout masks (drawn per rank): stated tolerance 5 points of val accuracy, 15 % of val
    loss."""
    import os
    import subprocess
    import sys
    import yaml
    overrides = {**BASE, "train.epochs": 4}
    write_prepared(tmp_path / "prepared", per_class=24)
    p = factories.params(overrides)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(factories.params_dict(overrides)))
    single = train.run(tmp_path / "prepared", tmp_path / "one", params=p)
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    proc = subprocess.run(
        [torchrun, "--nproc_per_node", "2", "--master_port", str(_free_port()),
         "-m", "pipelines.train", "--prepared", str(tmp_path / "prepared"),
         "--out", str(tmp_path / "two"), "--params", str(tmp_path / "params.yaml")],
        capture_output=True, text=True, cwd=factories.REPO, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    two = read_json(tmp_path / "two" / "metrics.json")
    assert two["processes"] == 2 and single["processes"] == 1
    assert abs(two["val_acc"] - single["val_acc"]) <= 0.05
    assert abs(two["val_loss"] - single["val_loss"]) <= 0.15 * single["val_loss"]


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_trains_on_cuda_resident_and_streamed(tmp_path):
    sizes = write_prepared(tmp_path / "prepared")
    for budget in (4096.0, 0.0):
        params = train_params(**{"train.device": "cuda", "train.resident_max_mb": budget})
        metrics = train.run(tmp_path / "prepared", tmp_path / f"out{budget}", params=params)
        assert metrics["device"] == "cuda" and metrics["resident"] is (budget > 0)
        assert metrics["train_images"] == sizes["train"]
        assert metrics["val_acc"] > 2 / len(params.base.classes)
        loaded = net.load(tmp_path / f"out{budget}" / "model.safetensors", device=CPU)
        assert all(t.device.type == "cpu" for t in loaded.module.state_dict().values())
