"""pipelines.evaluate with models of any architecture and input spec: each model sees the eval
images through its own spec (a production model trained at another size and colour mode than
the candidate is judged on what it would have been given), and production's size and compute
travel with the evaluation for the gate's relative budgets."""
from __future__ import annotations

import numpy as np
import torch

from pipelines import evalset, evaluate, inputspec, net, predict, rawstore, registry
from pipelines.inputspec import InputSpec
from tests import factories

CPU = torch.device("cpu")
CLASSES = tuple(str(i) for i in range(10))
EVAL_N = 24


def test_each_model_is_judged_through_its_own_input_spec(tmp_path):
    params = factories.params({"train.device": "cpu"})
    raw = tmp_path / "raw"
    factories.write_store(raw, [
        (factories.ls_task(i, str(factories.digit_label(i)), url=factories.task_url(f"{i}.png"),
                           ground_truth=True), factories.digit_png(i)) for i in range(EVAL_N)])
    eval_dir = tmp_path / "eval"
    evalset.freeze(rawstore.load(raw), eval_dir, params=params)

    cand_spec = inputspec.from_params(params).with_stats((30.0,), (70.0,))
    torch.manual_seed(0)
    cand_file = net.save(net.build("smallcnn", CLASSES, cand_spec), tmp_path / "cand.safetensors",
                         arch="smallcnn", classes=CLASSES, spec=cand_spec)
    prod_spec = InputSpec(3, 20, 24, "pad", (255, 255, 255), (40.0, 40.0, 40.0), (60.0,) * 3)
    torch.manual_seed(1)
    prod_file = net.save(net.build("resnet-fast-narrow", CLASSES, prod_spec),
                         tmp_path / "prod.safetensors", arch="resnet-fast-narrow",
                         classes=CLASSES, spec=prod_spec)
    reg = tmp_path / "registry"
    sha, _ = registry.store(reg, prod_file)
    registry.make_production(reg, {"id": f"m0001-{sha[:10]}", "sha256": sha,
                                   "eval_hash": "e" * 64, "dataset_version": "d",
                                   "metrics": {}}, via="gate", previous=None)

    result = evaluate.run(cand_file, eval_dir, reg, tmp_path / "out", params=params)

    blobs = evalset.image_bytes(eval_dir)
    ev = evalset.load(eval_dir, params=params)
    for record, path, s in ((result.candidate, cand_file, cand_spec),
                            (result.production, prod_file, prod_spec)):
        model = predict.load_file(path, device=CPU)
        x = inputspec.stack([blobs[sha] for sha in ev.shas], s)
        assert x.shape[1:] == (s.height, s.width, s.channels)
        want = float((predict.probabilities(model, x).argmax(1) == ev.y).mean())
        assert record.accuracy == want
        assert record.macs_per_image == evaluate.macs_per_image(
            model.module, net.example_input(s), device=CPU)
    assert result.production.size_bytes == prod_file.stat().st_size
    assert result.production.macs_per_image != result.candidate.macs_per_image
    assert result.seed_noise is None  # no calibration in this registry
    assert np.isfinite(result.candidate.accuracy)
