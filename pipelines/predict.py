"""predict: the one path from images to answers with a model labelgate trained.

    image bytes -> to_input (inputspec.preprocess with the model's own input spec: decoded,
                   budgets applied, resized, (H, W, C) uint8)
                -> probabilities (net.predict_proba: batched, on the model's device)
                -> predictions ([Prediction(label, probability, certainty)])

Pre-annotation (`preannotate`), the ML backend (`backend`, which fetches in a pool and batches
across requests, so it uses the pieces), `labelgate predict` and `labelgate evalset rebaseline`
load and run models through here; `evaluate` and `calibrate` take their probabilities from
here. Only a registry-verified production model reaches annotators: `load_production` checks
the blob against the pointer's sha256 before it is loaded.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import numpy as np
import torch
from torch import nn

from pipelines import images, inputspec, net, registry
from pipelines.inputspec import InputSpec

if TYPE_CHECKING:
    from pipelines.records import Pointer

K = TypeVar("K")
BATCH = 1024  # images per forward pass at most; fewer for big inputs (batch_for)
# Pixel values per forward pass (H * W * C * images): 8 M = 1024 images at 32x32x3 or 28x28,
# 55 at 224x224x3. Activations grow with it: resnet18's first conv output at 224 px is
# ~1.6 MB an image in fp32, so ~90 MB for 55 images instead of 3.3 GB for 1024.
PIXELS_PER_BATCH = 1 << 23


@dataclass(frozen=True, eq=False)  # eq=False: two loads of one file are two models
class Model:
    """A loaded model and what it answers in. `pointer`: the registry's production pointer when
    this is the production model, None for a model file the pipeline wrote (a candidate)."""
    module: nn.Module
    arch: str
    classes: tuple[str, ...]
    spec: InputSpec          # input is (H, W, C) uint8 of this spec
    device: torch.device
    pointer: Pointer | None = None

    @property
    def version(self) -> str | None:
        """The registry id (Label Studio's `model_version`), None for an unregistered file."""
        return self.pointer.id if self.pointer is not None else None


@dataclass(frozen=True)
class Prediction:
    label: str           # the most probable class
    probability: float   # its probability, 0..1
    certainty: float     # 0 (as uncertain as it gets) .. 1 (sure); see `certainty`


@dataclass(frozen=True)
class Unreadable:
    reason: str          # why this image has no prediction (fetch, read or decode failure)


Result = Prediction | Unreadable


def load_production(registry_dir: str | Path, *, device: torch.device) -> Model | None:
    """The production model, its file verified against the registry's sha256
    (registry.RegistryError if it does not match); None while there is none."""
    found = registry.load_production(registry_dir, device=device)
    if found is None:
        return None
    loaded, pointer = found
    return Model(loaded.module, loaded.arch, loaded.classes, loaded.spec, device, pointer)


def load_file(path: str | Path, *, device: torch.device) -> Model:
    """A model file the pipeline itself wrote (models/candidate, a calibration run): not
    verified against the registry, so never for annotators."""
    loaded = net.load(path, device=device)
    return Model(loaded.module, loaded.arch, loaded.classes, loaded.spec, device)


def certainty(probs: np.ndarray, how: str) -> np.ndarray:
    """`(N, K)` probabilities -> `(N,)`, per row 0 (as uncertain as it gets) .. 1 (sure):
    `margin` = top-1 minus top-2 probability; `entropy` = 1 - entropy / log(K)."""
    if how == "margin":
        top2 = np.sort(probs, axis=1)[:, -2:]
        return top2[:, 1] - top2[:, 0]
    p = np.clip(probs, 1e-12, 1.0)
    return 1.0 + (p * np.log(p)).sum(1) / np.log(probs.shape[1])


def to_input(model: Model, data: bytes) -> np.ndarray:
    """Image bytes -> `(H, W, C)` uint8, the model's input (its own spec); images.BadImage
    when it is not one."""
    return inputspec.preprocess(data, model.spec)


def batch_for(spec: InputSpec, limit: int = BATCH) -> int:
    """Images per forward pass for this input: `limit`, fewer for big images."""
    return max(1, min(limit, PIXELS_PER_BATCH // (spec.height * spec.width * spec.channels)))


def probabilities(model: Model, arrays: np.ndarray, *, batch_size: int = BATCH) -> np.ndarray:
    """`(N, H, W, C)` uint8 -> `(N, K)` float32 class probabilities, in batches of at most
    `batch_size` (and batch_for the model's input)."""
    return net.predict_proba(model.module, arrays, device=model.device,
                             batch_size=batch_for(model.spec, batch_size))


def predictions(model: Model, probs: np.ndarray, *, how: str) -> list[Prediction]:
    """`(N, K)` probabilities -> one Prediction per row; `how`: params `preannotate.uncertainty`."""
    sure = certainty(probs, how) if len(probs) else np.zeros(0)
    return [Prediction(model.classes[int(p.argmax())], float(p.max()), float(s))
            for p, s in zip(probs, sure)]


def predict_images(model: Model, sources: Iterable[K], read: Callable[[K], bytes], *, how: str,
                   errors: tuple[type[Exception], ...] = ()) -> list[tuple[K, Result]]:
    """Each source read (`read(source)` -> image bytes) and decoded as it comes, and predicted
    a batch (batch_for the model's input) at a time: only one batch of decoded inputs is held
    (8 M pixel values: 8 MB), never the files, so a long list of photos costs little memory.
    A source whose read raises one of `errors`, or whose bytes are not an image, gets
    Unreadable; the others a Prediction. Input order."""
    out: list[tuple[K, Result]] = []
    batch: list[tuple[K, np.ndarray | Unreadable]] = []
    size = batch_for(model.spec)

    def flush() -> None:
        good = [x for _, x in batch if isinstance(x, np.ndarray)]
        answers = iter(predictions(model, probabilities(model, np.stack(good)), how=how)
                       if good else [])
        out.extend((s, next(answers) if isinstance(x, np.ndarray) else x) for s, x in batch)
        batch.clear()

    for source in sources:
        try:
            batch.append((source, to_input(model, read(source))))
        except (images.BadImage, *errors) as exc:
            batch.append((source, Unreadable(str(exc))))
        if len(batch) >= size:
            flush()
    flush()
    return out
