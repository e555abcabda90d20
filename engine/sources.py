"""Where weights come from, decided without ever requiring the network.

Vision: `imagenet` (torchvision weights, when cached under torch.hub.get_dir()/checkpoints
or downloadable), `mini` (bundled, assets/mini-resnet18), `none` (random init), or a
.safetensors file. Text: a GPT-2-family hub id (when in the HF cache, loaded with
local_files_only, or downloadable), a local HF folder, or `mini` (assets/mini-gpt2).
`auto` picks the real weights when present, else the bundled mini model, and says why.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from engine import backbones

ASSETS = Path(__file__).resolve().parent.parent / "assets"
MINI_VISION = ASSETS / "mini-resnet18"
MINI_TEXT = ASSETS / "mini-gpt2"
VISION_ARCHS = backbones.NAMES
TEXT_HUB_IDS = ("gpt2", "distilgpt2", "gpt2-medium")


@dataclass
class Source:
    kind: str            # "imagenet" | "mini" | "none" | "file" | "hub" | "folder"
    name: str            # what the UI shows, e.g. "ImageNet (torchvision resnet18)"
    reason: str          # why this source was chosen, one sentence
    path: Path | None = None


_online: bool | None = None


def online() -> bool:
    """Whether weight downloads can work: a name lookup of the weight hosts, once per process.

    Off without asking when HF_HUB_OFFLINE=1 or TRANSFER_STUDIO_OFFLINE=1 (the tests set it).
    """
    global _online
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("TRANSFER_STUDIO_OFFLINE") == "1":
        return False
    if _online is None:
        import socket
        from concurrent.futures import ThreadPoolExecutor

        pool = ThreadPoolExecutor(max_workers=1)
        future = pool.submit(socket.getaddrinfo, "huggingface.co", 443)
        try:
            future.result(timeout=1.5)
            _online = True
        except Exception:
            _online = False
        pool.shutdown(wait=False)
    return _online


# ----------------------------------------------------------------------------- vision
def imagenet_file(arch: str) -> Path:
    """Where torchvision keeps (or would download) the ImageNet weights for `arch`."""
    import torch
    from torchvision.models import get_model_weights

    url = get_model_weights(arch).DEFAULT.url
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)


def imagenet_cached(arch: str) -> bool:
    return imagenet_file(arch).is_file()


def mini_vision_available() -> bool:
    return (MINI_VISION / "model.safetensors").is_file()


def resolve_vision(arch: str, weights: str) -> Source:
    """Turn the user's choice into a concrete source, or raise UserError saying what to do."""
    from engine.errors import UserError

    backbones.get(arch)  # an unknown name is a UserError listing the known ones
    if weights == "auto":
        if imagenet_cached(arch):
            return Source("imagenet", f"ImageNet ({arch})", "ImageNet weights found in the local torch cache.", imagenet_file(arch))
        if arch == "resnet18" and mini_vision_available():
            return Source("mini", "mini (bundled resnet18)", "No ImageNet weights cached and no network: using the bundled mini backbone.", MINI_VISION / "model.safetensors")
        why = "the bundled mini backbone is missing" if arch == "resnet18" else "the bundled mini backbone is a resnet18"
        return Source("none", "random init", f"No ImageNet weights cached for {arch} and {why}: starting from random weights.")
    if weights == "imagenet":
        if imagenet_cached(arch) or online():
            return Source("imagenet", f"ImageNet ({arch})", "ImageNet weights requested.", imagenet_file(arch))
        raise UserError(f"ImageNet weights for {arch} are not available offline; place {imagenet_file(arch).name} in {imagenet_file(arch).parent} or use --weights mini")
    if weights == "mini":
        if arch != "resnet18":
            raise UserError("the bundled mini backbone is a resnet18; choose --model resnet18 or other weights")
        if not mini_vision_available():
            raise UserError(f"bundled mini backbone missing at {MINI_VISION}; run `python -m engine pretrain vision`")
        return Source("mini", "mini (bundled resnet18)", "Bundled mini backbone requested.", MINI_VISION / "model.safetensors")
    if weights == "none":
        return Source("none", "random init", "Random initialisation requested (training from scratch).")
    path = Path(weights)
    if path.suffix != ".safetensors":
        raise UserError(f"weights {weights!r}: use auto, imagenet, mini, none or a .safetensors file (pickle checkpoints are refused)")
    if not path.is_file():
        raise UserError(f"weights file not found: {weights}")
    return Source("file", path.name, "Weights from an uploaded .safetensors file.", path)


# ----------------------------------------------------------------------------- text
def hf_cached(model_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        hit = try_to_load_from_cache(model_id, "config.json")
        return isinstance(hit, str)
    except Exception:
        return False


def mini_text_available() -> bool:
    return (MINI_TEXT / "config.json").is_file()


def resolve_text(model: str) -> Source:
    from engine.errors import UserError

    if model == "auto":
        for hub_id in TEXT_HUB_IDS[:2]:  # auto: the two small ones (gpt2-medium only when asked for)
            if hf_cached(hub_id):
                return Source("hub", hub_id, f"{hub_id} found in the local Hugging Face cache.")
        if mini_text_available():
            return Source("mini", "mini-gpt2 (bundled)", "No GPT-2 in the local cache and no network: using the bundled mini GPT-2.", MINI_TEXT)
        raise UserError(f"no language model available: bundled model missing at {MINI_TEXT}; run `python -m engine pretrain text`")
    if model == "mini":
        if not mini_text_available():
            raise UserError(f"bundled mini GPT-2 missing at {MINI_TEXT}; run `python -m engine pretrain text`")
        return Source("mini", "mini-gpt2 (bundled)", "Bundled mini GPT-2 requested.", MINI_TEXT)
    path = Path(model)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"{model} is not a Hugging Face model folder (no config.json)")
        return Source("folder", path.name, "Model from a local folder.", path)
    if "/" in model and not model.count("/") == 1:
        raise UserError(f"model folder not found: {model}")
    if hf_cached(model) or online():
        return Source("hub", model, f"{model} from the Hugging Face cache." if hf_cached(model) else f"{model} will be downloaded.")
    raise UserError(f"{model} is not in the local Hugging Face cache and there is no network; use --model mini or a local folder")


def available() -> dict:
    """What can be used right now, for the sidebar and `engine info`."""
    return {
        "vision": {
            "imagenet_cached": {a: imagenet_cached(a) for a in VISION_ARCHS},
            "mini": mini_vision_available(),
        },
        "text": {
            "hf_cached": {m: hf_cached(m) for m in TEXT_HUB_IDS},
            "mini": mini_text_available(),
        },
        "online": online(),
    }
