"""Fashion-MNIST from Debian's dataset-fashion-mnist package: the IDX files read with numpy, checked."""
from __future__ import annotations

import gzip
import logging
from pathlib import Path

import numpy as np

from engine.core.errors import UserError

log = logging.getLogger(__name__)


# ============================================================================= vision
# The mini backbone: torchvision resnet18 trained at 64 px on a mix — half of every batch is
# Fashion-MNIST, half colour IFS fractals (64 formula-generated classes, engine/data/fractals.py).
# The design notes measured that this mix transferred best to small colour-image tasks.
# One 74-way softmax (10 Fashion-MNIST classes + 64 fractal classes) sees both halves.
# Target tasks are photos of objects at any scale and position on busy backgrounds, where colour
# matters, so most images are scenes: the garment or fractal at a random scale and position on
# a cluttered background, tinted/coloured around a random hue. Random colours alone would teach
# the network to ignore colour; an auxiliary 8-way head predicting that hue keeps it in the features.
# A quarter of the Fashion-MNIST images stay plain (grey, full frame) like its test split.

FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")  # Debian's dataset-fashion-mnist
FMNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


def _read_idx(path: Path) -> np.ndarray:
    """An IDX file (the MNIST format): magic (0x0000 08 ndim), big-endian dims, uint8 data."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise UserError(f"{path} is not an IDX uint8 file")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(dims)):
        raise UserError(f"{path}: header says {dims} but holds {arr.size} bytes")
    return arr.reshape(dims)


def load_fashion_mnist(split: str = "train", folder: Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N, 28, 28), labels int64 (N,)) from the IDX .gz files."""
    folder = Path(folder or FMNIST_DIR)
    prefix = "train" if split == "train" else "t10k"
    img_path, lab_path = folder / f"{prefix}-images-idx3-ubyte.gz", folder / f"{prefix}-labels-idx1-ubyte.gz"
    if not img_path.is_file() or not lab_path.is_file():
        raise UserError(f"Fashion-MNIST not found in {folder}; install it with `apt-get install dataset-fashion-mnist`")
    return _read_idx(img_path), _read_idx(lab_path).astype(np.int64)
