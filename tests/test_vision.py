"""Fine-tuning engine: strategies, LR groups, the feature cache, accuracy, resume, cancel, safe weights.

Everything is tiny: 32 px images, 3 classes x 8 generated images, resnet18 with random weights.
"""
import json
import math
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from engine import jobs
from engine.core import runs, workspace
from engine.core.errors import UserError
from engine.models import backbones, sources
from engine.vision import finetune, inference, network, preprocess, strategies
from engine.vision.config import FinetuneConfig
from tests.helpers import cfg_for, make_dataset


@pytest.fixture
def data(tmp_path):
    return str(make_dataset(tmp_path / "shapes"))


def fc_of(run_dir: Path) -> torch.Tensor:
    state = network.safe_load_state(run_dir / "model.safetensors")
    return torch.cat([state["fc.weight"].flatten(), state["fc.bias"]])


# ----------------------------------------------------------------------------- strategies and LR groups
def _expected_trainable(model, k):
    stages = backbones.stages(model)
    return sum(p.numel() for s in stages[k:] for p in s.parameters()) + sum(p.numel() for p in model.fc.parameters())


@pytest.mark.parametrize("strategy,freeze,epoch,k", [
    ("linear", 3, 0, 5), ("partial", 1, 0, 1), ("partial", 2, 0, 2), ("partial", 3, 0, 3), ("partial", 4, 0, 4),
    ("full", 3, 0, 0), ("scratch", 3, 0, 0), ("two-phase", 3, 0, 5), ("two-phase", 3, 1, 0),
])
def test_each_strategy_freezes_exactly_what_it_says(strategy, freeze, epoch, k):
    cfg = FinetuneConfig(data="x", strategy=strategy, freeze=freeze, weights="none")
    assert strategies.frozen_stages(cfg, epoch) == k
    model = network.build_model("resnet18", 3, sources.resolve_vision("resnet18", "none"))
    network.set_trainable(model, k)
    counts = network.count_params(model)
    assert counts["trainable"] == _expected_trainable(model, k)
    assert counts["total"] == 11_178_051  # resnet18 with a 3-class head
    if k == 5:
        assert counts["trainable"] == 512 * 3 + 3  # only the new head
    # every parameter of a frozen stage is frozen, every later one trains
    for i, st in enumerate(backbones.stages(model)):
        assert all(p.requires_grad == (i >= k) for p in st.parameters())
    # BatchNorm of frozen stages stays in eval mode during training
    network.train_mode(model, k)
    for i, st in enumerate(backbones.stages(model)):
        bns = [m for m in st.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        assert bns and all(m.training == (i >= k) for m in bns)


def test_lr_groups():
    model = network.build_model("resnet18", 3, sources.resolve_vision("resnet18", "none"))
    full = network.param_groups(model, 0.01, 0, strategies.phases(FinetuneConfig(data="x", strategy="full"))[0].rates)
    lrs = {g["name"]: g["lr"] for g in full}
    assert lrs["head"] == 0.01 and math.isclose(lrs["backbone"], 0.001)
    n_params = sum(len(g["params"]) for g in full)
    assert n_params == len(list(model.parameters()))
    # two-phase, phase 2: geometric from lr/200 (stem) to lr/2 (head), increasing with depth
    tp = network.param_groups(model, 0.01, 0, strategies.phases(FinetuneConfig(data="x", strategy="two-phase"))[1].rates)
    assert [g["name"] for g in tp] == ["stem", "layer1", "layer2", "layer3", "layer4", "head"]
    lr = [g["lr"] for g in tp]
    assert math.isclose(lr[-1], 0.005) and math.isclose(lr[0], 0.005 / 100)
    assert all(b > a for a, b in zip(lr, lr[1:]))
    assert all(math.isclose(lr[i + 1] / lr[i], lr[1] / lr[0]) for i in range(5))
    # partial: one group, exactly the trainable parameters
    network.set_trainable(model, 3)
    (g,) = network.param_groups(model, 0.01, 3)
    assert {id(p) for p in g["params"]} == {id(p) for p in model.parameters() if p.requires_grad}


def test_config_validation():
    good = FinetuneConfig(data="d")
    assert good.validate() is good
    for bad in [dict(strategy="nope"), dict(epochs=0), dict(lr=0), dict(lr=-1.0), dict(lr=float("nan")), dict(batch_size=1),
                dict(optimizer="rmsprop"), dict(schedule="step"), dict(image_size=8), dict(augment=["blur"]),
                dict(strategy="partial", freeze=5), dict(strategy="partial", freeze=0), dict(strategy="two-phase", epochs=1),
                dict(strategy="scratch", weights="mini"), dict(early_stopping=-1), dict(model="vgg16"), dict(val_fraction=0.9)]:
        with pytest.raises(UserError):
            FinetuneConfig(**{"data": "d", **bad}).validate()


# ----------------------------------------------------------------------------- training
def test_run_folder_files_and_metrics(data, tmp_path):
    out = tmp_path / "run"
    summary = finetune.finetune(cfg_for(data, epochs=2), out)
    info = json.loads((out / "run.json").read_text())
    assert info["classes"] == ["class_0", "class_1", "class_2"]
    assert info["weights"]["kind"] == "none" and info["weights"]["reason"]
    assert info["preprocessing"]["image_size"] == 32 and len(info["preprocessing"]["mean"]) == 3
    assert info["strategy"]["params"]["frozen_5"]["trainable"] == 512 * 3 + 3
    assert info["feature_cache"]["used"] is True
    metrics = json.loads((out / "metrics.json").read_text())
    assert [m["epoch"] for m in metrics] == [1, 2]
    assert {"epoch", "train_loss", "val_loss", "val_acc", "train_acc", "seconds", "img_s"} <= set(metrics[0])
    ev = json.loads((out / "eval.json").read_text())
    assert np.array(ev["confusion"]).sum() == info["data"]["val_images"] == 6
    assert [c["class"] for c in ev["per_class"]] == info["classes"]
    confs = [m["conf"] for m in ev["mistakes"]]
    assert confs == sorted(confs, reverse=True)
    assert all(Path(m["file"]).is_file() for m in ev["mistakes"])
    assert summary["epochs_done"] == 2 and 0 <= summary["best_val_acc"] <= 1
    assert summary["best_val_acc"] == max(m["val_acc"] for m in metrics)
    # the feature cache was written into the workspace
    assert list((Path(workspace.home()) / "cache" / "features").glob("*.safetensors"))


@pytest.mark.parametrize("strategy,freeze,epochs,tol", [("linear", 3, 3, 1e-4), ("partial", 4, 1, 5e-4)])
def test_cached_path_gives_the_same_head_as_uncached(data, tmp_path, strategy, freeze, epochs, tol, monkeypatch):
    # on CPUs with native bf16 (AVX512-BF16, AMX) the cache is filled in bf16 for speed, ~1e-2 off by
    # design; the equivalence of the two paths is checked with fp32 features
    from engine.vision import feature_cache

    monkeypatch.setattr(feature_cache, "extraction_dtype", lambda dev: None)
    # the cached features differ from a live forward by ~1e-6 (conv-BN folding); training with
    # BatchNorm in batch mode (partial) amplifies that a little per step, hence the looser tolerance
    a = finetune.finetune(cfg_for(data, strategy=strategy, freeze=freeze, epochs=epochs), tmp_path / "cached")
    b = finetune.finetune(cfg_for(data, strategy=strategy, freeze=freeze, epochs=epochs, cache=False), tmp_path / "plain")
    assert a["feature_cache"] and not b["feature_cache"]
    assert torch.allclose(fc_of(tmp_path / "cached"), fc_of(tmp_path / "plain"), atol=tol)
    ma = json.loads((tmp_path / "cached" / "metrics.json").read_text())
    mb = json.loads((tmp_path / "plain" / "metrics.json").read_text())
    assert [m["val_acc"] for m in ma] == [m["val_acc"] for m in mb]
    assert np.allclose([m["train_loss"] for m in ma], [m["train_loss"] for m in mb], atol=1e-4)


def test_tiny_dataset_reaches_high_accuracy(tmp_path):
    data = str(make_dataset(tmp_path / "d", n=16))
    s = finetune.finetune(cfg_for(data, epochs=30, optimizer="adamw", lr=1e-2, batch_size=8), tmp_path / "run")
    assert s["best_val_acc"] >= 0.9 and s["final_val_acc"] >= 0.9


def test_other_strategies_train_and_augment(data, tmp_path):
    # full with augmentation: no cache, every layer moves; two-phase: head first then all
    start = network.build_model("resnet18", 3, sources.resolve_vision("resnet18", "none"), seed=0).state_dict()
    s = finetune.finetune(cfg_for(data, strategy="full", augment=["flip", "crop", "color", "rotate"], epochs=1), tmp_path / "full")
    assert not s["feature_cache"]
    s = finetune.finetune(cfg_for(data, strategy="linear", augment=["flip"], epochs=1), tmp_path / "lin-aug")
    info = json.loads((tmp_path / "lin-aug" / "run.json").read_text())
    assert not s["feature_cache"] and "cache off" in info["feature_cache"]["reason"]
    after = network.safe_load_state(tmp_path / "full" / "model.safetensors")
    assert not torch.equal(after["conv1.weight"], start["conv1.weight"])
    s = finetune.finetune(cfg_for(data, strategy="two-phase", epochs=2, schedule="onecycle"), tmp_path / "tp")
    metrics = json.loads((tmp_path / "tp" / "metrics.json").read_text())
    assert [m["frozen_stages"] for m in metrics] == [5, 0] and [m["cached"] for m in metrics] == [True, False]
    after = network.safe_load_state(tmp_path / "tp" / "model.safetensors")
    if s["best_epoch"] == 2:
        assert not torch.equal(after["conv1.weight"], start["conv1.weight"])
    else:  # best after phase 1: the backbone is exactly the starting one
        assert torch.equal(after["conv1.weight"], start["conv1.weight"])


def test_seeded_runs_are_reproducible_on_cpu(data, tmp_path):
    cfg = cfg_for(data, strategy="full", augment=["flip", "crop"], epochs=1, batch_size=6)
    a = finetune.finetune(cfg, tmp_path / "a")
    b = finetune.finetune(cfg, tmp_path / "b")
    sa, sb = network.safe_load_state(tmp_path / "a" / "model.safetensors"), network.safe_load_state(tmp_path / "b" / "model.safetensors")
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert a["best_val_acc"] == b["best_val_acc"]
    finetune.finetune(FinetuneConfig(**{**cfg.__dict__, "seed": 1}), tmp_path / "c")
    assert not torch.equal(network.safe_load_state(tmp_path / "c" / "model.safetensors")["fc.weight"], sa["fc.weight"])


def test_partial_keeps_frozen_stages_identical(data, tmp_path):
    start = network.build_model("resnet18", 3, sources.resolve_vision("resnet18", "none"), seed=0).state_dict()
    finetune.finetune(cfg_for(data, strategy="partial", freeze=2, epochs=1, cache=False), tmp_path / "p")
    after = network.safe_load_state(tmp_path / "p" / "model.safetensors")
    for name in ("conv1.weight", "bn1.running_mean", "layer1.0.conv1.weight", "layer1.1.bn2.running_var"):
        assert torch.equal(after[name], start[name]), name  # frozen, BN stats untouched
    assert not torch.equal(after["layer2.0.conv1.weight"], start["layer2.0.conv1.weight"])


def test_early_stopping(data, tmp_path):
    # AdamW at lr 1 with a constant schedule makes the head jump around: the validation loss soon stops improving
    s = finetune.finetune(cfg_for(data, epochs=40, lr=1.0, optimizer="adamw", schedule="constant", early_stopping=1), tmp_path / "es")
    metrics = json.loads((tmp_path / "es" / "metrics.json").read_text())
    assert s["early_stopped"] and s["epochs_done"] == len(metrics) < 40


class StopAfter:
    """A JobContext stand-in that asks to cancel once `epochs` epochs are done."""

    def __init__(self, epochs, resume=False):
        self.epochs, self.resume, self.done = epochs, resume, 0

    def report(self, **p):
        self.done = p.get("epoch_done", self.done)

    def cancelled(self):
        return self.done >= self.epochs


@pytest.mark.parametrize("strategy,epochs,stop", [("linear", 4, 2), ("two-phase", 3, 1)])
def test_resume_continues_from_checkpoint(data, tmp_path, strategy, epochs, stop):
    # two-phase stops after its head-only phase: the resume must cross into phase 2 correctly
    cfg = cfg_for(data, strategy=strategy, epochs=epochs)
    straight = finetune.finetune(cfg, tmp_path / "straight")
    first = finetune.finetune(cfg, tmp_path / "resumed", StopAfter(stop))
    assert first["cancelled"] and first["epochs_done"] == stop
    assert json.loads((tmp_path / "resumed" / "last.json").read_text())["epoch"] == stop
    before = json.loads((tmp_path / "resumed" / "last.json").read_text())["seconds"]
    t0 = time.time()
    second = finetune.finetune(cfg, tmp_path / "resumed", StopAfter(99, resume=True))
    assert second["epochs_done"] == epochs and not second["cancelled"]
    # the run's time is both sessions' (what Runs and the report show), not the second one's alone
    assert before < second["seconds"] <= before + (time.time() - t0) + 0.01
    metrics = json.loads((tmp_path / "resumed" / "metrics.json").read_text())
    assert [m["epoch"] for m in metrics] == list(range(1, epochs + 1))
    # seeded per-epoch batches + restored optimizer state: same result as never stopping
    ref = json.loads((tmp_path / "straight" / "metrics.json").read_text())
    assert np.allclose([m["train_loss"] for m in metrics], [m["train_loss"] for m in ref], atol=1e-4)
    assert torch.allclose(fc_of(tmp_path / "resumed"), fc_of(tmp_path / "straight"), atol=1e-4)
    assert second["best_val_acc"] == straight["best_val_acc"]


def test_resume_without_checkpoint_is_a_user_error(data, tmp_path):
    with pytest.raises(UserError, match="nothing to resume"):
        finetune.finetune(cfg_for(data), tmp_path / "empty", StopAfter(99, resume=True))


def test_cancel_through_jobs_keeps_what_was_learned(data):
    m = jobs.get_manager()
    config = {**cfg_for(data, strategy="full", epochs=500, batch_size=4).__dict__}
    run_id = m.submit("finetune", config, "cancel me", device="cpu")
    deadline = time.time() + 60
    while time.time() < deadline:
        p = m.progress(run_id) or {}
        if p.get("phase") == "training" and (p.get("epoch_done") or 0) >= 1:
            break
        time.sleep(0.02)
    m.cancel(run_id)
    assert m.wait(run_id, timeout=60) == "cancelled"
    d = runs.run_dir(run_id)
    assert (d / "model.safetensors").is_file() and (d / "eval.json").is_file() and (d / "last.json").is_file()
    metrics = json.loads((d / "metrics.json").read_text())
    assert 1 <= len(metrics) < 500
    # and it can be resumed from there through the manager
    assert json.loads((d / "last.json").read_text())["epoch"] == len(metrics)


def test_jobs_runner_rejects_unknown_options(data):
    m = jobs.get_manager()
    run_id = m.submit("finetune", {"data": data, "colour": "red"}, "bad", device="cpu")
    assert m.wait(run_id, timeout=30) == "failed"
    assert "unknown fine-tune option" in runs.get(run_id)["error"]


# ----------------------------------------------------------------------------- weights safety
def test_pickle_checkpoints_are_refused(data, tmp_path):
    model = network.build_model("resnet18", 3, sources.resolve_vision("resnet18", "none"))
    for name in ("weights.pt", "weights.pth"):
        torch.save(model.state_dict(), tmp_path / name)
        with pytest.raises(UserError, match="pickle"):
            finetune.finetune(cfg_for(data, weights=str(tmp_path / name)), tmp_path / "r")
        with pytest.raises(UserError, match="pickle"):
            network.safe_load_state(tmp_path / name)
    # a pickle renamed to .safetensors is caught by the header check, never unpickled
    torch.save(model.state_dict(), tmp_path / "disguised.safetensors")
    with pytest.raises(UserError, match="not a safetensors file"):
        finetune.finetune(cfg_for(data, weights=str(tmp_path / "disguised.safetensors")), tmp_path / "r2")


def test_safetensors_with_wrong_shapes_or_lying_header_refused(data, tmp_path):
    from safetensors.torch import save_file

    from engine.core.safetensors import check_safetensors_header

    state = {k: v.contiguous() for k, v in network.build_model("resnet18", 3, sources.resolve_vision("resnet18", "none")).state_dict().items()}
    bad = dict(state)
    bad["layer1.0.conv1.weight"] = torch.zeros(64, 64, 1, 1)
    save_file(bad, str(tmp_path / "shapes.safetensors"))
    with pytest.raises(UserError, match="shape"):
        finetune.finetune(cfg_for(data, weights=str(tmp_path / "shapes.safetensors")), tmp_path / "r")
    missing = {k: v for k, v in state.items() if not k.startswith("layer4.")}
    save_file(missing, str(tmp_path / "missing.safetensors"))
    with pytest.raises(UserError, match="does not fit"):
        finetune.finetune(cfg_for(data, weights=str(tmp_path / "missing.safetensors")), tmp_path / "r")
    # a good file (other head size) loads: fc is replaced anyway
    save_file(state, str(tmp_path / "good.safetensors"))
    s = finetune.finetune(cfg_for(data, weights=str(tmp_path / "good.safetensors"), epochs=1), tmp_path / "ok")
    assert s["weights"]["kind"] == "file"

    def write(header: dict, data_bytes: bytes, name: str) -> Path:
        h = json.dumps(header).encode()
        p = tmp_path / name
        p.write_bytes(len(h).to_bytes(8, "little") + h + data_bytes)
        return p

    cases = {
        "outside": ({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8),          # claims more than the file has
        "size": ({"w": {"dtype": "F32", "shape": [1000, 1000], "data_offsets": [0, 16]}}, b"\0" * 16),   # shape x dtype != bytes
        "overlap": ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                     "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}, b"\0" * 24),
        "dtype": ({"w": {"dtype": "OBJ", "shape": [1], "data_offsets": [0, 8]}}, b"\0" * 8),
        "negative": ({"w": {"dtype": "F32", "shape": [-4], "data_offsets": [0, 16]}}, b"\0" * 16),
    }
    for name, (header, payload) in cases.items():
        with pytest.raises(UserError):
            check_safetensors_header(write(header, payload, f"{name}.safetensors"))
    huge = tmp_path / "huge.safetensors"
    huge.write_bytes((2**40).to_bytes(8, "little") + b"{}")
    with pytest.raises(UserError, match="header length"):
        check_safetensors_header(huge)


def test_weights_choices_resolve_offline(monkeypatch):
    with pytest.raises(UserError, match="pickle"):
        sources.resolve_vision("resnet18", "model.pt")
    if not sources.imagenet_cached("resnet18"):
        with pytest.raises(UserError, match="not available offline"):
            sources.resolve_vision("resnet18", "imagenet")


# ----------------------------------------------------------------------------- predict
def test_load_model_and_predict(data, tmp_path):
    finetune.finetune(cfg_for(data, epochs=3, optimizer="adamw", lr=3e-2), tmp_path / "run")
    loaded = inference.load_model(tmp_path / "run")
    assert not loaded.model.training and loaded.classes == ["class_0", "class_1", "class_2"]
    imgs = [Image.open(p).convert("RGB") for p in sorted(Path(data).glob("class_*/img_0.png"))]
    imgs.append(imgs[0].resize((200, 90)))  # any size works: same resize + centre crop
    out = inference.predict(loaded, imgs, top_k=2)
    assert len(out) == 4 and all(len(o) == 2 for o in out)
    for o in out:
        assert o[0][1] >= o[1][1] and 0 <= o[1][1] and o[0][1] <= 1 and o[0][0] in loaded.classes
    assert inference.predict(loaded, imgs[:1], top_k=10)[0].__len__() == 3  # capped at the number of classes
    # predictions agree with eval.json's accuracy on the validation files
    ev = json.loads((tmp_path / "run" / "eval.json").read_text())
    for m in ev["mistakes"]:
        (label, conf), *_ = inference.predict(loaded, [Image.open(m["file"])], top_k=1)[0]
        assert label == m["pred"] and abs(conf - m["conf"]) < 1e-3
    with pytest.raises(UserError):
        inference.load_model(tmp_path / "nothing-here")


def test_loss_scaling_only_where_fp16_needs_it():
    from engine.core import device as devices

    cpu = torch.device("cpu")
    assert not devices.grad_scaler(cpu, None).is_enabled()
    assert not devices.grad_scaler(cpu, torch.bfloat16).is_enabled()  # bf16 has fp32's exponent range
    x = torch.arange(6).view(2, 3)
    assert devices.to_device(x, cpu) is x or torch.equal(devices.to_device(x, cpu), x)
    if torch.cuda.is_available():  # checked on a GPU machine; here the CPU path above
        cuda = torch.device("cuda")
        assert devices.grad_scaler(cuda, torch.float16).is_enabled() and not devices.grad_scaler(cuda, torch.bfloat16).is_enabled()
        assert devices.to_device(x, cuda).device.type == "cuda"


def test_scratch_sees_the_same_input_as_the_pretrained_run_it_is_compared_with():
    # random weights alone would mean ImageNet's 224 px: 12x the pixels of the bundled backbone's 64
    auto = preprocess.preprocessing_for(sources.resolve_vision("resnet18", "auto"), None)
    scratch = preprocess.run_preprocessing(FinetuneConfig(data="x", strategy="scratch"), sources.resolve_vision("resnet18", "none"))
    assert scratch == auto
    assert preprocess.run_preprocessing(FinetuneConfig(data="x", strategy="scratch", image_size=96),
                                    sources.resolve_vision("resnet18", "none")).image_size == 96  # an asked size still wins
