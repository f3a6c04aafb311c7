"""pipelines.predict: the one image -> model -> (label, certainty) path, the verified production
load, and the certainty score pre-annotations are ordered by; `labelgate predict` and
`labelgate evalset rebaseline`, which run production through it."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pipelines import cli, evalset, inputspec, net, predict, rawstore, registry, settings
from pipelines.files import sha256_file
from pipelines.layout import Layout
from tests import factories
from tests.conftest import write_params
from tests.factories import png_bytes
from tests.test_preannotate import make_production

CLASSES = ("cat", "dog", "<x>|y")
SPEC = inputspec.InputSpec(3, 16, 12, "pad", (255, 255, 255), (120.0, 110.0, 100.0),
                           (60.0, 60.0, 60.0))
CPU = torch.device("cpu")


def png(seed: int, side: int = 20) -> bytes:
    return png_bytes(np.random.default_rng(seed).integers(0, 256, (side, side), dtype=np.uint8))


@pytest.fixture
def model() -> predict.Model:
    torch.manual_seed(0)
    return predict.Model(net.build("smallcnn", CLASSES, SPEC).eval(), "smallcnn", CLASSES, SPEC,
                         CPU)


def test_certainty_orders_uncertain_first():
    probs = np.array([[0.5, 0.5, 0.0], [0.9, 0.05, 0.05], [1 / 3, 1 / 3, 1 / 3]])
    margin = predict.certainty(probs, "margin")
    entropy = predict.certainty(probs, "entropy")
    assert margin == pytest.approx([0.0, 0.85, 0.0])
    assert entropy[2] == pytest.approx(0.0, abs=1e-9) and entropy[1] > entropy[0] > entropy[2]
    assert ((0 <= entropy) & (entropy <= 1)).all()


def test_predict_images_keeps_order_and_says_why_an_image_has_no_answer(model):
    blobs = {"a.png": png(1), "junk.png": b"not an image", "b.png": png(2), "gone.png": None,
             "c.png": png(3)}

    def read(name: str) -> bytes:
        if blobs[name] is None:
            raise FileNotFoundError(name)
        return blobs[name]

    answers = predict.predict_images(model, list(blobs), read, how="margin",
                                     errors=(FileNotFoundError,))
    assert [name for name, _ in answers] == list(blobs)
    kinds = {name: type(a).__name__ for name, a in answers}
    assert kinds == {"a.png": "Prediction", "junk.png": "Unreadable", "b.png": "Prediction",
                     "gone.png": "Unreadable", "c.png": "Prediction"}
    assert "gone.png" in dict(answers)["gone.png"].reason
    # the same answers as the pieces give, image by image
    for name in ("a.png", "b.png", "c.png"):
        probs = predict.probabilities(model, np.stack([predict.to_input(model, blobs[name])]))
        want = predict.predictions(model, probs, how="margin")[0]
        got = dict(answers)[name]
        assert got.label == CLASSES[int(probs[0].argmax())] == want.label
        assert got.probability == pytest.approx(float(probs[0].max()), rel=1e-5)
        assert got.certainty == pytest.approx(want.certainty, rel=1e-4, abs=1e-6)


def test_a_read_error_not_named_stops_the_call(model):
    def read(_name: str) -> bytes:
        raise PermissionError("not mine to read")

    with pytest.raises(PermissionError):
        predict.predict_images(model, ["x"], read, how="margin", errors=(FileNotFoundError,))


def test_nothing_readable_means_no_forward_pass(model):
    answers = predict.predict_images(model, ["x", "y"], lambda _: b"", how="entropy")
    assert all(isinstance(a, predict.Unreadable) for _, a in answers) and len(answers) == 2
    assert predict.predict_images(model, [], lambda _: b"", how="margin") == []


def test_load_production_is_verified_and_names_its_version(tmp_path):
    reg = tmp_path / "registry"
    assert predict.load_production(reg, device=CPU) is None
    version = make_production(reg, tmp_path, seed=1)
    model = predict.load_production(reg, device=CPU)
    assert (model.version, model.arch, model.classes, model.spec) == (
        version, "smallcnn", tuple("0123456789"), inputspec.InputSpec.legacy_gray(28))
    sha = registry.production(reg).sha256
    blob = registry.blob_path(reg, sha)
    file = predict.load_file(blob, device=CPU)
    assert file.version is None and file.classes == model.classes
    blob.chmod(0o644)
    blob.write_bytes(blob.read_bytes()[:-1] + b"\0")  # one byte changed after it was recorded
    assert sha256_file(blob) != sha
    with pytest.raises(registry.RegistryError, match="does not match"):
        predict.load_production(reg, device=CPU)


# -- the commands that run production through predict --------------------------------------------

EVAL_N = 30


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    """params.yaml, a frozen eval set of 30 digit scans, an (untrained) production model; no
    Label Studio configured, so a reviewer command's sync is left pending."""
    for name in ("LABEL_STUDIO_URL", "LABEL_STUDIO_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect"))  # cli.main fills it in
    layout = Layout(tmp_path / "ws")
    layout.root.mkdir()
    write_params(layout.params, **{"train.device": "cpu"})
    params = settings.load(layout.params)
    factories.write_store(layout.raw, [
        (factories.ls_task(i, str(factories.digit_label(i)), url=factories.task_url(f"{i}.png"),
                           ground_truth=True), factories.digit_png(i)) for i in range(EVAL_N)])
    evalset.freeze(rawstore.load(layout.raw), layout.eval, params=params)
    return layout, make_production(layout.registry, tmp_path, seed=1), params


def _production_probs(layout: Layout, blobs: list[bytes]) -> tuple[np.ndarray, tuple[str, ...]]:
    """Production's probabilities computed without pipelines.predict, to check it against."""
    loaded, _ = registry.load_production(layout.registry, device=CPU)
    return (net.predict_proba(loaded.module, inputspec.stack(blobs, loaded.spec), device=CPU),
            loaded.classes)


def test_cli_predict_prints_label_probability_and_version(workspace, tmp_path, capsys):
    layout, version, _ = workspace
    good = []
    for i in (40, 41, 42):
        good.append(tmp_path / f"{i}.png")
        good[-1].write_bytes(factories.digit_png(i))
    junk, missing = tmp_path / "junk.png", tmp_path / "missing.png"
    junk.write_bytes(b"not an image")
    args = [str(good[0]), str(junk), str(good[1]), str(missing), str(good[2])]
    assert cli.main(["--root", str(layout.root), "predict", *args]) == 1
    captured = capsys.readouterr()
    rows = [line.split("\t") for line in captured.out.splitlines()]
    probs, classes = _production_probs(layout, [p.read_bytes() for p in good])
    assert [r[0] for r in rows] == [str(p) for p in good]
    assert [r[1] for r in rows] == [classes[i] for i in probs.argmax(1)]
    assert [float(r[2]) for r in rows] == pytest.approx(probs.max(1).tolist(), abs=1e-4)
    assert {r[3] for r in rows} == {f"({version})"}
    assert f"{junk}: cannot read" in captured.err and f"{missing}: cannot read" in captured.err
    assert cli.main(["--root", str(layout.root), "predict", str(good[0])]) == 0


def test_evalset_rebaseline_judges_production_on_the_eval_set(workspace, capsys):
    layout, version, params = workspace
    ev = evalset.load(layout.eval, params=params)
    blobs = evalset.image_bytes(layout.eval)
    probs, _ = _production_probs(layout, [blobs[sha] for sha in ev.shas])
    accuracy = float((probs.argmax(1) == ev.y).mean())
    assert cli.main(["--root", str(layout.root), "evalset", "rebaseline", "--reason",
                     "new eval set"]) == 0
    out = capsys.readouterr().out
    assert f"re-baselined {version} on eval set {ev.hash[:12]}" in out
    assert f"accuracy {accuracy:.4f} on {EVAL_N} images" in out
    assert "Label Studio sync pending" in out
    pointer = registry.production(layout.registry)
    assert pointer.eval_hash == ev.hash
    assert pointer.metrics["eval_accuracy"] == pytest.approx(accuracy)


def test_a_registry_holding_a_seed_model_file_still_serves_it(tmp_path):
    """Registries written before format 2 hold format-1 files (arch convnet-32-64-128): the
    production one loads verified, with the legacy gray input, and predicts."""
    from tests.test_net import legacy_file
    path = tmp_path / "old.safetensors"
    legacy_file(path)
    reg = tmp_path / "registry"
    sha, _ = registry.store(reg, path)
    record = {"id": f"m0001-{sha[:10]}", "sha256": sha, "eval_hash": "e" * 64,
              "dataset_version": "d", "metrics": {}}
    registry.make_production(reg, record, via="gate", previous=None)
    model = predict.load_production(reg, device=CPU)
    assert model.arch == "convnet-32-64-128"
    assert model.spec == inputspec.InputSpec.legacy_gray(28)
    blobs = [factories.digit_png(i) for i in range(3)]
    answers = predict.predict_images(model, range(3), blobs.__getitem__, how="margin")
    probs = net.predict_proba(model.module, inputspec.stack(blobs, model.spec), device=CPU)
    assert [a.label for _, a in answers] == [model.classes[i] for i in probs.argmax(1)]


def test_big_inputs_are_predicted_in_smaller_batches(model, monkeypatch):
    photo = inputspec.InputSpec(3, 224, 224, "crop", (0, 0, 0), (1.0,) * 3, (1.0,) * 3)
    assert predict.batch_for(photo) == predict.PIXELS_PER_BATCH // (224 * 224 * 3) == 55
    assert predict.batch_for(SPEC) == predict.BATCH
    assert predict.batch_for(photo, 10) == 10
    # predict_images holds one batch of decoded images at a time, and answers in order
    monkeypatch.setattr(predict, "PIXELS_PER_BATCH", 16 * 12 * 3 * 2)  # 2 images a batch
    sizes = []
    real = predict.probabilities
    monkeypatch.setattr(predict, "probabilities",
                        lambda m, x, **kw: sizes.append(len(x)) or real(m, x, **kw))
    blobs = [png(i) for i in range(5)]
    blobs[2] = b"junk"
    answers = predict.predict_images(model, range(5), blobs.__getitem__, how="margin")
    assert sizes == [2, 1, 1]  # batches of 2 sources; the junk one is not predicted
    assert [type(a).__name__ for _, a in answers] == ["Prediction"] * 2 + ["Unreadable"] + [
        "Prediction"] * 2
    assert [s for s, _ in answers] == list(range(5))
