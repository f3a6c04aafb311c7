"""Accuracy of labelgate's default recipe on a real colour data set, against a standard
torchvision recipe, warm start against from scratch, and seed-to-seed spread - in one run.

Data: the emoji demo set (pipelines/datasets.py: 1,884 Twemoji drawings, 9 Unicode groups,
colour with transparency), preprocessed at the demo's input spec (RGB 32x32 on white); its
fixed stratified eval split (480) is the test set, the other 1,404 images train.

  recipe  labelgate (train._train: params.yaml + the demo's overrides; arch auto) vs the
          torchvision way with the same arch and epochs: DataLoader decoding the PNGs per
          step, RandomCrop(padding 4) + RandomHorizontalFlip, SGD momentum 0.9 lr 0.1 at batch
          128, weight decay 5e-4, cosine, no label smoothing. Test accuracy and wall time.
  warm    a "production" model trained on half the training images, then all of them: warm
          start from it vs from scratch, test accuracy per epoch; epochs until warm start
          reaches the from-scratch final accuracy.
  seeds   K seeds of the default recipe and of the seed's old recipe (Adam at a constant lr, no
          weight decay, no label smoothing, shifts only, no precise BatchNorm): accuracy and
          per-class recall spread (the issue's retrain moved one class's recall 0.474 -> 0.268).

    python benchmarks/train_accuracy.py [--parts recipe,warm,seeds] [--epochs 10] [--seeds 3]
        [--device auto|cpu|cuda] [--threads N] [--arch auto]
"""
from __future__ import annotations

import argparse
import copy
import io
import sys
import time
from pathlib import Path
from unittest import mock

import numpy as np
import torch
import torch.nn.functional as F
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from pipelines import archs, datasets, inputspec, loop, net, recipe, settings, train  # noqa: E402
from pipelines.device import pick_device, seed_everything  # noqa: E402

PARAMS = Path(__file__).resolve().parent.parent / "params.yaml"


def params_with(overrides: dict) -> settings.Params:
    raw = yaml.safe_load(PARAMS.read_text())
    for dotted, value in overrides.items():
        section, key = dotted.split(".")
        raw[section][key] = copy.deepcopy(value)
    return settings.parse(raw)


def load(ds_name: str):
    ds = datasets.get(ds_name)
    items = ds.items()
    labels = [it.label for it in items]
    roles = datasets.eval_roles(labels, eval_tasks=ds.eval_tasks, unlabeled_tasks=0,
                                classes=len(ds.classes), stratified=ds.stratified_eval)
    test = np.array([r == "eval" for r in roles])
    overrides = {**ds.params, "base.classes": list(ds.classes)}
    params = params_with(overrides)
    spec = inputspec.from_params(params)
    x = inputspec.stack([it.data for it in items], spec)
    y = np.array(labels, dtype=np.int64)
    blobs = [it.data for it in items]
    return ds, params, spec, x, y, test, blobs, overrides


def recalls(model, x, y, k: int, device) -> tuple[float, np.ndarray]:
    pred = net.predict_proba(model, x, device=device).argmax(1)
    rec = np.array([(pred[y == c] == c).mean() for c in range(k)])
    return float((pred == y).mean()), rec


def labelgate(x, y, xt, yt, *, params, spec, classes, epochs, seed, device, init_model=None):
    t0 = time.perf_counter()
    out = train._train(x, y, arch=params.train.arch, spec=spec, classes=classes, params=params,
                       epochs=epochs, seed=seed, x_val=xt, y_val=yt, init_model=init_model,
                       device=device)
    return out, time.perf_counter() - t0


class PngSet(torch.utils.data.Dataset):
    """The torchvision way: decode the PNG, composite on white, resize, augment - per sample,
    every epoch."""

    def __init__(self, blobs, y, spec, train_tf: bool):
        from torchvision import transforms as T
        self.blobs, self.y, self.spec = blobs, y, spec
        tf = [T.RandomCrop(spec.height, padding=4), T.RandomHorizontalFlip()] if train_tf else []
        self.tf = T.Compose([*tf, T.PILToTensor()])

    def __len__(self):
        return len(self.blobs)

    def __getitem__(self, i):
        from PIL import Image
        img = Image.open(io.BytesIO(self.blobs[i])).convert("RGBA")
        bg = Image.new("RGBA", img.size, (*self.spec.background, 255))
        img = Image.alpha_composite(bg, img).convert("RGB").resize(
            (self.spec.width, self.spec.height), Image.Resampling.BILINEAR)
        return self.tf(img).float(), int(self.y[i])


def torchvision_recipe(blobs, y, xt, yt, *, arch, spec, classes, epochs, seed, device,
                       workers):
    t0 = time.perf_counter()
    seed_everything(seed)
    model = net.build(arch, classes, spec).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    loader = torch.utils.data.DataLoader(PngSet(blobs, y, spec, True), batch_size=128,
                                         shuffle=True, num_workers=workers,
                                         generator=torch.Generator().manual_seed(seed))
    for _ in range(epochs):
        model.train()
        for xb, yb in loader:
            loss = F.cross_entropy(model(xb.to(device)), yb.to(device))
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
    acc, _ = recalls(model, xt, yt, len(classes), device)
    return acc, time.perf_counter() - t0


def old_recipe():
    """The seed's recipe: Adam (no decay) at a constant rate, no smoothing, no precise BN."""
    return mock.patch.multiple(recipe, lr_factor=lambda step, total, r: 1.0), \
        mock.patch.object(loop, "precise_bn", lambda *a, **k: False)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="emoji")
    ap.add_argument("--parts", default="recipe,warm,seeds")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--arch", default=None, help="default: the data set's params (auto)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--workers", type=int, default=0, help="DataLoader workers (torchvision)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    parts = set(args.parts.split(","))
    device = pick_device(args.device)
    ds, params, spec, x, y, test, blobs, overrides = load(args.dataset)
    if args.arch:
        params = params_with({**overrides, "train.arch": args.arch})
    classes = ds.classes
    arch = archs.resolve_arch(params.train.arch, spec, device.type)
    xtr, ytr, xt, yt = x[~test], y[~test], x[test], y[test]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"CPU ({torch.get_num_threads()} threads)"
    print(f"device: {name}; {ds.name}: {len(ytr)} train / {len(yt)} test images, "
          f"{len(classes)} classes, {spec.channels}x{spec.height}x{spec.width}; arch {arch}; "
          f"{args.epochs} epochs", flush=True)
    E = args.epochs
    base, base_s = labelgate(xtr, ytr, xt, yt, params=params, spec=spec, classes=classes,
                             epochs=E, seed=0, device=device)
    base_acc, base_rec = recalls(base.module, xt, yt, len(classes), device)
    print(f"labelgate default recipe: test accuracy {base_acc:.4f} in {base_s:.0f} s", flush=True)
    if "recipe" in parts:
        train_blobs = [blobs[i] for i in np.nonzero(~test)[0]]
        tv_acc, tv_s = torchvision_recipe(train_blobs, ytr, xt, yt, arch=arch, spec=base.spec,
                                          classes=classes, epochs=E, seed=0, device=device,
                                          workers=args.workers)
        print(f"\n| recipe ({arch}, {E} epochs) | test accuracy | wall s |\n|---|---|---|\n"
              f"| labelgate default (on-device aug, AdamW one-cycle, smoothing 0.1) | "
              f"{base_acc:.4f} | {base_s:.0f} |\n"
              f"| torchvision (PNG DataLoader, crop+flip, SGD 0.1 cosine, wd 5e-4) | "
              f"{tv_acc:.4f} | {tv_s:.0f} |", flush=True)
    if "warm" in parts:
        half = np.random.default_rng(0).permutation(len(ytr))[:len(ytr) // 2]
        prod, _ = labelgate(xtr[half], ytr[half], xt, yt, params=params, spec=spec,
                            classes=classes, epochs=E, seed=1, device=device)
        tmp = Path(__import__("tempfile").mkdtemp())
        net.save(prod.module, tmp / "prod.safetensors", arch=prod.arch, classes=classes,
                 spec=prod.spec)
        wparams = params_with({**overrides, "train.arch": arch, "train.init": "production"})
        warm, warm_s = labelgate(xtr, ytr, xt, yt, params=wparams, spec=prod.spec,
                                 classes=classes, epochs=E, seed=0, device=device,
                                 init_model=tmp / "prod.safetensors")
        target = base.history[-1]["val_acc"]
        curve_w = [h["val_acc"] for h in warm.history]
        curve_s = [h["val_acc"] for h in base.history]
        reach = next((i + 1 for i, a in enumerate(curve_w) if a >= target), None)
        reach_s = next((i + 1 for i, a in enumerate(curve_s) if a >= target), None)
        print(f"\nproduction (half the training images): test accuracy "
              f"{prod.history[-1]['val_acc']:.4f}; {warm.init}")
        print("| epoch | " + " | ".join(str(i + 1) for i in range(E)) + " |\n|---|"
              + "---|" * E)
        print("| from scratch | " + " | ".join(f"{a:.3f}" for a in curve_s) + " |")
        print("| warm start | " + " | ".join(f"{a:.3f}" for a in curve_w) + " |")
        print(f"warm start reaches the from-scratch final accuracy ({target:.4f}) at epoch "
              f"{reach} (from scratch: epoch {reach_s}); final {curve_w[-1]:.4f} in "
              f"{warm_s:.0f} s", flush=True)
    if "seeds" in parts and args.seeds > 1:
        rows = {"default": [(base_acc, base_rec)], "old": []}
        old_params = params_with({**overrides, "train.arch": arch, "train.weight_decay": 0.0,
                                  "train.label_smoothing": 0.0, "train.warmup": 0.0,
                                  "train.hflip": False, "train.color_jitter": 0.0})
        for seed in range(args.seeds):
            if seed:
                out, _ = labelgate(xtr, ytr, xt, yt, params=params, spec=spec, classes=classes,
                                   epochs=E, seed=seed, device=device)
                rows["default"].append(recalls(out.module, xt, yt, len(classes), device))
            p1, p2 = old_recipe()
            with p1, p2:
                out, _ = labelgate(xtr, ytr, xt, yt, params=old_params, spec=spec,
                                   classes=classes, epochs=E, seed=seed, device=device)
            rows["old"].append(recalls(out.module, xt, yt, len(classes), device))
            print(f"seed {seed}: default {rows['default'][-1][0]:.4f}, old "
                  f"{rows['old'][-1][0]:.4f}", flush=True)
        print(f"\n| recipe, {args.seeds} seeds | accuracy mean | accuracy std | per-class recall: "
              f"largest std | largest range (class) |\n|---|---|---|---|---|")
        for label, what in (("default", "labelgate default"), ("old", "seed's Adam, constant lr")):
            accs = np.array([a for a, _ in rows[label]])
            recs = np.stack([r for _, r in rows[label]])
            rng = recs.max(0) - recs.min(0)
            worst = int(rng.argmax())
            print(f"| {what} | {accs.mean():.4f} | {accs.std(ddof=1):.4f} | "
                  f"{recs.std(0, ddof=1).max():.4f} | {rng.max():.3f} ({classes[worst]}: "
                  f"{recs[:, worst].min():.3f}-{recs[:, worst].max():.3f}) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
