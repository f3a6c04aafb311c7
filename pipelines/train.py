"""train: packed splits -> candidate model (safetensors, input spec and normalisation inside),
per-epoch curves, metrics.

The split's pixels go to the device once as uint8 when they fit `train.resident_max_mb`, else
they stream from the memory-mapped split (pipelines/residency.py); augmentation runs on the
device (pipelines/augment.py); the recipe (pipelines/recipe.py) is AdamW or SGD-nesterov with a
one-cycle or cosine schedule, label smoothing, and no weight decay on norms and biases. The model
starts from scratch, from a sha256-pinned weights file, or from the production model (warm
start, only when arch, classes and input match). CUDA adds bf16 autocast and channels_last.

    python -m pipelines.train --prepared data/prepared --out models/candidate
        [--init-registry models/registry]      # train.init: production warm-starts from its
                                               # production model (sha256 from the pointer)
    torchrun --nproc_per_node N -m pipelines.train ...     # DistributedDataParallel, N processes
    torchrun --nnodes M --nproc_per_node N --rdzv_backend c10d --rdzv_endpoint HOST0:29400
        --rdzv_id RUN -m pipelines.train ...               # on each of M nodes: M x N processes;
                                                           # the outputs land on node 0 (rank 0)
"""
from __future__ import annotations

import os

# Before torch loads OpenMP (only works when this module is what imports torch first, as in
# `python -m pipelines.train`): idle OpenMP threads sleep instead of spinning. On a shared
# 2-core machine (load 3-6) spinning threads stalled each other: 12 epochs of the emoji set took
# 123-211 s with 2 threads, 34-37 s with this (same val accuracy to 5 digits; 1 thread: 33 s).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import csv  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from pipelines import (archs, augment, finetune, inputspec, net, packed, recipe,  # noqa: E402
                       residency, world)
from pipelines.device import pick_device, seed_everything  # noqa: E402
from pipelines.files import atomic_write_json, sha256_file  # noqa: E402
from pipelines.inputspec import InputSpec  # noqa: E402
from pipelines.loop import LoopPlan, TrainingError, fit, plan, to_device  # noqa: E402, F401
from pipelines.settings import Params  # noqa: E402


def chance_floor(num_classes: int) -> float:
    """Validation accuracy at or below which a model has learnt nothing: 1.5x uniform guessing
    (0.15 for 10 classes), at most 1/K + 0.1 (2 classes: 0.6 rather than 0.75, which a weak but
    real binary model may not reach)."""
    uniform = 1.0 / num_classes
    return min(1.5 * uniform, uniform + 0.1)


def measured(spec: InputSpec, x: np.ndarray) -> InputSpec:
    """`spec` with mean/std: as given in params, or measured on `x` `(N, H, W, C)` uint8 (chunked,
    so a memory-mapped split bigger than RAM works); the model file then carries them."""
    if spec.mean:
        return spec
    return spec.with_stats(*inputspec.channel_stats(x))


@dataclass(frozen=True)
class Trained:
    module: net.Classifier     # on the training device, eval mode
    history: list[dict]
    arch: str                  # resolved (never "auto")
    spec: InputSpec            # with the mean/std the model normalises with
    init: str                  # how it started, one line
    placement: residency.Placement
    plan: LoopPlan
    seconds: float             # the loop alone


def _initialise(model: net.Classifier, t, *, arch: str, classes, spec: InputSpec,
                init_model: Path | None, init_model_sha256: str | None) -> tuple[bool, str]:
    """(backbone initialised?, what happened). train.init: production without a production model
    (the first run of a project) or with a different arch/classes/input trains from scratch and
    says why; a weights file that does not verify is an error."""
    if t.init == "weights":
        if not t.init_weights or not t.init_sha256:
            raise TrainingError("train.init: weights needs train.init_weights (a local "
                                ".safetensors file) and train.init_sha256 (its sha256sum)")
        try:
            report = finetune.init_from_weights(model, t.init_weights, arch=arch,
                                                sha256=t.init_sha256)
        except finetune.WeightsError as exc:
            raise TrainingError(str(exc)) from None
        return True, f"from {t.init_weights}: {report.describe()}"
    if t.init == "production":
        if init_model is None:
            return False, "trained from scratch: no production model yet"
        if not Path(init_model).is_file():
            raise TrainingError(f"--init-model {init_model} is not a file (leave the flag out "
                                "when the project has no production model yet)")
        sha = init_model_sha256 or sha256_file(init_model)
        ws = finetune.warm_start(model, init_model, sha256=sha, arch=arch, classes=classes,
                                 spec=spec)
        return ws.loaded, ws.reason
    return False, "from scratch"


def _train(x: np.ndarray, y: np.ndarray, *, arch: str, spec: InputSpec, classes, params: Params,
           epochs: int, seed: int, x_val: np.ndarray | None = None,
           y_val: np.ndarray | None = None, init_model: Path | None = None,
           init_model_sha256: str | None = None, device: torch.device | None = None,
           rank: int = 0, world: int = 1, progress: bool = False) -> Trained:
    t = params.train
    device = device or pick_device(t.device)
    # Dropout masks differ by rank; everything else (permutation, augmentation) is shared.
    seed_everything(seed + rank, deterministic=t.deterministic)
    name = archs.resolve_arch(arch, spec, device.type)
    spec = measured(spec, x)
    model = net.build(name, classes, spec)
    initialised, init_note = _initialise(model, t, arch=name, classes=classes, spec=spec,
                                         init_model=init_model,
                                         init_model_sha256=init_model_sha256)
    nbytes = x.nbytes + (x_val.nbytes if x_val is not None else 0)
    placement = residency.place(nbytes, t.resident_max_mb)
    train_src = residency.source(x, y, device=device, resident=placement.resident)
    val_src = (residency.source(x_val, y_val, device=device, resident=placement.resident)
               if x_val is not None else None)
    lp = plan(t, device, n_train=len(x), rank=rank, world=world)
    try:
        rec = recipe.from_train(t, batch=lp.batch_size, initialised=initialised)
    except recipe.RecipeError as exc:
        raise TrainingError(str(exc)) from None
    model = to_device(model, lp)
    trained = model
    if world > 1:
        trained = torch.nn.parallel.DistributedDataParallel(
            model, find_unused_parameters=rec.freeze_backbone)
    if lp.compile:
        trained = torch.compile(trained)
    t0 = time.monotonic()
    history = fit(trained, train_src, val_src, lp=lp, rec=rec, aug=augment.Augment.from_train(t),
                  epochs=epochs, seed=seed, progress=progress)
    seconds = time.monotonic() - t0
    return Trained(model.eval(), history, name, spec, init_note, placement, lp, seconds)


def train_model(x: np.ndarray, y: np.ndarray, *, arch: str, spec: InputSpec, classes,
                params: Params, epochs: int, seed: int, init_model: Path | None = None,
                device: torch.device | None = None) -> tuple[net.Classifier, list[dict]]:
    """A model trained on `x` `(N, H, W, C)` uint8 (array or memory map) and `y` `(N,)` int64
    with the train section's recipe, augmentation, residency and init (review's out-of-fold
    models and calibrate's seed runs use this). `arch` may be "auto"; `spec` without mean/std
    gets them measured on `x`. Returns (eval-mode module on the device, history without
    validation columns)."""
    out = _train(x, y, arch=arch, spec=spec, classes=classes, params=params, epochs=epochs,
                 seed=seed, init_model=init_model, device=device)
    return out.module, out.history


def _spec_for(params: Params, split: packed.Split, where: Path) -> InputSpec:
    """params' input spec, which must be the one the pixels were prepared with."""
    spec = inputspec.from_params(params)
    for field in ("channels", "height", "width", "resize", "background"):
        if getattr(spec, field) != getattr(split.spec, field):
            raise TrainingError(f"{where} was prepared with input {field} "
                                f"{getattr(split.spec, field)!r} but params.yaml says "
                                f"{getattr(spec, field)!r}: rerun prepare (dvc repro prepare)")
    return spec


def run(prepared_dir: str | Path, out_dir: str | Path, *, params: Params,
        init_model: Path | None = None, init_model_sha256: str | None = None) -> dict:
    """Train on `prepared_dir`/train, validate on `prepared_dir`/val, write `out_dir`/
    model.safetensors, history.csv, metrics.json. `init_model`: the production model file
    (used when train.init is production)."""
    prepared_dir, out_dir = Path(prepared_dir), Path(out_dir)
    t = params.train
    w = world.init(t.device)
    device, rank = w.device, w.rank
    classes = params.base.classes
    out = None
    try:
        facts, problem = None, None
        try:
            tr = packed.read_split(prepared_dir / "train")
            va = packed.read_split(prepared_dir / "val")
            facts = world.facts(params, {"train": tr, "val": va}, init_model=init_model,
                                init_model_sha256=init_model_sha256)
        except packed.PackedError as exc:
            problem = str(exc)
        try:  # every rank, also one that cannot read its data, so that all stop together
            hosts = world.agree(w, facts, problem=problem)
        except world.WorldError as exc:
            raise TrainingError(str(exc)) from None
        if not len(tr) or not len(va):
            raise TrainingError(f"the {'training' if not len(tr) else 'validation'} split "
                                f"in {prepared_dir} is empty: label more tasks or change "
                                "prepare.val_fraction")
        spec = _spec_for(params, tr, prepared_dir / "train")
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        out = _train(tr.x, tr.y, arch=t.arch, spec=spec, classes=classes, params=params,
                     epochs=t.epochs, seed=params.base.seed, x_val=va.x, y_val=va.y,
                     init_model=init_model, init_model_sha256=init_model_sha256,
                     device=device, rank=rank, world=w.size, progress=True)
    except torch.OutOfMemoryError:
        raise TrainingError("out of GPU memory: lower train.batch_size_cuda, or "
                            "train.resident_max_mb to stream the data, in params.yaml") from None
    finally:
        if rank != 0:
            world.close(w)
    history, lp = out.history, out.plan
    if rank == 0:
        print(f"train: {out.arch}, {out.init}; {out.placement.note}"
              + (f"; {lp.note} (lr {lp.lr:.6g} for that batch)" if lp.note else ""),
              file=sys.stderr)
    # Every rank judges (the same model, the same validation split: the same history), so that
    # all fail together: a rank that exited 0 kept its node's torchrun in the exit barrier for
    # 300 s (measured) waiting for a failed rank 0.
    if not math.isfinite(history[-1]["val_loss"]):
        raise TrainingError(f"validation loss is not finite after epoch {t.epochs}; lower "
                            f"train.lr (lr {lp.lr:.6g} at batch {lp.batch_size}) or check the data")
    # A model that learnt nothing is a failed run, not a candidate (lr 5.6 once gave val acc
    # 0.09 on 10 classes and exit 0).
    floor = chance_floor(len(classes))
    if history[-1]["val_acc"] <= floor:
        raise TrainingError(
            f"validation accuracy {history[-1]['val_acc']:.3f} after {t.epochs} epochs is no "
            f"better than chance ({floor:.3f} for {len(classes)} classes on "
            f"{len(va)} validation images); no model was written. Check train.lr "
            f"({t.lr:g} configured, {lp.lr:.6g} used at batch {lp.batch_size}), "
            f"train.batch_size, train.epochs, and the labels in {prepared_dir} (shuffled, "
            "mostly one class, or base.classes in another order than in Label Studio?)")
    if rank != 0:  # one writer: rank 0, on node 0; every rank holds the same model (loop.fit)
        if w.local_rank == 0:  # with the c10d rendezvous, node 0 is the first address in order
            print(f"train: node {w.node} of {w.nodes} done; rank 0 writes the outputs, on "
                  f"{hosts[0]} (to its --out)", file=sys.stderr)
        return {}
    out_dir.mkdir(parents=True, exist_ok=True)
    net.save(out.module, out_dir / "model.safetensors", arch=out.arch, classes=classes,
             spec=out.spec)
    with open(out_dir / "history.csv", "w", newline="") as f:  # for `dvc plots`
        writer = csv.DictWriter(f, fieldnames=list(history[0]))
        writer.writeheader()
        writer.writerows(history)
    metrics = {"device": device.type, "processes": w.size, "nodes": w.nodes,
               "arch": out.arch, "init": out.init,
               "resident": out.placement.resident, "epochs": t.epochs,
               "batch_size": lp.batch_size, "lr": round(lp.lr, 6), "train_images": len(tr),
               "val_images": len(va), "val_acc": history[-1]["val_acc"],
               "val_loss": history[-1]["val_loss"], "seconds": round(out.seconds, 2),
               "images_per_s": round(len(tr) * t.epochs / out.seconds, 1),
               "peak_gpu_mem_mb": (round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
                                   if device.type == "cuda" else None)}
    atomic_write_json(out_dir / "metrics.json", metrics)
    world.close(w)
    return metrics


def main(argv: list[str] | None = None) -> int:
    from pipelines import registry, settings
    ap = argparse.ArgumentParser(prog="python -m pipelines.train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prepared", default="data/prepared")
    ap.add_argument("--out", default="models/candidate")
    ap.add_argument("--params", default="params.yaml")
    init = ap.add_mutually_exclusive_group()
    init.add_argument("--init-registry", type=Path, default=None,
                      help="for train.init: production: the registry whose production model "
                           "(pointer + sha256) warm-starts training; none yet: from scratch")
    init.add_argument("--init-model", type=Path, default=None,
                      help="for train.init: production: a model file to warm-start from")
    ap.add_argument("--init-model-sha256", default=None,
                    help="--init-model's expected sha256; default: hashed here")
    args = ap.parse_args(argv)
    try:
        init_model, init_sha = args.init_model, args.init_model_sha256
        if args.init_registry is not None:
            pointer = registry.production(args.init_registry)
            if pointer is not None:
                init_sha = pointer.sha256
                init_model = registry.blob_path(args.init_registry, pointer.sha256)
        metrics = run(args.prepared, args.out, params=settings.load(args.params),
                      init_model=init_model, init_model_sha256=init_sha)
    except (TrainingError, settings.ParamsError, archs.ArchError, inputspec.SpecError,
            net.ModelFileError, finetune.WeightsError, registry.RegistryError) as exc:
        print(f"train failed: {exc}", file=sys.stderr)
        return 1
    if metrics:
        print(f"train: {metrics}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
