"""The frozen-feature extractor: the fastest engine by measurement, remembered, equal to PyTorch."""
import json
from pathlib import Path

import pytest
import torch

from engine.core import workspace
from engine.models import sources
from engine.vision import feature_cache, finetune, network, preprocess

CPU = torch.device("cpu")


@pytest.fixture
def model():
    return network.build_model("resnet18", 3, sources.Source("none", "random init", ""), seed=0).eval()


def images(n=20, size=40):
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("k", [5, 3])
def test_onnxruntime_features_equal_torch_within_1e4(model, monkeypatch, k):
    pp = preprocess.Preprocessing(32, 40, preprocess.IMAGENET_MEAN, preprocess.IMAGENET_STD)
    monkeypatch.setenv("TRANSFER_STUDIO_EXTRACTOR", "torch")
    torch_ex = feature_cache.extractor(model, k, pp, CPU, "resnet18")
    monkeypatch.setenv("TRANSFER_STUDIO_EXTRACTOR", "onnxruntime")
    ort_ex = feature_cache.extractor(model, k, pp, CPU, "resnet18")
    assert (torch_ex.name, ort_ex.name) == ("torch fp32", "onnxruntime fp32")
    a = feature_cache.extract(torch_ex.run, images(), pp, CPU, torch_ex.dtype)
    b = feature_cache.extract(ort_ex.run, images(), pp, CPU, ort_ex.dtype)
    assert a.shape == b.shape and a.dtype == b.dtype == torch.float32
    assert (a - b).abs().max() < 1e-4
    with torch.no_grad():  # and both equal the network's own forward (BatchNorm folding changes nothing)
        ref = network.forward_until(model, preprocess.normalize(preprocess.center_crop(images(), 32), pp), k)
    assert (a - ref).abs().max() < 1e-4


def test_the_choice_is_measured_once_and_remembered(model, monkeypatch):
    pp = preprocess.Preprocessing(32, 40, preprocess.IMAGENET_MEAN, preprocess.IMAGENET_STD)
    timed = []
    real = feature_cache._rate
    monkeypatch.setattr(feature_cache, "_rate", lambda *a, **kw: timed.append(1) or real(*a, **kw))
    first = feature_cache.extractor(model, 5, pp, CPU, "resnet18")
    n = len(timed)
    assert n >= 2  # torch and onnxruntime were both timed
    memo = json.loads((workspace.subdir("cache") / "extractor.json").read_text())
    (entry,) = memo.values()
    assert first.name == max(entry["img_s"], key=entry["img_s"].get) and "img/s" in first.why
    again = feature_cache.extractor(model, 5, pp, CPU, "resnet18")
    assert len(timed) == n and again.name == first.name  # remembered: nothing timed again
    feature_cache.extractor(model, 5, preprocess.Preprocessing(24, 30, pp.mean, pp.std), CPU, "resnet18")
    assert len(timed) > n  # another image size is another measurement


def test_a_cache_hit_builds_no_extractor(tmp_path, monkeypatch):
    """The second linear run reads its features from disk without exporting or timing anything."""
    from tests.helpers import cfg_for, make_dataset

    data = str(make_dataset(tmp_path / "d"))
    finetune.finetune(cfg_for(data), tmp_path / "a")
    monkeypatch.setattr(feature_cache, "onnx_runner", lambda *a: pytest.fail("built an extractor on a cache hit"))
    monkeypatch.setattr(feature_cache, "frozen_prefix", lambda *a: pytest.fail("built an extractor on a cache hit"))
    finetune.finetune(cfg_for(data, lr=5e-3), tmp_path / "b")


def test_unknown_forced_extractor_is_refused(model, monkeypatch):
    monkeypatch.setenv("TRANSFER_STUDIO_EXTRACTOR", "tensorrt")
    with pytest.raises(ValueError, match="choose torch or onnxruntime"):
        feature_cache.extractor(model, 5, preprocess.Preprocessing(32, 40, [0.5] * 3, [0.25] * 3), CPU, "resnet18")


def test_the_onnx_graph_is_exported_once_per_backbone(tmp_path, monkeypatch):
    """A linear run on new images of the same backbone reuses the exported graph (no second export);
    a damaged graph file is exported again."""
    from tests.helpers import cfg_for, make_dataset

    monkeypatch.setenv("TRANSFER_STUDIO_EXTRACTOR", "onnxruntime")
    exports = []
    real = feature_cache.to_onnx
    monkeypatch.setattr(feature_cache, "to_onnx", lambda *a, **kw: exports.append(1) or real(*a, **kw))
    finetune.finetune(cfg_for(str(make_dataset(tmp_path / "d1", seed=1))), tmp_path / "a")
    assert len(exports) == 1
    (graph,) = (workspace.subdir("cache") / "onnx").glob("*.onnx")
    finetune.finetune(cfg_for(str(make_dataset(tmp_path / "d2", seed=2))), tmp_path / "b")
    assert len(exports) == 1, "new images of the same backbone: the graph comes from the cache"
    graph.write_bytes(b"not an onnx graph")
    finetune.finetune(cfg_for(str(make_dataset(tmp_path / "d3", seed=3))), tmp_path / "c")
    assert len(exports) == 2 and graph.read_bytes() != b"not an onnx graph"


def test_extraction_starts_while_the_images_still_decode(tmp_path, model, monkeypatch):
    """ImageLoading: a batch waits only for its own images; the features equal those of a finished load."""
    import threading

    from PIL import Image

    from tests.imgs import class_folder

    paths = sorted(class_folder(tmp_path, n=20).rglob("*.png"))
    gate = threading.Event()
    real = preprocess.load_square

    def held_back(im, resize):  # the last images decode only when the gate opens
        if Path(im.filename).name.endswith(("18.png", "19.png")):
            assert gate.wait(10)
        return real(im, resize)

    monkeypatch.setattr(preprocess, "load_square", held_back)
    pp = preprocess.Preprocessing(32, 40, preprocess.IMAGENET_MEAN, preprocess.IMAGENET_STD)
    loading = preprocess.ImageLoading(paths, pp.resize)
    assert len(loading) == 40
    first = feature_cache.extract(model, loading[:8], pp, CPU, None)  # returns with images 18, 19 of each class held back
    assert loading.ready < 40
    gate.set()
    monkeypatch.setattr(preprocess, "load_square", real)
    everything = preprocess.load_images(paths, pp.resize)
    assert torch.equal(loading.tensor(), everything)
    torch.testing.assert_close(first, feature_cache.extract(model, everything[:8], pp, CPU, None))
    with Image.open(paths[0]) as im:
        assert torch.equal(everything[0], real(im, pp.resize))


def test_an_image_that_fails_to_decode_is_an_error_when_read(tmp_path):
    from tests.imgs import class_folder

    paths = sorted(class_folder(tmp_path, n=3).rglob("*.png"))
    paths[4].write_bytes(b"not an image")
    loading = preprocess.ImageLoading(paths, 40)
    with pytest.raises(Exception, match="cannot identify|not an image|image file"):
        loading.tensor()
