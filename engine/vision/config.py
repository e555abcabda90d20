"""The options of one fine-tuning run: FinetuneConfig, its choices and its checks.

No torch here: the CLI builds its options from these fields (engine/cli/options.py) without paying
for the torch import, and every other caller (the page, jobs, the benchmarks) uses the same class.
Fields left None are filled from the recipe book (engine/train/recipes.py) when the run starts.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from engine.core.errors import UserError, number_in
from engine.models.sources import VISION_ARCHS
from engine.train import recipes, schedules

STRATEGIES: dict[str, str] = {
    "linear": "Freeze the whole pretrained network and train only a new output layer (fastest: features are computed once and cached).",
    "partial": "Freeze the first k stages of the network (stem, layer1, ...) and train the later stages plus a new output layer.",
    "full": "Train every layer: the pretrained layers learn 10x slower than the new output layer so they are adjusted, not overwritten.",
    "two-phase": "Train only the new output layer for one epoch, then unfreeze everything with smaller learning rates for earlier layers (fastai fine_tune).",
    "scratch": "Start from random weights and train everything: the baseline that shows what pretraining buys.",
}
AUGMENTATIONS = ("flip", "crop", "color", "rotate")
OPTIMIZERS = ("sgd", "adamw", "lbfgs")  # lbfgs: the linear probe, a logistic regression on cached features
SCHEDULES = schedules.SCHEDULES


@dataclass
class FinetuneConfig:
    """One fine-tuning run. Fields left None come from the recipe book (engine/train/recipes.py) for this
    strategy and dataset when the run starts; a value set here always wins."""

    # every field's help text is also the CLI's (engine/cli/options.py); "cli": False keeps one off the CLI
    data: str = field(metadata={"help": "workspace dataset name, folder of class subfolders, or .zip"})
    model: str = field(default="resnet18", metadata={"choices": VISION_ARCHS})
    weights: str = field(default="auto", metadata={"help": "auto | imagenet | mini | none | FILE.safetensors"})
    strategy: str = field(default=recipes.DEFAULT_STRATEGY, metadata={"choices": tuple(STRATEGIES)})
    freeze: int = field(default=3, metadata={"help": "partial: frozen stages among stem, layer1 ... layer4 (1..4)"})
    epochs: int | None = field(default=None, metadata={"help": "passes over the training images; the recipe's follow from its step budget for the dataset"})
    batch_size: int | None = None
    lr: float | None = field(default=None, metadata={"help": "the new head's learning rate"})
    optimizer: str | None = field(default=None, metadata={"choices": OPTIMIZERS, "help": "sgd (momentum 0.9) | adamw | lbfgs (linear only)"})
    schedule: str | None = field(default=None, metadata={"choices": SCHEDULES, "help": "per step"})
    image_size: int | None = field(default=None, metadata={"help": "default: the weights' own size"})
    seed: int = 0
    augment: list[str] | None = field(default=None, metadata={"help": f"comma list of {','.join(AUGMENTATIONS)}, or none"})
    early_stopping: int = field(default=0, metadata={"help": "patience in epochs on validation loss; 0 = off", "metavar": "PATIENCE"})
    val_fraction: float = 0.2
    cache: bool = field(default=True, metadata={"help": "use the frozen-feature cache when it applies (--no-cache: run the frozen layers every step)"})
    weight_decay: float | None = field(default=None, metadata={"help": "linear: cross-validated"})
    label_smoothing: float | None = None
    bn_adapt: bool | None = field(default=None, metadata={"help": "re-estimate frozen BatchNorm statistics on your images (AdaBN)"})

    def filled(self, n_train: int, n_classes: int, weights_kind: str, grey: bool = False) -> tuple["FinetuneConfig", dict]:
        """A copy with every None field filled from the recipe, and where each value came from."""
        return recipes.fill(self, n_train, n_classes, weights_kind, grey)

    def validate(self) -> "FinetuneConfig":
        """Check every option; raise UserError naming the bad one. Returns self."""
        if not isinstance(self.data, str) or not self.data.strip():
            raise UserError("choose a dataset (a workspace dataset name or a folder/ZIP path)")
        if self.model not in VISION_ARCHS:
            raise UserError(f"unknown model {self.model!r}; choose one of {', '.join(VISION_ARCHS)}")
        if self.strategy not in STRATEGIES:
            raise UserError(f"unknown strategy {self.strategy!r}; choose one of {', '.join(STRATEGIES)}")
        if self.strategy == "partial" and not (isinstance(self.freeze, int) and 1 <= self.freeze <= 4):
            raise UserError(f"freeze must be 1..4 stages for the partial strategy (got {self.freeze!r})")
        if self.strategy == "scratch" and self.weights not in ("auto", "none"):
            raise UserError("the scratch strategy starts from random weights; use weights none (or auto)")
        # recipe fields may still be None here: they are checked again once filled
        if self.epochs is not None and not (isinstance(self.epochs, int) and 1 <= self.epochs <= 1000):
            raise UserError(f"epochs must be an integer from 1 to 1000 (got {self.epochs!r})")
        if self.strategy == "two-phase" and self.epochs is not None and self.epochs < 2:
            raise UserError("two-phase needs at least 2 epochs (one for the head, then the rest unfrozen)")
        if self.batch_size is not None and not (isinstance(self.batch_size, int) and 2 <= self.batch_size <= 4096):
            raise UserError(f"batch size must be an integer from 2 to 4096 (got {self.batch_size!r})")
        if self.lr is not None and not (number_in(self.lr, 0, 10) and self.lr > 0):
            raise UserError(f"learning rate must be > 0 and <= 10 (got {self.lr!r})")
        if self.optimizer is not None and self.optimizer not in OPTIMIZERS:
            raise UserError(f"unknown optimizer {self.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
        if self.schedule is not None and self.schedule not in SCHEDULES:
            raise UserError(f"unknown schedule {self.schedule!r}; choose one of {', '.join(SCHEDULES)}")
        if self.image_size is not None and not (isinstance(self.image_size, int) and 32 <= self.image_size <= 512):
            raise UserError(f"image size must be from 32 to 512 pixels (got {self.image_size!r})")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise UserError(f"seed must be a non-negative integer (got {self.seed!r})")
        if self.augment is not None and not isinstance(self.augment, (list, tuple)):
            raise UserError(f"augment must be a list of {', '.join(AUGMENTATIONS)} (got {self.augment!r})")
        bad = [a for a in self.augment or [] if a not in AUGMENTATIONS]
        if bad:
            raise UserError(f"unknown augmentation {', '.join(map(repr, bad))}; choose from {', '.join(AUGMENTATIONS)}")
        if not isinstance(self.early_stopping, int) or self.early_stopping < 0:
            raise UserError(f"early stopping patience must be 0 (off) or a positive number of epochs (got {self.early_stopping!r})")
        if not number_in(self.val_fraction, 0.05, 0.5):
            raise UserError(f"validation fraction must be from 0.05 to 0.5 (got {self.val_fraction!r})")
        if self.weight_decay is not None and not number_in(self.weight_decay, 0, 10):
            raise UserError(f"weight decay must be from 0 to 10 (got {self.weight_decay!r})")
        if self.label_smoothing is not None and not number_in(self.label_smoothing, 0, 0.5):
            raise UserError(f"label smoothing must be from 0 to 0.5 (got {self.label_smoothing!r})")
        if self.optimizer == "lbfgs" and self.strategy != "linear":
            raise UserError("the lbfgs optimizer is for the linear strategy (a logistic regression on frozen features)")
        if self.optimizer == "lbfgs" and (self.augment or not self.cache):
            raise UserError("the lbfgs optimizer fits fixed features: turn augmentation off and the feature cache on, or use adamw")
        if self.bn_adapt is not None and not isinstance(self.bn_adapt, bool):
            raise UserError(f"bn_adapt must be true or false (got {self.bn_adapt!r})")
        return self
