"""Training throughput of a ResNet-18 at 32 px and at 224 px, four ways, in one run:

  (a) tutorial: torchvision ImageFolder of JPEG files on disk + transforms (RandomCrop with
      padding, flip, ToTensor, Normalize) + DataLoader(workers, pin_memory), batch 128
  (b) labelgate resident: pipelines.loop.fit, the packed uint8 split on the device, batches
      gathered there, augmentation on the device, bf16 + channels_last on CUDA
  (b') labelgate streaming: the same loop, the split read per batch from its memory map
      (pipelines/residency.py: pinned buffers, a prefetch thread, non_blocking copies)
  (c) bound: forward + backward + step on one fixed on-device batch (same settings as b)

    python benchmarks/train_throughput.py [--device auto|cpu|cuda] [--sizes 32,224]
        [--images N] [--seconds S] [--workers W] [--batch B] [--threads T]

The images are real artwork (the Twemoji drawings of the emoji demo, pipelines/datasets.py),
resized once to each size: (a) gets them as JPEG files at the training size (the tutorial's
best case: no resize per step), (b)/(b') as the packed split prepare writes. Prints images/s
and the ratios b/c, b'/c, b/a per size (goals on CUDA: b >= 0.85 c, b' >= 0.8 c, b >= 5 a at
224 px).
"""
from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from pipelines import augment, datasets, loop, net, recipe, residency, settings  # noqa: E402
from pipelines.device import pick_device  # noqa: E402
from pipelines.inputspec import InputSpec  # noqa: E402

ARCH = "resnet18"
PARAMS = Path(__file__).resolve().parent.parent / "params.yaml"


def images(n: int, size: int) -> tuple[np.ndarray, np.ndarray, int]:
    """`n` real colour drawings (cycled) as `(n, size, size, 3)` uint8 on white, labels, classes."""
    ds = datasets.get("emoji")
    items = ds.items()
    first = []
    for it in items[:min(n, len(items))]:
        img = Image.open(io.BytesIO(it.data)).convert("RGBA")
        bg = Image.new("RGBA", img.size, (255, 255, 255, 255))
        first.append(np.asarray(Image.alpha_composite(bg, img).convert("RGB").resize(
            (size, size), Image.Resampling.BILINEAR)))
    idx = np.arange(n) % len(first)
    return (np.stack([first[i] for i in idx]),
            np.array([items[i].label for i in idx], dtype=np.int64), len(ds.classes))


def write_folder(x: np.ndarray, y: np.ndarray, root: Path) -> None:
    """ImageFolder layout: root/<class>/<i>.jpg (JPEG quality 90)."""
    for i, (img, label) in enumerate(zip(x, y)):
        d = root / f"c{label}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(d / f"{i:06d}.jpg", quality=90)


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _model(spec: InputSpec, classes: int, lp: loop.LoopPlan) -> torch.nn.Module:
    model = loop.to_device(net.build(ARCH, [str(i) for i in range(classes)], spec), lp)
    return torch.compile(model) if lp.compile else model


def _rec(t, lp) -> recipe.Recipe:
    return recipe.from_train(t, batch=lp.batch_size, initialised=False)


def tutorial(root: Path, spec: InputSpec, classes: int, lp: loop.LoopPlan, t, *,
             seconds: float, workers: int) -> float:
    from torchvision import datasets as tvd
    from torchvision import transforms as T
    tf = T.Compose([T.RandomCrop(spec.height, padding=max(1, spec.height // 8),
                                 padding_mode="reflect"),
                    T.RandomHorizontalFlip(), T.ToTensor(),
                    T.Normalize([m / 255 for m in spec.mean], [s / 255 for s in spec.std])])
    loader = DataLoader(tvd.ImageFolder(str(root), transform=tf), batch_size=lp.batch_size,
                        shuffle=True, num_workers=workers, drop_last=True,
                        pin_memory=lp.device.type == "cuda", persistent_workers=workers > 0)
    model = loop.to_device(net.build(ARCH, [str(i) for i in range(classes)],
                                     spec.with_stats((0.0,) * 3, (1.0,) * 3)), lp)
    opt = recipe.optimizer(model, _rec(t, lp))
    model.train()
    done, t0, warm = 0, None, 2
    while True:
        for x, y in loader:
            x = x.to(lp.device, non_blocking=True)
            if lp.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            y = y.to(lp.device, non_blocking=True)
            with loop.autocast(lp):
                logits = model(x)
            loss = F.cross_entropy(logits.float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if warm:
                warm -= 1
                if not warm:
                    _sync(lp.device)
                    t0 = time.perf_counter()
                continue
            done += len(y)
            if time.perf_counter() - t0 > seconds:
                _sync(lp.device)
                return done / (time.perf_counter() - t0)


def labelgate(src, spec: InputSpec, classes: int, lp: loop.LoopPlan, t, *,
              seconds: float) -> float:
    """Epochs of loop.fit's inner loop (same code path as training: residency source, on-device
    augmentation, recipe optimizer and schedule) until `seconds` have passed."""
    model = _model(spec, classes, lp)
    aug = augment.Augment(shift_px=max(1, spec.height // 8), hflip=True, color_jitter=0.2)
    loop.fit(model, src, None, lp=lp, rec=_rec(t, lp), aug=aug, epochs=1, seed=0,
             progress=False, recalibrate=False)   # warm-up (and compile)
    _sync(lp.device)
    epochs, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds or epochs == 0:
        loop.fit(model, src, None, lp=lp, rec=_rec(t, lp), aug=aug, epochs=1, seed=epochs + 1,
                 progress=False, recalibrate=False)
        epochs += 1
    _sync(lp.device)
    return epochs * len(src) / (time.perf_counter() - t0)


def bound(spec: InputSpec, classes: int, lp: loop.LoopPlan, t, *, seconds: float) -> float:
    model = _model(spec, classes, lp)
    opt = recipe.optimizer(model, _rec(t, lp))
    xb = torch.randint(0, 256, (lp.batch_size, spec.height, spec.width, 3), dtype=torch.uint8,
                       device=lp.device)
    x = augment.batch(xb)
    y = torch.randint(0, classes, (lp.batch_size,), device=lp.device)
    model.train()
    steps, t0 = -2, None
    while True:
        with loop.autocast(lp):
            logits = model(x)
        loss = F.cross_entropy(logits.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        steps += 1
        if steps == 0:
            _sync(lp.device)
            t0 = time.perf_counter()
        elif steps > 0 and time.perf_counter() - t0 > seconds:
            _sync(lp.device)
            return steps * lp.batch_size / (time.perf_counter() - t0)


def one_size(size: int, n: int, args, params, device, tmp: Path) -> dict:
    x, y, classes = images(n, size)
    mean = tuple(float(m) for m in x.reshape(-1, 3).mean(0))
    std = tuple(float(s) for s in x.reshape(-1, 3).std(0))
    spec = InputSpec(3, size, size, "stretch", (255, 255, 255), mean, std)
    t = params.train
    lp = loop.plan(t, device, n_train=n)
    if args.batch:
        lp = loop.LoopPlan(**{**lp.__dict__, "batch_size": min(args.batch, n), "note": ""})
    folder = tmp / f"folder{size}"
    write_folder(x, y, folder)
    np.save(tmp / f"x{size}.npy", x)
    mm = np.load(tmp / f"x{size}.npy", mmap_mode="r")
    a = tutorial(folder, spec, classes, lp, t, seconds=args.seconds, workers=args.workers)
    b = labelgate(residency.source(mm, y, device=device, resident=True), spec, classes, lp, t,
                  seconds=args.seconds)
    b2 = labelgate(residency.source(mm, y, device=device, resident=False), spec, classes, lp, t,
                   seconds=args.seconds)
    c = bound(spec, classes, lp, t, seconds=args.seconds)
    return {"size": size, "n": n, "batch": lp.batch_size, "a": a, "b": b, "b2": b2, "c": c}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--sizes", default="32,224", help="image sides, comma-separated")
    ap.add_argument("--images", type=int, default=None,
                    help="images per size (default: 512 on CPU, 32768 at 32 px / 8192 at 224 px "
                         "on CUDA)")
    ap.add_argument("--seconds", type=float, default=None,
                    help="time per measurement (default: 10 on CPU, 15 on CUDA)")
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers for (a)")
    ap.add_argument("--batch", type=int, default=None,
                    help="batch (default: train.batch_size / batch_size_cuda of params.yaml)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default: torch's; on a busy machine 1 avoids "
                         "oversubscription stalls)")
    ap.add_argument("--params", default=str(PARAMS))
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    params = settings.load(args.params)
    device = pick_device(args.device)
    cuda = device.type == "cuda"
    args.seconds = args.seconds or (15.0 if cuda else 10.0)
    torch.manual_seed(0)
    name = torch.cuda.get_device_name(device) if cuda else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device: {name}; torch {torch.__version__}; {ARCH}; real Twemoji drawings, RGB")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in (int(s) for s in args.sizes.split(",")):
            n = args.images or ((32768 if size <= 64 else 8192) if cuda else 512)
            rows.append(one_size(size, n, args, params, device, Path(tmp)))
    print(f"\n| px | images | batch | (a) tutorial, {args.workers} workers | (b) resident | "
          f"(b') streaming | (c) fwd+bwd bound | b/c | b'/c | b/a |\n|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['size']} | {r['n']} | {r['batch']} | {r['a']:,.0f} | {r['b']:,.0f} | "
              f"{r['b2']:,.0f} | {r['c']:,.0f} | {r['b'] / r['c']:.2f} | {r['b2'] / r['c']:.2f} | "
              f"{r['b'] / r['a']:.2f} |")
    print("\nimages/s; goals on CUDA: b >= 0.85 c, b' >= 0.8 c, b >= 5 a at 224 px")
    return 0


if __name__ == "__main__":
    sys.exit(main())
