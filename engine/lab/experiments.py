"""Transfer Lab: small, measured experiments that show what pretraining buys.

    compare       the same resnet18, data, epochs and optimiser; pretrained weights vs random ones.
                  The three benefits of transfer (Torrey & Shavlik 2009), measured on the curves:
                  higher start, higher slope, higher asymptote.
    freeze        k = 5 (only the new output layer trains, a linear probe) ... k = 0 (all layers train):
                  accuracy and time per k; plus the "pretrained layers at lr/10" rule vs one LR for all.
    data-size     accuracy vs labelled images per class, pretrained vs scratch.
    unsupervised  a convolutional autoencoder pretrained on the images without labels, its encoder then
                  fine-tuned with a few labels, vs the same encoder from scratch (engine/lab/autoencoder.py).
    advise        size x similarity -> one of four scenarios and a strategy (engine/lab/advisor.py).
    text-compare, text-data-size
                  the same two questions for the language model on a new text (engine/lab/text_transfer.py).

Every experiment is one background job (kind "lab"). It trains its runs one after the other with
the loop below and rewrites <run dir>/lab.json after every epoch, so the page can draw the curves
while they are made and re-open them after a restart.

Why a loop here and not vision.finetune(): the experiments need things finetune() does not offer
(a fixed validation set while the training set shrinks to 1 image per class; one learning rate
for the whole pretrained network; no checkpoints for dozens of throw-away runs; images loaded
once for all runs). The loop is built from engine.vision's own parts (build_model, stages, the
BatchNorm rule for frozen stages, the cosine schedule, preprocessing) so it trains the same way.
"""
from __future__ import annotations

import itertools
import logging
import math
import os
import statistics
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

from engine import jobs
from engine.core import runs, workspace
from engine.core.errors import UserError, number_in
from engine.data import demo_tasks, imagedata
from engine.models import backbones, sources
from engine.train import loop, optimizers, recipes, schedules

log = logging.getLogger(__name__)

ARCH = "resnet18"
EXPERIMENTS = {
    "compare": "Pretrained vs from scratch",
    "freeze": "How much to freeze",
    "data-size": "Less data",
    "unsupervised": "Unsupervised pretraining",
    "advise": "Strategy advisor",
    "text-compare": "Text: pretrained vs from scratch",
    "text-data-size": "Text: less data",
}
TEXT_EXPERIMENTS = ("text-compare", "text-data-size")
PRESET_NAMES = ("quick", "thorough")
# image_size 0 = the weights' own size (64 px for the bundled mini backbone, 224 for ImageNet).
# Sizes: images per class; 0 = all of them. "quick" takes 1-2 minutes on a 2-core CPU with the sample.
PRESETS: dict[str, dict[str, dict]] = {
    "compare": {
        "quick": dict(epochs=5, seeds=2, image_size=64, batch_size=16),
        "thorough": dict(epochs=15, seeds=4, image_size=0, batch_size=16),
    },
    "freeze": {
        "quick": dict(epochs=4, seeds=1, image_size=64, batch_size=16, ks=[5, 3, 0]),
        "thorough": dict(epochs=12, seeds=3, image_size=0, batch_size=16, ks=[5, 4, 3, 2, 1, 0]),
    },
    "data-size": {
        "quick": dict(epochs=4, seeds=1, image_size=64, batch_size=16, sizes=[1, 5, 10, 0]),
        "thorough": dict(epochs=12, seeds=3, image_size=0, batch_size=16, sizes=[1, 2, 5, 10, 25, 0]),
    },
    "unsupervised": {
        "quick": dict(epochs=8, seeds=3, image_size=32, batch_size=16, lr=0.05, labels_per_class=5, ae_epochs=20),
        "thorough": dict(epochs=20, seeds=5, image_size=32, batch_size=16, lr=0.05, labels_per_class=5, ae_epochs=100),
    },
    "advise": {
        "quick": dict(max_per_class=60),
        "thorough": dict(max_per_class=200),
    },
    # text: `steps` optimizer steps per run, perplexity every `eval_every`; quick is about a minute per side here
    "text-compare": {
        "quick": dict(steps=120, eval_every=12, seeds=1, block_size=64, batch_size=8, lr=1e-3, val_tokens=2048),
        "thorough": dict(steps=400, eval_every=25, seeds=2, block_size=128, batch_size=8, lr=1e-3, val_tokens=8192),
    },
    "text-data-size": {
        "quick": dict(steps=60, eval_every=12, seeds=1, block_size=64, batch_size=8, lr=1e-3, val_tokens=2048, fractions=[0.1, 0.3, 1.0]),
        "thorough": dict(steps=200, eval_every=25, seeds=2, block_size=128, batch_size=8, lr=1e-3, val_tokens=8192,
                         fractions=[0.1, 0.3, 1.0]),
    },
}
BACKBONE_LR = 0.1  # the pretrained layers learn 10x slower than the new head (the "full" strategy)
CPU_THREADS = int(os.environ.get("TRANSFER_STUDIO_LAB_THREADS", 1))  # see run_lab
EARLY_EPOCHS = 3   # the slope is measured over the first EARLY_EPOCHS epochs


# ============================================================================= config
@dataclass
class LabConfig:
    """One experiment. Fields left None come from the preset."""

    experiment: str
    data: str = "Fruit (sample)"
    preset: str = "quick"
    weights: str = "auto"                  # the pretrained side; the scratch side is always random init
    epochs: int | None = None
    seeds: int | None = None
    image_size: int | None = None          # 0 = the weights' own size
    batch_size: int | None = None
    lr: float | None = None                # the new output layer's learning rate (None: the recipe book's for comparisons)
    ks: list[int] | None = None            # freeze: frozen stages to try
    sizes: list[int] | None = None         # data-size: labelled images per class (0 = all)
    labels_per_class: int | None = None    # unsupervised: labels used for fine-tuning
    ae_epochs: int | None = None           # unsupervised: autoencoder pretraining epochs
    max_per_class: int | None = None       # advise: images per class used to measure similarity
    steps: int | None = None               # text: optimizer steps per run
    eval_every: int | None = None          # text: steps between perplexity measurements
    block_size: int | None = None          # text: tokens per training block
    val_tokens: int | None = None          # text: held-out tokens measured
    fractions: list[float] | None = None   # text-data-size: shares of the training text
    val_fraction: float = 0.2

    def resolved(self) -> "LabConfig":
        """A copy with the preset filled in, validated (UserError names the bad option)."""
        if self.experiment not in EXPERIMENTS:
            raise UserError(f"unknown experiment {self.experiment!r}; choose one of {', '.join(EXPERIMENTS)}")
        if self.preset not in PRESET_NAMES:
            raise UserError(f"unknown preset {self.preset!r}; choose quick or thorough")
        preset = PRESETS[self.experiment][self.preset]
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        for k, v in preset.items():
            if values.get(k) is None:
                values[k] = list(v) if isinstance(v, list) else v
        cfg = LabConfig(**values)
        cfg._validate()
        return cfg

    def _validate(self) -> None:
        if not isinstance(self.data, str) or not self.data.strip():
            raise UserError("choose a text ('example' or a .txt file)" if self.experiment in TEXT_EXPERIMENTS
                            else "choose a dataset (a workspace dataset name or a folder/ZIP path)")

        def check_int(name, lo, hi):
            v = getattr(self, name)
            if v is not None and not (isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi):
                raise UserError(f"{name.replace('_', ' ')} must be an integer from {lo} to {hi} (got {v!r})")

        check_int("epochs", 1, 500)
        check_int("seeds", 1, 20)
        check_int("batch_size", 2, 1024)
        check_int("labels_per_class", 1, 10_000)
        check_int("ae_epochs", 1, 2000)
        check_int("max_per_class", 2, 100_000)
        check_int("steps", 1, 100_000)
        check_int("eval_every", 1, 100_000)
        check_int("block_size", 8, 4096)
        check_int("val_tokens", 16, 10_000_000)
        if self.fractions is not None:
            if not self.fractions or any(not number_in(f, 0.01, 1) for f in self.fractions):
                raise UserError(f"fractions of the text must be from 0.01 to 1 (got {self.fractions!r})")
        if self.image_size is not None and self.image_size != 0:
            check_int("image_size", 16, 512)
        if self.lr is not None and not (number_in(self.lr, 0, 10) and self.lr > 0):
            raise UserError(f"learning rate must be > 0 and <= 10 (got {self.lr!r})")
        if self.ks is not None:
            if not self.ks or any(not isinstance(k, int) or not 0 <= k <= 5 for k in self.ks):
                raise UserError(f"frozen stages k must be integers from 0 to 5 (got {self.ks!r})")
        if self.sizes is not None:
            if not self.sizes or any(not isinstance(n, int) or n < 0 for n in self.sizes):
                raise UserError(f"sizes must be images per class >= 1, or 0 for all (got {self.sizes!r})")
        if not number_in(self.val_fraction, 0.05, 0.5):
            raise UserError(f"validation fraction must be from 0.05 to 0.5 (got {self.val_fraction!r})")
        if self.weights == "none" and self.experiment != "unsupervised":
            raise UserError("the pretrained side needs pretrained weights (auto, imagenet, mini or a file), not none")


@dataclass
class Arm:
    """One training run of an experiment."""

    label: str                 # legend text
    group: str                 # runs of one group are averaged over seeds
    weights: str               # "none" = random init
    seed: int = 0
    frozen: int = 0            # k: the first k of stem, layer1..layer4 stay frozen
    backbone_lr: float = 1.0   # learning rate of the trainable pretrained stages, relative to the head's
    per_class: int = 0         # training images per class; 0 = all
    x: float | None = None     # position on a sweep axis (k, images per class)


# ============================================================================= data
@dataclass
class Split:
    classes: list[str]
    train_x: torch.Tensor      # uint8 (N, 3, R, R)
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    pp: object                 # vision.Preprocessing
    source: dict               # the pretrained weights: kind, name, reason

    def describe(self) -> dict:
        return {"classes": self.classes, "train_images": len(self.train_y), "val_images": len(self.val_y),
                "train_per_class": [int((self.train_y == i).sum()) for i in range(len(self.classes))],
                "image_size": self.pp.image_size}


def load_split(data: str, weights: str, image_size: int | None, val_fraction: float = 0.2, seed: int = 0) -> Split:
    """Images of a dataset, loaded once for all runs, with the pretrained weights' preprocessing.

    The scratch runs use the same preprocessing, so both sides see exactly the same pixels."""
    from engine.vision import preprocess  # deferred: imports torch

    data = demo_tasks.ensure_dataset(data)
    td = imagedata.training_data(data, val_fraction=val_fraction, seed=seed)
    source = sources.resolve_vision(ARCH, weights)
    if source.kind == "none" and weights != "none":
        raise UserError(f"no pretrained weights available ({source.reason}); place ImageNet weights or run "
                        "`python -m engine pretrain vision` for the bundled mini backbone")
    pp = preprocess.preprocessing_for(source, image_size or None)
    return Split(
        classes=td.classes,
        train_x=preprocess.load_images([p for p, _ in td.train], pp.resize),
        train_y=torch.tensor([y for _, y in td.train], dtype=torch.long),
        val_x=preprocess.load_images([p for p, _ in td.val], pp.resize),
        val_y=torch.tensor([y for _, y in td.val], dtype=torch.long),
        pp=pp,
        source={"kind": source.kind, "name": source.name, "reason": source.reason},
    )


def subset_per_class(y: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """Indices of n random examples of every class (all of a class that has fewer; n=0: everything)."""
    if n <= 0:
        return torch.arange(len(y))
    g = torch.Generator().manual_seed(seed * 7919 + n)
    keep = []
    for c in y.unique().tolist():
        idx = torch.nonzero(y == c).flatten()
        keep.append(idx[torch.randperm(len(idx), generator=g)[:n]])
    return torch.cat(keep).sort().values


# ============================================================================= the training loop
def _evaluate(model, inputs: torch.Tensor, y: torch.Tensor, k: int) -> tuple[float, float]:
    from engine.vision.network import forward_from  # deferred: imports torch

    model.eval()
    return loop.evaluate(lambda x: forward_from(model, x, k), inputs, y)


def arm_recipe(arm: Arm, n_train: int, n_classes: int):
    """The recipe book's settings for the Lab's comparisons (the same for every arm)."""

    return recipes.comparison_recipe(n_train, n_classes)


def train_arm(arm: Arm, split: Split, epochs: int, batch_size: int, lr: float | None, steps_per_epoch: int,
              dev: torch.device, should_stop=lambda: False, on_epoch=lambda row: None, on_step=lambda s, n: None,
              keep_model: bool = False) -> dict:
    """Train one arm; return {"metrics": [rows from epoch 0], "seconds", "params", "stopped"}.

    Epoch 0 is the untrained network (the new head is random, so about chance). An "epoch" is
    `steps_per_epoch` steps, the same for every arm of an experiment, so a run on 5 images per
    class gets as many updates as one on all of them (it just sees each image more often).
    """
    from engine.vision import feature_cache, network, preprocess  # deferred: imports torch

    t0 = time.time()
    source = sources.resolve_vision(ARCH, arm.weights)
    model = network.build_model(ARCH, len(split.classes), source, seed=arm.seed)
    # plain (NCHW) memory format: on the CPU this was measured ~3x faster for training steps than
    # channels_last (1.1 s vs 3.3 s per batch of 16 at 64 px, one thread)
    model = model.to(dev, memory_format=torch.contiguous_format)
    k = arm.frozen
    network.set_trainable(model, k)
    params = network.count_params(model)

    idx = subset_per_class(split.train_y, arm.per_class, arm.seed)
    x_tr, y_tr = split.train_x[idx], split.train_y[idx].to(dev)
    y_val = split.val_y.to(dev)
    if k > 0:
        # frozen stages never change: run them once, train the rest on their output
        prefix = feature_cache.frozen_prefix(model, k, dev)  # the feature cache's extractor, in fp32
        inputs = feature_cache.extract(prefix, x_tr, split.pp, dev, None).to(dev)
        val_inputs = feature_cache.extract(prefix, split.val_x, split.pp, dev, None).to(dev)
    else:
        inputs = preprocess.normalize(preprocess.center_crop(x_tr, split.pp.image_size), split.pp).contiguous().to(dev)
        val_inputs = preprocess.normalize(preprocess.center_crop(split.val_x, split.pp.image_size), split.pp).contiguous().to(dev)

    # optimizer, learning rate, schedule, weight decay and label smoothing: the recipe book's for the
    # Lab's comparisons (an explicit lr wins)
    rec = arm_recipe(arm, len(y_tr), len(split.classes))
    lr = lr or rec.lr
    st = backbones.stages(model)
    backbone = [p for s in st[k:] for p in s.parameters()]
    groups = [{"params": list(backbones.head(model).parameters()), "lr": lr}]
    if backbone:
        groups.append({"params": backbone, "lr": lr * arm.backbone_lr})
    opt = optimizers.make(groups, rec.optimizer, rec.weight_decay or 0.0)

    forward = lambda x: network.forward_from(model, x, k)  # noqa: E731  (the trainable rest of the network)
    val_loss, val_acc = _evaluate(model, val_inputs, y_val, k)
    metrics = [{"epoch": 0, "train_loss": None, "train_acc": None, "val_loss": round(val_loss, 5), "val_acc": round(val_acc, 4), "seconds": 0.0}]
    on_epoch(metrics[0])
    g = torch.Generator().manual_seed(arm.seed * 1009 + 17)
    stream = loop.endless_batches(len(y_tr), batch_size, g)
    total = epochs * steps_per_epoch
    stopped = False
    for epoch in range(1, epochs + 1):
        network.train_mode(model, k)  # BatchNorm of frozen stages stays in eval mode
        stats = loop.train_one_epoch(forward, opt, itertools.islice(stream, steps_per_epoch), lambda b: (inputs[b], y_tr[b]),
                                     lambda step, e=epoch: schedules.lr_factor((e - 1) * steps_per_epoch + step, total, rec.schedule),
                                     label_smoothing=rec.label_smoothing, cancelled=should_stop, epoch=epoch - 1,
                                     steps=steps_per_epoch, on_step=lambda step, steps, *_: on_step(step + 1, steps))
        if stats.cancelled:
            stopped = True
            break
        val_loss, val_acc = _evaluate(model, val_inputs, y_val, k)
        row = stats.row(epoch, val_loss, val_acc)
        metrics.append(row)
        on_epoch(row)
    out = {"metrics": metrics, "seconds": round(time.time() - t0, 2), "params": params,
           "train_images": len(y_tr), "stopped": stopped}
    if keep_model:
        out["model"] = model
    return out


# ============================================================================= measuring curves
def three_numbers(val_acc: list[float], early: int = EARLY_EPOCHS) -> dict:
    """The three benefits of transfer, from one validation-accuracy curve that starts at epoch 0.

    start      accuracy after the first epoch
    slope      accuracy gained per epoch over the first `early` epochs, from the untrained network
               (epoch 0): (acc[m] - acc[0]) / m with m = min(early, epochs)
    asymptote  the best accuracy reached
    """
    if len(val_acc) < 2:
        raise ValueError("a curve needs epoch 0 and at least one trained epoch")
    m = min(early, len(val_acc) - 1)
    return {"start": val_acc[1], "slope": (val_acc[m] - val_acc[0]) / m, "asymptote": max(val_acc[1:])}


def mean_std(values: list[float]) -> dict:
    values = [v for v in values if v is not None]
    if not values:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": round(statistics.fmean(values), 4), "std": round(statistics.pstdev(values), 4) if len(values) > 1 else 0.0,
            "n": len(values)}


def mean_curve(runs: list[dict], key: str = "val_acc") -> dict:
    """Per epoch mean, std, min and max of `key` over runs (the seeds of one group)."""
    out = {"epoch": [], "mean": [], "std": [], "min": [], "max": [], "n": []}
    n_epochs = max((len(r["metrics"]) for r in runs), default=0)
    for e in range(n_epochs):
        vals = [r["metrics"][e][key] for r in runs if len(r["metrics"]) > e and r["metrics"][e].get(key) is not None]
        if not vals:
            continue
        out["epoch"].append(runs[0]["metrics"][e]["epoch"] if len(runs[0]["metrics"]) > e else e)
        out["mean"].append(round(statistics.fmean(vals), 4))
        out["std"].append(round(statistics.pstdev(vals), 4) if len(vals) > 1 else 0.0)
        out["min"].append(min(vals))
        out["max"].append(max(vals))
        out["n"].append(len(vals))
    return out


def benefits(runs: list[dict], early: int = EARLY_EPOCHS) -> dict:
    """The three numbers per group (mean and spread over seeds), the differences and a one-line reading each."""
    per_group: dict[str, dict] = {}
    for group in ("pretrained", "scratch"):
        done = [r for r in runs if r["group"] == group and len(r["metrics"]) >= 2]
        nums = [three_numbers([m["val_acc"] for m in r["metrics"]], early) for r in done]
        per_group[group] = {k: mean_std([n[k] for n in nums]) for k in ("start", "slope", "asymptote")}
    out = {"groups": per_group, "early_epochs": early, "readings": {}}
    p, s = per_group["pretrained"], per_group["scratch"]
    if all(p[k]["n"] and s[k]["n"] for k in ("start", "slope", "asymptote")):
        d = {k: p[k]["mean"] - s[k]["mean"] for k in ("start", "slope", "asymptote")}
        out["difference"] = {k: round(v, 4) for k, v in d.items()}
        out["readings"] = {
            "start": (f"After one epoch the pretrained network is at {p['start']['mean']:.0%}, the random one at {s['start']['mean']:.0%}: "
                      + ("it starts from features that already fit." if d["start"] > 0.02 else "no head start here.")),
            "slope": (f"It gains {p['slope']['mean'] * 100:.0f} points per epoch early on vs {s['slope']['mean'] * 100:.0f}: "
                      + ("it learns faster." if d["slope"] > 0.01 else "not faster here.")),
            "asymptote": (f"Best accuracy {p['asymptote']['mean']:.0%} vs {s['asymptote']['mean']:.0%}: "
                          + ("it also ends higher." if d["asymptote"] > 0.02 else "they end about level." if d["asymptote"] > -0.02
                             else "from scratch ends higher here.")),
        }
    return out


def sweep(runs: list[dict], groups: tuple[str, ...]) -> dict:
    """For sweep experiments: per group, per x, the best validation accuracy (mean, std) and time."""
    out = {}
    for group in groups:
        pts: dict[float, list[dict]] = {}
        for r in runs:
            if r["group"] == group and len(r["metrics"]) >= 2 and r.get("done"):
                pts.setdefault(r["x"], []).append(r)
        out[group] = [
            {"x": x, "best_val_acc": mean_std([max(m["val_acc"] for m in r["metrics"][1:]) for r in rs]),
             "final_val_acc": mean_std([r["metrics"][-1]["val_acc"] for r in rs]),
             "seconds": mean_std([r["seconds"] for r in rs]),
             "trainable_params": rs[0].get("params", {}).get("trainable"),
             "train_images": rs[0].get("train_images")}
            for x, rs in sorted(pts.items())
        ]
    return out


# ============================================================================= experiments
def plan(cfg: LabConfig, split: Split) -> list[Arm]:
    """The runs of an experiment, in the order they train (seeds interleaved: both sides early)."""
    name = split.source["name"]
    arms: list[Arm] = []
    if cfg.experiment == "compare":
        for s in range(cfg.seeds):
            # the same optimiser and learning rate for every layer on both sides: only the starting weights differ
            arms.append(Arm(f"pretrained: {name}", "pretrained", cfg.weights, seed=s))
            arms.append(Arm("from scratch (random init)", "scratch", "none", seed=s))
    elif cfg.experiment == "freeze":
        for s in range(cfg.seeds):
            for k in sorted(set(cfg.ks), reverse=True):
                arms.append(Arm(f"k={k} frozen", "one-lr", cfg.weights, seed=s, frozen=k, x=k))
            arms.append(Arm("k=0, pretrained layers at lr/10", "rule", cfg.weights, seed=s, frozen=0, backbone_lr=BACKBONE_LR, x=0))
    elif cfg.experiment == "data-size":
        most = int(torch.bincount(split.train_y).max())
        sizes = sorted({n if 0 < n < most else most for n in cfg.sizes})
        for s in range(cfg.seeds):
            for n in sizes:
                arms.append(Arm(f"pretrained, {n}/class", "pretrained", cfg.weights, seed=s, per_class=n, x=n))
                arms.append(Arm(f"scratch, {n}/class", "scratch", "none", seed=s, per_class=n, x=n))
    else:
        raise UserError(f"experiment {cfg.experiment!r} has no training plan")
    return arms


def summarise(cfg: LabConfig, runs: list[dict]) -> dict:
    if cfg.experiment == "compare":
        return {"benefits": benefits(runs),
                "curves": {g: mean_curve([r for r in runs if r["group"] == g]) for g in ("pretrained", "scratch")}}
    if cfg.experiment == "freeze":
        res = {"sweep": sweep(runs, ("one-lr", "rule")),
               "curves": {g: mean_curve([r for r in runs if r["group"] == g and r["x"] == 0]) for g in ("one-lr", "rule")}}
        pts = res["sweep"]["one-lr"]
        if len(pts) >= 2:
            lo, hi = pts[0], pts[-1]  # fewest frozen (most trained) ... most frozen
            best = max(pts, key=lambda p: p["best_val_acc"]["mean"])
            res["reading"] = (f"Training only a new output layer (k={hi['x']:.0f}): {hi['best_val_acc']['mean']:.0%} in {hi['seconds']['mean']:.0f} s; "
                              f"training more layers (k={lo['x']:.0f}): {lo['best_val_acc']['mean']:.0%} in {lo['seconds']['mean']:.0f} s. "
                              f"Best here: k={best['x']:.0f}.")
        one = [p for p in pts if p["x"] == 0]
        rule = res["sweep"]["rule"]
        if one and rule:
            a, b = rule[0]["best_val_acc"]["mean"], one[0]["best_val_acc"]["mean"]
            res["lr_rule"] = {"rule": a, "one_lr": b, "difference": round(a - b, 4)}
            res["lr_reading"] = (f"Pretrained layers at lr/10: {a:.0%}; one learning rate for all: {b:.0%}: "
                                 + ("the rule helps here (the pretrained features are adjusted, not overwritten)." if a - b > 0.02
                                    else "no clear difference here." if a - b > -0.02
                                    else "one learning rate did better here (in a short run the slowed layers have little time to adapt)."))
        return res
    if cfg.experiment == "data-size":
        res = {"sweep": sweep(runs, ("pretrained", "scratch"))}
        pre = {p["x"]: p["best_val_acc"]["mean"] for p in res["sweep"]["pretrained"]}
        scr = {p["x"]: p["best_val_acc"]["mean"] for p in res["sweep"]["scratch"]}
        res["gap"] = [{"x": x, "gap": round(pre[x] - scr[x], 4)} for x in sorted(set(pre) & set(scr))]
        if len(res["gap"]) >= 2:
            few, many = res["gap"][0], res["gap"][-1]
            res["reading"] = (f"With {few['x']:.0f} labelled image(s) per class pretrained is {few['gap'] * 100:+.0f} points ahead; "
                              f"with {many['x']:.0f}, {many['gap'] * 100:+.0f} points. "
                              + ("The fewer the labels, the more pretraining is worth." if few["gap"] > many["gap"] + 0.02
                                 else "Here the gap does not shrink with more labels."))
        return res
    return {}


# ============================================================================= the job
def write_result(out_dir: Path, state: dict) -> None:
    workspace.atomic_write_json(out_dir / "lab.json", state)


def read_result(run_dir: str | Path) -> dict | None:
    """The lab.json of a run folder, or None when it is missing or half-written."""
    return runs.read(run_dir, "lab.json")


def run_lab(cfg: LabConfig, out_dir: Path, ctx=None) -> dict:
    """Run one experiment; write out_dir/lab.json as it goes; return the summary for the runs table.

    On the CPU it trains with CPU_THREADS torch threads (restored afterwards). Measured on the
    2-core machine while other processes were busy: one epoch of the sample took 3.5 s with one
    thread and 17-24 s with two (the second thread's spin-waits lose to the other processes);
    on an idle machine two threads would be at most ~2x faster.
    """
    from engine.core import device as devices  # deferred: imports torch

    cfg = cfg.resolved()
    dev = torch.device(getattr(ctx, "device", None) or devices.best_device())
    before = torch.get_num_threads()
    if dev.type == "cpu":
        torch.set_num_threads(CPU_THREADS)
    try:
        return _run_lab(cfg, Path(out_dir), ctx or jobs.Quiet(), dev)
    finally:
        torch.set_num_threads(before)


def _run_lab(cfg: LabConfig, out_dir: Path, ctx, dev: torch.device) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    state = {"experiment": cfg.experiment, "title": EXPERIMENTS[cfg.experiment], "config": asdict(cfg),
             "status": "running", "runs": [], "result": {}, "device": str(dev), "started": t0}

    if cfg.experiment == "advise":
        from engine.lab import advisor  # deferred: imports torch

        ctx.report(phase="measuring", message="measuring size and similarity")
        state["result"] = advisor.measure(demo_tasks.ensure_dataset(cfg.data), weights=cfg.weights, max_per_class=cfg.max_per_class,
                                          image_size=cfg.image_size or None, ctx=ctx)
        state["status"] = "cancelled" if ctx.cancelled() else "done"
        state["seconds"] = round(time.time() - t0, 2)
        write_result(out_dir, state)
        adv = state["result"].get("advice", {})
        return {"experiment": "advise", "scenario": adv.get("scenario"), "strategy": adv.get("strategy"),
                "similarity": state["result"].get("similarity"), "images_per_class": state["result"].get("images_per_class")}
    if cfg.experiment == "unsupervised":
        from engine.lab import autoencoder  # deferred: imports torch

        return autoencoder.run_experiment(cfg, out_dir, ctx, state, dev)
    if cfg.experiment in TEXT_EXPERIMENTS:
        from engine.lab import text_transfer  # deferred: imports transformers

        return text_transfer.run_experiment(cfg, out_dir, ctx, state, dev)

    ctx.report(phase="loading", message="reading images")
    split = load_split(cfg.data, cfg.weights, cfg.image_size, cfg.val_fraction)
    state["data"] = split.describe() | {"name": cfg.data}
    state["weights"] = split.source
    arms = plan(cfg, split)
    previous = (read_result(out_dir) or {}) if getattr(ctx, "resume", False) else {}
    old = {(r["label"], r["seed"], r.get("x")): r for r in previous.get("runs", []) if r.get("done")}
    steps_per_epoch = max(1, math.ceil(len(split.train_y) / cfg.batch_size))
    state["steps_per_epoch"] = steps_per_epoch
    state["runs"] = [asdict(a) | {"metrics": [], "done": False} for a in arms]
    for i, arm in enumerate(arms):
        rec = state["runs"][i]
        key = (arm.label, arm.seed, arm.x)
        if key in old:  # resumed: keep what finished before the interruption
            state["runs"][i] = old[key]
            continue
        if ctx.cancelled():
            break

        def on_epoch(row, rec=rec, i=i, arm=arm):
            rec["metrics"].append(row)
            state["result"] = summarise(cfg, state["runs"])
            write_result(out_dir, state)
            ctx.report(phase="training", run=i + 1, runs=len(arms), label=arm.label, epoch=row["epoch"], epochs=cfg.epochs,
                       step=0, val_acc=row["val_acc"],
                       message=f"run {i + 1}/{len(arms)} · {arm.label} · "
                               + ("training" if row["epoch"] == 0 else f"epoch {row['epoch']}/{cfg.epochs} done"))

        def on_step(step, steps, i=i, arm=arm, rec=rec):
            ctx.report(phase="training", run=i + 1, runs=len(arms), label=arm.label, step=step, steps=steps,
                       epoch=max(0, len(rec["metrics"]) - 1), epochs=cfg.epochs)  # epoch = epochs finished

        out = train_arm(arm, split, cfg.epochs, cfg.batch_size, cfg.lr, steps_per_epoch, dev,
                        should_stop=ctx.cancelled, on_epoch=on_epoch, on_step=on_step)
        rec.update(seconds=out["seconds"], params=out["params"], train_images=out["train_images"], done=not out["stopped"])
        log.info("%s seed %d: best val acc %.3f in %.1fs", arm.label, arm.seed,
                 max(m["val_acc"] for m in rec["metrics"]), out["seconds"])
    state["result"] = summarise(cfg, state["runs"])
    state["status"] = "cancelled" if ctx.cancelled() else "done"
    state["seconds"] = round(time.time() - t0, 2)
    write_result(out_dir, state)
    ctx.report(phase=state["status"], message="done" if state["status"] == "done" else "cancelled: finished runs kept")
    return headline(state)


def headline(state: dict) -> dict:
    """A few numbers for the runs table and the CLI's first line."""
    res, exp = state.get("result") or {}, state["experiment"]
    out = {"experiment": exp, "seconds": state.get("seconds"), "runs": sum(1 for r in state["runs"] if r.get("done"))}
    if exp == "compare" and res.get("benefits", {}).get("difference"):
        g = res["benefits"]["groups"]
        out.update({f"{side}_{k}": g[side][k]["mean"] for side in ("pretrained", "scratch") for k in ("start", "slope", "asymptote")})
    elif exp == "freeze" and "lr_rule" in res:
        out["lr_rule"] = res["lr_rule"]
    elif exp == "data-size":
        out["gap"] = res.get("gap")
    elif exp == "unsupervised":
        out.update({k: v for k, v in res.items() if k in ("pretrained_best", "scratch_best", "ae_final_loss")})
    elif exp == "text-compare" and res.get("benefits", {}).get("difference"):
        g = res["benefits"]["groups"]
        out.update({f"{side}_{k}": g[side][k]["mean"] for side in ("pretrained", "scratch") for k in ("start", "slope", "asymptote")})
    elif exp == "text-data-size":
        out["ratio"] = res.get("ratio")
    return out


def cli_object(run_id: str, state: dict) -> dict:
    """What `python -m engine lab ... --json` prints: the result, and every run's validation curve."""
    return {"run_id": run_id, "experiment": state.get("experiment"), "status": state.get("status"),
            "seconds": state.get("seconds"), "data": state.get("data"), "weights": state.get("weights"),
            "config": state.get("config"), "result": state.get("result"), "ae": state.get("ae"),
            "runs": [{"label": r["label"], "group": r["group"], "seed": r["seed"], "x": r.get("x"), "frozen": r.get("frozen"),
                      "per_class": r.get("per_class"), "seconds": r.get("seconds"), "params": r.get("params"),
                      **({"step": [m["step"] for m in r["metrics"]], "val_ppl": [m["val_ppl"] for m in r["metrics"]]}
                         if state.get("experiment") in TEXT_EXPERIMENTS else {"val_acc": [m["val_acc"] for m in r["metrics"]]})}
                     for r in state.get("runs", [])]}


def _pct(v) -> str:
    return "  –  " if v is None else f"{v:5.1%}"


def format_text(run_id: str, state: dict) -> str:
    """A readable report for the terminal."""
    exp, res = state.get("experiment"), state.get("result") or {}
    lines = [f"{EXPERIMENTS.get(exp, exp)} · run {run_id} · {state.get('status')} in {state.get('seconds', 0):.0f}s"]
    if exp in ("compare", "unsupervised") and res.get("curves"):
        c = res["curves"]
        lines.append("epoch  pretrained   scratch    (validation accuracy, mean over seeds)")
        for i, e in enumerate(c["pretrained"]["epoch"]):
            s = c["scratch"]["mean"][i] if i < len(c["scratch"]["mean"]) else None
            lines.append(f"{e:5d}  {_pct(c['pretrained']['mean'][i])}      {_pct(s)}")
        g = res["benefits"]["groups"]
        for k in ("start", "slope", "asymptote"):
            p, s = g["pretrained"][k], g["scratch"][k]
            if p["mean"] is None or s["mean"] is None:
                continue
            unit = " per epoch" if k == "slope" else ""
            lines.append(f"{k:>9}: pretrained {p['mean']:.1%} ± {p['std']:.1%}{unit} · scratch {s['mean']:.1%} ± {s['std']:.1%}{unit}")
        lines += [f"  {v}" for v in res["benefits"].get("readings", {}).values()]
    elif exp in ("freeze", "data-size"):
        for group, pts in res.get("sweep", {}).items():
            for p in pts:
                what = f"k={p['x']:.0f}" if exp == "freeze" else f"{p['x']:.0f}/class"
                lines.append(f"{group:>10} {what:>9}: best {p['best_val_acc']['mean']:.1%} ± {p['best_val_acc']['std']:.1%}"
                             f" · {p['seconds']['mean']:.1f}s · {p['trainable_params'] or 0:,} trainable")
        if "lr_rule" in res:
            r = res["lr_rule"]
            lines.append(f"pretrained layers at lr/10: {r['rule']:.1%} vs one lr for all: {r['one_lr']:.1%}")
    elif exp in TEXT_EXPERIMENTS and res.get("curves"):
        c = res["curves"]
        lines.append(f"{'step':>5}  pretrained   scratch    (validation perplexity on the held-out text, lower is better)")
        steps = next((r["metrics"] for r in state.get("runs", []) if r["metrics"]), [])
        for i, e in enumerate(c["pretrained"]["epoch"]):
            s = c["scratch"]["mean"][i] if i < len(c["scratch"]["mean"]) else None
            step = steps[i]["step"] if i < len(steps) else e
            lines.append(f"{step:5d}  {c['pretrained']['mean'][i]:10.1f}   {'' if s is None else f'{s:8.1f}'}")
        if exp == "text-compare":
            lines += [f"  {v}" for v in res["benefits"].get("readings", {}).values()]
        for group, pts in res.get("sweep", {}).items():
            for p in pts:
                lines.append(f"{group:>10} {p['x']:>5.0%} of the text: best perplexity {p['best_val_ppl']['mean']:.1f} · {p['seconds']['mean']:.0f}s")
        if res.get("reading"):
            lines.append(f"  {res['reading']}")
    elif exp == "advise" and res.get("advice"):
        a, acc = res["advice"], res["nearest_mean_accuracy"]
        lines += [f"{res['images_per_class']:.0f} images per class; similarity {res['similarity']:.2f} "
                  f"({res['shots']}-shot nearest class mean: pretrained {acc['pretrained']:.1%}, random init {acc['random']:.1%}, raw pixels {acc['pixels']:.1%})",
                  f"scenario: {a['scenario']} -> {a['strategy']}: {a['headline']}"] + [f"  - {r}" for r in a["reasons"]]
    if state.get("ae", {}).get("loss"):
        lines.append(f"autoencoder reconstruction error: {state['ae']['loss'][0]:.4f} -> {state['ae']['loss'][-1]:.4f}")
    return "\n".join(lines)


def run_job(ctx) -> dict:
    """The `lab` job runner (engine.jobs.RUNNERS)."""
    known = {f.name for f in fields(LabConfig)}
    unknown = sorted(set(ctx.config) - known)
    if unknown:
        raise UserError(f"unknown lab option(s): {', '.join(unknown)}")
    return run_lab(LabConfig(**ctx.config), Path(ctx.run_dir), ctx)


def check_data(data: str) -> str:
    """The dataset name to use (the sample and the demos are imported on first use), or UserError."""

    name = demo_tasks.ensure_dataset(data)
    if name not in {d["name"] for d in imagedata.list_datasets()} and not Path(name).exists():
        raise UserError(f"{data!r} is neither a dataset in the workspace nor a folder/ZIP path")
    return name


def data_and_title(cfg: LabConfig) -> tuple[str, str]:
    """The data to record (a sample or demo key becomes its dataset's name) and the run's title; UserError
    for data that is not there."""
    if cfg.experiment in TEXT_EXPERIMENTS:
        from engine.lab import text_transfer  # deferred: imports transformers

        return cfg.data, f"Lab · {EXPERIMENTS[cfg.experiment]} · {text_transfer.text_title(cfg.data)} · {cfg.preset}"
    data = check_data(cfg.data)
    return data, f"Lab · {EXPERIMENTS[cfg.experiment]} · {data} · {cfg.preset}"


def submit(cfg: LabConfig, manager=None) -> str:
    """Queue an experiment as a background job; returns the run id."""

    cfg.resolved()  # refuse bad options before anything is queued
    cfg.data, title = data_and_title(cfg)
    return (manager or jobs.get_manager()).submit("lab", {k: v for k, v in asdict(cfg).items() if v is not None}, title)
