"""Helpers shared by several test modules: generated images and datasets, tiny configs, page access.

(Fixtures shared the same way live in tests/conftest.py.)
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image
from streamlit.testing.v1 import AppTest

import pages  # noqa: F401 - imported outside a script run, so its legacy-URL redirect cannot hijack the first AppTest
from engine.data import imagedata
from engine.lab import experiments
from engine.vision.config import FinetuneConfig

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- engine tests: shapes on grey
COLOURS = [(220, 40, 40), (40, 200, 60), (40, 80, 230), (230, 200, 40)]


def make_dataset(root: Path, n_classes: int = 3, n: int = 8, size: int = 32, seed: int = 0) -> Path:
    """Class c: a shape in colour c (with jitter) on a random grey background, random position."""
    rng = np.random.default_rng(seed)
    for c in range(n_classes):
        d = root / f"class_{c}"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            img = np.full((size, size, 3), rng.integers(60, 190), np.uint8)
            r = int(rng.integers(size // 5, size // 3))
            cx, cy = rng.integers(r, size - r, size=2)
            yy, xx = np.mgrid[0:size, 0:size]
            mask = (np.abs(xx - cx) <= r) & (np.abs(yy - cy) <= r) if c % 2 else (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
            img[mask] = np.clip(np.array(COLOURS[c]) + rng.integers(-20, 20, 3), 0, 255)
            Image.fromarray(img).save(d / f"img_{i}.png")
    return root


def cfg_for(data, **kw):
    # the mechanics under test, pinned: the linear strategy with SGD minibatch steps (the recipe's
    # defaults are tested in tests/test_recipes.py)
    base = dict(data=data, weights="none", image_size=32, epochs=2, batch_size=8, lr=1e-2, seed=0, strategy="linear",
                optimizer="sgd", schedule="cosine", augment=[], weight_decay=0.0, label_smoothing=0.0, bn_adapt=False)
    return FinetuneConfig(**{**base, **kw})


# ----------------------------------------------------------------------------- page tests: two noisy colours
PAGE_COLORS = {"red": (210, 40, 40), "blue": (40, 60, 210)}


def noisy_png(color, size=40, seed=0) -> bytes:
    rng = np.random.default_rng(seed)
    a = np.clip(np.array(color) + rng.integers(-30, 30, (size, size, 3)), 0, 255).astype("uint8")
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "PNG")
    return buf.getvalue()


def make_page_dataset(folder: Path, name: str = "tiny", per_class: int = 8) -> str:
    for cls, color in PAGE_COLORS.items():
        (folder / cls).mkdir(parents=True)
        for i in range(per_class):
            (folder / cls / f"{cls}{i}.png").write_bytes(noisy_png(color, seed=i))
    imagedata.import_path(folder, name)
    return name


def widget(at: AppTest, kind: str, label: str):
    """The one widget of a kind with this label (the training options' keys change with the recipe)."""
    found = [w for w in at.get(kind) if w.label == label]
    assert len(found) == 1, (kind, label, [w.label for w in at.get(kind)])
    return found[0]


def open_page(page: str, **query) -> AppTest:
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=120)
    at.switch_page(page)
    for k, v in query.items():
        at.query_params[k] = v
    return at.run()


def away_and_back(at: AppTest, page: str, other: str) -> AppTest:
    """Visit `other` and come back to `page` in the same session (where Streamlit would drop widget values)."""
    at.switch_page(other).run()
    assert not at.exception
    at.switch_page(page).run()
    assert not at.exception
    return at


def has_button(at: AppTest, key: str) -> bool:
    return any(b.key == key for b in at.button)


# ----------------------------------------------------------------------------- empty workspace
# ----------------------------------------------------------------------------- Lab tests: three noisy colours
LAB_COLORS = {"red": (200, 40, 40), "green": (40, 180, 60), "blue": (40, 60, 210)}


def make_folder(root: Path, per_class: int = 8, size: int = 32) -> Path:
    for cls, color in LAB_COLORS.items():
        (root / cls).mkdir(parents=True)
        for i in range(per_class):
            rng = np.random.default_rng([hash(cls) % 1000, i])
            a = np.clip(np.array(color) + rng.integers(-40, 40, (size, size, 3)), 0, 255).astype("uint8")
            buf = io.BytesIO()
            Image.fromarray(a).save(buf, "PNG")
            (root / cls / f"{cls}{i}.png").write_bytes(buf.getvalue())
    return root


def tiny(experiment: str, data: str, weights: str, **kw) -> experiments.LabConfig:
    base = dict(epochs=1, seeds=1, image_size=32, batch_size=8, lr=0.01)
    return experiments.LabConfig(experiment, data=data, weights=weights, **(base | kw))
