"""Fine-tuning a pretrained ConvNet: strategies, training loop, evaluation, prediction.

The flow (torchvision references/classification/train.py, flattened):

    data   = imagedata.training_data(...)          # stored image paths, stratified split, version hash
    source = sources.resolve_vision(arch, weights)  # which weights and why
    model  = build_model(arch, n_classes, source)   # torchvision model, weights loaded safely, new head
    for epoch: loop.train_one_epoch(...); evaluate  # FinetuneRun: phases, best weights, checkpoints

Every backbone is five *stages* (stem, layer1 ... layer4), a pool and a head (engine/backbones.py
says which layers those are for each family). Strategies differ in how many stages stay frozen:

    linear    k=5  only the new head trains
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
from engine import backbones, checkpoints, distributed, jobs, loop, optimizers, recipes, schedules, sources, workspace
from engine.errors import UserError
from engine.finetune_config import AUGMENTATIONS, OPTIMIZERS, SCHEDULES, STRATEGIES, FinetuneConfig  # noqa: F401 (vision's API)

log = logging.getLogger(__name__)

STAGES = backbones.STAGES
CHECKPOINT_EVERY_S = 10.0  # at most this often (and always after the last epoch): a save of a trained ResNet and its AdamW state costs ~0.4 s on a CPU, a fifth of a short epoch
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


@dataclass(frozen=True)
class Phase:
    """A stretch of epochs trained with the same frozen stages and one optimizer; the learning-rate
    schedule runs over each phase (two-phase restarts it when everything unfreezes)."""

    first_epoch: int
    epochs: int
    frozen: int            # how many of the 5 stages stay frozen (5: only the new fc trains)
    rates: str = "one"     # one: every trainable parameter at lr | backbone/10 | ladder (see param_groups)

    @property
    def end(self) -> int:
        return self.first_epoch + self.epochs


def phases(cfg: FinetuneConfig) -> list[Phase]:
    """A strategy as data: the phases it trains in for cfg.epochs epochs (None: open-ended)."""
    e = cfg.epochs if cfg.epochs is not None else 10**9
    if cfg.strategy == "linear":
        return [Phase(0, e, 5)]
    if cfg.strategy == "partial":
        return [Phase(0, e, cfg.freeze)]
    if cfg.strategy == "full":
        return [Phase(0, e, 0, "backbone/10")]
    if cfg.strategy == "two-phase":  # fastai's fine_tune: one epoch of the head alone, then everything
        return [Phase(0, 1, 5), Phase(1, max(1, e - 1), 0, "ladder")]
    return [Phase(0, e, 0)]  # scratch


def phase_at(plan: list[Phase], epoch: int) -> Phase:
    """The phase that `epoch` (0-based) belongs to."""
    return next((p for p in plan if epoch < p.end), plan[-1])


def frozen_stages(cfg: FinetuneConfig, epoch: int) -> int:
    """How many of the 5 stages are frozen in `epoch` (0-based). 5 = everything but fc."""
    return phase_at(phases(cfg), epoch).frozen


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
    from engine import models

    path = source.path if source.path is not None and source.path.is_file() else models.ensure_vision(arch)
    # torchvision's own .pth checkpoint: only ever weights_only=True
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise UserError(f"could not read ImageNet weights {path.name} ({str(err)[:100]}); delete it on the Models page "
                        "(or `python -m engine models delete`) to download it again") from None


def load_backbone_state(model: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """Load every layer but the head from `state`; names and shapes must match exactly."""
    head = backbones.head_prefix(backbones.entry(model).name)
    want = {k: v for k, v in model.state_dict().items() if not k.startswith(head)}
    got = {k: v for k, v in state.items() if not k.startswith(head)}
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
    """torchvision `arch` with `source` weights in every layer but the head, and a new head (n_classes, seeded)."""
    if source.kind in ("imagenet", "mini", "file"):
        # every backbone tensor is overwritten below: skip the random init (build on the meta device)
        model = backbones.empty(arch)
    else:
        torch.manual_seed(seed)
        model = backbones.construct(arch)
    if source.kind == "imagenet":
        load_backbone_state(model, _load_imagenet(arch, source), f"ImageNet weights for {arch}")
    elif source.kind in ("mini", "file"):
        load_backbone_state(model, safe_load_state(source.path), source.name)
    # the new head: one output per class (the seeds: copy every layer but the output layer)
    torch.manual_seed(seed + 1)
    backbones.set_head(model, nn.Linear(backbones.feature_dim(model), n_classes))
    return model


stages = backbones.stages
head = backbones.head


def forward_until(model: nn.Module, x: torch.Tensor, k: int) -> torch.Tensor:
    """Output of the first k stages; for k=5 the pooled feature vector (N, C)."""
    for st in stages(model)[:k]:
        x = st(x)
    if k == 5:
        x = backbones.pool(model)(x)
    return x


def forward_from(model: nn.Module, x: torch.Tensor, k: int) -> torch.Tensor:
    """The rest of the network on the output of the first k stages."""
    if k < 5:
        for st in stages(model)[k:]:
            x = st(x)
        x = backbones.pool(model)(x)
    return head(model)(x)


def set_trainable(model: nn.Module, k: int) -> None:
    """Freeze the first k stages (requires_grad False); everything after trains."""
    for i, st in enumerate(stages(model)):
        for p in st.parameters():
            p.requires_grad_(i >= k)
    for p in backbones.pool_parameters(model):  # a pretrained neck (MobileNetV3) is frozen with the last stage
        p.requires_grad_(k < 5)
    for p in head(model).parameters():
        p.requires_grad_(True)


def train_mode(model: nn.Module, k: int) -> None:
    """model.train(), but BatchNorm in frozen stages stays in eval mode (its running stats are
    part of the pretrained weights; batch statistics of a few images would change the features)."""
    model.train()
    for st in stages(model)[:k]:
        st.eval()
    if k >= 5:
        backbones.pool(model).eval()


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


def param_groups(model: nn.Module, lr: float, k: int, rates: str = "one") -> list[dict]:
    """Optimizer parameter groups of everything after the first k stages, with their learning rates.

    one:          every trainable parameter at lr
    backbone/10:  (full) pretrained stages lr/10, new head lr
    ladder:       (two-phase, phase 2) lr spread geometrically from lr/100 (stem) to lr (head), like
                  fastai's fit_one_cycle(slice(lr/100, lr)) after base_lr /= 2
    """
    st = stages(model)
    neck = backbones.pool_parameters(model) if k < 5 else []  # pretrained layers after the last stage (if any)
    fc = list(head(model).parameters())
    if rates == "backbone/10":
        return [{"name": "backbone", "params": [p for s in st[k:] for p in s.parameters()] + neck, "lr": lr / 10},
                {"name": "head", "params": fc, "lr": lr}]
    if rates == "ladder":
        base = lr / 2
        lrs = np.geomspace(base / 100, base, num=6)
        groups = [{"name": name, "params": list(s.parameters()), "lr": float(r)} for name, s, r in zip(STAGES, st, lrs[:5])]
        groups[-1]["params"] += neck
        return groups + [{"name": "head", "params": fc, "lr": float(lrs[5])}]
    params = [p for s in st[k:] for p in s.parameters()] + neck + fc
    return [{"name": "trainable", "params": params, "lr": lr}]


def make_optimizer(groups: list[dict], cfg: FinetuneConfig) -> torch.optim.Optimizer:
    wd = cfg.weight_decay or 0.0  # (None: the linear probe's L2 is chosen by cross-validation instead)
    if cfg.optimizer == "lbfgs":
        # the probe fits with its own L-BFGS (engine/linear_probe.py); this never steps, it only
        # gives the checkpoint code the same optimizer object to save as every other strategy
        return torch.optim.SGD(groups, lr=0.0)
    return optimizers.make(groups, cfg.optimizer, wd)


# ============================================================================= checkpoints
def trainable_state(model: nn.Module, k: int) -> dict[str, torch.Tensor]:
    """State (parameters and BN buffers) of everything after the first k stages: the only part
    that can change while k stages are frozen. With k=0 the whole model."""
    frozen = backbones.prefixes(backbones.entry(model).name, k)
    return {n: v for n, v in model.state_dict().items() if not n.startswith(frozen)}


def save_checkpoint(run_dir: Path, model: nn.Module, opt: torch.optim.Optimizer, meta: dict, k: int,
                    best_state: dict[str, torch.Tensor]) -> None:
    """last.safetensors (trainable model part, best weights so far, optimizer tensors) and
    last.json (everything else). Frozen stages are not saved: a resume rebuilds them from the
    starting weights and checks their hash. Never pickle."""
    tensors = {f"model.{n}": v.detach().cpu().contiguous() for n, v in trainable_state(model, k).items()}
    tensors.update({f"best.{n}": v.detach().cpu().contiguous() for n, v in best_state.items()})
    checkpoints.save(run_dir / "last", tensors, opt, meta)


def save_weights(path: Path, model: nn.Module, metadata: dict | None = None, dtype: str | None = None) -> None:
    """The whole state dict as safetensors; dtype "float16" halves the floating tensors (exports)."""
    from safetensors.torch import save_file

    half = dtype == "float16"
    state = {k: (v.half() if half and v.is_floating_point() else v).detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tmp = workspace.atomic_path(path)
    save_file(state, str(tmp), metadata={k: json.dumps(v) for k, v in (metadata or {}).items()})
    os.replace(tmp, path)


# ============================================================================= training
def predict_logits(model: nn.Module, inputs: torch.Tensor, k: int, dev: torch.device, amp, pp: Preprocessing | None = None) -> torch.Tensor:
    """Logits for a whole tensor: cached features (k>0) or uint8 images (k=0, centre-cropped)."""
    model.eval()
    if k:
        prepare = lambda x: devices.to_device(x, dev)  # noqa: E731
    else:
        prepare = lambda x: devices.to_device(normalize(center_crop(x, pp.image_size), pp), dev)  # noqa: E731
    return loop.predict(lambda x: forward_from(model, x, k), inputs, prepare=prepare, dev=dev, amp=amp)


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
        run = FinetuneRun(cfg, Path(out_dir), ctx or jobs.Quiet(), threads)
        run.prepare()
        run.restore()
        for epoch in range(run.start_epoch, run.cfg.epochs):
            if not run.train_epoch(epoch):
                break
        return run.finish()
    finally:
        torch.set_num_threads(threads)


def _head_threads(dev: torch.device, head_only: bool, threads: int) -> None:
    """One CPU thread while only the head trains on cached features: its ops are tiny, and waking a
    second thread for each of them cost 100x (4 s vs 0.04 s for 80 steps, measured on a busy 2-core box)."""
    if dev.type == "cpu":
        torch.set_num_threads(1 if head_only else threads)


class FinetuneRun:
    """One fine-tuning run, in the order finetune() calls its steps:

        prepare()          device, data, recipe, model, run.json
        restore()          the last checkpoint when resuming (else a fresh start)
        train_epoch(e)     for each epoch: enter its phase, train (loop.train_one_epoch or the probe's
                           L-BFGS chunk), evaluate, keep the best weights, checkpoint, early stopping
        finish()           best weights -> model.safetensors, evaluation, summary

    The state between the steps lives on the object, as in minGPT's Trainer.
    """

    def __init__(self, cfg: FinetuneConfig, out_dir: Path, ctx, threads: int):
        self.cfg, self.out_dir, self.ctx, self.threads = cfg, out_dir, ctx, threads

    # ------------------------------------------------------------------ set-up
    def prepare(self) -> None:
        from engine import features, imagedata

        cfg, ctx = self.cfg.validate(), self.ctx
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.t_start = time.time()
        dev = torch.device(getattr(ctx, "device", None) or devices.best_device())
        distributed.setup(dev)  # under torchrun: join the process group (no-op otherwise)
        self.dev = dev = distributed.local_device(dev)
        # AMP: bf16 (or fp16 with loss scaling) autocast on CUDA for training; on CPU training stays fp32
        # (see engine/device.py). cuDNN picks the fastest convolution algorithms for our fixed input shape.
        self.amp = devices.amp_dtype(dev) if dev.type == "cuda" else None
        self.scaler = devices.grad_scaler(dev, self.amp)
        if dev.type == "cuda":
            torch.backends.cudnn.benchmark = True

        weights = "none" if cfg.strategy == "scratch" else cfg.weights
        source = sources.resolve_vision(cfg.model, weights)  # bad weights fail before any image is read
        ctx.report(phase="loading", message="reading images")
        self.data = data = imagedata.training_data(cfg.data, val_fraction=cfg.val_fraction, seed=cfg.seed)
        self.pp = pp = run_preprocessing(cfg, source)
        self.n_classes = len(data.classes)
        # every setting left open comes from the recipe book, for this strategy and this many images
        grey = imagedata.looks_grey([p for p, _ in data.train])
        cfg, self.recipe_info = cfg.filled(len(data.train), self.n_classes, source.kind, grey)
        self.cfg = cfg = cfg.validate()
        self.phases = phases(cfg)
        if source.download:  # auto or imagenet with nothing cached and the network up: fetch, with progress
            from engine import models

            models.ensure_vision(cfg.model, report=lambda **p: ctx.report(
                **{**p, "message": f"downloading {cfg.model} ImageNet weights: {models.progress_line(p)}"}), cancelled=ctx.cancelled)
        model = build_model(cfg.model, self.n_classes, source, seed=cfg.seed)
        self.start_hash = features.weights_hash(model, 5)  # of the starting weights (a resume must start from the same)
        self.model = model = model.to(dev, memory_format=torch.channels_last)

        self.train_x = load_images([p for p, _ in data.train], pp.resize)
        self.train_y = torch.tensor([y for _, y in data.train], dtype=torch.long)
        self.val_x = load_images([p for p, _ in data.val], pp.resize)
        self.val_y = torch.tensor([y for _, y in data.val], dtype=torch.long)
        self.val_files = [str(p) for p, _ in data.val]
        most_frozen = max(p.frozen for p in self.phases)
        self.features_id = self.start_hash
        if cfg.bn_adapt and most_frozen > 0:
            # deterministic in the images, so a resume (which rebuilds the frozen stages) repeats it exactly
            ctx.report(phase="loading", message="re-estimating BatchNorm statistics on your images")
            adapt_batchnorm(model, most_frozen, self.train_x, pp, dev)
            self.features_id = f"{self.start_hash}-adabn"

        self.use_cache, cache_reason = cache_plan(cfg)
        counts = {}
        for phase_k in sorted({p.frozen for p in self.phases}, reverse=True):
            set_trainable(model, phase_k)
            counts[f"frozen_{phase_k}"] = count_params(model) | {"frozen_stages": list(STAGES[:phase_k])}
        self.run_info = {
            "kind": "finetune",
            "config": asdict(cfg),
            "classes": data.classes,
            "data": {"version": data.version, "train_images": len(data.train), "val_images": len(data.val),
                     # validation images spread over the classes, for the export's parity check
                     "parity_files": self.val_files[::max(1, len(self.val_files) // 20)][:20]},
            "arch": cfg.model,
            "weights": {"kind": source.kind, "name": source.name, "reason": source.reason},
            "preprocessing": pp.to_dict(),
            "strategy": {"name": cfg.strategy, "description": STRATEGIES[cfg.strategy], "params": counts},
            "feature_cache": {"used": self.use_cache, "reason": cache_reason},
            "recipe": self.recipe_info,
            "device": str(dev),
        }
        if distributed.is_main():
            workspace.atomic_write_json(self.out_dir / "run.json", self.run_info)

    def restore(self) -> None:
        """Fresh state, or the state of the last checkpoint (ctx.resume)."""
        out_dir = self.out_dir
        self.metrics: list[dict] = []
        self.start_epoch, self.best = 0, {"val_acc": -1.0, "val_loss": float("inf"), "epoch": 0}
        self.best_state: dict[str, torch.Tensor] = {}  # best weights so far: the part that was trainable then
        resume_state = None
        self.seconds_before = self.train_seconds_before = 0.0  # of earlier sessions of this run (a resume)
        if getattr(self.ctx, "resume", False) and (out_dir / "last.json").is_file():
            meta = json.loads((out_dir / "last.json").read_text())
            if meta.get("start_hash") != self.start_hash:
                raise UserError("the starting weights differ from the ones this run began with (e.g. 'auto' now finds other weights); "
                                "resume with the same --weights, or start a new run")
            tensors = safe_load_state(out_dir / "last.safetensors")
            self.model.load_state_dict({n[6:]: v for n, v in tensors.items() if n.startswith("model.")}, strict=False)
            self.best_state = {n[5:]: v for n, v in tensors.items() if n.startswith("best.")}
            self.metrics, self.start_epoch, self.best = meta["metrics"], meta["epoch"], meta["best"]
            resume_state = (tensors, meta["optimizer"], meta.get("opt_phase_k"))
            self.seconds_before, self.train_seconds_before = meta.get("seconds", 0.0), meta.get("train_seconds", 0.0)
            log.info("resuming at epoch %d", self.start_epoch)
        elif getattr(self.ctx, "resume", False):
            raise UserError(f"nothing to resume in {out_dir} (no checkpoint yet); start the run again")

        self.resume_state = resume_state
        self.cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # k -> (train features, val features)
        self.opt, self.opt_k, self.net = None, (resume_state[2] if resume_state else None), None
        self.probe = None  # the linear probe's L-BFGS fit (optimizer lbfgs)
        self.step_times: list[float] = []
        self.last_saved, self.unsaved = time.time(), False
        self.images_trained, self.train_seconds = 0, 0.0
        self.epochs_done, self.cancelled, self.early_stopped = self.start_epoch, False, False
        self.k = phase_at(self.phases, self.start_epoch).frozen

    # ------------------------------------------------------------------ one epoch
    def enter_phase(self, phase: "Phase", cached: bool) -> None:
        """Freeze what this phase freezes; a new optimizer (and DDP wrapper) when the phase changes."""
        model, k = self.model, phase.frozen
        set_trainable(model, k)
        if self.opt_k is not None and self.opt_k != k and self.best_state:
            # entering a phase that trains more layers: the best weights so far are the current
            # model's frozen part (still untouched) plus the saved trainable part
            self.best_state = {**{n: v.detach().clone() for n, v in model.state_dict().items()}, **self.best_state}
        if self.opt is None or self.opt_k != k:
            self.opt = make_optimizer(param_groups(model, self.cfg.lr, k, phase.rates), self.cfg)
            if self.resume_state is not None and self.resume_state[2] == k:
                checkpoints.load_optimizer(self.opt, self.resume_state[0], self.resume_state[1])
            self.resume_state, self.opt_k = None, k
            # what trains this phase; DistributedDataParallel under torchrun (averages the gradients)
            self.net = distributed.wrap(model, (lambda m, x, k=k: forward_from(m, x, k)) if cached else (lambda m, x: m(x)), self.dev)

    def train_epoch(self, epoch: int) -> bool:
        """Train and evaluate one epoch; False when the run stops here (cancelled or early-stopped)."""
        from engine import features

        cfg, ctx, model, dev = self.cfg, self.ctx, self.model, self.dev
        phase = phase_at(self.phases, epoch)
        self.k = k = phase.frozen
        cached = self.use_cache and k > 0
        if cached and k not in self.cache:
            with distributed.main_first():  # rank 0 fills the disk cache, the others then read it
                feats = features.cached_features(model, k, self.train_x, self.val_x, self.pp, self.features_id,
                                                 self.data.version, cfg.model, dev, ctx)
            if feats is None:  # the user cancelled during extraction
                self.cancelled = True
                return False
            self.cache[k] = feats
        self.enter_phase(phase, cached)
        _head_threads(dev, cached and k == 5, self.threads)
        train_mode(model, k)
        stats = self.probe_epoch(k) if cfg.optimizer == "lbfgs" else self.minibatch_epoch(epoch, phase, cached)
        distributed.sync_buffers(model)  # rank 0's BatchNorm statistics everywhere: every rank evaluates the same model
        self.train_seconds += stats.seconds
        self.images_trained += stats.seen
        self.cancelled = self.cancelled or stats.cancelled
        if self.cancelled and stats.seen == 0:
            return False

        ctx.report(phase="evaluating", epoch=epoch + 1, epochs=cfg.epochs)
        val_in = self.cache[k][1] if cached else self.val_x
        val_loss, val_acc = loop.metrics(predict_logits(model, val_in, k if cached else 0, dev, self.amp, pp=self.pp), self.val_y)
        if self.cancelled:
            return False  # a partial epoch: keep its weights (finish), but do not count it as an epoch
        row = stats.row(epoch + 1, val_loss, val_acc) | {"img_s": round(stats.seen / max(stats.seconds, 1e-9), 1),
                                                          "frozen_stages": k, "cached": cached}
        self.metrics.append(row)
        self.epochs_done = epoch + 1
        if val_acc > self.best["val_acc"] or (val_acc == self.best["val_acc"] and val_loss < self.best["val_loss"]):
            self.best = {"val_acc": val_acc, "val_loss": val_loss, "epoch": epoch + 1}
            self.best_state = {n: v.detach().clone() for n, v in trainable_state(model, k).items()}
        # checkpoint first: metrics.json never lists an epoch that a resume would not start after.
        # Epochs on cached features take milliseconds: then save at most every CHECKPOINT_EVERY_S
        # (and after the loop), or the disk syncs would cost more than the training.
        self.unsaved = True
        if time.time() - self.last_saved >= CHECKPOINT_EVERY_S or epoch + 1 == cfg.epochs:
            self.checkpoint(epoch + 1, k)
            self.last_saved, self.unsaved = time.time(), False
        distributed.barrier()
        ctx.report(phase="training", epoch=epoch + 1, epochs=cfg.epochs, epoch_done=epoch + 1, train_loss=row["train_loss"],
                   val_loss=row["val_loss"], val_acc=row["val_acc"],
                   message=f"epoch {epoch + 1}/{cfg.epochs}: train loss {row['train_loss']:.4f}, val loss {row['val_loss']:.4f}, val acc {row['val_acc']:.3f}")
        stale = _stale_epochs(self.metrics)
        if cfg.early_stopping and stale >= cfg.early_stopping:
            self.early_stopped = True
            log.info("early stopping after epoch %d (val loss not better for %d epochs)", epoch + 1, stale)
            return False
        return True

    def minibatch_epoch(self, epoch: int, phase: "Phase", cached: bool) -> loop.EpochStats:
        """One pass of minibatch steps (this rank's share of each batch), summed over all ranks."""
        cfg, dev, pp = self.cfg, self.dev, self.pp
        inputs = self.cache[phase.frozen][0] if cached else self.train_x
        gen = loop.epoch_gen(cfg.seed, epoch)
        batches = distributed.shard_batches(loop.epoch_batches(len(inputs), cfg.batch_size, gen))  # this rank's part of each batch
        # the schedule runs over the epochs of the current phase (two-phase restarts it for phase 2)
        done, total = (epoch - phase.first_epoch) * len(batches), phase.epochs * len(batches)

        def get_batch(idx):
            y = devices.to_device(self.train_y[idx], dev)
            if cached:
                x = inputs[idx]
            elif cfg.augment:
                x = normalize(augment_batch(self.train_x[idx], pp, cfg.augment, gen), pp)
            else:
                x = normalize(center_crop(self.train_x[idx], pp.image_size), pp)
            return devices.to_device(x, dev), y

        def progress(step, steps, n, seconds, stats):
            self.step_times.append(seconds)
            avg = sum(self.step_times[-20:]) / len(self.step_times[-20:])
            self.ctx.report(phase="training", epoch=epoch + 1, epochs=cfg.epochs, step=step + 1, steps=steps,
                            loss=stats.loss, acc=stats.acc, img_s=n / max(seconds, 1e-9),
                            eta_s=((cfg.epochs - epoch) * steps - step - 1) * avg)

        stats = loop.train_one_epoch(self.net, self.opt, batches, get_batch,
                                     lambda step: schedules.lr_factor(done + step, total, cfg.schedule),
                                     label_smoothing=cfg.label_smoothing, scaler=self.scaler, dev=dev, amp=self.amp,
                                     cancelled=self.ctx.cancelled, on_step=progress, epoch=epoch)
        stats.loss_sum, stats.correct, stats.seen = distributed.all_reduce_sums(stats.loss_sum, stats.correct, stats.seen, device=dev)
        stats.correct, stats.seen = int(stats.correct), int(stats.seen)
        return stats

    def probe_epoch(self, k: int) -> loop.EpochStats:
        """The linear probe: one chunk of L-BFGS iterations on all cached features is one "epoch".
        (Every rank fits the same probe on all features: nothing to sum.)"""
        t0 = time.time()
        feats = self.cache[k][0]
        if self.probe is None:
            self.probe = _start_probe(self.model, feats, self.train_y, self.n_classes, self.cfg, self.ctx)
            self.recipe_info["weight_decay_chosen"] = self.probe.wd
        self.probe.step(LBFGS_ITERS_PER_EPOCH)
        w, b = self.probe.folded()
        with torch.no_grad():
            head(self.model).weight.copy_(w)
            head(self.model).bias.copy_(b)
        logits = self.probe.logits(feats).float()
        y = devices.to_device(self.train_y, self.dev)
        return loop.EpochStats(loss_sum=F.cross_entropy(logits, y).item() * len(y), correct=int((logits.argmax(1) == y).sum()),
                               seen=len(y), seconds=time.time() - t0)

    def checkpoint(self, epoch: int, k: int, **extra) -> None:
        if distributed.is_main():
            save_checkpoint(self.out_dir, self.model, self.opt, {"epoch": epoch, "metrics": self.metrics, "best": self.best,
                                                                 "opt_phase_k": k, "start_hash": self.start_hash,
                                                                 "seconds": self.seconds(), "train_seconds": self.train_seconds_before + self.train_seconds,
                                                                 **extra},
                            k, self.best_state)
            workspace.atomic_write_json(self.out_dir / "metrics.json", self.metrics)

    def seconds(self) -> float:
        """Wall-clock seconds of this run over all its sessions (time between a crash and the resume not counted)."""
        return self.seconds_before + time.time() - self.t_start

    # ------------------------------------------------------------------ the end
    def finish(self) -> dict:
        """What was learned is kept, also when cancelled mid-epoch: checkpoint, best weights, evaluation, summary."""
        cfg, model, dev, k = self.cfg, self.model, self.dev, self.k
        self.ctx.report(phase="saving", message="saving and evaluating")
        if (self.cancelled or self.unsaved) and self.opt is not None:
            # keep what was learned in the unfinished epoch too: resume continues from these weights
            self.checkpoint(self.epochs_done, self.opt_k, cancelled_mid_epoch=self.cancelled)
        # model.safetensors: the best epoch's weights (or the current ones when no epoch finished)
        if self.best_state:
            model.load_state_dict(self.best_state, strict=False)
        if distributed.is_main():
            save_weights(self.out_dir / "model.safetensors", model, {"classes": self.data.classes, "arch": cfg.model,
                                                                     "preprocessing": self.pp.to_dict()})
        # final evaluation of those weights: from the cached features when the last phase used them
        # (the frozen part is the same function), else through the whole network as predict does
        if self.use_cache and k > 0 and k in self.cache:
            logits = predict_logits(model, self.cache[k][1], k, dev, self.amp)
        else:
            _head_threads(dev, False, self.threads)
            logits = predict_logits(model, self.val_x, 0, dev, self.amp, pp=self.pp)
        report = evaluation_report(logits, self.val_y, self.data.classes, self.val_files)
        if distributed.is_main():
            workspace.atomic_write_json(self.out_dir / "eval.json", report)

        best = self.best
        summary = {
            "best_val_acc": round(best["val_acc"], 4) if best["val_acc"] >= 0 else report["accuracy"],
            "best_epoch": best["epoch"],
            "final_val_acc": report["accuracy"],
            "epochs_done": self.epochs_done,
            "epochs": cfg.epochs,
            "img_s": round(self.images_trained / self.train_seconds, 1) if self.train_seconds else None,
            "seconds": round(self.seconds(), 2),  # all sessions of the run (a resumed run counts its earlier ones)
            "train_seconds": round(self.train_seconds_before + self.train_seconds, 3),
            "weights": self.run_info["weights"],
            "strategy": cfg.strategy,
            "arch": cfg.model,
            "data": cfg.data,
            "classes": self.data.classes,
            "feature_cache": self.use_cache,
            "cancelled": self.cancelled,
            "early_stopped": self.early_stopped,
            "device": str(dev),
            "settings": {k: getattr(cfg, k) for k in recipes.RECIPE_FIELDS},
            "from_recipe": self.recipe_info["from_recipe"],
        }
        self.run_info["summary"] = summary
        if distributed.is_main():
            workspace.atomic_write_json(self.out_dir / "run.json", self.run_info)
        distributed.barrier()
        self.ctx.report(phase="finished" if not self.cancelled else "cancelled",
                        message="cancelled: progress saved" if self.cancelled else "done")
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
    probe.start_from(head(model).weight.detach(), head(model).bias.detach())
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
    and dataset fills what is None (what the form shows and the CLI prints). Decodes a few
    thumbnails at most (is the data grey?)."""
    from engine import imagedata

    cfg.validate()
    source = sources.resolve_vision(cfg.model, "none" if cfg.strategy == "scratch" else cfg.weights)
    data = imagedata.training_data(cfg.data, val_fraction=cfg.val_fraction, seed=cfg.seed)
    filled, info = cfg.filled(len(data.train), len(data.classes), source.kind, imagedata.looks_grey([p for p, _ in data.train]))
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
    run_dir = resolve_run(run_dir)
    info_path, weights_path = run_dir / "run.json", run_dir / "model.safetensors"
    if not info_path.is_file() or not weights_path.is_file():
        raise UserError(f"{run_dir} has no trained model yet (run.json and model.safetensors are needed)")
    info = json.loads(info_path.read_text())
    arch, classes = info.get("arch"), info.get("classes")
    if arch not in sources.VISION_ARCHS or not classes:
        raise UserError(f"{run_dir}/run.json does not describe a vision model")
    pp = Preprocessing(**info["preprocessing"])
    model = backbones.empty(arch)  # every tensor is loaded below
    backbones.set_head(model, nn.Linear(backbones.feature_dim(model), len(classes)))
    state = safe_load_state(weights_path)
    load_backbone_state(model, state, weights_path.name)
    prefix = backbones.head_prefix(arch)
    fc = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if set(fc) != {"weight", "bias"} or tuple(fc["weight"].shape) != tuple(head(model).weight.shape):
        raise UserError(f"{weights_path.name}: the output layer does not match the {len(classes)} classes in run.json")
    head(model).load_state_dict(fc)
    dev = devices.best_device()
    model = model.to(dev, memory_format=torch.channels_last).eval()
    return LoadedModel(model, list(classes), pp, dev, arch, run_dir, info)


def crops(images: list, pp: Preprocessing) -> torch.Tensor:
    """PIL images -> the uint8 crops (N, 3, S, S) the model sees: shorter side to pp.resize, centre pp.image_size."""
    return torch.stack([center_crop(load_square(im, pp.resize), pp.image_size) for im in images])


@torch.inference_mode()
def probabilities(loaded: LoadedModel, images: list) -> torch.Tensor:
    """Class probabilities (N, classes) on the CPU for PIL images, with the run's own preprocessing."""
    pp = loaded.preprocessing
    x = crops(images, pp)
    return torch.cat([loaded.model(normalize(x[i:i + 64], pp).to(loaded.device)).float().softmax(1).cpu()
                      for i in range(0, len(x), 64)])


def predict(loaded: LoadedModel, images: list, top_k: int = 3) -> list[list[tuple[str, float]]]:
    """Top-k (label, probability) per PIL image, with the run's own preprocessing."""
    if not images:
        return []
    top_k = max(1, min(int(top_k), len(loaded.classes)))
    p, idx = probabilities(loaded, images).topk(top_k, dim=1)
    return [[(loaded.classes[j], float(q)) for q, j in zip(pr.tolist(), ix.tolist())] for pr, ix in zip(p, idx)]


# ============================================================================= export / import (engine/export.py)
def export_run(run_dir: str | Path, out_zip: Path, onnx: bool = True, half: bool = False) -> Path:
    """ZIP with model.safetensors, labels.json, preprocessing.json, model_card.md (+ model.onnx); fp16 weights with half."""
    from engine import export

    return export.export_run(run_dir, out_zip, onnx=onnx, half=half)


def import_model(file: Path, labels: list[str] | None = None) -> str:
    """An exported ZIP or .safetensors uploaded back -> a workspace run id usable by predict."""
    from engine import export

    return export.import_model(file, labels=labels)
