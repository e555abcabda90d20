"""Fine-tuning a pretrained ResNet: strategies, training loop, evaluation, prediction.

The flow (torchvision references/classification/train.py, flattened):

    data   = imagedata.training_data(...)          # stored image paths, stratified split, version hash
    source = sources.resolve_vision(arch, weights)  # which weights and why
    model  = build_model(arch, n_classes, source)   # torchvision resnet, weights loaded safely, new fc
    for epoch: train_one_epoch(...); evaluate(...)  # checkpoint every epoch, best weights kept

A ResNet is five *stages*: stem (conv1+bn1+relu+maxpool), layer1, layer2, layer3, layer4,
then global average pooling and `fc`. Strategies differ in how many stages stay frozen:

    linear    k=5  only the new fc trains
    partial   k    the first k stages are frozen (1..4)
    full      k=0  everything trains; pretrained layers at lr/10
    two-phase k=5 for one epoch, then k=0 with discriminative learning rates (fastai fine_tune)
    scratch   k=0  random init

Frozen stages are a pure function of the input, so when nothing random happens to the images
(no augmentation) their output is computed once and cached (engine/features.py), and the
trainable rest trains on the cached tensors. That is the fast path; it gives the same result
as running the whole network every step, because frozen BatchNorm stays in eval mode either way.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from engine import device as devices
from engine import checkpoints, distributed, recipes, schedules, sources, workspace
from engine.errors import UserError, number_in

log = logging.getLogger(__name__)

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
STAGES = ("stem", "layer1", "layer2", "layer3", "layer4")
CHECKPOINT_EVERY_S = 2.0  # at most this often when epochs are fast (always after the last epoch)
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


# ============================================================================= config
@dataclass
class FinetuneConfig:
    """One fine-tuning run. Fields left None come from the recipe book (engine/recipes.py) for this
    strategy and dataset when the run starts; a value set here always wins."""

    data: str
    model: str = "resnet18"
    weights: str = "auto"
    strategy: str = recipes.DEFAULT_STRATEGY
    freeze: int = 3               # partial: how many of stem, layer1..layer4 stay frozen (1..4)
    epochs: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    optimizer: str | None = None  # sgd (momentum 0.9) | adamw | lbfgs (linear only)
    schedule: str | None = None   # cosine | onecycle | constant (per step)
    image_size: int | None = None  # None = the weights' default
    seed: int = 0
    augment: list[str] | None = None
    early_stopping: int = 0       # patience in epochs on validation loss; 0 = off
    val_fraction: float = 0.2
    cache: bool = True            # use the frozen-feature cache when it applies
    weight_decay: float | None = None
    label_smoothing: float | None = None
    bn_adapt: bool | None = None  # frozen paths: re-estimate BatchNorm statistics on the training images (AdaBN)

    def filled(self, n_train: int, n_classes: int, weights_kind: str) -> tuple["FinetuneConfig", dict]:
        """A copy with every None field filled from the recipe, and where each value came from."""
        return recipes.fill(self, n_train, n_classes, weights_kind)

    def validate(self) -> "FinetuneConfig":
        """Check every option; raise UserError naming the bad one. Returns self."""
        if not isinstance(self.data, str) or not self.data.strip():
            raise UserError("choose a dataset (a workspace dataset name or a folder/ZIP path)")
        if self.model not in sources.VISION_ARCHS:
            raise UserError(f"unknown model {self.model!r}; choose one of {', '.join(sources.VISION_ARCHS)}")
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


def frozen_stages(cfg: FinetuneConfig, epoch: int) -> int:
    """How many of the 5 stages are frozen in `epoch` (0-based). 5 = everything but fc."""
    if cfg.strategy == "linear":
        return 5
    if cfg.strategy == "partial":
        return cfg.freeze
    if cfg.strategy == "two-phase":
        return 5 if epoch == 0 else 0
    return 0  # full, scratch


def cache_plan(cfg: FinetuneConfig) -> tuple[bool, str]:
    """Whether the frozen-feature cache is used, and a sentence for the UI / run.json."""
    if cfg.strategy in ("full", "scratch"):
        return False, "No layers are frozen, so there is nothing to cache: every step runs the whole network."
    if cfg.augment:
        return False, "Augmentation is on: every epoch sees new random versions of the images, so frozen features are recomputed each step (cache off)."
    if not cfg.cache:
        return False, "Feature cache turned off: the frozen layers run on every step."
    if cfg.strategy == "two-phase":
        return True, "Phase 1 (head only) trains on cached features; phase 2 trains the whole network on images."
    return True, "Frozen layers run once; their outputs are cached on disk and the trainable rest trains on them for every epoch."


# ============================================================================= preprocessing
@dataclass
class Preprocessing:
    """Resize the shorter side to `resize`, centre-crop `image_size`, scale to [0,1], normalise."""

    image_size: int
    resize: int
    mean: list[float]
    std: list[float]
    interpolation: str = "bilinear"

    def to_dict(self) -> dict:
        return asdict(self)


def run_preprocessing(cfg: "FinetuneConfig", source: sources.Source) -> Preprocessing:
    """The preprocessing a run uses. From scratch, the images are prepared as for the pretrained
    weights `auto` would pick (their size and normalisation): the baseline then sees the same input as
    the pretrained run it is compared with (random weights alone would mean ImageNet's 224 px)."""
    if cfg.strategy == "scratch":
        source = sources.resolve_vision(cfg.model, "auto")
    return preprocessing_for(source, cfg.image_size)


def preprocessing_for(source: sources.Source, image_size: int | None) -> Preprocessing:
    """The preprocessing belongs to the weights: ImageNet 256 -> 224 crop, mini its own card's."""
    if source.kind == "mini":
        card_path = source.path.parent / "model_card.json" if source.path else None
        pp = json.loads(card_path.read_text())["preprocessing"] if card_path and card_path.is_file() else {"image_size": 64, "resize": 64, "mean": [0.5] * 3, "std": [0.25] * 3}
        size = image_size or pp["image_size"]
        return Preprocessing(size, round(size * pp["resize"] / pp["image_size"]), pp["mean"], pp["std"])
    if source.kind == "file" and source.path is not None:
        # a .safetensors may carry its preprocessing (our exports and pretraining write it in the
        # metadata), or sit next to a model_card.json like the bundled backbone
        pp = _file_preprocessing(Path(source.path))
        if pp:
            size = image_size or int(pp["image_size"])
            return Preprocessing(size, round(size * pp["resize"] / pp["image_size"]), list(pp["mean"]), list(pp["std"]))
    size = image_size or 224
    return Preprocessing(size, round(size * 256 / 224), IMAGENET_MEAN, IMAGENET_STD)


def _file_preprocessing(path: Path) -> dict | None:
    from engine.export import check_safetensors_header, safetensors_metadata

    try:
        check_safetensors_header(path)
        meta = safetensors_metadata(path)
        pp = json.loads(meta["preprocessing"]) if "preprocessing" in meta else None
        card = path.parent / "model_card.json"
        if pp is None and card.is_file():
            pp = json.loads(card.read_text()).get("preprocessing")
        if pp and 16 <= int(pp["image_size"]) <= 1024 and int(pp["resize"]) >= int(pp["image_size"]) \
                and len(pp["mean"]) == 3 and len(pp["std"]) == 3 and min(pp["std"]) > 0:
            return pp
    except (UserError, ValueError, KeyError, TypeError, OSError):
        pass  # unreadable files fail later with a clear message when the weights are loaded
    return None


def load_square(img, resize: int) -> torch.Tensor:
    """PIL image -> uint8 tensor (3, resize, resize): shorter side resized, centre square cropped."""
    from PIL import Image

    img = img.convert("RGB")
    w, h = img.size
    scale = resize / min(w, h)
    nw, nh = max(resize, round(w * scale)), max(resize, round(h * scale))
    img = img.resize((nw, nh), Image.BILINEAR)
    left, top = (nw - resize) // 2, (nh - resize) // 2
    img = img.crop((left, top, left + resize, top + resize))
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)


def load_images(paths: list[Path], resize: int) -> torch.Tensor:
    """Stored images -> one uint8 tensor (N, 3, resize, resize), kept in memory for the whole run."""
    from PIL import Image

    out = torch.empty((len(paths), 3, resize, resize), dtype=torch.uint8)
    for i, p in enumerate(paths):
        with Image.open(p) as im:
            out[i] = load_square(im, resize)
    return out


def center_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    r = x.shape[-1]
    o = (r - size) // 2
    return x[..., o:o + size, o:o + size]


def normalize(x_uint8: torch.Tensor, pp: Preprocessing) -> torch.Tensor:
    """uint8 (N,3,H,W) -> normalised float, channels_last (faster convolutions on CPU and CUDA)."""
    mean = torch.tensor(pp.mean).view(1, 3, 1, 1)
    std = torch.tensor(pp.std).view(1, 3, 1, 1)
    x = x_uint8.contiguous(memory_format=torch.channels_last).float()  # layout change on 1-byte pixels
    return x.mul_(1 / (255 * std)).add_(-mean / std)  # (x/255 - mean)/std in two in-place passes


def augment_batch(x: torch.Tensor, pp: Preprocessing, augment: list[str], gen: torch.Generator) -> torch.Tensor:
    """Random augmentation of a uint8 batch (N,3,R,R) -> uint8 (N,3,S,S). Seeded by `gen`."""
    from torchvision.transforms.v2 import functional as TF

    S = pp.image_size
    out = torch.empty((x.shape[0], 3, S, S), dtype=torch.uint8)
    rand = lambda *shape: torch.rand(shape, generator=gen)  # noqa: E731
    for i, img in enumerate(x):
        if "crop" in augment:
            # RandomResizedCrop: area 35-100%, aspect 3/4-4/3
            R = img.shape[-1]
            area = R * R * (0.35 + 0.65 * rand(1).item())
            ratio = math.exp(math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * rand(1).item())
            w = min(R, round(math.sqrt(area * ratio)))
            h = min(R, round(math.sqrt(area / ratio)))
            top, left = int(rand(1).item() * (R - h + 1)), int(rand(1).item() * (R - w + 1))
            img = TF.resized_crop(img, top, left, h, w, [S, S], antialias=True)
        else:
            img = center_crop(img, S)
        if "flip" in augment and rand(1).item() < 0.5:
            img = TF.horizontal_flip(img)
        if "rotate" in augment:
            img = TF.rotate(img, angle=float(rand(1).item() * 30 - 15))
        if "color" in augment:
            b, c, s = (0.7 + 0.6 * rand(3)).tolist()
            img = TF.adjust_saturation(TF.adjust_contrast(TF.adjust_brightness(img, b), c), s)
            img = TF.adjust_hue(img, float(rand(1).item() * 0.1 - 0.05))
        out[i] = img
    return out


# ============================================================================= model
def safe_load_state(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors file after checking its header; pickle is never used.

    The header is parsed and checked (size, dtypes, shapes x dtype size == byte ranges, ranges
    inside the file and not overlapping) before any tensor is allocated.
    """
    from engine.export import check_safetensors_header
    from safetensors.torch import load_file

    path = Path(path)
    if path.suffix.lower() in (".pt", ".pth", ".pkl", ".pickle", ".bin", ".ckpt"):
        raise UserError(f"{path.name}: pickle-based checkpoints are refused (they can run code); convert it to .safetensors")
    check_safetensors_header(path)
    try:
        return load_file(str(path))
    except Exception as err:  # safetensors raises its own error types for corrupt files
        raise UserError(f"{path.name} is not a valid safetensors file ({str(err)[:120]})") from None


def _load_imagenet(arch: str, source: sources.Source) -> dict[str, torch.Tensor]:
    from torchvision.models import get_model_weights

    path = source.path
    if path is not None and path.is_file():
        # torchvision's own .pth checkpoint: only ever weights_only=True
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise UserError(f"could not read ImageNet weights {path.name} ({str(err)[:100]}); delete the file to download it again") from None
    return get_model_weights(arch).DEFAULT.get_state_dict(progress=False)


def load_backbone_state(model: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """Load every layer but fc from `state`; names and shapes must match exactly."""
    want = {k: v for k, v in model.state_dict().items() if not k.startswith("fc.")}
    got = {k: v for k, v in state.items() if not k.startswith("fc.")}
    # older torchvision checkpoints have no BatchNorm step counters; they only matter with momentum=None
    want_required = {k for k in want if not k.endswith("num_batches_tracked")}
    missing = sorted(want_required - set(got))
    extra = sorted(set(got) - set(want))
    if missing or extra:
        detail = f"missing {missing[:3]}" if missing else f"unexpected {extra[:3]}"
        raise UserError(f"{what} does not fit this architecture ({detail}); check --model")
    want = {k: v for k, v in want.items() if k in got}
    for k, v in want.items():
        if tuple(got[k].shape) != tuple(v.shape):
            raise UserError(f"{what}: tensor {k} has shape {tuple(got[k].shape)}, expected {tuple(v.shape)}; check --model")
        if not (got[k].is_floating_point() or got[k].dtype == v.dtype):
            raise UserError(f"{what}: tensor {k} has dtype {got[k].dtype}")
    model.load_state_dict({k: got[k].to(v.dtype) for k, v in want.items()}, strict=False)


def build_model(arch: str, n_classes: int, source: sources.Source, seed: int = 0) -> nn.Module:
    """torchvision `arch` with `source` weights in every layer but fc, and a new fc (n_classes, seeded)."""
    import torchvision

    if source.kind in ("imagenet", "mini", "file"):
        # every backbone tensor is overwritten below: skip the random init (build on the meta device)
        with torch.device("meta"):
            model = getattr(torchvision.models, arch)(weights=None)
        model = model.to_empty(device="cpu")
        for name, buf in model.named_buffers():
            if name.endswith("num_batches_tracked"):
                buf.zero_()
    else:
        torch.manual_seed(seed)
        model = getattr(torchvision.models, arch)(weights=None)
    if source.kind == "imagenet":
        load_backbone_state(model, _load_imagenet(arch, source), f"ImageNet weights for {arch}")
    elif source.kind in ("mini", "file"):
        load_backbone_state(model, safe_load_state(source.path), source.name)
    # the new head: one output per class (the seeds: copy every layer but the output layer)
    torch.manual_seed(seed + 1)
    model.fc = nn.Linear(model.fc.in_features, n_classes)
    return model


def stages(model: nn.Module) -> list[nn.Module]:
    return [nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool), model.layer1, model.layer2, model.layer3, model.layer4]


def forward_until(model: nn.Module, x: torch.Tensor, k: int) -> torch.Tensor:
    """Output of the first k stages; for k=5 the pooled feature vector (N, C)."""
    for st in stages(model)[:k]:
        x = st(x)
    if k == 5:
        x = torch.flatten(model.avgpool(x), 1)
    return x


def forward_from(model: nn.Module, x: torch.Tensor, k: int) -> torch.Tensor:
    """The rest of the network on the output of the first k stages."""
    if k < 5:
        for st in stages(model)[k:]:
            x = st(x)
        x = torch.flatten(model.avgpool(x), 1)
    return model.fc(x)


def set_trainable(model: nn.Module, k: int) -> None:
    """Freeze the first k stages (requires_grad False); everything after trains."""
    for i, st in enumerate(stages(model)):
        for p in st.parameters():
            p.requires_grad_(i >= k)
    for p in model.fc.parameters():
        p.requires_grad_(True)


def train_mode(model: nn.Module, k: int) -> None:
    """model.train(), but BatchNorm in frozen stages stays in eval mode (its running stats are
    part of the pretrained weights; batch statistics of a few images would change the features)."""
    model.train()
    for st in stages(model)[:k]:
        st.eval()


@torch.no_grad()
def adapt_batchnorm(model: nn.Module, k: int, images_uint8: torch.Tensor, pp: "Preprocessing", dev: torch.device,
                    batch_size: int = 64) -> None:
    """AdaBN (Li et al. 2016): re-estimate the running statistics of the BatchNorm layers in the first
    k stages on the user's images, keeping every learned weight.

    The pretrained statistics describe the pretraining images; images of another kind or at another
    size shift them, and a frozen network then normalises with the wrong mean and variance. The new
    statistics are the plain average over all batches (momentum None), of centre-cropped images.
    """
    bns = [m for st in stages(model)[:k] for m in st.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns or len(images_uint8) == 0:
        return
    model.eval()
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average: every batch counts the same
        m.train()
    for i in range(0, len(images_uint8), batch_size):
        forward_until(model, devices.to_device(normalize(center_crop(images_uint8[i:i + batch_size], pp.image_size), pp), dev), k)
    for m in bns:
        m.momentum = 0.1
        m.eval()


def count_params(model: nn.Module) -> dict:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"trainable": trainable, "total": total}


def param_groups(model: nn.Module, cfg: FinetuneConfig, k: int, phase2: bool = False) -> list[dict]:
    """Optimizer parameter groups with their learning rates.

    full:      pretrained stages lr/10, new head lr
    two-phase: phase 2 spreads lr geometrically from lr/100 (stem) to lr (head), like fastai's
               fit_one_cycle(slice(lr/100, lr)) after base_lr /= 2
    others:    every trainable parameter at lr
    """
    st = stages(model)
    if cfg.strategy == "full":
        return [{"name": "backbone", "params": [p for s in st for p in s.parameters()], "lr": cfg.lr / 10},
                {"name": "head", "params": list(model.fc.parameters()), "lr": cfg.lr}]
    if cfg.strategy == "two-phase" and phase2:
        base = cfg.lr / 2
        lrs = np.geomspace(base / 100, base, num=6)
        groups = [{"name": name, "params": list(s.parameters()), "lr": float(lr)} for name, s, lr in zip(STAGES, st, lrs[:5])]
        return groups + [{"name": "head", "params": list(model.fc.parameters()), "lr": float(lrs[5])}]
    params = [p for s in st[k:] for p in s.parameters()] + list(model.fc.parameters())
    return [{"name": "trainable", "params": params, "lr": cfg.lr}]


def make_optimizer(groups: list[dict], cfg: FinetuneConfig) -> torch.optim.Optimizer:
    for g in groups:
        g["base_lr"] = g["lr"]
    wd = cfg.weight_decay or 0.0  # (None: the linear probe's L2 is chosen by cross-validation instead)
    if cfg.optimizer == "lbfgs":
        # the probe fits with its own L-BFGS (engine/linear_probe.py); this never steps, it only
        # gives the checkpoint code the same optimizer object to save as every other strategy
        return torch.optim.SGD(groups, lr=0.0)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, weight_decay=wd)
    return torch.optim.SGD(groups, momentum=0.9, weight_decay=wd)


def classifier_step(opt: torch.optim.Optimizer, logits: torch.Tensor, y: torch.Tensor,
                    label_smoothing: float = 0.0) -> tuple[float, int]:
    """Cross-entropy, backward and one optimizer step; returns (summed loss, correct) over the batch.

    The plain fp32 step of the Lab's and the autoencoder's small loops (fine-tuning has its own, with AMP).
    """
    loss = F.cross_entropy(logits, y, label_smoothing=label_smoothing)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.item() * len(y), int((logits.argmax(1) == y).sum())


# ============================================================================= checkpoints
def trainable_state(model: nn.Module, k: int) -> dict[str, torch.Tensor]:
    """State (parameters and BN buffers) of everything after the first k stages: the only part
    that can change while k stages are frozen. With k=0 the whole model."""
    frozen = tuple(f"{name}." for name in ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4")[: (k + 1 if k else 0)])
    return {n: v for n, v in model.state_dict().items() if not n.startswith(frozen)}


def save_checkpoint(run_dir: Path, model: nn.Module, opt: torch.optim.Optimizer, meta: dict, k: int,
                    best_state: dict[str, torch.Tensor]) -> None:
    """last.safetensors (trainable model part, best weights so far, optimizer tensors) and
    last.json (everything else). Frozen stages are not saved: a resume rebuilds them from the
    starting weights and checks their hash. Never pickle."""
    tensors = {f"model.{n}": v.detach().cpu().contiguous() for n, v in trainable_state(model, k).items()}
    tensors.update({f"best.{n}": v.detach().cpu().contiguous() for n, v in best_state.items()})
    checkpoints.save(run_dir / "last", tensors, opt, meta)


def save_weights(path: Path, model: nn.Module, metadata: dict | None = None) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tmp = workspace.atomic_path(path)
    save_file(state, str(tmp), metadata={k: json.dumps(v) for k, v in (metadata or {}).items()})
    os.replace(tmp, path)


# ============================================================================= training
class Quiet:
    """A stand-in JobContext when finetune() is called without one."""

    resume = False

    def report(self, **_):
        pass

    def cancelled(self) -> bool:
        return False


def epoch_batches(n: int, batch_size: int, gen: torch.Generator | None) -> list[torch.Tensor]:
    """Index batches for one epoch (shuffled with `gen`); a last batch of 1 joins the previous one
    (BatchNorm in training mode cannot normalise a single sample)."""
    idx = torch.randperm(n, generator=gen) if gen is not None else torch.arange(n)
    out = list(torch.split(idx, batch_size))
    if len(out) > 1 and len(out[-1]) == 1:
        last = out.pop()  # (not out[-2] = cat(.., out.pop()): the target index is taken after the pop)
        out[-1] = torch.cat([out[-1], last])
    return out


def epoch_gen(seed: int, epoch: int) -> torch.Generator:
    """Per-epoch generator: shuffling and augmentation depend only on (seed, epoch), so a resumed
    run sees exactly the batches an uninterrupted one would have."""
    return torch.Generator().manual_seed(seed * 100_003 + epoch)


@torch.inference_mode()
def _predict_logits(model: nn.Module, inputs: torch.Tensor, k: int, dev: torch.device, amp, bs: int = 256, pp: Preprocessing | None = None) -> torch.Tensor:
    """Logits for a whole tensor: cached features (k>0) or uint8 images (k=0, centre-cropped)."""
    model.eval()
    out = []
    for i in range(0, len(inputs), bs):
        x = inputs[i:i + bs]
        if k == 0:
            x = normalize(center_crop(x, pp.image_size), pp)
        with devices.autocast(dev, amp):
            out.append(forward_from(model, devices.to_device(x, dev), k).float().cpu())
    return torch.cat(out) if out else torch.empty(0)


def _metrics(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    if len(labels) == 0:
        return float("nan"), float("nan")
    loss = F.cross_entropy(logits, labels).item()
    acc = (logits.argmax(1) == labels).float().mean().item()
    return loss, acc


def evaluation_report(logits: torch.Tensor, labels: torch.Tensor, classes: list[str], files: list[str], max_mistakes: int = 50) -> dict:
    """Confusion matrix (rows true, columns predicted), per-class precision/recall/F1, mistakes by confidence."""
    n = len(classes)
    probs = logits.softmax(1)
    conf, pred = probs.max(1)
    cm = torch.zeros((n, n), dtype=torch.long)
    for t, p in zip(labels.tolist(), pred.tolist()):
        cm[t, p] += 1
    per_class = []
    for c in range(n):
        tp = cm[c, c].item()
        support = cm[c].sum().item()
        predicted = cm[:, c].sum().item()
        precision = tp / predicted if predicted else 0.0
        recall = tp / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class.append({"class": classes[c], "precision": round(precision, 4), "recall": round(recall, 4), "f1": round(f1, 4), "support": support})
    mistakes = [
        {"file": files[i], "true": classes[labels[i]], "pred": classes[pred[i]], "conf": round(conf[i].item(), 4)}
        for i in range(len(labels)) if pred[i] != labels[i]
    ]
    mistakes.sort(key=lambda m: -m["conf"])
    acc = (pred == labels).float().mean().item() if len(labels) else float("nan")
    return {"classes": classes, "accuracy": round(acc, 4), "confusion": cm.tolist(), "per_class": per_class,
            "mistakes": mistakes[:max_mistakes], "n_mistakes": len(mistakes)}


def finetune(cfg: FinetuneConfig, out_dir: Path, ctx=None) -> dict:
    """Train according to `cfg`, writing run.json, metrics.json, model.safetensors, last.*, eval.json.

    Returns the summary (best_val_acc, epochs_done, img_s, seconds, weights, ...). With
    ctx.resume it continues from out_dir/last.*; when ctx.cancelled() it stops within one step,
    saves what was learned (checkpoint + evaluation) and returns.
    """
    threads = torch.get_num_threads()
    try:
        return _finetune(cfg, out_dir, ctx, threads)
    finally:
        torch.set_num_threads(threads)


def _head_threads(dev: torch.device, head_only: bool, threads: int) -> None:
    """One CPU thread while only the head trains on cached features: its ops are tiny, and waking a
    second thread for each of them cost 100x (4 s vs 0.04 s for 80 steps, measured on a busy 2-core box)."""
    if dev.type == "cpu":
        torch.set_num_threads(1 if head_only else threads)


def _finetune(cfg: FinetuneConfig, out_dir: Path, ctx, threads: int) -> dict:
    from engine import features, imagedata

    cfg.validate()
    ctx = ctx or Quiet()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    dev = torch.device(getattr(ctx, "device", None) or devices.best_device())
    distributed.setup(dev)  # under torchrun: join the process group (no-op otherwise)
    dev = distributed.local_device(dev)
    # AMP: bf16 (or fp16 with loss scaling) autocast on CUDA for training; on CPU training stays fp32
    # (see engine/device.py). cuDNN picks the fastest convolution algorithms for our fixed input shape.
    train_amp = devices.amp_dtype(dev) if dev.type == "cuda" else None
    scaler = devices.grad_scaler(dev, train_amp)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True

    weights = "none" if cfg.strategy == "scratch" else cfg.weights
    source = sources.resolve_vision(cfg.model, weights)  # bad weights fail before any image is read
    ctx.report(phase="loading", message="reading images")
    data = imagedata.training_data(cfg.data, val_fraction=cfg.val_fraction, seed=cfg.seed)
    pp = run_preprocessing(cfg, source)
    n_classes = len(data.classes)
    # every setting left open comes from the recipe book, for this strategy and this many images
    cfg, recipe_info = cfg.filled(len(data.train), n_classes, source.kind)
    cfg.validate()
    model = build_model(cfg.model, n_classes, source, seed=cfg.seed)
    start_hash = features.weights_hash(model, 5)  # of the starting weights (a resume must start from the same)
    model = model.to(dev, memory_format=torch.channels_last)

    train_x = load_images([p for p, _ in data.train], pp.resize)
    train_y = torch.tensor([y for _, y in data.train], dtype=torch.long)
    val_x = load_images([p for p, _ in data.val], pp.resize)
    val_y = torch.tensor([y for _, y in data.val], dtype=torch.long)
    val_files = [str(p) for p, _ in data.val]
    most_frozen = max(frozen_stages(cfg, e) for e in range(cfg.epochs))
    features_id = start_hash
    if cfg.bn_adapt and most_frozen > 0:
        # deterministic in the images, so a resume (which rebuilds the frozen stages) repeats it exactly
        ctx.report(phase="loading", message="re-estimating BatchNorm statistics on your images")
        adapt_batchnorm(model, most_frozen, train_x, pp, dev)
        features_id = f"{start_hash}-adabn"

    use_cache, cache_reason = cache_plan(cfg)
    counts = {}
    for phase_k in sorted({frozen_stages(cfg, e) for e in range(cfg.epochs)}, reverse=True):
        set_trainable(model, phase_k)
        counts[f"frozen_{phase_k}"] = count_params(model) | {"frozen_stages": list(STAGES[:phase_k])}
    run_info = {
        "kind": "finetune",
        "config": asdict(cfg),
        "classes": data.classes,
        "data": {"version": data.version, "train_images": len(data.train), "val_images": len(data.val)},
        "arch": cfg.model,
        "weights": {"kind": source.kind, "name": source.name, "reason": source.reason},
        "preprocessing": pp.to_dict(),
        "strategy": {"name": cfg.strategy, "description": STRATEGIES[cfg.strategy], "params": counts},
        "feature_cache": {"used": use_cache, "reason": cache_reason},
        "recipe": recipe_info,
        "device": str(dev),
    }
    if distributed.is_main():
        workspace.atomic_write_json(out_dir / "run.json", run_info)

    # ---- state: fresh, or from the last checkpoint
    metrics: list[dict] = []
    start_epoch, best = 0, {"val_acc": -1.0, "val_loss": float("inf"), "epoch": 0}
    resume_state = None
    best_state: dict[str, torch.Tensor] = {}  # best weights so far: the part that was trainable then
    if getattr(ctx, "resume", False) and (out_dir / "last.json").is_file():
        meta = json.loads((out_dir / "last.json").read_text())
        if meta.get("start_hash") != start_hash:
            raise UserError("the starting weights differ from the ones this run began with (e.g. 'auto' now finds other weights); "
                            "resume with the same --weights, or start a new run")
        tensors = safe_load_state(out_dir / "last.safetensors")
        model.load_state_dict({n[6:]: v for n, v in tensors.items() if n.startswith("model.")}, strict=False)
        best_state = {n[5:]: v for n, v in tensors.items() if n.startswith("best.")}
        metrics, start_epoch, best = meta["metrics"], meta["epoch"], meta["best"]
        resume_state = (tensors, meta["optimizer"], meta.get("opt_phase_k"))
        log.info("resuming at epoch %d", start_epoch)
    elif getattr(ctx, "resume", False):
        raise UserError(f"nothing to resume in {out_dir} (no checkpoint yet); start the run again")

    cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # k -> (train features, val features)
    opt, opt_k = None, (resume_state[2] if resume_state else None)
    probe = None  # the linear probe's L-BFGS fit (fitter lbfgs)
    step_times: list[float] = []
    last_saved, unsaved = time.time(), False
    images_trained, train_seconds = 0, 0.0
    epochs_done, cancelled, early_stopped = start_epoch, False, False
    k = frozen_stages(cfg, max(0, min(start_epoch, cfg.epochs - 1)))
    stale = 0 if not metrics else _stale_epochs(metrics)

    for epoch in range(start_epoch, cfg.epochs):
        k = frozen_stages(cfg, epoch)
        cached = use_cache and k > 0
        if cached and k not in cache:
            with distributed.main_first():  # rank 0 fills the disk cache, the others then read it
                feats = features.cached_features(model, k, train_x, val_x, pp, features_id, data.version, cfg.model, dev, ctx)
            if feats is None:  # the user cancelled during extraction
                cancelled = True
                break
            cache[k] = feats
        set_trainable(model, k)
        if opt_k is not None and opt_k != k and best_state:
            # entering a phase that trains more layers: the best weights so far are the current
            # model's frozen part (still untouched) plus the saved trainable part
            best_state = {**{n: v.detach().clone() for n, v in model.state_dict().items()}, **best_state}
        if opt is None or opt_k != k:
            phase2 = cfg.strategy == "two-phase" and k == 0
            opt = make_optimizer(param_groups(model, cfg, k, phase2=phase2), cfg)
            if resume_state is not None and resume_state[2] == k:
                checkpoints.load_optimizer(opt, resume_state[0], resume_state[1])
            resume_state, opt_k = None, k
            # what trains this phase; DistributedDataParallel under torchrun (averages the gradients)
            net = distributed.wrap(model, (lambda m, x, k=k: forward_from(m, x, k)) if cached else (lambda m, x: m(x)), dev)
        # the schedule runs over the epochs of the current phase (two-phase restarts it for phase 2)
        phase_start = 1 if (cfg.strategy == "two-phase" and k == 0) else 0
        phase_epochs = cfg.epochs - phase_start if not (cfg.strategy == "two-phase" and k == 5) else 1
        inputs = cache[k][0] if cached else train_x
        gen = epoch_gen(cfg.seed, epoch)
        batches = distributed.shard_batches(epoch_batches(len(inputs), cfg.batch_size, gen))  # this rank's part of each batch
        total_steps = phase_epochs * len(batches)

        _head_threads(dev, cached and k == 5, threads)
        train_mode(model, k)
        t_epoch = time.time()
        loss_sum, correct, seen = 0.0, 0, 0
        if cfg.optimizer == "lbfgs":
            # the linear probe: one chunk of L-BFGS iterations on all cached features is one "epoch"
            if probe is None:
                probe = _start_probe(model, cache[k][0], train_y, n_classes, cfg, ctx)
                recipe_info["weight_decay_chosen"] = probe.wd
            probe.step(LBFGS_ITERS_PER_EPOCH)
            w, b = probe.folded()
            with torch.no_grad():
                model.fc.weight.copy_(w)
                model.fc.bias.copy_(b)
            train_logits = probe.logits(cache[k][0]).float()
            loss_sum = F.cross_entropy(train_logits, devices.to_device(train_y, dev)).item() * len(train_y)
            correct, seen = int((train_logits.argmax(1).cpu() == train_y).sum()), len(train_y)
            batches = []  # no minibatch steps below
        for step, idx in enumerate(batches):
            if ctx.cancelled():
                cancelled = True
                break
            t_step = time.time()
            f = schedules.lr_factor((epoch - phase_start) * len(batches) + step, total_steps, cfg.schedule)
            for g in opt.param_groups:
                g["lr"] = g["base_lr"] * f
            y = devices.to_device(train_y[idx], dev)
            if cached:
                x = inputs[idx]
            elif cfg.augment:
                x = normalize(augment_batch(train_x[idx], pp, cfg.augment, gen), pp)
            else:
                x = normalize(center_crop(train_x[idx], pp.image_size), pp)
            x = devices.to_device(x, dev)
            with devices.autocast(dev, train_amp):
                logits = net(x)
                loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing or 0.0)
            if not math.isfinite(loss.item()):
                raise UserError(f"training diverged in epoch {epoch + 1} (the loss is not a number); lower the learning rate")
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            # bookkeeping and progress
            loss_sum += loss.item() * len(idx)
            correct += (logits.argmax(1) == y).sum().item()
            seen += len(idx)
            step_times.append(time.time() - t_step)
            remaining = (cfg.epochs - epoch) * len(batches) - step - 1
            avg = sum(step_times[-20:]) / len(step_times[-20:])
            ctx.report(phase="training", epoch=epoch + 1, epochs=cfg.epochs, step=step + 1, steps=len(batches),
                       loss=loss_sum / seen, acc=correct / seen, img_s=len(idx) / max(step_times[-1], 1e-9),
                       eta_s=remaining * avg)
        if cfg.optimizer != "lbfgs":  # (every rank fits the same probe on all features: nothing to sum)
            loss_sum, correct, seen = distributed.all_reduce_sums(loss_sum, correct, seen, device=dev)  # over all ranks
        correct, seen = int(correct), int(seen)
        distributed.sync_buffers(model)  # rank 0's BatchNorm statistics everywhere: every rank evaluates the same model
        epoch_seconds = time.time() - t_epoch
        train_seconds += epoch_seconds
        images_trained += seen
        if cancelled and seen == 0:
            break

        # ---- evaluate on the validation split
        ctx.report(phase="evaluating", epoch=epoch + 1, epochs=cfg.epochs)
        val_in = cache[k][1] if cached else val_x
        val_loss, val_acc = _metrics(_predict_logits(model, val_in, k if cached else 0, dev, train_amp, pp=pp), val_y)
        if cancelled:
            break  # a partial epoch: keep its weights (below), but do not count it as an epoch
        row = {"epoch": epoch + 1, "train_loss": round(loss_sum / seen, 5), "train_acc": round(correct / seen, 4),
               "val_loss": round(val_loss, 5), "val_acc": round(val_acc, 4), "seconds": round(epoch_seconds, 3),
               "img_s": round(seen / max(epoch_seconds, 1e-9), 1), "frozen_stages": k, "cached": cached}
        metrics.append(row)
        epochs_done = epoch + 1
        if val_acc > best["val_acc"] or (val_acc == best["val_acc"] and val_loss < best["val_loss"]):
            best = {"val_acc": val_acc, "val_loss": val_loss, "epoch": epoch + 1}
            best_state = {n: v.detach().clone() for n, v in trainable_state(model, k).items()}
        # checkpoint first: metrics.json never lists an epoch that a resume would not start after.
        # Epochs on cached features take milliseconds: then save at most every CHECKPOINT_EVERY_S
        # (and after the loop), or the disk syncs would cost more than the training.
        unsaved = True
        if time.time() - last_saved >= CHECKPOINT_EVERY_S or epoch + 1 == cfg.epochs:
            if distributed.is_main():
                save_checkpoint(out_dir, model, opt, {"epoch": epoch + 1, "metrics": metrics, "best": best, "opt_phase_k": k,
                                                      "start_hash": start_hash}, k, best_state)
                workspace.atomic_write_json(out_dir / "metrics.json", metrics)
            last_saved, unsaved = time.time(), False
        distributed.barrier()
        ctx.report(phase="training", epoch=epoch + 1, epochs=cfg.epochs, epoch_done=epoch + 1, train_loss=row["train_loss"],
                   val_loss=row["val_loss"], val_acc=row["val_acc"],
                   message=f"epoch {epoch + 1}/{cfg.epochs}: train loss {row['train_loss']:.4f}, val loss {row['val_loss']:.4f}, val acc {row['val_acc']:.3f}")
        stale = _stale_epochs(metrics)
        if cfg.early_stopping and stale >= cfg.early_stopping:
            early_stopped = True
            log.info("early stopping after epoch %d (val loss not better for %d epochs)", epoch + 1, stale)
            break

    # ---- what was learned is kept, also when cancelled mid-epoch
    ctx.report(phase="saving", message="saving and evaluating")
    if (cancelled or unsaved) and opt is not None and distributed.is_main():
        # keep what was learned in the unfinished epoch too: resume continues from these weights
        save_checkpoint(out_dir, model, opt, {"epoch": epochs_done, "metrics": metrics, "best": best, "opt_phase_k": opt_k,
                                              "start_hash": start_hash, "cancelled_mid_epoch": cancelled}, opt_k, best_state)
        workspace.atomic_write_json(out_dir / "metrics.json", metrics)
    # model.safetensors: the best epoch's weights (or the current ones when no epoch finished)
    if best_state:
        model.load_state_dict(best_state, strict=False)
    if distributed.is_main():
        save_weights(out_dir / "model.safetensors", model, {"classes": data.classes, "arch": cfg.model, "preprocessing": pp.to_dict()})
    # final evaluation of those weights: from the cached features when the last phase used them
    # (the frozen part is the same function), else through the whole network as predict does
    if use_cache and k > 0 and k in cache:
        logits = _predict_logits(model, cache[k][1], k, dev, train_amp)
    else:
        _head_threads(dev, False, threads)
        logits = _predict_logits(model, val_x, 0, dev, train_amp, pp=pp)
    report = evaluation_report(logits, val_y, data.classes, val_files)
    if distributed.is_main():
        workspace.atomic_write_json(out_dir / "eval.json", report)

    seconds = time.time() - t_start
    summary = {
        "best_val_acc": round(best["val_acc"], 4) if best["val_acc"] >= 0 else report["accuracy"],
        "best_epoch": best["epoch"],
        "final_val_acc": report["accuracy"],
        "epochs_done": epochs_done,
        "epochs": cfg.epochs,
        "img_s": round(images_trained / train_seconds, 1) if train_seconds else None,
        "seconds": round(seconds, 2),
        "train_seconds": round(train_seconds, 3),
        "weights": run_info["weights"],
        "strategy": cfg.strategy,
        "arch": cfg.model,
        "data": cfg.data,
        "classes": data.classes,
        "feature_cache": use_cache,
        "cancelled": cancelled,
        "early_stopped": early_stopped,
        "device": str(dev),
        "settings": {k: getattr(cfg, k) for k in recipes.RECIPE_FIELDS},
        "from_recipe": recipe_info["from_recipe"],
    }
    run_info["summary"] = summary
    if distributed.is_main():
        workspace.atomic_write_json(out_dir / "run.json", run_info)
    distributed.barrier()
    ctx.report(phase="finished" if not cancelled else "cancelled", message="cancelled: progress saved" if cancelled else "done")
    return summary


LBFGS_ITERS_PER_EPOCH = 10


def _start_probe(model: nn.Module, feats: torch.Tensor, train_y: torch.Tensor, n_classes: int, cfg: FinetuneConfig, ctx):
    """The linear probe's fit on the cached features: L2 strength by cross-validation unless set, and
    continuing from the current output layer (a resumed run keeps what it had learned)."""
    from engine import linear_probe

    x, y = feats.float(), devices.to_device(train_y, feats.device)
    wd = cfg.weight_decay
    if wd is None:
        ctx.report(phase="training", message="choosing the regularisation by cross-validation")
        wd, _ = linear_probe.choose_weight_decay(x, y, n_classes, seed=cfg.seed)
    probe = linear_probe.LogReg(x, y, n_classes, wd)
    probe.start_from(model.fc.weight.detach(), model.fc.bias.detach())
    return probe


def show_setting(name: str, value) -> str:
    """A training setting as a person reads it."""
    if isinstance(value, (list, tuple)):
        return ",".join(value) or "none"
    if value is None:
        return "cross-validated" if name == "weight_decay" else "from the recipe"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return f"{value:g}" if isinstance(value, float) else str(value)


def describe_settings(settings: dict, from_recipe: list[str]) -> str:
    """One line: the training settings, with those that came from the recipe book marked *."""
    parts = [f"{k.replace('_', ' ')} {show_setting(k, settings[k])}" + ("*" if k in from_recipe else "")
             for k in recipes.RECIPE_FIELDS if k in settings]
    return ", ".join(parts) + ("  (* from the recipe)" if from_recipe else "")


def plan_settings(cfg: FinetuneConfig) -> tuple[FinetuneConfig, dict]:
    """The settings a run of `cfg` will train with, before it starts: the recipe for its strategy
    and dataset fills what is None (what the form shows and the CLI prints). Decodes no image."""
    from engine import imagedata

    cfg.validate()
    source = sources.resolve_vision(cfg.model, "none" if cfg.strategy == "scratch" else cfg.weights)
    data = imagedata.training_data(cfg.data, val_fraction=cfg.val_fraction, seed=cfg.seed)
    filled, info = cfg.filled(len(data.train), len(data.classes), source.kind)
    return filled, {**info, "n_train": len(data.train), "n_classes": len(data.classes)}


def _stale_epochs(metrics: list[dict]) -> int:
    """Epochs since the best validation loss (0 when the last epoch is the best)."""
    losses = [m["val_loss"] for m in metrics]
    best_i = min(range(len(losses)), key=lambda i: (losses[i], i)) if losses else 0
    return len(losses) - 1 - best_i if losses else 0


def run_job(ctx) -> dict:
    """The `finetune` job runner (engine.jobs.RUNNERS)."""
    known = set(FinetuneConfig.__dataclass_fields__)
    unknown = sorted(set(ctx.config) - known)
    if unknown:
        raise UserError(f"unknown fine-tune option(s): {', '.join(unknown)}")
    cfg = FinetuneConfig(**ctx.config)
    return finetune(cfg, Path(ctx.run_dir), ctx)


# ============================================================================= predict
@dataclass
class LoadedModel:
    model: nn.Module
    classes: list[str]
    preprocessing: Preprocessing
    device: torch.device
    arch: str
    run_dir: Path
    info: dict = field(default_factory=dict)


def resolve_run(run: str | Path) -> Path:
    """A run folder path, or a run id in the workspace -> the run folder."""
    p = Path(run)
    if p.is_dir():
        return p
    from engine import runs

    try:
        d = runs.run_dir(runs.get(str(run))["id"])
    except UserError:
        raise UserError(f"{run!r} is neither a run folder nor a run id in this workspace") from None
    return d


def load_model(run_dir: str | Path) -> LoadedModel:
    """The best weights of a run, in eval mode on the best device, with its classes and preprocessing."""
    import torchvision

    run_dir = resolve_run(run_dir)
    info_path, weights_path = run_dir / "run.json", run_dir / "model.safetensors"
    if not info_path.is_file() or not weights_path.is_file():
        raise UserError(f"{run_dir} has no trained model yet (run.json and model.safetensors are needed)")
    info = json.loads(info_path.read_text())
    arch, classes = info.get("arch"), info.get("classes")
    if arch not in sources.VISION_ARCHS or not classes:
        raise UserError(f"{run_dir}/run.json does not describe a vision model")
    pp = Preprocessing(**info["preprocessing"])
    model = getattr(torchvision.models, arch)(weights=None)
    model.fc = nn.Linear(model.fc.in_features, len(classes))
    state = safe_load_state(weights_path)
    load_backbone_state(model, state, weights_path.name)
    fc = {k[3:]: v for k, v in state.items() if k.startswith("fc.")}
    if set(fc) != {"weight", "bias"} or tuple(fc["weight"].shape) != tuple(model.fc.weight.shape):
        raise UserError(f"{weights_path.name}: the output layer does not match the {len(classes)} classes in run.json")
    model.fc.load_state_dict(fc)
    dev = devices.best_device()
    model = model.to(dev, memory_format=torch.channels_last).eval()
    return LoadedModel(model, list(classes), pp, dev, arch, run_dir, info)


@torch.inference_mode()
def predict(loaded: LoadedModel, images: list, top_k: int = 3) -> list[list[tuple[str, float]]]:
    """Top-k (label, probability) per PIL image, with the run's own preprocessing."""
    if not images:
        return []
    top_k = max(1, min(int(top_k), len(loaded.classes)))
    pp = loaded.preprocessing
    x = torch.stack([center_crop(load_square(im, pp.resize), pp.image_size) for im in images])
    out = []
    for i in range(0, len(x), 64):
        probs = loaded.model(normalize(x[i:i + 64], pp).to(loaded.device)).float().softmax(1).cpu()
        p, idx = probs.topk(top_k, dim=1)
        out += [[(loaded.classes[j], float(q)) for q, j in zip(pr.tolist(), ix.tolist())] for pr, ix in zip(p, idx)]
    return out


# ============================================================================= export / import (engine/export.py)
def export_run(run_dir: str | Path, out_zip: Path, onnx: bool = True) -> Path:
    """ZIP with model.safetensors, labels.json, preprocessing.json, model_card.md (+ model.onnx)."""
    from engine import export

    return export.export_run(run_dir, out_zip, onnx=onnx)


def import_model(file: Path, labels: list[str] | None = None) -> str:
    """An exported ZIP or .safetensors uploaded back -> a workspace run id usable by predict."""
    from engine import export

    return export.import_model(file, labels=labels)
