"""Building and adapting the network: a torchvision backbone with pretrained weights loaded safely
and a new head, freezing the first k stages, the parameter groups (lr/10 or a ladder for
pretrained layers), BatchNorm re-estimation, and the forward pass split at a stage.

Which layers form a family's stages, pool and head is engine/models/backbones.py's business.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from engine.core import device as devices
from engine.core import workspace
from engine.core.errors import UserError
from engine.core.safetensors import check_safetensors_header
from engine.models import backbones, sources, store
from engine.vision.preprocess import Preprocessing, center_crop, normalize

log = logging.getLogger(__name__)


STAGES = backbones.STAGES


# ============================================================================= model
def safe_load_state(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors file after checking its header; pickle is never used.

    The header is parsed and checked (size, dtypes, shapes x dtype size == byte ranges, ranges
    inside the file and not overlapping) before any tensor is allocated.
    """
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
    path = source.path if source.path is not None and source.path.is_file() else store.ensure_vision(arch)
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
        # every backbone tensor is overwritten below (the throw-away init leaves the seeds alone)
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


def forward_until(model: nn.Module, x: torch.Tensor, k: int) -> torch.Tensor:
    """Output of the first k stages; for k=5 the pooled feature vector (N, C)."""
    for st in backbones.stages(model)[:k]:
        x = st(x)
    if k == 5:
        x = backbones.pool(model)(x)
    return x


def forward_from(model: nn.Module, x: torch.Tensor, k: int) -> torch.Tensor:
    """The rest of the network on the output of the first k stages."""
    if k < 5:
        for st in backbones.stages(model)[k:]:
            x = st(x)
        x = backbones.pool(model)(x)
    return backbones.head(model)(x)


def set_trainable(model: nn.Module, k: int) -> None:
    """Freeze the first k stages (requires_grad False); everything after trains."""
    for i, st in enumerate(backbones.stages(model)):
        for p in st.parameters():
            p.requires_grad_(i >= k)
    for p in backbones.pool_parameters(model):  # a pretrained neck (MobileNetV3) is frozen with the last stage
        p.requires_grad_(k < 5)
    for p in backbones.head(model).parameters():
        p.requires_grad_(True)


def train_mode(model: nn.Module, k: int) -> None:
    """model.train(), but BatchNorm in frozen stages stays in eval mode (its running stats are
    part of the pretrained weights; batch statistics of a few images would change the features)."""
    model.train()
    for st in backbones.stages(model)[:k]:
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
    bns = [m for st in backbones.stages(model)[:k] for m in st.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
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
    st = backbones.stages(model)
    neck = backbones.pool_parameters(model) if k < 5 else []  # pretrained layers after the last stage (if any)
    fc = list(backbones.head(model).parameters())
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


# ============================================================================= checkpoints
def trainable_state(model: nn.Module, k: int) -> dict[str, torch.Tensor]:
    """State (parameters and BN buffers) of everything after the first k stages: the only part
    that can change while k stages are frozen. With k=0 the whole model."""
    frozen = backbones.prefixes(backbones.entry(model).name, k)
    return {n: v for n, v in model.state_dict().items() if not n.startswith(frozen)}


def save_weights(path: Path, model: nn.Module, metadata: dict | None = None, dtype: str | None = None) -> None:
    """The whole state dict as safetensors; dtype "float16" halves the floating tensors (exports)."""
    from safetensors.torch import save_file

    half = dtype == "float16"
    state = {k: (v.half() if half and v.is_floating_point() else v).detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tmp = workspace.atomic_path(path)
    save_file(state, str(tmp), metadata={k: json.dumps(v) for k, v in (metadata or {}).items()})
    os.replace(tmp, path)
