"""`engine info`: versions, device, available weights, workspace."""
from __future__ import annotations

import platform
from importlib.metadata import version

from engine.models import sources


def collect() -> dict:
    import PIL
    import torch
    import torchvision
    import transformers

    from engine.core import device, workspace  # deferred: imports torch

    dev = device.best_device()
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "transformers": transformers.__version__,
        "pillow": PIL.__version__,
        "streamlit": version("streamlit"),
        "device": device.describe(dev),
        "weights": sources.available(),
        "workspace": str(workspace.home()),
    }


def format_text(d: dict) -> str:
    w = d["weights"]
    cached = [a for a, ok in w["vision"]["imagenet_cached"].items() if ok] or ["none"]
    hf = [m for m, ok in w["text"]["hf_cached"].items() if ok] or ["none"]
    dev = d["device"]
    lines = [
        f"python {d['python']} · torch {d['torch']} · torchvision {d['torchvision']} · transformers {d['transformers']}",
        f"device: {dev['device']} ({dev['name']}), AMP dtype {dev['amp_dtype']}",
        f"vision weights: ImageNet cached for {', '.join(cached)}; bundled mini resnet18: {'yes' if w['vision']['mini'] else 'missing'}",
        f"text weights: HF cache has {', '.join(hf)}; bundled mini GPT-2: {'yes' if w['text']['mini'] else 'missing'}",
        f"network downloads: {'allowed' if w['online'] else 'off'}",
        f"auto uses: vision {w['auto']['vision']}; text {w['auto']['text']}",
        f"workspace: {d['workspace']}",
    ]
    return "\n".join(lines)
