"""Mini vision backbone: fractals, the IDX reader, a tiny reproducible pretraining run, the bundled asset."""
import gzip
import json
import time

import numpy as np
import pytest
import torch

from engine.core.errors import UserError
from engine.data import fashion_mnist, fractals, textures
from engine.models import sources
from engine.pretrain import mini_resnet
from engine.vision import network, preprocess


def write_idx(path, arr: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


@pytest.fixture
def fake_fmnist(tmp_path):
    rng = np.random.default_rng(0)
    d = tmp_path / "fmnist"
    d.mkdir()
    for prefix, n in (("train", 64), ("t10k", 20)):
        y = np.arange(n) % 10
        x = rng.integers(0, 40, size=(n, 28, 28))
        for i, c in enumerate(y):  # a bright bar whose position is the class
            x[i, 2 * c + 4: 2 * c + 7, 4:24] = 250
        write_idx(d / f"{prefix}-images-idx3-ubyte.gz", x)
        write_idx(d / f"{prefix}-labels-idx1-ubyte.gz", y)
    return d


def test_fractal_systems_and_renders_are_deterministic():
    a, b = fractals.make_systems(4, seed=3), fractals.make_systems(4, seed=3)
    assert all(np.array_equal(x["A"], y["A"]) and np.array_equal(x["p"], y["p"]) for x, y in zip(a, b))
    c = fractals.make_systems(4, seed=4)
    assert not np.array_equal(a[0]["A"], c[0]["A"])
    for s in a:  # contractive maps, probabilities summing to one
        n = s["n"]
        assert 2 <= n <= fractals.MAX_MAPS and abs(s["p"].sum() - 1) < 1e-9
        assert all(np.linalg.svd(s["A"][i], compute_uv=False).max() < 1 for i in range(n))
    x1, y1 = fractals.fractal_batch(a, 6, 32, np.random.default_rng(1))
    x2, y2 = fractals.fractal_batch(a, 6, 32, np.random.default_rng(1))
    assert x1.shape == (6, 32, 32, 3) and x1.dtype == np.uint8
    assert np.array_equal(x1, x2) and np.array_equal(y1, y2)
    assert x1.std() > 10  # not blank


def test_shapes_dataset(tmp_path):
    d = fractals.write_shapes_dataset(tmp_path / "s", n_per_class=3, size=40, seed=1)
    assert sorted(p.name for p in d.iterdir()) == ["circle", "square", "triangle"]
    assert len(list((d / "circle").glob("*.png"))) == 3


def test_idx_reader_and_missing_dataset(fake_fmnist, tmp_path):
    x, y = fashion_mnist.load_fashion_mnist("train", fake_fmnist)
    assert x.shape == (64, 28, 28) and y.shape == (64,) and y[:3].tolist() == [0, 1, 2]
    with pytest.raises(UserError, match="apt-get install dataset-fashion-mnist"):
        fashion_mnist.load_fashion_mnist("train", tmp_path / "nowhere")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(b"\x00\x00\x08\x03" + (99).to_bytes(4, "big") * 3))
    (bad / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(b"\x00\x00\x08\x01" + (1).to_bytes(4, "big") + b"\x00"))
    with pytest.raises(UserError, match="header"):
        fashion_mnist.load_fashion_mnist("train", bad)


def test_tiny_pretraining_is_reproducible_and_loadable(fake_fmnist, tmp_path):
    def go(name):
        cfg = mini_resnet.VisionPretrainConfig(steps=3, seed=0, image_size=32, batch_size=8, out=str(tmp_path / name),
                                            probe=False, fmnist_dir=str(fake_fmnist), eval_fractals=16, stats_sample=32)
        return mini_resnet.pretrain_vision(cfg)

    card = go("a")
    go("b")
    a = network.safe_load_state(tmp_path / "a" / "model.safetensors")
    b = network.safe_load_state(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # same seed, same bytes
    assert a["conv1.weight"].dtype == torch.float16 and a["fc.weight"].shape == (10 + mini_resnet.N_FRACTAL_CLASSES + mini_resnet.N_TEXTURES + mini_resnet.HUE_BINS, 512)
    assert card["steps"] == 3 and card["seed"] == 0 and "--steps 3 --seed 0" in card["command"]
    assert card["preprocessing"]["image_size"] == 32 and len(card["preprocessing"]["mean"]) == 3
    assert 0 <= card["test_accuracy"]["fashion_mnist_test"] <= 1
    assert json.loads((tmp_path / "a" / "model_card.json").read_text()) == card
    # usable as starting weights: the preprocessing comes from its card
    src = sources.Source("mini", "mini", "test", tmp_path / "a" / "model.safetensors")
    model = network.build_model("resnet18", 3, src)
    assert torch.equal(model.conv1.weight.data, a["conv1.weight"].float())
    pp = preprocess.preprocessing_for(src, None)
    assert pp.image_size == 32 and pp.mean == card["preprocessing"]["mean"]


def test_interrupted_pretraining_resumes_to_the_same_weights(fake_fmnist, tmp_path):
    def go(name, resume=False):
        cfg = mini_resnet.VisionPretrainConfig(steps=4, seed=0, image_size=32, batch_size=9, out=str(tmp_path / name), probe=False,
                                               fmnist_dir=str(fake_fmnist), eval_fractals=16, stats_sample=32,
                                               checkpoint_every=2, state_dir=str(tmp_path / "state"))
        return mini_resnet.pretrain_vision(cfg, resume=resume)

    with pytest.raises(UserError, match="nothing to resume"):
        go("x", resume=True)
    whole = go("whole")  # leaves its training state at step 2, as a run stopped after step 2 would
    assert json.loads((tmp_path / "state" / "state.json").read_text())["step"] == 2
    resumed = go("resumed", resume=True)
    a = network.safe_load_state(tmp_path / "whole" / "model.safetensors")
    b = network.safe_load_state(tmp_path / "resumed" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)  # steps 3-4 saw the same batches from the same state
    assert resumed["final_train_loss"] == whole["final_train_loss"] and resumed["images_seen"] == 4 * 9


def test_texture_families_are_deterministic_and_distinct():
    x1, y1, h1 = textures.texture_batch(64, 32, np.random.default_rng(5), 8)
    x2, y2, h2 = textures.texture_batch(64, 32, np.random.default_rng(5), 8)
    assert x1.shape == (64, 32, 32, 3) and x1.dtype == np.uint8 and np.array_equal(x1, x2) and np.array_equal(y1, y2)
    assert set(y1.tolist()) == set(range(len(textures.FAMILIES))) and h1.max() < 8
    # the families differ in their spectra: mean high-frequency energy per family is not all the same
    gray = x1.mean(-1)
    hf = np.abs(np.diff(gray, axis=2)).mean(axis=(1, 2))
    per_family = [hf[y1 == f].mean() for f in range(len(textures.FAMILIES))]
    assert max(per_family) > 3 * min(per_family)


def test_cli_pretrain_bad_options(capsys):
    from engine.__main__ import main

    assert main(["pretrain", "vision", "--steps", "0"]) == 2
    assert "error: --steps must be >= 1" in capsys.readouterr().err
    assert main(["pretrain", "vision", "--minutes", "-1"]) == 2
    assert "error: --minutes" in capsys.readouterr().err


@pytest.mark.skipif(not sources.mini_vision_available(), reason="bundled mini backbone not built yet")
def test_bundled_mini_backbone_loads_fast_and_has_a_card():
    t = time.time()
    src = sources.resolve_vision("resnet18", "mini")
    model = network.build_model("resnet18", 5, src)
    assert time.time() - t < 5  # about a second on an idle machine; generous for a busy one
    card = json.loads((sources.MINI_VISION / "model_card.json").read_text())
    for key in ("data", "classes", "steps", "seed", "preprocessing", "test_accuracy", "command", "transfer"):
        assert key in card, key
    assert card["test_accuracy"]["fashion_mnist_test"] > 0.7
    assert (sources.MINI_VISION / "model.safetensors").stat().st_size < 25 * 2**20
    assert model.fc.out_features == 5
