"""The recipe book: the ONE source of default training settings.

Every caller that trains an image classifier (the CLI, the Fine-tune form, the strategy advisor,
the guided tour, the demo, the Transfer Lab, the pretraining probe, the benchmarks) asks
`vision_recipe(...)` for its defaults; an option the user sets still wins (`fill`).

Why these settings (measured with `python -m engine bench recipes`, table in BENCHMARKS.md):

- AdamW + one-cycle (Smith 2018; fastai's `fine_tune`) for every strategy that trains the backbone.
  One-cycle warms up over the first 25% of the steps from lr/25, which is what lets a pretrained
  network take a large learning rate without being knocked off its good starting point. SGD at
  lr 1e-3 with a plain cosine left a real 10-class set at ~50% where this reached 98-99%.
- The pretrained layers learn 10x slower than the new head (`full`), or on a geometric ladder
  from lr/100 to lr (`two-phase`, fastai's discriminative learning rates).
- A budget in optimizer *steps*, not a fixed epoch count: a 160-image dataset needs many passes
  to get enough updates, a 50k-image one is well served by one or two. The epoch count is what
  the budget comes to for the dataset at hand.
- The linear probe is the standard protocol on frozen features (CLIP, SimCLR): an L2-regularised
  logistic regression on standardised features fitted with L-BFGS, the regularisation chosen by
  cross-validation on the training split. No learning rate at all, and a fraction of a second.
- Grey images get 1.5x the passes of `full`: the backbone's pretrained filters were learnt on colour
  and have further to move (on the grey clothing and digits sets 10 passes left 2.5-5 points behind).
- Flip + crop augmentation where the whole network trains on few images; none for the frozen
  paths (it would turn off the feature cache and bought nothing measurable on frozen features).

The function is pure: same inputs, same recipe. Nothing here imports torch.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass, field

DEFAULT_STRATEGY = "full"  # measured best on the bundled sample with the bundled backbone (BENCHMARKS.md)
LINEAR_CHUNKS = 10         # the linear probe's curve: L-BFGS is run in this many chunks ("epochs")
MIN_STEPS, MAX_STEPS = 100, 1500  # the step budget of the strategies that train with minibatches
EPOCHS_OF_SMALL_DATA = 12  # a small dataset gets this many passes (until MIN_STEPS/MAX_STEPS bind)
# `full`, the default strategy, is tuned for time as well as accuracy (BENCHMARKS.md): batches of at
# least 48 and 10 passes, at least 30 steps. Measured on the sample (3 seeds): batch 32 x 10 passes
# 86.5% in 1.24x the old default's time, batch 48 89.6% in 1.04x, batch 64 83.3% in 0.96x.
# lr: with the stronger bundled backbone (its features need less moving), mean of 5 seeds at 2e-3 / 3e-3 / 6e-3:
# sample 97.5 / 97.5 / 96.2%, shapes 96.0 / 95.0 / 89.5%, clothing 85.6 / 85.6 / 81.9%, digits 98.5 / 98.0 / 98.5%
FULL_MIN_BATCH, FULL_PASSES, FULL_MIN_STEPS, FULL_LR = 48, 10, 30, 2e-3
# grey images (scans, digits, X-rays) are further from colour pretraining data than photos: measured on
# two grey sets (bench recipes), 15 passes of `full` beat 10 by 2.5-5 points and 20 passes beat 15 by 0
GREY_FULL_PASSES = 15
RECIPE_FIELDS = ("epochs", "batch_size", "lr", "optimizer", "schedule", "weight_decay", "label_smoothing",
                 "augment", "bn_adapt")


@dataclass(frozen=True)
class Recipe:
    """Training settings for one (strategy, dataset) pair, each with the reason it was chosen."""

    strategy: str
    epochs: int
    batch_size: int
    lr: float                    # the new head's learning rate (pretrained layers: see backbone_lr)
    backbone_lr: str             # how the pretrained layers' rates relate to lr, in words
    optimizer: str               # adamw | sgd | lbfgs (the linear probe: full-batch, on cached features)
    schedule: str
    weight_decay: float | None   # None: chosen by cross-validation (the linear probe)
    label_smoothing: float
    augment: tuple[str, ...]
    bn_adapt: bool               # re-estimate frozen BatchNorm statistics on the user's images (AdaBN)
    steps: int                   # optimizer steps the budget comes to (L-BFGS: iterations)
    why: dict = field(default_factory=dict)

    def settings(self) -> dict:
        """The FinetuneConfig fields this recipe fills."""
        d = {k: getattr(self, k) for k in RECIPE_FIELDS}
        d["augment"] = list(self.augment)
        return d

    def to_dict(self) -> dict:
        d = asdict(self)
        d["augment"] = list(self.augment)
        return d


def steps_per_epoch(n_train: int, batch_size: int) -> int:
    return max(1, math.ceil(max(1, n_train) / batch_size))


def batch_size_for(n_train: int) -> int:
    """Small batches for small data: more updates per pass. Measured (bench recipes): on the sample 16
    and 32 tie, on the generated shapes 16 is 7 points better (32 under-trains a task far from the
    pretraining data); 16 costs about 1.5x the time of 32 per pass on a CPU."""
    if n_train < 1000:
        return 16
    if n_train < 10000:
        return 32
    return 64


def epochs_for(n_train: int, batch_size: int, passes: int = EPOCHS_OF_SMALL_DATA,
               min_steps: int = MIN_STEPS) -> tuple[int, int]:
    """(epochs, steps): about `passes` passes, bounded to min_steps..MAX_STEPS steps."""
    spe = steps_per_epoch(n_train, batch_size)
    budget = min(MAX_STEPS, max(min_steps, passes * spe))
    epochs = max(1, min(100, math.ceil(budget / spe)))  # whole passes, at least the budget (cap: 100 passes)
    return epochs, epochs * spe


def vision_recipe(strategy: str, n_train: int, n_classes: int, image_size: int | None = None,
                  weights: str = "mini", fixed_features: bool = True, grey: bool = False) -> Recipe:
    """Default training settings for `strategy` on a dataset of `n_train` training images.

    weights: the kind of starting weights ("imagenet", "mini", "file", "none"): random init has no
    pretrained layers to protect, so `scratch` trains everything at one higher rate.
    image_size: the size the images are used at (None = the weights' own): not used by today's
    rules, kept in the signature so a rule can depend on it without changing every caller.
    fixed_features: False when the frozen features change every epoch (augmentation on, or the
    feature cache turned off): the linear probe then trains its layer with minibatch steps.
    grey: the images carry no colour (imagedata.looks_grey): `full` trains longer.
    """
    if not isinstance(n_train, int) or n_train < 0:
        raise ValueError(f"n_train must be a non-negative integer (got {n_train!r})")
    if not isinstance(n_classes, int) or n_classes < 1:
        raise ValueError(f"n_classes must be a positive integer (got {n_classes!r})")
    few = n_train < 1000
    why: dict[str, str] = {}
    if strategy == "linear" and not fixed_features:
        why["optimizer"] = "The features change every epoch (augmentation or no cache), so the output layer trains with minibatch steps."
        why["lr"] = "1e-2 with AdamW and a cosine schedule: only one layer trains, so a larger step is safe."
        batch = batch_size_for(n_train)
        epochs, steps = epochs_for(n_train, batch)
        why["epochs"] = f"{epochs} passes = {steps} steps (a budget of {MIN_STEPS}-{MAX_STEPS} optimizer steps)."
        return Recipe(strategy, epochs, batch, 1e-2, "frozen", "adamw", "cosine", 0.01, 0.0, (), False, steps, why)
    if strategy == "linear":
        why["optimizer"] = ("Frozen features: the standard linear-probe protocol, a regularised logistic regression "
                         "fitted with L-BFGS on standardised features (no learning rate to choose).")
        why["weight_decay"] = "L2 strength chosen by cross-validation on the training images (5 folds, twice, by held-out log-loss)."
        why["epochs"] = f"The fit is shown in {LINEAR_CHUNKS} chunks of L-BFGS iterations, one curve point each."
        why["bn_adapt"] = "BatchNorm keeps the pretrained statistics: re-estimating them measured -2 to +3 points, within the spread."
        return Recipe(strategy, LINEAR_CHUNKS, batch_size_for(n_train), 1.0, "frozen", "lbfgs", "constant", None, 0.0, (),
                      False, LINEAR_CHUNKS * 10, why)

    if strategy == "full":
        batch = max(FULL_MIN_BATCH, batch_size_for(n_train))
        lo = FULL_MIN_STEPS
        epochs, steps = epochs_for(n_train, batch, GREY_FULL_PASSES if grey else FULL_PASSES, lo)
        why["batch_size"] = (f"{batch}: on a CPU larger batches cost less per image (and fewer optimizer steps); measured on the "
                             "sample, 48 was as accurate as 32 (89.6% vs 86.5%, within the spread) in 0.84x its time, 64 lost 6 points.")
    else:
        batch = batch_size_for(n_train)
        lo = MIN_STEPS
        epochs, steps = epochs_for(n_train, batch)
        why["batch_size"] = f"{batch}: " + ("few images, so small batches give more updates per pass." if few else "enough images for larger batches.")
    why["epochs"] = (f"{epochs} passes over {n_train} images = {steps} steps: a budget of "
                     f"{lo}-{MAX_STEPS} optimizer steps, so small datasets get enough updates and large ones are not over-trained."
                     + (f" Grey images: {GREY_FULL_PASSES} passes instead of {FULL_PASSES}, the colour-trained layers have further to move."
                        if grey and strategy == "full" else ""))
    why["optimizer"] = "AdamW with one-cycle (fastai's fine_tune): a warm-up over the first 25% of the steps, then cosine down."
    why["schedule"] = why["optimizer"]
    why["weight_decay"] = "0.05: AdamW's decoupled weight decay, a mild pull towards small weights."
    why["label_smoothing"] = "0.1: softer targets, less over-confident on few images."
    augment: tuple[str, ...] = ("flip", "crop") if few else ("flip",)
    why["augment"] = ("Flips and random crops: every pass sees new versions of the few images."
                      if few else "Flips only: there are enough images to learn from.")
    bn_adapt = False
    if strategy == "partial":
        lr, rel = 3e-3, "frozen stages keep their weights; the rest trains at lr"
        why["bn_adapt"] = "BatchNorm of the frozen stages keeps the pretrained statistics: re-estimated, -1 to +2 points, within the spread."
    elif strategy == "full":
        lr, rel = FULL_LR, "lr/10"
    elif strategy == "two-phase":
        lr, rel = 3e-3, "lr/100 (stem) rising to lr (head) in phase 2"
        epochs = max(2, epochs)
    elif strategy == "scratch":
        lr, rel = 3e-3, "no pretrained layers: everything at lr"
    else:
        raise ValueError(f"unknown strategy {strategy!r}")
    why["lr"] = f"{lr:g} for the new head (pretrained layers: {rel}); " + (
        "best of 2e-3, 3e-3 and 6e-3 on the four datasets of the recipe benchmark (mean of 5 seeds)." if strategy == "full"
        else "found best in the recipe benchmark's grid.")
    return Recipe(strategy, epochs, batch, lr, rel, "adamw", "onecycle", 0.05, 0.1, augment, bn_adapt,
                  epochs * steps_per_epoch(n_train, batch), why)


def comparison_recipe(n_train: int, n_classes: int) -> Recipe:
    """The Transfer Lab's experiments: one optimizer and one learning rate for every layer and every arm.

    An experiment isolates one factor (the starting weights, how much is frozen, how many labels), so
    everything else is held fixed and simple: SGD with momentum at lr 0.01 and a cosine decay, no
    warm-up (the first epoch then shows the head start that pretraining gives, which a warm-up would
    hide), no weight decay, no label smoothing. Measured on the sample (quick preset): pretrained vs
    scratch start 58% vs 27%, best 86% vs 44%; AdamW + one-cycle at 3e-3 on every layer (the fine-tune
    recipe without its lr/10 for pretrained layers) gave 34% vs 25% and 73% vs 45%.
    """
    why = {"optimizer": "One fixed optimizer for every arm, so only the factor under study differs.",
           "lr": "0.01 for every layer: the same on both sides of a comparison."}
    return Recipe("comparison", 0, 16, 0.01, "the same as the head", "sgd", "cosine", 0.0, 0.0, (), False, 0, why)


def fill(cfg, n_train: int, n_classes: int, weights_kind: str, grey: bool = False):
    """`cfg` (a FinetuneConfig) with every recipe field the user left None filled from the recipe.

    Returns (filled copy, {"recipe": Recipe.to_dict(), "from_recipe": [...], "set_by_you": [...]}).
    """

    fixed = not cfg.augment and cfg.cache  # (an empty list the user chose counts as no augmentation)
    rec = vision_recipe(cfg.strategy, n_train, n_classes, cfg.image_size, weights_kind, fixed_features=fixed, grey=grey)
    values, from_recipe, mine = {}, [], []
    for name, value in rec.settings().items():
        if getattr(cfg, name) is None:
            values[name] = value
            from_recipe.append(name)
        else:
            mine.append(name)
    return dataclasses.replace(cfg, **values), {"recipe": rec.to_dict(), "from_recipe": from_recipe, "set_by_you": mine,
                                                "grey": grey}
