"""pipelines.archs: every architecture builds for any size and 1 or 3 channels, `auto` follows
its documented rule, settings' list of names is this registry's — and each architecture trains a
step and goes the whole way: model file, registry, verified load, predict, the ML backend."""
from __future__ import annotations

import threading

import httpx
import numpy as np
import pytest
import torch

from pipelines import archs, backend, evaluate, net, predict, registry, settings
from pipelines.device import pick_device
from pipelines.inputspec import InputSpec
from tests import factories
from tests.test_net import pixels, spec

CPU = torch.device("cpu")
TRAINABLE = [n for n in archs.NAMES if n != archs.AUTO]


def test_settings_offers_exactly_the_trainable_architectures():
    assert set(settings.TRAIN_ARCHS) == set(TRAINABLE) and archs.AUTO not in settings.TRAIN_ARCHS
    assert archs.LEGACY in archs.ARCHS and archs.LEGACY not in archs.NAMES


@pytest.mark.parametrize("arch", TRAINABLE)
def test_any_size_and_channel_count_gives_features_and_logits(arch):
    for channels, (h, w) in ((1, (28, 28)), (3, (40, 24))):
        s = spec(w, channels, height=h)
        torch.manual_seed(0)
        model = net.build(arch, ("a", "b", "c", "d"), s).eval()
        x = torch.as_tensor(pixels(2, s)).permute(0, 3, 1, 2).float()
        feats = model.features(x)
        assert feats.shape == (2, model.head.in_features)
        assert model(x).shape == (2, 4)
        first = model.state_dict()[archs.stem_key(model.backbone)]
        assert first.dim() == 4 and first.shape[1] == channels


def test_the_stem_is_the_layer_that_sees_the_input():
    stems = {"smallcnn": "backbone.0.weight", "resnet-fast": "backbone.whiten.weight",
             "resnet18": "backbone.conv1.weight",
             "mobilenet_v3_large": "backbone.features.0.0.weight",
             "efficientnet_b0": "backbone.features.0.0.weight"}
    for arch, key in stems.items():
        assert archs.stem_key(net.build(arch, ("a", "b"), spec(32, 3)).backbone) == key


def test_auto_picks_by_image_size_and_device():
    small, photo = spec(32, 3), spec(224, 3)
    assert archs.resolve_arch("auto", small, "cpu") == "resnet-fast-narrow"
    assert archs.resolve_arch("auto", small, "cuda") == "resnet-fast"
    assert archs.resolve_arch("auto", spec(28, 1), "cpu") == "resnet-fast-narrow"
    assert archs.resolve_arch("auto", photo, "cpu") == "mobilenet_v3_large"
    assert archs.resolve_arch("auto", photo, "cuda") == "resnet18"
    # the shorter side decides: a 300 x 48 strip is a small image
    assert archs.resolve_arch("auto", spec(300, 3, height=48), "cuda") == "resnet-fast"
    assert archs.resolve_arch("resnet18", small, "cpu") == "resnet18"  # a named one is kept
    with pytest.raises(archs.ArchError, match="choose one of auto, smallcnn"):
        archs.resolve_arch("resnet50", small, "cpu")


def test_macs_are_counted_for_every_kind_of_layer():
    """Grouped and depthwise convolutions (mobilenet: in_channels / groups inputs per output)
    and linear layers: torchvision's published compute at 224 x 224 (its docs: 1.81 and 0.22
    GFLOPS, which are multiply-accumulates) less their 1000-class heads (512 / 1280 x 1000)."""
    s224 = spec(224, 3)
    published = {"resnet18": 1.814e9 - 512 * 1000, "mobilenet_v3_large": 0.2175e9 - 1280 * 1000}
    for arch, want in published.items():
        torch.manual_seed(0)
        macs = evaluate.macs_per_image(net.build(arch, ("a", "b"), s224),
                                       net.example_input(s224), device=CPU)
        assert macs == pytest.approx(want, rel=0.01), arch
    # smallcnn at 32x32x3, by hand: four 3x3 convs and the head
    s32 = spec(32, 3)
    want = (32 * 32 * 32 * 3 * 9 + 32 * 32 * 64 * 32 * 9 + 16 * 16 * 128 * 64 * 9
            + 8 * 8 * 128 * 128 * 9 + 2 * 128)
    assert evaluate.macs_per_image(net.build("smallcnn", ("a", "b"), s32),
                                   net.example_input(s32), device=CPU) == want


def test_whitening_init_decorrelates_the_stem():
    s = spec(16, 3)
    torch.manual_seed(0)
    model = net.build("resnet-fast-narrow", ("a", "b"), s)
    rng = np.random.default_rng(0)
    base = rng.normal(0, 1, (400, 1, 16, 16))
    x = np.concatenate([base, base * 0.8 + rng.normal(0, 0.3, (400, 2, 16, 16))], 1)  # RGB alike
    t = torch.as_tensor(x, dtype=torch.float32)
    patches = t.unfold(2, 2, 2).unfold(3, 2, 2).permute(0, 2, 3, 1, 4, 5).reshape(-1, 3, 2, 2)
    archs.whiten_init(model.backbone, patches)
    out = torch.conv2d(patches - patches.mean(0), model.backbone.whiten.weight[:12])
    cov = torch.cov(out.reshape(len(out), -1).T)
    assert torch.allclose(cov, torch.eye(12), atol=0.05)  # whitened: unit, uncorrelated


# -- each architecture, the whole way -------------------------------------------------------------

class _Studio:
    """What the backend needs of Label Studio: image bytes by URL."""

    def __init__(self, blobs: dict[str, bytes]) -> None:
        self.blobs = blobs

    def fetch_image(self, url: str, *, max_bytes: int) -> bytes:
        return self.blobs[url]


@pytest.mark.parametrize("arch", TRAINABLE)
def test_each_architecture_trains_a_step_and_serves_through_registry_predict_and_backend(
        arch, tmp_path):
    classes = ("cat", "dog", "leaf spot/blight")
    s = InputSpec(3, 32, 32, "crop", (255, 255, 255), (110.0, 120.0, 100.0), (60.0, 55.0, 65.0))
    torch.manual_seed(0)
    model = net.build(arch, classes, s)
    x = torch.as_tensor(pixels(4, s)).permute(0, 3, 1, 2).float()
    y = torch.tensor([0, 1, 2, 0])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model.train()
    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    assert not torch.equal(before["head.weight"], model.state_dict()["head.weight"])
    stem = archs.stem_key(model.backbone)
    assert not torch.equal(before[stem], model.state_dict()[stem])
    path = net.save(model.eval(), tmp_path / "model.safetensors", arch=arch, classes=classes,
                    spec=s)
    reg = tmp_path / "registry"
    sha, _ = registry.store(reg, path)
    registry.make_production(reg, {"id": f"m0001-{sha[:10]}", "sha256": sha,
                                   "eval_hash": "e" * 64, "dataset_version": "d", "metrics": {}},
                             via="gate", previous=None)
    prod = predict.load_production(reg, device=CPU)
    assert (prod.arch, prod.classes, prod.spec) == (arch, classes, s)
    rng = np.random.default_rng(1)
    blobs = {f"/img/{i}.png": factories.png_bytes(rng.integers(0, 256, (20 + 9 * i, 30, 4),
                                                               dtype=np.uint8))
             for i in range(3)}  # RGBA of three aspect ratios
    answers = predict.predict_images(prod, list(blobs), blobs.__getitem__, how="margin")
    x_in = np.stack([predict.to_input(prod, b) for b in blobs.values()])
    assert x_in.shape == (3, 32, 32, 3)
    want = net.predict_proba(model, x_in, device=CPU)
    assert [a.label for _, a in answers] == [classes[i] for i in want.argmax(1)]
    assert [a.probability for _, a in answers] == pytest.approx(want.max(1).tolist(), rel=1e-4)

    holder = backend.ModelHolder(reg, pick_device("cpu"))
    server = backend.make_server(holder, _Studio(blobs),
                                 params=factories.params({"train.device": "cpu"}), port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        tasks = [{"id": i, "data": {"image": u}} for i, u in enumerate(blobs)]
        body = httpx.post(url + "/predict", json={"tasks": tasks}, timeout=60).json()
    finally:
        server.shutdown()
        server.server_close()
    chosen = [r["result"][0]["value"]["choices"][0] for r in body["results"]]
    assert chosen == [a.label for _, a in answers]
    assert body["model_version"] == f"m0001-{sha[:10]}"


def test_the_cost_benchmark_prints_a_row_per_architecture():
    import re
    import subprocess
    import sys

    from tests.conftest import REPO
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "arch_costs.py"),
                           "--sizes", "16", "--steps", "1", "--archs", "smallcnn",
                           "resnet-fast-narrow"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = re.findall(r"^\| ([\w-]+) \| 16 \| [\d.]+ \| [\d.]+ \| ([\d,.]+) \| [\d,.]+ \|$",
                      proc.stdout, flags=re.M)
    assert [r[0] for r in rows] == ["smallcnn", "resnet-fast-narrow"]
    assert rows[0][1] == "12.0"  # smallcnn at 16x16x3: 12.0 million MACs
