"""pipelines.finetune: a backbone from a local sha256-pinned weights file (made here from a
built net: nothing is downloaded), the head always new, 1 <-> 3 channel stems adapted; warm
start from production only when it answers the same question on the same input."""
from __future__ import annotations

import hashlib

import pytest
import torch
from safetensors.torch import save_file

from pipelines import finetune, net
from pipelines.inputspec import InputSpec
from tests.test_net import CLASSES, built, model_file, spec

CPU = torch.device("cpu")


def sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a, b)


def test_a_wrong_hash_is_refused_before_anything_is_read(tmp_path):
    source = built("resnet-fast-narrow", seed=1)
    path = finetune.save_backbone(source, tmp_path / "w.safetensors")
    model = built("resnet-fast-narrow", seed=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    wrong = "0" * 64
    with pytest.raises(finetune.WeightsError) as err:
        finetune.init_from_weights(model, path, arch="resnet-fast-narrow", sha256=wrong)
    assert wrong in str(err.value) and sha(path) in str(err.value)  # expected and actual
    assert all(same(before[k], v) for k, v in model.state_dict().items())


def test_backbone_loaded_head_and_normalisation_stay_new(tmp_path):
    source = built("resnet-fast-narrow", seed=1)  # 3 classes
    path = finetune.save_backbone(source, tmp_path / "w.safetensors")
    classes = ("a", "b", "c", "d", "e")
    s = InputSpec(1, 16, 16, "stretch", (0, 0, 0), (33.0,), (44.0,))
    model = built("resnet-fast-narrow", classes, s, seed=2)
    head = model.head.weight.clone()
    report = finetune.init_from_weights(model, path, arch="resnet-fast-narrow",
                                        sha256=sha(path))
    src, got = source.state_dict(), model.state_dict()
    for key in got:
        if key.startswith("backbone."):
            assert same(got[key], src[key]), key
    assert same(model.head.weight, head) and model.mean.tolist() == [33.0]
    assert report.loaded and not report.missing and not report.skipped
    # the source is 1-channel too (spec() default): nothing to adapt
    assert report.adapted == ()
    assert "backbone tensors loaded" in report.describe()


def test_rgb_weights_summed_into_a_gray_stem(tmp_path):
    rgb = built("resnet18", s=spec(32, 3), seed=1)
    path = finetune.save_backbone(rgb, tmp_path / "rgb.safetensors")
    gray = built("resnet18", ("x", "y"), spec(32, 1), seed=2)
    report = finetune.init_from_weights(gray, path, arch="resnet18", sha256=sha(path))
    assert report.adapted == ("backbone.conv1.weight",)
    assert same(gray.backbone.conv1.weight, rgb.backbone.conv1.weight.sum(1, keepdim=True))
    assert same(gray.backbone.layer4[1].conv2.weight, rgb.backbone.layer4[1].conv2.weight)
    # a gray image through the RGB net and the gray net: the same stem response
    x = torch.rand(1, 1, 32, 32)
    assert torch.allclose(torch.conv2d(x.repeat(1, 3, 1, 1), rgb.backbone.conv1.weight),
                          torch.conv2d(x, gray.backbone.conv1.weight), atol=1e-5)


def test_torchvision_style_keys_and_a_labelgate_model_file_both_work(tmp_path):
    source = built("smallcnn", seed=1)
    own_file, _ = model_file(tmp_path / "m.safetensors", seed=1)  # backbone.* keys + head
    tv_style = finetune.save_backbone(source, tmp_path / "tv.safetensors")  # 0.weight, ...
    for path in (own_file, tv_style):
        model = built("smallcnn", seed=5)
        report = finetune.init_from_weights(model, path, arch="smallcnn", sha256=sha(path))
        assert same(model.backbone[0].weight, source.backbone[0].weight)
        assert not same(model.head.weight, source.head.weight)
        if path == own_file:
            assert {k for k, _ in report.skipped} == {"head.weight", "head.bias", "mean", "std"}


def test_weights_of_another_architecture_are_an_error_not_a_silent_scratch_start(tmp_path):
    path = finetune.save_backbone(built("smallcnn", seed=1), tmp_path / "w.safetensors")
    model = built("resnet-fast-narrow", seed=2)
    with pytest.raises(finetune.WeightsError, match="fits resnet-fast-narrow"):
        finetune.init_from_weights(model, path, arch="resnet-fast-narrow", sha256=sha(path))
    pickle = tmp_path / "w.pt"
    torch.save({"a": torch.zeros(1)}, pickle)
    with pytest.raises(finetune.WeightsError, match="not safetensors"):
        finetune.init_from_weights(model, pickle, arch="resnet-fast-narrow", sha256=sha(pickle))


def test_a_shape_mismatch_is_skipped_and_reported(tmp_path):
    source = built("smallcnn", seed=1)
    state = {k: v.contiguous() for k, v in source.backbone.state_dict().items()}
    state["3.weight"] = torch.zeros(64, 32, 5, 5)  # the second conv, wrong kernel
    path = tmp_path / "w.safetensors"
    save_file(state, str(path))
    model = built("smallcnn", seed=2)
    report = finetune.init_from_weights(model, path, arch="smallcnn", sha256=sha(path))
    assert ("3.weight", "shape (64, 32, 5, 5) != (64, 32, 3, 3)") in report.skipped
    assert report.missing == ("backbone.3.weight",)
    assert same(model.backbone[0].weight, source.backbone[0].weight)


# -- warm start -----------------------------------------------------------------------------------

def test_warm_start_loads_only_a_model_that_matches(tmp_path):
    prod_file, prod = model_file(tmp_path / "prod.safetensors", seed=1, arch="smallcnn")
    s = InputSpec(1, 16, 16, "stretch", (0, 0, 0), (90.0,), (50.0,))  # re-measured stats
    model = net.build("smallcnn", CLASSES, s)
    got = finetune.warm_start(model, prod_file, sha256=sha(prod_file), arch="smallcnn",
                              classes=CLASSES, spec=s)
    assert got.loaded and "warm start" in got.reason
    for key, value in prod.state_dict().items():
        if key not in ("mean", "std"):
            assert same(model.state_dict()[key], value), key
    assert model.mean.tolist() == [90.0]  # this run's normalisation, which its file states

    refused = {
        "arch": dict(arch="resnet-fast-narrow", classes=CLASSES, spec=s),
        "classes": dict(arch="smallcnn", classes=("cat", "dog", "bird"), spec=s),
        "order": dict(arch="smallcnn", classes=CLASSES[::-1], spec=s),
        "size": dict(arch="smallcnn", classes=CLASSES, spec=spec(20)),
        "channels": dict(arch="smallcnn", classes=CLASSES, spec=spec(16, 3)),
        "resize": dict(arch="smallcnn", classes=CLASSES, spec=spec(16, resize="pad")),
    }
    for what, kw in refused.items():
        fresh = net.build(kw["arch"], kw["classes"], kw["spec"])
        before = {k: v.clone() for k, v in fresh.state_dict().items()}
        got = finetune.warm_start(fresh, prod_file, sha256=sha(prod_file), **kw)
        assert not got.loaded and got.reason.startswith("trained from scratch"), what
        assert all(same(before[k], v) for k, v in fresh.state_dict().items()), what
    assert "production is smallcnn, this run trains resnet-fast-narrow" in finetune.warm_start(
        net.build("resnet-fast-narrow", CLASSES, s), prod_file, sha256=sha(prod_file),
        arch="resnet-fast-narrow", classes=CLASSES, spec=s).reason


def test_warm_start_refuses_an_altered_production_file(tmp_path):
    prod_file, _ = model_file(tmp_path / "prod.safetensors", seed=1)
    recorded = sha(prod_file)
    other, _ = model_file(tmp_path / "other.safetensors", seed=2)
    prod_file.write_bytes(other.read_bytes())  # same metadata, other weights
    model = built(seed=3)
    with pytest.raises(net.ModelFileError, match="expected " + recorded):
        finetune.warm_start(model, prod_file, sha256=recorded, arch="smallcnn", classes=CLASSES,
                            spec=spec())
