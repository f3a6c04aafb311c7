"""A classifier (any registered architecture, normalisation inside), batched inference, and its
safetensors model file.

Model file: safetensors (never pickle) with one metadata key, "labelgate", JSON with sorted keys
(safetensors writes metadata from a hash map in arbitrary order; one key keeps the bytes, and so
the sha256, a function of the weights):

    format 2: {"format": 2, "arch": name, "classes": [...], "input": InputSpec.to_json()}
    format 1: {"arch": "convnet-32-64-128", "classes": [...], "image_size": S}   (read only:
              the seed's files; its input is InputSpec.legacy_gray(S))

A file carries everything needed to use the model: the architecture, the classes, the input
spec (preprocessing) and, as buffers, the normalisation.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_bytes
from torch import nn

from pipelines import archs
from pipelines.files import atomic_write_bytes
from pipelines.inputspec import InputSpec

FORMAT = 2
META_KEY = "labelgate"


class ModelFileError(ValueError):
    """A model file labelgate cannot use; the message says which file and why."""


class Classifier(nn.Module):
    """normalise -> backbone -> Linear head. Input: float pixel values 0..255, `(N, C, H, W)`
    (any memory format; a uint8 NHWC batch permuted to NCHW is channels_last already).
    `mean`/`std` `(C,)` are buffers on the 0..255 scale, saved in the model file."""

    def __init__(self, backbone: nn.Module, dim: int, num_classes: int,
                 mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32))
        self.backbone = backbone
        self.head = nn.Linear(dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """`(N, C, H, W)` 0..255 -> `(N, D)` (what review's out-of-fold heads train on)."""
        x = (x.float() - self.mean.view(1, -1, 1, 1)) / self.std.view(1, -1, 1, 1)
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@dataclass(frozen=True, eq=False)
class Loaded:
    module: Classifier       # eval mode, on the requested device
    arch: str
    classes: tuple[str, ...]
    spec: InputSpec


class Meta(NamedTuple):
    arch: str
    classes: tuple[str, ...]
    spec: InputSpec


def _checked_spec(spec: InputSpec) -> None:
    if spec.channels not in (1, 3):
        raise ValueError(f"input channels must be 1 or 3, not {spec.channels}")
    for name in ("mean", "std"):
        values = getattr(spec, name)
        if len(values) != spec.channels:
            raise ValueError(f"input {name} {list(values)} must have one value per channel "
                             f"({spec.channels}); measure it on the training split first "
                             "(inputspec.channel_stats, spec.with_stats)")
    if min(spec.std) <= 0:
        raise ValueError(f"input std {list(spec.std)} must be > 0")


def _build(arch: str, classes, spec: InputSpec) -> Classifier:
    if len(classes) < 2:
        raise ValueError(f"a classifier needs at least 2 classes, got {list(classes)}")
    _checked_spec(spec)
    backbone, dim = archs.get(arch).build(spec)
    return Classifier(backbone, dim, len(classes), spec.mean, spec.std)


def build(arch: str, classes, spec: InputSpec) -> Classifier:
    """A freshly initialised classifier (CPU, train mode) for `arch` (a registry name, not
    "auto": archs.resolve_arch first), these classes and this input. `spec` carries mean/std.
    Training, review's fold models and `load` all build through here."""
    archs.resolve_arch(arch, spec, "cpu")  # refuses unknown and legacy (load-only) names
    return _build(arch, classes, spec)


def save(model: Classifier, path: str | Path, *, arch: str, classes, spec: InputSpec) -> Path:
    """Format 2, written through files.atomic_write_bytes (a random temp name, never a planted
    file or symlink); built in memory (45 MB for resnet18), written in one go."""
    if len(classes) != model.head.out_features:
        raise ValueError(f"{len(classes)} classes for a head of {model.head.out_features}")
    for name in ("mean", "std"):  # the file's spec and its buffers must say the same
        buf = getattr(model, name).detach().cpu()
        if not torch.allclose(buf, torch.tensor(getattr(spec, name), dtype=torch.float32)):
            raise ValueError(f"spec {name} {list(getattr(spec, name))} differs from the "
                             f"model's {buf.tolist()}")
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    meta = json.dumps({"format": FORMAT, "arch": arch, "classes": list(classes),
                       "input": spec.to_json()}, sort_keys=True)
    return atomic_write_bytes(Path(path), safetensors_bytes(state, metadata={META_KEY: meta}))


def _meta_json(path: Path) -> dict:
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(META_KEY)
    except (SafetensorError, OSError) as exc:  # a pickle, a truncated file, not safetensors
        raise ModelFileError(f"{path}: not a labelgate model file (safetensors: {exc})") from None
    if raw is None:
        raise ModelFileError(f"{path}: not a labelgate model file (no {META_KEY!r} metadata)")
    return _decoded(path, raw)


def _decoded(path: Path, raw: str) -> dict:
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ModelFileError(f"{path}: damaged labelgate metadata ({exc})") from None
    if not isinstance(meta, dict):
        raise ModelFileError(f"{path}: damaged labelgate metadata (not an object)")
    return meta


def _parse_meta(path: Path, meta: dict) -> Meta:
    fmt = meta.get("format", 1)
    if fmt not in (1, FORMAT):
        raise ModelFileError(f"{path}: model file format {fmt!r}; this labelgate reads "
                             f"formats 1 and {FORMAT} (upgrade labelgate)")
    try:
        classes = tuple(meta["classes"])
        if not classes or not all(isinstance(c, str) for c in classes):
            raise ValueError("classes must be a non-empty list of strings")
        if fmt == 1:
            if meta.get("arch") != archs.LEGACY:
                raise ModelFileError(f"{path}: format-1 file of unknown architecture "
                                     f"{meta.get('arch')!r}: not a labelgate model file")
            size = meta["image_size"]
            if not isinstance(size, int) or size < 5:
                raise ValueError(f"image_size {size!r}")
            return Meta(archs.LEGACY, classes, InputSpec.legacy_gray(size))
        arch = meta["arch"]
        archs.get(arch)
        return Meta(arch, classes, InputSpec.from_json(meta["input"]))
    except (KeyError, TypeError, ValueError) as exc:
        if isinstance(exc, ModelFileError):
            raise
        what = f"missing {exc}" if isinstance(exc, KeyError) else str(exc)
        raise ModelFileError(f"{path}: bad labelgate metadata: {what}") from None


def read_meta(path: str | Path) -> Meta:
    """(arch, classes, spec) from the file's metadata, without reading the weights (warm-start
    checks, `labelgate` commands that only describe a model)."""
    path = Path(path)
    return _parse_meta(path, _meta_json(path))


def load(path: str | Path, *, device: torch.device, sha256: str | None = None) -> Loaded:
    """A model file (format 1 or 2) as an eval-mode Classifier on `device` (channels_last on
    CUDA). With `sha256`, the bytes read are checked against it before they are parsed;
    without, the caller has verified the file (registry.verify)."""
    path = Path(path)
    data = path.read_bytes()  # read once: the metadata and tensors used are the bytes checked
    if sha256 is not None and (actual := hashlib.sha256(data).hexdigest()) != sha256:
        raise ModelFileError(f"model file {path} has sha256 {actual}, expected {sha256}: "
                             "refusing to load it")
    try:
        state = safetensors_load(data)
        # safetensors layout: 8-byte little-endian header length, then the JSON header
        header = json.loads(data[8:8 + int.from_bytes(data[:8], "little")])
    except (SafetensorError, ValueError) as exc:
        raise ModelFileError(f"{path}: not a labelgate model file ({exc})") from None
    raw = (header.get("__metadata__") or {}).get(META_KEY)
    if raw is None:
        raise ModelFileError(f"{path}: not a labelgate model file (no {META_KEY!r} metadata)")
    meta = _parse_meta(path, _decoded(path, raw))
    if meta.arch == archs.LEGACY:
        state = archs.legacy_state(state)
        spec = meta.spec
        state.setdefault("mean", torch.tensor(spec.mean))
        state.setdefault("std", torch.tensor(spec.std))
    model = _build(meta.arch, meta.classes, meta.spec)
    missing, unexpected = (sorted(set(model.state_dict()) - set(state)),
                           sorted(set(state) - set(model.state_dict())))
    if missing or unexpected:
        raise ModelFileError(f"{path}: its tensors do not fit {meta.arch} (missing "
                             f"{missing[:3]}, unexpected {unexpected[:3]}): damaged, or written "
                             "by another program")
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:  # shape mismatches
        raise ModelFileError(f"{path}: its tensors do not fit {meta.arch}: "
                             f"{str(exc).splitlines()[-1].strip()}") from None
    model = model.to(device).eval()
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return Loaded(model, meta.arch, meta.classes, meta.spec)


def as_nchw(x: torch.Tensor) -> torch.Tensor:
    """`(N, H, W, C)` uint8 (or `(N, H, W)`: one channel) -> `(N, C, H, W)` float 0..255. The
    permute of NHWC storage is channels_last memory: on CUDA it stays so (no copy but the cast;
    cuDNN's fast layout under bf16). On CPU it is made contiguous NCHW: CPU BatchNorm is ~2x
    slower on channels_last (measured here: 64x64x15x15 fwd+bwd, 150-190 ms vs 62-73 ms on a
    loaded machine)."""
    if x.dim() == 3:
        x = x.unsqueeze(-1)
    x = x.permute(0, 3, 1, 2).float()
    return x.contiguous() if x.device.type == "cpu" else x


def example_input(spec: InputSpec, n: int = 1) -> np.ndarray:
    """`(n, H, W, C)` uint8 zeros of the spec's shape (compute counts, latency warm-up)."""
    return np.zeros((n, spec.height, spec.width, spec.channels), dtype=np.uint8)


@torch.no_grad()
def predict_proba(model: nn.Module, x: np.ndarray | torch.Tensor, *, device: torch.device,
                  batch_size: int = 1024) -> np.ndarray:
    """`(N, H, W, C)` uint8 -> `(N, K)` float32 class probabilities. fp32 even on CUDA: the
    gate compares rounded probabilities, and bf16 would move them by ~1e-2."""
    model.eval()

    def batch(i: int) -> torch.Tensor:
        # a batch at a time: `x` may be a read-only memory map bigger than memory (a packed
        # split), which torch would otherwise wrap whole, warning that it is not writable
        part = x[i:i + batch_size]
        return (part if isinstance(part, torch.Tensor)
                else torch.from_numpy(np.array(part, dtype=np.uint8, copy=True))).to(device)
    out = [torch.softmax(model(as_nchw(batch(i))).float(), dim=1).cpu()
           for i in range(0, len(x), batch_size)]
    return torch.cat(out).numpy() if out else np.zeros((0, 0), dtype=np.float32)


@torch.no_grad()
def latency_ms_p95(model: nn.Module, x: np.ndarray, *, device: torch.device,
                   n: int = 200, warmup: int = 20) -> float:
    """95th percentile of one image's prediction time (batch 1, as an interactive caller sees
    it: the copy to the device included), in milliseconds. `x`: `(N, H, W, C)` uint8."""
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
