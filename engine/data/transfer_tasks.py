"""The held-out image tasks transfer is measured on: the recipe benchmark's datasets and the mini backbone's probe.

    sample    the bundled fruit sample (4 classes x 40, emoji on random backgrounds)
    shapes    generated coloured shapes (5 x 40); no shape is in any pretraining data here
    clothing  the Lab's clothing task (Fashion-MNIST *test* images, grey, 4 x 40)
    digits    scikit-learn's handwritten digits (UCI, 8x8 scans of real handwriting, 10 x 20, upscaled to 64 px)

Each is about the sample's size, so one run takes seconds.
"""
from __future__ import annotations

from pathlib import Path

from engine.data import demo_tasks, fractals, sample

DATASETS = ("sample", "shapes", "clothing", "digits")
PER_CLASS = {"clothing": 40, "digits": 20}


def make_dataset(name: str, folder: Path) -> str:
    """A dataset for the benchmark: a workspace name or a folder of class folders."""

    if name == "sample":
        return sample.load_sample()["dataset"]
    if name == "shapes":
        return str(fractals.write_shapes_dataset(folder / "shapes", n_per_class=40, size=64, seed=1000, shapes=fractals.SHAPES))
    if name == "clothing":
        return str(write_images(folder / "clothing", demo_tasks.clothing_images(PER_CLASS["clothing"]), "L"))
    if name == "digits":
        return str(write_digits(folder / "digits", PER_CLASS["digits"]))
    raise ValueError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")


def write_images(folder: Path, images: dict, mode: str) -> Path:
    """{class: [arrays]} as PNGs in class folders."""
    from PIL import Image

    for cls, arrays in images.items():
        (folder / cls).mkdir(parents=True, exist_ok=True)
        for i, a in enumerate(arrays):
            Image.fromarray(a, mode).save(folder / cls / f"{i:03d}.png")
    return folder


def write_digits(folder: Path, per_class: int) -> Path:
    """scikit-learn's digits (1,797 real 8x8 scans, 16 grey levels) as 64 px PNGs in class folders."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    for c in range(10):
        (folder / f"digit_{c}").mkdir(parents=True, exist_ok=True)
        for i, j in enumerate(np.nonzero(d.target == c)[0][:per_class]):
            a = (d.images[j] * (255 / 16)).astype("uint8")
            Image.fromarray(a, "L").resize((64, 64), Image.BILINEAR).save(folder / f"digit_{c}" / f"{i:03d}.png")
    return folder
