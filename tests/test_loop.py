"""The one training loop (engine/train/loop.py) and the optimizer factory (engine/train/optimizers.py): what every
trainer relies on, and that every image-classifier trainer really goes through it."""
from __future__ import annotations

import pytest
import torch

from engine.core.errors import UserError
from engine.lab import autoencoder, experiments
from engine.train import loop, optimizers
from engine.vision import finetune
from engine.vision.config import FinetuneConfig
from tests.helpers import make_folder


def _toy(seed=0, n=64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    y = (x[:, 0] + x[:, 1] > 0).long()  # linearly separable
    return x, y


def _base(opt):
    for gr in opt.param_groups:
        gr["base_lr"] = gr["lr"]
    return opt


def test_train_one_epoch_learns_and_sums_the_epoch():
    torch.manual_seed(0)
    x, y = _toy()
    model = torch.nn.Linear(4, 2)
    opt = _base(optimizers.make(model.parameters(), "sgd", lr=0.5))
    seen_steps = []
    first = None
    for epoch in range(15):
        batches = loop.epoch_batches(len(x), 16, loop.epoch_gen(0, epoch))
        stats = loop.train_one_epoch(model, opt, batches, lambda i: (x[i], y[i]), lambda s: 1.0, epoch=epoch,
                                     on_step=lambda step, steps, n, sec, st: seen_steps.append((step, steps, n)))
        first = first or stats
        assert stats.seen == len(x) and not stats.cancelled and stats.seconds >= 0
    assert seen_steps[:4] == [(0, 4, 16), (1, 4, 16), (2, 4, 16), (3, 4, 16)]
    assert stats.loss < first.loss and stats.acc >= 0.9
    loss, acc = loop.evaluate(model, x, y)
    assert acc >= 0.9 and loss == pytest.approx(torch.nn.functional.cross_entropy(model(x), y).item(), rel=1e-5)
    row = stats.row(15, loss, acc)
    assert list(row) == ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "seconds"]


def test_the_schedule_sets_every_group_from_its_own_base_rate():
    a, b = torch.nn.Linear(4, 2), torch.nn.Linear(2, 2)
    opt = _base(optimizers.make([{"params": a.parameters(), "lr": 1.0}, {"params": b.parameters(), "lr": 0.1}], "sgd"))
    x, y = _toy(n=8)
    rates = []
    loop.train_one_epoch(lambda t: b(a(t)), opt, [torch.arange(8)] * 3, lambda i: (x[i], y[i]), lambda s: [0.5, 0.25, 0.0][s],
                         on_step=lambda *_: rates.append([g["lr"] for g in opt.param_groups]))
    assert rates == [[0.5, 0.05], [0.25, 0.025], [0.0, 0.0]]


def test_cancel_stops_before_the_next_step_and_divergence_is_a_clear_error():
    x, y = _toy()
    model = torch.nn.Linear(4, 2)
    opt = _base(optimizers.make(model.parameters(), "sgd", lr=0.1))
    calls = []
    stats = loop.train_one_epoch(model, opt, [torch.arange(8)] * 5, lambda i: (x[i], y[i]), lambda s: 1.0,
                                 cancelled=lambda: len(calls) >= 2, on_step=lambda *a: calls.append(a))
    assert stats.cancelled and len(calls) == 2 and stats.seen == 16
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(UserError, match="diverged in epoch 3"):
        loop.train_one_epoch(model, opt, [torch.arange(8)], lambda i: (x[i] * float("nan"), y[i]), lambda s: 1.0, epoch=2)
    assert all(torch.equal(p, q) for p, q in zip(before, model.parameters()))  # no NaN step was taken


def test_batches_never_leave_a_single_example_alone():
    for n in range(2, 40):
        for bs in (2, 3, 8, 16):
            parts = loop.epoch_batches(n, bs, torch.Generator().manual_seed(n))
            assert sorted(torch.cat(parts).tolist()) == list(range(n)) and min(len(p) for p in parts) >= 2
    stream = loop.endless_batches(5, 64, torch.Generator().manual_seed(0))
    assert [len(next(stream)) for _ in range(3)] == [5, 5, 5]


def test_fused_adamw_is_the_same_update_as_the_per_tensor_loop():
    torch.manual_seed(0)
    a = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    b = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    b.load_state_dict(a.state_dict())
    fast = optimizers.make(a.parameters(), "adamw", 0.05, lr=1e-2)
    plain = torch.optim.AdamW(b.parameters(), lr=1e-2, weight_decay=0.05, foreach=False)
    assert fast.defaults["fused"] and not plain.defaults.get("fused")
    x, y = torch.randn(32, 8), torch.randint(0, 3, (32,))
    for _ in range(20):
        for m, o in ((a, fast), (b, plain)):
            o.zero_grad()
            torch.nn.functional.cross_entropy(m(x), y).backward()
            o.step()
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.allclose(p, q, atol=1e-5)
    with pytest.raises(ValueError, match="unknown optimizer"):
        optimizers.make(a.parameters(), "rmsprop")


def test_every_classifier_trainer_goes_through_the_one_loop(tmp_path, tiny_weights, monkeypatch):
    """Fine-tuning, a Lab arm and the autoencoder's classifier: each epoch is loop.train_one_epoch."""
    calls = []
    real = loop.train_one_epoch

    def counted(*args, **kwargs):
        calls.append(kwargs.get("epoch"))
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "train_one_epoch", counted)
    data = str(make_folder(tmp_path / "imgs"))
    finetune.finetune(FinetuneConfig(data=data, strategy="full", weights=tiny_weights, epochs=2, batch_size=8,
                                          image_size=32), tmp_path / "run")
    assert calls == [0, 1]
    calls.clear()
    split = experiments.load_split(data, tiny_weights, 32)
    experiments.train_arm(experiments.Arm("full", "one-lr", tiny_weights, frozen=0), split, epochs=2, batch_size=8, lr=0.01,
                  steps_per_epoch=2, dev=torch.device("cpu"))
    assert calls == [0, 1]
    calls.clear()
    model = autoencoder.Classifier(3, width=8)
    x = torch.randn(12, 3, 32, 32)
    y = torch.arange(12) % 3
    metrics, stopped = autoencoder.fit_classifier(model, x, y, x, y, epochs=2, steps_per_epoch=2, batch_size=4, lr=0.01, seed=0)
    assert calls == [0, 1] and not stopped and [m["epoch"] for m in metrics] == [0, 1, 2]


def test_step_clips_the_gradient_norm_before_the_update():
    """clip_norm (the language models' 1.0): the update is the clipped gradient's, not the raw one's."""
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.zeros(3, 4))
    x, y = torch.randn(8, 4) * 100, torch.randint(0, 3, (8,))
    opt = torch.optim.SGD([w], lr=1.0)
    loop.step(lambda v: v @ w.T, opt, x, y, clip_norm=0.5)
    assert float(w.detach().norm()) == pytest.approx(0.5, rel=1e-4)  # one SGD step at lr 1 moves w by the clipped gradient
    w2 = torch.nn.Parameter(torch.zeros(3, 4))
    loop.step(lambda v: v @ w2.T, torch.optim.SGD([w2], lr=1.0), x, y)
    assert float(w2.detach().norm()) > 5  # unclipped, the same batch moves it far more
