"""Where the model looked: Grad-CAM heatmaps (Selvaraju et al. 2017) through captum's LayerGradCam.

For a class c, the gradient of c's score with respect to the last convolutional stage's feature
maps, averaged over each map, says how much that map matters for c; the ReLU of the maps' weighted
sum is where in the image the evidence for c lies. It is coarse (the last stage of a ResNet at
160 px is 5 x 5 cells, upsampled to the image; small inputs use the stage before, see target_layer), class-specific (ask for another class and the
heat moves to what would speak for it) and costs one forward and one backward pass per image.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from engine.core.errors import UserError
from engine.models import backbones

# a perceptually ordered ramp for the heat (dark blue -> teal -> yellow), blended over the image
RAMP = np.array([[48, 18, 59], [50, 101, 200], [27, 207, 212], [164, 252, 60], [250, 186, 57], [180, 4, 4]], np.float32)
ALPHA = 0.5  # the heat's weight where it is hottest (it fades to 0 where the model did not look)


@dataclass
class Heatmap:
    target: int          # the class the heat is for
    label: str
    probability: float   # the model's probability for that class
    heat: np.ndarray     # (S, S) float32 in [0, 1]
    crop: np.ndarray     # (S, S, 3) uint8: the image as the model saw it
    overlay: np.ndarray  # (S, S, 3) uint8: the heat blended over the crop


MIN_CELLS = 4  # the heat's grid is at least this many cells across
_layers: dict[tuple[str, int], str] = {}  # (family, input size) -> the stage Grad-CAM uses: found once, not per image


@torch.no_grad()
def target_layer(model: nn.Module, size: int) -> nn.Module:
    """The deepest stage whose feature maps are still at least MIN_CELLS across at this input size:
    the last stage (layer4 of a ResNet: 7 x 7 at 224 px), or the one before it for small inputs
    (at 64 px layer4 is 2 x 2 cells, too coarse to show anything; layer3 is 4 x 4)."""
    family = backbones.entry(model).name
    if (family, size) not in _layers:
        names = [s[-1] for s in backbones.entry(model).stages]
        h = torch.zeros(1, 3, size, size, device=next(model.parameters()).device)
        widths = []
        for name, stage in zip(names, backbones.stages(model)):
            h = stage(h)
            widths.append((name, min(h.shape[-2:]) if h.dim() == 4 else 0))
        _layers[family, size] = next((n for n, w in reversed(widths) if w >= MIN_CELLS), names[-1])
    return model.get_submodule(_layers[family, size])


def colorize(heat: np.ndarray) -> np.ndarray:
    """(H, W) in [0, 1] -> (H, W, 3) uint8 along RAMP."""
    pos = np.clip(heat, 0, 1) * (len(RAMP) - 1)
    lo = np.floor(pos).astype(int).clip(0, len(RAMP) - 2)
    t = (pos - lo)[..., None]
    return (RAMP[lo] * (1 - t) + RAMP[lo + 1] * t).astype(np.uint8)


def blend(crop: np.ndarray, heat: np.ndarray) -> np.ndarray:
    a = (ALPHA * heat)[..., None]
    return (crop.astype(np.float32) * (1 - a) + colorize(heat).astype(np.float32) * a).astype(np.uint8)


def explain(loaded, images: list, target: int | str | None = None) -> list[Heatmap]:
    """A Grad-CAM heatmap per PIL image for `target` (a class index or name; None: each image's predicted class)."""
    from captum.attr import LayerAttribution, LayerGradCam

    from engine.vision import preprocess  # deferred: imports torch

    if not images:
        return []
    classes = loaded.classes
    if isinstance(target, str):
        if target not in classes:
            raise UserError(f"unknown class {target!r}; the model knows {', '.join(classes)}")
        target = classes.index(target)
    if target is not None and not (isinstance(target, int) and 0 <= target < len(classes)):
        raise UserError(f"class index {target!r} is out of range (0..{len(classes) - 1})")
    pp, model = loaded.preprocessing, loaded.model
    layer = target_layer(model, pp.image_size)
    x8 = preprocess.crops(images, pp)
    out = []
    for i in range(len(images)):
        x = preprocess.normalize(x8[i:i + 1], pp).to(loaded.device).contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            probs = model(x).float().softmax(1)[0].cpu()
        t = int(probs.argmax()) if target is None else target
        with torch.enable_grad():
            attr = LayerGradCam(model, layer).attribute(x, target=t, relu_attributions=True)
        if attr.dim() != 4:
            raise UserError(f"{loaded.arch} has no convolutional feature maps to explain")
        heat = LayerAttribution.interpolate(attr.detach().float(), tuple(x.shape[-2:]), interpolate_mode="bilinear")[0].mean(0)
        heat = heat.cpu().numpy()
        heat = heat / heat.max() if heat.max() > 0 else np.zeros_like(heat)  # no evidence anywhere: no heat
        crop = x8[i].permute(1, 2, 0).numpy()
        out.append(Heatmap(t, classes[t], float(probs[t]), heat.astype(np.float32), crop, blend(crop, heat)))
    return out


def explain_files(loaded, paths: list, targets: list[str]) -> list[Heatmap | None]:
    """A heatmap per image file for the class named beside it (None for a file that is gone or unreadable)."""
    from PIL import Image

    out = []
    for path, target in zip(paths, targets):
        try:
            with Image.open(path) as im:
                image = im.convert("RGB")
        except (OSError, ValueError):
            out.append(None)
            continue
        out.append(explain(loaded, [image], target=target)[0])
    return out


def save(heatmaps: list[Heatmap], names: list[str], out_dir: Path) -> list[Path]:
    """Each overlay as <name>.heatmap.png beside the crop (side by side) in out_dir."""
    from PIL import Image

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for h, name in zip(heatmaps, names):
        p = out_dir / f"{Path(name).stem}.heatmap.png"
        Image.fromarray(np.concatenate([h.crop, h.overlay], axis=1)).save(p)
        paths.append(p)
    return paths
