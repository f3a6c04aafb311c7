"""The training loop: batches from a residency source, on-device augmentation, the recipe's
optimizer and schedule, bf16 autocast + channels_last on CUDA, a NaN check that does not stall
the device, per-epoch history. No per-sample Python and no decoding in the loop.

    lp = loop.plan(params.train, device, n_train=len(train_src))
    history = loop.fit(model, train_src, val_src, lp=lp, recipe=r, aug=aug, epochs=12, seed=0)
"""
from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist
from tqdm import tqdm

from pipelines import augment, recipe, residency

MIN_STEPS_PER_EPOCH = 32  # the CUDA batch shrinks on small datasets to keep at least this many
NAN_CHECK_EVERY = 50  # steps between host syncs for the NaN check (a sync per step stalls a GPU)
EVAL_BATCH = 1024
PRECISE_BN_IMAGES = 4096  # training images whose BatchNorm statistics the final model keeps


class TrainingError(RuntimeError):
    pass


@dataclass(frozen=True)
class LoopPlan:
    """What the loop does on this device: derived from params, never configured twice."""
    device: torch.device
    batch_size: int          # global batch per optimizer step (all ranks together)
    lr: float                # train.lr scaled for batch_size (recipe.scaled_lr)
    autocast: bool           # bf16 autocast (CUDA only)
    channels_last: bool
    compile: bool
    rank: int = 0
    world: int = 1
    note: str = ""           # why batch_size differs from the configured one ("" if it doesn't)


def plan(t, device: torch.device, *, n_train: int | None = None, rank: int = 0,
         world: int = 1) -> LoopPlan:
    """`t`: settings.Train."""
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
    lr = recipe.scaled_lr(t.lr, t.optimizer, batch)
    # channels_last also pays on CPU: +25 % fwd+bwd at batch 64 on the seed's conv net (oneDNN).
    return LoopPlan(device=device, batch_size=batch, lr=lr, autocast=cuda, channels_last=True,
                    compile=cuda and t.compile, rank=rank, world=world, note=note)


def to_device(model: torch.nn.Module, lp: LoopPlan) -> torch.nn.Module:
    model = model.to(lp.device)
    return model.to(memory_format=torch.channels_last) if lp.channels_last else model


def autocast(lp: LoopPlan):
    if lp.autocast:
        return torch.autocast(device_type=lp.device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def evaluate(model: torch.nn.Module, src, lp: LoopPlan) -> tuple[float, float]:
    """(mean cross-entropy without smoothing, accuracy) over a whole source, in order."""
    model.eval()
    loss_sum = torch.zeros((), device=lp.device)
    correct = torch.zeros((), device=lp.device)
    for xb, yb in src.batches(residency.in_order(len(src), EVAL_BATCH)):
        with autocast(lp):
            logits = model(augment.batch(xb)).float()
        loss_sum += torch.nn.functional.cross_entropy(logits, yb, reduction="sum")
        correct += (logits.argmax(1) == yb).sum()
    return loss_sum.item() / len(src), correct.item() / len(src)


@torch.no_grad()
def precise_bn(model: torch.nn.Module, src, lp: LoopPlan, index: list[torch.Tensor]) -> bool:
    """Replace every trainable BatchNorm's running statistics by the exact average over the
    batches `index` (un-augmented training images) under the final weights. The running
    averages lag the weights they were collected under: on a small split (a few dozen steps)
    the eval-mode model was far worse than the train-mode one (val 3 % vs train 63 % after 12
    steps). A frozen backbone's BatchNorm (eval mode) keeps its statistics. Returns whether
    anything was recomputed."""
    norms = [m for m in model.modules()
             if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.training
             and m.track_running_stats]
    if not norms:
        return False
    saved = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None            # cumulative average over the batches below
    try:
        for xb, _ in src.batches(index):
            with autocast(lp):
                model(augment.batch(xb))
    finally:
        for m, momentum in zip(norms, saved):
            m.momentum = momentum
    if lp.world > 1:
        # Each rank measured its own share of the images: average them, so that every rank
        # (and the model rank 0 saves) holds statistics over all of them, as one process
        # would. Rank 0's share alone is 1/world of PRECISE_BN_IMAGES: 256 on 16 GPUs.
        for m in norms:
            for stat in (m.running_mean, m.running_var):
                dist.all_reduce(stat)
                stat /= lp.world
    return True


def steps_per_epoch(n: int, batch_size: int, world: int = 1) -> int:
    """Optimizer steps in one epoch of `n` images: every global batch, except a last one with
    fewer images than ranks (some rank would get none: an empty batch's loss is NaN and a
    rank without work stalls the others' gradient exchange), which is dropped."""
    full, rest = divmod(n, batch_size)
    return full + (1 if rest >= max(1, world) else 0)


def fit(model: torch.nn.Module, train_src, val_src, *, lp: LoopPlan, rec: recipe.Recipe,
        aug: augment.Augment, epochs: int, seed: int, progress: bool = True,
        recalibrate: bool = True) -> list[dict]:
    """Train `model` (on `lp.device`, maybe DDP-wrapped: then `rec` must have been applied to
    the unwrapped module's parameters, which `model.parameters()` are too) and return per-epoch
    history rows. Every rank walks the same global permutation and draws the same augmentation
    for the whole global batch, taking its own slice."""
    inner = getattr(model, "module", model)
    opt = recipe.optimizer(inner, rec)
    n = len(train_src)
    steps = steps_per_epoch(n, lp.batch_size, lp.world)
    if not steps:
        raise TrainingError(f"{n} training images cannot feed {lp.world} processes (each "
                            "needs at least one per step): label more, or start fewer")
    sched = recipe.scheduler(opt, rec, steps * epochs)
    order_gen = torch.Generator().manual_seed(seed)                     # permutations, CPU
    aug_gen = torch.Generator(device=lp.device).manual_seed(seed + 1)   # draws, on the device
    history = []
    for epoch in range(1, epochs + 1):
        recipe.train_mode(inner, rec)
        loss_sum = torch.zeros((), device=lp.device)   # summed on the device: no sync per step
        correct = torch.zeros((), device=lp.device, dtype=torch.long)
        seen = torch.zeros((), device=lp.device, dtype=torch.long)
        first_bad = torch.full((), -1, device=lp.device, dtype=torch.long)
        index = residency.epoch_batches(n, lp.batch_size, order_gen)[:steps]
        mine = [i[lp.rank::lp.world] for i in index]   # this rank's rows of each global batch
        bar = tqdm(total=len(index), desc=f"epoch {epoch}/{epochs}", unit="step", leave=False,
                   disable=None if progress and lp.rank == 0 else True, file=sys.stderr)
        for step, (xb, yb) in enumerate(train_src.batches(mine), start=1):
            x = augment.batch(xb, aug, aug_gen, draws_for=len(index[step - 1]),
                              pick=slice(lp.rank, None, lp.world))
            with autocast(lp):
                logits = model(x)
            loss = recipe.loss(logits, yb, rec)
            first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss),
                                    torch.full_like(first_bad, step), first_bad)
            if step % NAN_CHECK_EVERY == 0 or step == len(index):
                if first_bad.item() >= 0:
                    raise TrainingError(f"loss became NaN/inf at epoch {epoch}, step "
                                        f"{first_bad.item()}; lower train.lr or check the data")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.detach() * len(yb)
            correct += (logits.argmax(1) == yb).sum()
            seen += len(yb)
            bar.update()
        bar.close()
        if lp.world > 1:
            stats = torch.stack([loss_sum, correct.float(), seen.float()])
            dist.all_reduce(stats)
            loss_sum, correct, seen = stats[0], stats[1], stats[2]
        row = {"epoch": epoch, "train_loss": round(loss_sum.item() / seen.item(), 5),
               "train_acc": round(correct.item() / seen.item(), 5)}
        if epoch == epochs and recalibrate:
            recipe.train_mode(inner, rec)
            perm = residency.epoch_batches(n, lp.batch_size, order_gen)
            sub = torch.cat(perm)[:PRECISE_BN_IMAGES].sort().values
            precise_bn(inner, train_src, lp, list(sub[lp.rank::lp.world].split(lp.batch_size)))
        if val_src is not None:
            row["val_loss"], row["val_acc"] = (round(v, 5) for v in evaluate(model, val_src, lp))
        history.append(row)
        if progress and lp.rank == 0:
            print("  ".join(f"{k} {v}" for k, v in row.items()), flush=True)
    return history
