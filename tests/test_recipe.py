"""pipelines.recipe: parameter groups (no decay on norms and biases, backbone lr, frozen
backbone), the schedules, the batch scaling of the learning rate."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from pipelines import recipe
from pipelines.recipe import Recipe


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(1, 4, 3, bias=False), nn.BatchNorm2d(4),
                                      nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(4, 3)


def _r(**kw) -> Recipe:
    base = dict(optimizer="adamw", lr=0.01, weight_decay=0.05, label_smoothing=0.1,
                schedule="onecycle", warmup=0.2, backbone_lr_scale=1.0, freeze_backbone=False)
    return Recipe(**{**base, **kw})


def _groups(model, r):
    names = {id(p): n for n, p in model.named_parameters()}
    return [({names[id(p)] for p in g["params"]}, g["lr"], g["weight_decay"])
            for g in recipe.param_groups(model, r)]


def test_no_weight_decay_on_norms_and_biases():
    groups = _groups(Tiny(), _r())
    decayed = set().union(*(n for n, _, wd in groups if wd > 0))
    assert decayed == {"backbone.0.weight", "head.weight"}
    assert all(wd in (0.0, 0.05) for _, _, wd in groups)


def test_backbone_learning_rate_is_scaled():
    groups = _groups(Tiny(), _r(backbone_lr_scale=0.1))
    for names, lr, _ in groups:
        want = 0.01 if all(n.startswith("head.") for n in names) else 0.001
        assert lr == pytest.approx(want)
        assert all(n.startswith("head.") for n in names) or \
            all(n.startswith("backbone.") for n in names)


def test_a_frozen_backbone_has_no_group_and_keeps_its_batchnorm_statistics():
    model = Tiny()
    r = _r(freeze_backbone=True, backbone_lr_scale=0.1)
    groups = _groups(model, r)
    assert set().union(*(n for n, _, _ in groups)) == {"head.weight", "head.bias"}
    recipe.train_mode(model, r)
    assert model.head.training and not model.backbone.training
    before = model.backbone[1].running_mean.clone()
    model.head(model.backbone(torch.rand(8, 1, 6, 6) * 5))
    assert torch.equal(model.backbone[1].running_mean, before)
    assert not any(p.requires_grad for p in model.backbone.parameters())


def test_freezing_a_random_backbone_is_refused():
    from tests import factories
    t = factories.params({"train.freeze_backbone": True}).train
    with pytest.raises(recipe.RecipeError, match="train.init"):
        recipe.from_train(t, batch=128, initialised=False)
    assert recipe.from_train(t, batch=128, initialised=True).freeze_backbone
    # from scratch the backbone learns at the full rate whatever backbone_lr_scale says
    t2 = factories.params({"train.backbone_lr_scale": 0.1}).train
    assert recipe.from_train(t2, batch=128, initialised=False).backbone_lr_scale == 1.0
    assert recipe.from_train(t2, batch=128, initialised=True).backbone_lr_scale == 0.1


@pytest.mark.parametrize("schedule", ["onecycle", "cosine"])
def test_schedule_warms_up_peaks_and_anneals(schedule):
    r = _r(schedule=schedule, warmup=0.25)
    f = [recipe.lr_factor(s, 100, r) for s in range(100)]
    assert f[0] < 0.1 and max(f) == pytest.approx(1.0) and f.index(max(f)) == 25
    assert all(a <= b for a, b in zip(f[:25], f[1:26]))          # rising
    assert all(a >= b for a, b in zip(f[25:], f[26:]))           # falling
    assert 0 < f[-1] < 0.02                                      # ends near 0, still moving


def test_scheduler_drives_every_group():
    model = Tiny()
    r = _r(backbone_lr_scale=0.5, warmup=0.0)
    opt = recipe.optimizer(model, r)
    sched = recipe.scheduler(opt, r, 10)
    for _ in range(5):
        opt.step()
        sched.step()
    factor = recipe.lr_factor(5, 10, r)
    lrs = sorted({round(g["lr"], 9) for g in opt.param_groups})
    assert lrs == sorted({round(0.01 * factor, 9), round(0.005 * factor, 9)})


def test_lr_scaling_rules():
    assert recipe.scaled_lr(0.002, "adamw", 512) == pytest.approx(0.002 * math.sqrt(4))
    assert recipe.scaled_lr(0.1, "sgd", 512) == pytest.approx(0.4)
    assert isinstance(recipe.optimizer(Tiny(), _r(optimizer="sgd")), torch.optim.SGD)
    assert isinstance(recipe.optimizer(Tiny(), _r()), torch.optim.AdamW)


def test_label_smoothing_is_applied():
    logits = torch.tensor([[10.0, 0.0, 0.0]])
    y = torch.tensor([0])
    assert recipe.loss(logits, y, _r(label_smoothing=0.0)) < \
        recipe.loss(logits, y, _r(label_smoothing=0.2))
