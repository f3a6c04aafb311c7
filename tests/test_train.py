"""pipelines.train and pipelines.net on real digit scans: outputs, determinism, divergence caught
with a readable error, and the safetensors model format."""
from __future__ import annotations

import csv
import dataclasses
import json
import math
import re

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from pipelines import images, net, train
from pipelines.files import read_json
from tests import factories

PER_CLASS = 16           # 160 real scans: 128 train, 32 val
EPOCHS = 2
BATCH = 32
SIZE = 28


def write_prepared(folder, *, per_class: int = PER_CLASS, size: int = SIZE) -> dict:
    """train.npz / val.npz in the format pipelines/prepare.py writes."""
    folder.mkdir(parents=True, exist_ok=True)
    digits = factories.digits_by_class(per_class)
    x = images.stack([data for _, data, _ in digits], size)
    y = np.array([cls for _, _, cls in digits], dtype=np.int64)
    task_id = np.arange(1, len(y) + 1, dtype=np.int64)
    sha = np.array([f"{i:064x}" for i in task_id])
    val = task_id % 5 == 0
    sizes = {}
    for name, mask in (("train", ~val), ("val", val)):
        np.savez(folder / f"{name}.npz", x=x[mask], y=y[mask], task_id=task_id[mask],
                 sha256=sha[mask])
        sizes[name] = int(mask.sum())
    return sizes


def train_params(**overrides):
    return factories.params({"train.epochs": EPOCHS, "train.batch_size": BATCH,
                             "train.lr": 0.003, "train.device": "cpu", **overrides})


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    sizes = write_prepared(root / "prepared")
    params = train_params()
    metrics = train.run(root / "prepared", root / "out", params=params)
    return {"root": root, "sizes": sizes, "params": params, "metrics": metrics,
            "out": root / "out"}


def test_writes_model_history_and_metrics(trained):
    out = trained["out"]
    assert (out / "model.safetensors").stat().st_size > 0
    with open(out / "history.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == list(range(1, EPOCHS + 1))  # one row per epoch
    assert set(rows[0]) == {"epoch", "train_loss", "train_acc", "val_loss", "val_acc"}
    assert all(math.isfinite(float(r[k])) for r in rows for k in r)
    m = read_json(out / "metrics.json")
    assert m == trained["metrics"]
    assert m["device"] == "cpu" and m["epochs"] == EPOCHS
    assert m["train_images"] == trained["sizes"]["train"]
    assert m["val_images"] == trained["sizes"]["val"]
    assert m["val_acc"] == float(rows[-1]["val_acc"]) and m["val_loss"] == float(rows[-1]["val_loss"])
    assert not [p for p in out.iterdir() if p.suffix == ".tmp"]


def test_it_learns_something(trained):
    with open(trained["out"] / "history.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"])
    chance = 1 / len(trained["params"].base.classes)
    assert trained["metrics"]["val_acc"] > 2 * chance


def test_model_file_loads_with_its_classes(trained):
    model, classes, size = net.load(trained["out"] / "model.safetensors",
                                    device=torch.device("cpu"))
    assert classes == trained["params"].base.classes and size == SIZE
    assert not model.training
    with np.load(trained["root"] / "prepared" / "val.npz") as z:
        x, y = z["x"], z["y"]
    probs = net.predict_proba(model, x, device=torch.device("cpu"))
    assert probs.shape == (len(y), len(classes))
    assert np.allclose(probs.sum(1), 1.0, atol=1e-5)
    # the saved model is the one whose val accuracy was reported
    assert (probs.argmax(1) == y).mean() == pytest.approx(trained["metrics"]["val_acc"], abs=1e-4)


def test_two_runs_give_byte_identical_model_files(trained):
    again = train.run(trained["root"] / "prepared", trained["root"] / "again",
                      params=trained["params"])
    a = (trained["out"] / "model.safetensors").read_bytes()
    b = (trained["root"] / "again" / "model.safetensors").read_bytes()
    assert a == b
    assert (trained["out"] / "history.csv").read_bytes() == \
        (trained["root"] / "again" / "history.csv").read_bytes()
    assert again["val_acc"] == trained["metrics"]["val_acc"]


def test_another_seed_gives_another_model(trained, tmp_path):
    params = train_params(**{"base.seed": trained["params"].base.seed + 1, "train.epochs": 1})
    train.run(trained["root"] / "prepared", tmp_path / "out", params=params)
    assert (tmp_path / "out" / "model.safetensors").read_bytes() != \
        (trained["out"] / "model.safetensors").read_bytes()


def test_divergence_raises_naming_epoch_and_step(trained, tmp_path):
    # params.yaml refuses lr > 1 now; the loop's own NaN check is tested past the loader
    params = train_params()
    params = dataclasses.replace(params, train=dataclasses.replace(params.train, lr=1e12))
    with pytest.raises(train.TrainingError) as err:
        train.run(trained["root"] / "prepared", tmp_path / "out", params=params)
    msg = str(err.value)
    m = re.search(r"epoch (\d+), step (\d+)", msg)
    assert m, msg
    epoch, step = int(m.group(1)), int(m.group(2))
    assert 1 <= epoch <= EPOCHS
    assert 1 <= step <= math.ceil(trained["sizes"]["train"] / BATCH)
    assert "train.lr" in msg
    assert not (tmp_path / "out" / "model.safetensors").exists()  # no half-trained candidate


# -- net -----------------------------------------------------------------------------------------

def small_net(seed: int = 0, classes=("cat", "dog", "<x>|y"), size: int = 16) -> net.Net:
    torch.manual_seed(seed)
    return net.build(classes, size).eval()


def test_net_save_load_round_trip(tmp_path):
    classes, size = ("cat", "dog", "<x>|y"), 16
    model = small_net(classes=classes, size=size)
    path = net.save(model, tmp_path / "m" / "model.safetensors", classes=classes, image_size=size)
    loaded, got_classes, got_size = net.load(path, device=torch.device("cpu"))
    assert got_classes == classes and got_size == size
    want = model.state_dict()
    got = loaded.state_dict()
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k], got[k]) for k in want)
    x = np.random.default_rng(0).integers(0, 256, (5, size, size), dtype=np.uint8)
    cpu = torch.device("cpu")
    assert np.array_equal(net.predict_proba(model, x, device=cpu),
                          net.predict_proba(loaded, x, device=cpu))


def test_same_weights_give_the_same_file_bytes(tmp_path):
    classes = ("a", "b")
    a = net.save(small_net(3, classes), tmp_path / "a.safetensors", classes=classes, image_size=16)
    b = net.save(small_net(3, classes), tmp_path / "b.safetensors", classes=classes, image_size=16)
    c = net.save(small_net(4, classes), tmp_path / "c.safetensors", classes=classes, image_size=16)
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()


def test_net_save_never_writes_through_a_planted_symlink(tmp_path):
    """net.save went through the fixed name `model.tmp`: whether a link planted there was
    followed depended on the safetensors version (0.8 replaces it; older ones opened it), and
    the planted entry was consumed either way. It now writes like every other output (a random
    O_EXCL | O_NOFOLLOW temp name, fsynced, renamed over a link at the target)."""
    outside = tmp_path / "outside"
    outside.write_bytes(b"not yours")
    folder = tmp_path / "candidate"
    folder.mkdir()
    (folder / "model.tmp").symlink_to(outside)
    (folder / "model.safetensors").symlink_to(outside)
    classes = ("a", "b")
    path = net.save(small_net(1, classes), folder / "model.safetensors", classes=classes,
                    image_size=16)
    assert outside.read_bytes() == b"not yours"
    assert not path.is_symlink()
    assert net.load(path, device=torch.device("cpu"))[1] == classes
    assert (folder / "model.tmp").is_symlink()  # the planted name is left alone
    assert sorted(p.name for p in folder.iterdir()) == ["model.safetensors", "model.tmp"]


def test_model_file_without_labelgate_metadata_is_refused(tmp_path):
    model = small_net()
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    bare = tmp_path / "bare.safetensors"
    save_file(state, str(bare))
    foreign = tmp_path / "foreign.safetensors"
    save_file(state, str(foreign), metadata={"labelgate": json.dumps(
        {"arch": "resnet-50", "classes": ["cat", "dog", "<x>|y"], "image_size": 16})})
    for path in (bare, foreign):
        with pytest.raises(ValueError, match="not a labelgate"):
            net.load(path, device=torch.device("cpu"))


class _Touch:
    """Unpickling this creates a file: the proof that a pickle was executed."""
    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        import pathlib
        return (pathlib.Path.touch, (pathlib.Path(self.path),))


def test_a_pickle_is_never_executed(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "model.safetensors"
    torch.save({"weights": _Touch(marker)}, path)  # a pickle under the expected name
    with pytest.raises(Exception) as err:
        net.load(path, device=torch.device("cpu"))
    assert not isinstance(err.value, AssertionError)
    assert not marker.exists()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_trains_on_cuda(tmp_path):
    sizes = write_prepared(tmp_path / "prepared")
    params = train_params(**{"train.device": "cuda"})
    metrics = train.run(tmp_path / "prepared", tmp_path / "out", params=params)
    assert metrics["device"] == "cuda"
    assert metrics["train_images"] == sizes["train"]
    assert metrics["val_acc"] > 2 / len(params.base.classes)
    # the file is device-independent: it loads on the CPU
    model, classes, size = net.load(tmp_path / "out" / "model.safetensors",
                                    device=torch.device("cpu"))
    assert classes == params.base.classes and size == SIZE
    assert all(t.device.type == "cpu" for t in model.state_dict().values())


# --- issue 3: on-device augmentation, the DDP path --------------------------------------------

def test_shift_moves_pixels_by_whole_pixels_and_pads_with_zeros():
    x = torch.zeros(64, 1, 8, 8)
    x[:, :, 3, 4] = 255.0                      # one bright pixel per image
    gen = torch.Generator().manual_seed(0)
    out = train.shift(x, 2, gen)
    assert out.shape == x.shape
    for img in out[:, 0]:
        ys, xs = torch.nonzero(img, as_tuple=True)
        assert len(ys) == 1 and img[ys[0], xs[0]] == 255.0   # moved, not blurred
        assert abs(int(ys[0]) - 3) <= 2 and abs(int(xs[0]) - 4) <= 2
    moved = {(int(torch.nonzero(i)[0, 0]), int(torch.nonzero(i)[0, 1])) for i in out[:, 0]}
    assert len(moved) > 5                       # per-image offsets, not one for the batch


def test_lr_scales_with_batch_and_cuda_settings_apply_only_on_cuda():
    t = train_params(**{"train.batch_size": 512}).train
    lp = train.plan(t, torch.device("cpu"))
    assert lp.batch_size == 512 and not lp.autocast and not lp.compile
    assert lp.lr == pytest.approx(t.lr * math.sqrt(512 / train.LR_REF_BATCH))
    lp_cuda = train.plan(t, torch.device("cuda"))
    assert lp_cuda.batch_size == t.batch_size_cuda and lp_cuda.autocast


def test_cuda_batch_shrinks_to_keep_enough_steps_on_small_datasets():
    """Found on an H100: 128 images at batch 2048 meant one step per epoch at an lr scaled for
    2048, and training diverged. The CUDA batch now leaves >= MIN_STEPS_PER_EPOCH steps."""
    t = train_params(**{"train.batch_size": 32, "train.batch_size_cuda": 2048}).train
    cuda = torch.device("cuda")
    small = train.plan(t, cuda, n_train=128)
    assert small.batch_size == 32                      # never below the CPU batch
    assert small.lr == pytest.approx(t.lr * math.sqrt(32 / train.LR_REF_BATCH))
    mid = train.plan(t, cuda, n_train=10_000)          # 10000 // 32 = 312 -> 256
    assert mid.batch_size == 256 and 10_000 / mid.batch_size >= train.MIN_STEPS_PER_EPOCH
    assert train.plan(t, cuda, n_train=1_000_000).batch_size == 2048
    assert train.plan(t, torch.device("cpu"), n_train=128).batch_size == 32


def test_ddp_two_processes_on_gloo_match_one_process(tmp_path):
    """torchrun with 2 CPU processes (gloo) vs one process, same data and seed. Permutation and
    shifts are shared across ranks and gradients are averaged, so the only difference is the
    dropout masks (drawn per rank): stated tolerance 5 points of val accuracy, 15 % of val loss."""
    import os
    import subprocess
    import sys
    import yaml
    write_prepared(tmp_path / "prepared", per_class=24)
    overrides = {"train.epochs": 4, "train.batch_size": BATCH, "train.lr": 0.003,
                 "train.device": "cpu"}
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
    assert (tmp_path / "two" / "model.safetensors").exists()


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_out_of_gpu_memory_is_a_clear_message(tmp_path, monkeypatch):
    write_prepared(tmp_path / "prepared", per_class=4)

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    monkeypatch.setattr(train, "fit", oom)
    with pytest.raises(train.TrainingError, match="batch_size_cuda"):
        train.run(tmp_path / "prepared", tmp_path / "out", params=train_params())
    assert not (tmp_path / "out" / "model.safetensors").exists()  # nothing to promote


def test_cuda_requested_without_cuda_falls_back_with_one_notice(monkeypatch, capsys):
    from pipelines.device import pick_device
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pick_device("cuda").type == "cpu"
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "CUDA" in err and "CPU" in err
    assert pick_device("auto").type == "cpu" and capsys.readouterr().err == ""


# --- issue 10: the batch really used, and no garbage model with exit 0 -------------------------

def test_batch_larger_than_the_split_is_clamped_and_lr_follows_it():
    """`train.batch_size: 1000000000` once meant lr 0.002 * sqrt(10^9 / 128) = 5.6 on a
    128-image split. The batch is the split, and the learning rate is scaled for that."""
    t = train_params(**{"train.batch_size": 65_536}).train
    lp = train.plan(t, torch.device("cpu"), n_train=128)
    assert lp.batch_size == 128
    assert lp.lr == pytest.approx(t.lr)          # sqrt(128 / 128) = 1
    assert "train.batch_size 65536" in lp.note and "128 images" in lp.note
    cuda = train.plan(train_params(**{"train.batch_size": 256}).train, torch.device("cuda"),
                      n_train=100)
    assert cuda.batch_size == 100 and "train.batch_size_cuda" in cuda.note
    assert train.plan(t, torch.device("cpu"), n_train=100_000).note == ""  # nothing to say


def test_cuda_shrink_is_explained():
    t = train_params(**{"train.batch_size": 32, "train.batch_size_cuda": 2048}).train
    lp = train.plan(t, torch.device("cuda"), n_train=10_000)
    assert lp.batch_size == 256 and "train.batch_size_cuda 2048" in lp.note
    assert train.plan(t, torch.device("cuda"), n_train=1_000_000).note == ""


def test_huge_batch_trains_a_real_model_and_says_so(trained, tmp_path, capsys):
    n_train = trained["sizes"]["train"]
    params = train_params(**{"train.batch_size": 65_536, "train.epochs": 20})
    metrics = train.run(trained["root"] / "prepared", tmp_path / "out", params=params)
    assert metrics["batch_size"] == n_train
    assert metrics["lr"] == pytest.approx(0.003 * math.sqrt(n_train / train.LR_REF_BATCH), abs=1e-6)
    assert f"batch {n_train} instead of train.batch_size 65536" in capsys.readouterr().err
    assert metrics["val_acc"] > train.chance_floor(10)


def test_chance_floor():
    assert train.chance_floor(10) == pytest.approx(0.15)
    assert train.chance_floor(2) == pytest.approx(0.6)   # not 0.75
    assert train.chance_floor(1000) == pytest.approx(0.0015)


def _labels_nobody_trained_on(folder, source):
    """The split from `source` with every validation label set to a class absent from training:
    what a swapped class order or a broken export looks like to the trainer."""
    folder.mkdir(parents=True)
    with np.load(source / "train.npz") as z:
        tr = dict(z)
    with np.load(source / "val.npz") as z:
        va = dict(z)
    keep = tr["y"] != 9
    np.savez(folder / "train.npz", **{k: v[keep] for k, v in tr.items()})
    np.savez(folder / "val.npz", **{**va, "y": np.full_like(va["y"], 9)})


def test_a_model_no_better_than_chance_fails_without_writing_one(trained, tmp_path):
    _labels_nobody_trained_on(tmp_path / "prepared", trained["root"] / "prepared")
    with pytest.raises(train.TrainingError) as err:
        train.run(tmp_path / "prepared", tmp_path / "out", params=trained["params"])
    msg = str(err.value)
    assert "no better than chance" in msg
    for what in ("train.lr", "train.batch_size", "labels"):
        assert what in msg
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_main_exits_non_zero_on_a_chance_model(trained, tmp_path, capsys):
    import yaml
    _labels_nobody_trained_on(tmp_path / "prepared", trained["root"] / "prepared")
    overrides = {"train.epochs": EPOCHS, "train.batch_size": BATCH, "train.lr": 0.003,
                 "train.device": "cpu"}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(factories.params_dict(overrides)))
    rc = train.main(["--prepared", str(tmp_path / "prepared"), "--out", str(tmp_path / "out"),
                     "--params", str(tmp_path / "params.yaml")])
    assert rc == 1
    assert "train failed: validation accuracy" in capsys.readouterr().err
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_empty_validation_split_is_a_clear_error(trained, tmp_path):
    (tmp_path / "prepared").mkdir()
    src = trained["root"] / "prepared"
    (tmp_path / "prepared" / "train.npz").write_bytes((src / "train.npz").read_bytes())
    with np.load(src / "val.npz") as z:
        np.savez(tmp_path / "prepared" / "val.npz", **{k: v[:0] for k, v in z.items()})
    with pytest.raises(train.TrainingError, match="validation split .* is empty"):
        train.run(tmp_path / "prepared", tmp_path / "out", params=trained["params"])
