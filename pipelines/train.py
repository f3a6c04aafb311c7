"""train: packed splits -> candidate weights (safetensors), per-epoch curves, metrics.

The whole split is moved to the device once as uint8 (784 B per 28x28 image: 10^6 images =
0.78 GB); batches are slices of an on-device permutation; augmentation (random shifts) and
normalisation happen on the device per batch. Nothing is decoded per step and there is no
per-sample Python in the loop. CUDA adds bf16 autocast, channels_last and (optionally)
torch.compile; CPU runs the same loop in fp32 on all cores.

    python -m pipelines.train --prepared data/prepared --out models/candidate
    torchrun --nproc_per_node N -m pipelines.train ...     # DistributedDataParallel, N processes
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from pipelines import net
from pipelines.device import pick_device, seed_everything
from pipelines.files import atomic_write_json
from pipelines.settings import Params, Train

LR_REF_BATCH = 128   # train.lr is the Adam learning rate at this batch size
MIN_STEPS_PER_EPOCH = 32  # the CUDA batch shrinks on small datasets to keep at least this many
NAN_CHECK_EVERY = 50  # steps between host syncs for the NaN check (a sync per step stalls a GPU)


class TrainingError(RuntimeError):
    pass


@dataclass(frozen=True)
class LoopPlan:
    """What the loop does on this device: derived from params, never configured twice."""
    device: torch.device
    batch_size: int          # global batch per optimizer step (all ranks together)
    lr: float                # scaled for batch_size, the batch actually used
    autocast: bool           # bf16 autocast (CUDA only)
    channels_last: bool
    compile: bool
    rank: int = 0
    world: int = 1
    note: str = ""           # why batch_size differs from the configured one ("" if it doesn't)


def plan(t: Train, device: torch.device, *, n_train: int | None = None, rank: int = 0,
         world: int = 1) -> LoopPlan:
    cuda = device.type == "cuda"
    configured = t.batch_size_cuda if cuda else t.batch_size
    batch, note = configured, ""
    if cuda and n_train is not None:
        # The big GPU batch only where the data can fill it: on a small dataset it would mean a
        # handful of steps per epoch at a learning rate scaled for a batch that never happens
        # (seen on an H100: 128 images, batch 2048 -> one step per epoch, diverged). Keep at
        # least MIN_STEPS_PER_EPOCH steps, never going below the CPU batch size.
        fits = 1 << max(0, (n_train // MIN_STEPS_PER_EPOCH).bit_length() - 1)  # power of 2
        batch = min(batch, max(t.batch_size, fits))
        if batch < configured:
            note = (f"CUDA batch {batch} instead of train.batch_size_cuda {configured}: keeps "
                    f"{MIN_STEPS_PER_EPOCH} steps per epoch on {n_train} training images")
    if n_train is not None and batch > n_train:
        # A batch can't hold more than the whole split; the learning rate below must follow
        # the batch really used (batch 10^9 configured on 128 images meant lr 5.6: garbage).
        batch = max(1, n_train)
        name = "train.batch_size_cuda" if cuda else "train.batch_size"
        note = (f"batch {batch} instead of {name} {configured}: the training split has only "
                f"{n_train} images")
    # Adam: scale the learning rate with sqrt(batch) (linear scaling over-shoots with Adam).
    lr = t.lr * math.sqrt(batch / LR_REF_BATCH)
    # channels_last also pays on CPU: +25 % fwd+bwd at batch 64 on this conv net (oneDNN).
    return LoopPlan(device=device, batch_size=batch, lr=lr, autocast=cuda, channels_last=True,
                    compile=cuda and t.compile, rank=rank, world=world, note=note)


def chance_floor(num_classes: int) -> float:
    """Validation accuracy at or below which a model has learnt nothing: 1.5x uniform guessing
    (0.15 for 10 classes), at most 1/K + 0.1 (2 classes: 0.6 rather than 0.75, which a weak but
    real binary model may not reach)."""
    uniform = 1.0 / num_classes
    return min(1.5 * uniform, uniform + 0.1)


def to_device(model: torch.nn.Module, lp: LoopPlan) -> torch.nn.Module:
    model = model.to(lp.device)
    return model.to(memory_format=torch.channels_last) if lp.channels_last else model


def _load_split(path: Path, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    with np.load(path) as z:
        return torch.from_numpy(z["x"]).to(device), torch.from_numpy(z["y"]).to(device)


def shift(x: torch.Tensor, max_px: int, gen: torch.Generator) -> torch.Tensor:
    """Random integer translation of each image by up to `max_px` pixels, zeros shifted in.
    `(N, 1, S, S)` float pixel values (0..255) -> same shape, on the same device."""
    n, _, h, w = x.shape
    offsets = torch.randint(-max_px, max_px + 1, (n, 2), device=x.device, generator=gen)
    theta = torch.zeros(n, 2, 3, device=x.device)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0
    theta[:, 0, 2] = offsets[:, 0] * (2.0 / w)   # grid units: 2 per image side
    theta[:, 1, 2] = offsets[:, 1] * (2.0 / h)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=False)


def batch_input(x_uint8: torch.Tensor, lp: LoopPlan, *, shift_px: int = 0,
                gen: torch.Generator | None = None) -> torch.Tensor:
    """uint8 `(B, S, S)` on the device -> normalised model input, augmented when asked."""
    x = x_uint8.unsqueeze(1).float()
    if shift_px:
        x = shift(x, shift_px, gen)
    x = net.normalize(x)
    return x.contiguous(memory_format=torch.channels_last) if lp.channels_last else x


def _autocast(lp: LoopPlan):
    if lp.autocast:
        return torch.autocast(device_type=lp.device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def _evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
              lp: LoopPlan) -> tuple[float, float]:
    model.eval()
    loss_sum, correct = torch.zeros((), device=lp.device), torch.zeros((), device=lp.device)
    for i in range(0, len(x), 1024):
        with _autocast(lp):
            logits = model(batch_input(x[i:i + 1024], lp)).float()
        loss_sum += F.cross_entropy(logits, y[i:i + 1024], reduction="sum")
        correct += (logits.argmax(1) == y[i:i + 1024]).sum()
    return loss_sum.item() / len(x), correct.item() / len(x)


def fit(model: torch.nn.Module, x_train: torch.Tensor, y_train: torch.Tensor,
        x_val: torch.Tensor | None, y_val: torch.Tensor | None, *, lp: LoopPlan, epochs: int,
        shift_px: int, seed: int, progress: bool = True) -> list[dict]:
    """The training loop; returns per-epoch history. All tensors already on `lp.device`.
    With `lp.world > 1`, `model` is DDP-wrapped and every rank walks the same global
    permutation (and draws the same shifts), taking its own slice of each global batch."""
    opt = torch.optim.Adam(model.parameters(), lr=lp.lr)
    gen = torch.Generator(device=lp.device).manual_seed(seed)
    n, history = len(x_train), []
    for epoch in range(1, epochs + 1):
        model.train()
        perm = torch.randperm(n, device=lp.device, generator=gen)
        loss_sum = torch.zeros((), device=lp.device)   # summed on the device: no sync per step
        correct = torch.zeros((), device=lp.device, dtype=torch.long)
        seen = torch.zeros((), device=lp.device, dtype=torch.long)
        first_bad = torch.full((), -1, device=lp.device, dtype=torch.long)
        steps = range(0, n, lp.batch_size)
        bar = tqdm(steps, desc=f"epoch {epoch}/{epochs}", unit="step", leave=False,
                   disable=None if progress and lp.rank == 0 else True, file=sys.stderr)
        for step, i in enumerate(bar, start=1):
            idx = perm[i:i + lp.batch_size]
            xb = batch_input(x_train[idx], lp, shift_px=shift_px, gen=gen)
            idx, xb = idx[lp.rank::lp.world], xb[lp.rank::lp.world]
            yb = y_train[idx]
            with _autocast(lp):
                logits = model(xb)
            loss = F.cross_entropy(logits.float(), yb)
            first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss),
                                    torch.full_like(first_bad, step), first_bad)
            if step % NAN_CHECK_EVERY == 0 or i + lp.batch_size >= n:
                if first_bad.item() >= 0:
                    raise TrainingError(f"loss became NaN/inf at epoch {epoch}, step "
                                        f"{first_bad.item()}; lower train.lr or check the data")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.detach() * len(idx)
            correct += (logits.argmax(1) == yb).sum()
            seen += len(idx)
        if lp.world > 1:
            stats = torch.stack([loss_sum, correct.float(), seen.float()])
            dist.all_reduce(stats)
            loss_sum, correct, seen = stats[0], stats[1], stats[2]
        row = {"epoch": epoch, "train_loss": round(loss_sum.item() / seen.item(), 5),
               "train_acc": round(correct.item() / seen.item(), 5)}
        if x_val is not None:
            row["val_loss"], row["val_acc"] = (round(v, 5) for v in
                                               _evaluate(model, x_val, y_val, lp))
        history.append(row)
        if progress and lp.rank == 0:
            print("  ".join(f"{k} {v}" for k, v in row.items()), flush=True)
    return history


def _dist_init(choice: str) -> tuple[torch.device, int, int]:
    """(device, rank, world) — from torchrun's environment when present."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = pick_device(choice)
    if world == 1:
        torch.set_num_threads(os.cpu_count() or 1)  # CPU: use every core
        return device, 0, 1
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return device, dist.get_rank(), world


def run(prepared_dir: str | Path, out_dir: str | Path, *, params: Params) -> dict:
    prepared_dir, out_dir = Path(prepared_dir), Path(out_dir)
    t = params.train
    device, rank, world = _dist_init(t.device)
    # Dropout masks differ by rank; everything else (permutation, shifts) is shared.
    seed_everything(params.base.seed + rank, deterministic=t.deterministic)
    lp = None
    try:
        x_train, y_train = _load_split(prepared_dir / "train.npz", device)
        x_val, y_val = _load_split(prepared_dir / "val.npz", device)
        if not len(x_train) or not len(x_val):
            raise TrainingError(f"the {'training' if not len(x_train) else 'validation'} split "
                                f"in {prepared_dir} is empty: label more tasks or change "
                                "prepare.val_fraction")
        lp = plan(t, device, n_train=len(x_train), rank=rank, world=world)
        if lp.note and rank == 0:
            print(f"train: {lp.note} (lr {lp.lr:.6g} for that batch)", file=sys.stderr)
        model = to_device(net.build(params.base.classes, params.base.image_size), lp)
        trained = model
        if world > 1:
            trained = torch.nn.parallel.DistributedDataParallel(model)
        if lp.compile:
            trained = torch.compile(trained)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.monotonic()
        history = fit(trained, x_train, y_train, x_val, y_val, lp=lp, epochs=t.epochs,
                      shift_px=t.shift_px, seed=params.base.seed)
        seconds = time.monotonic() - t0
    except torch.OutOfMemoryError:
        where = f"at batch size {lp.batch_size}" if lp else "loading the dataset"
        raise TrainingError(f"out of GPU memory {where}: lower train.batch_size_cuda in "
                            "params.yaml") from None
    finally:
        if world > 1 and rank != 0:
            dist.destroy_process_group()
    if rank != 0:
        return {}
    if not math.isfinite(history[-1]["val_loss"]):
        raise TrainingError(f"validation loss is not finite after epoch {t.epochs}; lower "
                            f"train.lr (lr {lp.lr:.6g} at batch {lp.batch_size}) or check the data")
    # A model that learnt nothing is a failed run, not a candidate (lr 5.6 once gave val acc
    # 0.09 on 10 classes and exit 0).
    floor = chance_floor(len(params.base.classes))
    if history[-1]["val_acc"] <= floor:
        raise TrainingError(
            f"validation accuracy {history[-1]['val_acc']:.3f} after {t.epochs} epochs is no "
            f"better than chance ({floor:.3f} for {len(params.base.classes)} classes on "
            f"{len(y_val)} validation images); no model was written. Check train.lr "
            f"({t.lr:g} configured, {lp.lr:.6g} used at batch {lp.batch_size}), "
            f"train.batch_size, train.epochs, and the labels in {prepared_dir} (shuffled, "
            "mostly one class, or base.classes in another order than in Label Studio?)")
    out_dir.mkdir(parents=True, exist_ok=True)
    net.save(model, out_dir / "model.safetensors", classes=params.base.classes,
             image_size=params.base.image_size)
    with open(out_dir / "history.csv", "w", newline="") as f:  # for `dvc plots`
        w = csv.DictWriter(f, fieldnames=list(history[0]))
        w.writeheader()
        w.writerows(history)
    metrics = {"device": device.type, "processes": world, "epochs": t.epochs,
               "batch_size": lp.batch_size, "lr": round(lp.lr, 6), "train_images": len(x_train),
               "val_images": len(x_val), "val_acc": history[-1]["val_acc"],
               "val_loss": history[-1]["val_loss"], "seconds": round(seconds, 2),
               "images_per_s": round(len(x_train) * t.epochs / seconds, 1),
               "peak_gpu_mem_mb": (round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
                                   if device.type == "cuda" else None)}
    atomic_write_json(out_dir / "metrics.json", metrics)
    if world > 1:
        dist.destroy_process_group()
    return metrics


def main(argv: list[str] | None = None) -> int:
    from pipelines import settings
    ap = argparse.ArgumentParser(prog="python -m pipelines.train", description=__doc__)
    ap.add_argument("--prepared", default="data/prepared")
    ap.add_argument("--out", default="models/candidate")
    ap.add_argument("--params", default="params.yaml")
    args = ap.parse_args(argv)
    try:
        metrics = run(args.prepared, args.out, params=settings.load(args.params))
    except (TrainingError, settings.ParamsError) as exc:
        print(f"train failed: {exc}", file=sys.stderr)
        return 1
    if metrics:
        print(f"train: {metrics}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
