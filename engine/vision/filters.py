"""Inside the network: the first layer's filters and one image's feature maps, stage by stage.

Zeiler & Fergus (2014) and Yosinski et al. (2014): the first layer of a network trained on many
images learns oriented edges and colour blobs, useful for almost any image -- which is why it
transfers -- and deeper stages respond to ever larger, more specific patterns. Random weights
show noise. Pictures, not numbers: each filter or map scaled to its own range, tiled in a grid.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from engine.core.errors import UserError
from engine.models import backbones


def first_conv(model: nn.Module) -> nn.Conv2d:
    """The first convolution of the stem (conv1 of a ResNet)."""
    for m in backbones.stages(model)[0].modules():
        if isinstance(m, nn.Conv2d):
            return m
    raise UserError(f"{backbones.entry(model).name} has no convolution in its first stage")


def tile(images: np.ndarray, columns: int, pad: int = 1, scale: int = 1) -> np.ndarray:
    """(N, H, W[, 3]) uint8 -> one grid image, `columns` wide, white gaps of `pad` pixels, each cell x`scale`."""
    n, h, w = images.shape[:3]
    if scale > 1:
        images = images.repeat(scale, axis=1).repeat(scale, axis=2)
        h, w = h * scale, w * scale
    rows = -(-n // columns)
    shape = (rows * (h + pad) + pad, columns * (w + pad) + pad) + images.shape[3:]
    grid = np.full(shape, 255, np.uint8)
    for i, im in enumerate(images):
        r, c = divmod(i, columns)
        grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + c * (w + pad):pad + c * (w + pad) + w] = im
    return grid


def _to_uint8(x: np.ndarray) -> np.ndarray:
    """Each item of x (N, ...) scaled to 0..255 over its own range."""
    flat = x.reshape(len(x), -1)
    lo, hi = flat.min(1), flat.max(1)
    scaled = (flat - lo[:, None]) / np.maximum(hi - lo, 1e-12)[:, None]
    return (scaled.reshape(x.shape) * 255).astype(np.uint8)


def filter_grid(model: nn.Module, limit: int = 64, scale: int = 6) -> np.ndarray:
    """The first layer's filters as RGB tiles (input channels as colours), 8 to a row."""
    w = first_conv(model).weight.detach().float().cpu()[:limit]
    if w.shape[1] != 3:
        raise UserError("the first layer does not look at the 3 colour channels directly")
    return tile(_to_uint8(w.permute(0, 2, 3, 1).numpy()), columns=8, scale=scale)


@torch.no_grad()
def stage_maps(model: nn.Module, x: torch.Tensor, per_stage: int = 16) -> list[tuple[str, np.ndarray]]:
    """For one normalised image x (1, 3, S, S): (stage name, grid of its most active `per_stage` maps) per stage."""
    out, h = [], x
    names = backbones.entry(model).stages
    for names_k, stage in zip(names, backbones.stages(model)):
        h = stage(h)
        maps = h[0].float().cpu()
        top = maps.mean((1, 2)).argsort(descending=True)[:per_stage]  # the channels this image excites most
        picked = maps[top].numpy()
        scale = max(1, 48 // picked.shape[-1])
        out.append((f"{names_k[-1]} · {maps.shape[0]} maps of {maps.shape[1]}x{maps.shape[2]}",
                    tile(_to_uint8(picked), columns=8, scale=scale)))
    return out
