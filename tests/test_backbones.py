"""The backbone registry: every family's layout is one entry, and every entry works everywhere.

The three non-ResNet families are the proof that adding a family touches the registry alone: each
trains with every strategy, uses the feature cache, exports (safetensors + ONNX) and imports back.
"""
import json
import re
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from engine.core import workspace
from engine.core.errors import UserError
from engine.models import backbones, sources
from engine.vision import export, feature_cache, finetune, inference, network, preprocess
from tests.helpers import ROOT, cfg_for, make_dataset

NEW_FAMILIES = ["mobilenet_v3_large", "efficientnet_b0", "convnext_tiny"]
RANDOM = sources.Source("none", "random init", "")


@pytest.mark.parametrize("arch", backbones.NAMES)
def test_stages_pool_and_head_cover_the_whole_network_once(arch):
    """Every tensor of the model belongs to exactly one stage, the pool or the head; and the stages,
    run in order, compute the model's own forward for every cut k."""
    model = network.build_model(arch, 3, RANDOM, seed=0).eval()
    keys = set(model.state_dict())
    head = {k for k in keys if k.startswith(backbones.head_prefix(arch))}
    assert head == {backbones.get(arch).head + ".weight", backbones.get(arch).head + ".bias"}
    b = backbones.get(arch)

    def owned(names):
        return {k for k in keys if k.startswith(tuple(f"{n}." for n in names if n != backbones.FLATTEN))}

    parts = [owned(st) for st in b.stages] + [owned(b.pool), head]
    assert all(parts[:5]), "every stage holds tensors"
    assert sum(map(len, parts)) == len(keys) and set().union(*parts) == keys
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want = model(x)
        for k in range(6):
            got = network.forward_from(model, network.forward_until(model, x, k), k)
            assert torch.allclose(got, want, atol=1e-5), k


@pytest.mark.parametrize("arch", backbones.NAMES)
def test_freezing_k_stages_trains_exactly_what_is_saved_and_optimised(arch):
    model = network.build_model(arch, 3, RANDOM, seed=0)
    counts = []
    for k in range(6):
        network.set_trainable(model, k)
        trainable = {id(p) for p in model.parameters() if p.requires_grad}
        for rates in (("one", "backbone/10") if k == 0 else ("one",)):
            assert {id(p) for g in network.param_groups(model, 1e-3, k, rates) for p in g["params"]} == trainable
        saved = network.trainable_state(model, k)
        named = dict(model.named_parameters())
        assert {id(named[n]) for n in saved if n in named} == trainable
        counts.append(len(trainable))
    assert counts == sorted(counts, reverse=True) and counts[-1] == 2  # k=5: the new head alone


def test_unknown_family_is_a_clear_error():
    with pytest.raises(Exception, match="unknown model 'vgg11'; choose one of resnet18"):
        sources.resolve_vision("vgg11", "none")


def test_state_dict_names_identify_the_family():
    for arch in backbones.NAMES:
        with torch.device("meta"):
            keys = set(backbones.construct(arch).state_dict())
        assert backbones.infer(keys) == arch
    assert backbones.infer({"conv.weight"}) is None


def test_no_module_but_the_registry_knows_a_family_layout():
    """Adding a family touches the registry alone: no other engine module names a layer of one."""
    layout = re.compile(r"\.fc\b|\"fc\.|\.layer[1-4]\b|\.conv1\b|\.bn1\b|\.avgpool\b|\.classifier\b|\.features\[")
    offenders = []
    for path in sorted((ROOT / "engine").glob("*.py")):
        if path.name in ("backbones.py", "autoencoder.py"):  # autoencoder: its own small network, not a backbone
            continue
        for i, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#")[0]
            if layout.search(code) and '"""' not in code:
                offenders.append(f"{path.name}:{i}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data") / "shapes", n=6)


@pytest.mark.slow
@pytest.mark.parametrize("arch", NEW_FAMILIES)
def test_new_family_every_strategy_cache_export_and_import(arch, shapes, tmp_path):
    import onnxruntime as ort

    common = dict(model=arch, epochs=1, batch_size=6, image_size=32)
    for strategy, extra in [("linear", {}), ("partial", {"freeze": 2}), ("full", {"optimizer": "adamw", "lr": 1e-3}),
                            ("two-phase", {"epochs": 2, "optimizer": "adamw", "lr": 1e-3}), ("scratch", {"optimizer": "adamw"})]:
        summary = finetune.finetune(cfg_for(str(shapes), strategy=strategy, **(common | extra)), tmp_path / strategy)
        assert summary["epochs_done"] >= 1 and 0 <= summary["best_val_acc"] <= 1, strategy

    # the feature cache: a second linear run reads the features the first one stored
    cached = sorted(p.name for p in (workspace.subdir("cache/features")).glob("*.safetensors"))
    assert cached
    finetune.finetune(cfg_for(str(shapes), strategy="linear", seed=0, **common), tmp_path / "linear-again")
    assert sorted(p.name for p in workspace.subdir("cache/features").glob("*.safetensors")) == cached
    a = json.loads((tmp_path / "linear" / "metrics.json").read_text())
    b = json.loads((tmp_path / "linear-again" / "metrics.json").read_text())
    assert [m["val_acc"] for m in a] == [m["val_acc"] for m in b]

    # export: safetensors + ONNX, equal to PyTorch on real images; the ZIP imports back and predicts the same
    run_dir = tmp_path / "full"
    zpath = export.export_run(run_dir, tmp_path / "model.zip", onnx=True)
    loaded = inference.load_model(run_dir)
    images = [Image.open(p).convert("RGB") for p in sorted(Path(shapes).glob("class_*/img_*.png"))[::4]]
    pp = loaded.preprocessing
    crops = torch.stack([preprocess.center_crop(preprocess.load_square(im, pp.resize), pp.image_size) for im in images])
    with torch.inference_mode():
        want = loaded.model(preprocess.normalize(crops, pp).contiguous()).numpy()
    with zipfile.ZipFile(zpath) as z:
        sess = ort.InferenceSession(z.read("model.onnx"), providers=["CPUExecutionProvider"])
        assert backbones.get(arch).head in z.read("model_card.md").decode()
    assert np.abs(sess.run(["logits"], {"image": crops.permute(0, 2, 3, 1).numpy()})[0] - want).max() < 1e-4
    imported = inference.load_model(export.import_model(zpath))
    assert imported.arch == arch and imported.classes == loaded.classes
    got = inference.predict(imported, images)
    assert [r[0][0] for r in got] == [r[0][0] for r in inference.predict(loaded, images)]


def test_a_checkpoint_of_another_family_is_refused(tmp_path):
    """mobilenet weights offered as an efficientnet: a clear message naming the mismatch."""
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in backbones.construct("mobilenet_v3_large").state_dict().items()}
    path = tmp_path / "mobilenet.safetensors"
    save_file(state, str(path))
    with pytest.raises(UserError, match="does not fit this architecture"):
        network.build_model("efficientnet_b0", 3, sources.resolve_vision("efficientnet_b0", str(path)))
    model = network.build_model("mobilenet_v3_large", 3, sources.resolve_vision("mobilenet_v3_large", str(path)))
    assert torch.equal(model.features[0][0].weight, state["features.0.0.weight"])


def test_feature_prefix_folds_batchnorm_without_changing_the_function():
    for arch in ("resnet18", "efficientnet_b0"):
        model = network.build_model(arch, 3, RANDOM, seed=0).eval()
        for m in model.modules():  # non-trivial statistics, so a wrong fold would show
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 2.0)
        x = torch.randn(4, 3, 64, 64)
        prefix = feature_cache.frozen_prefix(model, 5, torch.device("cpu"))
        assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in prefix.modules())
        with torch.no_grad():
            assert torch.allclose(prefix(x.contiguous(memory_format=torch.channels_last)), network.forward_until(model, x, 5), atol=1e-4)


def test_auto_picks_cached_imagenet_weights_for_a_new_family(tmp_path, monkeypatch):
    """A state dict saved under torchvision's own file name is what `auto` finds and loads."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    path = sources.imagenet_file("efficientnet_b0")
    assert str(path).startswith(str(tmp_path)) and not sources.imagenet_cached("efficientnet_b0")
    assert sources.resolve_vision("efficientnet_b0", "auto").kind == "none"  # offline, nothing cached: random init
    torch.manual_seed(7)
    state = backbones.construct("efficientnet_b0").state_dict()
    path.parent.mkdir(parents=True)
    torch.save(state, path)
    source = sources.resolve_vision("efficientnet_b0", "auto")
    assert source.kind == "imagenet"
    model = network.build_model("efficientnet_b0", 4, source)
    assert torch.equal(model.features[0][0].weight, state["features.0.0.weight"])
    assert backbones.head(model).out_features == 4
