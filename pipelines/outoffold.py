"""Out-of-fold class probabilities for the label review: each labeled image gets a prediction
from a model that never saw its label.

Two ways, `review.method`:

- `cnn_folds`: k models trained with the project's recipe (pipelines.train.train_model), each on
  the other folds. k full trainings: cheap for small images on small nets, not for a ResNet at
  224 px (k fine-tunes on top of the real one).
- `frozen_features`: one forward pass of a feature extractor over every image
  (`Classifier.features`, `(N, D)`), then k multinomial logistic-regression heads on CPU, each
  fitted on the other folds' features (full-batch L-BFGS, L2). The extractor is a given model
  file (the candidate's or production's backbone) or, without one, a model trained once on all
  labeled images. Its cost is one pass over the data plus seconds of CPU.

`auto`: cnn_folds for the fast residual nets for small images (resnet-fast, -narrow), where k
fits found more planted errors on the digits demo; frozen_features for the small CNN, where the
heads found more, and for the ImageNet-class backbones, where k fine-tunes are unaffordable
(`choose` has the numbers).
"""
from __future__ import annotations

import hashlib
import math
import sys

import numpy as np
import torch

from pipelines import archs, net, train
from pipelines.device import pick_device, seed_everything
from pipelines.inputspec import InputSpec
from pipelines.settings import Params

CNN_FOLDS_ARCHS = ("resnet-fast", "resnet-fast-narrow")  # where k fits found more (see choose)
FEATURE_BATCH = 256        # images per forward pass of the extractor
HEAD_L2 = 1e-3             # L2 on the head's weights, per image (features standardised)
HEAD_ITERS = 200           # L-BFGS iterations per head; converges in < 100 at 10k x 512


def fold_of(task_id: int, seed: int, folds: int) -> int:
    """A task's fold: a hash, so adding tasks never moves the others."""
    return int(hashlib.sha256(f"review:{seed}:{task_id}".encode()).hexdigest()[:8], 16) % folds


def folds_for(task_ids: np.ndarray, *, seed: int, folds: int) -> np.ndarray:
    return np.array([fold_of(int(i), seed, folds) for i in task_ids], dtype=np.int64)


def choose(method: str, arch: str, spec: InputSpec, device_type: str) -> str:
    """`review.method` with auto resolved for the project's training arch.

    Measured on the 1,797 digit scans of the demo (28 x 28 gray) with 90 labels flipped at
    random plus 40 systematic 3 -> 5 flips (benchmarks/review_methods.py, CPU, one run each;
    share of the 130 planted errors among the suspects / precision / 3->5 found of 40):
                                                    smallcnn               resnet-fast-narrow
        cnn_folds (3 fits x 6 epochs on 2/3)        61.5 % / 100 % / 24    79.2 % / 100 % / 31
        frozen_features (extractor trained once)    74.6 % /  99 % / 24    63.8 % / 100 % / 22
        frozen_features (extractor never saw them)  83.9 % /  90 % / 14    75.8 % /  92 % / 13
    (the last row on half the set.) Both training costs are ~21,600 image-epochs; with the
    candidate as the extractor (`--features-from`) the frozen path trains nothing.
    """
    if method != "auto":
        return method
    name = archs.resolve_arch(arch, spec, device_type)
    return "cnn_folds" if name in CNN_FOLDS_ARCHS else "frozen_features"


def cnn_folds(x: np.ndarray, y: np.ndarray, folds: np.ndarray, *, params: Params, arch: str,
              spec: InputSpec, device: torch.device) -> np.ndarray:
    """(N, K) probabilities from k models of the project's recipe, `review.epochs` each."""
    classes = params.base.classes
    probs = np.zeros((len(y), len(classes)), dtype=np.float32)
    for k in range(int(folds.max()) + 1 if len(folds) else 0):
        held = folds == k
        if not held.any() or held.all():
            continue
        rest = np.flatnonzero(~held)
        model, _ = train.train_model(x[rest], y[rest], arch=arch, spec=spec, classes=classes,
                                     params=params, epochs=params.review.epochs,
                                     seed=params.base.seed + k, device=device)
        probs[held] = net.predict_proba(model, x[np.flatnonzero(held)], device=device)
    return probs


@torch.no_grad()
def features(model: net.Classifier, x: np.ndarray, *, device: torch.device,
             batch_size: int = FEATURE_BATCH) -> np.ndarray:
    """`(N, H, W, C)` uint8 (array or memory map, read a batch at a time) -> `(N, D)` float32
    on the CPU."""
    model.eval()
    out = []
    for i in range(0, len(x), batch_size):
        batch = torch.from_numpy(np.ascontiguousarray(x[i:i + batch_size])).to(device)
        out.append(model.features(net.as_nchw(batch)).float().cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, 0), dtype=np.float32)


def fit_head(f: np.ndarray, y: np.ndarray, k: int, *, l2: float = HEAD_L2) -> torch.nn.Linear:
    """Multinomial logistic regression on standardised features: full-batch L-BFGS on the
    CPU, deterministic (no sampling)."""
    xt, yt = torch.from_numpy(f).double(), torch.from_numpy(y)
    head = torch.nn.Linear(f.shape[1], k).double()
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    opt = torch.optim.LBFGS(head.parameters(), lr=1.0, max_iter=HEAD_ITERS,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = (torch.nn.functional.cross_entropy(head(xt), yt)
                + l2 * head.weight.pow(2).sum())
        loss.backward()
        return loss
    opt.step(closure)
    return head


def linear_heads(f: np.ndarray, y: np.ndarray, folds: np.ndarray, k: int) -> np.ndarray:
    """(N, K) probabilities from k heads, each fitted on the other folds' features."""
    mean, std = f.mean(0), f.std(0) + 1e-6   # standardised once: the fit is scale-free
    z = (f - mean) / std
    probs = np.zeros((len(y), k), dtype=np.float32)
    for fold in range(int(folds.max()) + 1 if len(folds) else 0):
        held = folds == fold
        if not held.any() or held.all():
            continue
        head = fit_head(z[~held], y[~held], k)
        with torch.no_grad():
            probs[held] = torch.softmax(head(torch.from_numpy(z[held]).double()), 1).numpy()
    return probs


def extractor(parts: list[np.ndarray], y: np.ndarray, *, params: Params, arch: str,
              spec: InputSpec, device: torch.device, model_file=None) -> net.Classifier:
    """The feature extractor: `model_file` (a model labelgate wrote: candidate or production)
    when given and its input spec matches the prepared pixels, else one model trained once on
    all labeled images with the project's recipe."""
    if model_file is not None:
        loaded = net.load(model_file, device=device)
        if all(getattr(loaded.spec, a) == getattr(spec, a)
               for a in ("channels", "height", "width", "resize", "background")):
            return loaded.module
        print(f"review: {model_file} was trained on another input spec; training a feature "
              "extractor on the prepared images instead", file=sys.stderr)
    model, _ = train.train_model(np.concatenate(parts), y, arch=arch, spec=spec,
                                 classes=params.base.classes,
                                 params=params, epochs=params.train.epochs,
                                 seed=params.base.seed, device=device)
    return model


def predict(parts: list[np.ndarray], y: np.ndarray, task_ids: np.ndarray, *, params: Params,
            spec: InputSpec, model_file=None) -> tuple[np.ndarray, str]:
    """((N, K) out-of-fold probabilities, the method used) for the images of `parts` (each
    `(n_i, H, W, C)` uint8, e.g. the memory-mapped train and val splits) in order; `y`,
    `task_ids` row-aligned with their concatenation. The frozen-feature path with a model file
    reads the parts a batch at a time; the others hold all pixels in memory (small images)."""
    r, t = params.review, params.train
    device = pick_device(t.device)
    seed_everything(params.base.seed, deterministic=t.deterministic)
    method = choose(r.method, t.arch, spec, device.type)
    folds = folds_for(task_ids, seed=params.base.seed, folds=r.folds)
    if method == "cnn_folds":
        return cnn_folds(np.concatenate(parts), y, folds, params=params, arch=t.arch, spec=spec,
                         device=device), method
    model = extractor(parts, y, params=params, arch=t.arch, spec=spec, device=device,
                      model_file=model_file)
    f = np.concatenate([features(model, x, device=device) for x in parts])
    if not math.isfinite(float(f.sum())):
        raise train.TrainingError("the feature extractor produced non-finite features")
    return linear_heads(f, y, folds, len(params.base.classes)), method
