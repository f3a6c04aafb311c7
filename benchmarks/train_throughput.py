"""Training throughput, three ways, measured in one run on the same data and model:

  (a) tutorial: a DataLoader that opens each PNG with PIL and calls ToTensor per sample, batch 64
  (b) labelgate: pipelines.train.fit — the split resident on the device as uint8, on-device
      permutation, shifts and normalisation; bf16 autocast + channels_last on CUDA
  (c) bound: forward+backward+step on one fixed on-device batch (same settings as b)

    python benchmarks/train_throughput.py [--device auto|cpu|cuda] [--images N] [--seconds S]

Prints images/s for each and the ratios b/a, b/c (and c/a: no loop can beat c, so on a device
where c/a < 3, b/a >= 3 is out of reach by construction).
"""
from __future__ import annotations

import argparse
import io
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from pipelines import images, net, settings, train  # noqa: E402
from pipelines.device import pick_device  # noqa: E402

CLASSES = tuple(str(i) for i in range(10))  # the digits


def digit_pngs(n: int, side: int = 32) -> tuple[list[bytes], np.ndarray]:
    """`n` real digit scans (scikit-learn's 1,797, cycled) as PNG bytes, like the demo's files."""
    from sklearn.datasets import load_digits
    d = load_digits()
    pngs = []
    for img in d.images:
        buf = io.BytesIO()
        Image.fromarray((img * (255 / 16)).astype(np.uint8), "L").resize(
            (side, side), Image.Resampling.BICUBIC).save(buf, format="PNG")
        pngs.append(buf.getvalue())
    idx = np.arange(n) % len(pngs)
    return [pngs[i] for i in idx], d.target[idx].astype(np.int64)


class PngDataset(Dataset):
    """The tutorial way: decode + ToTensor + Normalize per sample, every epoch."""

    def __init__(self, blobs: list[bytes], labels: np.ndarray, size: int) -> None:
        self.blobs, self.labels = blobs, labels
        self.tf = transforms.Compose([transforms.Grayscale(), transforms.Resize((size, size)),
                                      transforms.ToTensor(), transforms.Normalize((0.5,), (0.5,))])

    def __len__(self) -> int:
        return len(self.blobs)

    def __getitem__(self, i: int):
        return self.tf(Image.open(io.BytesIO(self.blobs[i]))), int(self.labels[i])


def tutorial(blobs, labels, size, device, seconds, workers) -> float:
    model = net.build(CLASSES, size).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loader = DataLoader(PngDataset(blobs, labels, size), batch_size=64, shuffle=True,
                        num_workers=workers, pin_memory=device.type == "cuda",
                        persistent_workers=workers > 0)
    model.train()
    done, t0, warm = 0, None, 3
    while True:
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if warm:
                warm -= 1
                if not warm:
                    _sync(device)
                    t0 = time.perf_counter()
                continue
            done += len(y)
            if time.perf_counter() - t0 > seconds:
                _sync(device)
                return done / (time.perf_counter() - t0)


def labelgate(x_uint8, y, params, device, seconds) -> tuple[float, train.LoopPlan]:
    lp = train.plan(params.train, device, n_train=len(x_uint8))
    x, yt = torch.from_numpy(x_uint8).to(device), torch.from_numpy(y).to(device)
    model = train.to_device(net.build(CLASSES, x.shape[-1]), lp)
    run = torch.compile(model) if lp.compile else model
    train.fit(run, x, yt, None, None, lp=lp, epochs=1, shift_px=params.train.shift_px,
              seed=0, progress=False)  # warm-up (and compile)
    _sync(device)
    epochs, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        train.fit(run, x, yt, None, None, lp=lp, epochs=1, shift_px=params.train.shift_px,
                  seed=epochs, progress=False)
        epochs += 1
    _sync(device)
    return epochs * len(x) / (time.perf_counter() - t0), lp


def bound(lp: train.LoopPlan, size: int, device, seconds) -> float:
    model = train.to_device(net.build(CLASSES, size), lp)
    run = torch.compile(model) if lp.compile else model
    opt = torch.optim.Adam(model.parameters(), lr=lp.lr)
    xb = torch.randint(0, 256, (lp.batch_size, size, size), dtype=torch.uint8, device=device)
    x = train.batch_input(xb, lp)
    y = torch.randint(0, len(CLASSES), (lp.batch_size,), device=device)
    steps, t0 = -3, None
    while True:
        with train._autocast(lp):
            logits = run(x)
        loss = F.cross_entropy(logits.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        steps += 1
        if steps == 0:
            _sync(device)
            t0 = time.perf_counter()
        elif steps > 0 and steps % 20 == 0 and time.perf_counter() - t0 > seconds:
            _sync(device)
            return steps * lp.batch_size / (time.perf_counter() - t0)


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--images", type=int, default=None,
                    help="dataset size (default: 8192 on CPU, 262144 on CUDA)")
    ap.add_argument("--seconds", type=float, default=None,
                    help="time per measurement (default: 8 on CPU, 15 on CUDA)")
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers for (a)")
    ap.add_argument("--params", default=str(Path(__file__).resolve().parent.parent / "params.yaml"))
    args = ap.parse_args(argv)
    params = settings.load(args.params)
    device = pick_device(args.device)
    cuda = device.type == "cuda"
    n = args.images or (262_144 if cuda else 8192)
    seconds = args.seconds or (15.0 if cuda else 8.0)
    size = params.base.image_size
    torch.manual_seed(0)
    blobs, labels = digit_pngs(n)
    t0 = time.perf_counter()
    x = images.stack(blobs, size)  # labelgate decodes once, when preparing the dataset
    decode_s = time.perf_counter() - t0
    name = torch.cuda.get_device_name(device) if cuda else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device: {name}; torch {torch.__version__}; {n} real digit scans at {size}x{size}; "
          f"one-off decode+pack {decode_s:.1f} s ({n / decode_s:,.0f} images/s)")
    a = tutorial(blobs, labels, size, device, seconds, args.workers)
    b, lp = labelgate(x, labels, params, device, seconds)
    c = bound(lp, size, device, seconds)
    print(f"\n| loop | batch | images/s |\n|---|---|---|\n"
          f"| (a) tutorial: PIL decode + ToTensor per sample, DataLoader({args.workers} workers) "
          f"| 64 | {a:,.0f} |\n"
          f"| (b) labelgate: uint8 on device, on-device shifts{', bf16, channels_last' if cuda else ', channels_last'} "
          f"| {lp.batch_size} | {b:,.0f} |\n"
          f"| (c) bound: fwd+bwd+step on a fixed on-device batch | {lp.batch_size} | {c:,.0f} |")
    goals = "b >= 0.8 c and b >= 50 a" if cuda else "b >= 3 a"
    print(f"\nb/a = {b / a:.2f}   b/c = {b / c:.2f}   c/a = {c / a:.2f}   (goals on "
          f"{device.type}: {goals})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
