"""The learning-rate finder (Smith 2015, "Cyclical Learning Rates"; fastai's `lr_find`).

Train for a short while with the learning rate growing exponentially from LR_MIN to LR_MAX, one
step per rate, and record the loss. Too small a rate and the loss does not move; too large and it
explodes. A good rate sits where the loss falls fastest: the suggestion is fastai's "valley", a
point two thirds of the way down the longest stretch of falling loss.

The sweep runs on a throw-away copy of the model the run would start from, with the strategy's
first phase (its frozen stages, parameter groups and optimizer), so its suggestion is for the
head's learning rate exactly as `--lr` means it. Nothing is written to the dataset or to any run:
a sweep started from the page writes only its own lrfind.json.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import replace
from pathlib import Path

import torch

from engine import jobs
from engine.core import workspace
from engine.core.errors import UserError
from engine.data import imagedata
from engine.models import sources
from engine.train import recipes
from engine.vision.config import FinetuneConfig

LR_MIN, LR_MAX = 1e-6, 1.0
STEPS = 60          # rates tried (one optimizer step each)
SMOOTH = 0.9        # exponential smoothing of the loss (debiased, as in fastai)
DIVERGE = 4.0       # stop when the smoothed loss exceeds this many times its minimum


def valley(lrs: list[float], losses: list[float]) -> float:
    """fastai's `valley`: the longest decreasing run of the loss, and a point 2/3 of the way into it."""
    n = len(losses)
    if n < 3:
        raise UserError("the learning-rate sweep stopped too early to suggest a rate; use more images")
    run = [1] * n  # run[i]: length of the longest decreasing subsequence ending at i
    start, end = 0, 0
    for i in range(1, n):
        for j in range(i):
            if losses[i] < losses[j] and run[i] < run[j] + 1:
                run[i] = run[j] + 1
        if run[end] < run[i]:
            end, start = i, i - run[i]
    third = (end - start) / 3
    return float(lrs[min(n - 1, start + int(third) + int(third / 2))])


def find_lr(cfg, steps: int = STEPS, lr_min: float = LR_MIN, lr_max: float = LR_MAX, ctx=None) -> dict:
    """Sweep the learning rate for the run `cfg` (a FinetuneConfig) would start; see the module docstring."""
    from engine.core import device as devices  # deferred: imports torch
    from engine.train import loop  # deferred: imports torch
    from engine.vision import feature_cache, network, preprocess, strategies  # deferred: imports torch

    if not isinstance(steps, int) or not 10 <= steps <= 1000:
        raise UserError(f"steps must be an integer from 10 to 1000 (got {steps!r})")
    if not (0 < lr_min < lr_max <= 100):
        raise UserError(f"the sweep needs 0 < lr_min < lr_max <= 100 (got {lr_min!r}, {lr_max!r})")
    cfg.validate()
    if cfg.optimizer == "lbfgs":
        raise UserError("the lbfgs linear probe has no learning rate to find; choose the adamw or sgd optimizer to sweep one")
    ctx = ctx or jobs.Quiet()
    t0 = time.time()
    dev = torch.device(getattr(ctx, "device", None) or devices.best_device())
    source = sources.resolve_vision(cfg.model, "none" if cfg.strategy == "scratch" else cfg.weights)
    ctx.report(phase="loading", message="reading images")
    data = imagedata.training_data(cfg.data, val_fraction=cfg.val_fraction, seed=cfg.seed)
    n_classes = len(data.classes)
    cfg, _ = cfg.filled(len(data.train), n_classes, source.kind, imagedata.looks_grey([p for p, _ in data.train]))
    if cfg.optimizer == "lbfgs":  # the recipe's probe needs no rate: sweep the minibatch recipe for the same layer
        alt = recipes.vision_recipe("linear", len(data.train), n_classes, cfg.image_size, source.kind, fixed_features=False)
        cfg = replace(cfg, optimizer=alt.optimizer, lr=alt.lr, weight_decay=alt.weight_decay, schedule=alt.schedule)
    pp = preprocess.run_preprocessing(cfg, source)
    model = network.build_model(cfg.model, n_classes, source, seed=cfg.seed).to(dev, memory_format=torch.channels_last)
    train_x = preprocess.load_images([p for p, _ in data.train], pp.resize)
    train_y = torch.tensor([y for _, y in data.train], dtype=torch.long)

    k = strategies.frozen_stages(cfg, 0)  # the first phase: what the run trains first
    inputs = None
    if k > 0:
        ctx.report(phase="extracting", message="computing frozen features once")
        feats = feature_cache.cached_features(model, k, train_x, train_x[:0], pp, feature_cache.weights_hash(model, 5),
                                         data.version + "-lrfind", cfg.model, dev, None)
        inputs = feats[0]
    network.set_trainable(model, k)
    opt = strategies.make_optimizer(network.param_groups(model, cfg.lr, k, strategies.phases(cfg)[0].rates), cfg)
    network.train_mode(model, k)

    gen = torch.Generator().manual_seed(cfg.seed)
    batches: list[torch.Tensor] = []
    lrs, losses, raw = [], [], []
    avg, best = 0.0, math.inf
    for step in range(steps):
        if ctx.cancelled():
            break
        if not batches:
            batches = loop.epoch_batches(len(train_y), cfg.batch_size, gen)
        idx = batches.pop(0)
        lr = lr_min * (lr_max / lr_min) ** (step / (steps - 1))
        loop.set_lr(opt, lr / cfg.lr)  # the head at lr; other groups keep their ratio to it
        if k > 0:
            x = inputs[idx]
        else:
            x = devices.to_device(preprocess.normalize(preprocess.center_crop(train_x[idx], pp.image_size), pp), dev)
        loss, _ = loop.step(lambda t: network.forward_from(model, t, k), opt, x, devices.to_device(train_y[idx], dev))
        value = loss.item()  # (a loss that is not a number is not stepped on: the sweep ends there)
        if not math.isfinite(value):
            break
        avg = SMOOTH * avg + (1 - SMOOTH) * value
        smoothed = avg / (1 - SMOOTH ** (step + 1))
        lrs.append(lr)
        raw.append(value)
        losses.append(smoothed)
        best = min(best, smoothed)
        ctx.report(phase="training", step=step + 1, steps=steps, loss=smoothed, message=f"lr {lr:.1e}: loss {smoothed:.3f}")
        if smoothed > DIVERGE * best and step > steps // 10:
            break
    suggestion = valley(lrs, losses)
    low = min(range(len(losses)), key=losses.__getitem__)
    return {
        "strategy": cfg.strategy, "optimizer": cfg.optimizer, "frozen_stages": k, "batch_size": cfg.batch_size,
        "lrs": lrs, "losses": [round(v, 5) for v in losses], "raw_losses": [round(v, 5) for v in raw],
        "suggestion": suggestion, "minimum_lr": lrs[low], "recipe_lr": cfg.lr,
        "steps": len(lrs), "seconds": round(time.time() - t0, 2),
    }


def run_job(ctx) -> dict:
    """The `lr-find` job runner (engine.jobs.RUNNERS): writes only <run dir>/lrfind.json."""
    config = dict(ctx.config)
    steps = config.pop("steps", STEPS)
    known = set(FinetuneConfig.__dataclass_fields__)
    unknown = sorted(set(config) - known)
    if unknown:
        raise UserError(f"unknown option(s) for the learning-rate finder: {', '.join(unknown)}")
    result = find_lr(FinetuneConfig(**config), steps=steps, ctx=ctx)
    Path(ctx.run_dir).mkdir(parents=True, exist_ok=True)
    workspace.atomic_write_json(Path(ctx.run_dir) / "lrfind.json", result)
    ctx.report(phase="finished", message=f"suggested learning rate {result['suggestion']:.1e}")
    return {"suggestion": result["suggestion"], "minimum_lr": result["minimum_lr"], "steps": result["steps"]}


def read_result(run_dir: str | Path) -> dict | None:
    path = Path(run_dir) / "lrfind.json"
    if not path.is_file():
        return None

    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
