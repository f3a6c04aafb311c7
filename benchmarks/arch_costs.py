"""What each architecture costs: parameters, model file size, compute per image (MMACs, as the
gate counts it) and training throughput (one batch forward + backward + SGD step, images/s),
at 32 x 32 and 224 x 224 RGB.

    python benchmarks/arch_costs.py [--device cpu] [--sizes 32 224] [--steps 5] [--threads N]

Throughput is the median of `--steps` timed steps after one warm-up step, on a fixed batch
(64 images at <= 64 px, 8 above): the fwd+bwd bound, no data loading. On CUDA: bf16 autocast and
channels_last, as training runs. Timings depend on what else the machine is doing: the load
average is printed with them.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from pipelines import archs, evaluate, net  # noqa: E402
from pipelines.device import pick_device  # noqa: E402
from pipelines.inputspec import InputSpec  # noqa: E402

CLASSES = tuple(str(i) for i in range(10))


def _step_rate(model: net.Classifier, spec: InputSpec, *, device: torch.device,
               steps: int) -> float:
    n = 64 if spec.height <= 64 else 8
    x = torch.randint(0, 256, (n, spec.height, spec.width, spec.channels), dtype=torch.uint8,
                      device=device)
    y = torch.randint(0, len(CLASSES), (n,), device=device)
    model = model.to(device).train()
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    times = []
    for i in range(steps + 1):
        t0 = time.perf_counter()
        with autocast:
            loss = torch.nn.functional.cross_entropy(model(net.as_nchw(x)), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= 1:
            times.append(time.perf_counter() - t0)
    return n / statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--sizes", type=int, nargs="+", default=[32, 224])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0,
                    help="CPU threads (0: torch's default); on a shared, loaded machine 1 can "
                         "beat 2 several times over (OpenMP barriers wait for descheduled threads)")
    ap.add_argument("--archs", nargs="+", default=[n for n in archs.NAMES if n != archs.AUTO])
    args = ap.parse_args(argv)
    device = pick_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"device {device.type}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else
             f", {torch.get_num_threads()} threads")
          + f"; load average {' '.join(f'{x:.2f}' for x in os.getloadavg())} (1/5/15 min)")
    print("| arch | px | params (M) | model MB | MMACs/image | train images/s |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            spec = InputSpec(3, size, size, "crop", (0, 0, 0), (127.5,) * 3, (64.0,) * 3)
            for arch in args.archs:
                torch.manual_seed(0)
                model = net.build(arch, CLASSES, spec)
                path = net.save(model, Path(tmp) / f"{arch}.safetensors", arch=arch,
                                classes=CLASSES, spec=spec)
                macs = evaluate.macs_per_image(model, net.example_input(spec),
                                               device=torch.device("cpu"))
                params = sum(p.numel() for p in model.parameters())
                rate = _step_rate(model, spec, device=device, steps=args.steps)
                shown = f"{rate:,.0f}" if rate >= 100 else f"{rate:.3g}"
                print(f"| {arch} | {size} | {params / 1e6:.2f} | "
                      f"{path.stat().st_size / 1e6:.1f} | {macs / 1e6:,.1f} | {shown} |",
                      flush=True)
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
