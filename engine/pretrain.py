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

from engine import checkpoints, optimizers, schedules
from engine.errors import UserError

log = logging.getLogger(__name__)


# ============================================================================= vision
# The mini backbone: torchvision resnet18 trained at 64 px on a mix — half of every batch is
# Fashion-MNIST, half colour IFS fractals (64 formula-generated classes, engine/fractals.py).
# The design notes measured that this mix transferred best to small colour-image tasks.
# One 74-way softmax (10 Fashion-MNIST classes + 64 fractal classes) sees both halves.
# Target tasks are photos of objects at any scale and position on busy backgrounds, where colour
# matters, so most images are scenes: the garment or fractal at a random scale and position on
# a cluttered background, tinted/coloured around a random hue. Random colours alone would teach
# the network to ignore colour; an auxiliary 8-way head predicting that hue keeps it in the features.
# A quarter of the Fashion-MNIST images stay plain (grey, full frame) like its test split.

FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")  # Debian's dataset-fashion-mnist
FMNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
N_FRACTAL_CLASSES = 64
HUE_BINS = 8


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
    fmnist_dir: str = ""           # default FMNIST_DIR
    eval_fractals: int = 1024      # fresh fractal renders for the fractal accuracy
    stats_sample: int = 512        # images of each source used for the normalisation mean/std


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
        g = torch.from_numpy(np.array(gray28, dtype=np.uint8)).float().div_(255).unsqueeze(1)
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


def _fmnist_scenes(gray28: np.ndarray, size: int, rng: np.random.Generator, plain_fraction: float = 0.25):
    """Fashion-MNIST garments as scenes: uint8 RGB (n, size, size, 3) and hue-bin labels (-100 = plain grey).

    A scene is the garment, resized to 50-100% of the frame at a random position, used as the
    opacity of a colour near a random hue over a cluttered background.
    """
    import torch
    import torch.nn.functional as F

    from engine import fractals

    n = len(gray28)
    g = torch.from_numpy(np.array(gray28, dtype=np.uint8)).float().div_(255).unsqueeze(1)
    full = F.interpolate(g, size=(size, size), mode="bilinear", align_corners=False).squeeze(1).numpy()
    out = np.repeat(full[..., None], 3, axis=-1)  # plain: grey, full frame
    hue_label = np.full(n, -100, dtype=np.int64)
    scene = rng.random(n) >= plain_fraction
    idx = np.flatnonzero(scene)
    if len(idx):
        bg = fractals.clutter(len(idx), size, rng)
        hue = rng.uniform(0, 1, size=len(idx))
        colour = fractals.hsv_to_rgb(hue, rng.uniform(0.4, 1.0, size=len(idx)), rng.uniform(0.7, 1.0, size=len(idx)))
        for j, i in enumerate(idx):
            s = int(rng.integers(size // 2, size + 1))
            alpha = F.interpolate(g[i:i + 1], size=(s, s), mode="bilinear", align_corners=False)[0, 0].numpy()
            top, left = rng.integers(0, size - s + 1, size=2)
            a = np.zeros((size, size), np.float32)
            a[top:top + s, left:left + s] = alpha
            out[i] = bg[j] * (1 - a[..., None]) + colour[j] * a[..., None]
        hue_label[idx] = np.floor(hue * HUE_BINS).astype(np.int64)
    return (np.clip(out, 0, 1) * 255).astype(np.uint8), hue_label


def pretrain_vision(cfg: VisionPretrainConfig) -> dict:
    """Train, evaluate and write assets/mini-resnet18/{model.safetensors, model_card.json}. Returns the card."""
    import torch
    import torch.nn.functional as F
    import torchvision
    from safetensors.torch import save_file

    from engine import fractals, sources, workspace

    torch.set_num_threads(cfg.threads)
    out = Path(cfg.out) if cfg.out else sources.MINI_VISION
    tr_x, tr_y = load_fashion_mnist("train", cfg.fmnist_dir or None)
    te_x, te_y = load_fashion_mnist("test", cfg.fmnist_dir or None)
    systems = fractals.make_systems(N_FRACTAL_CLASSES, cfg.seed)
    rng = np.random.default_rng([cfg.seed, 2024])
    torch.manual_seed(cfg.seed)
    size, half = cfg.image_size, cfg.batch_size // 2

    # normalisation statistics of the training mix, from a fixed sample
    srng = np.random.default_rng([cfg.seed, 5])
    g, _ = _fmnist_batch(tr_x, tr_y, cfg.stats_sample, srng, train=False)
    g, _ = _fmnist_scenes(g, size, srng)
    f, _, _ = fractals.pretrain_fractals(systems, cfg.stats_sample, size, srng, HUE_BINS)
    sample = _to_tensor(None, np.concatenate([g, f]), size, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    mean = [round(v, 3) for v in sample.mean(dim=(0, 2, 3)).tolist()]
    std = [round(v, 3) for v in sample.std(dim=(0, 2, 3)).tolist()]

    n_main = 10 + N_FRACTAL_CLASSES
    model = torchvision.models.resnet18(num_classes=n_main + HUE_BINS)  # fc: class logits, then hue logits
    model = model.to(memory_format=torch.channels_last)  # ~1.5x faster convolutions on this CPU
    decay = [p for n, p in model.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1]  # BN and biases: no weight decay
    opt = torch.optim.SGD([{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                          lr=cfg.lr, momentum=0.9, nesterov=True)

    def batch():
        gx, gy = _fmnist_batch(tr_x, tr_y, half, rng)
        gx, gh = _fmnist_scenes(gx, size, rng)
        fx, fy, fh = fractals.pretrain_fractals(systems, cfg.batch_size - half, size, rng, HUE_BINS)
        x = _to_tensor(None, np.concatenate([gx, fx]), size, mean, std)
        y = torch.from_numpy(np.concatenate([gy, fy + 10]))
        hue = torch.from_numpy(np.concatenate([gh, fh]))
        return x, y, hue

    def lr_at(step: int, total: int) -> float:
        return cfg.lr * schedules.warmup_cosine(step, total, warmup=max(1, int(0.03 * total)))

    # batches are generated in order by one background thread (numpy and torch release the GIL),
    # so rendering overlaps with training on a second core and the sequence stays deterministic
    import queue
    import threading

    batches: queue.Queue = queue.Queue(maxsize=3)
    stop = threading.Event()

    def producer():
        while not stop.is_set():
            item = batch()
            while not stop.is_set():
                try:
                    batches.put(item, timeout=0.5)
                    break
                except queue.Full:
                    pass

    threading.Thread(target=producer, daemon=True, name="pretrain-data").start()

    def train_step(step: int, total: int) -> float:
        for gr in opt.param_groups:
            gr["lr"] = lr_at(step, total)
        x, y, hue = batches.get()
        logits = model(x)
        loss = F.cross_entropy(logits[:, :n_main], y, label_smoothing=cfg.label_smoothing)
        loss = loss + 0.5 * F.cross_entropy(logits[:, n_main:], hue, ignore_index=-100)
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
        stop.set()
        # restart from scratch so the run equals `--steps total` exactly
        return pretrain_vision(VisionPretrainConfig(**{**asdict(cfg), "steps": total, "minutes": None}))

    losses = []
    for step in range(total):
        losses.append(train_step(step, total))
        if step % 50 == 0 or step == total - 1:
            log.info("step %d/%d loss %.3f lr %.4f %.0fs", step, total, float(np.mean(losses[-50:])), lr_at(step, total), time.time() - t0)
    stop.set()
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
        hc = 0
        for i in range(0, cfg.eval_fractals, 256):
            fx, fy, fh = fractals.pretrain_fractals(systems, min(256, cfg.eval_fractals - i), size, erng, HUE_BINS)
            out_f = model(_to_tensor(None, fx, size, mean, std))
            fc += int((out_f[:, 10:n_main].argmax(1).numpy() == fy).sum())
            hc += int((out_f[:, n_main:].argmax(1).numpy() == fh).sum())
    fmnist_acc = correct / len(te_x)
    fractal_acc = fc / max(1, cfg.eval_fractals)
    hue_acc = hc / max(1, cfg.eval_fractals)

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
            "fashion_mnist": "Debian dataset-fashion-mnist, train split (60k), pad-2 crop + flip; 75% as scenes (garment at 50-100% "
                             "of the frame, random position, tinted near a random hue on a cluttered background), 25% plain grey full frame",
            "fractals": f"{N_FRACTAL_CLASSES} colour IFS fractal classes generated from the seed (engine/fractals.py), rendered on the fly "
                        "at 35-95% of the frame, random position, coloured near a random hue on a cluttered background",
            "mix": "half of every batch from each",
        },
        "classes": FMNIST_CLASSES + [f"fractal_{i:02d}" for i in range(N_FRACTAL_CLASSES)] + [f"hue_{i}" for i in range(HUE_BINS)],
        "head": f"fc: {n_main + HUE_BINS} outputs: one softmax over 10 Fashion-MNIST + {N_FRACTAL_CLASSES} fractal classes, "
                f"one over {HUE_BINS} hue bins (auxiliary, weight 0.5); replaced by a new head when fine-tuning",
        "steps": total,
        "batch_size": cfg.batch_size,
        "images_seen": total * cfg.batch_size,
        "optimizer": f"SGD nesterov momentum 0.9, lr {cfg.lr} (3% warmup, cosine), weight decay {cfg.weight_decay}, label smoothing {cfg.label_smoothing}",
        "seed": cfg.seed,
        "threads": cfg.threads,
        "train_seconds": round(train_seconds, 1),
        "final_train_loss": round(float(np.mean(losses[-50:])), 4),
        "preprocessing": {"image_size": size, "resize": size, "mean": mean, "std": std},
        "test_accuracy": {"fashion_mnist_test": round(fmnist_acc, 4), "fractals_fresh_renders": round(fractal_acc, 4),
                          "fractal_hue_bin": round(hue_acc, 4)},
        "dtype": "float16",
        "command": f"python -m engine pretrain vision --steps {total} --seed {cfg.seed} --threads {cfg.threads}",
        "torch": torch.__version__,
    }
    workspace.atomic_write_json(out / "model_card.json", card)
    log.info("Fashion-MNIST test accuracy %.4f, fractal accuracy %.4f, hue %.4f", fmnist_acc, fractal_acc, hue_acc)
    if cfg.probe:
        card = probe_vision(out)
    return card


def probe_vision(out: Path | None = None, seeds: tuple[int, ...] = (0, 1, 2)) -> dict:
    """Transfer check written into the card: linear probe from `mini` vs from `none` on held-out tasks.

    Uses the app's own `linear` strategy (engine.vision.finetune) on generated coloured shapes
    (5 shape classes, never seen in pretraining) and, when present, the bundled sample dataset.
    `none` is a random-init resnet18 saved with the mini backbone's preprocessing, so only the
    weights differ. Validation sets are small (32-40 images), so it is repeated over seeds (each
    seed: another split, head init and batch order; another shapes set and random init) and averaged.
    """
    from engine import fractals, sources, vision, workspace
    from engine.bench import temporary_workspace

    out = Path(out or sources.MINI_VISION).resolve()
    weights_file = out / "model.safetensors"
    card = json.loads((out / "model_card.json").read_text())
    per_seed: dict[str, dict[str, list[float]]] = {}
    with temporary_workspace() as tmp:  # the generated images never enter the user's workspace
        for seed in seeds:
            tasks = {}
            shapes = fractals.write_shapes_dataset(tmp / f"shapes-{seed}", n_per_class=40, size=64, seed=seed + 1000, shapes=fractals.SHAPES)
            tasks["coloured shapes (5 classes x 40, 64 px, 20% val)"] = str(shapes)
            sample = sources.ASSETS / "sample"
            if sample.is_dir() and any(p.is_dir() for p in sample.iterdir()):
                tasks["bundled sample dataset (assets/sample, 4 classes x 40, 20% val)"] = str(sample)
            random_init = vision.build_model("resnet18", 2, sources.Source("none", "random init", ""), seed=seed)
            none_file = tmp / f"random-init-{seed}.safetensors"
            vision.save_weights(none_file, random_init, {"preprocessing": card["preprocessing"]})
            for task, data in tasks.items():
                for name, weights in (("mini", weights_file), ("none", none_file)):
                    # the linear probe with the recipe book's settings (the L-BFGS protocol), as a user gets it
                    cfg = vision.FinetuneConfig(data=data, weights=str(weights), strategy="linear", seed=seed)
                    summary = vision.finetune(cfg, tmp / f"run-{seed}-{len(per_seed)}-{name}")
                    per_seed.setdefault(task, {}).setdefault(name, []).append(round(summary["best_val_acc"], 4))
                    log.info("probe %s from %s, seed %d: %.4f", task, name, seed, summary["best_val_acc"])
    results = {task: {name: round(float(np.mean(v)), 4) for name, v in row.items()} | {"per_seed": row} for task, row in per_seed.items()}
    card = json.loads((out / "model_card.json").read_text())  # re-read: only the transfer section changes
    card["transfer"] = {
        "method": "linear probe with the app's linear strategy and the recipe book's settings (frozen backbone, a logistic regression on the features fitted with L-BFGS, L2 by cross-validation), "
                  f"best validation accuracy, mean over seeds {list(seeds)}; `none` is a random-init resnet18 with the same preprocessing",
        "results": results,
        "command": "python -m engine pretrain vision --probe-only",
    }
    workspace.atomic_write_json(out / "model_card.json", card)
    return card


# ============================================================================ text
# A small GPT-2 with its own byte-level BPE tokenizer, pretrained on Debian's `fortunes`
# (quotes, jokes, poems; ~2.5 MB of English). Compute is the limit on a laptop CPU, not data,
# so the model is small (4 layers x 192 wide, 4k vocab, ~2.6M parameters): measured here it
# matched a 4 x 256 / 8k model in bits per byte at equal wall time and trains 1.8x faster.

FORTUNES_DIR = Path("/usr/share/games/fortunes")
FORTUNES_SKIP = {"ascii-art", "translate-me"}  # pictures and non-English text
EOS = "<|endoftext|>"


@dataclass
class TextPretrainConfig:
    out: Path = field(default_factory=lambda: Path(__file__).resolve().parent.parent / "assets" / "mini-gpt2")
    seed: int = 1337
    minutes: float = 30.0          # wall-time budget; turned into a fixed step count after a short timing
    steps: int | None = None       # exact number of steps (overrides minutes; what the model card records)
    n_layer: int = 4
    n_embd: int = 192
    n_head: int = 6
    vocab_size: int = 4096
    block_size: int = 256          # context length (n_positions)
    batch_size: int = 8            # 2k tokens a step: with a CPU budget of a few million tokens, more updates beat bigger batches
    lr: float = 2e-3
    min_lr: float = 1e-4
    warmup: int = 100
    weight_decay: float = 0.1
    dropout: float = 0.0           # a few epochs only: dropout cost 25% speed and did not help
    val_fraction: float = 0.05
    eval_every: int = 120          # evaluate and write a usable checkpoint this often
    threads: int = 1               # on a shared 2-core machine one thread was 2-4x faster than two
    state_dir: Path | None = None  # optimizer state for --resume (defaults to workspace/cache)
    data_dir: Path | None = None   # default FORTUNES_DIR


def clean_fortune(raw: str) -> str | None:
    """One fortune as plain prose: overstrikes and control characters removed, wrapped lines joined.

    Paragraphs stay separated by a blank line and `-- Author` attributions keep their own line.
    Pictures (mostly punctuation) are dropped by returning None.
    """
    text = re.sub(r".\x08", "", raw)                    # "_\bX" overstrike -> "X"
    text = re.sub(r"[^\S\n]+", " ", text)               # tabs, runs of spaces -> one space
    text = re.sub(r"[\x00-\x09\x0b-\x1f\x7f]", "", text)
    paragraphs, current = [], []
    for line in text.split("\n"):
        line = line.strip()
        if not line:
            if current:
                paragraphs.append(" ".join(current))
                current = []
        elif line.startswith("--") or line.startswith("\u2014"):
            if current:
                paragraphs.append(" ".join(current))
            paragraphs.append(line)
            current = []
        else:
            current.append(line)
    if current:
        paragraphs.append(" ".join(current))
    out = "\n".join(paragraphs).strip()
    if len(out) < 8:
        return None
    letters = sum(c.isalpha() or c.isspace() for c in out)
    return out if letters / len(out) >= 0.75 else None


def load_fortunes(folder: Path | None = None) -> tuple[list[str], list[str]]:
    """All cleaned fortunes (in file order) and the file names they came from."""
    from engine.errors import UserError

    folder = Path(folder or FORTUNES_DIR)
    if not folder.is_dir():
        raise UserError(f"no fortunes text at {folder}; install it with `apt-get install fortunes`")
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.suffix and p.name not in FORTUNES_SKIP)
    fortunes: list[str] = []
    for path in files:
        data = path.read_bytes()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            text = data.decode("latin-1")
        for raw in re.split(r"^%$", text, flags=re.M):
            cleaned = clean_fortune(raw)
            if cleaned:
                fortunes.append(cleaned)
    if not fortunes:
        raise UserError(f"no usable fortunes in {folder}; reinstall with `apt-get install --reinstall fortunes`")
    return fortunes, [p.name for p in files]


def train_tokenizer(texts: list[str], vocab_size: int):
    """A GPT-2-style byte-level BPE (no unknown tokens) with `<|endoftext|>` as token 0."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS, unk_token=EOS, pad_token=EOS, model_max_length=None)


def _lr_at(step: int, cfg: TextPretrainConfig, max_steps: int) -> float:
    """Linear warmup then cosine decay to min_lr (nanoGPT's schedule)."""
    return cfg.lr * schedules.warmup_cosine(step, max_steps, cfg.warmup, floor=cfg.min_lr / cfg.lr)


def _batch(data, step: int, cfg: TextPretrainConfig):
    """Random blocks of the token stream; the generator is seeded per step so a resumed run sees the same batches."""
    import torch

    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
    starts = torch.randint(0, len(data) - cfg.block_size - 1, (cfg.batch_size,), generator=g)
    x = torch.stack([data[s : s + cfg.block_size] for s in starts.tolist()])
    y = torch.stack([data[s + 1 : s + 1 + cfg.block_size] for s in starts.tolist()])
    return x, y


def _evaluate(model, data, block_size: int) -> float:
    """Mean next-token loss over the whole validation stream, in non-overlapping blocks."""
    import torch

    model.eval()
    n = (len(data) - 1) // block_size
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, n, 16):
            idx = range(i, min(n, i + 16))
            x = torch.stack([data[j * block_size : (j + 1) * block_size] for j in idx])
            y = torch.stack([data[j * block_size + 1 : (j + 1) * block_size + 1] for j in idx])
            logits = model(input_ids=x).logits
            total += torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), reduction="sum").item()
            count += y.numel()
    model.train()
    return total / count


def _save_state(path: Path, model, optimizer, step: int, extra: dict) -> None:
    checkpoints.save_training_state(path / "state", model, optimizer, {"step": step, **extra})


def _load_state(path: Path, model, optimizer) -> dict:
    return checkpoints.load_training_state(path / "state", model, optimizer)


def _export(model, tokenizer, out: Path, card: dict) -> None:
    """Write the HF folder (fp16 safetensors, tokenizer, config, generation config, card) and swap it in atomically."""
    import copy

    import torch
    from transformers import GenerationConfig

    tmp = out.with_name(f".tmp-{out.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    half = copy.deepcopy(model).to(torch.float16).eval()
    half.generation_config = GenerationConfig(bos_token_id=0, eos_token_id=0, pad_token_id=0)
    half.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "model_card.json").write_text(json.dumps(card, indent=2))
    (tmp / "README.md").write_text(_readme(card))
    old = out.with_name(f".old-{out.name}")
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def _readme(card: dict) -> str:
    m, t, d, s = card["metrics"], card["training"], card["data"], card["sample"]
    return f"""# mini-gpt2 — the bundled language model of Transfer Studio

A {card['model']['parameters'] / 1e6:.1f}M-parameter GPT-2 ({card['model']['n_layer']} layers, {card['model']['n_embd']} wide,
{card['model']['n_head']} heads, context {card['model']['n_positions']}) with its own {card['model']['vocab_size']}-token byte-level
BPE tokenizer, pretrained from scratch on Debian's `fortunes` package ({d['fortunes']} quotes, jokes and
short poems, {d['bytes'] / 1e6:.1f} MB of English; {d['train_tokens']:,} training / {d['val_tokens']:,} validation tokens).
It lets the app work offline, where the real GPT-2 cannot be downloaded.

- Training: {t['steps']} steps of {t['batch_size']} x {t['block_size']} tokens ({t['tokens_seen'] / 1e6:.1f}M tokens seen,
  {t['seconds'] / 60:.0f} minutes on {t['threads']} CPU thread{'s' if t['threads'] > 1 else ''}), AdamW lr {t['lr']} with cosine decay, seed {t['seed']}.
- Validation perplexity: **{m['val_perplexity']:.1f}** ({m['bits_per_byte']:.2f} bits per byte) on a held-out 5% of the fortunes
  (fp16 weights as stored: {m['val_perplexity_fp16']:.1f}).{' **Partial run**: the checkpoint of an unfinished training.' if card.get('partial') else ''}
- Reproduce: `{card['command']}`

What it can do: write short English sentences in the style of fortune cookies, quotes with `-- Author`
attributions, and one-liners; most words are real English words, but the grammar is loose and
made-up words ("poundly") appear.
What it cannot do: hold a topic for more than a sentence or two, know facts, follow instructions, or write
anything outside the style of its tiny corpus. It is a teaching model, far below GPT-2 (124M parameters
trained on 40 GB of web text); its loss was still falling when training stopped: more compute helps.

Sample (prompt `{s['prompt']}`, seed {s['seed']}, temperature {s['temperature']}, top-k {s['top_k']}):

> {s['text'].replace(chr(10), chr(10) + '> ')}

The same text again: `{s.get('command', '')}`
"""


def pretrain_text(cfg: TextPretrainConfig, resume: bool = False, on_progress: Callable[[dict], None] | None = None) -> dict:
    """Train the mini GPT-2 from scratch and write it to cfg.out; return the model card."""
    import random

    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from engine import workspace
    from engine.errors import UserError
    from engine.text import quiet_transformers

    quiet_transformers()
    torch.set_num_threads(cfg.threads)
    fortunes, files = load_fortunes(cfg.data_dir)
    # A fixed shuffle of whole fortunes, then 95% / 5%: validation fortunes are never trained on.
    order = list(range(len(fortunes)))
    random.Random(cfg.seed).shuffle(order)
    n_val = int(len(order) * cfg.val_fraction)
    val_texts = [fortunes[i] for i in order[:n_val]]
    train_texts = [fortunes[i] for i in order[n_val:]]
    tokenizer = train_tokenizer(train_texts, cfg.vocab_size)

    def encode(texts: list[str]) -> torch.Tensor:
        ids: list[int] = []
        for t in texts:
            ids.extend(tokenizer(t)["input_ids"])
            ids.append(tokenizer.eos_token_id)  # every fortune ends with <|endoftext|>
        return torch.tensor(ids, dtype=torch.long)

    train_data, val_data = encode(train_texts), encode(val_texts)
    val_bytes = sum(len(t.encode()) + 1 for t in val_texts)
    log.info("fortunes: %d (%d files), train %d tokens, val %d tokens", len(fortunes), len(files), len(train_data), len(val_data))

    torch.manual_seed(cfg.seed)
    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=cfg.block_size, n_embd=cfg.n_embd, n_layer=cfg.n_layer, n_head=cfg.n_head,
        resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout,
        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id,
    )
    model = GPT2LMHeadModel(config)
    n_params = sum(p.numel() for p in model.parameters())
    # AdamW with weight decay on matrices only (not biases / LayerNorm), as in nanoGPT.
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = optimizers.make(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], "adamw", lr=cfg.lr, betas=(0.9, 0.95)
    )
    state_dir = cfg.state_dir or workspace.subdir("cache") / "pretrain-text"
    state_dir.mkdir(parents=True, exist_ok=True)
    start, max_steps, elapsed_before = 0, cfg.steps, 0.0
    if resume:
        if not (state_dir / "state.json").is_file():
            raise UserError(f"nothing to resume in {state_dir}; start without --resume")
        meta = _load_state(state_dir, model, optimizer)
        start, max_steps, elapsed_before = meta["step"], meta["max_steps"], meta.get("seconds", 0.0)
        log.info("resuming at step %d of %d", start, max_steps)

    def card_for(step: int, seconds: float, val_loss: float, partial: bool, stored) -> dict:
        # The sample comes from the weights as stored (fp16, run in fp32) through the app's own generation
        # path, so `python -m engine generate` with the card's settings prints the same text.
        from engine import sources as srcs
        from engine import text as textmod
        from engine import textgen

        sample = {"prompt": "The meaning of life is", "seed": 0, "temperature": 0.8, "top_k": 40, "top_p": 1.0,
                  "repetition_penalty": 1.0, "max_new_tokens": min(60, cfg.block_size // 2)}
        lm = textmod.LM(stored.eval(), tokenizer, "mini-gpt2", str(cfg.out), srcs.Source("mini", "mini-gpt2", ""), torch.device("cpu"),
                        torch.float32, "fp32", cfg.block_size, textmod.decode_threads(stored, torch.device("cpu")))
        gen = textgen.generate(lm, sample["prompt"], textgen.GenerationConfig(**{k: v for k, v in sample.items() if k != "prompt"}))
        sample["text"] = gen.samples[0].text
        sample["command"] = (f"python -m engine generate --model mini --prompt \"{sample['prompt']}\" --seed 0 --temperature 0.8 "
                             f"--top-k 40 --top-p 1 --repetition-penalty 1 --max-new-tokens {sample['max_new_tokens']}")
        tokens_per_byte = len(val_data) / val_bytes
        return {
            "name": "mini-gpt2",
            "partial": partial,
            "data": {
                "source": f"Debian package `fortunes` ({cfg.data_dir or FORTUNES_DIR})", "files": files, "skipped": sorted(FORTUNES_SKIP),
                "fortunes": len(fortunes), "bytes": sum(len(t.encode()) for t in fortunes),
                "train_tokens": len(train_data), "val_tokens": len(val_data), "val_fraction": cfg.val_fraction,
            },
            "model": {"architecture": "GPT2LMHeadModel", "parameters": n_params, "n_layer": cfg.n_layer, "n_embd": cfg.n_embd,
                      "n_head": cfg.n_head, "vocab_size": len(tokenizer), "n_positions": cfg.block_size, "dtype": "float16"},
            "training": {"steps": step, "max_steps": max_steps, "batch_size": cfg.batch_size, "block_size": cfg.block_size,
                         "tokens_seen": step * cfg.batch_size * cfg.block_size, "lr": cfg.lr, "min_lr": cfg.min_lr,
                         "warmup": cfg.warmup, "weight_decay": cfg.weight_decay, "dropout": cfg.dropout, "seed": cfg.seed,
                         "threads": cfg.threads, "seconds": round(seconds, 1)},
            "metrics": {"val_loss": round(val_loss, 4), "val_perplexity": round(math.exp(val_loss), 2),
                        "bits_per_byte": round(val_loss * tokens_per_byte / math.log(2), 4), "val_perplexity_fp16": None},
            "sample": sample,
            "command": f"python -m engine pretrain text --steps {max_steps} --seed {cfg.seed}",
        }

    def checkpoint(step: int, seconds: float, partial: bool) -> dict:
        import copy

        val_loss = _evaluate(model, val_data, cfg.block_size)
        # What the app will actually load: fp16 weights as stored, run in fp32.
        stored = copy.deepcopy(model).to(torch.float16).float()
        card = card_for(step, seconds, val_loss, partial, stored)
        card["metrics"]["val_perplexity_fp16"] = round(math.exp(_evaluate(stored, val_data, cfg.block_size)), 2)
        _export(model, tokenizer, cfg.out, card)
        _save_state(state_dir, model, optimizer, step, {"max_steps": max_steps, "seconds": seconds, "seed": cfg.seed})
        log.info("step %d/%d  val loss %.3f  ppl %.1f  -> %s", step, max_steps, val_loss, math.exp(val_loss), cfg.out)
        if on_progress:
            on_progress({"step": step, "steps": max_steps, "val_loss": val_loss, "val_perplexity": math.exp(val_loss), "sample": card["sample"]["text"]})
        return card

    model.train()
    t0 = time.time()
    step = start
    timing_steps = 10
    while max_steps is None or step < max_steps:
        # Dropout randomness is seeded per step too, so a resumed run continues exactly.
        torch.manual_seed(cfg.seed + step)
        lr = _lr_at(step, cfg, max_steps or 10**9)
        for group in optimizer.param_groups:
            group["lr"] = lr
        x, y = _batch(train_data, step, cfg)
        # y is x shifted by one token; the loss is computed here (HF's `labels=` would shift again).
        logits = model(input_ids=x).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step += 1
        if max_steps is None and step == start + timing_steps:
            # Turn the wall-time budget into a fixed number of steps (leave ~8% for evaluation and saving).
            per_step = (time.time() - t0) / timing_steps
            max_steps = max(step + 1, int(cfg.minutes * 60 * 0.92 / per_step))
            log.info("%.2f s/step -> %d steps for %.0f minutes", per_step, max_steps, cfg.minutes)
        if step % 20 == 0:
            log.info("step %d  loss %.3f  lr %.2e  %.0f tokens/s", step, loss.item(), lr,
                     (step - start) * cfg.batch_size * cfg.block_size / (time.time() - t0))
        if max_steps and step % cfg.eval_every == 0 and step < max_steps:
            checkpoint(step, elapsed_before + time.time() - t0, partial=True)
    return checkpoint(step, elapsed_before + time.time() - t0, partial=False)
