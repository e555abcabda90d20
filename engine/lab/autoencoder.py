"""Unsupervised pretraining, the seeds' way: learn features from images *without labels*, then
fine-tune them with a few labels.

    1. a small convolutional autoencoder learns to rebuild the training images (no labels used).
       It is a *denoising* one: the input has noise and a blanked patch, the target is the clean
       image, so copying pixels through is not enough; it has to learn what images look like.
    2. its encoder + a new output layer is fine-tuned on `labels_per_class` labelled images,
    3. against the very same encoder architecture from random weights, trained identically.

Small enough for a CPU demo: 32 px images, an encoder of ~0.2M parameters.
"""
from __future__ import annotations

import itertools
import logging
import math
import os
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from engine.core import workspace
from engine.data import demo_tasks, imagedata
from engine.train import loop, optimizers, schedules

log = logging.getLogger(__name__)

MEAN, STD = 0.5, 0.25  # inputs are scaled to [0, 1] then normalised with these
MIN_STEPS = 4           # fine-tuning updates per epoch, at least
# The encoder learns 10x slower than the new head, on both sides (the app's rule for pretrained layers).
# Measured on 4 grey clothing classes (Fashion-MNIST), 5 labels per class, 3 seeds, 8 epochs: with
# one learning rate for all, the autoencoder's start was lost within two epochs (55% vs 58% at the
# end); at encoder lr/10 and head lr 0.05 it was 51% vs 31% after 2 epochs and 63% vs 58% at the end.
ENCODER_LR = 0.1


def _conv(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def _up(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.ConvTranspose2d(cin, cout, 4, 2, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class Encoder(nn.Module):
    """32 px -> 16 -> 8 -> 4: feature maps (4w, s/8, s/8)."""

    def __init__(self, width: int = 32):
        super().__init__()
        w = width
        self.out_channels = 4 * w
        self.body = nn.Sequential(_conv(3, w, 1), _conv(w, 2 * w, 2), _conv(2 * w, 4 * w, 2), _conv(4 * w, 4 * w, 2))

    def forward(self, x):
        return self.body(x)


class AutoEncoder(nn.Module):
    def __init__(self, width: int = 32):
        super().__init__()
        self.encoder = Encoder(width)
        w = width
        self.decoder = nn.Sequential(_up(4 * w, 4 * w), _up(4 * w, 2 * w), _up(2 * w, w), nn.Conv2d(w, 3, 3, 1, 1))

    def forward(self, x):
        return torch.sigmoid(self.decoder(self.encoder(x)))  # an image in [0, 1]


class Classifier(nn.Module):
    """An encoder, global average pooling and a new output layer (like a ResNet's head)."""

    def __init__(self, n_classes: int, width: int = 32):
        super().__init__()
        self.encoder = Encoder(width)
        self.fc = nn.Linear(self.encoder.out_channels, n_classes)

    def forward(self, x):
        return self.fc(self.encoder(x).mean((2, 3)))


def transfer_encoder(ae: AutoEncoder, n_classes: int, seed: int) -> Classifier:
    """A classifier whose encoder starts from the autoencoder's (the decoder is dropped); new head."""
    torch.manual_seed(seed)
    clf = Classifier(n_classes, ae.encoder.body[0][0].out_channels)
    clf.encoder.load_state_dict(ae.encoder.state_dict())
    return clf


def _norm(x_uint8: torch.Tensor) -> torch.Tensor:
    return (x_uint8.float() / 255 - MEAN) / STD


def _augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random horizontal flip and a random shift of up to 2 px (pad by reflection, crop), per image."""
    n, _, h, w = x.shape
    flip = torch.rand(n, generator=g) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
    p = F.pad(x, (2, 2, 2, 2), mode="reflect")
    dy, dx = torch.randint(0, 5, (2,), generator=g).tolist()
    return p[:, :, dy:dy + h, dx:dx + w]


def _corrupt(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Denoising input: Gaussian noise, and a random quarter-size square blanked out per image."""
    n, _, h, w = x.shape
    x = x + 0.1 * torch.randn(x.shape, generator=g)
    s = h // 4
    ys, xs = torch.randint(0, h - s + 1, (n,), generator=g), torch.randint(0, w - s + 1, (n,), generator=g)
    for i in range(n):
        x[i, :, ys[i]:ys[i] + s, xs[i]:xs[i] + s] = 0.0
    return x


def pretrain(images01: torch.Tensor, epochs: int, batch_size: int = 32, lr: float = 2e-3, seed: int = 0,
             width: int = 32, should_stop=lambda: False, on_epoch=lambda e, loss: None) -> tuple[AutoEncoder, list[float]]:
    """Train a denoising autoencoder on unlabelled images in [0, 1] (N, 3, s, s). Returns (model, losses)."""
    torch.manual_seed(seed)
    ae = AutoEncoder(width)
    opt = optimizers.make(ae.parameters(), "adamw", 1e-4, lr=lr)
    g = torch.Generator().manual_seed(seed)
    n = len(images01)
    steps = max(1, math.ceil(n / batch_size))
    losses = []
    for epoch in range(epochs):
        ae.train()
        total = 0.0
        for idx in torch.randperm(n, generator=g).split(batch_size):
            if should_stop():
                return ae, losses
            if len(idx) < 2:
                continue
            for gr in opt.param_groups:  # cosine decay over all epochs
                gr["lr"] = lr * schedules.lr_factor(epoch, epochs, "cosine")
            clean = _augment(images01[idx], g)
            rec = ae((_corrupt(clean, g) - MEAN) / STD)
            loss = F.mse_loss(rec, clean)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item()
        losses.append(round(total / steps, 6))
        on_epoch(epoch + 1, losses[-1])
    return ae, losses


def save_reconstructions(ae: AutoEncoder, images01: torch.Tensor, path: Path, n: int = 8, scale: int = 3) -> None:
    """A PNG strip: top row originals, bottom row the autoencoder's reconstructions."""
    from PIL import Image

    ae.eval()
    x = images01[:n]
    with torch.inference_mode():
        rec = ae((x - MEAN) / STD)
    grid = torch.cat([torch.cat(list(x), 2), torch.cat(list(rec), 2)], 1)  # (3, 2s, n*s)
    arr = (grid.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    img = Image.fromarray(arr, "RGB")
    img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    tmp = workspace.atomic_path(path)
    img.save(tmp, "PNG")

    os.replace(tmp, path)


def fit_classifier(model: nn.Module, x_tr: torch.Tensor, y_tr: torch.Tensor, x_val: torch.Tensor, y_val: torch.Tensor,
                   epochs: int, steps_per_epoch: int, batch_size: int, lr: float, seed: int,
                   should_stop=lambda: False, on_epoch=lambda row: None, encoder_lr: float = ENCODER_LR) -> tuple[list[dict], bool]:
    """SGD (momentum 0.9, cosine) on normalised inputs, the encoder at `encoder_lr` x the head's
    learning rate; rows from epoch 0 (untrained). Returns (metrics, stopped)."""
    def evaluate():
        model.eval()
        return loop.evaluate(model, x_val, y_val)

    groups = [{"params": list(model.fc.parameters()), "lr": lr},
              {"params": list(model.encoder.parameters()), "lr": lr * encoder_lr}]
    opt = optimizers.make(groups, "sgd")
    vl, va = evaluate()
    metrics = [{"epoch": 0, "train_loss": None, "train_acc": None, "val_loss": round(vl, 5), "val_acc": round(va, 4), "seconds": 0.0}]
    on_epoch(metrics[0])
    g = torch.Generator().manual_seed(seed * 1009 + 17)
    stream = loop.endless_batches(len(y_tr), batch_size, g)
    total = epochs * steps_per_epoch
    for epoch in range(1, epochs + 1):
        model.train()
        stats = loop.train_one_epoch(model, opt, itertools.islice(stream, steps_per_epoch), lambda b: (_augment(x_tr[b], g), y_tr[b]),
                                     lambda step, e=epoch: schedules.lr_factor((e - 1) * steps_per_epoch + step, total, "cosine"),
                                     cancelled=should_stop, epoch=epoch - 1, steps=steps_per_epoch)
        if stats.cancelled:
            return metrics, True
        vl, va = evaluate()
        row = stats.row(epoch, vl, va)
        metrics.append(row)
        on_epoch(row)
    return metrics, False


def run_experiment(cfg, out_dir: Path, ctx, state: dict, dev) -> dict:
    """The `unsupervised` lab experiment (called by engine.lab.experiments.run_lab). Runs on the CPU: it is tiny."""
    from engine.lab import experiments  # deferred: imports torch
    from engine.vision import preprocess  # deferred: imports torch

    t0 = time.time()
    ctx.report(phase="loading", message="reading images")
    data = demo_tasks.ensure_dataset(cfg.data)
    td = imagedata.training_data(data, val_fraction=cfg.val_fraction, seed=0)
    size = cfg.image_size or 32
    train_x = preprocess.load_images([p for p, _ in td.train], size)
    train_y = torch.tensor([y for _, y in td.train])
    val_x = _norm(preprocess.load_images([p for p, _ in td.val], size))
    val_y = torch.tensor([y for _, y in td.val])
    n_classes = len(td.classes)
    state["data"] = {"name": cfg.data, "classes": td.classes, "train_images": len(train_y), "val_images": len(val_y),
                     "unlabelled_images": len(train_y), "labels_per_class": cfg.labels_per_class, "image_size": size}
    state["weights"] = {"kind": "autoencoder", "name": "denoising autoencoder (this experiment)", "reason": "pretrained here, without labels"}
    state["ae"] = {"loss": [], "epochs": cfg.ae_epochs}

    # 1. unsupervised pretraining on every training image, labels unused
    def on_ae_epoch(epoch, loss):
        state["ae"]["loss"].append(loss)
        experiments.write_result(out_dir, state)
        ctx.report(phase="pretraining", epoch=epoch, epochs=cfg.ae_epochs, loss=loss,
                   message=f"autoencoder (no labels) · epoch {epoch}/{cfg.ae_epochs} · reconstruction error {loss:.4f}")

    images01 = train_x.float() / 255
    ae, _ = pretrain(images01, cfg.ae_epochs, seed=0, should_stop=ctx.cancelled, on_epoch=on_ae_epoch)
    save_reconstructions(ae, val_x * STD + MEAN, out_dir / "reconstructions.png")
    state["ae"]["reconstructions"] = "reconstructions.png"
    state["ae"]["seconds"] = round(time.time() - t0, 2)

    # 2./3. fine-tune with few labels: the pretrained encoder vs the same encoder from scratch
    # an epoch = one pass over the labelled images, but at least MIN_STEPS updates (5 labels per class is one batch)
    labelled = len(experiments.subset_per_class(train_y, cfg.labels_per_class, 0))
    steps_per_epoch = max(MIN_STEPS, math.ceil(labelled / cfg.batch_size))
    state["steps_per_epoch"] = steps_per_epoch
    arms = []
    for s in range(cfg.seeds):
        arms.append(experiments.Arm("encoder pretrained without labels", "pretrained", "autoencoder", seed=s, per_class=cfg.labels_per_class))
        arms.append(experiments.Arm("same encoder from scratch", "scratch", "none", seed=s, per_class=cfg.labels_per_class))
    state["runs"] = [vars(a) | {"metrics": [], "done": False} for a in arms]
    for i, arm in enumerate(arms):
        if ctx.cancelled():
            break
        rec = state["runs"][i]
        idx = experiments.subset_per_class(train_y, arm.per_class, arm.seed)
        if arm.group == "pretrained":
            model = transfer_encoder(ae, n_classes, seed=1000 + arm.seed)
        else:
            torch.manual_seed(1000 + arm.seed)
            model = Classifier(n_classes)

        def on_epoch(row, rec=rec, i=i, arm=arm):
            rec["metrics"].append(row)
            state["result"] = {"benefits": experiments.benefits(state["runs"]),
                               "curves": {g: experiments.mean_curve([r for r in state["runs"] if r["group"] == g]) for g in ("pretrained", "scratch")}}
            experiments.write_result(out_dir, state)
            ctx.report(phase="training", run=i + 1, runs=len(arms), epoch=row["epoch"], epochs=cfg.epochs,
                       message=f"run {i + 1}/{len(arms)} · {arm.label} · epoch {row['epoch']}/{cfg.epochs}")

        t = time.time()
        _, stopped = fit_classifier(model, _norm(train_x[idx]), train_y[idx], val_x, val_y, cfg.epochs, steps_per_epoch,
                                    cfg.batch_size, cfg.lr, arm.seed, should_stop=ctx.cancelled, on_epoch=on_epoch)
        rec.update(seconds=round(time.time() - t, 2), train_images=len(idx), done=not stopped,
                   params={"trainable": sum(p.numel() for p in model.parameters()), "total": sum(p.numel() for p in model.parameters())})

    res = state.get("result") or {}
    g = res.get("benefits", {}).get("groups", {})
    res["pretrained_best"] = g.get("pretrained", {}).get("asymptote", {}).get("mean")
    res["scratch_best"] = g.get("scratch", {}).get("asymptote", {}).get("mean")
    res["ae_final_loss"] = state["ae"]["loss"][-1] if state["ae"]["loss"] else None
    state["result"] = res
    state["status"] = "cancelled" if ctx.cancelled() else "done"
    state["seconds"] = round(time.time() - t0, 2)
    experiments.write_result(out_dir, state)
    ctx.report(phase=state["status"], message="done")
    return experiments.headline(state)
