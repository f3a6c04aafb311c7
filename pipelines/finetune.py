"""Where a model's first weights come from, besides a random init: a local weights file
(sha256-pinned; a new head for the project's classes) or the production model (warm start, only
when it answers the same question on the same input). Torch only: the training stage reads the
params and calls these.

No downloads, ever: a pretrained torchvision backbone is used by saving its state dict as
safetensors on a machine that has it (`safetensors.torch.save_file(m.state_dict(), path)`), then
pinning that file's sha256 in params.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as safetensors_load

from pipelines import archs, net
from pipelines.inputspec import InputSpec

# keys that are never taken from a weights file: the head (new for the project's classes) and
# the normalisation (this project's measured mean/std, with the input spec)
_OWN = ("head.", "mean", "std")


class WeightsError(ValueError):
    """A weights file that must not or cannot be used; the message says what to do."""


@dataclass(frozen=True)
class InitReport:
    loaded: tuple[str, ...]              # model keys set from the file
    adapted: tuple[str, ...]             # of those, first convs converted between 1 and 3 channels
    skipped: tuple[tuple[str, str], ...]  # (file key, why)
    missing: tuple[str, ...]             # backbone keys the file had nothing for (kept random)

    def describe(self) -> str:
        return (f"{len(self.loaded)} backbone tensors loaded"
                + (f" ({len(self.adapted)} adapted to the input channels)" if self.adapted else "")
                + f", {len(self.skipped)} skipped, {len(self.missing)} left at random init")


def _verified_bytes(path: Path, sha256: str) -> bytes:
    """The file's bytes, hashed as read: what is parsed is what was checked (no window between
    a check and a second read)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise WeightsError(f"weights file {path} cannot be read: {exc}") from None
    actual = hashlib.sha256(data).hexdigest()
    if actual != sha256.lower():
        raise WeightsError(f"weights file {path} has sha256 {actual}, params pin {sha256}: "
                           "refusing it (a different or altered file). Pin the new hash if you "
                           "replaced the file on purpose")
    return data


def _adapt(tensor: torch.Tensor, shape: torch.Size) -> torch.Tensor | None:
    """An RGB first-conv weight for a gray model (the filters summed over the input channels,
    as timm's adapt_input_conv: a gray image is R = G = B) or a gray one for RGB (repeated,
    divided by 3: the same response to a gray image); None if it does not fit either way."""
    if tensor.dim() != 4 or tensor.shape[0] != shape[0] or tensor.shape[2:] != shape[2:]:
        return None
    if tensor.shape[1] == 3 and shape[1] == 1:
        return tensor.sum(1, keepdim=True)
    if tensor.shape[1] == 1 and shape[1] == 3:
        return tensor.repeat(1, 3, 1, 1) / 3
    return None


def init_from_weights(model: net.Classifier, path: str | Path, *, sha256: str,
                      arch: str = "the model") -> InitReport:
    """Set `model`'s backbone from a local safetensors file whose sha256 must be `sha256`
    (checked before anything is parsed). Keys may be the backbone's own (a torchvision state
    dict: `conv1.weight`, `layer1.0...`) or a labelgate model file's (`backbone.conv1.weight`);
    each is shape-checked; the first conv is adapted between 1 and 3 channels; the head and the
    normalisation always stay the model's own. A file of which nothing fits is an error (a
    wrong file, not a slower start). `arch`: its name, for the messages."""
    path = Path(path)
    try:
        tensors = safetensors_load(_verified_bytes(path, sha256))
    except SafetensorError as exc:
        raise WeightsError(f"weights file {path} is not safetensors ({exc}); convert it with "
                           "safetensors.torch.save_file(state_dict, path)") from None
    own = model.state_dict()
    first_conv = archs.stem_key(model.backbone)
    new, loaded, adapted, skipped = {}, [], [], []
    for key, tensor in tensors.items():
        target = key if key.startswith("backbone.") or key in own else "backbone." + key
        if target.startswith(_OWN):
            skipped.append((key, "the head and the normalisation are this project's own"))
        elif target not in own:
            skipped.append((key, f"{arch} has no such tensor"))
        elif tensor.shape == own[target].shape:
            new[target] = tensor
            loaded.append(target)
        elif target == first_conv and (fit := _adapt(tensor, own[target].shape)) is not None:
            new[target] = fit
            loaded.append(target)
            adapted.append(target)
        else:
            skipped.append((key, f"shape {tuple(tensor.shape)} != {tuple(own[target].shape)}"))
    if not loaded:
        raise WeightsError(f"no tensor of {path} fits {arch}'s backbone (e.g. "
                           f"{skipped[0][0] if skipped else 'the file is empty'}): weights for "
                           "another architecture?")
    with torch.no_grad():
        for key, tensor in new.items():
            own[key].copy_(tensor.to(own[key].dtype))
    missing = tuple(k for k in own if k.startswith("backbone.") and k not in new)
    return InitReport(tuple(loaded), tuple(adapted), tuple(skipped), missing)


def save_backbone(model: net.Classifier, path: str | Path) -> Path:
    """The backbone's tensors (torchvision-style keys, no `backbone.` prefix) as safetensors:
    what `init_from_weights` reads; also how to make a weights file from any trained model."""
    from pipelines.files import atomic_write_bytes
    from safetensors.torch import save as safetensors_bytes
    state = {k: v.detach().cpu().contiguous() for k, v in model.backbone.state_dict().items()}
    return atomic_write_bytes(Path(path), safetensors_bytes(state))


@dataclass(frozen=True)
class WarmStart:
    loaded: bool
    reason: str      # why not (the caller trains from scratch and says so), or what was loaded


def _same_input(a: InputSpec, b: InputSpec) -> str | None:
    for field in ("channels", "height", "width", "resize"):
        if getattr(a, field) != getattr(b, field):
            return f"input {field} {getattr(a, field)!r} != {getattr(b, field)!r}"
    return None


def warm_start(model: net.Classifier, production_file: str | Path, *, sha256: str, arch: str,
               classes, spec: InputSpec) -> WarmStart:
    """Start from the production model's weights (head included) when it is the same
    architecture, the same classes in the same order, and the same input (channels, size,
    resize); else nothing is loaded and `reason` says why. The normalisation stays `model`'s
    (this run's measured mean/std, which the model file will state). The file is checked
    against `sha256` (the registry pointer's) first."""
    production_file = Path(production_file)
    meta = net.read_meta(production_file)
    why = (f"production is {meta.arch}, this run trains {arch}" if meta.arch != arch
           else f"the classes changed ({list(meta.classes)} -> {list(classes)})"
           if meta.classes != tuple(classes)
           else _same_input(meta.spec, spec))
    if why is not None:
        return WarmStart(False, f"trained from scratch: {why}")
    prod = net.load(production_file, device=torch.device("cpu"), sha256=sha256).module
    state = {k: v for k, v in prod.state_dict().items() if k not in ("mean", "std")}
    with torch.no_grad():
        own = model.state_dict()
        for key, tensor in state.items():
            own[key].copy_(tensor)
    return WarmStart(True, f"warm start from production ({meta.arch}, {len(state)} tensors)")
