"""Where weights come from, decided without ever requiring the network.

Vision: `imagenet` (torchvision weights, when cached under torch.hub.get_dir()/checkpoints
or downloadable), `mini` (bundled, assets/mini-resnet18), `none` (random init), or a
.safetensors file. Text: a GPT-2-family hub id (when in the HF cache, or downloadable), a
local HF folder, or `mini` (assets/mini-gpt2).

`auto` means the best weights this machine can have: real weights when cached; when none are
cached and the network answers, the real weights, downloaded on first use (engine.models, with
progress); the bundled mini model only offline, and the Source says why.
"""
from __future__ import annotations

import os
import socket
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from engine.core import workspace
from engine.core.errors import UserError
from engine.models import backbones

ASSETS = workspace.ASSETS
MINI_VISION = ASSETS / "mini-resnet18"
MINI_TEXT = ASSETS / "mini-gpt2"
VISION_ARCHS = backbones.NAMES
TEXT_HUB_IDS = ("gpt2", "distilgpt2", "gpt2-medium")
AUTO_TEXT = "gpt2"  # what `auto` downloads when no GPT-2 is cached
URL_ENV = "TRANSFER_STUDIO_MODELS_URL"  # another host for the weights (a mirror; the tests' local server)


@dataclass
class Source:
    kind: str            # "imagenet" | "mini" | "none" | "file" | "hub" | "folder"
    name: str            # what the UI shows, e.g. "ImageNet (torchvision resnet18)"
    reason: str          # why this source was chosen, one sentence
    path: Path | None = None
    download: str | None = None  # the model manager's name for what must be downloaded first (None: here)


_online: dict[tuple, bool] = {}  # host -> whether it answered (asked once per process)


def models_url() -> str | None:
    """TRANSFER_STUDIO_MODELS_URL without its trailing slash (None when unset)."""
    return os.environ.get(URL_ENV, "").strip().rstrip("/") or None


def online() -> bool:
    """Whether weight downloads can work: a name lookup of the weight hosts (or a connection to
    TRANSFER_STUDIO_MODELS_URL), once per process per host.

    Off without asking when HF_HUB_OFFLINE=1 or TRANSFER_STUDIO_OFFLINE=1 (the tests set it).
    """
    if offline_forced():
        return False

    url = models_url()
    if url:
        parts = urlsplit(url)
        target = (parts.hostname, parts.port or (443 if parts.scheme == "https" else 80))
        probe = lambda: socket.create_connection(target, timeout=1.5).close()  # noqa: E731
    else:
        target = ("huggingface.co", 443)
        probe = lambda: socket.getaddrinfo(*target)  # noqa: E731
    if target not in _online:
        pool = ThreadPoolExecutor(max_workers=1)
        future = pool.submit(probe)
        try:
            future.result(timeout=1.5)
            _online[target] = True
        except Exception:
            _online[target] = False
        pool.shutdown(wait=False)
    return _online[target]


def offline_forced() -> bool:
    return os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("TRANSFER_STUDIO_OFFLINE") == "1"


def offline_reason() -> str:
    return ("downloads are off (TRANSFER_STUDIO_OFFLINE=1)" if offline_forced()
            else "no network (the weight hosts do not answer)")


# ----------------------------------------------------------------------------- vision
# torchvision's file name of each backbone's default ImageNet weights (its hash prefix is the check); kept here
# so that finding them needs no `import torchvision` (seconds of every process). A test compares with torchvision.
IMAGENET_FILES = {
    "resnet18": "resnet18-f37072fd.pth",
    "resnet34": "resnet34-b627a593.pth",
    "resnet50": "resnet50-11ad3fa6.pth",
    "mobilenet_v3_large": "mobilenet_v3_large-5c1a4163.pth",
    "efficientnet_b0": "efficientnet_b0_rwightman-7f5810bc.pth",
    "convnext_tiny": "convnext_tiny-983f1562.pth",
}


def imagenet_file(arch: str) -> Path:
    """Where torchvision keeps (or would download) the ImageNet weights for `arch`."""
    import torch

    return Path(torch.hub.get_dir()) / "checkpoints" / IMAGENET_FILES[arch]


def imagenet_cached(arch: str) -> bool:
    return imagenet_file(arch).is_file()


def mini_vision_available() -> bool:
    return (MINI_VISION / "model.safetensors").is_file()


def resolve_vision(arch: str, weights: str) -> Source:
    """Turn the user's choice into a concrete source, or raise UserError saying what to do."""

    backbones.get(arch)  # an unknown name is a UserError listing the known ones
    if weights == "auto":
        if imagenet_cached(arch):
            return Source("imagenet", f"ImageNet ({arch})", "ImageNet weights found in the local torch cache.", imagenet_file(arch))
        if online():
            return Source("imagenet", f"ImageNet ({arch})", f"No ImageNet weights for {arch} on this machine yet: they are "
                          "downloaded first (the Models page, or `python -m engine models download`).", imagenet_file(arch), arch)
        if arch == "resnet18" and mini_vision_available():
            return Source("mini", "mini (bundled resnet18)", f"No ImageNet weights cached and {offline_reason()}: using the "
                          "bundled mini backbone (bring real weights in with `python -m engine models import`).", MINI_VISION / "model.safetensors")
        why = "the bundled mini backbone is missing" if arch == "resnet18" else "the bundled mini backbone is a resnet18"
        return Source("none", "random init", f"No ImageNet weights cached for {arch}, {offline_reason()}, and {why}: starting from random weights.")
    if weights == "imagenet":
        if imagenet_cached(arch):
            return Source("imagenet", f"ImageNet ({arch})", "ImageNet weights requested.", imagenet_file(arch))
        if online():
            return Source("imagenet", f"ImageNet ({arch})", "ImageNet weights requested: downloaded first.", imagenet_file(arch), arch)
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
def hf_cache() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def hf_folder(model_id: str) -> Path:
    """The hub cache's folder of `model_id`: models--<id>/refs/main names the revision, snapshots/<revision>/ holds the files."""
    return hf_cache() / ("models--" + model_id.replace("/", "--"))


def hf_snapshot(model_id: str) -> Path | None:
    """The hub cache's complete folder for `model_id` (a config and safetensors weights), or None."""
    try:
        folder = hf_folder(model_id)
        snap = folder / "snapshots" / (folder / "refs" / "main").read_text().strip()
    except (OSError, ValueError):
        return None
    return snap if (snap / "config.json").is_file() and any(snap.glob("*.safetensors")) else None


def hf_cached(model_id: str) -> bool:
    return hf_snapshot(model_id) is not None


def mini_text_available() -> bool:
    return (MINI_TEXT / "config.json").is_file()


def resolve_text(model: str) -> Source:
    if model == "auto":
        for hub_id in TEXT_HUB_IDS[:2]:  # auto: the two small ones (gpt2-medium only when asked for)
            if hf_cached(hub_id):
                return Source("hub", hub_id, f"{hub_id} found in the local Hugging Face cache.", hf_snapshot(hub_id))
        if online():
            return Source("hub", AUTO_TEXT, f"No GPT-2 on this machine yet: {AUTO_TEXT} is downloaded first (the Models page, "
                          "or `python -m engine models download`).", None, AUTO_TEXT)
        if mini_text_available():
            return Source("mini", "mini-gpt2 (bundled)", f"No GPT-2 in the local cache and {offline_reason()}: using the bundled "
                          "mini GPT-2 (bring GPT-2 in with `python -m engine models import`).", MINI_TEXT)
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
    if hf_cached(model):
        return Source("hub", model, f"{model} from the Hugging Face cache.", hf_snapshot(model))
    if online():
        return Source("hub", model, f"{model} is downloaded first.", None, model)
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
        "auto": {"vision": auto_line(lambda: resolve_vision("resnet18", "auto")), "text": auto_line(lambda: resolve_text("auto"))},
    }


def auto_line(resolve) -> str:
    """What `auto` picks now, in a few words: the sidebar and `engine info` say the same."""

    try:
        src = resolve()
    except UserError:
        return "none"
    return src.name + (" (downloaded on first use)" if src.download else "") + (" (offline)" if src.kind == "mini" else "")
