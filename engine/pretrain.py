"""Reproducible pretraining of the bundled mini models in assets/.

`python -m engine pretrain vision` -> assets/mini-resnet18/
`python -m engine pretrain text`   -> assets/mini-gpt2/
"""
from __future__ import annotations

import gzip
import json
import logging
import math
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from engine.errors import UserError

log = logging.getLogger(__name__)


# ============================================================================= vision
# The mini backbone: torchvision resnet18 trained at 64 px on a mix — half of every batch is
# Fashion-MNIST, half colour IFS fractals (64 formula-generated classes, engine/fractals.py).
# The design notes measured that this mix transferred best to small colour-image tasks.
# One 74-way head (10 Fashion-MNIST classes + 64 fractal classes) sees both halves.

FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")  # Debian's dataset-fashion-mnist
FMNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
N_FRACTAL_CLASSES = 64


@dataclass
class VisionPretrainConfig:
    minutes: float | None = 20.0   # time budget; turned into a fixed step count after timing a few steps
    steps: int | None = None       # exact step count (reproducible); overrides minutes
    seed: int = 0
    image_size: int = 64
    batch_size: int = 64           # half Fashion-MNIST, half fractals
    lr: float = 0.05               # SGD nesterov, warmup then cosine to 0
    weight_decay: float = 5e-4
    label_smoothing: float = 0.1
    threads: int = 1
    out: str = ""                  # default: assets/mini-resnet18
    probe: bool = True             # run the linear-probe transfer measurement afterwards
    extra: dict = field(default_factory=dict)


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


def _fmnist_batch(images: np.ndarray, labels: np.ndarray, n: int, rng: np.random.Generator, train: bool = True):
    """n Fashion-MNIST images as uint8 (n, 28, 28) with a random pad-2 crop and horizontal flip."""
    idx = rng.integers(0, len(images), size=n)
    x = images[idx]
    if train:
        padded = np.pad(x, ((0, 0), (2, 2), (2, 2)))
        dy, dx = rng.integers(0, 5, size=2)
        x = padded[:, dy:dy + 28, dx:dx + 28]
        flip = rng.random(n) < 0.5
        x = np.where(flip[:, None, None], x[:, :, ::-1], x)
    return x, labels[idx]


def _to_tensor(gray28: np.ndarray | None, rgb: np.ndarray | None, size: int, mean, std):
    """Gray 28 px and/or RGB uint8 batches -> one normalised float tensor (B, 3, size, size)."""
    import torch
    import torch.nn.functional as F

    parts = []
    if gray28 is not None and len(gray28):
        g = torch.from_numpy(np.ascontiguousarray(gray28)).float().div_(255).unsqueeze(1)
        g = F.interpolate(g, size=(size, size), mode="bilinear", align_corners=False, antialias=False)
        parts.append(g.expand(-1, 3, -1, -1))
    if rgb is not None and len(rgb):
        c = torch.from_numpy(np.ascontiguousarray(rgb)).permute(0, 3, 1, 2).float().div_(255)
        if c.shape[-1] != size:
            c = F.interpolate(c, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        parts.append(c)
    x = torch.cat(parts)
    m = torch.tensor(mean).view(1, 3, 1, 1)
    s = torch.tensor(std).view(1, 3, 1, 1)
    return ((x - m) / s).contiguous(memory_format=torch.channels_last)


def pretrain_vision(cfg: VisionPretrainConfig) -> dict:
    """Train, evaluate and write assets/mini-resnet18/{model.safetensors, model_card.json}. Returns the card."""
    import torch
    import torch.nn.functional as F
    import torchvision
    from safetensors.torch import save_file

    from engine import fractals, sources, workspace

    torch.set_num_threads(cfg.threads)
    out = Path(cfg.out) if cfg.out else sources.MINI_VISION
    tr_x, tr_y = load_fashion_mnist("train")
    te_x, te_y = load_fashion_mnist("test")
    systems = fractals.make_systems(N_FRACTAL_CLASSES, cfg.seed)
    rng = np.random.default_rng([cfg.seed, 2024])
    torch.manual_seed(cfg.seed)
    size, half = cfg.image_size, cfg.batch_size // 2

    # normalisation statistics of the training mix, from a fixed sample
    srng = np.random.default_rng([cfg.seed, 5])
    g, _ = _fmnist_batch(tr_x, tr_y, 512, srng, train=False)
    f, _ = fractals.fractal_batch(systems, 512, size, srng)
    sample = _to_tensor(g, f, size, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    mean = [round(v, 3) for v in sample.mean(dim=(0, 2, 3)).tolist()]
    std = [round(v, 3) for v in sample.std(dim=(0, 2, 3)).tolist()]

    model = torchvision.models.resnet18(num_classes=10 + N_FRACTAL_CLASSES)
    model = model.to(memory_format=torch.channels_last)  # ~1.5x faster convolutions on this CPU
    decay = [p for n, p in model.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1]  # BN and biases: no weight decay
    opt = torch.optim.SGD([{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                          lr=cfg.lr, momentum=0.9, nesterov=True)

    def batch():
        gx, gy = _fmnist_batch(tr_x, tr_y, half, rng)
        fx, fy = fractals.fractal_batch(systems, cfg.batch_size - half, size, rng)
        x = _to_tensor(gx, fx, size, mean, std)
        y = torch.from_numpy(np.concatenate([gy, fy + 10]))
        return x, y

    def lr_at(step: int, total: int) -> float:
        warm = max(1, int(0.03 * total))
        if step < warm:
            return cfg.lr * (step + 1) / warm
        return 0.5 * cfg.lr * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))

    def train_step(step: int, total: int) -> float:
        for gr in opt.param_groups:
            gr["lr"] = lr_at(step, total)
        x, y = batch()
        loss = F.cross_entropy(model(x), y, label_smoothing=cfg.label_smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.item()

    model.train()
    t0 = time.time()
    total = cfg.steps
    if total is None:
        # time a few steps at a nominal schedule length, then fix the step count for the budget.
        # The reproducible command recorded in the card is `--steps <total>`.
        probe_steps = 8
        timing_total = 10**6
        for s in range(probe_steps):
            train_step(s, timing_total)
            if s == 1:
                t1 = time.time()
        per_step = (time.time() - t1) / (probe_steps - 2)
        budget = (cfg.minutes or 20) * 60 * 0.9 - 60  # leave time for evaluation
        total = max(50, int(budget / per_step))
        log.info("%.2f s/step -> %d steps for %.1f minutes", per_step, total, cfg.minutes)
        # restart from scratch so the run equals `--steps total` exactly
        return pretrain_vision(VisionPretrainConfig(**{**asdict(cfg), "steps": total, "minutes": None}))

    losses = []
    for step in range(total):
        losses.append(train_step(step, total))
        if step % 50 == 0 or step == total - 1:
            log.info("step %d/%d loss %.3f lr %.4f %.0fs", step, total, float(np.mean(losses[-50:])), lr_at(step, total), time.time() - t0)
    train_seconds = time.time() - t0

    # ---- evaluation: Fashion-MNIST test split (10-way, first 10 logits) and fresh fractal renders
    model.eval()
    correct = 0
    with torch.inference_mode():
        for i in range(0, len(te_x), 500):
            x = _to_tensor(te_x[i:i + 500], None, size, mean, std)
            correct += int((model(x)[:, :10].argmax(1).numpy() == te_y[i:i + 500]).sum())
        erng = np.random.default_rng([cfg.seed, 99])
        fc = 0
        for _ in range(4):
            fx, fy = fractals.fractal_batch(systems, 256, size, erng)
            fc += int((model(_to_tensor(None, fx, size, mean, std))[:, 10:].argmax(1).numpy() == fy).sum())
    fmnist_acc = correct / len(te_x)
    fractal_acc = fc / 1024

    # ---- write fp16 weights + card (atomically)
    state = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in model.state_dict().items()}
    out.mkdir(parents=True, exist_ok=True)
    tmp = workspace.atomic_path(out / "model.safetensors")
    save_file(state, str(tmp), metadata={"format": "pt", "arch": "resnet18"})
    os.replace(tmp, out / "model.safetensors")
    card = {
        "name": "mini-resnet18",
        "arch": "torchvision resnet18",
        "data": {
            "fashion_mnist": "Debian dataset-fashion-mnist, train split (60k), gray -> 3 channels, bilinear resize, pad-2 crop + flip",
            "fractals": f"{N_FRACTAL_CLASSES} colour IFS fractal classes generated from the seed (engine/fractals.py), rendered on the fly",
            "mix": "half of every batch from each",
        },
        "classes": FMNIST_CLASSES + [f"fractal_{i:02d}" for i in range(N_FRACTAL_CLASSES)],
        "head": "fc: 74 outputs (10 Fashion-MNIST + 64 fractals); replaced by a new head when fine-tuning",
        "steps": total,
        "batch_size": cfg.batch_size,
        "images_seen": total * cfg.batch_size,
        "optimizer": f"SGD nesterov momentum 0.9, lr {cfg.lr} (3% warmup, cosine), weight decay {cfg.weight_decay}, label smoothing {cfg.label_smoothing}",
        "seed": cfg.seed,
        "threads": cfg.threads,
        "train_seconds": round(train_seconds, 1),
        "final_train_loss": round(float(np.mean(losses[-50:])), 4),
        "preprocessing": {"image_size": size, "resize": size, "mean": mean, "std": std},
        "test_accuracy": {"fashion_mnist_test": round(fmnist_acc, 4), "fractals_fresh_renders": round(fractal_acc, 4)},
        "dtype": "float16",
        "command": f"python -m engine pretrain vision --steps {total} --seed {cfg.seed} --threads {cfg.threads}",
        "torch": torch.__version__,
    }
    workspace.atomic_write_json(out / "model_card.json", card)
    log.info("Fashion-MNIST test accuracy %.4f, fractal accuracy %.4f", fmnist_acc, fractal_acc)
    if cfg.probe:
        card = probe_vision(out)
    return card


def probe_vision(out: Path | None = None, seed: int = 0) -> dict:
    """Transfer check written into the card: linear probe from `mini` vs from `none` on held-out tasks.

    Uses the app's own `linear` strategy (engine.vision.finetune) on generated coloured shapes
    (5 shape classes, never seen in pretraining) and, when present, the bundled sample dataset.
    """
    import tempfile

    from engine import fractals, sources, vision, workspace

    out = Path(out or sources.MINI_VISION)
    weights_file = out / "model.safetensors"
    card = json.loads((out / "model_card.json").read_text())
    tasks = {}
    with tempfile.TemporaryDirectory() as tmp:
        shapes = fractals.write_shapes_dataset(Path(tmp) / "shapes", n_per_class=40, size=64, seed=seed + 1000, shapes=fractals.SHAPES)
        tasks["coloured shapes (5 classes x 40, 64 px, 20% val)"] = str(shapes)
        sample = sources.ASSETS / "sample"
        if sample.is_dir() and any(p.is_dir() for p in sample.iterdir()):
            tasks["bundled sample dataset (assets/sample)"] = str(sample)
        results = {}
        for task, data in tasks.items():
            row = {}
            for weights in (str(weights_file), "none"):
                cfg = vision.FinetuneConfig(data=data, weights=weights, strategy="linear", epochs=30, lr=1e-2,
                                            optimizer="adamw", image_size=card["preprocessing"]["image_size"], seed=seed)
                summary = vision.finetune(cfg, Path(tmp) / f"run-{len(results)}-{weights == 'none'}")
                row["mini" if weights != "none" else "none"] = round(summary["best_val_acc"], 4)
            results[task] = row
    card["transfer"] = {
        "method": "linear probe (strategy linear: frozen backbone, new fc trained 30 epochs, AdamW lr 1e-2, seed 0), validation accuracy",
        "results": results,
    }
    workspace.atomic_write_json(out / "model_card.json", card)
    return card


