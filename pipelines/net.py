"""The CNN, its input normalisation, batched inference, and its safetensors file format."""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from torch import nn

from pipelines.files import atomic_write_bytes

ARCH = "convnet-32-64-128"


class Net(nn.Module):
    """conv32 -> conv64 -> maxpool -> fc128 -> classes: the classic MNIST shape.
    Input `(N, 1, S, S)` float, output `(N, K)` logits."""

    def __init__(self, num_classes: int, image_size: int) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3), nn.ReLU(inplace=True),
            nn.Conv2d(32, 64, 3), nn.ReLU(inplace=True),
            nn.MaxPool2d(2), nn.Dropout(0.25), nn.Flatten())
        side = (image_size - 4) // 2  # two valid 3x3 convs, one 2x2 pool: 28 -> 12
        self.head = nn.Sequential(
            nn.Linear(64 * side * side, 128), nn.ReLU(inplace=True), nn.Dropout(0.5),
            nn.Linear(128, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def build(classes: tuple[str, ...] | list[str], image_size: int) -> Net:
    """A freshly initialised net (CPU, train mode) for these classes and `image_size` square
    images: the one place the architecture is chosen from what params.yaml or a model file
    says. Training, review's fold models and `load` all build through it."""
    return Net(len(classes), image_size)


def normalize(x: torch.Tensor) -> torch.Tensor:
    """Pixel values 0..255 — `(N, S, S)` uint8 or `(N, 1, S, S)` float — -> `(N, 1, S, S)` float
    in [-1, 1], on the same device. Done per batch on the device, so datasets stay uint8."""
    if x.dim() == 3:
        x = x.unsqueeze(1)
    return (x.float() - 127.5) / 127.5


@torch.no_grad()
def predict_proba(model: nn.Module, x: np.ndarray | torch.Tensor, *, device: torch.device,
                  batch_size: int = 1024) -> np.ndarray:
    """`(N, S, S)` uint8 -> `(N, K)` float32 class probabilities."""
    model.eval()
    xs = torch.as_tensor(x).to(device)
    out = [torch.softmax(model(normalize(xs[i:i + batch_size])).float(), dim=1).cpu()
           for i in range(0, len(xs), batch_size)]
    return torch.cat(out).numpy() if out else np.zeros((0, 0), dtype=np.float32)


@torch.no_grad()
def latency_ms_p95(model: nn.Module, x: np.ndarray, *, device: torch.device,
                   n: int = 200, warmup: int = 20) -> float:
    """95th percentile of one image's prediction time (batch 1, as an interactive caller sees
    it: preprocessing and the copy to the device included), in milliseconds."""
    model.eval()
    times = []
    threads = torch.get_num_threads()
    if device.type == "cpu":
        # one image gains nothing from intra-op threads, and on a busy machine they make the
        # tail latency measure the neighbours (seen: p95 1 ms idle, 28 ms beside a training run)
        torch.set_num_threads(1)
    try:
        for i in range(warmup + min(n, len(x))):
            t0 = time.perf_counter()
            predict_proba(model, x[i % len(x)][None], device=device, batch_size=1)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if i >= warmup:
                times.append((time.perf_counter() - t0) * 1000)
    finally:
        torch.set_num_threads(threads)
    return float(np.percentile(times, 95))


def save(model: Net, path: str | Path, *, classes: tuple[str, ...], image_size: int) -> Path:
    """safetensors only (no pickle): tensors + the metadata needed to rebuild the net. Written
    through `files.atomic_writer` (a random temp name, never a planted file or symlink)."""
    path = Path(path)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    # One metadata key: safetensors writes metadata from a hash map in arbitrary order, and
    # byte-identical files for identical weights keep the sha256 meaningful.
    meta = json.dumps({"arch": ARCH, "classes": list(classes), "image_size": image_size},
                      sort_keys=True)
    # 4.8 MB for 10 classes at 28x28: built in memory, written in one go
    return atomic_write_bytes(path, safetensors_bytes(state, metadata={"labelgate": meta}))


def load(path: str | Path, *, device: torch.device) -> tuple[Net, tuple[str, ...], int]:
    """(model, classes, image_size). Callers verify the file's sha256 first (registry.verify)."""
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        raw = (f.metadata() or {}).get("labelgate")
    meta = json.loads(raw) if raw else {}
    if meta.get("arch") != ARCH:
        raise ValueError(f"{path}: not a labelgate {ARCH} model file")
    classes = tuple(meta["classes"])
    image_size = int(meta["image_size"])
    model = build(classes, image_size)
    model.load_state_dict(load_file(str(path), device="cpu"))
    return model.to(device).eval(), classes, image_size
