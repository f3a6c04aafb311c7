"""train: packed splits -> candidate weights (safetensors), per-epoch curves, metrics.

The whole split is moved to the device once as uint8 (784 B per 28x28 image: 10^6 images =
0.78 GB); batches are slices of an on-device permutation, normalised on the device. Nothing is
decoded per step and there is no per-sample Python in the loop.

    python -m pipelines.train --prepared data/prepared --out models/candidate
"""
from __future__ import annotations

import argparse
import csv
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pipelines import net
from pipelines.device import pick_device, seed_everything
from pipelines.files import atomic_write_json
from pipelines.settings import Params


class TrainingError(RuntimeError):
    pass


def _load_split(path: Path, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    with np.load(path) as z:
        return torch.from_numpy(z["x"]).to(device), torch.from_numpy(z["y"]).to(device)


@torch.no_grad()
def _evaluate(model: net.Net, x: torch.Tensor, y: torch.Tensor, batch: int) -> tuple[float, float]:
    model.eval()
    loss_sum, correct = 0.0, 0
    for i in range(0, len(x), batch):
        logits = model(net.normalize(x[i:i + batch]))
        loss_sum += F.cross_entropy(logits, y[i:i + batch], reduction="sum").item()
        correct += (logits.argmax(1) == y[i:i + batch]).sum().item()
    return loss_sum / len(x), correct / len(x)


def run(prepared_dir: str | Path, out_dir: str | Path, *, params: Params) -> dict:
    prepared_dir, out_dir = Path(prepared_dir), Path(out_dir)
    t = params.train
    device = pick_device(t.device)
    seed_everything(params.base.seed)
    x_train, y_train = _load_split(prepared_dir / "train.npz", device)
    x_val, y_val = _load_split(prepared_dir / "val.npz", device)
    model = net.Net(len(params.base.classes), params.base.image_size).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=t.lr)
    gen = torch.Generator(device=device).manual_seed(params.base.seed)
    history, n, t0 = [], len(x_train), time.monotonic()
    for epoch in range(1, t.epochs + 1):
        model.train()
        perm = torch.randperm(n, device=device, generator=gen)
        loss_sum = torch.zeros((), device=device)  # summed on device: no sync per step
        correct = torch.zeros((), device=device, dtype=torch.long)
        for step, i in enumerate(range(0, n, t.batch_size), start=1):
            idx = perm[i:i + t.batch_size]
            xb, yb = net.normalize(x_train[idx]), y_train[idx]
            logits = model(xb)
            loss = F.cross_entropy(logits, yb)
            if not torch.isfinite(loss):
                raise TrainingError(f"loss became {loss.item()} at epoch {epoch}, step {step}; "
                                    "lower train.lr or check the data")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.detach() * len(idx)
            correct += (logits.argmax(1) == yb).sum()
        val_loss, val_acc = _evaluate(model, x_val, y_val, 1024)
        row = {"epoch": epoch, "train_loss": round(loss_sum.item() / n, 5),
               "train_acc": round(correct.item() / n, 5), "val_loss": round(val_loss, 5),
               "val_acc": round(val_acc, 5)}
        history.append(row)
        print(f"epoch {epoch:>3}/{t.epochs}  loss {row['train_loss']:.4f}  "
              f"acc {row['train_acc']:.4f}  val_loss {row['val_loss']:.4f}  "
              f"val_acc {row['val_acc']:.4f}", flush=True)
    seconds = time.monotonic() - t0
    if not math.isfinite(history[-1]["val_loss"]):
        raise TrainingError(f"validation loss is not finite after epoch {t.epochs}")
    out_dir.mkdir(parents=True, exist_ok=True)
    net.save(model, out_dir / "model.safetensors", classes=params.base.classes,
             image_size=params.base.image_size)
    with open(out_dir / "history.csv", "w", newline="") as f:  # for `dvc plots`
        w = csv.DictWriter(f, fieldnames=list(history[0]))
        w.writeheader()
        w.writerows(history)
    metrics = {"device": device.type, "epochs": t.epochs, "train_images": n,
               "val_images": len(x_val), "val_acc": history[-1]["val_acc"],
               "val_loss": history[-1]["val_loss"], "seconds": round(seconds, 2),
               "images_per_s": round(n * t.epochs / seconds, 1)}
    atomic_write_json(out_dir / "metrics.json", metrics)
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
    except torch.OutOfMemoryError:
        print("train failed: out of GPU memory; lower train.batch_size in params.yaml",
              file=sys.stderr)
        return 1
    print(f"train: {metrics}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
