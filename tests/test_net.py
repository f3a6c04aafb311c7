"""pipelines.net: the Classifier (normalisation inside), its safetensors file (format 2 written,
formats 1 and 2 read, byte-identical for identical weights, never a pickle), clear errors for
files it cannot use, and inference on `(N, H, W, C)` uint8."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from pipelines import archs, net
from pipelines.inputspec import InputSpec

CPU = torch.device("cpu")
CLASSES = ("cat", "dog", "<x>|y")


def spec(size: int = 16, channels: int = 1, *, height: int | None = None,
         resize: str = "stretch") -> InputSpec:
    """An input spec with measured-looking stats (one value per channel)."""
    return InputSpec(channels=channels, height=height or size, width=size, resize=resize,
                     background=(0, 0, 0), mean=(120.0,) * channels, std=(60.0,) * channels)


def built(arch: str = "smallcnn", classes=CLASSES, s: InputSpec | None = None, *,
          seed: int = 0) -> net.Classifier:
    torch.manual_seed(seed)
    return net.build(arch, classes, s or spec()).eval()


def model_file(path, *, seed: int = 0, arch: str = "smallcnn", classes=CLASSES,
               s: InputSpec | None = None):
    """A freshly built (untrained) classifier saved via net.save; distinct seeds give distinct
    files. Returns (path, model)."""
    s = s or spec()
    model = built(arch, classes, s, seed=seed)
    return net.save(model, path, arch=arch, classes=classes, spec=s), model


def pixels(n: int, s: InputSpec, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, s.height, s.width, s.channels),
                                                dtype=np.uint8)


def legacy_file(path, *, classes=tuple("0123456789"), size: int = 28, seed: int = 0):
    """A format-1 file exactly as the seed's net.save wrote it: net.Net's own state-dict keys,
    metadata {"arch", "classes", "image_size"}."""
    torch.manual_seed(seed)
    side = (size - 4) // 2
    keys = {"features.0": (32, 1, 3, 3), "features.2": (64, 32, 3, 3),
            "head.0": (128, 64 * side * side), "head.3": (len(classes), 128)}
    state = {}
    for key, shape in keys.items():
        state[f"{key}.weight"] = torch.randn(shape) * 0.05
        state[f"{key}.bias"] = torch.randn(shape[0]) * 0.05
    meta = json.dumps({"arch": archs.LEGACY, "classes": list(classes), "image_size": size},
                      sort_keys=True)
    save_file(state, str(path), metadata={"labelgate": meta})
    return state


# -- the classifier -------------------------------------------------------------------------------

def test_normalisation_is_inside_the_model():
    s = spec(8, 3)
    model = built(s=s)
    assert model.mean.tolist() == [120.0] * 3 and model.std.tolist() == [60.0] * 3
    x = torch.as_tensor(pixels(2, s)).permute(0, 3, 1, 2).float()
    want = model.backbone((x - 120.0) / 60.0)
    assert torch.allclose(model.features(x), want)
    assert torch.allclose(model(x), model.head(want))


def test_build_refuses_what_it_cannot_build():
    with pytest.raises(ValueError, match="one value per channel"):
        net.build("smallcnn", CLASSES, InputSpec(3, 8, 8, "stretch", (0, 0, 0), (), ()))
    with pytest.raises(archs.ArchError, match="unknown architecture 'resnet-50'"):
        net.build("resnet-50", CLASSES, spec())
    with pytest.raises(archs.ArchError, match="load old model files"):
        net.build(archs.LEGACY, CLASSES, spec(28))
    with pytest.raises(ValueError, match="at least 2 classes"):
        net.build("smallcnn", ("only",), spec())


# -- the model file -------------------------------------------------------------------------------

def test_save_load_round_trip_keeps_weights_spec_and_predictions(tmp_path):
    s = spec(12, 3, height=10, resize="crop")
    path, model = model_file(tmp_path / "m" / "model.safetensors", s=s)
    loaded = net.load(path, device=CPU)
    assert (loaded.arch, loaded.classes, loaded.spec) == ("smallcnn", CLASSES, s)
    assert net.read_meta(path) == ("smallcnn", CLASSES, s)
    want, got = model.state_dict(), loaded.module.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    x = pixels(5, s)
    assert np.array_equal(net.predict_proba(model, x, device=CPU),
                          net.predict_proba(loaded.module, x, device=CPU))
    meta = json.loads(__import__("safetensors").safe_open(str(path), "pt").metadata()["labelgate"])
    assert meta == {"format": 2, "arch": "smallcnn", "classes": list(CLASSES),
                    "input": s.to_json()}


def test_same_weights_give_the_same_file_bytes(tmp_path):
    a, _ = model_file(tmp_path / "a.safetensors", seed=3)
    b, _ = model_file(tmp_path / "b.safetensors", seed=3)
    c, _ = model_file(tmp_path / "c.safetensors", seed=4)
    assert a.read_bytes() == b.read_bytes() != c.read_bytes()


def test_save_refuses_a_spec_that_is_not_the_models(tmp_path):
    model = built()
    other = InputSpec(1, 16, 16, "stretch", (0, 0, 0), (100.0,), (60.0,))
    with pytest.raises(ValueError, match="differs from the model's"):
        net.save(model, tmp_path / "m.safetensors", arch="smallcnn", classes=CLASSES, spec=other)
    with pytest.raises(ValueError, match="4 classes for a head of 3"):
        net.save(model, tmp_path / "m.safetensors", arch="smallcnn", classes=(*CLASSES, "z"),
                 spec=spec())


def test_a_format_1_file_of_the_seed_loads_and_predicts_as_it_did(tmp_path):
    path = tmp_path / "old.safetensors"
    state = legacy_file(path)
    loaded = net.load(path, device=CPU)
    assert loaded.arch == archs.LEGACY and loaded.classes == tuple("0123456789")
    assert loaded.spec == InputSpec.legacy_gray(28)
    # the seed's forward, by hand: (x - 127.5) / 127.5, conv, relu, conv, relu, pool, fc, relu, fc
    x = pixels(3, loaded.spec)
    t = (torch.as_tensor(x).permute(0, 3, 1, 2).float() - 127.5) / 127.5
    h = torch.relu(torch.conv2d(t, state["features.0.weight"], state["features.0.bias"]))
    h = torch.relu(torch.conv2d(h, state["features.2.weight"], state["features.2.bias"]))
    h = torch.max_pool2d(h, 2).flatten(1)
    h = torch.relu(h @ state["head.0.weight"].T + state["head.0.bias"])
    want = torch.softmax(h @ state["head.3.weight"].T + state["head.3.bias"], 1).numpy()
    np.testing.assert_allclose(net.predict_proba(loaded.module, x, device=CPU), want,
                               rtol=1e-4, atol=1e-6)


def test_files_it_cannot_use_get_a_clear_error(tmp_path):
    model = built()
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    cases = {
        "bare": (None, "no 'labelgate' metadata"),
        "foreign-v1": ({"arch": "resnet-50", "classes": list(CLASSES), "image_size": 16},
                       "unknown architecture 'resnet-50'"),
        "unknown-arch": ({"format": 2, "arch": "vit_h_14", "classes": list(CLASSES),
                          "input": spec().to_json()}, "unknown architecture 'vit_h_14'"),
        "future": ({"format": 3, "arch": "smallcnn"}, "format 3"),
        "no-classes": ({"format": 2, "arch": "smallcnn", "input": spec().to_json()},
                       "missing 'classes'"),
        "wrong-arch": ({"format": 2, "arch": "resnet-fast-narrow", "classes": list(CLASSES),
                        "input": spec().to_json()}, "do not fit resnet-fast-narrow"),
    }
    for name, (meta, message) in cases.items():
        path = tmp_path / f"{name}.safetensors"
        save_file(state, str(path), metadata=None if meta is None else
                  {"labelgate": json.dumps(meta)})
        with pytest.raises(net.ModelFileError, match=message):
            net.load(path, device=CPU)
    (tmp_path / "text.safetensors").write_text("hello")
    with pytest.raises(net.ModelFileError, match="not a labelgate model file"):
        net.read_meta(tmp_path / "text.safetensors")


def test_load_with_a_hash_refuses_other_bytes(tmp_path):
    path, _ = model_file(tmp_path / "m.safetensors")
    import hashlib
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    assert net.load(path, device=CPU, sha256=sha).arch == "smallcnn"
    with pytest.raises(net.ModelFileError, match=f"expected {'0' * 64}"):
        net.load(path, device=CPU, sha256="0" * 64)


def test_save_never_writes_through_a_planted_symlink(tmp_path):
    outside = tmp_path / "outside"
    outside.write_bytes(b"not yours")
    folder = tmp_path / "candidate"
    folder.mkdir()
    (folder / "model.tmp").symlink_to(outside)
    (folder / "model.safetensors").symlink_to(outside)
    path, _ = model_file(folder / "model.safetensors")
    assert outside.read_bytes() == b"not yours" and not path.is_symlink()
    assert net.load(path, device=CPU).classes == CLASSES


class _Touch:
    """Unpickling this creates a file: the proof that a pickle was executed."""
    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        import pathlib
        return (pathlib.Path.touch, (pathlib.Path(self.path),))


def test_a_pickle_is_never_executed(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "model.safetensors"
    torch.save({"weights": _Touch(marker)}, path)  # a pickle under the expected name
    with pytest.raises(net.ModelFileError):
        net.load(path, device=CPU)
    assert not marker.exists()


# -- inference ------------------------------------------------------------------------------------

def test_predict_proba_takes_nhwc_uint8_in_any_batch_size():
    s = spec(10, 3)
    model = built(s=s)
    x = pixels(7, s)
    whole = net.predict_proba(model, x, device=CPU)
    assert whole.shape == (7, 3) and whole.dtype == np.float32
    np.testing.assert_allclose(whole.sum(1), 1, rtol=1e-5)
    np.testing.assert_allclose(net.predict_proba(model, x, device=CPU, batch_size=3), whole,
                               rtol=1e-5, atol=1e-6)
    # the same as the float NCHW forward by hand
    want = torch.softmax(model(torch.as_tensor(x).permute(0, 3, 1, 2).float()), 1)
    np.testing.assert_allclose(whole, want.detach().numpy(), rtol=1e-5, atol=1e-6)
    assert net.predict_proba(model, x[:0], device=CPU).shape[0] == 0
