"""The dataset map: a dataset's images as points in 2-D, placed by a backbone's frozen features.

Side by side for the pretrained backbone and the same network with random weights: with
pretrained features the classes already form clusters before any training, with random ones
they do not -- the two-minute picture of what pretraining buys. The features are the frozen
feature cache's (engine/vision/feature_cache.py), so after a linear run on the same data the pretrained side
costs nothing to compute. Placement: t-SNE (van der Maaten & Hinton 2008, scikit-learn) of the
standardised features, after PCA to at most 50 dimensions; PCA alone for tiny sets. Each side
also gets one number: the accuracy of a 5-nearest-neighbour vote in feature space (leave-one-out),
how well the classes separate without any training.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from engine import jobs
from engine.core.errors import UserError
from engine.data import imagedata
from engine.models import sources

SIDES = ("pretrained", "random")


@dataclass
class DataMap:
    classes: list[str]
    files: list[str]
    labels: list[int]
    points: dict = field(default_factory=dict)  # side -> (N, 2) float array
    knn: dict = field(default_factory=dict)     # side -> leave-one-out 5-NN accuracy in feature space
    weights: str = ""                           # what the pretrained side is (e.g. "mini (bundled resnet18)")
    method: str = "t-SNE"

    def rows(self) -> list[dict]:
        """One row per (side, image): for a scatter plot."""
        return [{"side": side, "x": float(p[0]), "y": float(p[1]), "class": self.classes[y], "file": f}
                for side in SIDES if side in self.points for p, y, f in zip(self.points[side], self.labels, self.files)]


def embed(feats: np.ndarray, seed: int = 0) -> tuple[np.ndarray, str]:
    """(N, D) features -> (N, 2) points, and the method used."""
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE
    from sklearn.preprocessing import StandardScaler

    z = StandardScaler().fit_transform(feats)
    z = PCA(n_components=min(50, *z.shape), random_state=seed).fit_transform(z)
    if len(z) < 10:
        return z[:, :2] if z.shape[1] >= 2 else np.pad(z, ((0, 0), (0, 2 - z.shape[1]))), "PCA"
    perplexity = float(min(30, (len(z) - 1) / 3))
    return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(z), "t-SNE"


def knn_accuracy(feats: np.ndarray, labels: np.ndarray, k: int = 5) -> float:
    """Leave-one-out accuracy of a k-nearest-neighbour vote (cosine distance on centred features)."""
    z = feats - feats.mean(0)
    z = z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)
    sim = z @ z.T
    np.fill_diagonal(sim, -np.inf)
    k = min(k, len(z) - 1)
    near = np.argsort(-sim, axis=1)[:, :k]
    votes = np.array([np.bincount(labels[row], minlength=labels.max() + 1).argmax() for row in near])
    return float((votes == labels).mean())


@dataclass
class DatasetFeatures:
    """Frozen features of every image of a dataset (train then validation), per side."""
    classes: list[str]
    files: list[str]
    labels: np.ndarray
    feats: dict          # side -> (N, D) float32 array
    weights: str         # what the pretrained side is


def dataset_features(data: str, weights: str = "auto", arch: str = "resnet18", seed: int = 0, image_size: int | None = None,
                     sides: tuple[str, ...] = SIDES, ctx=None) -> DatasetFeatures:
    """The frozen (pooled) features of `data` through the feature cache, for the pretrained and/or the random side."""
    from engine.core import device as devices  # deferred: imports torch
    from engine.vision import feature_cache, network, preprocess  # deferred: imports torch

    ctx = ctx or jobs.Quiet()
    td = imagedata.training_data(data, seed=seed)
    if len(td.train) + len(td.val) < 4:
        raise UserError("this needs at least 4 images")
    source = sources.resolve_vision(arch, weights)
    if source.kind == "none":
        raise UserError("this needs pretrained features; choose weights other than none")
    if source.download:
        raise UserError(f"{source.name} is not on this machine yet: download it on the Models page first")
    pp = preprocess.preprocessing_for(source, image_size)
    dev = torch.device(getattr(ctx, "device", None) or devices.best_device())
    ctx.report(phase="loading", message="reading images")
    train_x = preprocess.load_images([p for p, _ in td.train], pp.resize)
    val_x = preprocess.load_images([p for p, _ in td.val], pp.resize)
    out = DatasetFeatures(td.classes, [str(p) for p, _ in td.train + td.val], np.array([y for _, y in td.train + td.val]),
                          {}, source.name)
    for side in sides:
        src = source if side == "pretrained" else sources.resolve_vision(arch, "none")
        ctx.report(phase="extracting", message=f"features of the {side} backbone")
        model = network.build_model(arch, len(td.classes), src, seed=seed).to(dev, memory_format=torch.channels_last)
        got = feature_cache.cached_features(model, 5, train_x, val_x, pp, feature_cache.weights_hash(model, 5), td.version, arch, dev, ctx)
        if got is None:
            raise UserError("cancelled")
        out.feats[side] = torch.cat(got).flatten(1).float().cpu().numpy()
    return out


def compute(data: str, weights: str = "auto", arch: str = "resnet18", seed: int = 0, image_size: int | None = None,
            ctx=None) -> DataMap:
    """The map of every image of `data` (train and validation), for both sides."""
    f = dataset_features(data, weights, arch, seed, image_size, SIDES, ctx)
    out = DataMap(f.classes, f.files, f.labels.tolist(), weights=f.weights)
    for side in SIDES:
        out.points[side], out.method = embed(f.feats[side], seed)
        out.knn[side] = knn_accuracy(f.feats[side], f.labels)
    return out
