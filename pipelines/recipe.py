"""The training recipe: optimizer with parameter groups, learning-rate schedule, loss.

One shape for every architecture (fastai's `vision_learner` default: AdamW + one-cycle, label
smoothing, decoupled weight decay); the arch only decides what is backbone and what is head
(`model.backbone` / `model.head`, net.Classifier). Why this and not plain Adam at a constant
rate: with a schedule that anneals to 0 the last steps average out the batch noise, and the
seed-to-seed spread of per-class recall shrinks (measured: benchmarks/train_accuracy.py
--seeds).

    opt = recipe.optimizer(model, r)          # groups: decay / no decay x backbone / head
    sched = recipe.scheduler(opt, r, total_steps)
    loss = recipe.loss(logits, y, r)
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

LR_REF_BATCH = 128   # train.lr is the peak learning rate at this batch size
SGD_MOMENTUM = 0.9   # nesterov; torchvision's reference recipes and airbench use 0.9 too


class RecipeError(ValueError):
    pass


@dataclass(frozen=True)
class Recipe:
    optimizer: str             # adamw | sgd
    lr: float                  # peak lr of the head, scaled for the batch actually used
    weight_decay: float
    label_smoothing: float
    schedule: str              # onecycle | cosine
    warmup: float              # share of all steps rising to the peak
    backbone_lr_scale: float   # 1.0 from scratch; train.backbone_lr_scale when initialised
    freeze_backbone: bool


def scaled_lr(lr: float, optimizer: str, batch: int) -> float:
    """`lr` is given at LR_REF_BATCH. AdamW: x sqrt(batch / 128) (linear over-shoots with Adam);
    SGD: x batch / 128 (Goyal et al.'s linear rule, with the warm-up below)."""
    ratio = batch / LR_REF_BATCH
    return lr * (math.sqrt(ratio) if optimizer == "adamw" else ratio)


def from_train(t, *, batch: int, initialised: bool) -> Recipe:
    """The recipe from settings.Train for `batch`. `initialised`: the backbone starts from
    weights or the production model (then train.backbone_lr_scale and freeze_backbone apply;
    from scratch a frozen or slowed random backbone would be pointless)."""
    if t.freeze_backbone and not initialised:
        raise RecipeError("train.freeze_backbone: true needs a trained backbone: set train.init "
                          "to weights (with train.init_weights) or production")
    return Recipe(optimizer=t.optimizer, lr=scaled_lr(t.lr, t.optimizer, batch),
                  weight_decay=t.weight_decay, label_smoothing=t.label_smoothing,
                  schedule=t.schedule, warmup=t.warmup,
                  backbone_lr_scale=t.backbone_lr_scale if initialised else 1.0,
                  freeze_backbone=t.freeze_backbone)


def _no_decay(name: str, p: nn.Parameter) -> bool:
    # norms' scales and every bias: decaying them only fights the normalisation (and a BN
    # weight decayed to 0 switches a channel off)
    return p.ndim <= 1 or name.endswith(".bias")


def param_groups(model: nn.Module, r: Recipe) -> list[dict]:
    """Up to four groups (backbone/head x decay/no decay), each with its peak `lr` (the
    scheduler multiplies it). A frozen backbone gets requires_grad False and no group."""
    backbone = getattr(model, "backbone", None)
    if r.freeze_backbone:
        if backbone is None:
            raise RecipeError("this model has no backbone to freeze")
        backbone.requires_grad_(False)
    in_backbone = {id(p) for p in backbone.parameters()} if backbone is not None else set()
    groups: dict[tuple[bool, bool], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        groups.setdefault((id(p) in in_backbone, _no_decay(name, p)), []).append(p)
    out = []
    for (is_backbone, no_decay), params in sorted(groups.items()):
        out.append({"params": params,
                    "lr": r.lr * (r.backbone_lr_scale if is_backbone else 1.0),
                    "weight_decay": 0.0 if no_decay else r.weight_decay})
    return out


def optimizer(model: nn.Module, r: Recipe) -> torch.optim.Optimizer:
    groups = param_groups(model, r)
    if r.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=r.lr, betas=(0.9, 0.99), eps=1e-8)
    if r.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=r.lr, momentum=SGD_MOMENTUM, nesterov=True)
    raise RecipeError(f"unknown optimizer {r.optimizer!r}")


def lr_factor(step: int, total: int, r: Recipe) -> float:
    """Multiplier of the peak lr before optimizer step `step` (0-based) of `total`.
    onecycle: linear 0.04 -> 1 over the warm-up, then linear to 0 at the last step (airbench's
    triangle, ending near 0); cosine: the same warm-up, then half a cosine to 0."""
    warm = max(1, round(r.warmup * total)) if r.warmup > 0 else 0
    if step < warm:
        return 0.04 + 0.96 * step / warm
    rest = max(1, total - warm)
    done = min(1.0, (step - warm) / rest)   # the last step still moves (factor 1/rest)
    if r.schedule == "onecycle":
        return max(0.0, 1.0 - done)
    return 0.5 * (1.0 + math.cos(math.pi * done))


def scheduler(opt: torch.optim.Optimizer, r: Recipe,
              total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total_steps, r))


def loss(logits: torch.Tensor, y: torch.Tensor, r: Recipe) -> torch.Tensor:
    return F.cross_entropy(logits.float(), y, label_smoothing=r.label_smoothing)


def train_mode(model: nn.Module, r: Recipe) -> None:
    """model.train(), except a frozen backbone: its BatchNorm keeps the running statistics it
    was trained with, and its dropout stays off (it is a fixed feature extractor)."""
    model.train()
    if r.freeze_backbone:
        model.backbone.eval()
