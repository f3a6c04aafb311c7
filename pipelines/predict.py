"""predict: the one path from images to answers with a model labelgate trained.

    image bytes -> to_input (pipelines.images: decoded, budgets applied, the model's size)
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

from pipelines import images, net, registry

if TYPE_CHECKING:
    from pipelines.records import Pointer

K = TypeVar("K")
BATCH = 1024  # images per forward pass; at 28x28 its two conv outputs peak at ~240 MB (fp32)


@dataclass(frozen=True, eq=False)  # eq=False: two loads of one file are two models
class Model:
    """A loaded model and what it answers in. `pointer`: the registry's production pointer when
    this is the production model, None for a model file the pipeline wrote (a candidate)."""
    module: nn.Module
    classes: tuple[str, ...]
    image_size: int          # input is (S, S) uint8, S = image_size
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
    loaded = registry.load_production(registry_dir, device=device)
    if loaded is None:
        return None
    module, classes, image_size, pointer = loaded
    return Model(module, classes, image_size, device, pointer)


def load_file(path: str | Path, *, device: torch.device) -> Model:
    """A model file the pipeline itself wrote (models/candidate, a calibration run): not
    verified against the registry, so never for annotators."""
    module, classes, image_size = net.load(path, device=device)
    return Model(module, classes, image_size, device)


def certainty(probs: np.ndarray, how: str) -> np.ndarray:
    """`(N, K)` probabilities -> `(N,)`, per row 0 (as uncertain as it gets) .. 1 (sure):
    `margin` = top-1 minus top-2 probability; `entropy` = 1 - entropy / log(K)."""
    if how == "margin":
        top2 = np.sort(probs, axis=1)[:, -2:]
        return top2[:, 1] - top2[:, 0]
    p = np.clip(probs, 1e-12, 1.0)
    return 1.0 + (p * np.log(p)).sum(1) / np.log(probs.shape[1])


def to_input(model: Model, data: bytes) -> np.ndarray:
    """Image bytes -> `(S, S)` uint8, the model's input; images.BadImage when it is not one."""
    return images.to_array(data, model.image_size)


def probabilities(model: Model, arrays: np.ndarray, *, batch_size: int = BATCH) -> np.ndarray:
    """`(N, S, S)` uint8 -> `(N, K)` float32 class probabilities."""
    return net.predict_proba(model.module, arrays, device=model.device, batch_size=batch_size)


def predictions(model: Model, probs: np.ndarray, *, how: str) -> list[Prediction]:
    """`(N, K)` probabilities -> one Prediction per row; `how`: params `preannotate.uncertainty`."""
    sure = certainty(probs, how) if len(probs) else np.zeros(0)
    return [Prediction(model.classes[int(p.argmax())], float(p.max()), float(s))
            for p, s in zip(probs, sure)]


def predict_images(model: Model, sources: Iterable[K], read: Callable[[K], bytes], *, how: str,
                   errors: tuple[type[Exception], ...] = ()) -> list[tuple[K, Result]]:
    """Each source read (`read(source)` -> image bytes) and decoded as it comes, then one
    batched pass. Only the decoded inputs are kept (784 B an image at 28x28, never the files),
    so a long list costs little memory. A source whose read raises one of `errors`, or whose
    bytes are not an image, gets Unreadable; the others a Prediction. Input order."""
    decoded: list[tuple[K, np.ndarray | Unreadable]] = []
    for source in sources:
        try:
            decoded.append((source, to_input(model, read(source))))
        except (images.BadImage, *errors) as exc:
            decoded.append((source, Unreadable(str(exc))))
    good = [x for _, x in decoded if isinstance(x, np.ndarray)]
    answers = iter(predictions(model, probabilities(model, np.stack(good)), how=how)
                   if good else [])
    return [(s, next(answers) if isinstance(x, np.ndarray) else x) for s, x in decoded]
