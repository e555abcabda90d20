"""A trained run (or an imported model) loaded for prediction, and the evaluation of its logits.

`load_model` reads only safetensors and JSON; `predict` gives top-k labels for PIL images, with the
run's own preprocessing; `evaluation_report` turns validation logits into the confusion matrix,
per-class precision/recall/F1 and the mistakes the pages show.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from engine.core import device as devices
from engine.core import runs
from engine.core.errors import UserError
from engine.models import backbones, sources
from engine.train import loop
from engine.vision.network import forward_from, load_backbone_state, safe_load_state
from engine.vision.preprocess import Preprocessing, center_crop, crops, normalize

log = logging.getLogger(__name__)


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
    if set(fc) != {"weight", "bias"} or tuple(fc["weight"].shape) != tuple(backbones.head(model).weight.shape):
        raise UserError(f"{weights_path.name}: the output layer does not match the {len(classes)} classes in run.json")
    backbones.head(model).load_state_dict(fc)
    dev = devices.best_device()
    model = model.to(dev, memory_format=torch.channels_last).eval()
    return LoadedModel(model, list(classes), pp, dev, arch, run_dir, info)


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
