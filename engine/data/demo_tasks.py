"""Built-in demo tasks for the Transfer Lab: one *similar* and one *different* target task, each
in a small and a large version, so all four advisor scenarios can be shown without an upload,
and a clothing set for the learning-without-labels experiment.

similar    Fractal patterns: new classes made by the same formula-driven generator as the mini
           backbone's pretraining images (colour IFS fractals, engine/data/fractals.py) but with other
           formulas, so the classes themselves were never seen.
different  Line shapes: outlines of simple shapes drawn with thin lines on a plain background.
           Nothing in the pretraining looks like this.

clothing   Grey clothing photos (Fashion-MNIST test split: pullover, coat, shirt, sneaker), for the
           "learning without labels" experiment: centred silhouettes a tiny autoencoder can learn from.
           A subset is bundled in assets/lab-demo/clothing.npz (MIT licence, Zalando Research);
           `make_clothing_asset()` rebuilds it where Debian's dataset-fashion-mnist is installed.

The similar and different tasks are generated here, deterministically, without files or fonts. "Similar" is relative to the
backbone: measured with the bundled mini backbone (engine/lab/advisor.py), the fractal patterns
score 0.31-0.37 and the line shapes 0.13 (the fruit sample 0.47). With ImageNet weights the
picture changes, which is the point of measuring.

Each version is a normal workspace dataset once imported (`import_demo(key)`), so every page
(Images, Fine-tune, Lab) can use it.
"""
from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine.core.errors import UserError
from engine.core.workspace import ASSETS
from engine.data import fractals, imagedata, sample
from engine.data.fashion_mnist import load_fashion_mnist

log = logging.getLogger(__name__)

FRACTAL_SEED = 2024  # the pretraining draws its fractal classes from seed 0: these are other formulas
CLOTHING_ASSET = ASSETS / "lab-demo" / "clothing.npz"
CLOTHING_CLASSES = {"pullover": 2, "coat": 4, "shirt": 6, "sneaker": 7}  # folder name -> Fashion-MNIST label
SHAPES = ("circle", "square", "triangle", "cross")


@dataclass(frozen=True)
class Demo:
    key: str
    name: str          # the workspace dataset name
    kind: str          # "similar" | "different" | "clothing"
    per_class: int
    blurb: str


DEMOS: dict[str, Demo] = {d.key: d for d in (
    Demo("similar-small", "Demo: fractal patterns, 30 per class", "similar", 30,
         "Colour fractal patterns like those the mini backbone was pretrained on (new ones); only a few labels."),
    Demo("similar-large", "Demo: fractal patterns, 120 per class", "similar", 120,
         "The same fractal task with many labels."),
    Demo("different-small", "Demo: line shapes, 30 per class", "different", 30,
         "Thin line drawings of shapes: nothing like the pretraining images; only a few labels."),
    Demo("different-large", "Demo: line shapes, 120 per class", "different", 120,
         "The same shapes task with many labels."),
    Demo("clothing", "Demo: clothing, 120 per class", "clothing", 120,
         "Grey clothing photos: many images for learning without labels (the autoencoder experiment)."),
)}


# ----------------------------------------------------------------------------- similar: fractal patterns
def fractal_images(per_class: int, n_classes: int = 4, size: int = 64, seed: int = 0) -> dict[str, list[np.ndarray]]:
    """class -> `per_class` renders (uint8 H,W,3) of new IFS fractal classes, with the pretraining's jitter."""
    systems = fractals.make_systems(n_classes, FRACTAL_SEED)
    rng = np.random.default_rng([seed, 11])
    return {f"pattern_{chr(ord('a') + c)}": list(fractals.render_batch([system] * per_class, size=size, rng=rng, jitter=0.08))
            for c, system in enumerate(systems)}


# ----------------------------------------------------------------------------- clothing (bundled)
def make_clothing_asset(out: Path = CLOTHING_ASSET, per_class: int = 120) -> Path:
    """Write the bundled subset from Debian's Fashion-MNIST test split (maintainers only)."""
    images, labels = load_fashion_mnist("test")
    keep_x, keep_y = [], []
    for i, label in enumerate(CLOTHING_CLASSES.values()):
        idx = np.flatnonzero(labels == label)[:per_class]
        keep_x.append(images[idx])
        keep_y.append(np.full(len(idx), i, dtype=np.uint8))
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, images=np.concatenate(keep_x), labels=np.concatenate(keep_y), classes=np.array(list(CLOTHING_CLASSES)))
    return out


def clothing_images(per_class: int) -> dict[str, list[np.ndarray]]:
    """class -> the first `per_class` grey 28x28 images of the bundled subset."""
    if not CLOTHING_ASSET.is_file():
        raise UserError(f"the clothing demo data is missing from {CLOTHING_ASSET}")
    with np.load(CLOTHING_ASSET, allow_pickle=False) as z:  # plain arrays only: no pickle
        images, labels, classes = z["images"], z["labels"], [str(c) for c in z["classes"]]
    return {c: list(images[labels == i][:per_class]) for i, c in enumerate(classes)}


# ----------------------------------------------------------------------------- different: line shapes
def _shape_points(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    if shape == "circle":
        t = np.linspace(0, 2 * np.pi, 40, endpoint=False)
    elif shape == "square":
        t = np.pi / 4 + np.arange(4) * np.pi / 2
    elif shape == "triangle":
        t = -np.pi / 2 + np.arange(3) * 2 * np.pi / 3
    else:
        raise ValueError(shape)
    t = t + angle
    return [(cx + r * np.cos(a), cy + r * np.sin(a)) for a in t]


def shape_image(shape: str, rng: np.random.Generator, size: int = 64):
    """One line drawing: a thin outline at a random place, size and angle, ink on paper."""
    from PIL import Image, ImageDraw

    paper = rng.uniform(200, 255, 3)
    ink = paper * rng.uniform(0.0, 0.45)
    img = Image.new("RGB", (size, size), tuple(int(v) for v in paper))
    draw = ImageDraw.Draw(img)
    r = rng.uniform(0.18, 0.36) * size
    cx, cy = rng.uniform(r + 2, size - r - 2, 2)
    angle = rng.uniform(0, 2 * np.pi)
    width = int(rng.integers(1, 3))
    colour = tuple(int(v) for v in ink)
    if shape == "cross":
        for a in (angle, angle + np.pi / 2):
            dx, dy = r * np.cos(a), r * np.sin(a)
            draw.line([(cx - dx, cy - dy), (cx + dx, cy + dy)], fill=colour, width=width)
    else:
        pts = _shape_points(shape, cx, cy, r, angle)
        draw.line(pts + [pts[0]], fill=colour, width=width, joint="curve")
    arr = np.asarray(img, dtype=np.float64) + rng.normal(0, 4, (size, size, 3))  # a little paper grain
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


# ----------------------------------------------------------------------------- import
def _png(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def demo_members(key: str, seed: int = 0) -> imagedata.Collected:
    """The demo's images as in-memory class members (deterministic for a given seed)."""
    from PIL import Image

    demo = DEMOS.get(key)
    if demo is None:
        raise UserError(f"unknown demo {key!r}; choose one of {', '.join(DEMOS)}")
    col = imagedata.Collected()
    if demo.kind == "similar":
        for cls, images in fractal_images(demo.per_class, seed=seed).items():
            for i, a in enumerate(images):
                col.members.append(imagedata.Member(cls, f"{cls}/{cls}_{i:03d}.png", _png(Image.fromarray(a, "RGB"))))
    elif demo.kind == "clothing":
        for cls, images in clothing_images(demo.per_class).items():
            for i, a in enumerate(images):
                col.members.append(imagedata.Member(cls, f"{cls}/{cls}_{i:03d}.png", _png(Image.fromarray(a, "L"))))
    else:
        rng = np.random.default_rng([seed, 7])
        for cls in SHAPES:
            for i in range(demo.per_class):
                col.members.append(imagedata.Member(cls, f"{cls}/{cls}_{i:03d}.png", _png(shape_image(cls, rng))))
    return col


def import_demo(key: str) -> dict:
    """Import a demo as a workspace dataset (idempotent: an existing dataset of that name is kept)."""
    demo = DEMOS.get(key)
    if demo is None:
        raise UserError(f"unknown demo {key!r}; choose one of {', '.join(DEMOS)}")
    if any(d["name"] == demo.name for d in imagedata.list_datasets()):
        return {"dataset": demo.name, "classes": imagedata.dataset_counts(demo.name), "existed": True}
    col = demo_members(key)
    imagedata.create_dataset(demo.name)
    try:
        results = imagedata.import_collected(demo.name, col)
        counts = imagedata.dataset_counts(demo.name)
        why = imagedata.usability(counts)
        if why:
            raise UserError(why)
    except BaseException:
        imagedata.delete_dataset(demo.name)
        raise
    bad = [r for r in results if r["status"] != "accepted"]
    if bad:
        log.info("demo %s: %d images not accepted (%s)", key, len(bad), bad[0]["reason"])
    return {"dataset": demo.name, "classes": counts, "existed": False}


def ensure_dataset(data: str) -> str:
    """Make a name usable: the sample and the demos are imported on first use; others pass through."""
    names = {d["name"] for d in imagedata.list_datasets()}
    if data in names:
        return data
    if data in ("sample", sample.SAMPLE_NAME):
        return sample.load_sample()["dataset"]
    for demo in DEMOS.values():
        if data in (demo.key, demo.name):
            return import_demo(demo.key)["dataset"]
    return data
