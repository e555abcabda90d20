"""Strategy advisor: how big is the dataset, how similar is it to what the backbone was pretrained
on, and therefore which fine-tuning strategy fits (the four scenarios of CS231n's transfer notes).

Size: labelled images per class (the median over classes).

Similarity: we cannot look at the pretraining data (ImageNet is not on this machine; the mini
backbone's data is generated), so we measure its *consequence*: do the backbone's frozen
pretrained features already group the new images by class? The test is a few-shot
nearest-class-mean classifier (prototypes, as in Snell et al. 2017): take SHOTS labelled images
per class, average their features into one prototype per class, and label every other image by
its closest prototype (cosine similarity of centred features). Nothing is fitted, so nothing can
overfit, and it is repeated over EPISODES random draws. It runs on three representations:

    raw pixels (16x16 RGB)            what the images give for free
    a randomly initialised backbone   what the architecture alone gives
    the pretrained backbone           what pretraining adds

    similarity = (acc_pretrained - acc_random) / (1 - acc_random)

i.e. the share of the random network's mistakes that the pretrained features remove: 0 = the
pretraining taught nothing useful for these classes, 1 = it removes every mistake. Same
architecture, same images, same draws: only the weights differ, so the number is about the
pretraining rather than about how hard the task is. (A logistic-regression probe on the same
features separated the demo tasks less clearly: fitted on ~200 images its 512 weights per class
overfit random and pretrained features alike.)
"""
from __future__ import annotations

import logging
import math
import statistics
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from engine import jobs
from engine.core.errors import UserError
from engine.data import imagedata
from engine.models import sources
from engine.vision.config import FinetuneConfig

log = logging.getLogger(__name__)

# Thresholds (stated in the UI): rules of thumb, tuned so the built-in demo tasks land in their
# scenarios. Below SMALL_MAX_PER_CLASS labelled images per class, training many parameters
# overfits; at or above SIMILAR_MIN, the pretrained features remove most of the random-feature errors.
SMALL_MAX_PER_CLASS = 100
SIMILAR_MIN = 0.25
PIXELS = 16    # raw-pixel baseline: images resized to 16x16x3 = 768 numbers (about the 512 of resnet18 features)
SHOTS = 5      # labelled images per class that make a prototype
EPISODES = 30  # random draws averaged


@dataclass
class Advice:
    scenario: str              # e.g. "small + similar"
    size: str                  # "small" | "large"
    similar: bool
    strategy: str              # a vision.STRATEGIES key
    headline: str
    reasons: list[str]
    config: dict = field(default_factory=dict)  # FinetuneConfig fields to use (besides data/weights)
    alternative: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def advise(images_per_class: float, similarity: float) -> Advice:
    """Map (labelled images per class, similarity in [0, 1]) to a scenario and a strategy. Pure."""
    if not (isinstance(images_per_class, (int, float)) and math.isfinite(images_per_class) and images_per_class >= 0):
        raise UserError(f"images per class must be a number >= 0 (got {images_per_class!r})")
    if not (isinstance(similarity, (int, float)) and math.isfinite(similarity)):
        raise UserError(f"similarity must be a finite number (got {similarity!r})")
    small = images_per_class < SMALL_MAX_PER_CLASS
    similar = similarity >= SIMILAR_MIN
    size = "small" if small else "large"
    n = f"{images_per_class:.0f} images per class"
    # Only the strategy (and for partial how much to freeze) is the advice; every training setting
    # comes from the recipe book for that strategy and this dataset (engine/train/recipes.py).
    if small and similar:
        # CS231n's rule of thumb says "linear probe" here; measured (bench recipes), fine-tuning every
        # layer gently with the recipe's warm-up, lr/10 for the pretrained layers and augmentation beats
        # the probe on every small dataset tried, the bundled sample included, so that is the advice
        return Advice("small + similar", size, True, "full", "Fine-tune every layer gently: the pretrained layers learn 10x slower than the new output layer.", [
            "The pretrained features already separate your classes, so small adjustments are enough: the warm-up and the 10x smaller rate keep them.",
            f"Few labels ({n}): flips and random crops make every pass show new versions of them, against memorising.",
            "Measured on small datasets like yours, this beats training only a new output layer (the linear probe), which is the fast alternative: seconds instead of a minute.",
        ], {"strategy": "full"}, alternative="linear (seconds, a few points lower)")
    if not small and similar:
        return Advice("large + similar", size, True, "full", "Fine-tune the whole network, with a small learning rate for the pretrained layers.", [
            f"Enough labels ({n}) to adjust all layers without overfitting much.",
            "The features are already good, so the pretrained layers learn 10x slower than the new output layer: adjusted, not overwritten.",
            "If time is short, fine-tuning only the top layers (partial, k=3) gets most of the gain.",
        ], {"strategy": "full"}, alternative="partial (k=3)")
    if small and not similar:
        return Advice("small + different", size, False, "partial", "Keep the early layers frozen, train the later ones, and augment the images.", [
            f"Few labels ({n}): the whole network would overfit them.",
            "The pretrained high-level features do not fit your images, but the early layers (edges, colours, textures) are generic and worth keeping.",
            "Augmentation (flips, crops) makes the few images go further.",
        ], {"strategy": "partial", "freeze": 2})
    return Advice("large + different", size, False, "full", "Fine-tune everything (or train from scratch).", [
        f"Many labels ({n}): the network can afford to learn features for your images.",
        "The pretrained features fit them poorly, so every layer must change; starting from pretrained weights still usually converges faster than random ones.",
        "With enough data and time, training from scratch is a fair alternative.",
    ], {"strategy": "full"}, alternative="scratch")


def recommended_config(data: str, advice: Advice, weights: str = "auto", image_size: int | None = None):
    """The FinetuneConfig the advice stands for (what the one-click button submits): the weights
    and image size that were measured, the strategy and its settings from the advice."""

    return FinetuneConfig(data=data, weights=weights, image_size=image_size, **advice.config).validate()


# ----------------------------------------------------------------------------- measuring
@torch.inference_mode()
def prototype_accuracy(x: torch.Tensor, y: torch.Tensor, shots: int = SHOTS, episodes: int = EPISODES, seed: int = 0) -> float:
    """Few-shot nearest-class-mean accuracy, averaged over random draws of the labelled images.

    Each episode: `shots` random images per class (fewer when a class is small; at least one is
    always left to be classified) make the class prototypes; every other image gets the label of
    its nearest prototype by cosine similarity of features centred on the mean of all images.
    """
    x = x.float().flatten(1)
    y = y.long()
    counts = torch.bincount(y)
    if counts.min() < 2:
        raise UserError("every class needs at least 2 images to measure similarity")
    k = max(1, min(shots, int(counts.min()) - 1))
    f = F.normalize(x - x.mean(0), dim=1)
    g = torch.Generator().manual_seed(seed)
    accs = []
    for _ in range(episodes):
        support = torch.zeros(len(y), dtype=torch.bool)
        for c in range(len(counts)):
            idx = torch.nonzero(y == c).flatten()
            support[idx[torch.randperm(len(idx), generator=g)[:k]]] = True
        protos = F.normalize(torch.stack([f[support & (y == c)].mean(0) for c in range(len(counts))]), dim=1)
        pred = (f[~support] @ protos.T).argmax(1)
        accs.append((pred == y[~support]).float().mean().item())
    return sum(accs) / len(accs)


def similarity_score(acc_pretrained: float, acc_random: float) -> float:
    """Share of the random-feature errors that the pretrained features remove, clipped to [0, 1]."""
    if acc_random >= 1.0:
        return 1.0 if acc_pretrained >= 1.0 else 0.0
    return max(0.0, min(1.0, (acc_pretrained - acc_random) / (1.0 - acc_random)))


def measure(data: str, weights: str = "auto", arch: str = "resnet18", max_per_class: int = 60, seed: int = 0,
            image_size: int | None = None, ctx=None) -> dict:
    """Size and similarity of a dataset, the scenario, and the advice. See the module docstring."""
    from engine.core import device as devices  # deferred: imports torch
    from engine.vision import feature_cache, network, preprocess  # deferred: imports torch

    ctx = ctx or jobs.Quiet()
    ctx.report(phase="loading", message="reading images")
    td = imagedata.training_data(data, seed=seed)
    items = td.train + td.val
    counts = {c: sum(1 for _, y in items if y == i) for i, c in enumerate(td.classes)}
    per_class = statistics.median(counts.values())
    # a bounded sample keeps the measurement to seconds on a CPU
    g = torch.Generator().manual_seed(seed)
    picked = []
    for i in range(len(td.classes)):
        mine = [p for p in items if p[1] == i]
        order = torch.randperm(len(mine), generator=g).tolist()[:max_per_class]
        picked += [mine[j] for j in sorted(order)]
    y = torch.tensor([lab for _, lab in picked])
    source = sources.resolve_vision(arch, weights)
    if source.kind == "none":
        raise UserError("the advisor needs pretrained weights to compare with; choose weights other than none")
    pp = preprocess.preprocessing_for(source, image_size)
    images = preprocess.load_images([p for p, _ in picked], pp.resize)
    dev = torch.device(getattr(ctx, "device", None) or devices.best_device())

    accs = {}
    small = F.interpolate(preprocess.center_crop(images, pp.image_size).float() / 255, size=(PIXELS, PIXELS), mode="bilinear", antialias=True)
    accs["pixels"] = prototype_accuracy(small.flatten(1), y, seed=seed)
    for name, src in (("random", sources.resolve_vision(arch, "none")), ("pretrained", source)):
        if ctx.cancelled():
            return {}
        ctx.report(phase="extracting", message=f"features of the {name} backbone")
        model = network.build_model(arch, len(td.classes), src, seed=seed).to(dev)
        feats = feature_cache.extract(feature_cache.frozen_prefix(model, 5, dev), images, pp, dev, None)  # fp32
        accs[name] = prototype_accuracy(feats.cpu(), y, seed=seed)
    sim = similarity_score(accs["pretrained"], accs["random"])
    adv = advise(per_class, sim)
    ctx.report(phase="finished", message="measured")
    return {
        "data": data, "classes": counts, "images_per_class": per_class, "probe_images": len(picked),
        "weights": {"kind": source.kind, "name": source.name, "reason": source.reason, "requested": weights},
        "requested_image_size": image_size,
        "image_size": pp.image_size, "nearest_mean_accuracy": {k: round(v, 4) for k, v in accs.items()},
        "chance": round(1 / len(td.classes), 4), "similarity": round(sim, 4), "shots": SHOTS, "episodes": EPISODES,
        "thresholds": {"small_below_images_per_class": SMALL_MAX_PER_CLASS, "similar_at_or_above": SIMILAR_MIN},
        "advice": adv.to_dict(),
    }
