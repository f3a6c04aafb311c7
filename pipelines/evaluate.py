"""evaluate: candidate (and production, if any) on the fixed eval set `data/eval/`.

    python -m pipelines.evaluate --model models/candidate/model.safetensors --eval data/eval \
        --registry models/registry --out reports/evaluation --latency reports/latency.json

Writes evaluation.json (eval-set hash, metrics of both models, the candidate's size and compute
per image) and predictions.npz (per eval image: truth, candidate and production predictions and
confidences), `records.Evaluation` and `records.Predictions`. Production is re-evaluated on the
current eval set, so both numbers come from the same images.

Everything in reports/evaluation is a function of the model files and the eval set: `dvc repro`
elsewhere or under load writes the same bytes, and the gate judges only these. Wall-clock
latency is not: it is measured apart (`--latency`, a non-cached DVC metric the gate does not
read; the report shows it against its budget). The gate's stand-in for latency is the compute
per image (multiply-accumulates), counted from the layer shapes.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pipelines import evalset, net, noise, predict, registry
from pipelines.device import pick_device
from pipelines.files import atomic_write_json, sha256_file
from pipelines.metrics import classification
from pipelines.records import (CandidateEval, Evaluation, Predictions, ProductionEval,
                               write_evaluation)
from pipelines.settings import Params

# Latency: k repeated runs of 200 single-image predictions on one CPU thread
# (net.latency_ms_p95), reported as the median of the k p95s: a run disturbed by a neighbour on
# a shared machine moves one p95, and the median of 5 ignores up to two such runs. Still a
# timing, so only the report judges it; the gate judges macs_per_image.
LATENCY_REPEATS = 5


@torch.no_grad()
def macs_per_image(model: nn.Module, x: np.ndarray, *, device: torch.device) -> int:
    """Multiply-accumulates of one forward pass on one image of `x` (`(N, H, W, C)` uint8, or
    `(N, H, W)` for one channel; net.example_input(spec) gives one of a model's input),
    counted by forward hooks from the shapes of the convolutions (grouped and depthwise ones
    included: in_channels / groups inputs per output) and linear layers, for any architecture
    (the rest — BN, activations, pooling, the inside-the-model normalisation — is a rounding
    error): the same number on every machine, unlike a timing."""
    total = 0

    def count(module: nn.Module, _inputs, output: torch.Tensor) -> None:
        nonlocal total
        if isinstance(module, nn.Conv2d):
            kh, kw = module.kernel_size
            total += output.numel() * (module.in_channels // module.groups) * kh * kw
        elif isinstance(module, nn.Linear):
            total += output.numel() * module.in_features
    hooks = [m.register_forward_hook(count) for m in model.modules()
             if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        model.eval()
        model(net.as_nchw(torch.as_tensor(x[:1]).to(device)))
    finally:
        for h in hooks:
            h.remove()
    return int(total)


def measure_latency(model: nn.Module, x: np.ndarray, *, device: torch.device,
                    repeats: int = LATENCY_REPEATS) -> dict:
    """Median over `repeats` runs of the p95 single-image prediction time, in ms."""
    runs = [round(net.latency_ms_p95(model, x, device=device), 4) for _ in range(repeats)]
    return {"p95_ms": statistics.median(runs), "p95_ms_runs": runs, "repeats": repeats,
            "device": device.type, "threads": 1 if device.type == "cpu" else None}


def _geometry(spec) -> tuple:
    """What decides the pixels (mean/std are inside the model)."""
    return spec.channels, spec.height, spec.width, spec.resize, tuple(spec.background)


def run(model_file: str | Path, eval_dir: str | Path, registry_dir: str | Path,
        out_dir: str | Path, *, params: Params,
        latency_file: str | Path | None = None) -> Evaluation:
    """Evaluate; with `latency_file`, also time the candidate there (see LATENCY_REPEATS)."""
    out_dir = Path(out_dir)
    device = pick_device(params.train.device)
    classes = params.base.classes
    model = predict.load_file(model_file, device=device)
    ev = evalset.load(eval_dir, params=params, spec=model.spec)
    if model.classes != classes:
        raise ValueError(f"candidate was trained for classes {list(model.classes)}, "
                         f"params.yaml has {list(classes)}")

    def inputs(m: predict.Model) -> np.ndarray:
        """The eval images as `m` takes them: preprocessed with `m`'s own spec (a production
        model trained at another size or resize policy than the candidate)."""
        if _geometry(m.spec) == _geometry(model.spec):
            return ev.x
        return evalset.load(eval_dir, params=params, spec=m.spec).x

    cand_probs = predict.probabilities(model, inputs(model),
                                       batch_size=params.evaluate.batch_size)
    cand_pred = cand_probs.argmax(1)
    candidate = CandidateEval(sha256=sha256_file(model_file),
                              size_bytes=Path(model_file).stat().st_size,
                              macs_per_image=macs_per_image(
                                  model.module, net.example_input(model.spec), device=device),
                              **classification(ev.y, cand_pred, classes))
    production, note, prod_probs = None, None, None
    prod = predict.load_production(registry_dir, device=device)
    if prod is not None:
        pointer = prod.pointer
        if prod.classes == classes:
            prod_probs = predict.probabilities(prod, inputs(prod),
                                               batch_size=params.evaluate.batch_size)
            production = ProductionEval(
                id=pointer.id, sha256=pointer.sha256, judged_on_eval_hash=pointer.eval_hash,
                dataset_version=pointer.dataset_version,
                train_class_counts=pointer.metrics.get("train_class_counts"),
                # what the gate's relative budgets (size, compute) compare the candidate with
                size_bytes=registry.blob_path(registry_dir, pointer.sha256).stat().st_size,
                macs_per_image=macs_per_image(prod.module, net.example_input(prod.spec),
                                              device=device),
                **classification(ev.y, prod_probs.argmax(1), classes))
        else:
            note = (f"production {pointer.id} predicts other classes {list(prod.classes)}; "
                    "not comparable")
    # the project's measured seed noise travels with the evaluation, so that the gate reads
    # the evaluation and params alone (pipelines/noise.py)
    result = Evaluation(eval_hash=ev.hash, eval_n=len(ev.y), classes=classes,
                        candidate=candidate, production=production, production_note=note,
                        seed_noise=noise.read(registry_dir))
    # confidences rounded to 5 digits: the same decision from the same models on any machine
    # (float noise below that does not change the bytes DVC hashes)
    predictions = Predictions(
        task_id=ev.task_ids, image_sha256=ev.shas, truth=ev.y, cand_pred=cand_pred,
        cand_conf=cand_probs.max(1).astype(np.float64).round(5),
        prod_pred=None if prod_probs is None else prod_probs.argmax(1),
        prod_conf=None if prod_probs is None else prod_probs.max(1).astype(np.float64).round(5))
    write_evaluation(out_dir, result, predictions)
    if latency_file is not None:
        atomic_write_json(Path(latency_file),
                          measure_latency(model.module, inputs(model), device=device))
    return result


def main(argv: list[str] | None = None) -> int:
    from pipelines import settings
    ap = argparse.ArgumentParser(prog="python -m pipelines.evaluate", description=__doc__)
    ap.add_argument("--model", default="models/candidate/model.safetensors")
    ap.add_argument("--eval", default="data/eval")
    ap.add_argument("--registry", default="models/registry")
    ap.add_argument("--out", default="reports/evaluation")
    ap.add_argument("--latency", default=None,
                    help="also time the candidate; write the measurement here (JSON)")
    ap.add_argument("--params", default="params.yaml")
    args = ap.parse_args(argv)
    try:
        result = run(args.model, args.eval, args.registry, args.out,
                     params=settings.load(args.params), latency_file=args.latency)
    except (evalset.EvalSetError, registry.RegistryError, ValueError) as exc:
        print(f"evaluate failed: {exc}", file=sys.stderr)
        return 1
    prod = result.production
    print(f"evaluate: candidate accuracy {result.candidate.accuracy:.4f} on "
          f"{result.eval_n} eval images"
          + (f"; production {prod.id} {prod.accuracy:.4f}" if prod else "; no production yet"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
